"""The ablation study in one command: every model x seed of a study file trained (torchrun training/main.py),
evaluated with the evaluation programs, and summarised with mean ± std over seeds and, for each difference to the
baseline, a paired test over seeds.

    python training/study.py studies/emoji_clipart.json            # or: make study
    python training/study.py studies/emoji_clipart.json --dry-run  # the plan: what is done, resumed, new
    python training/study.py studies/emoji_clipart.json --report-only   # tables from the result files alone

A study file (JSON) holds::

    {"name": "emoji_clipart", "output": "study_out/emoji_clipart",
     "shards": [{"name": "noto", "args": {"source": "noto-emoji", "input": "data/sources/...", ...}}],
     "models": ["CLIP-Tiny-64", "DiffCLIP-Tiny-64"], "baseline": "CLIP-Tiny-64", "seeds": [0, 1, 2],
     "nproc": 1, "train": {"train-data": "{out}/shards/noto", "epochs": 3, ...},   # training/main.py flags
     "eval": [{"name": "zs_twitter", "program": "zeroshot", "args": {"dataset": "emoji-twitter", ...},
               "metrics": ["acc1"]}]}                                           # diffclip-eval programs' flags

``{out}`` in any value is the study's output folder; other relative paths are taken from the current folder. Layout of the output: ``shards/<name>`` (make_shards.py; kept
when its ``sizes.json`` exists), ``runs/<model>-seed<k>`` (a training run folder; a run with ``final_model/`` is
finished and skipped, one without is continued with ``--resume latest``), ``results/<model>/seed<k>/<eval>.json``
(CLIP_benchmark records; an existing one is not recomputed), ``logs/`` (each job's output) and ``study.json`` /
``study.md`` (the summary). A rerun after an interruption therefore redoes only what was not finished.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from diffclip.cli import ArgumentParser, UsageError, positive_int, run, setup_logging
from diffclip.errors import RunError

log = logging.getLogger("diffclip.study")
ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("name", "models", "seeds", "train", "eval")


def _fill(value, out: Path):
    if isinstance(value, str):
        return value.replace("{out}", str(out))
    if isinstance(value, list):
        return [_fill(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, out) for k, v in value.items()}
    return value


def load_study(path: str | os.PathLike, output: str | None = None) -> dict:
    """Reads and checks a study file; ``{out}`` placeholders are filled with the output folder.

    Raises:
        UsageError: a missing or unparsable file, a missing key, a baseline not among the models, duplicate names.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"study file {path}: no such file")
    try:
        study = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"study file {path}: not JSON (line {e.lineno}: {e.msg})") from None
    missing = [k for k in REQUIRED if not isinstance(study, dict) or k not in study]
    if missing:
        raise UsageError(f"study file {path}: missing {', '.join(missing)}")
    if not study["models"] or not study["seeds"]:
        raise UsageError(f"study file {path}: 'models' and 'seeds' must not be empty")
    if len(set(study["models"])) != len(study["models"]):
        raise UsageError(f"study file {path}: a model is listed twice")
    study.setdefault("baseline", study["models"][0])
    if study["baseline"] not in study["models"]:
        raise UsageError(f"study file {path}: baseline {study['baseline']!r} is not one of the models")
    names = [e.get("name") for e in study["eval"]]
    if any(not n or "program" not in e for n, e in zip(names, study["eval"])) or len(set(names)) != len(names):
        raise UsageError(f"study file {path}: every eval entry needs a unique 'name' and a 'program'")
    out = Path(output or study.get("output") or f"study_out/{study['name']}").absolute()
    study = _fill(study, out)
    study["output"] = str(out)
    return study


def to_flags(args: dict) -> list[str]:
    """``{"batch-size": 64, "no-progress": True}`` -> ``["--batch-size", "64", "--no-progress"]`` (False: left out,
    a list: several values)."""
    flags = []
    for key, value in args.items():
        if value is False or value is None:
            continue
        flags.append(f"--{key}")
        if value is not True:
            flags += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return flags


def run_name(model: str, seed: int) -> str:
    return f"{model}-seed{seed}"


