"""The sweep driver: every model x seed of a study file trained (``torchrun training/main.py`` or
``training/finetune.py``), evaluated with the evaluation programs, and summarised over seeds.

    python training/study.py studies/emoji_clipart.json            # or: make study
    python training/study.py studies/emoji_clipart.json --dry-run  # the plan: what is done, resumed, new
    python training/study.py studies/emoji_clipart.json --report-only   # the summary from the result files alone
    python training/study.py studies/fashion_mnist_40k.json --seeds 0 --jobs 1

A study file (JSON) holds::

    {"name": "emoji_clipart",                     # required; also the default output folder study_out/<name>
     "description": "...", "output": "study_out/emoji_clipart", "data": "what the models saw, for titles",
     "program": "main",                           # "main" (torchrun training/main.py, the default) or "finetune"
     "models": ["CLIP-Tiny-64", "DiffCLIP-Tiny-64"],      # or {"label": ..., "args": {flags}, "attn": ...,
                                                          #     "twin": ..., "reference": top-1 %}
     "baseline": "CLIP-Tiny-64", "seeds": [0, 1, 2],      # required: models, seeds
     "nproc": 1,                                  # processes per training run (main)
     "shards": [{"name": "noto", "args": {"source": "noto-emoji", ...}}],     # make_shards.py flags
     "train": {"train-data": "{out}/shards/noto", "epochs": 3, ...},          # the training program's flags
     "eval": [{"name": "zs_twitter", "program": "zeroshot", "args": {"dataset": "emoji-twitter", ...},
               "metrics": ["acc1"]}]}                                         # diffclip-eval programs (main only)

A model given as a string is ``{"label": name, "args": {"model": name}}``; a model's ``args`` override ``train``.
Flags are written as in a shell without the dashes (``"batch-size": 64``; ``_`` is read as ``-``); ``true`` is a
bare flag, ``false`` and ``null`` leave it out, a list gives several values. ``{out}`` in any value is the study's
output folder; other relative paths are taken from the current folder. The whole file, each job's flags included
(parsed by the job's own program), model names, evaluation programs and datasets, is checked before any job runs
(``--dry-run`` too). A failed job is reported by its own error line (the last ``prog: error: ...`` line of its
log, else its last exception line), not by torchrun's summary.

Layout of the output: ``shards/<name>`` (kept when its ``sizes.json`` exists), ``runs/<label>-seed<k>`` (a run
folder; a run with ``final_model/`` (main) or ``results.json`` (finetune) is finished and skipped, one with
checkpoints is continued with ``--resume``), ``results/<label>/seed<k>/<eval>.json`` (CLIP_benchmark records; an
existing one is not recomputed), ``logs/`` (each job's output), and the summary: ``study.json`` / ``study.md`` and
``report/`` for trainer studies, ``table.json`` / ``table.md`` for finetune studies
(:mod:`diffclip.training.study_report`). A rerun after an interruption therefore redoes only what was not finished.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from diffclip.cli import ArgumentParser, UsageError, positive_int, run, setup_logging
from diffclip.errors import DiffclipError, RunError
from diffclip.files import write_json
from diffclip.runtime import environment

log = logging.getLogger("diffclip.study")
ROOT = Path(__file__).resolve().parents[1]
FLAG_VALUE = (str, int, float, bool, type(None))
#: key -> (type(s), required) of a study file and of its entries
STUDY_KEYS = {"name": (str, True), "description": (str, False), "output": (str, False), "data": (str, False),
              "program": (str, False), "models": (list, True), "baseline": (str, False), "seeds": (list, True),
              "nproc": (int, False), "shards": (list, False), "train": (dict, False), "eval": (list, False)}
MODEL_KEYS = {"label": (str, True), "args": (dict, False), "attn": (str, False), "twin": (str, False),
              "reference": ((int, float, type(None)), False)}
SHARD_KEYS = {"name": (str, True), "args": (dict, True)}
EVAL_KEYS = {"name": (str, True), "program": (str, True), "args": (dict, False), "metrics": (list, False)}
#: the training programs: study "program" -> the script and the module whose parse_args / build_parser reads its flags
TRAINERS = {"main": ("main.py", "diffclip.training.params"), "finetune": ("finetune.py", "diffclip.training.finetune")}


def _check_keys(obj, spec: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(spec))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(spec)}")
    for key, (kind, required) in spec.items():
        if key not in obj:
            if required:
                raise UsageError(f"{where}: missing {key!r}")
        elif not isinstance(obj[key], kind) or (isinstance(obj[key], bool) and bool not in _kinds(kind)):
            raise UsageError(f"{where}: {key!r} must be {_type_name(kind)}, got {json.dumps(obj[key])}")


def _kinds(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
             type(None): "null"}
    return " or ".join(names[k] for k in _kinds(kind))


def _check_flags(args: dict, where: str) -> None:
    for key, value in args.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, FLAG_VALUE) and not isinstance(v, list) for v in values):
            raise UsageError(f"{where}: flag {key!r} must be a string, number, true/false, null or a list of them, "
                             f"got {json.dumps(value)}")


def _fill(value, out: Path):
    if isinstance(value, str):
        return value.replace("{out}", str(out))
    if isinstance(value, list):
        return [_fill(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, out) for k, v in value.items()}
    return value


def slug(label: str) -> str:
    """A label as a folder name: ``"DiffCLIP-B/16 tower (CC12M)"`` -> ``"DiffCLIP-B_16_tower_CC12M"``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def load_study(path: str | os.PathLike, output: str | None = None) -> dict:
    """Reads and checks a study file (the schema in this module's docstring). Models come back as
    ``{"label", "args", "attn", "twin", "reference"}``; ``{out}`` placeholders are filled with the output folder.

    Raises:
        UsageError: a missing or unparsable file, an unknown key, a value of the wrong type, a missing key, a
            baseline that is not a model, duplicate labels or evaluation names, an unknown model, evaluation
            program or evaluation dataset (one line naming the file)
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"study file {path}: no such file")
    try:
        study = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"study file {path}: not JSON (line {e.lineno}: {e.msg})") from None
    where = f"study file {path}"
    _check_keys(study, STUDY_KEYS, where)
    program = study.setdefault("program", "main")
    if program not in TRAINERS:
        raise UsageError(f"{where}: 'program' must be one of {', '.join(TRAINERS)}, got {program!r}")
    if not study["models"] or not study["seeds"]:
        raise UsageError(f"{where}: 'models' and 'seeds' must not be empty")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in study["seeds"]):
        raise UsageError(f"{where}: 'seeds' must be a list of integers, got {json.dumps(study['seeds'])}")
    if study.setdefault("nproc", 1) < 1:
        raise UsageError(f"{where}: 'nproc' must be >= 1, got {study['nproc']}")
    _check_flags(study.setdefault("train", {}), f"{where}: train")
    models = []
    for i, m in enumerate(study["models"]):
        m = {"label": m, "args": {"model": m}} if isinstance(m, str) else m
        _check_keys(m, MODEL_KEYS, f"{where}: models[{i}]")
        m = {"args": {}, "attn": None, "twin": "", "reference": None, **m}
        _check_flags(m["args"], f"{where}: models[{i}].args")
        if "model" not in m["args"] and "model" not in study["train"]:
            raise UsageError(f"{where}: models[{i}] ({m['label']}) names no model: give args.model or train.model")
        models.append(m)
    labels = [m["label"] for m in models]
    if len({slug(x) for x in labels}) != len(labels) or not all(map(slug, labels)):
        raise UsageError(f"{where}: a model label is listed twice (or two labels make the same folder name)")
    study["models"] = models
    study.setdefault("baseline", labels[0])
    if study["baseline"] not in labels:
        raise UsageError(f"{where}: baseline {study['baseline']!r} is not one of the models")
    for key, spec in (("shards", SHARD_KEYS), ("eval", EVAL_KEYS)):
        for i, entry in enumerate(study.setdefault(key, [])):
            _check_keys(entry, spec, f"{where}: {key}[{i}]")
            _check_flags(entry.get("args", {}), f"{where}: {key}[{i}].args")
            if not all(isinstance(x, str) for x in entry.get("metrics", [])):
                raise UsageError(f"{where}: {key}[{i}]: 'metrics' must be a list of metric names, got "
                                 f"{json.dumps(entry['metrics'])}")
        names = [e["name"] for e in study[key]]
        if len(set(names)) != len(names):
            raise UsageError(f"{where}: two {key} entries are named alike")
    if study["eval"] and program != "main":
        raise UsageError(f"{where}: 'eval' evaluates CLIP models trained by training/main.py; a {program} study "
                         "reports its runs' results.json")
    out = Path(output or study.get("output") or f"study_out/{study['name']}").absolute()
    study = _fill(study, out)
    study["output"] = str(out)
    _check_names(study, where)
    return study


def _check_names(study: dict, where: str) -> None:
    """The names a job's parser takes as plain strings, checked before any job runs: every model (a diffclip
    config name, ``hf-hub:...`` or a ``save_pretrained`` folder; for finetune also a timm model), every evaluation
    program (those of ``diffclip-eval``) and the datasets of zeroshot, retrieval and linear_probe."""
    import timm
    from diffclip.eval import readers
    from diffclip.eval.__main__ import PROGRAMS

    import diffclip
    from diffclip.classifier import is_diffclip_name

    for i, m in enumerate(study["models"]):
        name = str({**study["train"], **m["args"]}["model"])
        if name.startswith("hf-hub:") or (study["program"] == "finetune" and timm.is_model(name)):
            continue
        try:
            diffclip.get_model_config(name)
        except DiffclipError as e:
            raise UsageError(f"{where}: models[{i}] ({m['label']}): {e}"
                             + (" or a timm model" if study["program"] == "finetune" else "")) from None
        if study["program"] == "finetune" and not is_diffclip_name(name):
            raise UsageError(f"{where}: models[{i}] ({m['label']}): finetune takes a diffclip config name or a timm "
                             f"model, not the folder {name}")
    tasks = {"zeroshot": "classification", "linear_probe": "classification", "retrieval": "retrieval"}
    for i, e in enumerate(study["eval"]):
        if e["program"] not in PROGRAMS:
            raise UsageError(f"{where}: eval[{i}] ({e['name']}): unknown program {e['program']!r}; expected one of "
                             f"{', '.join(PROGRAMS)}")
        names = e.get("args", {}).get("dataset")
        for name in (names if isinstance(names, list) else [names]) if e["program"] in tasks else []:
            if name is not None and name != "paper":
                try:
                    readers.dataset_spec(str(name), tasks[e["program"]])
                except DiffclipError as err:
                    raise UsageError(f"{where}: eval[{i}] ({e['name']}): {err}") from None


def select(study: dict, labels: list[str] | None = None, seeds: list[int] | None = None) -> dict:
    """The study restricted to some models (by label) and/or seeds; the baseline becomes the first model kept
    when it is not among them.

    Raises:
        UsageError: a label that is not a model of the study."""
    if labels:
        known = [m["label"] for m in study["models"]]
        unknown = [x for x in labels if x not in known]
        if unknown:
            raise UsageError(f"--models: unknown label(s) {unknown}; the study has {known}")
        study = {**study, "models": [m for m in study["models"] if m["label"] in labels]}
        if study["baseline"] not in labels:
            study["baseline"] = study["models"][0]["label"]
    if seeds:
        study = {**study, "seeds": list(dict.fromkeys(seeds))}
    return study


def to_flags(args: dict) -> list[str]:
    """``{"batch_size": 64, "no-progress": True, "scale": [0.8, 1]}`` ->
    ``["--batch-size", "64", "--no-progress", "--scale", "0.8", "1"]``: ``_`` in a name is ``-``, ``True`` a bare
    flag, ``False`` and ``None`` leave the flag out, a list or tuple gives several values."""
    flags = []
    for key, value in args.items():
        if value is False or value is None:
            continue
        flags.append("--" + key.replace("_", "-"))
        if value is not True:
            flags += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return flags


def run_name(label: str, seed: int) -> str:
    return f"{slug(label)}-seed{seed}"


def _train_job(study: dict, m: dict, seed: int, needs: list[str]) -> dict:
    out, name = Path(study["output"]), run_name(m["label"], seed)
    run_dir = out / "runs" / name
    script, parser = TRAINERS[study["program"]]
    args = {**study["train"], **m["args"], "seed": seed}
    if study["program"] == "main":
        done = run_dir / "final_model" / "model.safetensors"
        started, resume = run_dir.is_dir(), ["--resume", "latest"]
        flags = to_flags({**args, "logs-dir": str(out / "runs"), "name": name})
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                  str(study["nproc"]), str(ROOT / "training" / script)]
    else:
        done = run_dir / "results.json"
        started, resume = (run_dir / "checkpoints").is_dir() or (run_dir / "results.jsonl").is_file(), ["--resume"]
        flags = to_flags({**args, "output": str(run_dir), "no-progress": True})
        launch = [sys.executable, str(ROOT / "training" / script)]
    status = "done" if done.is_file() else "resume" if started else "new"
    flags += resume if status == "resume" else []
    return {"kind": study["program"], "name": name, "argv": [*launch, *flags], "flags": flags, "parser": parser,
            "needs": needs, "output": done, "status": status, "label": m["label"], "seed": seed, "run_dir": run_dir}


def plan(study: dict) -> list[dict]:
    """The jobs of a study in order: shards, then per model x seed a training job followed by its evaluations.
    Each job: ``kind`` (``shards``, ``main``, ``finetune``, ``eval``), ``name``, ``argv``, ``status`` (``done``,
    ``resume`` or ``new``), ``needs`` (job names), ``output`` (what exists when it is done), ``label`` and ``seed``
    (training and evaluation jobs), ``flags`` and ``parser`` (the module that reads the flags)."""
    out = Path(study["output"])
    jobs = []
    for s in study["shards"]:
        dest = out / "shards" / s["name"]
        flags = to_flags({**s["args"], "output": str(dest), "no-progress": True})
        jobs.append({"kind": "shards", "name": f"shards/{s['name']}", "needs": [], "output": dest / "sizes.json",
                     "argv": [sys.executable, str(ROOT / "training" / "make_shards.py"), *flags], "flags": flags,
                     "parser": "diffclip.training.make_shards",
                     "status": "done" if (dest / "sizes.json").is_file() else "new"})
    shard_jobs = [j["name"] for j in jobs]
    for m in study["models"]:
        for seed in study["seeds"]:
            train = _train_job(study, m, seed, shard_jobs)
            jobs.append(train)
            for e in study["eval"]:
                dest = out / "results" / slug(m["label"]) / f"seed{seed}" / f"{e['name']}.json"
                flags = to_flags({**e.get("args", {}), "model": {**study["train"], **m["args"]}["model"],
                                  "pretrained": str(train["run_dir"] / "final_model"), "output": str(dest),
                                  "no-progress": True})
                jobs.append({"kind": "eval", "name": f"{train['name']}/{e['name']}", "needs": [train["name"]],
                             "argv": [sys.executable, "-m", "diffclip.eval", e["program"], *flags], "flags": flags,
                             "parser": f"diffclip.eval.{e['program']}", "output": dest, "eval": e["name"],
                             "status": "done" if dest.is_file() else "new", "label": m["label"], "seed": seed})
    return jobs


def check_flags(jobs: list[dict]) -> None:
    """Parses every job's flags with its own program's parser (``parse_args``, else ``build_parser()``), so a
    misspelt flag or a bad value stops the study before any job runs. Programs with neither are not checked.

    Raises:
        UsageError: the first job whose flags its program refuses, with the program's one-line reason."""
    for job in jobs:
        module = importlib.import_module(job["parser"])
        parse = getattr(module, "parse_args", None)
        if parse is None and hasattr(module, "build_parser"):
            parse = module.build_parser().parse_args
        if parse is None:
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parse(job["flags"])
        except SystemExit:
            reason = [ln for ln in stderr.getvalue().splitlines() if ln.strip()][-1:] or ["refused"]
            raise UsageError(f"job {job['name']}: {reason[0].split('error: ', 1)[-1]}") from None
        except DiffclipError as e:
            raise UsageError(f"job {job['name']}: {e}") from None


