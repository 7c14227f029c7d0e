"""The DiffCLIP paper's tables and figures from result files (CLIP_benchmark records written by zeroshot.py,
retrieval.py, robustness.py, linear_probe.py --protocol paper, mmvp.py), for two or more models.

    python eval/report.py --results CLIP=results/clip DiffCLIP=results/diffclip --output-dir report/

``LABEL=PATH``: a result file (``.json``, ``.jsonl``) or a folder searched for them; a ``seed<k>`` folder in a file's
path marks the seed it belongs to (several seeds: mean ± std, n-1, and error bars). Writes into ``--output-dir``:

* ``table1.md``: linear probe and few-shot per dataset and their averages (the paper's Table 1);
* ``table2.md``: image and text retrieval R@5 per set and averages, and zero-shot top-1 (Table 2);
* ``fig1_groups.png``: the first two models over the six task groups with the Δ above the bars (Figure 1);
* ``fig3_zeroshot.png``: zero-shot top-1 per set (ImageNet, V2, A, R, Sketch when present) and the average
  (Figure 3);
* ``fig5_variants.png``: every model over the six groups (Figure 5);
* ``report.json``: every number above; ``report.md``: the tables and figures together.

Δ is against the first model. The six groups: linear probe (avg), few-shot (avg), image retrieval R@5 (avg), text
retrieval R@5 (avg), zero-shot (ImageNet when present, else the average of the zero-shot sets that are not
distribution shifts), zero-shot OOD (ImageNet-V2/-A/-R/-Sketch/ObjectNet avg). Values are shown in %.
"""

from __future__ import annotations

import re
import statistics
import textwrap
from pathlib import Path

from diffclip.cli import ArgumentParser, UsageError, run, setup_logging
from diffclip.files import check_writable, save_figure, write_json, write_text

OOD = ("imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch", "objectnet")
GROUPS = ("linear probe", "few-shot", "image retrieval R@5", "text retrieval R@5", "zero-shot", "zero-shot OOD")


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """``(seed, record)`` of every result record in a file or under a folder (``seed<k>`` in the path, else 0), each
    with the details of its sidecar (:func:`diffclip.eval.runner.read_records`).

    Raises:
        FileNotFoundError: nothing there. ValueError: a file that is not JSON (file and line named)."""
    from diffclip.eval import runner  # the evaluation runner, imported when needed (it imports torch)

    path = Path(path)
    files = sorted(f for f in path.rglob("*.json*") if f.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"--results {path}: no result files")
    out = []
    for f in files:
        m = re.search(r"(?:^|/)seed(\d+)(?:/|$)", str(f.parent))
        seed = int(m.group(1)) if m else 0
        out += [(seed, rec) for rec in runner.read_records(f)
                if isinstance(rec, dict) and "task" in rec and "metrics" in rec]
    return out


def values(records: list[tuple[int, dict]]) -> dict[str, dict[str, dict[int, float]]]:
    """``{kind: {dataset: {seed: value}}}`` for the kinds ``lp``, ``fewshot``, ``image_r5``, ``text_r5``,
    ``zeroshot`` (top-1)."""
    out: dict = {}

    def put(kind, dataset, seed, value):
        out.setdefault(kind, {}).setdefault(dataset, {})[seed] = float(value)

    # the paper's protocol wins over CLIP_benchmark's probe of the same dataset: it is what Table 1 reports
    for seed, r in sorted(records, key=lambda sr: sr[1].get("protocol") == "paper"):
        m, ds = r["metrics"], r["dataset"]
        if r["task"] == "linear_probe":
            key = "lp_mean_per_class_recall" if r.get("paper_metric") == "mean_per_class" else "lp_acc1"
            if key in m:
                put("lp", ds, seed, m[key])
            if "fewshot_acc" in m:
                put("fewshot", ds, seed, m["fewshot_acc"])
        elif r["task"] == "zeroshot_retrieval":
            put("image_r5", ds, seed, m["image_retrieval_recall@5"])
            put("text_r5", ds, seed, m["text_retrieval_recall@5"])
        elif r["task"] == "zeroshot_classification":
            put("zeroshot", ds, seed, m["acc1"])
    return out


