"""``torchrun --nproc_per_node 2 training/main.py`` (gloo, CPU) on real shards: a 2-process run killed with SIGKILL
mid-epoch and continued with ``--resume latest`` logs the same loss sequence as an uninterrupted 2-process run
(each rank's RNG states and data position come back)."""

import json
import sys
from pathlib import Path

import pytest
from train_helpers import _cmd, _losses, _write_sources, run_killed_and_resumed

TORCHRUN = Path(sys.executable).with_name("torchrun")
KILL_AFTER_STEP = 4  # 3 steps per epoch (48 samples / (8 per rank x 2 ranks)): one step into epoch 2 of 4


def _ddp_cmd(shards: Path, zs: Path, logs: Path, name: str, *extra: str) -> list[str]:
    args = _cmd(shards, zs, logs, name, "--epochs", "4", *extra)[1:]  # torchrun starts the interpreters
    args[args.index("--logs")] = "--logs-dir"  # torchrun's own parser would read --logs as its --logs-specs
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_train")
    shards, zs = _write_sources(root)
    logs = root / "logs"
    return run_killed_and_resumed(lambda name, *extra: _ddp_cmd(shards, zs, logs, name, *extra), logs,
                                  KILL_AFTER_STEP, wait=300, timeout=400)


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
