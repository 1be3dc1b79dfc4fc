"""Segmentation metrics: a streaming confusion matrix, the boundary F1 score, and the ISBI 2012 scores.

Conventions (see docs/metrics.md):
- Pixels whose target is the ignore index (or any value outside 0..K-1) are not counted.
- All scores are dataset-level: they come from the confusion matrix summed over every image, not from
  per-image scores averaged (which would weigh a small image like a large one).
- A class with no ground-truth pixel and no predicted pixel has IoU, accuracy and Dice = NaN; NaN
  classes are left out of the means (`miou`, `mean_acc`, `mean_dice`). A class present in the ground
  truth or in the predictions is always counted (a class predicted but absent has IoU 0).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# re-exported ("x as x"): the ISBI 2012 challenge's scores
from pixelwise.metrics_em import ISBI_THRESHOLDS as ISBI_THRESHOLDS
from pixelwise.metrics_em import ISBIChallenge as ISBIChallenge
from pixelwise.metrics_em import cell_segments as cell_segments
from pixelwise.metrics_em import isbi_challenge_scores as isbi_challenge_scores
from pixelwise.metrics_em import isbi_pixel_error as isbi_pixel_error
from pixelwise.metrics_em import rand_info_scores as rand_info_scores
from pixelwise.metrics_em import thin_borders as thin_borders


def to_labels(pred: torch.Tensor) -> torch.Tensor:
    """Logits (B, K, H, W) -> labels (B, H, W); labels pass through.

    On CPU, `max(dim=0)` over one sample's leading class axis is several times faster than
    `argmax(dim=1)` on the batch (a contiguous reduction); both return the first index of a tie.
    """
    if pred.is_floating_point() and pred.ndim == 4:
        if pred.device.type == "cpu":
            return torch.stack([p.max(dim=0).indices for p in pred])  # (B, H, W)
        return pred.argmax(dim=1)  # (B, H, W)
    if pred.is_floating_point():
        raise ValueError(f"pred of shape {tuple(pred.shape)} is floating point: give logits (B, K, H, W) or labels")
    return pred


class ConfusionMatrix:
    """Streaming K x K confusion matrix (rows: ground truth, columns: prediction) and the usual scores.

    Scores as in Long et al. 2015 (FCN, §5): pixel accuracy, mean class accuracy, mean IoU and
    frequency-weighted IoU, plus per-class Dice (F1). Absent classes: see the module docstring.

    Args:
        num_classes: K.
        ignore_index: target value that is not scored; must lie outside 0..K-1.
        device: where the matrix lives; default the device of the first update.

    Shape:
        update(pred, target): pred (B, K, H, W) logits or (B, H, W) labels, target (B, H, W).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be at least 1")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class index (0..{num_classes - 1}); use e.g. 255")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits are reduced with argmax on their own device, then one bincount."""
        k = self.num_classes
        if pred.is_floating_point() and pred.ndim == 4 and pred.shape[1] != k:
            raise ValueError(f"logits have {pred.shape[1]} channels but the matrix has num_classes={k}")
        labels = to_labels(pred)
        if not pred.is_floating_point() and labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"predicted labels span {int(labels.min())}..{int(labels.max())}, outside 0..{k - 1}")
        if labels.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(labels.shape)} does not match target {tuple(target.shape)}")
        target = target.to(labels.device)
        if self.mat.device != labels.device:
            self.mat = self.mat.to(labels.device)
        # int32 codes halve the memory traffic; K*K + 1 < 2^31 for any K below 46,000
        dtype = torch.int32 if k * k < 2**31 - 1 else torch.int64
        t = target.to(dtype)
        valid = (t >= 0) & (t < k)
        code = torch.where(valid, t * k + labels.to(dtype), k * k)  # invalid pixels go to one spare bin
        counts = torch.bincount(code.reshape(-1), minlength=k * k + 1)[: k * k]
        self.mat += counts.reshape(k, k).to(torch.int64)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes (no-op unless torch.distributed is initialised)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, Any]:
        """Scores as Python floats; per-class lists hold NaN for classes absent from target and prediction.

        Returns:
            pixel_acc, mean_acc, miou, fwiou, mean_dice (floats); per_class_iou, per_class_acc,
            dice (lists of K floats); num_pixels (int).
        """
        m = self.mat.double().cpu()
        tp = m.diag()
        gt = m.sum(1)  # pixels of each class in the ground truth
        pr = m.sum(0)  # pixels predicted as each class
        total = m.sum()
        union = gt + pr - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        dice = torch.where(union > 0, 2 * tp / (gt + pr).clamp(min=1), nan)
        freq = gt / total if total > 0 else torch.zeros_like(gt)
        present = gt > 0
        fwiou = float((freq[present] * iou[present]).sum()) if total > 0 else math.nan
        return {
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_acc": _nanmean(acc),
            "miou": _nanmean(iou),
            "fwiou": fwiou,
            "mean_dice": _nanmean(dice),
            "per_class_iou": iou.tolist(),
            "per_class_acc": acc.tolist(),
            "dice": dice.tolist(),
            "num_pixels": int(total),
        }


def _nanmean(x: torch.Tensor) -> float:
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if keep.any() else math.nan


# -------------------------------------------------------------------------------------- boundary F1
BF_TOLERANCE = 0.0075  # SegNet (Badrinarayanan et al. 2017, §4): 0.75% of the image diagonal


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label; the image border is not an edge. Shape (H, W) bool.

    For any class c, `_edges(labels) & (labels == c)` is the inner boundary of the region of c.
    """
    edges = np.zeros(labels.shape, dtype=bool)
    d = labels[1:, :] != labels[:-1, :]
    edges[1:, :] |= d
    edges[:-1, :] |= d
    d = labels[:, 1:] != labels[:, :-1]
    edges[:, 1:] |= d
    edges[:, :-1] |= d
    return edges


