"""Scoring: one path from uint8 images to metrics, for training's validation, `pixelwise evaluate`,
`pixelwise predict`, the service and the benchmarks.

Images are read as uint8 and normalised on the device with the model's own mean/std (`segment`), so
the dense CRF sees the same RGB values the network did. `evaluate` sums one confusion matrix over the
whole split (dataset-level scores, docs/metrics.md) and SegNet's boundary F1 per image, and returns an
`EvalResult`; `metrics_record` turns it into the one metrics.json layout every command writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from pixelwise import distributed
from pixelwise.crf import CRFParams
from pixelwise.errors import ArgumentError, UserError
from pixelwise.inference import DEEPLAB_SCALES, check_options, model_device, normalize, predict_logits
from pixelwise.precision import autocast, precision_name

METRICS_VERSION = 2  # the metrics.json layout; `read_metrics` migrates version 1 (two layouts) on reading


@dataclass(frozen=True)
class InferenceSpec:
    """How a model's scores are computed: the inference mode, refinement and precision.

    Args:
        mode: "whole", "slide" or "multiscale" (see `pixelwise.inference.predict_logits`).
        window: (H, W) window of slide mode (also optional for multiscale).
        stride: (H, W) window step; default 2/3 of the window.
        scales: multiscale factors; default DeepLab's.
        flip: also average the horizontally flipped prediction.
        crf: refine with the dense CRF with these parameters; None = no CRF.
        dtype: autocast dtype (torch.bfloat16, torch.float16) or None for fp32.
    """

    mode: str = "whole"
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = DEEPLAB_SCALES
    flip: bool = False
    crf: CRFParams | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        window, stride = check_options(self.mode, self.window, self.stride, self.scales)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.crf is not None and not isinstance(self.crf, CRFParams):
            raise ArgumentError("crf", self.crf, "give a CRFParams (e.g. CRFParams.preset('deeplab_vgg')) or None")

    def describe(self) -> dict[str, Any]:
        """JSON form for metrics.json and reports."""
        return {
            "mode": self.mode,
            "window": list(self.window) if self.window else None,
            "stride": list(self.stride) if self.stride else None,
            "scales": list(self.scales) if self.mode == "multiscale" else None,
            "flip": self.flip,
            "crf": self.crf.to_dict() if self.crf else None,
            "precision": precision_name(self.dtype),
        }


def segment(
    model: nn.Module,
    images: torch.Tensor,
    spec: InferenceSpec,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int | None = None,
    batch_size: int = 4,
) -> torch.Tensor:
    """Class scores of uint8 images: logits, or CRF-refined probabilities when `spec.crf` is set.
    `batch_size`: windows per forward pass in slide mode (times the image batch), bounding memory.

    Shape:
        (B, 3, H, W) uint8 on the model's device -> (B, K, H, W) float32.
    """
    x = normalize(images, mean, std)  # (B, 3, H, W) float32
    with torch.no_grad(), autocast(images.device, spec.dtype):
        logits = predict_logits(
            model,
            x,
            mode=spec.mode,
            window=spec.window,
            stride=spec.stride,
            scales=spec.scales,
            flip=spec.flip,
            num_classes=num_classes,
            batch_size=batch_size,
        )
    logits = logits.float()  # (B, K, H, W)
    if spec.crf is None:
        return logits
    from pixelwise.crf import dense_crf

    return dense_crf(logits.softmax(1), images, **spec.crf.kwargs())  # (B, K, H, W) probabilities


@dataclass
class EvalResult:
    """What `evaluate` measured. `scores` holds lists per class in class order (NaN: absent class)."""

    scores: dict[str, Any]
    confusion: torch.Tensor  # (K, K) int64, rows ground truth, columns prediction
    num_images: int
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of skipped samples
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # image, truth, pred


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    spec: InferenceSpec,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    ignore_index: int,
    batch_size: int = 1,
    workers: int = 0,
    boundary_f1: bool = True,
    skip_bad: bool = False,
    keep_samples: int = 0,
    shard: bool = False,
    progress: bool = False,
    extra_metrics: Sequence[Any] = (),
) -> EvalResult:
    """Score `model` on `dataset` of (uint8 (3, H, W) image, (H, W) mask) pairs.

    Args:
        boundary_f1: also compute SegNet's boundary F1 (about 0.1 s per 480x360 image on a CPU).
        skip_bad: a sample whose file is bad is listed in `EvalResult.bad` instead of stopping the run.
        keep_samples: keep this many (image (H, W, 3), truth (H, W), prediction (H, W)) triples.
        shard: under DDP, each process scores every world_size-th image and the confusion matrices are
            summed over processes (all must call this; boundary F1 then covers this process's share).
        progress: a progress bar (on terminals only; cleared when done).
        extra_metrics: objects with `update(probs (B, K, H, W), target (B, H, W))` and `compute() -> dict`
            (e.g. `pixelwise.metrics.ISBIChallenge`); their results join `EvalResult.scores`.
    """
    from tqdm import tqdm

    from pixelwise.metrics import BoundaryF1, ConfusionMatrix, to_labels

    if batch_size < 1:
        raise ArgumentError("batch_size", batch_size, "give 1 or more")
    if workers < 0:
        raise ArgumentError("workers", workers, "give 0 or more")
    device = model_device(model)
    model.eval()
    if shard and distributed.world_size() > 1:
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    bf = BoundaryF1(num_classes, ignore_index=ignore_index) if boundary_f1 else None
    result = EvalResult(scores={}, confusion=cm.mat, num_images=0)
    loader = DataLoader(_Guarded(dataset), batch_size=batch_size, num_workers=workers, collate_fn=list)
    with tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=None if progress else True) as bar:
        for batch in bar:
            for images, masks in _same_size_groups(_good(batch, result.bad, skip_bad)):
                images, masks = images.to(device), masks.to(device)  # (B, 3, H, W) uint8, (B, H, W)
                scores = segment(model, images, spec, mean=mean, std=std, num_classes=num_classes)
                pred = to_labels(scores)
                for metric in extra_metrics:
                    metric.update(scores if spec.crf is not None else scores.softmax(1), masks)
                cm.update(pred, masks)
                if bf is not None:
                    bf.update(pred, masks)
                _keep(result.samples, keep_samples, images, masks, pred)
                result.num_images += len(images)
    if shard:
        cm.all_reduce()  # DDP: the scores of the whole data set on every process
    result.confusion = cm.mat.cpu()
    result.scores = {**cm.compute(), **(bf.compute() if bf is not None else {})}
    for metric in extra_metrics:
        result.scores.update(metric.compute())
    return result


def dataset_metrics(dataset: str, classes: Sequence[str]) -> list[Any]:
    """The scores a data set is judged by beside the pixel ones, as `evaluate`'s `extra_metrics`:
    ISBI 2012's challenge scores (V_Rand, V_Info, pixel error; `pixelwise.metrics.ISBIChallenge`)."""
    if dataset != "isbi2012":
        return []
    from pixelwise.metrics import ISBIChallenge

    return [ISBIChallenge(cell_class=list(classes).index("cell") if "cell" in classes else 1)]


class _Guarded(Dataset):
    """A data set whose bad samples (a UserError naming the file) become values, not exceptions
    raised inside a loader worker."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[str, Any, Any]:
        try:
            image, mask = self.dataset[i]
        except UserError as e:
            return "bad", _sample_name(self.dataset, i), str(e)
        return "ok", image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def _sample_name(dataset: Dataset, i: int) -> str:
    """The image file of sample `i` where the data set lists its files, else "sample i"."""
    if isinstance(dataset, Subset):
        return _sample_name(dataset.dataset, dataset.indices[i])
    samples = getattr(dataset, "samples", None)
    return str(samples[i][0]) if samples else f"sample {i}"


def _good(batch: list[tuple[str, Any, Any]], bad: list[tuple[str, str]], skip_bad: bool) -> list[tuple[Any, Any]]:
    """The readable (image, mask) pairs of a batch; bad ones are raised, or listed in `bad` with skip_bad."""
    good = []
    for status, a, b in batch:
        if status == "ok":
            good.append((a, b))
        elif skip_bad:
            bad.append((a, b))
        else:
            raise UserError(b)
    return good


def _same_size_groups(items: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stack consecutive samples of one size: (B, 3, H, W) uint8 images and (B, H, W) masks per group."""
    groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for image, mask in items:
        if groups and groups[-1][0][0].shape == image.shape:
            groups[-1].append((image, mask))
        else:
            groups.append([(image, mask)])
    return [(torch.stack([g[0] for g in grp]), torch.stack([g[1] for g in grp])) for grp in groups]


def _keep(samples: list, limit: int, images: torch.Tensor, masks: torch.Tensor, pred: torch.Tensor) -> None:
    """Append (image (H, W, 3) uint8, truth (H, W), prediction (H, W)) triples until `limit`."""
    for img, gt, p in zip(images, masks, pred, strict=True):
        if len(samples) >= limit:
            return
        samples.append((img.permute(1, 2, 0).cpu().numpy(), gt.cpu().numpy(), p.cpu().numpy()))


# ---- metrics.json: one layout for every command ------------------------------------------------------

_PER_CLASS = {
    "per_class_iou": "per_class_iou",
    "per_class_acc": "per_class_acc",
    "dice": "per_class_dice",
    "per_class_boundary_f1": "per_class_boundary_f1",
}  # EvalResult.scores key -> metrics.json key


def metrics_record(result: EvalResult, classes: Sequence[str], spec: InferenceSpec, **source: Any) -> dict[str, Any]:
    """The metrics.json content: scores (per-class values keyed by class name, NaN as null), what was
    scored and how. `source`: model, weights, dataset, split, trained (epoch/step of the weights)..."""
    scores = {}
    for key, value in result.scores.items():
        if key in _PER_CLASS:
            scores[_PER_CLASS[key]] = dict(zip(classes, (nan_to_none(v) for v in value), strict=True))
        else:
            scores[key] = nan_to_none(value)
    return {
        "version": METRICS_VERSION,
        **source,
        "classes": list(classes),
        "num_images": result.num_images,
        "skipped": [f for f, _ in result.bad],
        "inference": spec.describe(),
        "scores": scores,
    }


def weights_source(path: Path, meta: Any) -> dict[str, Any]:
    """What metrics.json says about the weights scored: file, model, and when in training they were saved."""
    extra = meta.extra
    return {
        "model": meta.model_name,
        "weights": str(path),
        "trained": {k: extra.get(k) for k in ("epoch", "step", "precision")},
    }


def read_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json in the current layout, migrating the two layouts of version 1 (training wrote
    `{"val": {...}}`, `pixelwise evaluate` flat scores with per-class lists)."""
    import json

    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a metrics.json (a JSON object); write it again with pixelwise evaluate")
    if record.get("version") == METRICS_VERSION:
        return record
    if "val" in record:  # training, version 1
        val = dict(record["val"])
        classes = list(val.get("per_class_iou", {}))
        rest = {k: v for k, v in record.items() if k != "val"}
        return {"version": METRICS_VERSION, **rest, "classes": classes, "scores": val}
    classes = record.get("classes", [])
    scores = {
        _PER_CLASS.get(k, k): dict(zip(classes, v, strict=False)) if k in _PER_CLASS else v
        for k, v in record.items()
        if k in _PER_CLASS or k in _SUMMARY_KEYS
    }
    rest = {k: v for k, v in record.items() if k not in _PER_CLASS and k not in _SUMMARY_KEYS}
    return {"version": METRICS_VERSION, **rest, "scores": scores}


_SUMMARY_KEYS = ("pixel_acc", "mean_acc", "miou", "fwiou", "mean_dice", "boundary_f1", "num_pixels")


def nan_to_none(value: Any) -> Any:
    """NaN -> None: JSON has no NaN (a class absent from prediction and ground truth)."""
    return None if isinstance(value, float) and math.isnan(value) else value


def format_table(scores: dict[str, Any]) -> str:
    """Per-class IoU / accuracy / Dice / boundary F1 (percent) with the means underneath, from a
    metrics.json `scores` entry."""

    def pct(v: float | None) -> str:
        return "     -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"

    classes = list(scores["per_class_iou"])
    width = max(12, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}    IoU    Acc   Dice     BF"]
    bf = scores.get("per_class_boundary_f1", {})
    for name in classes:
        lines.append(
            f"{name:<{width}} {pct(scores['per_class_iou'][name])} {pct(scores['per_class_acc'][name])} "
            f"{pct(scores['per_class_dice'][name])} {pct(bf.get(name))}"
        )
    lines.append("-" * len(lines[0]))
    lines.append(
        f"{'mean':<{width}} {pct(scores['miou'])} {pct(scores['mean_acc'])} "
        f"{pct(scores['mean_dice'])} {pct(scores.get('boundary_f1'))}"
    )
    lines.append(f"pixel accuracy {pct(scores['pixel_acc'])}   frequency-weighted IoU {pct(scores['fwiou'])}")
    return "\n".join(lines)
