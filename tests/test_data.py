"""training/data.py on real shards written by training/make_shards.py from scikit-image photos."""

import contextlib
import csv
import importlib.util
import io
import json
import random
import signal
import tarfile

import pytest
import skimage.data
import torch
import webdataset as wds
from diffclip.training import make_shards
from diffclip.training.data import DataInfo, SkipStats, expand_urls, get_dataset_size, get_wds_loader
from PIL import Image

import diffclip

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "cat"]
N_SHARDS, PER_SHARD = 4, 6
TOKENIZER = diffclip.get_tokenizer("DiffCLIP-Tiny-64")
_CFG = diffclip.get_model_config("DiffCLIP-Tiny-64")["preprocess_cfg"]
TRAIN_TF = diffclip.image_transform(_CFG, 32, is_train=True)
VAL_TF = diffclip.image_transform(_CFG, 32, is_train=False)


class LoaderHangs(BaseException):
    """Not an Exception: the loader's own ``except Exception`` (a sample it skips) cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails the test (LoaderHangs) instead of hanging."""
    def on_alarm(signum, frame):
        raise LoaderHangs(f"no answer within {seconds} s: the loader hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _write_photo_shards(folder, n_shards=N_SHARDS, per_shard=PER_SHARD):
    """n_shards x per_shard samples: crops of real photos, each with a unique caption."""
    img = folder / "img"
    img.mkdir(parents=True)
    rows = []
    for i in range(n_shards * per_shard):
        name = PHOTOS[i % len(PHOTOS)]
        photo = Image.fromarray(getattr(skimage.data, name)())
        w, h = photo.size
        left = (i // len(PHOTOS)) * w // 8
        photo.crop((left, 0, left + w // 2, h // 2)).resize((40, 40)).save(img / f"{i:03d}.jpg")
        rows.append((f"img/{i:03d}.jpg", f"crop number {i} of the {name} photo"))
    with open(folder / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), *rows])
    out = folder / "shards"
    make_shards.write_shards(make_shards.read_csv_source(folder / "captions.csv"), out, samples_per_shard=per_shard,
                             image_size=36, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _write_photo_shards(tmp_path_factory.mktemp("photos"))


def _urls(folder, n=N_SHARDS):
    return [str(folder / f"{i:05d}.tar") for i in range(n)]


CAPTIONS = [f"crop number {i} of the {PHOTOS[i % len(PHOTOS)]} photo" for i in range(N_SHARDS * PER_SHARD)]
_BY_TOKENS = {tuple(TOKENIZER([c])[0].tolist()): c for c in CAPTIONS}


def _captions(batches):
    """The caption of every sample, recovered from its tokens (captions are unique)."""
    return [_BY_TOKENS[tuple(row.tolist())] for _, texts in batches for row in texts]


def _loader(urls, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("workers", 0)
    return get_wds_loader(urls, kw.pop("preprocess", TRAIN_TF), TOKENIZER, **kw)


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_expand_urls_braces_sources_weights(shards):
    urls, weights = expand_urls("a/{00000..00002}.tar::b/x-{0..1}.tar")
    assert urls == ["a/00000.tar", "a/00001.tar", "a/00002.tar", "b/x-0.tar", "b/x-1.tar"] and weights == [1.0] * 5
    urls, weights = expand_urls("a/{0..1}.tar::b/{0..2}.tar", "2::0.5")
    assert weights == [2.0, 2.0, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="2 source"):
        expand_urls("a/{0..1}.tar::b.tar", "1::2::3")
    assert expand_urls(str(shards))[0] == _urls(shards)  # a folder: its shards


def test_get_dataset_size(shards, tmp_path):
    assert json.loads((shards / "sizes.json").read_text()) == {f"{i:05d}.tar": PER_SHARD for i in range(N_SHARDS)}
    assert get_dataset_size(_urls(shards)) == (N_SHARDS * PER_SHARD, N_SHARDS)
    assert get_dataset_size(_urls(shards)[1:3]) == (2 * PER_SHARD, 2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "__len__").write_text("1234\n")
    assert get_dataset_size([str(other / "0.tar"), str(other / "1.tar")]) == (1234, 2)
    with pytest.raises(ValueError, match="--train-num-samples"):
        get_dataset_size([str(tmp_path / "0.tar")])
    with pytest.raises(ValueError, match="not listed"):
        get_dataset_size([str(shards / "00009.tar")])



def _img2dataset_stats(folder, counts):
    """The ``NNNNN_stats.json`` img2dataset writes beside each shard (its fields, ``successes`` among them)."""
    for i, n in enumerate(counts):
        (folder / f"{i:05d}_stats.json").write_text(json.dumps(
            {"count": n + 1, "successes": n, "failed_to_download": 1, "failed_to_resize": 0,
             "status_dict": {"success": n, "HTTP Error 404: File not found": 1}}, indent=4))


def test_dataset_size_from_img2dataset_stats(shards, tmp_path):
    """Without sizes.json, each shard's img2dataset _stats.json gives its count; a shard without one (an unfinished
    shard) or a malformed file is an error naming the file."""
    folder = tmp_path / "i2d"
    folder.mkdir()
    for i in range(N_SHARDS):
        (folder / f"{i:05d}.tar").write_bytes((shards / f"{i:05d}.tar").read_bytes())
    _img2dataset_stats(folder, [PER_SHARD, PER_SHARD, PER_SHARD - 1])
    urls = _urls(folder)
    assert get_dataset_size(urls[:3]) == (3 * PER_SHARD - 1, 3)
    with pytest.raises(ValueError, match=r"00003.tar has no .*00003_stats.json.*--train-num-samples"):
        get_dataset_size(urls)
    info = _loader(urls[:3], is_train=False, preprocess=VAL_TF)  # exact per-worker batch counts, no count given
    assert info.num_samples == 3 * PER_SHARD - 1 and info.num_batches == len(list(info.dataloader)) == 5
    (folder / "00001_stats.json").write_text('{"count": 7}')
    with pytest.raises(ValueError, match="00001_stats.json: expected img2dataset's shard statistics"):
        get_dataset_size(urls[:3])
    (folder / "00000_stats.json").unlink()
    with pytest.raises(ValueError, match="no sizes.json, 00000_stats.json .img2dataset. or __len__"):
        get_dataset_size(urls[:3])


def test_remote_shards_counts_and_batches_over_http(shards, tmp_path):
    """Shards on a web server (loopback): sizes.json, img2dataset's _stats.json and __len__ are fetched from beside
    them, the loader reads the tars over HTTP; a folder with none of them or a server that is down fails in one
    line naming the URL."""
    from hf_server import FolderServer

    (tmp_path / "made").symlink_to(shards)  # make_shards' folder, with its sizes.json
    for name in ("i2d", "len", "plain"):
        (tmp_path / name).mkdir()
    for i in range(2):
        (tmp_path / "i2d" / f"{i:05d}.tar").write_bytes((shards / f"{i:05d}.tar").read_bytes())
    _img2dataset_stats(tmp_path / "i2d", [PER_SHARD, PER_SHARD])
    (tmp_path / "len" / "__len__").write_text("99\n")
    with FolderServer(tmp_path) as server:
        made = f"{server.url}/made/{{00000..00003}}.tar"
        assert get_dataset_size(expand_urls(made)[0]) == (N_SHARDS * PER_SHARD, N_SHARDS)
        assert get_dataset_size(expand_urls(f"{server.url}/i2d/{{00000..00001}}.tar")[0]) == (2 * PER_SHARD, 2)
        assert "/i2d/00001_stats.json" in server.requests
        assert get_dataset_size([f"{server.url}/len/0.tar"]) == (99, 1)
        with pytest.raises(ValueError, match="no sizes.json, 0_stats.json .img2dataset. or __len__ in http"):
            get_dataset_size([f"{server.url}/plain/0.tar"])
        info = _loader(made, is_train=False, preprocess=VAL_TF)  # no count given: sizes.json fetched
        with deadline(60):
            batches = list(info.dataloader)
        assert sorted(_captions(batches)) == sorted(CAPTIONS)
        assert "/made/sizes.json" in server.requests and "/made/00003.tar" in server.requests
        url = server.url
    with pytest.raises(OSError, match=f"cannot read {url}/x/sizes.json: .*[Cc]onnection refused"):
        get_dataset_size([f"{url}/x/00000.tar"])


def test_counts_from_other_stores_through_fsspec():
    """Schemes other than http(s) go through fsspec (its in-memory store here; s3:// the same way with s3fs)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/i2d/00000_stats.json", json.dumps({"count": 9, "successes": 7}).encode())
    fs.pipe("/bucket/i2d/00001_stats.json", json.dumps({"count": 9, "successes": 9}).encode())
    assert get_dataset_size(["memory://bucket/i2d/00000.tar", "memory://bucket/i2d/00001.tar"]) == (16, 2)
    with pytest.raises(ValueError, match="cannot tell how many samples memory://bucket/none/00000.tar holds"):
        get_dataset_size(["memory://bucket/none/00000.tar"])
    if importlib.util.find_spec("s3fs") is None:  # a scheme whose backend is not installed: one line naming it
        with pytest.raises(ValueError, match="reading s3://bucket/x/sizes.json needs fsspec and its backend"):
            get_dataset_size(["s3://bucket/x/00000.tar"])

def test_batches_are_images_and_tokens(shards):
    info = _loader(_urls(shards), batch_size=5, seed=1)
    assert isinstance(info, DataInfo) and isinstance(info.stats, SkipStats)
    assert (info.num_samples, info.num_batches) == (24, 4)
    batches = list(info.dataloader)
    assert len(batches) == 4
    images, texts = batches[0]
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert texts.shape == (5, 32) and texts.dtype == torch.long and (texts[:, 0] == 49406).all()
    captions = _captions(batches)
    assert len(set(captions)) == 20 and all(c.startswith("crop number") for c in captions)
    assert info.stats.total == 0
    # evaluation: one ordered pass, every sample once, a partial last batch
    val = _loader(_urls(shards), batch_size=5, is_train=False, preprocess=VAL_TF)
    val_batches = list(val.dataloader)
    assert sorted(_captions(val_batches)) == sorted(CAPTIONS)
    assert val.num_batches == len(val_batches) == 5  # one stream of 24 samples: 4 batches of 5 and one of 4
    val2 = _loader(_urls(shards), batch_size=5, is_train=False, preprocess=VAL_TF, workers=2)
    val2_batches = list(val2.dataloader)
    assert sorted(_captions(val2_batches)) == sorted(CAPTIONS)
    assert val2.num_batches == len(val2_batches) == 6  # two workers of 12 samples: 2 x (5, 5, 2)


def test_two_ranks_see_disjoint_samples_and_equal_batch_counts(shards):
    seen = []
    for rank in (0, 1):
        info = _loader(_urls(shards), batch_size=3, world_size=2, rank=rank, seed=5, epoch=2)
        batches = list(info.dataloader)
        assert info.num_batches == len(batches) == 4  # 24 // (3 * 2)
        seen.append(_captions(batches))
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 24


def test_epochs_are_deterministic_and_differ(shards):
    a = list(_loader(_urls(shards), seed=3, epoch=1).dataloader)
    b = list(_loader(_urls(shards), seed=3, epoch=1).dataloader)
    info = _loader(_urls(shards), seed=3, epoch=0)
    c = list(info.dataloader)
    info.set_epoch(1)
    d = list(info.dataloader)
    assert _same(a, b) and _same(a, d)
    assert _captions(a) != _captions(c)
    # the random crops neither depend on nor disturb the caller's global RNG streams, which the caller uses
    # between batches (dropout, sampling...) in the same process (the DataLoader itself draws its base seed
    # once, at the first batch)
    def first_batch():
        torch.manual_seed(123)
        random.seed(5)
        it = iter(_loader(_urls(shards), seed=3, epoch=1).dataloader)
        return it, next(it)

    first_batch()
    expected = [(torch.rand(2).tolist(), random.random()) for _ in range(len(a))]
    it, batch = first_batch()
    e, got = [batch], [(torch.rand(2).tolist(), random.random())]
    for batch in it:
        e.append(batch)
        got.append((torch.rand(2).tolist(), random.random()))
    assert got == expected and _same(a, e)


@pytest.mark.parametrize("workers,batch_size,skip", [(0, 4, 2), (2, 4, 3), (2, 7, 1)])
def test_skip_batches_gives_the_tail_of_the_epoch(shards, workers, batch_size, skip):
    kw = dict(batch_size=batch_size, workers=workers, seed=11, epoch=3)
    full = list(_loader(_urls(shards), **kw).dataloader)
    assert len(full) == 24 // batch_size
    resumed = list(_loader(_urls(shards), skip_batches=skip, **kw).dataloader)
    assert _same(full[skip:], resumed)  # same samples, same order, same random crops


def test_set_epoch_with_persistent_workers(shards):
    kw = dict(batch_size=4, workers=2, seed=4)
    reference = list(_loader(_urls(shards), epoch=1, **kw).dataloader)
    info = _loader(_urls(shards), epoch=0, **kw)
    first = list(info.dataloader)
    info.set_epoch(1, skip_batches=2)  # the same worker processes, told through shared memory
    assert _same(reference[2:], list(info.dataloader)) and not _same(reference, first)
    with pytest.raises(ValueError, match="skip_batches"):
        info.set_epoch(2, skip_batches=info.num_batches)


def test_resampled_with_upsampling_factors(shards):
    spec = f"{shards}/{{00000..00001}}.tar::{shards}/{{00002..00003}}.tar"
    urls, weights = expand_urls(spec, "1::0")
    kw = dict(resampled=True, upsampling_factors=weights, num_samples=40, batch_size=4, seed=2)
    info = _loader(urls, **kw)
    batches = list(info.dataloader)
    assert info.num_batches == len(batches) == 10
    first_source = {CAPTIONS[i] for i in _shard_members(shards, 0) | _shard_members(shards, 1)}
    assert set(_captions(batches)) <= first_source
    assert _same(batches, list(_loader(urls, **kw).dataloader))
    assert _same(batches[4:], list(_loader(urls, skip_batches=4, **kw).dataloader))


def _shard_members(folder, shard):
    """Indices (from the captions) of the photos in one shard."""
    with tarfile.open(folder / f"{shard:05d}.tar") as tf:
        return {int(tf.extractfile(m).read().decode().split()[2]) for m in tf.getmembers() if m.name.endswith(".txt")}


def _damage(folder):
    """Truncates shard 1 inside the image of its second sample; makes the image of one sample of shard 2 garbage."""
    path = folder / "00001.tar"
    with tarfile.open(path) as tf:
        second_image = [m for m in tf.getmembers() if m.name.endswith(".jpg")][1]
    data = path.read_bytes()
    path.write_bytes(data[: second_image.offset_data + second_image.size // 2])
    path = folder / "00002.tar"
    with tarfile.open(path) as tf:
        samples = {}
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    first = sorted(samples)[0]
    samples[first]["jpg"] = b"\xff\xd8\xff\xe0 not a JPEG after all"
    with wds.TarWriter(str(path), encoder=False) as tw:
        for key in sorted(samples):
            tw.write(samples[key])


def test_truncated_tar_and_undecodable_image_are_skipped_and_counted(tmp_path):
    folder = _write_photo_shards(tmp_path)
    _damage(folder)
    with deadline(60):
        val = _loader(_urls(folder), is_train=False, workers=2, preprocess=VAL_TF)
        samples = _captions(list(val.dataloader))
    # shard 1 keeps its first sample; shard 2 loses the undecodable one
    assert len(samples) == 24 - 5 - 1 and len(set(samples)) == len(samples)
    assert val.stats.as_dict() == {"shards_failed": 1, "samples_incomplete": 0, "samples_undecodable": 1}
    with deadline(60):
        train = _loader(_urls(folder), batch_size=4, workers=2, num_samples=24)
        batches = list(train.dataloader)
    assert len(batches) == train.num_batches == 6  # the rank reads its shards again to fill the epoch
    assert train.stats.shards_failed >= 1 and train.stats.samples_undecodable >= 1


@pytest.mark.parametrize("fields,workers", [(("jpg", "cls"), 0), (("jpg", "cls"), 2), (("json",), 0)])
def test_shards_without_captions_fail_fast_naming_the_keys(tmp_path, fields, workers):
    folder = tmp_path / "nocaption"
    folder.mkdir()
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).resize((32, 32)).save(buf, format="JPEG")
    values = {"jpg": buf.getvalue(), "cls": b"1", "json": b'{"caption": "in the wrong file"}'}
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=3, verbose=0, encoder=False) as sw:
        for i in range(12):
            sw.write({"__key__": f"{i:06d}", **{f: values[f] for f in fields}})
    expected = (r"no sample in shard .*/\d{5}\.tar has both an image \(jpg/jpeg/png/webp/bmp/ppm/pgm/tif/tiff/gif\) and a caption \(txt\); "
                r"keys found: " + ", ".join(sorted(fields)))
    with deadline(60), pytest.raises(Exception, match=expected):
        list(_loader(_urls(folder), workers=workers, num_samples=12, seed=0, epoch=0).dataloader)


def test_bad_arguments_fail_with_clear_errors(shards):
    with pytest.raises(FileNotFoundError, match="shard not found"):
        _loader(_urls(shards) + [str(shards / "00042.tar")], num_samples=30)
    with pytest.raises(ValueError, match="no full batch"):
        _loader(_urls(shards), batch_size=16, world_size=2)
    with pytest.raises(ValueError, match="cannot be split"):
        _loader(_urls(shards, 2), world_size=2, workers=2, num_samples=12)
    with pytest.raises(ValueError, match="skip_batches"):
        _loader(_urls(shards), skip_batches=6)


@pytest.mark.parametrize("damage", ["undecodable", "unreadable"])
@pytest.mark.parametrize("resampled", [False, True], ids=["passes", "resampled"])
def test_a_training_set_with_nothing_usable_fails_instead_of_hanging(tmp_path, damage, resampled):
    """A training source never ends: shards whose every image is undecodable, or whose every tar is unreadable,
    end in one clear error after a round of shards (a pass, or 10 x shards + 100 resampled draws) - not a hang."""
    folder = tmp_path / damage
    folder.mkdir()
    if damage == "undecodable":
        with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=3, verbose=0, encoder=False) as sw:
            for i in range(12):
                sw.write({"__key__": f"{i:06d}", "jpg": b"\xff\xd8 not a jpeg", "txt": b"a caption"})
    else:
        for i in range(4):
            (folder / f"{i:05d}.tar").write_bytes(b"\x00garbage" * 100)
    loader = _loader(_urls(folder, 4), workers=1, num_samples=12, resampled=resampled)
    expected = "decodable image" if damage == "undecodable" else "readable sample"
    with deadline(90), pytest.raises(Exception, match=f"no {expected} in "
                                     + ("the last 140 shards drawn" if resampled else "a whole pass")):
        list(loader.dataloader)
    assert loader.stats.total > 0


def test_captions_that_are_not_utf8_are_skipped_and_resume_stays_exact(tmp_path):
    """Samples whose caption is not UTF-8 are skipped and counted like undecodable images; the resume position
    counts usable samples only, so skip_batches still gives the tail of the uninterrupted epoch."""
    from train_helpers import spoil_samples

    folder = _write_photo_shards(tmp_path)
    for shard, captions, images in ((0, (0, 3), (5,)), (1, (1,), ()), (2, (2, 4), (0,)), (3, (5,), ())):
        spoil_samples(folder / f"{shard:05d}.tar", captions=captions, images=images)
    for workers, skip in ((0, 3), (2, 3), (2, 4)):
        kw = dict(batch_size=4, workers=workers, seed=7, epoch=1, num_samples=24)
        info = _loader(_urls(folder), **kw)
        with deadline(60):
            full = list(info.dataloader)
        assert len(full) == 6 and info.stats.samples_undecodable >= 8
        assert not any("café" in c for c in _captions(full))
        with deadline(60):
            resumed = list(_loader(_urls(folder), skip_batches=skip, **kw).dataloader)
        assert _same(full[skip:], resumed), (workers, skip)


@pytest.mark.parametrize("workers,resampled", [(0, False), (1, False), (0, True)])
def test_shards_whose_captions_are_never_utf8_fail_instead_of_hanging(tmp_path, caplog, workers, resampled):
    """Every image decodes but no caption is UTF-8: a round of shards without one usable sample raises, naming
    a sample of that round; the skipped samples are counted, but only a few of them are logged."""
    from train_helpers import spoil_samples

    folder = _write_photo_shards(tmp_path, per_shard=3)
    for shard in range(N_SHARDS):
        spoil_samples(folder / f"{shard:05d}.tar", captions=range(3))
    loader = _loader(_urls(folder), workers=workers, num_samples=12, resampled=resampled)
    where = "the last 140 shards drawn" if resampled else "a whole pass"
    with caplog.at_level("WARNING"), deadline(90), \
            pytest.raises(Exception, match=rf"no usable sample in {where} .*\(e\.g\. \d+ in .*/0000\d\.tar: "
                                           r"caption is not UTF-8"):
        list(loader.dataloader)
    skipped = loader.stats.samples_undecodable
    assert skipped >= 12 and loader.stats.samples_incomplete == 0
    if workers == 0:  # the warnings of this process: a few, not one per sample
        warned = [r for r in caplog.records if "skipping" in r.getMessage()]
        assert 1 <= len(warned) <= 10 < skipped, (len(warned), skipped)
