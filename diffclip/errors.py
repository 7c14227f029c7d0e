"""diffclip's error family: the exceptions that mean "the input or the environment is wrong", as opposed to a bug.

Programs report these as one line and exit 1 (:func:`diffclip.cli.run`); every other exception keeps its traceback,
so an internal failure (a shape mismatch deep in a model, an NCCL error, a mistyped dict key) stays visible.
Each class also derives from the built-in exception a library user would catch (``ValueError``, ``KeyError``,
``RuntimeError``), so ``except ValueError`` around a diffclip call keeps working.
"""

from __future__ import annotations


class DiffclipError(Exception):
    """Base class: an error of the user's input or environment, reported by programs as one line."""


class InputError(DiffclipError, ValueError):
    """A value, file or flag that is not what was expected (the message names it and what was expected)."""


class UnknownNameError(DiffclipError, KeyError):
    """A name (model, dataset, evaluation, pretrained tag) that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


class WeightsMismatchError(DiffclipError, RuntimeError):
    """Weights that do not fit a model: missing/unexpected keys or differing shapes (as ``load_state_dict``'s
    ``RuntimeError``, with every difference named)."""


class RunError(DiffclipError, RuntimeError):
    """A run that cannot go on for a reason the user must act on (a failed job, exhausted data, a diverged loss,
    a device that is not there)."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message (its type name when there is none); for an error re-raised
    from a DataLoader worker, the worker's own last line."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    if msg.startswith("Caught ") and "Original Traceback" in text:  # re-raised from a DataLoader worker
        msg = lines[-1].split(": ", 1)[-1]
    return f"missing key {msg}" if isinstance(e, KeyError) and not isinstance(e, DiffclipError) else msg