def plan(study: dict) -> list[dict]:
    """The jobs of a study in order: shards, then per model x seed a training job followed by its evaluations.
    Each job: ``kind``, ``name``, ``argv``, ``status`` (``done``, ``resume`` or ``new``), ``needs`` (a job name),
    ``output`` (what exists when it is done)."""
    out = Path(study["output"])
    jobs = []
    for s in study.get("shards", []):
        dest = out / "shards" / s["name"]
        argv = [sys.executable, str(ROOT / "training" / "make_shards.py"),
                *to_flags({**s["args"], "output": str(dest), "no-progress": True})]
        jobs.append({"kind": "shards", "name": f"shards/{s['name']}", "argv": argv, "needs": None,
                     "output": dest / "sizes.json", "status": "done" if (dest / "sizes.json").is_file() else "new"})
    shard_jobs = [j["name"] for j in jobs]
    nproc = int(study.get("nproc", 1))
    for model in study["models"]:
        for seed in study["seeds"]:
            name = run_name(model, seed)
            run_dir = out / "runs" / name
            final = run_dir / "final_model" / "model.safetensors"
            status = "done" if final.is_file() else "resume" if run_dir.is_dir() else "new"
            flags = to_flags({**study["train"], "model": model, "seed": seed, "logs-dir": str(out / "runs"),
                              "name": name})
            if status == "resume":
                flags += ["--resume", "latest"]
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    str(ROOT / "training" / "main.py"), *flags]
            jobs.append({"kind": "train", "name": name, "argv": argv, "needs": shard_jobs, "output": final,
                         "status": status, "model": model, "seed": seed, "nproc": nproc})
            for e in study["eval"]:
                dest = out / "results" / model / f"seed{seed}" / f"{e['name']}.json"
                args = {**e.get("args", {}), "model": model, "pretrained": str(run_dir / "final_model"),
                        "output": str(dest), "no-progress": True}
                argv = [sys.executable, "-m", "diffclip.eval", e["program"], *to_flags(args)]
                jobs.append({"kind": "eval", "name": f"{name}/{e['name']}", "argv": argv, "needs": [name],
                             "output": dest, "status": "done" if dest.is_file() else "new", "model": model,
                             "seed": seed})
    return jobs


def _execute(job: dict, log_dir: Path, threads: int) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / (job["name"].replace("/", "__") + ".log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(job['argv'])}\n")
        f.flush()
        rc = subprocess.call(job["argv"], stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0 or not Path(job["output"]).exists():
        lines = [ln for ln in log_file.read_text().splitlines() if ln.strip()]
        raise RunError(f"{job['name']} failed (exit {rc}): {lines[-1] if lines else '(no output)'}; "
                           f"see {log_file}")


def execute(study: dict, jobs: list[dict], n_jobs: int = 1, progress: bool = True) -> list[str]:
    """Runs the jobs not done: shards first, then each model x seed (training, then its evaluations) with
    ``n_jobs`` of them at once. Returns the failures (one line each); a failed training skips its evaluations."""
    from tqdm import tqdm

    out = Path(study["output"])
    todo = [j for j in jobs if j["status"] != "done"]
    threads = max(1, (os.cpu_count() or 1) // max(1, n_jobs * int(study.get("nproc", 1))))
    failures: list[str] = []
    bar = tqdm(total=len(todo), desc=study["name"], unit="job", disable=not progress, file=sys.stderr)
    for job in [j for j in todo if j["kind"] == "shards"]:
        _execute(job, out / "logs", os.cpu_count() or 1)
        bar.update(1)

    def chain(name: str) -> None:
        for job in [j for j in todo if j["name"] == name or (j["kind"] == "eval" and j["needs"] == [name])]:
            try:
                t0 = time.time()
                _execute(job, out / "logs", threads)
                log.info("%s: done in %.1f min", job["name"], (time.time() - t0) / 60)
            except RuntimeError as e:
                failures.append(str(e))
                log.error("%s", e)
                if job["kind"] == "train":
                    bar.update(sum(1 for j in todo if j["needs"] == [name]) + 1)
                    return
            bar.update(1)

    names = list(dict.fromkeys(j["name"] if j["kind"] == "train" else j["needs"][0]
                               for j in todo if j["kind"] != "shards"))
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        list(pool.map(chain, names))
    bar.close()
    return failures


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train and evaluate every model x seed of a study file, then summarise it.")
    p.add_argument("study", help="study file (JSON), e.g. studies/emoji_clipart.json")
    p.add_argument("--output", default=None, help="output folder (default: the study's 'output')")
    p.add_argument("--jobs", type=positive_int, default=1, help="model x seed chains run at once")
    p.add_argument("--dry-run", action="store_true", help="print the plan (status and command of every job)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the summary from the result files")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    study = load_study(args.study, args.output)
    jobs = plan(study)
    if args.dry_run:
        for j in jobs:
            print(f"[{j['status']:>6}] {j['kind']:<6} {j['name']}: {' '.join(j['argv'])}")
        return 0
    from diffclip.training.study_report import write_summary

    failures = []
    t0 = time.time()
    if not args.report_only:
        todo = sum(j["status"] != "done" for j in jobs)
        log.info("study %s: %d jobs, %d to run, %d in parallel -> %s", study["name"], len(jobs), todo, args.jobs,
                 study["output"])
        failures = execute(study, jobs, args.jobs, progress=not args.no_progress)
    summary = write_summary(study, wall_time=time.time() - t0 if not args.report_only else None)
    print(summary["markdown"])
    if failures:
        raise RunError(f"{len(failures)} job(s) failed; first: {failures[0]}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
