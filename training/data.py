"""Webdataset input pipeline for contrastive training: shards in the img2dataset layout -> (images, texts) batches.

Shards hold samples ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` (caption), other files ignored (img2dataset's
``KEY.json``). The sample counts are read from beside the shards, local or remote (:func:`get_dataset_size`): a
``sizes.json`` (shard basename -> count; ``training/make_shards.py`` writes it), img2dataset's
``NNNNN_stats.json`` of each shard, or a ``__len__`` file. The pipeline is built from webdataset's pieces::

    shard list (seeded per epoch, split by rank, then by DataLoader worker; or weighted resampling)
    -> wds.tarfile_to_samples (corrupt tar: skipped, logged, counted)
    -> sample check (image + caption; a shard with none fails fast, naming the keys it has)
    -> wds.shuffle (buffer seeded by seed, epoch, rank and worker)
    -> decode image (PIL RGB) and caption (UTF-8), transform, tokenise (augmentation seeded per sample; a sample
       that fails any of these: skipped, counted, logged a few times) -> skip to the resume position
    -> a fixed number of whole batches' samples per worker -> wds.batched -> the caller's RNG states restored

Determinism and resume: for a given seed and epoch, every rank sees a fixed sequence of batches whatever the
timing. Each DataLoader worker plays a fixed *role* (which shards it reads, which batches of the rank's sequence
it produces: batch ``g`` comes from role ``g % workers``), and the global torch and Python RNGs are re-seeded by
(seed, epoch, rank, role, position) for each sample's random crop (the caller's states are restored after each
batch when the loader runs in the caller's process), so augmentation depends neither on timing nor on the
caller's RNG. ``skip_batches=k`` rotates the roles so that the loader's first batch is batch ``k``, and each
role drops its share of the first ``k`` batches' usable samples (they are still decoded and transformed, so a
sample skipped for any reason shifts nothing), which makes the batches after a mid-epoch resume identical to those
of the uninterrupted run.

Equal work on every rank: a training epoch is ``num_samples // (batch_size * world_size)`` batches on every rank
(split over the workers); a rank whose shards run out reads them again (next pass, reshuffled), so no rank can
stop early and leave DDP waiting. Shards that yield no usable sample at all raise an error instead of looping:
after a whole round of shards (a pass, or 10 x shards + 100 resampled draws) without one.
"""

from __future__ import annotations

import ast
import functools
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, NamedTuple

import braceexpand
import torch
import webdataset as wds
from diffclip.training.remote import register_gopen_schemes
from PIL import Image
from torch.utils.data import get_worker_info

from diffclip.errors import InputError, RunError
from diffclip.images import IMAGE_EXTENSIONS
from diffclip.runtime import stable_seed as _seed

register_gopen_schemes()  # s3:// shards through fsspec (webdataset reads http(s)://, pipe:, gs:// itself)

__all__ = ["IMAGE_EXTENSIONS", "CAPTION_EXTENSION", "expand_urls", "get_dataset_size", "SkipStats", "DataInfo",
           "get_wds_loader"]

log = logging.getLogger(__name__)

CAPTION_EXTENSION = "txt"
_WANTED = frozenset((*IMAGE_EXTENSIONS, CAPTION_EXTENSION))
_STAT_FIELDS = ("shards_failed", "samples_incomplete", "samples_undecodable")


# --------------------------------------------------------------------------------------------------------- shards
def _expand_source(source: str) -> list[str]:
    if os.path.isdir(source):  # a folder of shards: its *.tar files
        shards = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".tar"))
        if not shards:
            raise InputError(f"no .tar shards in folder {source}")
        return shards
    return list(braceexpand.braceexpand(source))