def boundary_f1_per_image(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    *,
    ignore_index: int = 255,
    tolerance: float = BF_TOLERANCE,
) -> np.ndarray:
    """Boundary F1 per class for one image (Csurka et al. 2013, as used by SegNet).

    For each class present in `target`, the boundaries of `pred == c` and `target == c` (region
    pixels with a 4-neighbour outside the region; the image border is not a boundary) are compared:
    precision is the share of predicted boundary pixels within `tolerance` x image diagonal
    (Euclidean) of a true boundary pixel, recall the share of true boundary pixels within that distance
    of a predicted one, F1 = 2PR / (P + R). Pixels whose target is ignored are taken out of the
    prediction too. A class whose region has no boundary in either map (it fills the image) scores 1;
    a boundary on one side only scores 0.

    Returns:
        (K,) float64: F1 per class, NaN for classes absent from `target`.

    Shape:
        pred (H, W) labels, target (H, W).
    """
    from scipy import ndimage

    pred = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    target = target.cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    h, w = target.shape
    tol = tolerance * math.hypot(h, w)
    reach = int(math.ceil(tol)) + 1
    valid = (target >= 0) & (target < num_classes) & (target != ignore_index)  # the ignore index lies outside
    target = np.where(valid, target, -1)
    pred = np.where(valid, pred, -1)
    gt_edges, pr_edges = _edges(target), _edges(pred)
    scores = np.full(num_classes, np.nan)
    for c in np.unique(target[valid]):
        gt_b = gt_edges & (target == c)
        pr_b = pr_edges & (pred == c)
        n_gt, n_pr = int(gt_b.sum()), int(pr_b.sum())
        if n_gt == 0 or n_pr == 0:
            scores[c] = 1.0 if n_gt == n_pr else 0.0
            continue
        # distances beyond the tolerance do not matter: work in the boundaries' box grown by it
        ys, xs = np.nonzero(gt_b | pr_b)
        box = (
            slice(max(ys.min() - reach, 0), ys.max() + reach + 1),
            slice(max(xs.min() - reach, 0), xs.max() + reach + 1),
        )
        gt_b, pr_b = gt_b[box], pr_b[box]
        precision = float((ndimage.distance_transform_edt(~gt_b)[pr_b] <= tol).mean())
        recall = float((ndimage.distance_transform_edt(~pr_b)[gt_b] <= tol).mean())
        scores[c] = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return scores


