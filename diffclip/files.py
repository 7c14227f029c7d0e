"""Writing files so that an interrupted program never leaves half a file: the one atomic writer of diffclip.

Every output is written to a temporary name in the destination folder and renamed over the destination
(``os.replace``, atomic on POSIX), with the mode any other new file would get (0644 under the usual umask).
The temporary of ``NAME`` is ``.NAME.XXXXXXXX.tmp`` (:func:`stale_temporaries` finds those a killed process left).
A full disk (or quota) is one ``OSError`` (errno ENOSPC) naming the file, with the temporary removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from diffclip.errors import InputError


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def full_disk_error(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """``OSError(ENOSPC, "PATH: no space left on device")`` when ``exc`` comes from a full disk or quota (ENOSPC,
    EDQUOT): itself, an error it was raised from or while handling (torch's ``inline_container.cc ... unexpected
    pos`` RuntimeError), or a wrapper that kept only the system's text (safetensors' ``SafetensorError``); None
    otherwise. For writers that keep their own temporaries; :func:`atomic_write` does this itself."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if code not in (errno.ENOSPC, errno.EDQUOT):
            text = str(exc)
            code = next((c for c in (errno.ENOSPC, errno.EDQUOT) if os.strerror(c) in text), None)
        if code is not None:
            quota = " (disk quota exceeded)" if code == errno.EDQUOT else ""
            return OSError(errno.ENOSPC, f"{path}: no space left on device{quota}")
        exc = exc.__cause__ or exc.__context__
    return None


_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp's 8 random characters


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporaries of :func:`atomic_write` in ``folder`` (``.NAME.XXXXXXXX.tmp``), sorted: left by a process
    killed during a write when no write is running now. Other files are never listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMPORARY.fullmatch(p.name) and p.is_file())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` (``mode`` ``"w"`` text or ``"wb"`` binary; named
    ``.NAME.XXXXXXXX.tmp``); on a clean exit of the ``with`` block it is flushed, fsynced and renamed over
    ``path``; on an exception it is removed and ``path`` is untouched. Parent folders are created.

    Raises:
        OSError: the folder cannot be written; a full disk or quota (ENOSPC/EDQUOT, also behind another error
            such as torch's serializer's RuntimeError) is an OSError with errno ENOSPC and the one-line message
            ``PATH: no space left on device``.
    """
    if mode not in ("w", "wb"):
        raise InputError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, _umask_mode())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        full = full_disk_error(e, path)
        if full is None:
            raise
        raise full from None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Writes ``obj`` as JSON (indented, with a final newline) to ``path`` atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def text_lines(path: str | os.PathLike, newline: str | None = None) -> Iterator[str]:
    """The lines of a UTF-8 text file (for ``csv.reader`` too, with ``newline=""``). A byte that is not UTF-8
    raises :class:`InputError` naming the file (a binary file given as a caption or class-name file), not a bare
    ``UnicodeDecodeError``."""
    try:
        with open(path, encoding="utf-8", newline=newline) as f:
            yield from f
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a UTF-8 text file (byte {e.object[e.start]:#04x}: {e.reason})") from None


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON Lines file; :class:`InputError` naming the file
    and line for a line that is not JSON (and, through :func:`text_lines`, for a file that is not UTF-8)."""
    for lineno, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Checks, before any work, that the file ``path`` can be written later: not a folder, and its nearest
    existing parent folder writable. Returns the path; raises ValueError naming ``what`` (e.g. ``--output``)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path}: is a folder; expected a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:  # a real probe: permission bits say nothing for root, or on read-only and virtual file systems
        if not parent.is_dir():
            raise NotADirectoryError(parent)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        raise InputError(f"{what} {path}: folder {parent} is not writable") from None
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Saves a matplotlib figure as PNG to ``path`` atomically (tight bounding box)."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