def expand_urls(spec: str, weights: str | None = None) -> tuple[list[str], list[float]]:
    """Expands a ``--train-data`` spec into shard URLs, with one sampling weight per shard.

    ``::`` joins sources; each source is brace-expanded (``shards/{00000..00041}.tar``), or is a folder (its
    ``*.tar``). ``weights`` is the ``--train-data-upsampling-factors`` spec, one factor per source joined with
    ``::`` (default 1 each); every shard of a source gets its source's factor (used with resampling).

    Raises:
        ValueError: an empty spec, a folder without shards, or a number of weights that does not match.
    """
    sources = [s.strip() for s in (spec.split("::") if isinstance(spec, str) else list(spec))]
    if not sources or not all(sources):
        raise InputError(f"empty source in data spec {spec!r}")
    if weights is None:
        factors = [1.0] * len(sources)
    else:
        parts = str(weights).split("::")
        if len(parts) != len(sources):
            raise InputError(f"{len(parts)} upsampling factor(s) {weights!r} for {len(sources)} source(s) in {spec!r}")
        try:
            factors = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"upsampling factors must be numbers: {weights!r}") from None
        if any(f < 0 or not math.isfinite(f) for f in factors) or not any(factors):
            raise InputError(f"upsampling factors must be finite, >= 0 and not all 0: {weights!r}")
    urls: list[str] = []
    url_weights: list[float] = []
    for source, factor in zip(sources, factors):
        expanded = _expand_source(source)
        urls += expanded
        url_weights += [factor] * len(expanded)
    return urls, url_weights


