"""training/main.py rejects bad input with a non-zero exit and a one-line message, without a traceback.

Two cases run as real processes; the others call ``training.main.main(argv)`` in this process (the same code
path, minus the interpreter start-up).
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

MAIN = Path(__file__).resolve().parents[1] / "training" / "main.py"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _cases(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    import tarfile

    import torch

    shard_dir = tmp / "shards"
    shard_dir.mkdir()
    with tarfile.open(shard_dir / "00000.tar", "w") as tar:  # a real (small) tar shard
        info = tarfile.TarInfo("000.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    (shard_dir / "sizes.json").write_text('{"00000.tar": 100}')
    empty = tmp / "empty"
    empty.mkdir()
    existing = tmp / "logs" / "taken"
    existing.mkdir(parents=True)
    (tmp / "garbage.pt").write_bytes(os.urandom(256))
    (tmp / "empty.pt").write_bytes(b"")
    torch.save({"state_dict": {"w": torch.zeros(3)}, "optimizer": {}, "step": 1}, tmp / "full.pt")
    (tmp / "truncated.pt").write_bytes((tmp / "full.pt").read_bytes()[:100])
    torch.save({"w": torch.zeros(3)}, tmp / "weights_only.pt")
    torch.save({"state_dict": {}, "optimizer": {}, "step": 1, "x": _RunsCode()}, tmp / "evil.pt")
    (tmp / "captions.txt").write_text("a text file, not shards\n")
    bad_sizes = tmp / "bad_sizes"
    bad_sizes.mkdir()
    (bad_sizes / "00000.tar").write_bytes((shard_dir / "00000.tar").read_bytes())
    (bad_sizes / "sizes.json").write_text('{"00000.tar": \n')
    base = ["--logs", str(tmp / "logs")]
    ok_data = ["--train-data", str(shard_dir / "00000.tar")]
    return {
        "unknown flag": ([*ok_data, "--bogus-flag"], 2, "unrecognized arguments: --bogus-flag"),
        "bad value": ([*ok_data, "--batch-size", "0"], 2, "--batch-size"),
        "bad precision": ([*ok_data, "--precision", "fp8"], 2, "--precision"),
        "lr nan": ([*ok_data, "--lr", "nan"], 2, "--lr"),
        "beta1 2": ([*ok_data, "--beta1", "2"], 2, "--beta1"),
        "eps -1": ([*ok_data, "--eps", "-1"], 2, "--eps"),
        "no train data": ([*base], 2, "--train-data is required"),
        "unknown model": ([*ok_data, *base, "--model", "DiffCLIP-Nope"], 1, "unknown model 'DiffCLIP-Nope'"),
        "missing shards": (["--train-data", str(tmp / "nowhere" / "{00000..00003}.tar"), *base], 1, "not found"),
        "folder without shards": (["--train-data", str(empty), *base], 1, "no .tar shards"),
        "text file as train data": (["--train-data", str(tmp / "captions.txt"), *base], 1, "captions.txt"),
        "malformed sizes.json": (["--train-data", str(bad_sizes), *base], 1, "sizes.json:2"),
        "missing resume file": ([*ok_data, *base, "--resume", str(tmp / "nope.pt")], 1, "checkpoint not found"),
        "resume garbage": ([*ok_data, *base, "--resume", str(tmp / "garbage.pt")], 1, "garbage.pt"),
        "resume empty": ([*ok_data, *base, "--resume", str(tmp / "empty.pt")], 1, "empty file"),
        "resume truncated": ([*ok_data, *base, "--resume", str(tmp / "truncated.pt")], 1, "truncated.pt"),
        "resume weights only": ([*ok_data, *base, "--resume", str(tmp / "weights_only.pt")], 1,
                                "not a training checkpoint"),
        "resume malicious": ([*ok_data, *base, "--resume", str(tmp / "evil.pt")], 1, "refusing to unpickle"),
        "resume latest without name": ([*ok_data, *base, "--resume", "latest"], 1, "--resume latest needs --name"),
        "missing pretrained": ([*ok_data, *base, "--pretrained", str(tmp / "w")], 1, "pretrained weights not found"),
        "pretrained garbage": ([*ok_data, *base, "--pretrained", str(tmp / "garbage.pt")], 1, "garbage.pt"),
        "pretrained malicious": ([*ok_data, *base, "--pretrained", str(tmp / "evil.pt")], 1, "refusing to unpickle"),
        "run folder exists": ([*ok_data, *base, "--name", "taken"], 1, "--resume latest"),
        "device cuda": ([*ok_data, *base, "--device", "cuda"], 1, "CUDA"),
        "unwritable logs": ([*ok_data, "--logs", "/proc/nowhere"], 1, "--logs"),
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


def _in_process(argv, capsys, monkeypatch):
    from diffclip.training.main import main

    from diffclip.cli import run

    monkeypatch.setattr(sys, "argv", [str(MAIN)])
    try:
        run(main, argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CASES = ["unknown flag", "bad value", "bad precision", "lr nan", "beta1 2", "eps -1", "no train data", "unknown model",
         "missing shards", "folder without shards", "text file as train data", "malformed sizes.json",
         "missing resume file", "resume garbage", "resume empty", "resume truncated", "resume weights only", "resume malicious", "resume latest without name",
         "missing pretrained", "pretrained garbage", "pretrained malicious", "run folder exists", "device cuda",
         "unwritable logs"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_with_one_line(results, case, capsys, monkeypatch):
    cases, out = results
    argv, expected_code, expected_text = cases[case]
    logs = Path(argv[argv.index("--logs") + 1]) if "--logs" in argv else None
    before = sorted(logs.iterdir()) if logs is not None and logs.is_dir() else None
    code, stdout, stderr = out[case] if case in out else _in_process(argv, capsys, monkeypatch)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == expected_code, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("main.py: error: ") and expected_text in lines[0], lines[0]
    assert "Traceback" not in stderr and stdout == ""
    if before is not None:  # no run folder left behind
        assert sorted(logs.iterdir()) == before
