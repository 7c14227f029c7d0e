"""eval/report.py: the paper's tables and figures from result files of two models over two seeds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from diffclip.eval.report import build, read_records

ROOT = Path(__file__).resolve().parents[1]


def _records(shift: float) -> list[dict]:
    def rec(task, dataset, metrics, **extra):
        return {"dataset": dataset, "model": "m", "pretrained": "", "task": task, "metrics": metrics,
                "language": "en", **extra}
    return [
        rec("linear_probe", "pets", {"lp_mean_per_class_recall": 0.60 + shift, "lp_acc1": 0.9,
                                     "fewshot_acc": 0.70 + shift, "fewshot_acc_std": 0.1},
            protocol="paper", paper_metric="mean_per_class"),
        rec("linear_probe", "cifar10", {"lp_acc1": 0.80 + shift, "fewshot_acc": 0.60 + shift}, protocol="paper",
            paper_metric="acc1"),
        rec("zeroshot_retrieval", "flickr30k", {"image_retrieval_recall@5": 0.30 + shift,
                                                "text_retrieval_recall@5": 0.40 + shift}),
        rec("zeroshot_classification", "imagenet1k", {"acc1": 0.20 + shift, "acc5": 0.5}),
        rec("zeroshot_classification", "imagenet-v2", {"acc1": 0.10 + shift, "acc5": 0.4}),
        rec("zeroshot_classification", "imagenet-a", {"acc1": 0.05 + shift, "acc5": 0.3}),
    ]


@pytest.fixture
def results_dir(tmp_path):
    for label, shifts in (("CLIP", (0.0, 0.02)), ("DiffCLIP", (0.03, 0.05))):
        for seed, shift in enumerate(shifts):
            folder = tmp_path / label / f"seed{seed}"
            folder.mkdir(parents=True)
            for i, r in enumerate(_records(shift)):
                (folder / f"r{i}.json").write_text(json.dumps(r))
    return tmp_path


def test_numbers(results_dir):
    rep = build({lab: read_records(results_dir / lab) for lab in ("CLIP", "DiffCLIP")})
    lp = rep["kinds"]["lp"]
    assert lp["pets"]["CLIP"]["mean"] == pytest.approx(0.61)  # the mean per-class metric, not lp_acc1 (0.9)
    assert lp["pets"]["CLIP"]["std"] == pytest.approx(0.0141421, abs=1e-6) and lp["pets"]["CLIP"]["n"] == 2
    assert lp["average"]["DiffCLIP"]["mean"] == pytest.approx((0.64 + 0.84) / 2)
    g = rep["groups"]
    assert list(g) == ["linear probe", "few-shot", "image retrieval R@5", "text retrieval R@5", "zero-shot",
                       "zero-shot OOD"]
    assert g["zero-shot"]["CLIP"]["mean"] == pytest.approx(0.21)  # ImageNet alone
    assert g["zero-shot OOD"]["DiffCLIP"]["mean"] == pytest.approx((0.14 + 0.09) / 2)  # V2 and A
    assert g["few-shot"]["DiffCLIP"]["mean"] - g["few-shot"]["CLIP"]["mean"] == pytest.approx(0.03)


def test_cli_writes_tables_and_figures(results_dir, tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "report.py"), "--results",
                        f"CLIP={results_dir / 'CLIP'}", f"DiffCLIP={results_dir / 'DiffCLIP'}", "--output-dir",
                        str(out), "--data", "synthetic"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    t1 = (out / "table1.md").read_text()
    assert "| linear probe | pets | 61.0 ± 1.4 | 64.0 ± 1.4 (+3.0) |" in t1
    assert "| few-shot | average |" in t1
    t2 = (out / "table2.md").read_text()
    assert "| image R@5 | flickr30k | 31.0 ± 1.4 | 34.0 ± 1.4 (+3.0) |" in t2
    for fig in ("fig1_groups.png", "fig3_zeroshot.png", "fig5_variants.png"):
        assert (out / fig).stat().st_size > 10_000, fig
    assert json.loads((out / "report.json").read_text())["labels"] == ["CLIP", "DiffCLIP"]
    bad = subprocess.run([sys.executable, str(ROOT / "eval" / "report.py"), "--results", "CLIP", "--output-dir",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 1 and "expected LABEL=PATH" in bad.stderr and "Traceback" not in bad.stderr