def _read_text(path: str) -> str | None:
    """The text of a local or remote file: ``http(s)://`` with urllib, other schemes (``s3://``, ``gs://``...)
    through fsspec; None when the file does not exist (HTTP 404/410). ``pipe:`` URLs have no folder to look in:
    None.

    Raises:
        OSError: the file exists but cannot be read, the server cannot be reached or answers with another error.
        diffclip.errors.InputError: a scheme that needs fsspec (or its backend, e.g. s3fs) when it is not installed.
    """
    if path.startswith("pipe:"):
        return None
    if "://" not in path:
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()
    if path.split("://", 1)[0].lower() in ("http", "https"):
        try:
            with urllib.request.urlopen(path, timeout=60) as response:
                return response.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                return None
            raise OSError(f"cannot read {path}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError) as e:
            raise OSError(f"cannot read {path}: {getattr(e, 'reason', e)}") from None
    try:
        import fsspec

        with fsspec.open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except ImportError as e:  # fsspec, or the backend of the scheme (s3fs, gcsfs...)
        raise InputError(f"reading {path} needs fsspec and its backend for this scheme: {e}") from None


def _parse_counts(path: str, text: str) -> dict:
    """A ``sizes.json`` (shard basename -> sample count). Raises ValueError naming the file and line when it is not
    a JSON object of counts."""
    try:
        table = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not JSON ({e.msg}); expected {{shard name: sample count}}") from None
    if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
        raise InputError(f"{path}: expected a JSON object {{shard name: sample count}}")
    return table


def _parse_stats(path: str, text: str) -> int:
    """The ``successes`` of an img2dataset ``<shard>_stats.json`` (the samples its tar holds)."""
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not JSON ({e.msg}); expected img2dataset's shard statistics") from None
    if not isinstance(stats, dict) or not isinstance(stats.get("successes"), int):
        raise InputError(f"{path}: expected img2dataset's shard statistics, a JSON object with an integer "
                         f"'successes'")
    return stats["successes"]


def _stats_name(shard: str) -> str:
    """img2dataset's statistics file of a shard: ``00012.tar`` -> ``00012_stats.json``."""
    return (shard[:-len(".tar")] if shard.endswith(".tar") else os.path.splitext(shard)[0]) + "_stats.json"


def _folder_counts(folder: str, names: list[str], strict: bool = True) -> list[int] | None:
    """The sample count of each shard ``names`` of ``folder`` (local or remote): from ``sizes.json``, else from
    each shard's img2dataset ``<shard>_stats.json``; None when the folder has neither (or, not ``strict``, when
    a shard is missing from them).

    Raises:
        ValueError: (``strict``) a shard missing from the ``sizes.json`` or without the ``_stats.json`` its
            neighbours have; a malformed file.
        OSError: a remote file that cannot be fetched.
    """
    sizes_path = os.path.join(folder, "sizes.json")
    text = _read_text(sizes_path)
    if text is not None:
        table = _parse_counts(sizes_path, text)
        missing = [n for n in names if n not in table]
        if missing and strict:
            raise InputError(f"shard {missing[0]} is not listed in {sizes_path} ({len(missing)} missing); "
                             f"pass --train-num-samples")
        return None if missing else [int(table[n]) for n in names]
    counts = []
    for name in names:
        stats_path = os.path.join(folder, _stats_name(name))
        text = _read_text(stats_path)
        if text is None:
            if counts and strict:
                raise InputError(f"shard {name} has no {stats_path} beside it, as the shards before it have "
                                 f"(did img2dataset finish it?); pass --train-num-samples")
            return None
        counts.append(_parse_stats(stats_path, text))
    return counts


def _by_folder(urls: list[str]) -> dict[str, list[str]]:
    folders: dict[str, list[str]] = {}
    for url in urls:
        folder, name = os.path.split(url)
        folders.setdefault(folder, []).append(name)
    return folders


def _shard_sizes(urls: list[str]) -> list[int] | None:
    """Per-shard sample counts (``sizes.json`` or img2dataset's ``_stats.json`` beside each shard), in the order
    of ``urls``; None when any is unknown."""
    known: dict[str, int] = {}
    for folder, names in _by_folder(urls).items():
        counts = _folder_counts(folder, names, strict=False)
        if counts is None:
            return None
        known.update({os.path.join(folder, n): c for n, c in zip(names, counts)})
    return [known[url] for url in urls]


def get_dataset_size(urls: list[str]) -> tuple[int, int]:
    """``(num_samples, num_shards)`` of shards, local or remote (``http(s)://``; ``s3://`` and other fsspec
    schemes when fsspec and the scheme's backend are installed). The counts are read from beside the shards:
    ``sizes.json`` (shard basename -> count, as ``training/make_shards.py`` writes), else img2dataset's
    ``<shard>_stats.json`` of each shard (its ``successes``: the samples the tar holds), else a ``__len__`` file
    (the sample count of the whole folder, open_clip's convention).

    Raises:
        ValueError: the count of some shard is unknown (give ``--train-num-samples`` then), a malformed file.
        OSError: a remote file that exists but cannot be fetched (server down, HTTP 403/500...).
    """
    total = 0
    for folder, names in _by_folder(urls).items():
        counts = _folder_counts(folder, names)
        if counts is not None:
            total += sum(counts)
            continue
        len_path = os.path.join(folder, "__len__")
        text = _read_text(len_path)
        if text is None:
            raise InputError(f"cannot tell how many samples {os.path.join(folder, names[0])} holds: no sizes.json, "
                             f"{_stats_name(names[0])} (img2dataset) or __len__ in {folder or '.'}; "
                             f"pass --train-num-samples")
        try:
            total += int(ast.literal_eval(text.strip()))
        except (ValueError, SyntaxError, TypeError):
            raise InputError(f"{len_path}: expected a number of samples, found {text.strip()[:40]!r}") from None
    return total, len(urls)


def _check_local_shards(urls: list[str]) -> None:
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                     if len(missing) > 1 else ""))


