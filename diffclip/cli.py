"""What every diffclip program shares on the command line: the one way to report bad input and exit, argument
types that name what they expect, and logging that does not break progress bars.

Convention: a program raises :class:`UsageError` (or another of :data:`USER_ERRORS`) for bad input, with a one-line
message naming the input and what was expected; :func:`run` prints ``prog: error: message`` on stderr and exits
with status 1 (argument-parsing errors: status 2, as argparse). ``DIFFCLIP_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import DiffclipError, one_line

__all__ = ["UsageError", "USER_ERRORS", "one_line", "ArgumentParser", "run", "positive_int", "nonneg_int",
           "positive_float", "nonneg_float", "unit_interval", "setup_logging"]


class UsageError(DiffclipError):
    """Bad input found by a program (a flag, a combination of flags): reported as one line, exit status 1."""


#: errors that end a program with one line instead of a traceback: diffclip's error family (bad input and
#: conditions the user must act on), the operating system's (a missing file, a full disk, a refused connection)
#: and a refused unpickling. Anything else is a bug and keeps its traceback.
USER_ERRORS = (DiffclipError, OSError, pickle.UnpicklingError)


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (``prog: error: ...``) and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs ``main(argv)`` and exits with its status; user errors become one line on stderr and status 1,
    Ctrl-C status 130."""
    prog = Path(sys.argv[0]).name or "diffclip"
    try:
        code = main(argv) or 0
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        code = 130
    except USER_ERRORS as e:
        if os.environ.get("DIFFCLIP_DEBUG"):
            raise
        sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
        code = 1
    sys.exit(code)


# ---- argparse types: each names what it expects ----

def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(kind, ok: Callable[[float], bool], expected: str, name: str, doc: str = ""):
    """An argparse ``type``: ``text`` as ``kind`` (int or a finite float) for which ``ok`` holds."""
    def parse(text: str):
        value = _number(text, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = doc or f"argparse type: {expected}."
    return parse


positive_int = _bounded(int, lambda v: v >= 1, "an integer >= 1", "positive_int")
nonneg_int = _bounded(int, lambda v: v >= 0, "an integer >= 0", "nonneg_int")
positive_float = _bounded(float, lambda v: v > 0, "a number > 0", "positive_float")
nonneg_float = _bounded(float, lambda v: v >= 0, "a number >= 0", "nonneg_float")
unit_interval = _bounded(float, lambda v: 0 <= v < 1, "a number in [0, 1)", "unit_interval",
                         "A number in [0, 1) (Adam's betas, dropout rates).")


# ---- logging ----

class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints through ``tqdm.write`` so log lines do not break a progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(level: int = logging.INFO, log_file: str | os.PathLike | None = None, rank: int | None = None,
                  console: bool = True) -> None:
    """Configures the root logger once for a program: a console handler on stderr (tqdm-safe; only warnings when
    ``console`` is False, e.g. on non-master ranks) and, if given, a file handler on ``log_file``. Calling it
    again replaces the handlers (e.g. to add the run folder's log file once it exists)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    where = f" rank{rank}" if rank is not None else ""
    fmt = logging.Formatter(f"%(asctime)s{where} %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handler = _TqdmHandler()
    handler.setFormatter(fmt)
    handler.setLevel(level if console else logging.WARNING)
    root.addHandler(handler)
    if log_file is not None:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(level)
