"""The summary of a study (training/study.py) from its result files alone: per evaluation metric and model the
values over seeds, mean ± std (sample std, n-1), and against the baseline the mean paired difference with its 95 %
t-interval over seeds and the two-sided paired t-test (scipy.stats; needs >= 2 seeds: the headline, training
noise) and, where the result files hold per-sample outcomes (``per_sample``, in each result file's sidecar), a
paired bootstrap over the evaluation samples (:func:`paired_bootstrap`: the secondary test, evaluation-set noise
of these trained models only); under the table the machine and package versions of the driver's calls
(``environment.json``, written by training/study.py); then the paper's tables and figures
(:mod:`diffclip.eval.report`, first model = the baseline of Figure 1) in ``<output>/report``. A finetune study's
summary is its table (:func:`finetune_rows`): per model the parameters, top-1 over seeds (mean ± std) beside a
reference value, top-5 and time per run, from the runs' ``results.json``."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from diffclip.files import write_json, write_text


def labels(study: dict) -> list[str]:
    return [m["label"] for m in study["models"]]


def collect(jobs: list[dict]) -> dict:
    """``{eval name: {label: {seed: record}}}`` of the evaluation jobs' result files present, each with the details
    of its sidecar (``per_sample``; :func:`diffclip.eval.runner.read_records`)."""
    from diffclip.eval.runner import read_records

    found: dict = {}
    for j in jobs:
        if j["kind"] == "eval" and Path(j["output"]).is_file():
            found.setdefault(j["eval"], {}).setdefault(j["label"], {})[j["seed"]] = read_records(j["output"])[0]
    return found


def paired_test(a: list[float], b: list[float]) -> dict:
    """The difference ``a - b`` over paired seeds: its mean (``delta``), std (n-1), the 95 % Student t-interval of
    the mean (``ci_low``/``ci_high``: ``delta ± t(0.975, n-1)·std/√n``, the spread a new set of seeds would show)
    and the two-sided paired t-test's p-value (``scipy.stats.ttest_rel``; the interval excludes 0 exactly when
    p < 0.05). Below 2 pairs the std, interval and p-value are None; when every difference is the same value the
    interval is that value and p is 1.0 (all 0) or 0.0."""
    d = [x - y for x, y in zip(a, b)]
    res = {"n": len(d), "delta": statistics.fmean(d) if d else math.nan,
           "delta_std": statistics.stdev(d) if len(d) > 1 else None, "p_value": None, "ci_low": None, "ci_high": None}
    if len(d) > 1:
        from scipy.stats import t as student_t
        from scipy.stats import ttest_rel

        half = float(student_t.ppf(0.975, len(d) - 1)) * res["delta_std"] / math.sqrt(len(d))
        res["ci_low"], res["ci_high"] = res["delta"] - half, res["delta"] + half
        if statistics.pstdev(d) == 0:
            res["p_value"] = 1.0 if d[0] == 0 else 0.0
        else:
            res["p_value"] = float(ttest_rel(a, b).pvalue)
    return res


def paired_bootstrap(a: list, b: list, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """A 95 % percentile interval of the difference of means between two models scored on the same evaluation
    samples: ``a`` and ``b`` hold one per-sample outcome array per seed (the same samples in the same order);
    each resample draws the samples with replacement, the same draw for every seed and both models, and the
    difference is that of the seed-averaged means. None when the arrays do not pair up."""
    import numpy as np

    if not a or len(a) != len(b) or len({len(x) for x in (*a, *b)}) != 1 or not len(a[0]):
        return None
    A, B = np.asarray(a, np.float32), np.asarray(b, np.float32)  # (seeds, n)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, A.shape[1], A.shape[1])
        diffs[i] = A[:, idx].mean() - B[:, idx].mean()
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"ci_low": float(low), "ci_high": float(high), "n_samples": int(A.shape[1]), "n_boot": n_boot}


def summarise(study: dict, found: dict) -> list[dict]:
    """One row per (evaluation, metric): per model the values over seeds, mean, std, and the paired test against
    the baseline on the seeds both have."""
    rows = []
    base = study["baseline"]
    for e in study["eval"]:
        per_model = found.get(e["name"], {})
        keys = e.get("metrics") or sorted({k for runs in per_model.values() for r in runs.values()
                                          for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        for key in keys:
            row = {"eval": e["name"], "metric": key, "models": {}}
            for model in labels(study):
                runs = per_model.get(model, {})
                vals = {s: runs[s]["metrics"][key] for s in study["seeds"] if s in runs and key in runs[s]["metrics"]}
                if not vals:
                    continue
                v = list(vals.values())
                cell = {"seeds": list(vals), "values": v, "mean": statistics.fmean(v),
                        "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                if model != base and base in row["models"]:
                    b = row["models"][base]
                    common = [s for s in vals if s in b["seeds"]]
                    cell["vs_baseline"] = paired_test([vals[s] for s in common],
                                                      [b["values"][b["seeds"].index(s)] for s in common])
                    outcomes = [(runs[s].get("per_sample", {}).get(key), per_model[base][s].get("per_sample", {})
                                 .get(key)) for s in common]
                    if outcomes and all(x is not None and y is not None for x, y in outcomes):
                        cell["vs_baseline"]["bootstrap"] = paired_bootstrap([x for x, _ in outcomes],
                                                                            [y for _, y in outcomes])
                row["models"][model] = cell
            rows.append(row)
    return rows


def markdown(study: dict, rows: list[dict], calls: list[dict] | None = None) -> str:
    """The study's table in Markdown: per model mean ± std over seeds, and for each model against the baseline the
    mean paired difference with its 95 % t-interval over seeds (the headline: ``*`` where it excludes 0) and ``‡``
    where the paired bootstrap over the evaluation samples excludes 0 (the secondary, evaluation-noise test); then
    the driver's recorded calls (``environment.json``: command, wall time, machine, package versions)."""
    models, base = labels(study), study["baseline"]
    head = ["evaluation", "metric", *models]
    lines = [f"Study `{study['name']}`: mean ± std over seeds {study['seeds']}, in %. In brackets, Δ vs {base}: the "
             "mean paired difference over seeds and its 95 % t-interval over seeds (training noise: where a new set "
             "of seeds would put the mean difference); * where that interval excludes 0 (paired t-test p < 0.05). "
             "‡ (secondary) where the 95 % interval of a paired bootstrap over the evaluation samples excludes 0: "
             "it measures only the evaluation sets' sampling noise for these particular trained models, not "
             "whether the difference would reappear with other seeds or on another machine.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["eval"], r["metric"]]
        for m in models:
            c = r["models"].get(m)
            if c is None:
                cells.append("")
                continue
            text = f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}"
            t = c.get("vs_baseline")
            if t and t["n"]:
                star = "*" if t["p_value"] is not None and t["p_value"] < 0.05 else ""
                boot = t.get("bootstrap")
                star += "‡" if boot and (boot["ci_low"] > 0 or boot["ci_high"] < 0) else ""
                ci = (f" [{100 * t['ci_low']:+.2f}, {100 * t['ci_high']:+.2f}]" if t.get("ci_low") is not None
                      else "")
                text += f" (Δ {100 * t['delta']:+.2f}{ci}{star})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Values in % (metrics are fractions in the result files).")
    if calls:
        from diffclip.runtime import describe_environment

        lines.append("")
        for c in calls:
            lines.append(f"Made by `{c['command']}` ({c['jobs_run']} jobs, {c['wall_time_s'] / 60:.1f} min): "
                         f"{describe_environment(c['environment'])}.")
    else:
        lines += ["", "Machine and package versions: not recorded (no environment.json beside the results)."]
    return "\n".join(lines)


