"""``--report-to wandb,tensorboard`` with ``WANDB_MODE=offline``: the offline run folder holds open_clip's metric
names (the TensorBoard tags) and the run's flags as its config, and a resumed run continues the same wandb run id."""

import json
import struct

import pytest
from train_helpers import MODEL, _write_sources, main_in_process

wandb = pytest.importorskip("wandb")


def _read_offline_run(folder):
    """``(run id, config, {step: {key: value}})`` of an offline run's ``run-<id>.wandb``: wandb's record log (the
    LevelDB log format: 32 KiB blocks of chunks with a 7-byte header, after a 7-byte ``:W&B`` file header) of
    ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = folder.glob("run-*.wandb")
    data, pos, chunk, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(pb.Record.FromString(chunk))
            chunk = b""
    run_id, config, history = None, {}, {}
    for r in records:
        if r.WhichOneof("record_type") == "run":
            run_id = r.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif r.WhichOneof("record_type") == "history":
            history.setdefault(r.history.step.num, {}).update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return run_id, config, history


def _args(shards, logs, *extra):
    return ["--model", MODEL, "--train-data", str(shards), "--val-data", str(shards / "val"), "--batch-size", "8",
            "--train-num-samples", "24", "--epochs", "1", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32",
            "--workers", "1", "--logs", str(logs), "--name", "w", "--log-every-n-steps", "1", "--device", "cpu",
            "--report-to", "wandb,tensorboard", "--wandb-project-name", "diffclip-test", *extra]


def test_wandb_offline_run_has_open_clip_keys_config_and_keeps_its_id_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    shards, _ = _write_sources(tmp_path / "src")
    logs = tmp_path / "logs"
    code, err = main_in_process(*_args(shards, logs))
    assert code == 0, err[-3000:]
    run = logs / "w"
    run_id = (run / "wandb_id.txt").read_text().strip()
    (first,) = (run / "wandb").glob("offline-run-*")
    assert first.name.endswith(f"-{run_id}")
    run_id_seen, config, history = _read_offline_run(first)
    assert run_id_seen == run_id
    assert config["model"] == MODEL and config["wandb_project_name"] == "diffclip-test"
    assert config["report_to"] == "wandb,tensorboard"
    keys = {k for row in history.values() for k in row}
    for tag in ("train/loss", "train/scale", "train/lr", "val/clip_val_loss", "val/image_to_text_R@1"):
        assert tag in keys, sorted(keys)
    assert sorted(history) == [1, 2, 3]  # at the optimizer step
    assert (run / "tensorboard").is_dir()  # both trackers

    code, err = main_in_process(*_args(shards, logs, "--epochs", "2", "--resume", "latest"))
    assert code == 0, err[-3000:]
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    second = next(r for r in runs if r != first)
    run_id_seen, _, history = _read_offline_run(second)
    assert run_id_seen == run_id and sorted(history) == [4, 5, 6]
