"""Shards and run folders in object storage, against a real S3 server on loopback (moto in server mode), read as the
trainer reads it (s3fs through fsspec, endpoint from ``AWS_ENDPOINT_URL``): training from ``s3://`` shards counted
by the bucket's sizes.json, ``--remote-sync`` copying the run folder, ``--resume auto`` continuing exactly from a
checkpoint that only the bucket holds, and a store that cannot be reached refused in one line before training."""

import json
import os
import shutil
import subprocess

import pytest
from train_helpers import MAIN, MODEL, TORCHRUN, _env, _write_sources, final_weights, free_port, main_in_process

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

SHARDS = "s3://data/shards/{00000..00003}.tar"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A moto S3 server with bucket ``data`` (the shards of train_helpers, their sizes.json) and bucket ``runs``."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL")}
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(env, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    s3fs.S3FileSystem.clear_instance_cache()
    root = tmp_path_factory.mktemp("s3")
    shards, _ = _write_sources(root)
    client = boto3.client("s3")
    client.create_bucket(Bucket="data")
    client.create_bucket(Bucket="runs")
    for p in sorted(shards.glob("*")):
        if p.is_file():
            client.upload_file(str(p), "data", f"shards/{p.name}")
    yield {"client": client, "root": root, "sizes": json.loads((shards / "sizes.json").read_text())}
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _args(logs, *extra):
    return ["--model", MODEL, "--train-data", SHARDS, "--batch-size", "8", "--epochs", "1", "--lr", "1e-3",
            "--warmup", "2", "--precision", "fp32", "--workers", "1", "--seed", "3", "--logs", str(logs), "--name",
            "r", "--log-every-n-steps", "1", "--save-every-n-steps", "2", "--device", "cpu", "--remote-sync",
            "s3://runs/exp", "--remote-sync-frequency", "1", *extra]


def _keys(client, bucket, prefix):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())
            if r["type"] == "train"}


def test_train_from_bucket_sync_and_exact_resume_from_the_bucket_alone(store, tmp_path):
    client, logs = store["client"], tmp_path / "logs"
    code, err = main_in_process(*_args(logs, "--resume", "auto"))
    assert code == 0, err[-3000:]
    steps = sum(store["sizes"].values()) // 8  # the counts of the bucket's sizes.json (no --train-num-samples)
    run = logs / "r"
    full = _losses(run)
    assert sorted(full) == list(range(1, steps + 1))
    keys = _keys(client, "runs", "exp/r/")
    for want in ("exp/r/checkpoints/step_2.pt", "exp/r/checkpoints/epoch_1.pt", "exp/r/results.jsonl",
                 "exp/r/final_model/model.safetensors", "exp/r/params.txt"):
        assert want in keys, keys
    assert "exp/r/.lock" not in keys
    reference = final_weights(run)
    # a new node: no local folder; the bucket holds the run up to step 4 (later checkpoints and the export gone)
    shutil.rmtree(logs)
    for key in keys:
        if key.startswith(("exp/r/final_model/", "exp/r/checkpoints/")) and not key.endswith(("step_2.pt", "step_4.pt")):
            client.delete_object(Bucket="runs", Key=key)
    code, err = main_in_process(*_args(logs, "--resume", "auto"))
    assert code == 0, err[-3000:]
    assert "step_4.pt" in err.split("fetched ", 1)[1].split(" from ", 1)[0], err[-3000:]
    resumed = [r for r in map(json.loads, (run / "results.jsonl").read_text().splitlines()) if r["type"] == "resume"]
    assert [r["step"] for r in resumed] == [4]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt"))[0] == "epoch_1.pt"
    assert _losses(run) == full
    import torch

    got = final_weights(run)
    assert [k for k in reference if not torch.equal(reference[k], got[k])] == []


