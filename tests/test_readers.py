"""eval.readers on tiny real files written in each dataset's real on-disk layout."""

import csv
import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pytest
from diffclip.eval import readers
from diffclip.eval.readers import DatasetNotFoundError, build_dataset, build_retrieval_dataset
from diffclip.eval.runner import read_records
from eval_helpers import DIGITS, digit, save, write_emoji_set
from PIL import Image


def test_imagenet_val_folder(tmp_path):
    wnids = readers.imagenet_wnids()
    chosen = [wnids[0], wnids[1], wnids[500]]
    for k, w in enumerate(chosen):
        for j in range(2):
            save(digit(2 * k + j), tmp_path / "val" / w / f"ILSVRC2012_val_{k}{j}.JPEG", "JPEG")
    ds = build_dataset("imagenet", tmp_path)  # alias; split val -> <root>/val
    assert ds.name == "imagenet1k" and ds.split == "val"
    assert len(ds) == 6 and sorted(set(ds.targets)) == [0, 1, 500]
    assert len(ds.classnames) == 1000 and ds.classnames[0] == "tench" and len(ds.templates) == 80
    assert all("{}" in t for t in ds.templates)
    img, label = ds[5]
    assert img.mode == "RGB" and label == 500
    (tmp_path / "val" / "not_a_wnid").mkdir()
    with pytest.raises(DatasetNotFoundError, match="expected layout"):
        build_dataset("imagenet1k", tmp_path)