# ---------------------------------------------------------------------------------------------------------- stats
class SkipStats:
    """What the pipeline skipped, counted across the DataLoader's worker processes (shared memory).

    Fields: ``shards_failed`` (a tar that could not be opened or read to its end: the samples after the damage
    are lost; counted once per read), ``samples_incomplete`` (no image or no caption), ``samples_undecodable``
    (the image does not decode, the caption is not UTF-8, or the transform failed). Counts are for this process's
    loader (one rank); sum them over ranks if needed. :meth:`reset` at the start of an epoch to get per-epoch
    counts.
    """

    def __init__(self):
        self._counts = multiprocessing.Array("q", len(_STAT_FIELDS))

    def add(self, name: str, n: int = 1) -> None:
        i = _STAT_FIELDS.index(name)
        with self._counts.get_lock():
            self._counts[i] += n

    def reset(self) -> None:
        with self._counts.get_lock():
            for i in range(len(_STAT_FIELDS)):
                self._counts[i] = 0

    def as_dict(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(_STAT_FIELDS, self._counts[:]))

    shards_failed = property(lambda self: self.as_dict()["shards_failed"])
    samples_incomplete = property(lambda self: self.as_dict()["samples_incomplete"])
    samples_undecodable = property(lambda self: self.as_dict()["samples_undecodable"])

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def __repr__(self) -> str:
        return f"SkipStats({', '.join(f'{k}={v}' for k, v in self.as_dict().items())})"


class _SharedEpoch:
    """Epoch and resume position, shared with the worker processes and read when an iteration starts."""

    def __init__(self, epoch: int = 0, skip_batches: int = 0):
        self._value = multiprocessing.Array("q", [epoch, skip_batches])

    def set(self, epoch: int, skip_batches: int = 0) -> None:
        with self._value.get_lock():
            self._value[0], self._value[1] = epoch, skip_batches

    def get(self) -> tuple[int, int]:
        with self._value.get_lock():
            return self._value[0], self._value[1]


class _Sample(NamedTuple):
    """A sample that has an image and a caption, still encoded (the shuffle buffer holds these)."""

    key: str
    url: str
    pass_index: int  # the pass over the shards (sequential training); the shuffle restarts with each
    round_index: int  # the stretch of shards within which some sample must be usable (see _starved)
    image: bytes
    caption: bytes


@dataclass
class _Role:
    epoch: int
    rank: int
    role: int  # the worker role (shard subset and batch residue) this worker plays in this iteration
    batches_done: int  # batches of this role that come before the resume position
    batches_total: int  # batches of this role in the epoch (train)


class _Plan:
    """Everything the stages need, picklable (sent once to each worker process)."""

    def __init__(self, *, urls, weights, resampled, is_train, seed, batch_size, rank, world_size, num_workers,
                 num_batches, shuffle_buffer, preprocess, tokenizer, stats, shared):
        self.urls, self.weights, self.resampled, self.is_train = urls, weights, resampled, is_train
        self.seed, self.batch_size, self.rank, self.world_size = seed, batch_size, rank, world_size
        self.num_workers, self.num_batches, self.shuffle_buffer = num_workers, num_batches, shuffle_buffer
        self.preprocess, self.tokenizer, self.stats, self.shared = preprocess, tokenizer, stats, shared
        self._warned: dict[str, int] = {}  # skip warnings per kind, in this process

    def role(self) -> _Role:
        epoch, skip = self.shared.get() if self.is_train else (0, 0)
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RunError(f"pipeline built for {self.num_workers} workers runs in {info.num_workers}")
        w = self.num_workers
        role = (worker + skip) % w
        done = skip // w + (1 if role < skip % w else 0)
        total = self.num_batches // w + (1 if role < self.num_batches % w else 0)
        return _Role(epoch, self.rank, role, done, total)

    def warn_skip(self, kind: str, message: str) -> None:
        """Logs a skip warning of ``kind`` (``"sample"``, ``"shard"``) the first 5 times in this process, then at
        the 10th, 100th, 1000th... time: data with many bad samples gives a few lines, not one per sample (every
        skip is counted in :attr:`stats`)."""
        n = self._warned[kind] = self._warned.get(kind, 0) + 1
        if n == 5:
            log.warning("%s (further %s skips of this process are logged at the 10th, 100th, 1000th... and counted)",
                        message, kind)
        elif n < 5 or n == 10 ** (len(str(n)) - 1):
            log.warning("%s%s", message, f" (the {n}th {kind} skipped by this process)" if n > 5 else "")

    def skip_sample(self, where: str, reason: str) -> str:
        """Counts (``samples_undecodable``) and logs (rate-limited) a sample that is skipped; returns
        ``"WHERE: REASON"`` for error messages."""
        self.stats.add("samples_undecodable")
        example = f"{where}: {reason[:200]}"
        self.warn_skip("sample", f"skipping {example}")
        return example


