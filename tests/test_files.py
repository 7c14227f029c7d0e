"""diffclip.files, the one atomic writer, on a really full disk: a 64 KiB tmpfs mounted in a private mount
namespace (``unshare -rm``, which needs no root where user namespaces are allowed; the tests skip elsewhere)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from diffclip.files import atomic_write, stale_temporaries, write_text

ROOT = Path(__file__).resolve().parents[1]
NO_MOUNT = 77


def _on_full_disk(tmp_path: Path, command: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs ``command`` with ``tmp_path/disk`` a fresh 64 KiB tmpfs (gone when the command ends); returns its
    result and the files it left on that disk."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to mount a small file system")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f'mount -t tmpfs -o size=64k tmpfs "{disk}" 2>/dev/null || exit {NO_MOUNT}; "$@"; rc=$?; '
              f'find "{disk}" -type f -printf "left: %P\\n"; exit $rc')
    r = subprocess.run([unshare, "-rm", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    if r.returncode == NO_MOUNT or "unshare failed" in r.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    return r, [ln[6:] for ln in r.stdout.splitlines() if ln.startswith("left: ")]


def test_full_disk_is_one_error_naming_the_file_and_leaves_no_temporary(tmp_path):
    script = textwrap.dedent("""
        import errno, json, os, sys
        import torch
        from diffclip import create_model
        from diffclip.files import save_torch, write_json, write_text
        disk = sys.argv[1]
        out = {}
        for name, write in [("ck.pt", lambda p: save_torch(p, {"w": torch.zeros(100_000)})),
                            ("r.json", lambda p: write_json(p, list(range(100_000)))),
                            ("t.txt", lambda p: write_text(p, "x" * 200_000)),
                            ("final_model", lambda p: create_model("DiffCLIP-Tiny-64").save_pretrained(p))]:
            try:
                write(os.path.join(disk, name))
                out[name] = None
            except Exception as e:
                out[name] = [type(e).__name__, getattr(e, "errno", None), str(e)]
        print(json.dumps(out))
    """)
    r, left = _on_full_disk(tmp_path, [sys.executable, "-c", script, str(tmp_path / "disk")])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[0])
    assert left == []
    for name, (kind, code, message) in out.items():
        assert kind == "OSError" and code == 28, (name, kind, message)  # not torch's RuntimeError, safetensors' error
        assert str(tmp_path / "disk" / name) in message and "no space left on device" in message, message
        assert "\n" not in message and "inline_container" not in message


def test_make_shards_on_a_full_disk_names_the_shard(tmp_path):
    rows = ["filepath,caption"]
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"]):
        Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / f"{i}.png")  # ~200-500 KB each
        rows.append(f"{i}.png,a photo of {name}")
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "disk" / "shards"
    r, left = _on_full_disk(tmp_path, [sys.executable, "-m", "diffclip.training.make_shards", "--source", "csv",
                                 "--input", str(tmp_path / "caps.csv"), "--output", str(out), "--format", "png",
                                 "--no-progress"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and f"{out / '00000.tar'}: no space left on device" in lines[0], r.stderr
    assert left == []  # no temporary shard


def test_temporaries_have_a_recognisable_name(tmp_path):
    (tmp_path / ".hidden").write_text("not ours")
    (tmp_path / "notes.tmp").write_text("not ours")
    write_text(tmp_path / "done.txt", "kept")
    with atomic_write(tmp_path / "epoch_3.pt", "wb") as f:
        f.write(b"half")
        (temporary,) = stale_temporaries(tmp_path)  # the only one: other dot files and .tmp files are not
        assert temporary.name.startswith(".epoch_3.pt.") and temporary.name.endswith(".tmp")
    assert stale_temporaries(tmp_path) == []
    assert (tmp_path / "epoch_3.pt").read_bytes() == b"half"
    assert sorted(os.listdir(tmp_path)) == [".hidden", "done.txt", "epoch_3.pt", "notes.tmp"]
