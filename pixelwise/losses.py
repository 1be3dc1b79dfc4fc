"""Segmentation losses: functional forms plus thin `nn.Module` wrappers, and `build_loss` from a config.

Every loss takes raw logits `(B, K, H, W)` and an int64 target `(B, H, W)` whose pixels equal to
`ignore_index` (255 everywhere in pixelwise) contribute nothing. Models never compute their own loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from pixelwise.errors import UserError

if TYPE_CHECKING:
    from pixelwise.config import LossConfig


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Internal invariant: logits (B, K, H, W) against target (B, H, W)."""
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match; "
            "expected (B, K, H, W) and (B, H, W)"
        )


def pixel_weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, pixel_weight: torch.Tensor, *, ignore_index: int = 255
) -> torch.Tensor:
    """Cross-entropy with a weight per pixel, normalised by the sum of the weights of valid pixels.

    With `pixel_weight = class_weight[target]` this equals `F.cross_entropy(weight=class_weight)`;
    with the U-Net border weight map it is the paper's weighted energy (Ronneberger et al. 2015, eq. 1),
    scaled to a mean so the learning rate does not depend on the image size.

    Shape:
        logits (B, K, H, W), target (B, H, W) int64, pixel_weight (B, H, W) float -> scalar.
    """
    _check(logits, target)
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")  # (B, H, W), 0 at ignore
    w = pixel_weight.to(ce.dtype) * (target != ignore_index)
    return (ce * w).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255, smooth: float = 1.0
) -> torch.Tensor:
    """Soft multiclass Dice loss: 1 - mean over classes of (2|P∩G| + s) / (|P| + |G| + s).

    Sums run over the whole batch (Milletari et al. 2016, V-Net, eq. 1, with squares replaced by
    plain sums as in most segmentation code); ignored pixels are removed from both P and G.
    `smooth` keeps a class absent from both prediction and target at a loss of 0 instead of 0/0.

    Shape:
        logits (B, K, H, W), target (B, H, W) int64 -> scalar.
    """
    _check(logits, target)
    k = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.float().softmax(dim=1) * valid  # (B, K, H, W)
    onehot = F.one_hot(target.clamp(0, k - 1) * (target != ignore_index), k)  # (B, H, W, K)
    onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid  # (B, K, H, W)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (total + smooth)).mean()


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at errors sorted in decreasing order.

    Berman et al. 2018, Alg. 1: with m the foreground indicator in that order, the Jaccard loss of
    predicting the first i pixels wrong is J_i = 1 - (|G| - cumsum(m)_i) / (|G| + cumsum(1 - m)_i);
    the gradient is its first difference.

    Shape:
        gt_sorted (N,) 0/1 -> (N,) float.
    """
    gt = gt_sorted.float()
    gts = gt.sum()
    intersection = gts - gt.cumsum(0)
    union = gts + (1.0 - gt).cumsum(0)
    jaccard = 1.0 - intersection / union
    if len(jaccard) > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


LOVASZ_CLASSES = ("present", "all")  # which classes the Lovasz-Softmax loss averages over


def lovasz_softmax_flat(probs: torch.Tensor, labels: torch.Tensor, *, classes: str = "present") -> torch.Tensor:
    """Lovász-Softmax on flattened, already-filtered pixels (Berman et al. 2018, eq. 8-9).

    For each class c the errors |1[y=c] - p_c| are sorted in decreasing order and dotted with
    `lovasz_grad` of the sorted foreground indicator; the loss is the mean over classes, either the
    classes present in `labels` ("present", the paper's default) or all of them ("all").

    Shape:
        probs (N, K) softmax probabilities, labels (N,) int64 in 0..K-1 -> scalar.
    """
    if classes not in LOVASZ_CLASSES:
        raise ValueError(f"classes={classes!r} is not supported; choose 'present' or 'all'")
    if probs.numel() == 0:
        return probs.sum() * 0.0  # keeps the graph: an all-ignored batch contributes nothing
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).float()
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


def lovasz_softmax(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    classes: str = "present",
    per_image: bool = False,
) -> torch.Tensor:
    """Lovász-Softmax loss, a convex surrogate of 1 - mIoU (Berman et al. 2018, CVPR).

    `per_image=False` treats the batch as one big image (the reference default); True averages
    the per-image losses.

    Shape:
        logits (B, K, H, W), target (B, H, W) int64 -> scalar.
    """
    _check(logits, target)
    probs = logits.float().softmax(dim=1)
    k = probs.shape[1]

    def flat(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = p.permute(0, 2, 3, 1).reshape(-1, k)  # (B*H*W, K)
        t = t.reshape(-1)  # (B*H*W,)
        keep = t != ignore_index
        return lovasz_softmax_flat(p[keep], t[keep], classes=classes)

    if per_image:
        return torch.stack([flat(p[None], t[None]) for p, t in zip(probs, target, strict=True)]).mean()
    return flat(probs, target)


def ohem_mask(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Which pixels online hard example mining keeps: the valid pixels whose probability of the true
    class is below `thresh`, or, when fewer than `min_kept` are, the `min_kept` lowest-probability ones
    (all valid pixels when there are fewer than that).

    Follows the OHEM cross-entropy of PSPNet/OCNet-style code (Shrivastava et al. 2016 applied per pixel).

    Shape:
        logits (B, K, H, W), target (B, H, W) -> bool (B, H, W).
    """
    _check(logits, target)
    with torch.no_grad():
        valid = target != ignore_index
        safe = target.clamp(0, logits.shape[1] - 1) * valid
        prob = logits.float().softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)  # (B, H, W)
        prob = prob.masked_fill(~valid, float("inf"))  # ignored pixels are never the hardest
        kept = (prob < thresh) & valid
        n_valid = int(valid.sum())
        want = min(min_kept, n_valid)
        if int(kept.sum()) < want:
            hardest = prob.reshape(-1).topk(want, largest=False).indices
            kept = torch.zeros_like(valid).reshape(-1)
            kept[hardest] = True
            kept = kept.reshape(valid.shape)
    return kept


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    weight: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Cross-entropy over the hard pixels chosen by `ohem_mask` only (optionally class-weighted).

    Shape:
        logits (B, K, H, W), target (B, H, W) int64 -> scalar.
    """
    kept = ohem_mask(logits, target, thresh=thresh, min_kept=min_kept, ignore_index=ignore_index)
    hard_target = target.masked_fill(~kept, ignore_index)
    return F.cross_entropy(logits, hard_target, weight=weight, ignore_index=ignore_index)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Cross-entropy with class weights and the ignore index (SegNet's median-frequency balancing
    passes `weight`; Badrinarayanan et al. 2017, §4). Identical to `torch.nn.CrossEntropyLoss`.

    Shape:
        logits (B, K, H, W), target (B, H, W) int64 -> scalar.
    """

    def __init__(self, *, weight: torch.Tensor | None = None, ignore_index: int = 255) -> None:
        super().__init__(weight=weight, ignore_index=ignore_index)


