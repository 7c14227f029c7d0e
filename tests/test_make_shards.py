"""training/make_shards.py on real images (scikit-image photos; the emoji and Openclipart sources when installed)."""

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from diffclip.training import make_shards as ms
from diffclip.training import sources
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EMOJI_DIR = ROOT / "data" / "sources" / "emoji-datasource-google"
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]


def _run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "diffclip.training.make_shards", *args, "--no-progress"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _photo(name: str, size: int = 96) -> Image.Image:
    im = Image.fromarray(getattr(skimage.data, name)())
    im.thumbnail((size, size))
    return im


def _transparent_photo(size: int = 80) -> Image.Image:
    """chelsea the cat inside a disc; outside it the pixels are black and fully transparent."""
    rgb = np.asarray(_photo("chelsea", size).resize((size, size)))
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside, :3], rgba[inside, 3] = rgb[inside], 255
    return Image.fromarray(rgba, "RGBA")


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


@pytest.fixture()
def csv_source(tmp_path):
    """A CSV of 6 photos (one PNG with transparency, one 2:1 crop), one missing file, and an extra column."""
    (tmp_path / "img").mkdir()
    rows = []
    for i, name in enumerate(PHOTOS[:4]):
        _photo(name).save(tmp_path / "img" / f"{name}.jpg")
        rows.append((f"img/{name}.jpg", f"a photo of {name}", f"group{i % 2}"))
    _transparent_photo().save(tmp_path / "img" / "cat.png")
    rows.append(("img/cat.png", "a cat in a circle", "group0"))
    wide = _photo("coffee", 128)
    wide.crop((0, 0, wide.width, wide.width // 2)).save(tmp_path / "img" / "wide.png")
    rows.append(("img/wide.png", "a wide strip of coffee", "group1"))
    rows.append(("img/missing.jpg", "a file that is not there", "group1"))
    path = tmp_path / "captions.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "group"])
        w.writerows(rows)
    return path


def test_csv_source_end_to_end_cli(csv_source, tmp_path):
    out = tmp_path / "shards"
    r = _run_cli("--source", "csv", "--input", str(csv_source), "--output", str(out), "--samples-per-shard", "2",
                 "--image-size", "32", "--val-fraction", "0.2", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "skipped 1" in r.stdout and "missing image" in r.stdout
    sizes = json.loads((out / "sizes.json").read_text())
    val_sizes = json.loads((out / "val" / "sizes.json").read_text())
    assert sum(sizes.values()) + sum(val_sizes.values()) == 6
    assert sum(val_sizes.values()) == 1  # round(7 * 0.2) records held out; none of them is the missing one here
    assert sorted(sizes) == [f"{i:05d}.tar" for i in range(len(sizes))] and max(sizes.values()) == 2
    assert not list(out.rglob("*.tmp"))
    summary = json.loads((out / "make_shards.json").read_text())
    assert summary["skipped_reasons"] == {"missing image": 1} and summary["train"]["samples"] == 5
    captions = {}
    for shard, count in sizes.items():
        files = _members(out / shard)
        assert len(files) == 3 * count
        keys = sorted({n.split(".")[0] for n in files})
        for key in keys:
            assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= set(files)
            im = Image.open(io.BytesIO(files[f"{key}.jpg"]))
            assert im.size == (32, 32) and im.mode == "RGB"
            meta = json.loads(files[f"{key}.json"])
            caption = files[f"{key}.txt"].decode()
            assert meta["caption"] == caption and meta["key"] == key and meta["group"] in ("group0", "group1")
            captions[caption] = im
    assert {"a cat in a circle", "a wide strip of coffee"} <= set(captions)  # seed 3 holds out the astronaut
    corner = np.asarray(captions["a cat in a circle"])[:3, :3].astype(int)
    assert corner.min() > 235  # transparent pixels composited on white before JPEG encoding
    strip = np.asarray(captions["a wide strip of coffee"]).astype(int)  # 2:1: padded with white, not cropped
    assert strip[:5].min() > 235 and strip[-5:].min() > 235 and strip[14:18].std() > 5
    # a second run does not mix old and new shards
    again = _run_cli("--source", "csv", "--input", str(csv_source), "--output", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr


@pytest.mark.parametrize("args,code,named", [
    (["--source", "noto-emoji", "--input", "{d}/nowhere"], 1, "scripts/get_demo_data.sh"),
    (["--source", "openclipart", "--input", "{d}/nowhere"], 1, "apt-get install openclipart"),
    (["--source", "csv", "--input", "{d}/none.csv"], 1, "none.csv"),
    (["--source", "csv", "--input", "{d}/bad.jsonl"], 1, "bad.jsonl:2"),
    (["--source", "csv", "--input", "{d}/ok.csv", "--image-size", "-5"], 2, "--image-size"),
    (["--source", "csv", "--input", "{d}/ok.csv", "--val-fraction", "1.5"], 2, "--val-fraction"),
    (["--source", "csv", "--input", "{d}/ok.csv", "--output", "/proc/nowhere/shards"], 1, "--output"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, code, named):
    Image.fromarray(skimage.data.astronaut()).resize((32, 32)).save(tmp_path / "a.png")
    (tmp_path / "ok.csv").write_text("filepath,caption\na.png,an astronaut\n")
    (tmp_path / "bad.jsonl").write_text('{"filepath": "a.png", "caption": "x"}\n{"filepath": "a.png", \n')
    argv = [a.format(d=tmp_path) for a in args]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "o")]
    r = _run_cli(*argv)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "error:" in lines[0] and named in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_folder_in_the_csv_is_skipped_and_counted_not_read(tmp_path):
    _photo("coffee", 32).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "c.csv").write_text("filepath,caption\nok.png,coffee\npipe.png,a pipe\ndir.png,a folder\n")
    r = subprocess.run([sys.executable, "-m", "diffclip.training.make_shards", "--source", "csv", "--input",
                        str(tmp_path / "c.csv"), "--output", str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "out" / "make_shards.json").read_text())
    assert summary["train"]["samples"] == 1 and summary["skipped_reasons"] == {"not a regular file": 2}


def test_an_undecodable_openclipart_png_is_a_skipped_record(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rec = sources.Record(str(tmp_path / "broken.png"), None, {"categories": ["animals"], "svg": None})
    with pytest.raises(sources.SkipSample, match="undecodable image"):
        sources.record_caption(rec)


def test_tsv_and_jsonl_sources_and_byte_identical_reruns(tmp_path):
    for name in PHOTOS[:3]:
        _photo(name).save(tmp_path / f"{name}.png")
    (tmp_path / "a.tsv").write_text("".join(f"{n}.png\tphoto of {n}\n" for n in PHOTOS[:3]))  # no header
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"image": f"{n}.png", "text": f"photo of {n}", "i": i}) + "\n"
                                              for i, n in enumerate(PHOTOS[:3])))
    tsv, jsonl = ms.read_csv_source(tmp_path / "a.tsv"), ms.read_csv_source(tmp_path / "b.jsonl")
    assert [r.caption for r in tsv] == [r.caption for r in jsonl] == [f"photo of {n}" for n in PHOTOS[:3]]
    assert jsonl[2].meta["i"] == 2 and Path(tsv[0].path) == tmp_path / "astronaut.png"
    s1 = ms.write_shards(tsv, tmp_path / "o1", samples_per_shard=2, image_size=24, fmt="webp", progress=False)
    s2 = ms.write_shards(tsv, tmp_path / "o2", samples_per_shard=2, image_size=24, fmt="webp", progress=False)
    assert s1["train"] == {"shards": 2, "samples": 3}
    assert (tmp_path / "o1" / "00000.tar").read_bytes() == (tmp_path / "o2" / "00000.tar").read_bytes()
    assert any(n.endswith(".webp") for n in _members(tmp_path / "o1" / "00000.tar"))
    assert s2["train"]["samples"] == 3


