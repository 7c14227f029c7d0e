"""training/main.py end to end on real shards (crops of scikit-image photos written by training/make_shards.py):

* a run killed with SIGKILL mid-epoch and continued with ``--resume latest`` logs the same loss sequence as an
  uninterrupted run (results.jsonl, every step);
* the exported ``final_model/`` loads with ``diffclip.create_model(name, pretrained=dir)`` and gives the same
  outputs as the last checkpoint;
* results.jsonl, params.txt, out.log, TensorBoard events, validation and zero-shot records are written.
"""

import json
import subprocess

import pytest
import torch
from train_helpers import MODEL, _cmd, _env, _losses, _write_sources, run_killed_and_resumed, spoil_samples

import diffclip

KILL_AFTER_STEP = 4  # a mid-epoch checkpoint (6 steps per epoch)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    shards, zs = _write_sources(root)
    logs = root / "logs"
    return run_killed_and_resumed(lambda name, *extra: _cmd(shards, zs, logs, name, *extra), logs, KILL_AFTER_STEP)


def test_killed_and_resumed_run_has_the_same_losses(runs):
    full, resumed = _losses(runs["full"]), _losses(runs["killed"])
    assert sorted(full) == list(range(1, 13))
    assert sorted(resumed) == sorted(full)
    assert KILL_AFTER_STEP <= max(runs["before_kill"]) < 12  # killed mid-run, after the checkpoint
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), (step, resumed[step], full[step])
    assert full[12] < full[1]  # it learns
    records = [json.loads(x) for x in (runs["killed"] / "results.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["type"] == "resume"]
    assert len(resume) == 1 and resume[0]["checkpoint"].endswith("step_4.pt") and resume[0]["batches_done"] == 4
    assert "resumed from" in (runs["killed"] / "out.log").read_text()


def test_run_folder_contents(runs):
    run = runs["full"]
    assert (run / "params.txt").read_text().count("batch_size: 8") == 1
    assert "epoch 1 done" in (run / "out.log").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step_2.pt", "step_4.pt", "epoch_1.pt",
                                                                 "step_8.pt", "step_10.pt", "epoch_2.pt"}
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert {"loss", "lr", "logit_scale", "samples_per_second", "data_time"} <= train[0].keys()
    assert train[0]["lr"] == pytest.approx(1e-3 / 3)
    assert all(0 <= r["logit_scale"] <= 100 for r in train)
    zs = [r for r in records if r["type"] == "zeroshot"]
    val = [r for r in records if r["type"] == "val"]
    data = [r for r in records if r["type"] == "data"]
    assert len(zs) == len(val) == len(data) == 2
    assert 0 <= zs[-1]["acc1"] <= 1 and "mean_per_class_recall" in zs[-1]
    assert val[-1]["num_samples"] == 8 and "image_retrieval_recall@1" in val[-1]
    assert data[-1]["samples_undecodable"] == 0


def test_exported_weights_load_and_match_the_checkpoint(runs):
    export = runs["full"] / "final_model"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    loaded = diffclip.create_model(MODEL, pretrained=str(export))
    from_ckpt = diffclip.create_model(MODEL, pretrained=str(runs["full"] / "checkpoints" / "epoch_2.pt"))
    for (k, a), (_, b) in zip(loaded.state_dict().items(), from_ckpt.state_dict().items()):
        assert torch.equal(a, b), k
    tok = diffclip.get_tokenizer(MODEL)(["a photo of a coffee", "crop 3 of a photo of a rocket"])
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_a, out_b = loaded(images, tok), from_ckpt(images, tok)
    for key in ("image_embed", "text_embed", "logit_scale"):
        assert torch.equal(out_a[key], out_b[key])
    # the trained weights differ from a fresh model's
    fresh = diffclip.create_model(MODEL)
    assert not torch.equal(fresh.state_dict()["text_projection"], loaded.state_dict()["text_projection"])


def test_find_loadable_takes_the_highest_step(tmp_path):
    """--resume latest's choice: the highest step (epoch_e = e x steps per epoch), an epoch file before a step file
    of the same step, temporaries and other files ignored."""
    from diffclip.training.checkpoint import checkpoint_step, find_loadable

    def write(name: str) -> None:
        torch.save({"step": 0, "epoch": 0, "batches_done": 0, "state_dict": {}, "scaler": None,
                    "optimizer": {"state": {}, "param_groups": [{"params": []}]}}, tmp_path / name)

    assert find_loadable(tmp_path / "none", 10) is None
    for name in ("epoch_1.pt", "step_15.pt", "step_20.pt.tmp", "epoch_2.pt", "step_7.pt", "notes.txt"):
        write(name)
    assert checkpoint_step(tmp_path / "epoch_2.pt", 10) == 20
    assert find_loadable(tmp_path, 10)[0].name == "epoch_2.pt"  # step 20; the .tmp file is ignored
    write("step_21.pt")
    assert find_loadable(tmp_path, 10)[0].name == "step_21.pt"
    write("step_20.pt")
    (tmp_path / "step_21.pt").unlink()
    assert find_loadable(tmp_path, 10)[0].name == "epoch_2.pt"  # same step: the epoch checkpoint wins


def test_torchcompile_run_matches_the_eager_run(runs, tmp_path):
    """--torchcompile (inductor, CPU) trains the same model: its losses follow the eager run's step by step, and
    its checkpoint and exported weights carry the plain parameter names (no ``_orig_mod.`` prefix)."""
    shards, zs = runs["logs"].parent / "shards", runs["logs"].parent / "zeroshot"
    done = subprocess.run(_cmd(shards, zs, tmp_path, "compiled", "--torchcompile"), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiling the model with torch.compile" in (tmp_path / "compiled" / "out.log").read_text()
    eager, compiled = _losses(runs["full"]), _losses(tmp_path / "compiled")
    assert sorted(compiled) == sorted(eager) == list(range(1, 13))
    for step in compiled:  # inductor fuses and reorders floating-point work: close, not bit-identical
        assert compiled[step] == pytest.approx(eager[step], abs=1e-3), (step, compiled[step], eager[step])
    model = diffclip.create_model(MODEL, pretrained=str(tmp_path / "compiled" / "final_model"))
    ckpt = diffclip.create_model(MODEL, pretrained=str(tmp_path / "compiled" / "checkpoints" / "epoch_2.pt"))
    for (k, a), (_, b) in zip(model.state_dict().items(), ckpt.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_is_exact_when_some_captions_are_not_utf8(tmp_path):
    """Shards with captions that are not UTF-8 (and an undecodable image) among good samples: a run resumed from a
    mid-epoch checkpoint logs the same losses as the uninterrupted run (the data position counts usable samples)."""
    shards, zs = _write_sources(tmp_path)
    for shard, captions in enumerate(((0, 5, 9), (2, 3), (1, 7, 11), (4,))):
        spoil_samples(shards / f"{shard:05d}.tar", captions=captions, images=(6,) if shard == 1 else ())
    logs = tmp_path / "logs"
    def run(name, *extra):  # one epoch of 6 steps
        done = subprocess.run(_cmd(shards, zs, logs, name, "--epochs", "1", *extra), env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run("full")
    run("resumed", "--resume", str(logs / "full" / "checkpoints" / "step_2.pt"))
    expected, got = _losses(logs / "full"), _losses(logs / "resumed")
    assert sorted(got) == [3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), (step, got[step], expected[step])
    data = [json.loads(x) for x in (logs / "full" / "results.jsonl").read_text().splitlines()]
    assert sum(r["samples_undecodable"] for r in data if r["type"] == "data") >= 6  # the bad samples were met


def test_resume_checks_and_replayed_steps(tmp_path):
    """A short run (2 steps, a checkpoint after each), then continuations of it, in this process:

    * ``final_model/`` files get the mode of any new file (0644 under umask 022), not safetensors' 0600;
    * a checkpoint mid-epoch resumed with another --batch-size, or with a crafted batches_done or an optimizer of
      other groups, is refused in one line naming the file, before the run folder is written; the refusal is the
      last line of the resumed folder's out.log; the temporary a save killed mid-write left is removed at start;
    * resumed from step 1, step 2 is trained again and appears once in results.jsonl (the old record dropped)."""
    import os

    from train_helpers import main_in_process

    from diffclip.hub import torch_load

    shards, _ = _write_sources(tmp_path)
    logs = tmp_path / "logs"

    def main(name, *extra):
        return main_in_process("--model", MODEL, "--train-data", str(shards), "--train-num-samples", "16",
                               "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--precision",
                               "fp32", "--workers", "0", "--logs", str(logs), "--name", name, "--log-every-n-steps",
                               "1", "--save-every-n-steps", "1", *extra)

    code, err = main("a")
    assert code == 0, err[-3000:]
    run, ckpts = logs / "a", logs / "a" / "checkpoints"
    umask = os.umask(0)
    os.umask(umask)
    for f in (run / "final_model").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f

    step1 = ckpts / "step_1.pt"
    ckpt = torch_load(step1)
    crafted = {"far.pt": {**ckpt, "batches_done": 99},
               "groups.pt": {**ckpt, "optimizer": {**ckpt["optimizer"], "param_groups": ckpt["optimizer"]
                                                   ["param_groups"][:1]}}}
    for name, content in crafted.items():
        torch.save(content, tmp_path / name)
    refusals = {"far.pt": "far.pt: batches_done 99 is not a data position of this run",
                "groups.pt": "groups.pt: its optimizer has parameter groups of"}
    for name, expected in refusals.items():
        code, err = main("b", "--resume", str(tmp_path / name))
        assert code == 1 and expected in err.strip().splitlines()[-1], err[-2000:]
    assert not (logs / "b").exists()

    # the newest checkpoint is the mid-epoch step_1.pt, beside the temporary of a save killed mid-write
    for f in ckpts.glob("*.pt"):
        if f != step1:
            f.unlink()
    stale = ckpts / ".step_2.pt.k1ll3d00.tmp"
    stale.write_bytes(b"half a checkpoint")
    results_before = (run / "results.jsonl").read_text()
    code, err = main("a", "--resume", "latest", "--batch-size", "4")
    line = err.strip().splitlines()[-1]
    assert code == 1 and "step_1.pt: written 1 batches into epoch 0 with --batch-size 8" in line, err[-2000:]
    assert (run / "out.log").read_text().strip().splitlines()[-1].endswith(line.split("error: ", 1)[1])
    assert not stale.exists() and (run / "results.jsonl").read_text() == results_before

    code, err = main("a", "--resume", "latest")
    assert code == 0, err[-3000:]
    records = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]
    (resume,) = [r for r in records if r["type"] == "resume"]
    assert resume["records_dropped"] >= 1 and resume["checkpoint"].endswith("step_1.pt")
