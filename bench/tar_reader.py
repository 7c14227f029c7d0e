"""Random-access reading of evaluation shards: our ``TarShardDataset`` (``eval/readers_base.py``: one pass over the
tar headers builds an offset index, then each sample is one seek + read) vs webdataset's random-access reader
``wids.ShardListDataset`` (the ``wids`` package, no longer part of webdataset 1.0; ``pip install wids`` to run this).

Both read the same CLIP_benchmark-layout shards (``<i>.tar`` with ``png`` + ``cls``) in index order and decode each
image with PIL; printed: seconds to open the dataset (index), seconds for one pass over all samples, the ratio
wids / ours, the extra disk that each uses and whether the two give the same images and labels.

    python bench/tar_reader.py [--shards 4] [--per-shard 500] [--size 64]
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffclip.eval.readers_base import TarShardDataset  # noqa: E402


def _write(root: Path, shards: int, per_shard: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = root / f"{s}.tar"
        with tarfile.open(path, "w") as tf:
            for k in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
                for ext, payload in (("png", buf.getvalue()), ("cls", f"{k % 10}\n".encode())):
                    info = tarfile.TarInfo(f"s{s:03d}_{k:05d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    try:
        import wids
    except ImportError:
        sys.exit("bench/tar_reader.py: needs the wids package: pip install wids")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        shards = _write(tmp / "shards", args.shards, args.per_shard, args.size)
        t = time.perf_counter()
        ours = TarShardDataset(shards, None, "classification", [str(i) for i in range(10)], ["{}"])
        t_ours_open = time.perf_counter() - t
        t = time.perf_counter()
        a = [(np.asarray(img), y) for img, y in (ours[i] for i in range(len(ours)))]
        t_ours = time.perf_counter() - t

        cache = tmp / "wids_cache"
        t = time.perf_counter()
        # wids needs every shard's sample count up front (CLIP_benchmark's layout has only nshards.txt): counted
        # here from our index, so wids' figure leaves out a pass over the headers that it would need in practice
        counts = {}
        for _, image_member, _ in ours.samples:
            counts[image_member.path] = counts.get(image_member.path, 0) + 1
        spec = [{"url": s, "nsamples": counts[s]} for s in shards]
        theirs = wids.ShardListDataset(spec, cache_dir=str(cache), transformations=[])
        t_wids_open = time.perf_counter() - t
        t = time.perf_counter()
        b = []
        for i in range(len(theirs)):
            sample = theirs[i]
            img = Image.open(io.BytesIO(sample[".png"].read() if hasattr(sample[".png"], "read") else sample[".png"]))
            cls = sample[".cls"].read() if hasattr(sample[".cls"], "read") else sample[".cls"]
            b.append((np.asarray(img.convert("RGB")), int(cls.decode().strip())))
        t_wids = time.perf_counter() - t
        same = len(a) == len(b) and all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
        n = len(a)
        print(f"{n} samples in {args.shards} shard(s), {args.size}px PNG")
        print(f"open  : ours {t_ours_open:.3f} s   wids {t_wids_open:.3f} s")
        print(f"pass  : ours {t_ours:.3f} s ({n / t_ours:.0f}/s)   wids {t_wids:.3f} s ({n / t_wids:.0f}/s)   "
              f"wids/ours {t_wids / t_ours:.2f}")
        print(f"extra disk: ours 0 B   wids {_du(cache) if cache.exists() else 0:,} B (copies of the shards in its "
              f"cache dir; default /tmp/_wids_cache)")
        print(f"same images and labels: {same}")


if __name__ == "__main__":
    main()
