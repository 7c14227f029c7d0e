"""Writes tests/golden/chefer.json: the image relevance Chefer et al.'s own code gives (github.com/hila-chefer/
Transformer-MM-Explainability: ``interpret`` and its ``start_layer`` setting from ``CLIP_explainability.ipynb``,
executed from the notebook file, on its modified OpenAI CLIP, ``CLIP/clip/model.py`` + ``auxilary.py``) for a tiny
seeded standard-attention CLIP (tests/golden/tiny_clip.py), two text queries, with the notebook's default
``start_layer = -1`` (the last block) and with ``start_layer = 0`` (every block). tests/test_relevance_chefer.py
checks that diffclip.eval.relevance reproduces both to 1e-6.

    git --git-dir=<Transformer-MM-Explainability mirror> archive <commit> CLIP/clip CLIP_explainability.ipynb \\
        | tar -x -C /tmp/chefer
    python tests/golden/make_chefer_golden.py --chefer /tmp/chefer --commit <commit>

Runs on CPU: the notebook's ``interpret`` calls ``.cuda()`` on its one-hot, which is made a no-op here (the only
change; the arithmetic is the notebook's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny_clip  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chefer", required=True, help="a directory holding CLIP/clip and CLIP_explainability.ipynb")
    ap.add_argument("--commit", required=True, help="the Transformer-MM-Explainability commit it is")
    ap.add_argument("--out", default=str(HERE / "chefer.json"))
    args = ap.parse_args()
    sys.path.insert(0, args.chefer)
    from CLIP.clip.model import CLIP

    torch.Tensor.cuda = lambda self, *a, **k: self  # the notebook's interpret moves its one-hot to CUDA
    cells = json.loads(Path(args.chefer, "CLIP_explainability.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    setting = next(c for c in code if c.lstrip().startswith("#@title Control context expansion"))
    interpret = next(c for c in code if c.lstrip().startswith("def interpret("))
    ns = {"torch": torch, "np": np}
    exec(setting, ns)  # start_layer = -1, start_layer_text = -1
    exec(interpret, ns)

    model = CLIP(*tiny_clip.CHEFER_ARGS).eval()
    names = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tiny_clip.weights(names).items()})
    image = torch.from_numpy(tiny_clip.image())
    texts = torch.from_numpy(tiny_clip.TOKENS)
    out = {"commit": args.commit, "generator": "tests/golden/make_chefer_golden.py", "torch": torch.__version__,
           "notebook_start_layer": ns["start_layer"], "weights": names, "image_relevance": {}}
    for start_layer in (ns["start_layer"], 0):
        _, image_relevance = ns["interpret"](image, texts, model, "cpu", start_layer=start_layer)
        out["image_relevance"][str(start_layer)] = image_relevance.detach().double().tolist()
    Path(args.out).write_text(json.dumps(out) + "\n")
    print({k: np.round(np.array(v)[:, :4], 5).tolist() for k, v in out["image_relevance"].items()}, file=sys.stderr)


if __name__ == "__main__":
    main()