def test_unreachable_store_is_one_line_before_training(store, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:  # s3fs keeps its clients (with their endpoint) per process: none made here outlives the test
        code, err = main_in_process(*_args(tmp_path / "logs"))
        code2, err2 = main_in_process(*_args(tmp_path / "logs")[:-4])  # no --remote-sync
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    last = err.strip().splitlines()[-1]
    assert code == 1 and "--remote-sync: cannot reach s3://runs/exp" in last, err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "logs" / "r" / "results.jsonl").exists()
    last = err2.strip().splitlines()[-1]
    assert code2 == 1 and "--train-data: cannot reach s3://data/shards/00000.tar" in last, err2[-2000:]


def test_remote_sync_copies_in_the_background_before_close(store, tmp_path):
    import time

    from diffclip.training.remote import RemoteSync

    client, run = store["client"], tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".lock").write_text("1")
    (run / "checkpoints" / "step_1.pt").write_bytes(b"one")
    sync = RemoteSync(run, "s3://runs/bg/run", frequency=1)
    deadline = time.time() + 30
    while "bg/run/checkpoints/step_1.pt" not in _keys(client, "runs", "bg/") and time.time() < deadline:
        time.sleep(0.1)
    assert _keys(client, "runs", "bg/") == ["bg/run/checkpoints/step_1.pt"]  # by the thread; the lock stays here
    (run / "results.jsonl").write_text("{}\n")
    sync.close()  # the last copy
    assert _keys(client, "runs", "bg/") == ["bg/run/checkpoints/step_1.pt", "bg/run/results.jsonl"]


def test_each_node_fetches_the_checkpoint_into_its_own_run_folder(store, tmp_path):
    """Two nodes without a shared disk (two ``torchrun --nnodes 2`` launchers, each with its own ``--logs-dir``):
    with ``--resume auto`` each node's local rank 0 fetches the bucket's checkpoint before any rank looks for one."""
    remote = ("--remote-sync", "s3://runs/nodes", "--save-every-n-steps", "0")
    code, err = main_in_process(*_args(tmp_path / "first", *remote))  # one process, epoch 1 into the bucket
    assert code == 0, err[-3000:]
    steps = sum(store["sizes"].values()) // 8
    port = free_port()

    def node(rank, epochs=2):
        argv = _args(tmp_path / f"node{rank}", *remote, "--epochs", str(epochs), "--resume", "auto")
        argv[argv.index("--logs")] = "--logs-dir"  # torchrun's parser takes --logs for its --logs-specs
        return subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(rank),
                                 "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                                 "diffclip-remote", str(MAIN), *argv], env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    launchers = [node(0), node(1)]
    errs = [p.communicate(timeout=400)[1] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], [e[-2000:] for e in errs]
    for rank in (0, 1):  # each node's own copy, fetched from the bucket
        assert (tmp_path / f"node{rank}" / "r" / "checkpoints" / "epoch_1.pt").is_file()
    records = [json.loads(line) for line in (tmp_path / "node0" / "r" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "resume"] == [steps]
    assert max(r["step"] for r in records if r["type"] == "train") > steps  # epoch 2 trained by both ranks

    # a requeue onto the same two nodes: node 0 kept epoch 2 (rank 0 writes), node 1 only the epoch 1 it fetched
    # (a stale run folder): every rank stops with one line naming what each found, before any training
    assert not (tmp_path / "node1" / "r" / "checkpoints" / "epoch_2.pt").exists()
    port = free_port()
    launchers = [node(0, epochs=3), node(1, epochs=3)]
    errs = [p.communicate(timeout=400)[1] for p in launchers]
    assert all(p.returncode != 0 for p in launchers)
    line = "the ranks found different newest checkpoints"
    assert any(line in e and "rank 0: epoch_2.pt" in e and "rank 1: epoch_1.pt" in e for e in errs), errs[0][-2000:]
    records = [json.loads(x) for x in (tmp_path / "node0" / "r" / "results.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["type"] == "train") <= 2 * steps  # nothing of epoch 3 trained