def test_imagenet_a_r_masks_and_v2(tmp_path):
    a_wnids = readers._timm_info("imagenet_a_synsets.txt")
    for w in a_wnids[:2]:
        save(digit(0), tmp_path / "imagenet-a" / w / "0.jpg", "JPEG")
    ds = build_dataset("imagenet-a", tmp_path)  # found under <root>/imagenet-a
    assert len(ds.classnames) == 200 and ds.targets == [0, 1]
    wnids = readers.imagenet_wnids()
    assert ds.class_index[:2] == [wnids.index(a_wnids[0]), wnids.index(a_wnids[1])]
    assert ds.classnames[0] == readers.imagenet_classnames()[ds.class_index[0]]
    r = readers._timm_info("imagenet_r_synsets.txt")
    save(digit(1), tmp_path / "imagenet-r" / r[3] / "x.jpg", "JPEG")
    ds_r = build_dataset("imagenet-r", tmp_path)
    assert ds_r.targets == [3] and len(ds_r.class_index) == 200
    for c in ("2", "10", "999"):  # numeric folder names, not lexicographic order
        save(digit(int(c) % 10), tmp_path / "imagenetv2-matched-frequency-format-val" / c / "a.jpeg", "JPEG")
    v2 = build_dataset("imagenetv2", tmp_path)
    assert v2.targets == [2, 10, 999] and len(v2.classnames) == 1000


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_clip_benchmark_wds_classification_and_retrieval(tmp_path):
    root = tmp_path / "wds_digits"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("zero\none\ntwo\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of the number {}.\n{} written by hand.\n")
    (root / "test" / "nshards.txt").write_text("2\n")
    labels = [0, 1, 2, 1, 0]
    for shard, keys in enumerate([[0, 1, 2], [3, 4]]):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tf:
            for k in keys:
                _tar_add(tf, f"s{k:04d}.webp" if k == 4 else f"s{k:04d}.png", _png_bytes(digit(k)) if k != 4 else
                         _webp(digit(k)))
                _tar_add(tf, f"s{k:04d}.cls", f"{labels[k]}\n".encode())
                _tar_add(tf, f"s{k:04d}.txt", f"a digit {labels[k]}\nhandwritten {labels[k]}\n".encode())
    ds = build_dataset("wds/vtab-digits", root)
    assert len(ds) == 5 and ds.targets == labels and ds.classnames == ["zero", "one", "two"]
    assert ds.templates == ["a photo of the number {}.", "{} written by hand."]
    img, y = ds[4]
    assert img.size == (16, 16) and y == 0
    ret = build_retrieval_dataset("wds", root)
    assert len(ret) == 5 and ret.captions[1] == ["a digit 1", "handwritten 1"]
    assert ret[3][1] == 3
    (root / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(DatasetNotFoundError, match="2.tar is missing"):
        build_dataset("wds", root)
    with pytest.raises(DatasetNotFoundError, match="nshards.txt"):
        build_dataset("wds", root, split="train")


def _webp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def _karpathy_json(images):
    return {"dataset": "x", "images": images}


def test_karpathy_coco_and_flickr(tmp_path):
    coco = tmp_path / "coco"
    imgs = []
    for i, split in enumerate(["test", "test", "train", "restval", "test"]):
        name = f"COCO_val2014_{i:012d}.jpg"
        save(digit(i), coco / "val2014" / name, "JPEG")
        imgs.append({"filepath": "val2014", "filename": name, "split": split, "imgid": i,
                     "sentences": [{"raw": f"digit {i} caption {j} ", "tokens": []} for j in range(5)]})
    (coco / "annotations").mkdir()
    (coco / "annotations" / "dataset_coco.json").write_text(json.dumps(_karpathy_json(imgs)))
    ds = build_retrieval_dataset("mscoco_captions", tmp_path)  # finds <root>/coco
    assert len(ds) == 3 and all(len(c) == 5 for c in ds.captions)
    assert ds.captions[2][0] == "digit 4 caption 0"
    assert ds[1][1] == 1 and ds[1][0].mode == "RGB"
    assert len(build_retrieval_dataset("mscoco", coco, split="restval")) == 1

    f30 = tmp_path / "flickr30k"
    imgs = []
    for i in range(3):
        save(digit(i), f30 / "flickr30k-images" / f"{1000 + i}.jpg", "JPEG")
        imgs.append({"filename": f"{1000 + i}.jpg", "split": "test", "sentences": [{"raw": f"c{i}{j}"} for j in
                                                                                    range(5)]})
    (f30 / "dataset_flickr30k.json").write_text(json.dumps(_karpathy_json(imgs)))
    ds = build_retrieval_dataset("flickr30k", tmp_path)
    assert len(ds) == 3 and ds.captions[0][4] == "c04"
    (f30 / "flickr30k-images" / "1002.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match="1 of 3 test images are missing"):
        build_retrieval_dataset("flickr30k", f30)
    with pytest.raises(DatasetNotFoundError, match="dataset_flickr8k.json"):
        build_retrieval_dataset("flickr8k", f30)


def _write_idx(path, arr: np.ndarray, compress: bool):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_idx_files_debian_and_torchvision_layouts(tmp_path):
    images = np.stack([np.asarray(digit(i, 28, "L")) for i in range(6)])
    labels = DIGITS.target[:6]
    deb = tmp_path / "fashion-mnist"
    _write_idx(deb / "t10k-images-idx3-ubyte.gz", images, True)
    _write_idx(deb / "t10k-labels-idx1-ubyte.gz", labels, True)
    ds = build_dataset("fashion_mnist", tmp_path)
    assert len(ds) == 6 and ds.targets == labels.tolist() and ds.classnames[9] == "ankle boot"
    img, y = ds[3]
    assert img.mode == "L" and np.array_equal(np.asarray(img), images[3]) and y == labels[3]
    with pytest.raises(DatasetNotFoundError, match="train-images"):
        build_dataset("fashion-mnist", deb, split="train")
    tv = tmp_path / "tv"
    _write_idx(tv / "MNIST" / "raw" / "train-images-idx3-ubyte", images, False)
    _write_idx(tv / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels, False)
    ds = build_dataset("mnist", tv, split="train")
    assert ds.classnames == [str(i) for i in range(10)] and ds.targets == labels.tolist()
    assert readers.read_idx(tv / "MNIST" / "raw" / "train-images-idx3-ubyte").shape == (6, 28, 28)


def test_folder_with_classnames_file_and_errors(tmp_path):
    for c in ("c0", "c1", "c2"):
        for j in range(2):
            save(digit(j), tmp_path / "train" / c / f"{j}.png")
    (tmp_path / "classnames.txt").write_text("zero\none\ntwo\n")
    ds = build_dataset("folder", tmp_path, split="train")
    assert ds.classnames == ["zero", "one", "two"] and ds.targets == [0, 0, 1, 1, 2, 2]
    assert ds.templates == readers.GENERIC_TEMPLATES
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("a digit: {}\n")
    ds = build_dataset("folder", tmp_path, split="train", templates=str(tpl))
    assert ds.templates == ["a digit: {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a digit\n")
    with pytest.raises(ValueError, match="has 0 placeholders; expected exactly one"):
        build_dataset("folder", tmp_path, split="train", templates=str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        build_dataset("folder", tmp_path, split="train", classnames=str(empty))
    with pytest.raises(ValueError, match="2 class names given"):
        build_dataset("folder", tmp_path, split="train", classnames=["a", "b"])
    (tmp_path / "classnames.txt").write_text("zero\none\n")
    with pytest.raises(ValueError, match="lists 2 class names"):
        build_dataset("folder", tmp_path, split="train")
    with pytest.raises(DatasetNotFoundError, match="expected layout"):
        build_dataset("folder", tmp_path / "missing")


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids[::-1]) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n")
    for k, w in enumerate(wnids):
        save(digit(k, 64), root / "train" / w / "images" / f"{w}_0.JPEG", "JPEG")
    ann = []
    for i in range(3):
        save(digit(i, 64), root / "val" / "images" / f"val_{i}.JPEG", "JPEG")
        ann.append(f"val_{i}.JPEG\t{wnids[i % 2]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    val = build_dataset("tiny-imagenet", tmp_path)
    assert val.classnames == ["goldfish", "European fire salamander"] and val.targets == [0, 1, 0]
    train = build_dataset("tiny-imagenet", tmp_path, split="train")
    assert train.targets == [0, 1] and train[0][0].size == (64, 64)


def test_csv_and_jsonl_captions(tmp_path):
    for i in range(3):
        save(digit(i), tmp_path / "img" / f"{i}.png")
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        w.writerows([["img/0.png", "zero"], ["img/1.png", "one"], ["img/0.png", "a zero, handwritten"],
                     ["img/2.png", "two"]])
    ds = build_retrieval_dataset("csv", tmp_path / "caps.csv")
    assert ds.captions == [["zero", "a zero, handwritten"], ["one"], ["two"]]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"filepath": f"img/{i}.png", "caption": f"c{i}"}) + "\n"
                                                 for i in (2, 1, 2)))
    ds = build_retrieval_dataset("jsonl", tmp_path / "caps.jsonl")
    assert [p.rsplit("/", 1)[1] for p in ds.paths] == ["2.png", "1.png"] and ds.captions[0] == ["c2", "c2"]
    (tmp_path / "bad.csv").write_text("path,text\nimg/0.png,zero\n")
    with pytest.raises(ValueError, match="needs the keys"):
        build_retrieval_dataset("csv", tmp_path / "bad.csv")