def test_resize_modes_on_a_real_photo(tmp_path):
    path = tmp_path / "rocket.jpg"
    Image.fromarray(skimage.data.rocket()).save(path)  # 640 x 427
    sizes = {}
    for mode in ms.RESIZE_MODES:
        data, original, size = ms.encode_image(str(path), 64, mode, "png")
        assert Image.open(io.BytesIO(data)).size == size
        sizes[mode] = size
    assert original == (640, 427)
    assert sizes == {"pad": (64, 64), "shorter": (96, 64), "crop": (64, 64)}
    assert ms.encode_image(str(path), None, "pad", "jpg")[2] == (640, 427)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    with pytest.raises(sources.SkipSample, match="undecodable"):
        ms.encode_image(str(tmp_path / "bad.jpg"), 32)


def test_emoji_names_and_caption_templates():
    entry = {"name": "THUMBS UP SIGN", "short_names": ["+1", "thumbsup"], "subcategory": "hand-fingers-closed"}
    assert sources.emoji_name(entry) == "thumbs up sign"
    assert sources.emoji_name(entry, "1F3FD") == "thumbs up sign, medium skin tone"
    assert sources.emoji_name({"name": "COUPLE WITH HEART"}, "1F3FB-1F3FF") == "couple with heart, light and dark skin tones"
    captions = {sources.emoji_caption(entry, None, seed) for seed in range(60)}
    assert len(captions) >= 6 and all("thumbs up sign" in c for c in captions)
    assert "thumbs up sign (thumbsup)" in captions and not any("+1" in c for c in captions)
    assert sources.emoji_caption(entry, "1F3FD", 7) == sources.emoji_caption(entry, "1F3FD", 7)


