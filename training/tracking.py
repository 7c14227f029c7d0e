"""Experiment trackers beside TensorBoard: ``--report-to wandb`` (Weights & Biases).

The numbers go under the tags TensorBoard gets (open_clip_train's: ``train/loss``, ``train/scale``,
``val/clip_val_loss``... see :data:`diffclip.training.train.OPEN_CLIP_TAGS`), at the optimizer step (as open_clip
logs to wandb; evaluations carry ``epoch``). The run's flags are its config. The wandb run id is kept in the run
folder (``wandb_id.txt``), so a resumed run (``--resume latest/auto``) continues the same wandb run.
"""

from __future__ import annotations

from pathlib import Path

from diffclip.errors import InputError
from diffclip.files import write_text

__all__ = ["WandbTracker", "make_trackers", "ID_FILE"]

ID_FILE = "wandb_id.txt"


class WandbTracker:
    """One wandb run for a run folder (rank 0). ``config``: the flags (``vars(args)``); ``name``: the run's name.
    wandb's own settings apply (``WANDB_MODE=offline``, ``WANDB_API_KEY``, ``WANDB_ENTITY``...); its files go to
    ``run_dir/wandb``.

    Raises:
        diffclip.errors.InputError: wandb is not installed."""

    def __init__(self, run_dir: Path, project: str, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            raise InputError("--report-to wandb needs wandb: pip install 'diffclip[wandb]'") from None
        id_file = Path(run_dir) / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config)
        if run_id is None:  # the id wandb chose, for the resumed runs
            write_text(id_file, self.run.id + "\n")

    def log(self, kind: str, step: int, values: dict, context: dict) -> None:
        """The numbers of a results.jsonl record under open_clip's tags, at wandb step ``step``."""
        from diffclip.training.train import tensorboard_scalars

        _, scalars = tensorboard_scalars(kind, step, values, context)
        if scalars:
            self.run.log({**scalars, **({"epoch": context["epoch"]} if "epoch" in context else {})}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_trackers(args, run_dir: Path) -> list:
    """The trackers ``--report-to`` names beside TensorBoard (which :class:`MetricsLogger` writes itself)."""
    if "wandb" not in args.report_to.split(","):
        return []
    return [WandbTracker(run_dir, args.wandb_project_name, dict(sorted(vars(args).items())), args.name)]