# --------------------------------------------------------------------------------------------------------- stages
# The flow: a source names the shards of this worker (``{"url", "pass_index", "round_index"}``), _ReadShards reads
# each with webdataset's tar reader and yields the samples that have an image and a caption, _Shuffle, _Prepare
# (decode image and caption, augment, tokenise, skip to the resume position), _Budget, batching. Each stage keeps
# its own state. A training source never ends, so a dataset with nothing usable would hang: _ReadShards raises after
# a whole round of shards (a pass, or 10 x shards + 100 resampled draws) without a sample that has an image and a
# caption, _Prepare after a round without a usable one (image decoded, caption UTF-8, transformed and tokenised).

def _patience(plan: _Plan) -> int:
    """Resampled shard draws per round: a round without one usable sample is an error."""
    return 10 * len(plan.urls) + 100


def _starved(plan: _Plan, what: str, example: str, warned: bool = True) -> RunError:
    r = plan.role()
    where = (f"the last {_patience(plan)} shards drawn by rank {plan.rank} worker {r.role}" if plan.resampled else
             f"a whole pass over the shards of rank {plan.rank} worker {r.role}")
    return RunError(f"no {what} in {where} (e.g. {example})" + ("; see the warnings above" if warned else ""))


def _shard_source(plan: _Plan):
    """Shard URLs for one worker: the list shuffled per epoch and pass (same order on every rank), then split by
    rank and by worker role; repeated (reshuffled) while training, until the batch budget stops the stream."""
    r = plan.role()
    for passes in itertools.count():
        order = list(plan.urls)
        if plan.is_train:
            random.Random(_seed(plan.seed, r.epoch, "shards", passes)).shuffle(order)
        mine = order[plan.rank::plan.world_size][r.role::plan.num_workers]
        if not mine:
            if plan.is_train:
                raise InputError(f"rank {plan.rank} worker {r.role} got no shard: {len(plan.urls)} shard(s) for "
                                 f"{plan.world_size} rank(s) x {plan.num_workers} worker(s)")
            return
        for url in mine:
            yield {"url": url, "pass_index": passes, "round_index": passes}
        if not plan.is_train:
            return


