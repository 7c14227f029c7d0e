"""img2dataset's output, as it is: img2dataset itself downloads real photos from a loopback web server into
webdataset shards (``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``, no ``sizes.json``), the trainer trains
on them over HTTP and validates on the local folder with no sample count given, and ``eval/retrieval.py`` reads the
folder as a retrieval set (``--dataset img2dataset``).

img2dataset 1.47.0 pins ``webdataset<0.3`` and ``pandas<3``, which diffclip's own environment exceeds, so it lives
in a venv of its own: ``make venv`` installs it into ``.venv/img2dataset`` (versions: constraints-img2dataset.txt)
and the test runs its command line by path (``IMG2DATASET=/path/to/img2dataset`` points at another one). Without
it the test is skipped, naming the command that installs it.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
from diffclip.eval import readers, retrieval
from diffclip.training.data import get_dataset_size
from hf_server import FolderServer
from PIL import Image
from train_helpers import MAIN, MODEL, PHOTOS, _env

IMG2DATASET = Path(os.environ.get("IMG2DATASET", Path(sys.prefix) / "img2dataset" / "bin" / "img2dataset"))
N_IMAGES, PER_SHARD = 23, 8  # + 1 URL that answers 404: shards of 8, 8 and 7 successes


def _captions() -> list[str]:
    return [f"crop {i} of a photo of a {PHOTOS[i % len(PHOTOS)]}" for i in range(N_IMAGES)]


def _serve_photos(web: Path) -> None:
    """N_IMAGES PNG crops of scikit-image photos of different sizes, to be downloaded and resized by img2dataset."""
    web.mkdir()
    for i in range(N_IMAGES):
        photo = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        w, h = photo.size
        left = (i // len(PHOTOS)) * w // 8
        photo.crop((left, 0, left + w // 2, h // 2)).resize((40 + i, 48)).save(web / f"{i}.png")


@pytest.fixture(scope="module")
def img2dataset_folder(tmp_path_factory):
    """What ``img2dataset --output_format webdataset`` writes from a CSV of loopback URLs and captions."""
    if not IMG2DATASET.is_file():
        pytest.skip(f"img2dataset is not installed at {IMG2DATASET}: `make venv` installs it there")
    root = tmp_path_factory.mktemp("img2dataset")
    _serve_photos(root / "web")
    with FolderServer(root / "web") as server:
        with open(root / "urls.csv", "w", newline="") as f:
            rows = [(f"{server.url}/{i}.png", c) for i, c in enumerate(_captions())]
            rows.insert(5, (f"{server.url}/missing.png", "a photo that is not there"))
            csv.writer(f).writerows([("url", "caption"), *rows])
        done = subprocess.run(
            [str(IMG2DATASET), "--url_list", str(root / "urls.csv"), "--input_format", "csv", "--url_col", "url",
             "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(root / "out"),
             "--image_size", "64", "--number_sample_per_shard", str(PER_SHARD), "--processes_count", "1",
             "--thread_count", "4", "--enable_wandb", "False"],
            env={**_env(), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}, capture_output=True,
            text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out"


def test_img2dataset_output_trains_and_evaluates_with_no_count_given(img2dataset_folder, tmp_path):
    out = img2dataset_folder
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"0000{i}{ext}" for i in range(3) for ext in (".parquet", ".tar", "_stats.json")], names
    successes = [json.loads((out / f"0000{i}_stats.json").read_text())["successes"] for i in range(3)]
    assert sum(successes) == N_IMAGES
    assert get_dataset_size([str(out / f"0000{i}.tar") for i in range(3)]) == (N_IMAGES, 3)

    # the trainer: shards over HTTP (counts from the remote _stats.json files), validation on the local folder
    with FolderServer(out) as server:
        cmd = [sys.executable, str(MAIN), "--model", MODEL, "--train-data", f"{server.url}/{{00000..00002}}.tar",
               "--val-data", str(out), "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--warmup", "1",
               "--precision", "fp32", "--workers", "1", "--seed", "0", "--logs", str(tmp_path), "--name", "run",
               "--log-every-n-steps", "1"]
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert {"/00000_stats.json", "/00002_stats.json", "/00002.tar"} <= set(server.requests)
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]  # 23 samples: 2 batches of 8
    (val,) = [r for r in records if r["type"] == "val"]
    assert val["num_samples"] == N_IMAGES

    # eval/retrieval.py on the folder as it is, with the trained weights
    result = tmp_path / "retrieval.json"
    assert retrieval.main(["--model", MODEL, "--pretrained", str(tmp_path / "run" / "final_model"), "--dataset",
                           "img2dataset", "--data-root", str(out), "--output", str(result), "--no-progress"]) == 0
    record = json.loads(result.read_text())
    assert record["dataset"] == "img2dataset/out" and record["task"] == "zeroshot_retrieval"
    assert set(record["metrics"]) >= {"image_retrieval_recall@1", "text_retrieval_recall@10"}
    assert record["metrics"]["image_retrieval_recall@10"] >= record["metrics"]["image_retrieval_recall@1"]
    assert record["metrics"]["image_retrieval_recall@10"] > 0
    dataset = readers.build_retrieval_dataset("img2dataset", out)  # every image with its one caption
    assert sorted(c for caps in dataset.captions for c in caps) == sorted(_captions()) and len(dataset) == N_IMAGES