@pytest.mark.parametrize("text,line,expected", [
    ("filepath,caption\nimg/0.png,zero\nimg/1.png\n", 3, "expected 2 fields"),  # no caption (was "None")
    ("filepath,caption\nimg/0.png,zero,extra\n", 2, "expected 2 fields"),
    ("filepath,caption\nimg/0.png,zero\nimg/1.png,  \n", 3, "empty caption"),
    ("filepath,caption\n,zero\n", 2, "empty filepath"),
])
def test_malformed_caption_csv_rows_are_refused_with_file_and_line(tmp_path, text, line, expected):
    for i in range(2):
        save(digit(i), tmp_path / "img" / f"{i}.png")
    (tmp_path / "caps.csv").write_text(text)
    with pytest.raises(ValueError, match=f"caps.csv:{line}: .*{expected}"):
        build_retrieval_dataset("csv", tmp_path / "caps.csv")


def test_malformed_jsonl_and_binary_caption_files_name_the_file(tmp_path):
    save(digit(0), tmp_path / "0.png")
    (tmp_path / "caps.jsonl").write_text('{"filepath": "0.png", "caption": "zero"}\n\n'
                                         '{"filepath": "0.png", "caption": null}\n')
    with pytest.raises(ValueError, match="caps.jsonl:3: .*caption"):
        build_retrieval_dataset("jsonl", tmp_path / "caps.jsonl")
    (tmp_path / "caps.jsonl").write_text('{"filepath": "0.png", "caption": "zero"}\n{"filepath": "0.png"\n')
    with pytest.raises(ValueError, match="caps.jsonl:2: not a JSON object"):
        build_retrieval_dataset("jsonl", tmp_path / "caps.jsonl")
    (tmp_path / "bin.csv").write_bytes(_png_bytes(digit(0)))  # an image given as the caption file
    for name in ("csv", "jsonl"):
        with pytest.raises(ValueError, match="bin.csv: not a UTF-8 text file"):
            build_retrieval_dataset(name, tmp_path / "bin.csv")


