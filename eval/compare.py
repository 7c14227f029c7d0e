"""Run an experiment config's models over several seeds with ``eval/finetune.py`` and tabulate them:
parameters, top-1 mean ± std, time — each DiffViT beside its standard-ViT twins.

Example::

    python eval/compare.py eval/configs/fashion_mnist_40k.json --output runs/fmnist --jobs 2

A config (JSON, or YAML when PyYAML is installed) holds::

    {"name": "...", "description": "...", "seeds": [0, 1, 2],
     "common": {"dataset": "fashion_mnist", "data-root": "...", "epochs": 10, ...},   # finetune.py flags
     "models": [{"label": "DiffViT", "attn": "diff", "reference": 87.26,
                 "args": {"model": "diff_vit_nano_patch4_28", "embed-dim": 32, ...}}, ...]}

Every model runs once per seed in ``OUTPUT/<label>/seed<k>`` (stdout and stderr in ``run.log``); a run whose
``results.json`` exists is not repeated, one with a ``last.pt`` is resumed. The table goes to stdout,
``OUTPUT/table.md`` and ``OUTPUT/table.json``.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from diffclip.cli import ArgumentParser, UsageError, positive_int, run
from diffclip.errors import RunError
from diffclip.files import write_json, write_text

__all__ = ["load_config", "plan_runs", "to_flags", "summarise", "markdown_table", "main"]

FINETUNE = Path(__file__).resolve().parent / "finetune.py"


def load_config(path: str) -> dict:
    """Reads and checks an experiment config (JSON, or YAML with PyYAML)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            cfg = yaml.safe_load(text)
        else:
            cfg = json.loads(text)
    except Exception as e:
        raise UsageError(f"{path}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("models"), list) or not cfg["models"]:
        raise UsageError(f"{path}: needs a non-empty 'models' list")
    labels = []
    for i, m in enumerate(cfg["models"]):
        if not isinstance(m, dict) or "label" not in m or "model" not in m.get("args", {}):
            raise UsageError(f"{path}: models[{i}] needs a 'label' and args.model")
        labels.append(m["label"])
    if len(set(labels)) != len(labels):
        raise UsageError(f"{path}: model labels must be unique, got {labels}")
    cfg.setdefault("seeds", [0])
    cfg.setdefault("common", {})
    return cfg


def to_flags(args: dict) -> list[str]:
    """{"embed-dim": 32, "resume": True, "scale": [0.8, 1]} -> ["--embed-dim", "32", "--resume", "--scale", ...]."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def plan_runs(cfg: dict, output: str, seeds: list[int], overrides: dict) -> list[dict]:
    """One entry per (model, seed): label, seed, run folder and the finetune.py argument list."""
    runs = []
    for m in cfg["models"]:
        for seed in seeds:
            out = Path(output) / _slug(m["label"]) / f"seed{seed}"
            args = {**cfg["common"], **m["args"], **overrides, "seed": seed, "output": str(out), "no-progress": True}
            runs.append({"label": m["label"], "seed": seed, "output": out, "argv": to_flags(args)})
    return runs


def _execute(run: dict, python: str) -> dict:
    out: Path = run["output"]
    if (out / "results.json").is_file():
        return {**json.loads((out / "results.json").read_text()), "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    argv = [python, str(FINETUNE), *run["argv"]]
    if (out / "last.pt").is_file():
        argv.append("--resume")
    with open(out / "run.log", "a") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0 or not (out / "results.json").is_file():
        tail = (out / "run.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RunError(f"{run['label']} seed {run['seed']} failed (exit {rc}): {tail[0]}; see {out / 'run.log'}")
    return json.loads((out / "results.json").read_text())


def summarise(cfg: dict, results: dict[str, list[dict]]) -> list[dict]:
    """Per model: parameters, top-1/top-5 mean and std over seeds, mean time per run, the seed's reference."""
    rows = []
    for m in cfg["models"]:
        rs = results.get(m["label"], [])
        if not rs:
            continue
        acc1 = [r["acc1"] for r in rs]
        rows.append({
            "label": m["label"], "attn": m.get("attn", "diff" if "diff" in m["args"]["model"] else "standard"),
            "twin": m.get("twin", ""), "model": m["args"]["model"], "params": rs[0]["params"], "seeds": [r["seed"] for r in rs],
            "acc1": acc1, "acc1_mean": statistics.fmean(acc1), "acc1_std": statistics.stdev(acc1) if len(acc1) > 1 else 0.0,
            "acc5_mean": statistics.fmean(r["acc5"] for r in rs), "best_acc1_mean": statistics.fmean(r["best_acc1"] for r in rs),
            "time_mean": statistics.fmean(r["wall_time"] for r in rs), "epochs": rs[0]["epochs"],
            "cpu_time_mean": statistics.fmean(r["cpu_time"] for r in rs) if all(r.get("cpu_time") for r in rs) else None,
            "reference": m.get("reference"),
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    has_ref = any(r["reference"] is not None for r in rows)
    head = ["model", "attention", "twin", "params", "top-1 % (mean ± std)", "top-5 %", "per seed", "epochs", "time / run",
            "CPU time / run"]
    if has_ref:
        head.insert(5, "seed project")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["attn"], r["twin"] or "", f"{r['params']:,}",
                 f"{100 * r['acc1_mean']:.2f} ± {100 * r['acc1_std']:.2f}", f"{100 * r['acc5_mean']:.2f}",
                 " / ".join(f"{100 * a:.2f}" for a in r["acc1"]), str(r["epochs"]),
                 f"{r['time_mean'] / 60:.1f} min",
                 f"{r['cpu_time_mean'] / 60:.1f} min" if r.get("cpu_time_mean") else "n/a"]
        if has_ref:
            cells.insert(5, f"{r['reference']:.2f}" if r["reference"] is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().lstrip("-")] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description="Run a config's DiffViT / ViT models over seeds and tabulate them.")
    p.add_argument("config", help="eval/configs/<experiment>.json")
    p.add_argument("--output", required=True, help="folder for the runs and the table")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the config's seeds")
    p.add_argument("--models", nargs="+", default=None, help="only these labels")
    p.add_argument("--data-root", default=None, help="override the config's data root")
    p.add_argument("--epochs", type=positive_int, default=None, help="override the config's epochs")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override any finetune.py flag")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs in parallel (each with --threads from the config)")
    p.add_argument("--dry-run", action="store_true", help="print the finetune.py commands only")
    args = p.parse_args(argv)
    t0 = time.time()
    cfg = load_config(args.config)
    if args.models:
        unknown = set(args.models) - {m["label"] for m in cfg["models"]}
        if unknown:
            raise UsageError(f"--models: unknown labels {sorted(unknown)}; the config has "
                             f"{[m['label'] for m in cfg['models']]}")
        cfg["models"] = [m for m in cfg["models"] if m["label"] in args.models]
    overrides = _parse_set(args.set)
    if args.data_root:
        overrides["data-root"] = args.data_root
    if args.epochs:
        overrides["epochs"] = args.epochs
    runs = plan_runs(cfg, args.output, args.seeds or cfg["seeds"], overrides)
    if args.dry_run:
        for r in runs:
            print(" ".join([sys.executable, str(FINETUNE), *r["argv"]]))
        return 0

    from tqdm import tqdm

    results: dict[str, list[dict]] = {}
    failures = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool, tqdm(total=len(runs), desc=cfg.get("name", "runs")) as bar:
        futures = [(r, pool.submit(_execute, r, sys.executable)) for r in runs]
        for r, fut in futures:
            try:
                res = fut.result()
                results.setdefault(r["label"], []).append(res)
                tqdm.write(f"{r['label']} seed {r['seed']}: acc1 {100 * res['acc1']:.2f} % ({res['wall_time'] / 60:.1f} min)")
            except RuntimeError as e:
                failures.append(str(e))
                tqdm.write(f"FAILED {e}")
            bar.update(1)

    rows = summarise(cfg, results)
    wall = time.time() - t0
    table = markdown_table(rows) if rows else "(no finished runs)"
    Path(args.output).mkdir(parents=True, exist_ok=True)
    cmd = "python eval/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    reused = sum(r.get("reused", False) for rs in results.values() for r in rs)
    timing = (f"Wall time of this compare.py call: {wall / 60:.1f} min ({len(runs) - reused} runs trained, {args.jobs} "
              f"in parallel; {reused} finished runs reused). Per-run wall and CPU time are in the table.")
    write_text(Path(args.output) / "table.md", f"{table}\n\n{timing}\n")
    write_json(Path(args.output) / "table.json",
               {"config": cfg.get("name", Path(args.config).stem), "command": cmd, "wall_time": wall, "jobs": args.jobs,
                "runs_trained": len(runs) - reused, "runs_reused": reused, "rows": rows, "failures": failures})
    print(table)
    print(f"\n{timing}\nTable in {Path(args.output) / 'table.md'}")
    if failures:
        print(f"compare.py: error: {len(failures)} run(s) failed; first: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