def unet_weight_map(
    mask: np.ndarray | torch.Tensor,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: dict[int, float] | None = None,
    *,
    instances: bool = False,
    ignore_index: int = 255,
) -> np.ndarray | torch.Tensor:
    """The U-Net loss weight map w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2)).

    Cells are the connected components (8-connectivity) of the foreground ``mask > 0``, or with
    ``instances=True`` the ids > 0 of an instance mask (touching cells stay separate). d1 and d2
    are the Euclidean distances from a pixel centre to the nearest pixel of the nearest and of the
    second-nearest cell (``scipy.ndimage.distance_transform_edt``; a pixel next to a cell has
    distance 1, so in a one-pixel gap between two cells d1 + d2 = 2, in a two-pixel gap 1 + 2 = 3).
    Distances beyond 6 * sigma are treated as infinite (the term would be below w0 * exp(-18)).
    As in common implementations of the paper, the separation term is added on background pixels
    only, and only when there are at least two cells.

    w_c balances the class frequencies: ``class_weights[c]`` for each class id c when given, else
    w_c = N / (number of classes present * N_c) over the non-ignored pixels (every class then
    carries the same total weight and the mean weight is 1). Ignored pixels get weight 0.

    Args:
        mask: (H, W) class ids (background 0) or, with ``instances=True``, instance ids.
        w0: weight of the separation term (10 in the paper).
        sigma: its width in pixels (about 5 in the paper).
        class_weights: fixed class weights by class id, or None for frequency balancing.
        instances: treat ``mask`` as an instance mask.
        ignore_index: label of pixels that get weight 0.

    Returns:
        float32 weights of shape (H, W), a tensor when ``mask`` is a tensor.

    Shape:
        (H, W) -> (H, W).
    """
    as_tensor = isinstance(mask, torch.Tensor)
    m = mask.detach().cpu().numpy() if as_tensor else np.asarray(mask)
    if m.ndim != 2:
        raise UserError(f"unet_weight_map: mask must be 2-D (H, W), got shape {m.shape}")
    valid = m != ignore_index
    classes = (m > 0).astype(np.int64) if instances else m.astype(np.int64)

    weights = np.zeros(m.shape, dtype=np.float64)
    present = np.unique(classes[valid])
    for c in present:
        sel = valid & (classes == c)
        if class_weights is not None:
            if int(c) not in class_weights:
                raise UserError(f"unet_weight_map: class_weights has no entry for class {int(c)} found in the mask")
            weights[sel] = class_weights[int(c)]
        else:
            weights[sel] = valid.sum() / (len(present) * sel.sum())

    foreground = valid & (m > 0)
    if instances:
        ids, inverse = np.unique(np.where(foreground, m, 0), return_inverse=True)
        cells = inverse.reshape(m.shape) if ids[0] == 0 else inverse.reshape(m.shape) + 1  # 0 = background
        n = len(ids) - 1 if ids[0] == 0 else len(ids)
    else:
        cells, n = ndimage.label(foreground, structure=np.ones((3, 3)))
    if n >= 2:
        background = valid & ~foreground
        d1, d2 = _two_nearest_cells(cells, reach=int(math.ceil(6 * sigma)))
        weights[background] += w0 * np.exp(-((d1 + d2)[background] ** 2) / (2 * sigma**2))

    out = weights.astype(np.float32)
    return torch.from_numpy(out) if as_tensor else out