def _stat(per_seed: dict[int, float]) -> dict:
    v = [per_seed[s] for s in sorted(per_seed)]
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def _average(per_dataset: dict[str, dict[int, float]]) -> dict[int, float]:
    """Per seed, the mean over the datasets that have that seed."""
    seeds = set.intersection(*(set(d) for d in per_dataset.values())) if per_dataset else set()
    return {s: statistics.fmean(d[s] for d in per_dataset.values()) for s in seeds}


def groups(v: dict) -> dict[str, dict[int, float]]:
    """The six task groups per seed (a group without results is left out)."""
    zs = v.get("zeroshot", {})
    in_dist = {"imagenet1k": zs["imagenet1k"]} if "imagenet1k" in zs else {k: x for k, x in zs.items() if k not in OOD}
    parts = {"linear probe": v.get("lp", {}), "few-shot": v.get("fewshot", {}),
             "image retrieval R@5": v.get("image_r5", {}), "text retrieval R@5": v.get("text_r5", {}),
             "zero-shot": in_dist, "zero-shot OOD": {k: x for k, x in zs.items() if k in OOD}}
    return {g: _average(p) for g, p in parts.items() if p and _average(p)}


def build(results: dict[str, list[tuple[int, dict]]]) -> dict:
    """Everything the report shows, from ``{label: [(seed, record)]}``: per label the per-dataset statistics of
    each kind, the six groups, and Δ (mean difference) against the first label."""
    labels = list(results)
    per = {lab: values(recs) for lab, recs in results.items()}
    rep = {"labels": labels, "kinds": {}, "groups": {}}
    for kind in ("lp", "fewshot", "image_r5", "text_r5", "zeroshot"):
        datasets = sorted({d for lab in labels for d in per[lab].get(kind, {})})
        if datasets:
            rep["kinds"][kind] = {d: {lab: _stat(per[lab][kind][d]) for lab in labels if d in per[lab].get(kind, {})}
                                  for d in datasets}
            rep["kinds"][kind]["average"] = {lab: _stat(_average(per[lab][kind])) for lab in labels
                                             if per[lab].get(kind) and _average(per[lab][kind])}
    for lab in labels:
        for g, per_seed in groups(per[lab]).items():
            rep["groups"].setdefault(g, {})[lab] = _stat(per_seed)
    return rep


def _cell(stats: dict, lab: str, base: str) -> str:
    if lab not in stats:
        return ""
    s = stats[lab]
    text = f"{100 * s['mean']:.1f}" + (f" ± {100 * s['std']:.1f}" if s["n"] > 1 else "")
    if lab != base and base in stats:
        text += f" ({100 * (s['mean'] - stats[base]['mean']):+.1f})"
    return text


