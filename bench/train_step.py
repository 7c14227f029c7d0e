"""Benchmark: one contrastive training step (forward + backward + AdamW step) of DiffCLIP vs open_clip.

Models, built in one process and timed with interleaved repetitions (median reported):

* ``DiffCLIP-ViT-B-16`` (ours, differential attention), open_clip's own ``ViT-B-16``
  (``open_clip.create_model("ViT-B-16")``) and our standard-attention twin ``CLIP-ViT-B-16``;
* ``DiffCLIP-Tiny-64`` vs an open_clip ``CLIP`` of the same shape (64 px, patch 8, width 192 x 6 layers, 4 heads;
  text width 128 x 4 layers, 4 heads, context 32) and our twin ``CLIP-Tiny-64``.

A step is the one ``training/main.py`` takes: the model's image and text embeddings, L2-normalised, the CLIP
loss (:class:`diffclip.loss.ClipLoss`), ``backward``, ``AdamW.step`` (weight decay groups of
:func:`training.train.param_groups` for ours, all parameters for open_clip's). Peak memory is the growth of the
peak resident set (VmHWM) of a spawned child that builds the model and optimizer and runs one step (AdamW state included:
CPU has no allocator statistics; on CUDA ``torch.cuda.max_memory_allocated`` is used instead).

    nice python bench/train_step.py [--batch-b16 4] [--batch-tiny 32] [--reps 9] [--device cpu] [--skip-b16]
        [--threads N] [--no-memory] [--force-patch-dropout 0.5]

``--force-patch-dropout p`` also times every model with FLIP's patch dropout (ours: ``DiffCLIP.set_patch_dropout``,
timm's ``PatchDropout``; open_clip: its own ``PatchDropout``, what ``open_clip.create_model(...,
force_patch_dropout=p)`` installs), the same weights toggled between the two settings, and prints the ratio.

Target: DiffCLIP's step time <= 1.05x open_clip's at the same batch (issue 3).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import resource
import statistics
import time

import open_clip
import torch
import torch.nn.functional as F
from diffclip.training.train import param_groups
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

import diffclip
from diffclip.loss import ClipLoss


def open_clip_tiny() -> torch.nn.Module:
    """open_clip's CLIP with the shape of ``DiffCLIP-Tiny-64`` (QuickGELU in both towers as open_clip's
    ``quick_gelu`` flag sets it; our tiny vision tower uses exact GELU, a negligible difference in cost)."""
    return CLIP(embed_dim=128, vision_cfg=CLIPVisionCfg(layers=6, width=192, head_width=48, patch_size=8,
                                                        image_size=64),
                text_cfg=CLIPTextCfg(context_length=32, width=128, heads=4, layers=4), quick_gelu=True)


SUITES = {
    "ViT-B/16": {"image_size": 224, "ctx": 77, "models": {
        "DiffCLIP-ViT-B-16": lambda: diffclip.create_model("DiffCLIP-ViT-B-16"),
        "open_clip ViT-B-16": lambda: open_clip.create_model("ViT-B-16"),
        "CLIP-ViT-B-16 (ours)": lambda: diffclip.create_model("CLIP-ViT-B-16")}},
    "Tiny-64": {"image_size": 64, "ctx": 32, "models": {
        "DiffCLIP-Tiny-64": lambda: diffclip.create_model("DiffCLIP-Tiny-64"),
        "open_clip tiny (same shape)": open_clip_tiny,
        "CLIP-Tiny-64 (ours)": lambda: diffclip.create_model("CLIP-Tiny-64")}},
}


def make_inputs(batch: int, image_size: int, ctx: int, device: str):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    texts = torch.randint(1, 49406, (batch, ctx), generator=g)
    texts[:, 0], texts[:, ctx // 2], texts[:, ctx // 2 + 1:] = 49406, 49407, 0
    return images.to(device), texts.to(device)


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, 0.2) if isinstance(model, diffclip.DiffCLIP) else model.parameters()
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-6)


def set_patch_dropout(model: torch.nn.Module, prob: float) -> None:
    """FLIP's patch dropout on ours (timm's ``PatchDropout``) or on an open_clip CLIP (open_clip's own, as
    ``create_model(..., force_patch_dropout=prob)`` installs it); 0 removes it."""
    if isinstance(model, diffclip.DiffCLIP):
        model.set_patch_dropout(prob)
    else:
        from open_clip.transformer import PatchDropout

        model.visual.patch_dropout = PatchDropout(prob) if prob > 0 else torch.nn.Identity()


def features(model, images, texts):
    """L2-normalised image and text features and ``exp(logit_scale)`` through the model's ``forward`` (so that a
    ``torch.compile``d model runs compiled): ours returns the release's dict, open_clip's CLIP a tuple."""
    out = model(images, texts)
    if isinstance(out, dict):
        return F.normalize(out["image_embed"], dim=-1), F.normalize(out["text_embed"], dim=-1), out["logit_scale"]
    return out[0], out[1], out[2]


def train_step(model, optimizer, loss_fn, images, texts, autocast=None) -> None:
    """zero_grad, forward (under ``autocast``, a ``torch.autocast`` context factory, when given), CLIP loss,
    backward, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    with autocast() if autocast is not None else contextlib.nullcontext():
        loss = loss_fn(*features(model, images, texts))
    loss.backward()
    optimizer.step()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(steps: dict, reps: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each ``steps[name]()`` (no arguments), ``reps`` rounds, the order rotating each round so
    that no candidate always follows the same one; the caller warms up."""
    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t = time.perf_counter()
            steps[k]()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def _peak_rss_kib() -> int:
    """This process's peak resident set (KiB): ``VmHWM`` of /proc/self/status on Linux, which starts afresh at
    exec (``ru_maxrss`` keeps the maximum of the process that forked the child), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child_peak(suite: str, name: str, batch: int, device: str, patch_dropout: float, q) -> None:
    torch.manual_seed(0)
    s = SUITES[suite]
    model = s["models"][name]().to(device).train()
    set_patch_dropout(model, patch_dropout)
    opt = make_optimizer(name, model)
    images, texts = make_inputs(batch, s["image_size"], s["ctx"], device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, opt, ClipLoss(), images, texts)
        q.put((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    base = _peak_rss_kib()
    train_step(model, opt, ClipLoss(), images, texts)
    q.put((_peak_rss_kib() - base) / 1024)


def peak_mib(suite: str, name: str, batch: int, device: str, patch_dropout: float = 0.0) -> float:
    ctx = mp.get_context("spawn")  # a forked child of a process that ran OpenMP work can hang
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(suite, name, batch, device, patch_dropout, q))
    p.start()
    out = q.get()
    p.join()
    return out


def run_suite(suite: str, batch: int, reps: int, device: str, memory: bool,
              patch_dropout: float = 0.0) -> dict[str, float]:
    s = SUITES[suite]
    torch.manual_seed(0)
    models = {k: f().to(device).train() for k, f in s["models"].items()}
    opts = {k: make_optimizer(k, m) for k, m in models.items()}
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    images, texts = make_inputs(batch, s["image_size"], s["ctx"], device)
    loss_fn = ClipLoss()
    # candidates: (model, patch dropout); with --force-patch-dropout each model runs both ways, its weights shared
    cands = {k: (k, 0.0) for k in models}
    if patch_dropout:
        cands.update({f"{k} + patch dropout {patch_dropout:g}": (k, patch_dropout) for k in models})

    def stepper(model, opt, p: float):
        def run():
            set_patch_dropout(model, p)
            train_step(model, opt, loss_fn, images, texts)
        return run

    steps = {c: stepper(models[k], opts[k], p) for c, (k, p) in cands.items()}
    for run in steps.values():  # warm-up (allocates the AdamW state)
        run()
    times = time_interleaved(steps, reps, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    del models, opts, steps
    ref = next(k for k in med if k.startswith("open_clip"))
    ours = next(iter(med))
    print(f"\n{suite}: batch {batch}, {s['image_size']} px, context {s['ctx']}; median of {reps} interleaved steps")
    print("| model | parameters | step s (median) | min..max | samples/s | peak MiB | vs open_clip |")
    print("|---|---|---|---|---|---|---|")
    for k, t in med.items():
        name, p = cands[k]
        mem = f"{peak_mib(suite, name, batch, device, p):.0f}" if memory else "-"
        print(f"| {k} | {n_params[name]:,} | {t:.3f} | {min(times[k]):.3f}..{max(times[k]):.3f} | {batch / t:.1f} | "
              f"{mem} | {t / med[ref]:.3f}x |")
    twin = [k for k in models_of(cands) if k not in (ours, ref)][0]
    best = {k: min(v) for k, v in times.items()}

    def paired(a: str, b: str) -> float:  # median over rounds of the ratio within a round (robust to drift)
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"{ours} / {ref} = {med[ours] / med[ref]:.3f} (medians; paired by round: {paired(ours, ref):.3f}; fastest "
          f"steps: {best[ours] / best[ref]:.3f}; target <= 1.05); {ours} / {twin} = {med[ours] / med[twin]:.3f} "
          f"(paired: {paired(ours, twin):.3f}; fastest: {best[ours] / best[twin]:.3f})")
    for c, (k, p) in cands.items():
        if p:
            print(f"{k}: patch dropout {p:g} / none = {med[c] / med[k]:.3f} (paired: {paired(c, k):.3f})")
    if patch_dropout:
        pd = {k: c for c, (k, p) in cands.items() if p}
        print(f"with patch dropout {patch_dropout:g}: {ours} / {ref} = {med[pd[ours]] / med[pd[ref]]:.3f} "
              f"(paired: {paired(pd[ours], pd[ref]):.3f})")
    return med


def models_of(cands: dict) -> list[str]:
    """The model names of the candidates, in order, each once."""
    return list(dict.fromkeys(k for k, _ in cands.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-b16", type=int, default=4)
    ap.add_argument("--batch-tiny", type=int, default=32)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-b16", action="store_true", help="only the tiny suite")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--force-patch-dropout", type=float, default=0.0,
                    help="also time each model with this patch dropout (FLIP), e.g. 0.5")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}")
    if not args.skip_b16:
        run_suite("ViT-B/16", args.batch_b16, args.reps, args.device, not args.no_memory, args.force_patch_dropout)
    run_suite("Tiny-64", args.batch_tiny, args.reps, args.device, not args.no_memory, args.force_patch_dropout)


if __name__ == "__main__":
    main()