def _resampled_source(plan: _Plan):
    """Shard URLs drawn with replacement (weights: the upsampling factors), seeded by seed, epoch, rank, role."""
    r = plan.role()
    rng = random.Random(_seed(plan.seed, r.epoch, "resampled", plan.rank, r.role))
    for draw in itertools.count():
        yield {"url": rng.choices(plan.urls, weights=plan.weights)[0], "pass_index": 0,
               "round_index": draw // _patience(plan)}


class _ReadShards(wds.PipelineStage):
    """Reads each shard of the source (``wds.tarfile_to_samples``, image and caption files only) and yields the
    samples with an image and a caption as :class:`_Sample` records (key, URL, pass, encoded image and caption).

    Skipped and counted: samples without an image or a caption (``samples_incomplete``), the rest of a shard that
    fails to read (``shards_failed``, logged). Errors: a shard that has files but no usable sample at all (a dataset
    of another layout: the message lists the keys found); a whole round of shards without one usable sample
    (training would never end)."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def run(self, src):
        round_index, found, last_url = 0, 0, None
        for shard in src:
            if shard["round_index"] != round_index:
                if not found:
                    raise _starved(self.plan, "readable sample", last_url, warned=self.plan.stats.shards_failed > 0)
                round_index, found = shard["round_index"], 0
            for sample in self._read(shard["url"], shard["pass_index"], round_index):
                found += 1
                yield sample
            last_url = shard["url"]

    def _read(self, url: str, pass_index: int, round_index: int):
        stats, keys, failed = self.plan.stats, set(), []

        def select(fname: str) -> bool:  # note every extension (for the error message), read images and captions
            name = fname.rsplit("/", 1)[-1]
            ext = name.split(".", 1)[1].lower() if "." in name else ""
            keys.add(ext)
            return ext in _WANTED

        def on_error(exn: Exception) -> bool:  # skip the rest of the shard, once
            if not failed:
                failed.append(exn)
                stats.add("shards_failed")
                self.plan.warn_skip("shard", f"skipping the rest of shard {url}: {type(exn).__name__}: "
                                             f"{str(exn).split(' @ ')[0][:200]}")
            return True

        good = 0
        for sample in wds.tarfile_to_samples(handler=on_error, select_files=select)(iter([{"url": url}])):
            image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
            if image_key is None or CAPTION_EXTENSION not in sample:
                stats.add("samples_incomplete")
                continue
            good += 1
            yield _Sample(sample["__key__"], sample["__url__"], pass_index, round_index, sample[image_key],
                          sample[CAPTION_EXTENSION])
        if keys and not good and not failed:
            raise InputError(f"no sample in shard {url} has both an image ({'/'.join(IMAGE_EXTENSIONS)}) and "
                             f"a caption ({CAPTION_EXTENSION}); keys found: {', '.join(sorted(keys))}")


class _Shuffle(wds.PipelineStage):
    """wds.shuffle with a generator seeded by (seed, epoch, rank, worker role), restarted at each pass over the
    shards so that an epoch sees every sample of the rank's shards once before it sees any twice."""

    def __init__(self, plan: _Plan, initial: int):
        self.plan, self.initial = plan, initial

    def run(self, src):
        r = self.plan.role()
        rng = random.Random(_seed(self.plan.seed, r.epoch, "samples", r.rank, r.role))
        shuffle = wds.shuffle(self.plan.shuffle_buffer, min(self.initial, self.plan.shuffle_buffer), rng=rng)
        for _, one_pass in itertools.groupby(src, key=lambda sample: sample.pass_index):
            yield from shuffle(one_pass)


class _Prepare(wds.PipelineStage):
    """Makes each sample usable or skips it (logged, counted): decodes the image and the caption (UTF-8), transforms
    and tokenises with the global torch and Python RNGs seeded per sample (see :class:`_KeepCallerRng` for the
    caller's streams), then drops this role's samples before the resume position. Positions count usable samples,
    and the samples before the resume position go through every step too, so a sample skipped for any reason
    shifts nothing on resume."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def run(self, src):
        plan = self.plan
        r = plan.role()
        to_skip = r.batches_done * plan.batch_size if plan.is_train else 0
        base = _seed(plan.seed, r.epoch, "augment", r.rank, r.role)
        position = 0  # usable samples so far in this role's sequence
        round_index, usable, decoded = 0, 0, 0  # the newest round seen (the shuffle may mix neighbouring ones)
        last_failed = None
        for sample in src:
            if sample.round_index > round_index:
                if not usable:
                    raise _starved(plan, "usable sample" if decoded else "decodable image", last_failed)
                round_index, usable, decoded = sample.round_index, 0, 0
            where = f"{sample.key} in {sample.url}"
            try:
                image = _decode_image(sample.image)
            except Exception as exn:
                last_failed = plan.skip_sample(where, f"image does not decode: {type(exn).__name__}: {exn}")
                continue
            decoded += 1
            try:
                caption = sample.caption.decode("utf-8").strip()
            except UnicodeDecodeError as exn:
                last_failed = plan.skip_sample(where, f"caption is not UTF-8 (byte {exn.object[exn.start]:#04x} at "
                                                        f"{exn.start})")
                continue
            try:
                if plan.is_train:
                    sample_seed = _seed(base, position)
                    torch.random.default_generator.manual_seed(sample_seed)  # CPU only: transforms run there
                    random.seed(sample_seed)
                image = plan.preprocess(image)
                tokens = plan.tokenizer([caption])[0]
            except Exception as exn:
                last_failed = plan.skip_sample(where, f"transform failed: {type(exn).__name__}: {exn}")
                continue
            usable += 1
            position += 1
            if position > to_skip:
                yield image, tokens


class _KeepCallerRng(wds.PipelineStage):
    """In the caller's process (``workers=0``) the per-sample seeding of :class:`_Prepare` would replace the
    training loop's global torch and Python RNG streams: their states are saved before each batch is made and
    restored after (once per batch; the caller's code only runs between batches). Worker processes' global RNGs
    serve the pipeline alone, so there it passes batches through."""

    def run(self, src):
        if get_worker_info() is not None:
            yield from src
            return
        generator, it = torch.random.default_generator, iter(src)
        while True:
            torch_state, py_state = generator.get_state(), random.getstate()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                generator.set_state(torch_state)
                random.setstate(py_state)
            yield batch


class _Budget(wds.PipelineStage):
    """The fixed number of samples (whole batches) this worker role produces in a training epoch, after the resume
    position. It stops the stream before ``wds.batched``, which would otherwise pull one sample past the last
    batch (and with it a whole shuffle buffer of the next pass) before yielding that batch."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def run(self, src):
        r = self.plan.role()
        remaining = (r.batches_total - r.batches_done) * self.plan.batch_size
        if remaining <= 0:
            return
        for i, sample in enumerate(src):
            yield sample
            if i + 1 >= remaining:
                return


def _decode_image(data: bytes) -> Image.Image:
    """Encoded image -> PIL RGB image, decoded in full (so a broken file fails here), as ``wds.decode("pil")``
    does but with one conversion instead of two."""
    with io.BytesIO(data) as stream:
        image = Image.open(stream)
        image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _collate(samples):
    images, texts = zip(*samples)
    return torch.stack(images), torch.stack(texts)


# ----------------------------------------------------------------------------------------------------- the loader
@dataclass
class DataInfo:
    """The loader and its epoch size. ``num_batches`` batches per epoch on every rank (train);
    ``stats`` counts what was skipped (see :class:`SkipStats`)."""

    dataloader: Any
    num_samples: int
    num_batches: int
    stats: SkipStats
    shared_epoch: _SharedEpoch | None = None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch (and the batch to start at) for the next iteration of ``dataloader``."""
        if not 0 <= skip_batches < max(self.num_batches, 1):
            raise InputError(f"skip_batches={skip_batches} outside the epoch's {self.num_batches} batches")
        if self.shared_epoch is None:
            raise InputError("set_epoch needs a training loader")
        self.shared_epoch.set(epoch, skip_batches)


def get_wds_loader(urls, preprocess, tokenizer, *, batch_size: int, num_samples: int | None = None,
                   resampled: bool = False, upsampling_factors=None, is_train: bool = True, epoch: int = 0,
                   seed: int = 0, workers: int = 1, world_size: int = 1, rank: int = 0, skip_batches: int = 0,
                   shuffle_buffer: int = 1000, pin_memory: bool = False, persistent_workers: bool | None = None,
                   prefetch_factor: int = 2) -> DataInfo:
    """A webdataset loader of ``(images float (B, 3, H, W), texts long (B, context))`` batches.

    Args:
        urls: shard URLs (a list, e.g. from :func:`expand_urls`) or a spec string for :func:`expand_urls`.
        preprocess: the image transform (PIL RGB image -> tensor), e.g. ``create_model_and_transforms(...)[1]``.
        tokenizer: list of n strings -> LongTensor (n, context), e.g. ``diffclip.get_tokenizer(name)``.
        batch_size: per rank.
        num_samples: samples per epoch over all ranks; None: from the files beside the shards (:func:`get_dataset_size`).
        resampled: draw shards with replacement (weights: ``upsampling_factors``, one per URL or a ``::`` spec).
        is_train: shuffling, a fixed number of full batches per epoch and per-sample seeded augmentation; else one
            ordered pass over the shards (split by rank and worker) with a partial last batch.
        epoch, skip_batches: the epoch to produce and the batch to start at (exact mid-epoch resume); later
            epochs are selected with :meth:`DataInfo.set_epoch`.
        seed: the seed of shard order, shuffle buffer and augmentation (with the epoch).
        workers: DataLoader worker processes (0: in this process).
        world_size, rank: the data-parallel split (every rank gets the same number of batches).

    Raises:
        ValueError: unknown dataset size, too few samples or shards for the split, bad arguments.
        FileNotFoundError: a local shard that does not exist.
        diffclip.errors.RunError (a RuntimeError), while iterating: a round of shards without one usable sample
            (a training set of which nothing decodes would otherwise never end).
    """
    if isinstance(urls, str):
        urls, spec_weights = expand_urls(urls, upsampling_factors if isinstance(upsampling_factors, str) else None)
    else:
        urls, spec_weights = list(urls), None
    if not urls:
        raise InputError("no shards given")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or workers < 0:
        raise InputError(f"bad split: batch_size={batch_size}, world_size={world_size}, rank={rank}, workers={workers}")
    _check_local_shards(urls)
    if upsampling_factors is None or isinstance(upsampling_factors, str):
        weights = spec_weights or [1.0] * len(urls)
    else:
        weights = [float(w) for w in upsampling_factors]
        if len(weights) != len(urls):
            raise InputError(f"{len(weights)} upsampling factors for {len(urls)} shards")
    if upsampling_factors is not None and not resampled:
        raise InputError("upsampling factors need resampled shards (--dataset-resampled)")
    if num_samples is None:
        num_samples, _ = get_dataset_size(urls)
    num_workers = max(1, workers)
    if is_train:
        num_batches = num_samples // (batch_size * world_size)
        if num_batches < 1:
            raise InputError(f"{num_samples} samples make no full batch of {batch_size} x {world_size} rank(s)")
        if not resampled and len(urls) < world_size * num_workers:
            raise InputError(f"{len(urls)} shard(s) cannot be split over {world_size} rank(s) x {num_workers} "
                             f"worker(s): write more shards, use fewer workers, or resample (--dataset-resampled)")
        if not 0 <= skip_batches < num_batches:
            raise InputError(f"skip_batches={skip_batches} outside the epoch's {num_batches} batches")
    else:
        if resampled or skip_batches:
            raise InputError("evaluation loaders are neither resampled nor resumed")
        sizes = _shard_sizes(urls)
        if sizes is not None:  # exact: each worker's partial last batch
            mine = list(range(len(urls)))[rank::world_size]
            num_batches = sum(math.ceil(sum(sizes[i] for i in mine[w::num_workers]) / batch_size)
                              for w in range(num_workers))
        else:
            num_batches = math.ceil(num_samples / (batch_size * world_size))
    stats, shared = SkipStats(), _SharedEpoch(epoch, skip_batches)
    plan = _Plan(urls=urls, weights=weights, resampled=resampled, is_train=is_train, seed=seed,
                 batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                 num_batches=num_batches, shuffle_buffer=shuffle_buffer, preprocess=preprocess,
                 tokenizer=tokenizer, stats=stats, shared=shared)
    stages = [
        functools.partial(_resampled_source if resampled else _shard_source, plan),
        _ReadShards(plan),
    ]
    if is_train:
        stages.append(_Shuffle(plan, initial=max(1, shuffle_buffer // 4)))
    stages += [
        _Prepare(plan),
    ]
    if is_train:
        stages.append(_Budget(plan))
    stages += [wds.batched(batch_size, collation_fn=_collate, partial=not is_train), _KeepCallerRng()]
    pipeline = wds.DataPipeline(*stages)
    if persistent_workers is None:
        persistent_workers = workers > 0
    loader_kw = dict(prefetch_factor=prefetch_factor) if workers > 0 else {}
    dataloader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                               persistent_workers=persistent_workers and workers > 0, pin_memory=pin_memory,
                               **loader_kw)
    return DataInfo(dataloader=dataloader, num_samples=num_samples, num_batches=num_batches, stats=stats,
                    shared_epoch=shared if is_train else None)