def finetune_rows(study: dict, jobs: list[dict]) -> list[dict]:
    """Per model of a finetune study, from its runs' ``results.json``: parameters, top-1 per seed and its mean and
    std (n-1), top-5 and best top-1 means, mean wall and CPU time per run, and the model's ``reference``."""
    rows = []
    for m in study["models"]:
        rs = [json.loads(Path(j["output"]).read_text()) for j in jobs
              if j["kind"] == "finetune" and j["label"] == m["label"] and Path(j["output"]).is_file()]
        if not rs:
            continue
        model = m["args"].get("model") or study["train"]["model"]
        acc1 = [r["acc1"] for r in rs]
        rows.append({
            "label": m["label"], "attn": m["attn"] or ("diff" if "diff" in model.lower() else "standard"),
            "twin": m["twin"], "model": model, "params": rs[0]["params"], "seeds": [r["seed"] for r in rs],
            "acc1": acc1, "acc1_mean": statistics.fmean(acc1), "acc1_std": statistics.stdev(acc1) if len(rs) > 1 else 0.0,
            "acc5_mean": statistics.fmean(r["acc5"] for r in rs),
            "best_acc1_mean": statistics.fmean(r["best_acc1"] for r in rs), "epochs": rs[0]["epochs"],
            "time_mean": statistics.fmean(r["wall_time"] for r in rs),
            "cpu_time_mean": statistics.fmean(r["cpu_time"] for r in rs) if all(r.get("cpu_time") for r in rs) else None,
            "reference": m["reference"]})
    return rows