def table(rep: dict, blocks: list[tuple[str, str]], title: str) -> str:
    labels, base = rep["labels"], rep["labels"][0]
    lines = [f"**{title}** (%, mean ± std over seeds where there are several; Δ vs {base} in parentheses)", "",
             "| block | dataset | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for kind, name in blocks:
        for ds, stats in rep["kinds"].get(kind, {}).items():
            lines.append(f"| {name} | {ds} | " + " | ".join(_cell(stats, lab, base) for lab in labels) + " |")
    return "\n".join(lines)


def _bars(rep: dict, labels: list[str], path: Path, title: str, deltas: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [g for g in GROUPS if g in rep["groups"]]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(names)), 4.5))
    x = np.arange(len(names))
    for i, lab in enumerate(labels):
        means = [100 * rep["groups"][g][lab]["mean"] if lab in rep["groups"][g] else 0 for g in names]
        errs = [100 * rep["groups"][g][lab]["std"] if lab in rep["groups"][g] else 0 for g in names]
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=lab)
        if deltas and i > 0:
            for b, g in zip(bars, names):
                if lab in rep["groups"][g] and labels[0] in rep["groups"][g]:
                    d = 100 * (rep["groups"][g][lab]["mean"] - rep["groups"][g][labels[0]]["mean"])
                    ax.annotate(f"{d:+.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                va="bottom", fontsize=8, xytext=(0, 6), textcoords="offset points")
    ax.set_xticks(x, [n.replace(" R@5", "\nR@5") for n in names], fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(textwrap.fill(title, 90), fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def _zeroshot_bars(rep: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    zs = rep["kinds"].get("zeroshot", {})
    order = [d for d in ("imagenet1k", *OOD) if d in zs] + [d for d in zs if d not in ("imagenet1k", *OOD)]
    order = [d for d in order if d != "average"] + ["average"]
    labels = rep["labels"]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(order)), 4.5))
    x = np.arange(len(order))
    for i, lab in enumerate(labels):
        means = [100 * zs[d][lab]["mean"] if lab in zs.get(d, {}) else 0 for d in order]
        errs = [100 * zs[d][lab]["std"] if lab in zs.get(d, {}) else 0 for d in order]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=lab)
    ax.set_xticks(x, order, fontsize=8)
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def write_report(results: dict[str, list[tuple[int, dict]]], out: str | Path, data: str = "") -> dict:
    """Writes the tables, figures and ``report.json`` into ``out`` and returns the report."""
    if len(results) < 2:
        raise UsageError("a report compares two or more models")
    out = Path(out)
    rep = build(results)
    seeds = max((len({s for s, _ in recs}) for recs in results.values()), default=1)
    suffix = f" - {data}" if data else ""
    models = " vs ".join(rep["labels"])
    t1 = table(rep, [("lp", "linear probe"), ("fewshot", "few-shot")], f"Table 1: linear probe and few-shot{suffix}")
    t2 = table(rep, [("image_r5", "image R@5"), ("text_r5", "text R@5"), ("zeroshot", "zero-shot top-1")],
               f"Table 2: retrieval and zero-shot{suffix}")
    write_text(out / "table1.md", t1 + "\n")
    write_text(out / "table2.md", t2 + "\n")
    figs = []
    if rep["groups"]:
        _bars(rep, rep["labels"][:2], out / "fig1_groups.png", f"{' vs '.join(rep['labels'][:2])}: six task groups"
              f"{suffix} ({seeds} seed(s))", deltas=True)
        _bars(rep, rep["labels"], out / "fig5_variants.png", f"{models}{suffix} ({seeds} seed(s))", deltas=True)
        figs += ["fig1_groups.png", "fig5_variants.png"]
    if rep["kinds"].get("zeroshot"):
        _zeroshot_bars(rep, out / "fig3_zeroshot.png", f"zero-shot: {models}{suffix}")
        figs.append("fig3_zeroshot.png")
    mm = {lab: [r["metrics"] for _, r in recs if r["task"] == "mmvp"] for lab, recs in results.items()}
    if sum(bool(v) for v in mm.values()) > 1:  # MMVP-VLM: the mean over seeds of each pattern, one polygon per model
        from diffclip.eval.mmvp import radar_chart

        means = {lab: {k: statistics.fmean(m[k] for m in ms) for k in ms[0]} for lab, ms in mm.items() if ms}
        rep["mmvp"] = means
        radar_chart(means, out / "mmvp_radar.png", f"MMVP-style pairs{suffix}: {models} ({seeds} seed(s))")
        figs.append("mmvp_radar.png")
    write_json(out / "report.json", rep)
    write_text(out / "report.md", "\n\n".join([t1, t2, *[f"![{f}]({f})" for f in figs]]) + "\n")
    return rep


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", nargs="+", required=True, metavar="LABEL=PATH", help="a label and its result "
                   "file(s) or folder, per model; the first is the baseline of the Δ")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data", default="", help="what the models were trained on, for the titles")
    args = p.parse_args(argv)
    setup_logging()
    check_writable(Path(args.output_dir) / "report.json", "--output-dir")
    results = {}
    for item in args.results:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise UsageError(f"--results {item!r}: expected LABEL=PATH")
        results[label] = read_records(path)
    rep = write_report(results, args.output_dir, args.data)
    print((Path(args.output_dir) / "report.md").read_text())
    return 0 if rep else 1


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