@pytest.mark.skipif(not (EMOJI_DIR / "emoji.json").is_file(), reason="emoji source not installed: "
                    "run scripts/get_demo_data.sh")
def test_noto_emoji_source(tmp_path):
    records = sources.read_emoji_source(EMOJI_DIR)
    assert len(records) == 3786  # 1911 emoji + their skin-tone variants, each with a Google image
    assert all(os.path.isfile(r.path) for r in records[:50])
    summary = ms.write_shards(records, tmp_path / "noto", samples_per_shard=5, max_samples=12, seed=1,
                              progress=False, source="noto-emoji")
    assert summary["train"] == {"shards": 3, "samples": 12} and summary["skipped"] == 0
    files = _members(tmp_path / "noto" / "00000.tar")
    for name, data in files.items():
        if name.endswith(".json"):
            meta = json.loads(data)
            assert meta["category"] and meta["subcategory"] and meta["set"] == "google"
            assert meta["name"] in meta["caption"]
            assert files[name.replace(".json", ".txt")].decode() == meta["caption"]
            im = np.asarray(Image.open(io.BytesIO(files[name.replace(".json", ".jpg")]))).astype(int)
            assert im.shape == (64, 64, 3) and im[0, 0].min() > 230  # transparent background -> white


@pytest.mark.skipif(not Path("/usr/share/openclipart").is_dir(), reason="openclipart not installed: "
                    "apt-get install openclipart-png openclipart-svg")
def test_openclipart_source(tmp_path):
    records = sources.read_openclipart_source()
    assert len(records) > 5000
    summary = ms.write_shards(records, tmp_path / "oc", max_samples=4, image_size=48, seed=0, progress=False)
    assert summary["train"]["samples"] + summary["skipped"] == 4 and summary["train"]["samples"] >= 2
    texts = [d.decode() for n, d in _members(tmp_path / "oc" / "00000.tar").items() if n.endswith(".txt")]
    assert all(t.strip() for t in texts)