def error_line(text: str) -> str:
    """The cause of a failed job, from its output: the last ``prog: error: ...`` line (a program's one-line
    error), else the last exception line (``SomethingError: ...``) other than torchrun's ``ChildFailedError``, else
    the last line that is not a separator (``====``, ``----``) or a field of torchrun's failure summary."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r"^\S+: error: ", r"^[\w.]*(Error|Exception|Interrupt)\b.*:"):
        found = [ln for ln in lines if re.match(pattern, ln) and "ChildFailedError" not in ln]
        if found:
            return found[-1]
    rest = [ln for ln in lines if not re.fullmatch(r"[=\-]+", ln)]
    return rest[-1] if rest else "(no output)"


def _execute(job: dict, log_dir: Path, threads: int) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / (job["name"].replace("/", "__") + ".log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(job['argv'])}\n")
        f.flush()
        start = f.tell()  # this attempt's output only: the log keeps earlier attempts
        rc = subprocess.call(job["argv"], stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0 or not Path(job["output"]).exists():
        with open(log_file, "rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
        cause = error_line(output) if rc != 0 else f"wrote no {job['output']}"
        raise RunError(f"{job['name']} failed (exit {rc}): {cause}; see {log_file}")


def execute(study: dict, jobs: list[dict], n_jobs: int = 1, progress: bool = True) -> list[str]:
    """Runs the jobs not done: shards first, then each model x seed (training, then its evaluations) with
    ``n_jobs`` of them at once. Returns the failures (one line each); a failed training skips its evaluations."""
    from tqdm import tqdm

    out = Path(study["output"])
    todo = [j for j in jobs if j["status"] != "done"]
    threads = max(1, (os.cpu_count() or 1) // max(1, n_jobs * study["nproc"]))
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
            except RunError as e:
                failures.append(str(e))
                log.error("%s", e)
                if job["kind"] != "eval":
                    bar.update(sum(1 for j in todo if j["needs"] == [name]) + 1)
                    return
            bar.update(1)

    names = list(dict.fromkeys(j["needs"][0] if j["kind"] == "eval" else j["name"]
                               for j in todo if j["kind"] != "shards"))
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        list(pool.map(chain, names))
    bar.close()
    return failures


def record_call(study: dict, run_info: dict, env: dict, jobs_run: int) -> None:
    """Appends this call of the driver to ``<output>/environment.json`` (a list, one entry per call that ran jobs or
    found the file missing): its command, wall time (s), jobs run, and :func:`diffclip.runtime.environment` taken
    at its start, so the summary can say on which machine and package versions its numbers were made."""
    path = Path(study["output"]) / "environment.json"
    calls = json.loads(path.read_text()) if path.is_file() else []
    if jobs_run or not calls:
        calls.append({"command": run_info["command"], "wall_time_s": round(run_info["wall_time"], 1),
                      "jobs_run": jobs_run, "failures": len(run_info["failures"]), "environment": env})
        write_json(path, calls)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train and evaluate every model x seed of a study file, then summarise it.")
    p.add_argument("study", help="study file (JSON), e.g. studies/emoji_clipart.json")
    p.add_argument("--output", default=None, help="output folder (default: the study's 'output')")
    p.add_argument("--models", nargs="+", default=None, metavar="LABEL", help="only these models of the study")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (default: the study's)")
    p.add_argument("--jobs", type=positive_int, default=1, help="model x seed chains run at once")
    p.add_argument("--dry-run", action="store_true", help="print the plan (status and command of every job)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the summary from the result files")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    study = select(load_study(args.study, args.output), args.models, args.seeds)
    jobs = plan(study)
    if args.dry_run:  # the plan, then whether every job's program takes its flags
        for j in jobs:
            print(f"[{j['status']:>6}] {j['kind']:<8} {j['name']}: {' '.join(j['argv'])}")
        check_flags(jobs)
        return 0
    if not args.report_only:
        check_flags(jobs)
    from diffclip.training.study_report import write_summary

    failures = []
    t0 = time.time()
    env, todo = environment(), 0
    if not args.report_only:
        todo = sum(j["status"] != "done" for j in jobs)
        log.info("study %s: %d jobs, %d to run, %d in parallel -> %s", study["name"], len(jobs), todo, args.jobs,
                 study["output"])
        failures = execute(study, jobs, args.jobs, progress=not args.no_progress)
    run_info = None if args.report_only else {"wall_time": time.time() - t0, "jobs": args.jobs, "failures": failures,
                                               "command": " ".join(["python training/study.py", *(sys.argv[1:] if argv is None else argv)])}
    if run_info:
        record_call(study, run_info, env, todo)
    summary = write_summary(study, jobs, run_info)
    print(summary["markdown"])
    if failures:
        raise RunError(f"{len(failures)} job(s) failed; first: {failures[0]}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
