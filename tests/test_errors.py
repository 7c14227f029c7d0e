"""diffclip.cli.run: bad input is one line and status 1; an internal bug keeps its traceback (issue 16, item 5)."""

import subprocess
import sys
import textwrap

import pytest

import diffclip
from diffclip.errors import DiffclipError, InputError, RunError, UnknownNameError, WeightsMismatchError


def _run(body: str) -> subprocess.CompletedProcess:
    """Runs ``body`` as the ``main`` of a real program under ``diffclip.cli.run``."""
    code = "from diffclip.cli import run\n" + textwrap.dedent(body) + "\nrun(main)\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_user_errors_are_one_line():
    r = _run("import diffclip\ndef main(argv):\n    diffclip.create_model('No-Such-Model')\n")
    named = "No-Such-Model"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and "error:" in lines[0] and named in lines[0], r.stderr


@pytest.mark.parametrize("body, kind", [
    # a mistyped dict key deep in the code
    ("def main(argv):\n    cfg = {'width': 64}\n    return cfg['widht']\n", "KeyError: 'widht'"),
    # a shape mismatch inside a real model: a 1-channel batch into a 3-channel patch embedding
    ("import torch, diffclip\ndef main(argv):\n    m = diffclip.create_model('DiffCLIP-Tiny-64')\n"
     "    m.encode_image(torch.zeros(1, 1, 64, 64))\n", "RuntimeError"),
])
def test_internal_bugs_keep_their_traceback(body, kind):
    r = _run(body)
    assert r.returncode == 1, r.stderr
    assert "Traceback (most recent call last)" in r.stderr, r.stderr
    assert kind in r.stderr.splitlines()[-1], r.stderr  # the exception itself, not a one-line summary


def test_the_family_is_what_library_users_catch():
    assert issubclass(InputError, ValueError) and issubclass(UnknownNameError, KeyError)
    assert issubclass(WeightsMismatchError, RuntimeError) and issubclass(RunError, RuntimeError)
    for cls in (InputError, UnknownNameError, WeightsMismatchError, RunError):
        assert issubclass(cls, DiffclipError)
    with pytest.raises(ValueError):  # a library caller's `except ValueError` keeps working
        diffclip.create_model("No-Such-Model")