def boundary_matches(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    *,
    ignore_index: int = 255,
    tolerance: float = BF_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Where `boundary_f1_per_image` finds its matches, per pixel, for drawing them.

    The same boundaries, classes and tolerance: for each class present in `target`, a predicted boundary
    pixel of that class is matched when a true boundary pixel of the class lies within the tolerance
    (precision's numerator), a true boundary pixel when a predicted one does (recall's). A pixel belongs to
    one class on each side, so the classes' boundaries do not overlap and one map per side holds them all.

    Returns:
        predicted: (H, W) uint8, 0 = no scored predicted boundary, 1 = matched, 2 = unmatched (false);
        true: (H, W) uint8, 0 = no true boundary, 1 = found, 2 = missed.

    Shape:
        pred (H, W) labels, target (H, W).
    """
    from scipy import ndimage

    pred, target = np.asarray(pred), np.asarray(target)
    tol = tolerance * math.hypot(*target.shape)
    valid = (target >= 0) & (target < num_classes) & (target != ignore_index)
    target, pred = np.where(valid, target, -1), np.where(valid, pred, -1)
    gt_edges, pr_edges = _edges(target), _edges(pred)
    predicted = np.zeros(target.shape, np.uint8)
    true = np.zeros(target.shape, np.uint8)
    for c in np.unique(target[valid]):
        gt_b, pr_b = gt_edges & (target == c), pr_edges & (pred == c)
        near_gt = ndimage.distance_transform_edt(~gt_b) <= tol if gt_b.any() else np.zeros_like(gt_b)
        near_pr = ndimage.distance_transform_edt(~pr_b) <= tol if pr_b.any() else np.zeros_like(pr_b)
        predicted[pr_b] = np.where(near_gt[pr_b], 1, 2)
        true[gt_b] = np.where(near_pr[gt_b], 1, 2)
    return predicted, true


class BoundaryF1:
    """Streaming boundary F1 (SegNet's BF): per image, the mean F1 over classes in its ground truth;
    the score is the mean over images. Per-class means are over the images containing the class.

    Shape:
        update(pred, target): pred (B, K, H, W) logits or (B, H, W) labels, target (B, H, W).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, tolerance: float = BF_TOLERANCE) -> None:
        self.num_classes, self.ignore_index, self.tolerance = num_classes, ignore_index, tolerance
        self.per_image: list[np.ndarray] = []

    def reset(self) -> None:
        self.per_image = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        labels = to_labels(pred).cpu()
        for p, t in zip(labels, target.cpu(), strict=True):
            self.per_image.append(
                boundary_f1_per_image(p, t, self.num_classes, ignore_index=self.ignore_index, tolerance=self.tolerance)
            )

    def compute(self) -> dict[str, Any]:
        """Returns boundary_f1 (mean of image means) and per_class_boundary_f1 (list of K, NaN if never present)."""
        if not self.per_image:
            return {"boundary_f1": math.nan, "per_class_boundary_f1": [math.nan] * self.num_classes}
        scores = np.stack(self.per_image)  # (N, K)
        present = ~np.isnan(scores)
        image_means = [float(s[p].mean()) for s, p in zip(scores, present, strict=True) if p.any()]
        counts = present.sum(0)
        per_class = np.where(counts > 0, np.nansum(scores, 0) / np.maximum(counts, 1), np.nan)
        return {
            "boundary_f1": float(np.mean(image_means)) if image_means else math.nan,
            "per_class_boundary_f1": per_class.tolist(),
        }


def boundary_f1(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int,
    *,
    ignore_index: int = 255,
    tolerance: float = BF_TOLERANCE,
) -> float:
    """SegNet's BF score of a batch: the mean over images of the mean F1 over each image's classes.

    Shape:
        pred (B, K, H, W) logits or (B, H, W) labels (or one (H, W) map), target of the label shape.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if target.ndim == 2:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    bf = BoundaryF1(num_classes, ignore_index=ignore_index, tolerance=tolerance)
    bf.update(pred, target)
    return bf.compute()["boundary_f1"]
