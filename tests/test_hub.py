import argparse
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from hf_server import HubServer, ResettingServer

import diffclip
from diffclip import DiffCLIP, create_model, get_tokenizer
from diffclip.hub import convert_open_clip_state_dict, load_state_dict, read_state_dict


def _outputs(model, name):
    torch.manual_seed(123)
    size = model.image_size
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size), get_tokenizer(name)(["a red circle", "two blue squares"]))


def _same(a, b):
    torch.testing.assert_close(a["image_embed"], b["image_embed"], atol=0, rtol=0)
    torch.testing.assert_close(a["text_embed"], b["text_embed"], atol=0, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("DiffCLIP-Tiny-64").eval()


def test_save_pretrained_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tiny")
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    _same(_outputs(tiny, "DiffCLIP-Tiny-64"), _outputs(DiffCLIP.from_pretrained(tmp_path / "tiny").eval(), "DiffCLIP-Tiny-64"))
    _same(_outputs(tiny, "DiffCLIP-Tiny-64"), _outputs(create_model("DiffCLIP-Tiny-64", pretrained=str(tmp_path / "tiny")),
                                                        "DiffCLIP-Tiny-64"))


def test_hf_hub_download_through_a_loopback_server(tiny, tmp_path, monkeypatch):
    hub_root = tmp_path / "hub"
    tiny.save_pretrained(hub_root / "acme" / "diffclip-tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    ref = _outputs(tiny, "DiffCLIP-Tiny-64")
    with HubServer(hub_root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        _same(ref, _outputs(create_model("hf-hub:acme/diffclip-tiny"), "DiffCLIP-Tiny-64"))
        _same(ref, _outputs(create_model("DiffCLIP-Tiny-64", pretrained="hf-hub:acme/diffclip-tiny"), "DiffCLIP-Tiny-64"))
        assert any(r.startswith("GET /acme/diffclip-tiny/resolve/main/model.safetensors") for r in server.requests)
        with pytest.raises(FileNotFoundError, match="has no file 'nope.pt'"):
            create_model("DiffCLIP-Tiny-64", pretrained="hf-hub:acme/diffclip-tiny/nope.pt")
        with pytest.raises(FileNotFoundError, match="none of the weight files"):
            create_model("DiffCLIP-Tiny-64", pretrained="hf-hub:acme/missing-repo")
    # server gone: the cached copy is used
    _same(ref, _outputs(create_model("hf-hub:acme/diffclip-tiny"), "DiffCLIP-Tiny-64"))
    # a connection that is reset (a broken proxy): the cached copy is used; with an empty cache, one clear error
    with ResettingServer() as broken:
        monkeypatch.setenv("HF_ENDPOINT", broken.url)
        _same(ref, _outputs(create_model("hf-hub:acme/diffclip-tiny"), "DiffCLIP-Tiny-64"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        with pytest.raises(ConnectionError, match="cannot reach the hub .* no cached copy of "
                                                  "acme/diffclip-tiny/config.json .*Error: "):
            create_model("hf-hub:acme/diffclip-tiny")
        assert broken.connections >= 2
    # no network allowed (HF_HUB_OFFLINE, read when huggingface_hub is imported: a fresh process) and no cached copy
    r = subprocess.run([sys.executable, "-c", "import diffclip; diffclip.create_model('hf-hub:acme/diffclip-tiny')"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert r.returncode != 0
    assert "ConnectionError: cannot reach the hub" in r.stderr and "no cached copy of acme/diffclip-tiny" in r.stderr


def _authors_checkpoint(model, path):
    """A checkpoint as the authors' training wrote it: DDP `module.` names, optimizer state, run arguments."""
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    args = argparse.Namespace(model="DiffCLIP_VITB16", lr=5e-4, output_dir=pathlib.PosixPath("/runs/cc3m"), epochs=40)
    ckpt = {"epoch": 40, "state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
            "best_acc1": np.float64(14.4), "args": args, "scaler": {"scale": 65536.0}, "step": np.int64(1000)}
    torch.save(ckpt, path)


def test_authors_release_checkpoint_loads_strictly_via_hub_tag(tmp_path, monkeypatch):
    torch.manual_seed(1)
    src = diffclip.DiffCLIP_VITB16().eval()
    repo = tmp_path / "hub" / "hammh0a" / "DiffCLIP_ViTB16_CC3M"
    repo.mkdir(parents=True)
    _authors_checkpoint(src, repo / "checkpoint_best.pt")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with HubServer(tmp_path / "hub") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        loaded = diffclip.DiffCLIP_VITB16(pretrained="cc3m")
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    shutil.rmtree(tmp_path / "cache")


def test_authors_layout_tiny_checkpoint_file(tiny, tmp_path):
    _authors_checkpoint(tiny, tmp_path / "checkpoint_best.pt")
    _same(_outputs(tiny, "DiffCLIP-Tiny-64"),
          _outputs(create_model("DiffCLIP-Tiny-64", pretrained=str(tmp_path / "checkpoint_best.pt")), "DiffCLIP-Tiny-64"))
    # a directory holding checkpoint_best.pt works too
    _same(_outputs(tiny, "DiffCLIP-Tiny-64"),
          _outputs(create_model("DiffCLIP-Tiny-64", pretrained=str(tmp_path)), "DiffCLIP-Tiny-64"))


class _RunsCode:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    evil = _RunsCode()
    evil.marker = str(tmp_path / "pwned")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": evil}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle .*allow-list"):
        read_state_dict(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("fmt", ["plain-pickle", "legacy-torch"])
def test_a_code_running_non_zip_pickle_is_one_unpickling_error_naming_the_global(tmp_path, fmt):
    import warnings

    evil = _RunsCode()
    evil.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    if fmt == "plain-pickle":  # protocol 4: an opcode torch's weights-only unpickler stops at, before the global
        path.write_bytes(pickle.dumps({"state_dict": {"w": torch.zeros(1)}, "payload": evil}, protocol=4))
    else:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": evil}, path, _use_new_zipfile_serialization=False,
                   pickle_protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's UserWarning about the protocol must not reach the user
        with pytest.raises(pickle.UnpicklingError) as e:
            read_state_dict(str(path))
    message = str(e.value)
    assert not (tmp_path / "pwned").exists()
    assert "\n" not in message and str(path) in message and "pathlib.Path.touch" in message, message
    assert "weights_only" not in message and "False" not in message, message


def test_clear_errors_for_missing_and_mismatched_weights(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained weights not found: 'nowhere.pt'"):
        create_model("DiffCLIP-Tiny-64", pretrained="nowhere.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        create_model("DiffCLIP-Tiny-64", pretrained=str(tmp_path / "empty"))
    tiny.save_pretrained(tmp_path / "diff")
    # the folder's config.json names the fields first
    with pytest.raises(RuntimeError, match=r"diff/config.json \(saved from DiffCLIP-Tiny-64\) has another config than "
                                           r"CLIP-Tiny-64 \(saved vs model\): text_cfg.attn_type 'diff' vs 'standard'; "
                                           r"vision_cfg.attn_type 'diff' vs 'standard'$"):
        create_model("CLIP-Tiny-64", pretrained=str(tmp_path / "diff"))
    # the weights without their config: differential weights into the standard twin, the lambda/diff_norm names listed
    shutil.copy(tmp_path / "diff" / "model.safetensors", tmp_path / "bare.safetensors")
    with pytest.raises(RuntimeError, match=r"0 missing keys \[\], 50 unexpected keys \[.*visual.blocks.0.attn.lambda_q1"):
        create_model("CLIP-Tiny-64", pretrained=str(tmp_path / "bare.safetensors"))
    # same names, other shapes: a wrong-architecture checkpoint
    cfg = diffclip.get_model_config("DiffCLIP-Tiny-64")
    cfg["embed_dim"] = 64
    with pytest.raises(RuntimeError, match=r"another architecture: .*image_projection \(192, 128\) vs \(192, 64\)"):
        load_state_dict(DiffCLIP(**cfg), dict(tiny.state_dict()), source="tiny")
    message = ""
    try:
        create_model("DiffCLIP-ViT-B-32", pretrained=str(tmp_path / "bare.safetensors"))
    except RuntimeError as e:
        message = str(e)
    assert "\n" not in message and "missing keys" in message and "visual.blocks.11.norm1.weight" in message


def test_garbage_empty_truncated_and_foreign_files_are_one_line_value_errors(tiny, tmp_path):
    torch.save({"state_dict": tiny.state_dict()}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "text.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {"truncated.pt": "not a readable PyTorch checkpoint", "empty.pt": "empty file",
             "garbage.safetensors": "not a safetensors file", "text.pt": "not a", "list.pt": "holds no state dict"}
    for name, expected in cases.items():
        with pytest.raises(ValueError, match=expected) as e:
            create_model("DiffCLIP-Tiny-64", pretrained=str(tmp_path / name))
        assert "\n" not in str(e.value) and name in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="pretrained='' names no weights"):
        create_model("DiffCLIP-Tiny-64", pretrained="")
    # the good file loads
    assert create_model("DiffCLIP-Tiny-64", pretrained=str(tmp_path / "good.pt")) is not None


@pytest.mark.parametrize("oc_name,ours", [("ViT-B-16", "OpenCLIP-ViT-B-16"), ("ViT-B-32-quickgelu", "OpenCLIP-ViT-B-32-quickgelu")])
def test_open_clip_weights_give_open_clip_embeddings(oc_name, ours, tmp_path):
    torch.manual_seed(2)
    ref = open_clip.create_model(oc_name).eval()
    with torch.no_grad():  # non-trivial values for the parameters open_clip initialises to constants
        for name, p in ref.named_parameters():
            if name.endswith(("ln_pre.weight", "ln_post.bias", "ln_final.weight", "ln_1.bias", "in_proj_bias")):
                p.add_(torch.randn_like(p) * 0.1)
    torch.save(ref.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model = create_model(ours, pretrained=str(tmp_path / "open_clip_pytorch_model.bin"))
    images = torch.randn(2, 3, 224, 224)
    text = open_clip.get_tokenizer(oc_name)(["a photo of a cat", "a drawing of a tree on a hill"])
    assert torch.equal(text, get_tokenizer(ours)(["a photo of a cat", "a drawing of a tree on a hill"]))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), atol=1e-4, rtol=0)
        torch.testing.assert_close(model.encode_text(text), ref.encode_text(text), atol=1e-4, rtol=0)
    assert model.logit_scale.item() == ref.logit_scale.item()
    assert set(convert_open_clip_state_dict(ref.state_dict())) == set(model.state_dict())


def test_save_pretrained_is_atomic_and_overwrites(tiny, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old, half-written")
    tiny.save_pretrained(target)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    _same(_outputs(tiny, "DiffCLIP-Tiny-64"), _outputs(DiffCLIP.from_pretrained(target).eval(), "DiffCLIP-Tiny-64"))


def test_depth_scheduled_lambda_config_builds_per_layer_values():
    cfg = diffclip.get_model_config("DiffCLIP-Tiny-64")
    cfg["vision_cfg"]["lambda_init"] = cfg["text_cfg"]["lambda_init"] = "schedule"
    model = DiffCLIP(**cfg)
    expected = [diffclip.lambda_init_schedule(i) for i in range(6)]
    assert [b.attn.lambda_init for b in model.visual.blocks] == pytest.approx(expected)
    assert [b.attn.lambda_init for b in model.transformer.resblocks] == pytest.approx(expected[:4])


def _snippet(card_text):
    """The python block of a model card's usage section."""
    return card_text.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_saved_folder_is_self_describing(tiny, tmp_path, monkeypatch, photo, capsys):
    from huggingface_hub import ModelCard

    folder = tmp_path / "hub" / "acme" / "diffclip-tiny"
    tiny.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_name"] == "DiffCLIP-Tiny-64"
    assert {k: v for k, v in saved.items() if k != "model_name"} == tiny.model_config
    ref = _outputs(tiny, "DiffCLIP-Tiny-64")
    by_folder = create_model(str(folder))  # no name: config and weights from the folder
    assert by_folder.model_name == "DiffCLIP-Tiny-64"
    _same(ref, _outputs(by_folder, str(folder)))
    # same shapes, another lambda_init: refused in one line naming the fields (silently loaded before)
    with pytest.raises(RuntimeError, match=r"config.json \(saved from DiffCLIP-Tiny-64\) has another config than "
                                           r"DiffCLIP-Sched-Tiny-64 \(saved vs model\): text_cfg.lambda_init 0.8 vs "
                                           r"'schedule'; vision_cfg.lambda_init 0.8 vs 'schedule'$"):
        create_model("DiffCLIP-Sched-Tiny-64", pretrained=str(folder))
    # the card: YAML header for the hub, no template left-overs, a usage snippet that runs as it is
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffclip" and card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.license == "mit" and card.data.model_name == "DiffCLIP-Tiny-64"
    assert "arxiv:2503.06626" in card.data.tags and "https://arxiv.org/abs/2503.06626" in card.text
    assert "| image (ViT) | 192 | 6 | 4 | differential (λ_init 0.8) | gelu | 64 px, patch 8 |" in card.text
    assert "More Information Needed" not in card.text and "github.com/diffclip" not in card.text
    monkeypatch.chdir(tmp_path)
    photo.save(tmp_path / "photo.jpg")
    exec(_snippet(card.text), {})
    probs = eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(probs) == ["a photo of a cat", "a photo of a dog", "a diagram"]
    assert sum(probs.values()) == pytest.approx(1.0)
    # through the hub: no name either, and the card pushed with a repo names hf-hub:org/repo
    (folder / "README.md").write_text(str(tiny.generate_model_card(repo_id="acme/diffclip-tiny")))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with HubServer(tmp_path / "hub") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        from_hub = create_model("hf-hub:acme/diffclip-tiny")
        assert from_hub.model_name == "DiffCLIP-Tiny-64"
        _same(ref, _outputs(from_hub, "hf-hub:acme/diffclip-tiny"))
        with pytest.raises(RuntimeError, match=r"config.json \(saved from DiffCLIP-Tiny-64\) has another config than "
                                               r"DiffCLIP-Sched-Tiny-64"):
            create_model("DiffCLIP-Sched-Tiny-64", pretrained="hf-hub:acme/diffclip-tiny")
        snippet = _snippet(ModelCard.load(folder / "README.md").text)
        assert 'create_model_and_transforms("hf-hub:acme/diffclip-tiny")' in snippet
        exec(snippet, {})
    assert len(eval(capsys.readouterr().out.strip().splitlines()[-1])) == 3


def test_trainer_export_card_and_resume_with_another_model(tmp_path):
    from huggingface_hub import ModelCard
    from train_helpers import _cmd, _env, _write_sources

    shards, zs = _write_sources(tmp_path / "src")
    logs = tmp_path / "logs"
    cmd = _cmd(shards, zs, logs, "run", "--epochs", "1", "--report-to", "none")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    export = logs / "run" / "final_model"
    card = ModelCard.load(export / "README.md")
    assert card.data.library_name == "diffclip" and card.data.model_name == "DiffCLIP-Tiny-64"
    records = [json.loads(x) for x in (logs / "run" / "results.jsonl").read_text().splitlines()]
    val = [x for x in records if x["type"] == "val"][-1]
    zeroshot = [x for x in records if x["type"] == "zeroshot"][-1]
    for row in (f"| training data | `{shards}` |", "| samples per epoch | 48 |", "| optimizer steps | 6 |",
                "| global batch | 8 |", "| precision | fp32 |", f"| val_loss | {val['val_loss']:.4g} |",
                f"| acc1 | {zeroshot['acc1']:.4g} |"):
        assert row in card.text, row
    assert f"### Zero-shot on {zeroshot['dataset']} (last evaluation of the run, step 6, epoch 1)" in card.text
    assert create_model(str(export)).model_name == "DiffCLIP-Tiny-64"
    # the step checkpoints keep the config: resuming with a --model of the same shapes is refused before any work
    ckpt = torch.load(logs / "run" / "checkpoints" / "epoch_1.pt", weights_only=False)
    assert ckpt["model_config"] == create_model("DiffCLIP-Tiny-64").model_config
    resume = [*cmd[:cmd.index("--model") + 1], "DiffCLIP-Sched-Tiny-64", *cmd[cmd.index("--model") + 2:],
              "--resume", "latest"]
    r = subprocess.run(resume, capture_output=True, text=True, timeout=600, env=_env())
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert ("--resume latest: checkpoint epoch_1.pt (saved from DiffCLIP-Tiny-64) has another config than "
            "DiffCLIP-Sched-Tiny-64 (saved vs model): text_cfg.lambda_init 0.8 vs 'schedule'") in lines[0]