def test_an_empty_class_folder_is_refused_by_the_folder_reader_and_the_trainer(tmp_path):
    from diffclip.training.zero_shot_eval import load_zeroshot_set

    for c in ("cat", "dog"):
        save(digit(0 if c == "cat" else 1), tmp_path / c / "0.png")
    (tmp_path / "emu").mkdir()
    (tmp_path / "emu" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'emu'} holds no image"):
        build_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match=f"--zeroshot-data {tmp_path}: .*class folder .*emu holds no image"):
        load_zeroshot_set(tmp_path, None)
    (tmp_path / "emu" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # its only image does not decode
    assert len(build_dataset("folder", tmp_path)) == 3
    with pytest.raises(ValueError, match="class 'emu' has no decodable image .e.g. .*emu/0.png"):
        load_zeroshot_set(tmp_path, None)


def test_every_decode_error_names_the_file(tmp_path):
    data = _png_bytes(digit(3, 64))
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="t.png cannot be decoded"):
        readers.load_image(tmp_path / "t.png")
    (tmp_path / "classnames.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="classnames.txt: not a UTF-8 text file"):
        readers.read_lines(tmp_path / "classnames.txt")
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("zero\none\n")
    (root / "test" / "nshards.txt").write_text("1\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        _tar_add(tf, "s0.png", data[: len(data) // 2])
        _tar_add(tf, "s0.cls", b"1\n")
        _tar_add(tf, "s0.txt", b"\xff caption")
    ds = build_dataset("wds", root)
    with pytest.raises(OSError, match="image s0.png in .*0.tar cannot be decoded"):
        ds[0]
    with pytest.raises(ValueError, match="0.tar: s0.txt is not UTF-8"):
        build_retrieval_dataset("wds", root)
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        _tar_add(tf, "s0.png", data)
        _tar_add(tf, "s0.cls", b"one\n")
    with pytest.raises(ValueError, match="0.tar: s0.cls is not an integer class label"):
        build_dataset("wds", root)
    (root / "test" / "nshards.txt").write_text("two\n")
    with pytest.raises(ValueError, match="nshards.txt: expected a number of shards"):
        build_dataset("wds", root)


def test_emoji_sets(tmp_path):
    write_emoji_set(tmp_path, "google")
    ds = build_dataset("emoji-google", tmp_path)
    assert ds.split == "all" and len(ds) == 6  # the Component entry is left out
    assert ds.classnames == ["activities", "animals & nature", "food & drink", "people & body", "smileys & emotion"]
    img, y = ds[0]  # sort_order: the last entry (thumbs up) comes first
    assert y == 3 and img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    sub = build_dataset("emoji-google-subcategory", tmp_path)
    assert "animal mammal" in sub.classnames and len(sub.classnames) == 5
    assert len(build_dataset("emoji-google", tmp_path, split="test")) == 2
    assert len(build_dataset("emoji-google", tmp_path, split="train")) == 4
    ret = build_retrieval_dataset("emoji-google", tmp_path)
    assert ret.captions[0] == ["an emoji of thumbs up sign", "an emoji of thumbsup"]  # "+1" is left out
    assert ["an emoji of grinning face", "an emoji of grinning"] in ret.captions
    assert readers.emoji_captions({"name": "SPAIN  FLAG", "short_names": ["es", "flag-es"]}) == ["an emoji of spain flag"]
    assert readers.emoji_captions({"name": "X", "short_names": ["u5272", "umbrella_with_rain-drops"]}) == [
        "an emoji of x", "an emoji of umbrella with rain drops"]
    with pytest.raises(DatasetNotFoundError, match="emoji-datasource-twitter"):
        build_dataset("emoji-twitter", tmp_path)


def test_registry_and_missing_errors(tmp_path):
    names = readers.list_datasets("classification")
    for n in ("imagenet1k", "imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch", "objectnet", "cifar10",
              "cifar100", "mnist", "fashion-mnist", "stl10", "pets", "flowers102", "food101", "dtd", "caltech101",
              "sun397", "fgvc-aircraft", "folder", "wds", "emoji-twitter", "emoji-google", "tiny-imagenet"):
        assert n in names
    assert set(readers.list_datasets("retrieval")) >= {"mscoco", "flickr30k", "flickr8k", "wds", "csv", "jsonl",
                                                       "emoji-twitter", "emoji-google"}
    with pytest.raises(ValueError, match="unknown classification dataset"):
        build_dataset("no-such-set", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        build_dataset("cifar10", tmp_path)  # torchvision reader, no download
    with pytest.raises(DatasetNotFoundError, match="not found; expected layout"):
        build_dataset("pets", tmp_path / "nope")
    with pytest.raises(ValueError, match="has no split"):
        build_dataset("imagenet-a", tmp_path, split="train")
    with pytest.raises(ValueError, match="cannot be downloaded"):
        build_dataset("imagenet1k", tmp_path, download=True)


def test_objectnet_layout(tmp_path):
    root = tmp_path / "objectnet-1.0"
    (root / "mappings").mkdir(parents=True)
    (root / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "banana": "Banana", "bath_towel": "Bath towel"}))
    (root / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Alarm clock": "analog clock; digital clock", "Banana": "banana"}))  # no bath towel in ImageNet
    for folder in ("alarm_clock", "banana", "bath_towel"):
        save(digit(3, 20), root / "images" / folder / "1.png")
    ds = build_dataset("objectnet", tmp_path)
    assert ds.classnames == ["alarm clock", "banana"] and ds.targets == [0, 1]
    img, _ = ds[0]
    assert img.size == (18, 18)  # the 1-pixel border is cut


def test_digits_reader_splits():
    tr, te = build_dataset("digits", None, "train"), build_dataset("digits", None, "test")
    assert (len(tr), len(te)) == (1000, 797) and tr.classnames == [str(i) for i in range(10)]
    img, y = te[0]
    assert img.mode == "L" and img.size == (8, 8) and y == DIGITS.target[1000]
    assert np.array_equal(np.asarray(img), (DIGITS.images[1000] * (255 / 16)).round().astype(np.uint8))


def test_clip_benchmarks_own_templates_file_with_c_placeholder(tmp_path):
    """CLIP_benchmark's zeroshot_classification_templates.txt uses {c}: read as it is, and zero-shot runs on it;
    the record names the dataset as given (wds/<name>) with its root beside it."""
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "wds_emoji_group"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("zero\none\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of the {c}.\n")
    (root / "test" / "nshards.txt").write_text("1\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        for k in range(4):
            _tar_add(tf, f"s{k:04d}.png", _png_bytes(digit(k)))
            _tar_add(tf, f"s{k:04d}.cls", f"{k % 2}\n".encode())
    ds = build_dataset("wds/emoji_group", root)
    assert ds.templates == ["a photo of a {c}.", "a drawing of the {c}."] and ds.name == "wds/emoji_group"
    out = tmp_path / "zs.json"
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "eval" / "zeroshot.py"), "--model",
                        "CLIP-Tiny-64", "--dataset", "wds/emoji_group", "--data-root", str(root), "--workers", "0",
                        "--no-progress", "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (rec,) = read_records(out)  # the record file and its sidecar (root, protocol, ...)
    assert rec["dataset"] == "wds/emoji_group" and rec["root"] == str(root) and 0 <= rec["metrics"]["acc1"] <= 1
    # two folder datasets get two names
    for name in ("cats", "dogs"):
        save(digit(0), tmp_path / name / "a" / "0.png")
        save(digit(1), tmp_path / name / "b" / "1.png")
    assert {build_dataset("folder", tmp_path / n).name for n in ("cats", "dogs")} == {"folder/cats", "folder/dogs"}


def test_prompt_files_are_clip_benchmarks():
    """eval/prompts/ holds the templates in CLIP_benchmark's file format; for every dataset CLIP_benchmark also has,
    the list is CLIP_benchmark's own (same prompts, same order), read from the installed CLIP_benchmark."""
    import importlib.resources
    import json

    from diffclip.eval import readers

    theirs = json.loads(importlib.resources.files("clip_benchmark.datasets")
                        .joinpath("en_zeroshot_classification_templates.json").read_text())
    key = {"flowers102": "flowers", "fgvc-aircraft": "fgvc_aircraft"}
    shared = [name for name in readers.TEMPLATES if key.get(name, name) in theirs]
    assert len(shared) >= 11
    for name in shared:
        assert readers.TEMPLATES[name] == theirs[key.get(name, name)], name
    for name in ("cifar10", "pets", "dtd", "fashion-mnist", "generic", "emoji"):
        ds_templates = readers.TEMPLATES[name]
        assert all(t.count("{c}") == 1 for t in ds_templates), name
    assert readers.FASHION_MNIST_CLASSES[0] == "t-shirt/top" and len(readers.FASHION_MNIST_CLASSES) == 10
