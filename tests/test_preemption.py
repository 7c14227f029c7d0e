"""Preemption of a real 2-process ``torchrun`` run on real shards: SIGTERM to the launcher mid-epoch (and more signals
to the ranks while they stop), a checkpoint of the step every rank finished, ``scontrol requeue`` under SLURM
(a stand-in ``scontrol`` first on PATH records its argv), and the identical command (``--resume auto``) continues to
the same losses and final weights as an uninterrupted run, bit for bit."""

import json
import os
import signal
import subprocess
import time

import pytest
from train_helpers import TORCHRUN, _env, _losses, _process_tree, assert_same_run, ddp_args, ddp_reference

from diffclip.hub import torch_load


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    ref = ddp_reference(tmp_path_factory)
    root = tmp_path_factory.mktemp("preempt")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    env = {**_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SCONTROL_LOG": str(root / "scontrol.log")}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
           *ddp_args(ref["shards"], ref["zs"], ref["logs"], "preempted", "--resume", "auto", "--requeue-on-preempt")]
    run_dir = ref["logs"] / "preempted"
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and max(
            _losses(run_dir) if (run_dir / "results.jsonl").exists() else {0: 0}) < 4:
        time.sleep(0.02)
    assert first.poll() is None, "the run ended before the signal"
    ranks = _process_tree(first.pid)[1:]
    first.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
    time.sleep(0.05)
    for pid in ranks:  # more signals while the ranks finish the step and save: only recorded
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    _, first_err = first.communicate(timeout=120)
    before = _losses(run_dir)
    records = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"ref": ref["run"], "run": run_dir, "before": before, "records": records, "root": root,
            "first_err": first_err}


def test_a_signal_stops_every_rank_after_one_step_with_its_checkpoint(preempted):
    stops = [r for r in preempted["records"] if r["type"] == "preempted"]
    assert len(stops) == 1 and stops[0]["signal"] == "SIGTERM", preempted["first_err"][-3000:]
    step = stops[0]["step"]
    assert 4 <= step < 9 and max(preempted["before"]) == step
    ckpt = torch_load(preempted["run"] / "checkpoints" / f"step_{step}.pt")
    assert ckpt["step"] == step and ckpt["batches_done"] == (step % 3) * 1 and len(ckpt["rng"]) == 2
    assert not [p for p in (preempted["run"] / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial file
    log = (preempted["run"] / "out.log").read_text()
    assert f"preempted (SIGTERM): stopped after step {step}" in log and "exit status 75" in log
    assert (preempted["root"] / "scontrol.log").read_text() == "requeue 4242\n"


def test_the_same_command_continues_to_the_uninterrupted_losses_and_weights(preempted):
    records = [json.loads(x) for x in (preempted["run"] / "results.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["type"] == "resume"]
    step = max(preempted["before"])
    assert len(resume) == 1 and resume[0]["checkpoint"].endswith(f"step_{step}.pt")
    assert_same_run(preempted["run"], preempted["ref"])