def _two_nearest_cells(cells: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances d1 <= d2 from every pixel to its nearest and second-nearest cell of the labelled map
    `cells` (0 = background), infinite beyond `reach` pixels: each cell's distance transform is computed
    in its bounding box grown by `reach` only (the U-Net term is below w0 * exp(-18) beyond 6 sigma)."""
    d1 = np.full(cells.shape, np.inf)
    d2 = np.full(cells.shape, np.inf)
    for i, box in enumerate(ndimage.find_objects(cells), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - reach, 0), b.stop + reach) for b in box)
        d = ndimage.distance_transform_edt(cells[box] != i)  # distance to the nearest pixel of cell i
        d2[box] = np.minimum(d2[box], np.maximum(d1[box], d))
        d1[box] = np.minimum(d1[box], d)
    return d1, d2


class UNetWeightMapLoss(nn.Module):
    """Cross-entropy weighted per pixel by the U-Net border weight map (Ronneberger et al. 2015, eq. 2):
    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)), computed from each target mask.

    The map is computed on the CPU with distance transforms for every batch; precompute it in the
    data pipeline for large images if that becomes the bottleneck.

    Shape:
        logits (B, K, H, W), target (B, H, W) int64 -> scalar.
    """

    def __init__(
        self,
        *,
        w0: float = 10.0,
        sigma: float = 5.0,
        ignore_index: int = 255,
        weight_map: Callable[..., np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.weight_map = weight_map or unet_weight_map
        self.w0, self.sigma, self.ignore_index = w0, sigma, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        maps = [
            np.asarray(
                self.weight_map(t.cpu().numpy(), w0=self.w0, sigma=self.sigma, ignore_index=self.ignore_index),
                dtype=np.float32,
            )
            for t in target
        ]
        pixel_weight = torch.from_numpy(np.stack(maps)).to(logits.device)  # (B, H, W)
        return pixel_weighted_cross_entropy(logits, target, pixel_weight, ignore_index=self.ignore_index)


class DiceLoss(nn.Module):
    """Module form of `dice_loss`.

    Shape:
        logits (B, K, H, W), target (B, H, W) int64 -> scalar.
    """

    def __init__(self, *, smooth: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        self.smooth, self.ignore_index = smooth, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(logits, target, ignore_index=self.ignore_index, smooth=self.smooth)


class LovaszSoftmaxLoss(nn.Module):
    """Module form of `lovasz_softmax` (Berman et al. 2018).

    Shape:
        logits (B, K, H, W), target (B, H, W) int64 -> scalar.
    """

    def __init__(self, *, classes: str = "present", per_image: bool = False, ignore_index: int = 255) -> None:
        super().__init__()
        self.classes, self.per_image, self.ignore_index = classes, per_image, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lovasz_softmax(
            logits, target, ignore_index=self.ignore_index, classes=self.classes, per_image=self.per_image
        )


class OhemCrossEntropyLoss(nn.Module):
    """Module form of `ohem_cross_entropy`.

    Shape:
        logits (B, K, H, W), target (B, H, W) int64 -> scalar.
    """

    def __init__(
        self,
        *,
        thresh: float = 0.7,
        min_kept: int = 100_000,
        weight: torch.Tensor | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.thresh, self.min_kept, self.ignore_index = thresh, min_kept, ignore_index
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ohem_cross_entropy(
            logits,
            target,
            thresh=self.thresh,
            min_kept=self.min_kept,
            weight=self.weight,
            ignore_index=self.ignore_index,
        )


# loss.name -> builder from (loss config, class weights, ignore index): the one list of losses
LOSSES: dict[str, Callable[[LossConfig, torch.Tensor | None, int], nn.Module]] = {
    "cross_entropy": lambda cfg, w, ignore: CrossEntropyLoss(weight=w, ignore_index=ignore),
    "unet_weight_map": lambda cfg, w, ignore: UNetWeightMapLoss(w0=cfg.w0, sigma=cfg.sigma, ignore_index=ignore),
    "dice": lambda cfg, w, ignore: DiceLoss(smooth=cfg.dice_smooth, ignore_index=ignore),
    "lovasz_softmax": lambda cfg, w, ignore: LovaszSoftmaxLoss(
        classes=cfg.lovasz_classes, per_image=cfg.lovasz_per_image, ignore_index=ignore
    ),
    "ohem": lambda cfg, w, ignore: OhemCrossEntropyLoss(
        thresh=cfg.ohem_thresh, min_kept=cfg.ohem_min_kept, weight=w, ignore_index=ignore
    ),
}
LOSS_NAMES = tuple(LOSSES)
_WEIGHTED = ("cross_entropy", "ohem")  # the losses that take class weights


def build_loss(cfg: LossConfig, *, class_weights: torch.Tensor | None = None, ignore_index: int = 255) -> nn.Module:
    """The loss module named by `cfg.name`; `class_weights` (K,) apply to the cross-entropy losses."""
    name = cfg.name
    if name not in LOSSES:
        raise UserError(f"loss.name={name!r} is not a loss; choose one of {', '.join(LOSSES)}")
    if class_weights is not None and name not in _WEIGHTED:
        raise UserError(
            f"loss.class_weights is only used by {' and '.join(_WEIGHTED)}, not loss.name={name!r}; "
            "set loss.class_weights=none"
        )
    return LOSSES[name](cfg, class_weights, ignore_index)
