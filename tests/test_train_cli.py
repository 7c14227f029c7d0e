"""training/main.py rejects bad input with a non-zero exit and a one-line message, without a traceback.

Two cases run as real processes; the others call ``training.main.main(argv)`` in this process (the same code
path, minus the interpreter start-up).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

MAIN = Path(__file__).resolve().parents[1] / "training" / "main.py"


def _cases(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    shard_dir = tmp / "shards"
    shard_dir.mkdir()
    (shard_dir / "00000.tar").write_bytes(b"")
    (shard_dir / "sizes.json").write_text('{"00000.tar": 100}')
    empty = tmp / "empty"
    empty.mkdir()
    existing = tmp / "logs" / "taken"
    existing.mkdir(parents=True)
    base = ["--logs", str(tmp / "logs")]
    ok_data = ["--train-data", str(shard_dir / "00000.tar")]
    return {
        "unknown flag": ([*ok_data, "--bogus-flag"], 2, "unrecognized arguments: --bogus-flag"),
        "bad value": ([*ok_data, "--batch-size", "0"], 2, "--batch-size"),
        "bad precision": ([*ok_data, "--precision", "fp8"], 2, "--precision"),
        "no train data": ([*base], 2, "--train-data is required"),
        "unknown model": ([*ok_data, *base, "--model", "DiffCLIP-Nope"], 1, "unknown model 'DiffCLIP-Nope'"),
        "missing shards": (["--train-data", str(tmp / "nowhere" / "{00000..00003}.tar"), *base], 1, "not found"),
        "folder without shards": (["--train-data", str(empty), *base], 1, "no .tar shards"),
        "missing resume file": ([*ok_data, *base, "--resume", str(tmp / "nope.pt")], 1, "checkpoint not found"),
        "resume latest without name": ([*ok_data, *base, "--resume", "latest"], 1, "--resume latest needs --name"),
        "missing pretrained": ([*ok_data, *base, "--pretrained", str(tmp / "w")], 1, "pretrained weights not found"),
        "run folder exists": ([*ok_data, *base, "--name", "taken"], 1, "--resume latest"),
    }


SUBPROCESS_CASES = ("unknown flag", "missing shards")  # the rest run main() in this process (same code path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cases = _cases(tmp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, str(MAIN), *cases[name][0]], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env) for name in SUBPROCESS_CASES}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[name] = (p.returncode, stdout, stderr)
    return cases, out


def _in_process(argv, capsys):
    from diffclip.training.main import main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", ["unknown flag", "bad value", "bad precision", "no train data", "unknown model",
                                  "missing shards", "folder without shards", "missing resume file",
                                  "resume latest without name", "missing pretrained", "run folder exists"])
def test_bad_input_exits_with_one_line(results, case, capsys):
    cases, out = results
    argv, expected_code, expected_text = cases[case]
    code, stdout, stderr = out[case] if case in out else _in_process(argv, capsys)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == expected_code, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("main.py: error: ") and expected_text in lines[0], lines[0]
    assert "Traceback" not in stderr and stdout == ""
