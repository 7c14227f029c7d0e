"""``torchrun --nproc_per_node 2 training/main.py`` (gloo, CPU) on real shards: a 2-process run killed with SIGKILL
mid-epoch and continued with ``--resume latest`` logs the same loss sequence as an uninterrupted 2-process run
(each rank's RNG states and data position come back)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_resume import _cmd, _env, _losses, _write_sources

TORCHRUN = Path(sys.executable).with_name("torchrun")
KILL_AFTER_STEP = 4  # 3 steps per epoch (48 samples / (8 per rank x 2 ranks)): one step into epoch 2 of 4


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc): torchrun starts each rank in a session of its own, so killing
    torchrun's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def _ddp_cmd(shards: Path, zs: Path, logs: Path, name: str, *extra: str) -> list[str]:
    args = _cmd(shards, zs, logs, name, "--epochs", "4", *extra)[1:]  # torchrun starts the interpreters
    args[args.index("--logs")] = "--logs-dir"  # torchrun's own parser would read --logs as its --logs-specs
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_train")
    shards, zs = _write_sources(root)
    logs = root / "logs"
    full = subprocess.Popen(_ddp_cmd(shards, zs, logs, "full"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(_ddp_cmd(shards, zs, logs, "killed"), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    target = logs / "killed" / "checkpoints" / f"step_{KILL_AFTER_STEP}.pt"
    deadline = time.time() + 300
    while not target.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    alive = killed.poll() is None
    for pid in _process_tree(killed.pid):  # torchrun and both ranks, at once
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    assert alive, "the run ended before it could be killed"
    assert target.exists(), "no mid-epoch checkpoint was written"
    before_kill = _losses(logs / "killed")
    _, err = full.communicate(timeout=400)
    assert full.returncode == 0, err[-3000:]
    resumed = subprocess.run(_ddp_cmd(shards, zs, logs, "killed", "--resume", "latest"), env=_env(),
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"full": logs / "full", "killed": logs / "killed", "before_kill": before_kill}


def test_killed_and_resumed_ddp_run_has_the_same_losses(ddp_runs):
    full, resumed = _losses(ddp_runs["full"]), _losses(ddp_runs["killed"])
    assert sorted(full) == list(range(1, 13))  # 4 epochs x 3 global batches of 16
    assert sorted(resumed) == sorted(full)
    assert KILL_AFTER_STEP <= max(ddp_runs["before_kill"]) < 12
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), (step, resumed[step], full[step])
    records = [json.loads(x) for x in (ddp_runs["killed"] / "results.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["type"] == "resume"]
    assert len(resume) == 1 and resume[0]["checkpoint"].endswith("step_4.pt") and resume[0]["batches_done"] == 1
    log = (ddp_runs["full"] / "out.log").read_text()
    assert "2 process(es) on cpu" in log, log[:2000]
