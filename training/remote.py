"""Run folders and shards in object storage (``s3://``, ``gs://``... through fsspec and its backend, e.g. s3fs).

- :func:`register_gopen_schemes`: webdataset reads ``s3://`` shards (``--train-data s3://bucket/cc3m/{00000..00331}.tar``)
  through fsspec; webdataset itself reads ``http(s)://``, ``pipe:`` and ``gs://`` (gsutil).
- :class:`RemoteSync`: open_clip's ``--remote-sync``: a background thread copies the run folder to
  ``<remote>/<run name>`` every ``frequency`` seconds and once more at the end (files new or changed since the last
  copy; nothing remote is deleted), never holding up a training step.
- :func:`fetch_latest`: ``--resume auto`` on a node without the run folder: the remote run's newest checkpoint and
  its records come back into the local folder.

The endpoint and credentials are the store's own: for S3 the AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for MinIO/Ceph or another S3-compatible server) or ``~/.aws``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from diffclip.errors import InputError, RunError

__all__ = ["register_gopen_schemes", "check_remote", "RemoteSync", "fetch_latest", "sync_folder"]

log = logging.getLogger("diffclip.training")
SCHEMES = ("s3", "s3a")  # read by webdataset through fsspec (webdataset has its own gs://, http(s)://, pipe:)
_SKIP = (".lock",)  # the run lock is this node's, never copied


def _fs(url: str):
    """``(filesystem, path)`` of an fsspec URL.

    Raises:
        diffclip.errors.InputError: fsspec or the scheme's backend (s3fs, gcsfs...) is not installed."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise InputError(f"{url} needs fsspec and its backend for this scheme (pip install 'diffclip[remote]'): "
                         f"{e}") from None


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    import fsspec

    return fsspec.open(url, mode).open()


def register_gopen_schemes() -> None:
    """Lets webdataset's ``gopen`` (and so ``wds.tarfile_to_samples``) open ``s3://`` URLs through fsspec."""
    from webdataset.gopen import gopen_schemes

    for scheme in SCHEMES:
        gopen_schemes.setdefault(scheme, _gopen_fsspec)


def check_remote(url: str, flag: str) -> None:
    """The store of ``url`` answers and the bucket exists: one line now rather than a stack trace mid-run.

    Raises:
        diffclip.errors.InputError: naming ``flag`` and ``url``: backend missing, store unreachable, no such bucket,
        access denied."""
    fs, path = _fs(url)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise InputError(f"{flag}: bucket not found: {url}") from None
    except PermissionError as e:
        raise InputError(f"{flag}: access denied to {url}: {e}") from None
    except Exception as e:  # botocore's EndpointConnectionError, aiohttp's errors...: the store cannot be reached
        message = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{flag}: cannot reach {url}: {message}") from None


def sync_folder(local: Path, remote: str, done: dict | None = None) -> int:
    """Copies the files of ``local`` that are new or changed (size, mtime) since ``done`` (updated in place) to
    ``remote`` (same relative paths; files being written under a temporary name are copied once renamed), oldest
    first: the remote's modification times keep the order in which the checkpoints were written (see
    :func:`fetch_latest`). Returns the number of files copied."""
    fs, root = _fs(remote)
    done = {} if done is None else done
    copied = 0
    found = []
    for p in Path(local).rglob("*"):
        if not p.is_file() or p.name in _SKIP or ".tmp" in p.name:
            continue
        try:
            found.append((p.stat(), p))
        except FileNotFoundError:  # deleted meanwhile (--delete-previous-checkpoint)
            continue
    for st, p in sorted(found, key=lambda f: (f[0].st_mtime_ns, str(f[1]))):
        rel = p.relative_to(local).as_posix()
        key = (st.st_size, st.st_mtime_ns)
        if done.get(rel) == key:
            continue
        try:
            fs.put_file(str(p), f"{root.rstrip('/')}/{rel}")
        except FileNotFoundError:
            continue
        done[rel] = key
        copied += 1
    return copied


class RemoteSync:
    """open_clip's ``--remote-sync``: :func:`sync_folder` of ``run_dir`` to ``remote`` in a daemon thread every
    ``frequency`` seconds; :meth:`close` makes the last copy (and waits for it). A failed copy is logged and tried
    again at the next period; only :meth:`close` raises it."""

    def __init__(self, run_dir: Path, remote: str, frequency: float = 300):
        self.run_dir, self.remote, self.frequency = Path(run_dir), remote, frequency
        self._done: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="remote-sync", daemon=True)
        self._thread.start()

    def _sync(self) -> int:
        with self._lock:
            n = sync_folder(self.run_dir, self.remote, self._done)
        log.info("--remote-sync: %d file(s) copied to %s", n, self.remote)
        return n

    def _loop(self) -> None:
        while not self._stop.wait(self.frequency):
            try:
                self._sync()
            except Exception as e:  # the store may be back at the next period
                log.warning("--remote-sync to %s failed: %s", self.remote, " ".join(str(e).split()))

    def close(self) -> None:
        """Stops the thread and copies what changed since its last copy.

        Raises:
            diffclip.errors.RunError: that copy failed."""
        self._stop.set()
        self._thread.join()
        try:
            self._sync()
        except Exception as e:
            raise RunError(f"--remote-sync: the last copy to {self.remote} failed: {' '.join(str(e).split())}") from None


def fetch_latest(remote: str, run_dir: Path) -> Path | None:
    """``--resume auto`` on a node without the run folder: copies the remote run folder ``remote`` (what
    :class:`RemoteSync` wrote) into ``run_dir``: its newest checkpoint (the last copied, with any copied within the
    second before it, the store's time resolution; the trainer then takes the newest by step) and the other files
    (``results.jsonl``, ``params.txt``, the wandb id), not TensorBoard events or older checkpoints. Returns the
    last checkpoint fetched, None when the remote holds none.

    Raises:
        the store's own errors (:func:`check_remote` first turns an unreachable store into one line)."""
    fs, root = _fs(remote)
    root = root.rstrip("/")
    try:
        files = [f for f in fs.find(root) if not f.endswith("/")]
    except FileNotFoundError:
        return None
    ckpts = [f for f in files if f.startswith(f"{root}/checkpoints/") and f.endswith(".pt")]
    others = [f for f in files if not f.startswith((f"{root}/checkpoints/", f"{root}/tensorboard/"))]

    def mtime(f: str) -> float:
        info = fs.info(f)
        t = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
        return t.timestamp() if hasattr(t, "timestamp") else float(t)

    times = {f: mtime(f) for f in ckpts}
    last = max(times.values(), default=0)
    newest = sorted((f for f in ckpts if times[f] >= last - 1), key=times.get)  # S3 times are whole seconds
    for f in others + newest:
        target = Path(run_dir) / f[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.fetch-{os.getpid()}")
        fs.get_file(f, str(tmp))
        os.replace(tmp, target)
    if not newest:
        return None
    got = Path(run_dir) / newest[-1][len(root) + 1:]
    log.info("--resume auto: fetched %s from %s (%d other files)", ", ".join(f.rsplit("/", 1)[1] for f in newest),
             remote, len(others))
    return got

