"""training/main.py rejects bad input with a non-zero exit and a one-line message, without a traceback.

Two cases run as real processes; the others call ``training.main.main(argv)`` in this process (the same code
path, minus the interpreter start-up).
"""

import io
import os
import socket
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
    # training checkpoints that read but whose entries are wrong (as a crafted or damaged file)
    good = {"state_dict": {"w": torch.zeros(3)}, "optimizer": {"state": {}, "param_groups": [{"params": [0]}]},
            "step": 4, "epoch": 0, "batches_done": 4, "rng": [{"python": (3, (1, 2), None)}]}
    for name, change in (("bad_rng", {}), ("step_text", {"step": "4"}), ("epoch_range", {"epoch": 10**9}),
                         ("bad_optimizer", {"optimizer": {"state": {}, "param_groups": "all"}})):
        torch.save({**good, **change}, tmp / f"{name}.pt")
    no_count = tmp / "no_count"  # validation shards without sizes.json or __len__
    no_count.mkdir()
    (no_count / "00000.tar").write_bytes((shard_dir / "00000.tar").read_bytes())
    with socket.socket() as s:  # a loopback port with nothing listening: a shard server that is down
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
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
        "pretrained empty": ([*ok_data, *base, "--pretrained", ""], 2, "--pretrained"),
        "device foo": ([*ok_data, *base, "--device", "foo"], 1, "--device 'foo'"),
        "resume malformed rng": ([*ok_data, *base, "--resume", str(tmp / "bad_rng.pt")], 1,
                                 "bad_rng.pt: 'rng' of process 0 is not a generator state"),
        "resume step not an integer": ([*ok_data, *base, "--resume", str(tmp / "step_text.pt")], 1,
                                       "step_text.pt: 'step' is '4', expected an integer"),
        "resume epoch out of range": ([*ok_data, *base, "--resume", str(tmp / "epoch_range.pt")], 1,
                                      "epoch_range.pt: epoch 1000000000 after only 4 steps"),
        "resume bad optimizer": ([*ok_data, *base, "--resume", str(tmp / "bad_optimizer.pt")], 1,
                                 "bad_optimizer.pt: 'optimizer' is not an optimizer state"),
        "val data without count": ([*ok_data, *base, "--val-data", str(no_count)], 1,
                                   "pass --val-num-samples"),
        "shard server down": (["--train-data", down + "/{00000..00001}.tar", "--train-num-samples", "16", *base], 1,
                              f"--train-data: connection refused: {down}/00000.tar"),
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
         "unwritable logs", "pretrained empty", "device foo", "resume malformed rng", "resume step not an integer",
         "resume epoch out of range", "resume bad optimizer", "val data without count",
         "shard server down"]


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


def test_a_run_folder_in_set_up_is_refused_at_once_naming_its_pid(results):
    """Another run holds the folder (still building its model, say): a run with the same --name is refused before
    any work, naming the holder's PID, with or without --resume; the holder's folder is left as it is."""
    from diffclip.training.run_folder import RunLock
    from train_helpers import main_in_process

    cases, _ = results
    logs = Path(cases["run folder exists"][0][cases["run folder exists"][0].index("--logs") + 1])
    train_data = cases["run folder exists"][0][1]
    lock = RunLock(logs / "busy")
    try:
        for extra in ((), ("--resume", "latest")):
            code, err = main_in_process("--train-data", train_data, "--logs", str(logs), "--name", "busy", *extra)
            assert code == 1 and f"is in use by the run of PID {os.getpid()}" in err.strip().splitlines()[-1], err
            assert "parameters" not in err  # refused before the model was built
        assert [p.name for p in (logs / "busy").iterdir()] == [".lock"]
    finally:
        lock.release()


def test_shards_without_images_leave_no_run_folder(results):
    """Shards found unusable only once the run folder was made (no image in any sample): the error names the shard
    and the folder, in which no step was taken, is removed, so the same command after a fix is not refused."""
    from train_helpers import main_in_process

    cases, _ = results
    argv = cases["run folder exists"][0]
    logs = Path(argv[argv.index("--logs") + 1])
    code, err = main_in_process(*argv[:2], "--logs", str(logs), "--name", "no_images", "--batch-size", "4",
                                "--workers", "0", "--precision", "fp32")
    assert code == 1 and "has both an image" in err.strip().splitlines()[-1] and "00000.tar" in err, err[-2000:]
    assert not (logs / "no_images").exists()
