"""TensorBoard as open_clip users read it: a tiny real run's event file (read with TensorBoard's own
EventAccumulator) carries open_clip_train's tags (``train/loss``, ``train/scale``, ``val/clip_val_loss``,
``val/image_to_text_R@1``, ``val/<set>-zeroshot-val-top1``...), training at the optimizer step and evaluations at
the epoch, with the values of ``results.jsonl``, which keeps its own field names."""

import json
import math
import subprocess

from diffclip.training.train import OPEN_CLIP_TAGS
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import _cmd, _env, _write_sources


def test_tensorboard_uses_open_clip_tags(tmp_path):
    shards, zs = _write_sources(tmp_path / "data")
    cmd = _cmd(shards, zs, tmp_path / "logs", "run", "--epochs", "1", "--train-num-samples", "16")
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "logs" / "run"
    records = {}
    for line in (run / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records.setdefault(rec["type"], []).append(rec)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def points(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    expected = {"train/loss", "train/scale", "train/lr", "train/data_time", "train/batch_time",
                "train/samples_per_second", "train/samples_per_second_per_gpu", "val/clip_val_loss",
                "val/num_samples", "val/epoch", "val/zeroshot-zeroshot-val-top1",  # 3 classes: no top5
                *(f"val/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
                *(f"val/{d}_{r}" for d in ("image_to_text", "text_to_image") for r in ("mean_rank", "median_rank"))}
    assert expected <= tags, sorted(expected - tags)
    assert not any(t.startswith(("val/val_", "val/image_retrieval", "zeroshot/")) for t in tags), sorted(tags)

    # training at the optimizer step, with the values results.jsonl holds under its own names
    train = records["train"]
    assert [s for s, _ in points("train/loss")] == [r["step"] for r in train] == [1, 2]
    for tag, field in (("train/scale", "logit_scale"), ("train/loss", "loss"), ("train/lr", "lr")):
        assert all(math.isclose(v, r[field], rel_tol=1e-6) for (_, v), r in zip(points(tag), train)), tag

    # evaluations at the number of epochs done (1), as open_clip's evaluate(..., completed_epoch) logs them
    (val,) = records["val"]
    (zero_shot,) = records["zeroshot"]
    for field, tag in OPEN_CLIP_TAGS["val"].items():
        ((step, value),) = points(tag)
        assert step == 1 and math.isclose(value, val[field], rel_tol=1e-6), (tag, step, value, val[field])
    assert points("val/epoch") == [(1, 1.0)]
    ((step, top1),) = points("val/zeroshot-zeroshot-val-top1")
    assert step == 1 and math.isclose(top1, zero_shot["acc1"], rel_tol=1e-6)
    assert 1 <= val["image_retrieval_mean_rank"] <= val["num_samples"]
    assert val["text_retrieval_median_rank"] == int(val["text_retrieval_median_rank"]) >= 1
