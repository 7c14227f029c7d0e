"""The evaluation programs share one skeleton (eval/runner.py) and run_suite.py calls their evaluate functions:
the same inputs give the same CLIP_benchmark records through the suite as through each program; every program
checks its outputs before its data; linear_probe's one seed flag reaches the model and the feature cache."""

import json

import numpy as np
import pytest
from diffclip.eval import linear_probe, retrieval, robustness, run_suite, zeroshot
from diffclip.eval.runner import RECORD_KEYS, read_records
from eval_helpers import write_emoji_set, write_idx_digits

from diffclip.cli import run as run_cli

MODEL = "DiffCLIP-Tiny-64"
QUICK = ["--model", MODEL, "--max-samples", "6", "--workers", "0", "--no-progress"]


def _run(main, argv) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    assert e.value.code == 0


def _one_line_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "error:" in err[0], err
    return err[0]


def test_suite_records_are_the_programs_records(tmp_path):
    """The local suite (one random-init model) and the separate programs on the same data: identical records."""
    sources, idx = tmp_path / "sources", write_idx_digits(tmp_path / "idx")
    write_emoji_set(sources, "twitter")
    write_emoji_set(sources, "google")
    _run(run_suite.main, ["--model", MODEL, "--suite", "local", "--root", f"fashion-mnist={idx}", "--data-root",
                          str(sources), "--max-samples", "6", "--workers", "0", "--no-progress", "--no-cache",
                          "--output-dir", str(tmp_path / "suite")])
    by_task = {(r.pop("suite_task"), r["dataset"]): r for r in read_records(tmp_path / "suite" / "suite_local.json")}
    programs = {
        ("zeroshot", "emoji-twitter"): (zeroshot.main, ["--dataset", "emoji-twitter", "--data-root", str(sources)]),
        ("retrieval", "emoji-google"): (retrieval.main, ["--dataset", "emoji-google", "--data-root", str(sources)]),
        ("linear_probe", "fashion-mnist"): (linear_probe.main, ["--dataset", "fashion-mnist", "--data-root", str(idx),
                                                                "--no-cache"]),
    }
    for (task, name), (main, argv) in programs.items():
        out = tmp_path / f"{task}.json"
        _run(main, QUICK + argv + ["--output", str(out)])
        assert tuple(json.loads(out.read_text())) == RECORD_KEYS  # the file: CLIP_benchmark's record exactly
        record = read_records(out)[0]  # with its sidecar's details
        assert record.get("per_sample") or task == "linear_probe"  # the outcomes a bootstrap needs
        assert by_task[(task, name)] == record, (task, name)


@pytest.mark.parametrize("program", ["zeroshot", "retrieval", "robustness", "linear_probe"])
def test_outputs_are_checked_before_the_data(program, tmp_path, capsys):
    """One order in every program: an unwritable --output is named before a missing dataset folder is read."""
    main, argv = {
        "zeroshot": (zeroshot.main, ["--dataset", "folder"]),
        "retrieval": (retrieval.main, ["--dataset", "csv"]),
        "robustness": (robustness.main, []),
        "linear_probe": (linear_probe.main, ["--dataset", "dtd"]),
    }[program]
    err = _one_line_error(main, QUICK + argv + ["--data-root", str(tmp_path / "none"), "--output",
                                                "/proc/no/r.json"], capsys)
    assert "--output" in err


def test_robustness_unknown_set_is_named_first(tmp_path, capsys):
    """An unknown --datasets name is refused before the (missing) ImageNet folders are looked at."""
    err = _one_line_error(robustness.main, QUICK + ["--datasets", "imagenet-v2", "no-such-set", "--data-root",
                                                    str(tmp_path)], capsys)
    assert "no-such-set" in err and "layout" not in err
    assert robustness.SHIFTS is run_suite.SHIFTS  # one shift list


def test_linear_probe_seed_reaches_model_and_cache(tmp_path):
    """A random-init model built with --seed 1 has its own cached features (not seed 0's) and its record says 1."""
    cache = tmp_path / "cache"
    argv = ["--model", MODEL, "--dataset", "digits", "--max-samples", "30", "--C", "1", "--workers", "0",
            "--no-progress", "--feature-cache", str(cache)]
    records = {}
    for seed in (0, 1, 1):
        out = tmp_path / f"lp{seed}.json"
        _run(linear_probe.main, argv + ["--seed", str(seed), "--output", str(out)])
        records.setdefault(seed, []).append(json.loads(out.read_text()))
    assert [r["metrics"]["seed"] for r in records[0] + records[1]] == [0, 1, 1]
    assert len(list(cache.glob("*.npz"))) == 4  # train and test features of each seed's model; the rerun read them
    for split in ("train", "test"):
        seed0, seed1 = [np.load(f)["x"] for f in cache.glob(f"digits_{split}_*.npz")]
        assert seed0.shape == seed1.shape and not np.allclose(seed0, seed1)
    assert records[1][0] == records[1][1]


def test_a_damaged_feature_cache_entry_is_recomputed_and_replaced(tmp_path, capsys):
    """A truncated cache file (a killed write of an older version, a full disk) is a warning and a recomputation,
    replaced atomically, never a BadZipFile traceback; the record equals the one computed without any cache."""
    cache = tmp_path / "cache"
    argv = ["--model", MODEL, "--dataset", "digits", "--max-samples", "30", "--C", "1", "--workers", "0",
            "--no-progress", "--seed", "0"]
    _run(linear_probe.main, argv + ["--feature-cache", str(cache), "--output", str(tmp_path / "a.json")])
    entries = sorted(cache.glob("*.npz"))
    good = {p.name: p.read_bytes() for p in entries}
    for p in entries:  # truncate every entry
        p.write_bytes(good[p.name][: len(good[p.name]) // 3])
    capsys.readouterr()
    _run(linear_probe.main, argv + ["--feature-cache", str(cache), "--output", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert err.count("does not load") == len(entries) and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in cache.glob("*.npz")} == good  # replaced, by the same features
    _run(linear_probe.main, argv + ["--no-cache", "--output", str(tmp_path / "c.json")])
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc")
    assert a == b == c