def finetune_markdown(rows: list[dict]) -> str:
    """The finetune table: one row per model, top-1 mean ± std over seeds beside the ``reference`` column (when a
    model has one) and the per-seed values, in %."""
    if not rows:
        return "(no finished runs)"
    has_ref = any(r["reference"] is not None for r in rows)
    head = ["model", "attention", "twin", "params", "top-1 % (mean ± std)", *(["reference"] if has_ref else []),
            "top-5 %", "per seed", "epochs", "time / run", "CPU time / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = [f"{r['reference']:.2f}" if r["reference"] is not None else ""] if has_ref else []
        cells = [r["label"], r["attn"], r["twin"], f"{r['params']:,}",
                 f"{100 * r['acc1_mean']:.2f} ± {100 * r['acc1_std']:.2f}", *ref, f"{100 * r['acc5_mean']:.2f}",
                 " / ".join(f"{100 * a:.2f}" for a in r["acc1"]), str(r["epochs"]), f"{r['time_mean'] / 60:.1f} min",
                 f"{r['cpu_time_mean'] / 60:.1f} min" if r["cpu_time_mean"] else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(study: dict, jobs: list[dict], run_info: dict | None = None) -> dict:
    """Writes the summary of a study from its result files (atomically) and returns it: ``table.json`` /
    ``table.md`` for a finetune study, ``study.json`` / ``study.md`` and the paper's report (``report/``, two or
    more models with results) otherwise. ``run_info`` (``wall_time`` in s, ``jobs``, ``failures``, ``command``) is
    that of the driver's call; None for a summary rebuilt from the files alone."""
    out = Path(study["output"])
    if study["program"] == "finetune":
        return _write_table(study, jobs, run_info)
    found = collect(jobs)
    rows = summarise(study, found)
    env_file = out / "environment.json"
    calls = json.loads(env_file.read_text()) if env_file.is_file() else []
    summary = {"study": study["name"], "models": labels(study), "baseline": study["baseline"],
               "seeds": study["seeds"], "rows": rows, "wall_time_s": run_info and run_info["wall_time"],
               "calls": calls, "markdown": markdown(study, rows, calls)}
    per_model = {m: [(seed, rec) for runs in found.values() for seed, rec in runs.get(m, {}).items()]
                 for m in labels(study)}
    if sum(bool(v) for v in per_model.values()) > 1:  # the paper's tables and figures, mean ± std over seeds
        from diffclip.eval.report import write_report

        write_report({m: v for m, v in per_model.items() if v}, out / "report", data=study.get("data", study["name"]))
        summary["report"] = str(out / "report")
    write_json(out / "study.json", summary)
    write_text(out / "study.md", summary["markdown"] + "\n")
    return summary


def _write_table(study: dict, jobs: list[dict], run_info: dict | None) -> dict:
    out = Path(study["output"])
    rows = finetune_rows(study, jobs)
    runs = [j for j in jobs if j["kind"] == "finetune"]
    reused = sum(j["status"] == "done" for j in runs)
    text = finetune_markdown(rows)
    summary = {"study": study["name"], "seeds": study["seeds"], "rows": rows}
    if run_info:
        text += (f"\n\nWall time of this call: {run_info['wall_time'] / 60:.1f} min ({len(runs) - reused} runs trained, "
                 f"{run_info['jobs']} in parallel; {reused} finished runs reused). Per-run wall and CPU time are in "
                 "the table.")
        summary.update(command=run_info["command"], wall_time=run_info["wall_time"], jobs=run_info["jobs"],
                       runs_trained=len(runs) - reused, runs_reused=reused, failures=run_info["failures"])
    summary["markdown"] = text
    write_json(out / "table.json", summary)
    write_text(out / "table.md", text + "\n")
    return summary
