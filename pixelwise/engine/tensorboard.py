"""TensorBoard logging of a training run (``output.tensorboard: true``), through ``torch.utils.tensorboard``.

The same numbers as ``metrics.jsonl`` (which stays the machine-readable record), where many people
already watch their runs: ``train/loss``, ``train/lr``, ``train/images_per_s`` at every logged step;
``val/miou``, ``val/pixel_acc``, ``val/mean_acc`` and ``val_iou/<class>`` at every validation, with
example predictions (image | ground truth | prediction) as images. Event files go to
``output.dir/tensorboard``: ``tensorboard --logdir runs``. Needs the ``tensorboard`` extra.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.config import PIXEL_SCORES
from pixelwise.palette import colorize

TRAIN_SCALARS = ("loss", "lr", "images_per_s")
VAL_SCALARS = PIXEL_SCORES  # what every validation logs
DATASET_SCALARS = ("v_rand", "v_info", "pixel_error")  # engine.dataset_metrics: the challenge scores


class TensorBoardLog:
    """One run's TensorBoard writer; every value is logged at the optimiser step it belongs to.

    Args:
        log_dir: the folder for the event files.
        purge_step: on --resume, the checkpoint's step: TensorBoard drops what an earlier process logged
            from it on, as metrics.jsonl is cut back to it; None for a new run.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "output.tensorboard=true needs the package 'tensorboard': pip install 'pixelwise[tensorboard]'",
                name="tensorboard",
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def record(self, record: dict[str, Any]) -> None:
        """The scalars of one metrics.jsonl record ("kind" train or val)."""
        names = TRAIN_SCALARS if record["kind"] == "train" else VAL_SCALARS
        names += tuple(name for name in DATASET_SCALARS if name in record)  # e.g. ISBI 2012's V_Rand
        for name in names:
            self.writer.add_scalar(f"{record['kind']}/{name}", record[name], record["step"])

    def validation(self, scores: dict[str, Any], data: dict[str, Any], samples: list, step: int) -> None:
        """Per-class IoU (classes absent from the split skipped) and example predictions of one validation.

        Args:
            scores: the validation's scores (``per_class_iou`` in class order).
            data: the run's data: ``classes``, ``palette``, ``ignore_index``.
            samples: (image, ground truth, prediction) triples.
            step: the optimiser step.
        """
        palette, ignore_index = data["palette"], data["ignore_index"]
        for name, iou in zip(data["classes"], scores["per_class_iou"], strict=True):
            if iou is not None and math.isfinite(iou):
                self.writer.add_scalar(f"val_iou/{name}", iou, step)
        for i, (image, truth, pred) in enumerate(samples):
            row = np.concatenate(
                [image, colorize(truth, palette, ignore_index=ignore_index), colorize(pred, palette)], axis=1
            )  # (H, 3W, 3) uint8: image | ground truth | prediction
            self.writer.add_image(f"val_examples/{i}", row, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
