"""The ISBI 2012 EM segmentation challenge's scores: V_Rand and V_Info after border thinning, pixel error.

Definitions as the challenge computes them (Arganda-Carreras et al., "Crowdsourcing the creation of image
segmentation algorithms for connectomics", Front. Neuroanat. 2015; the evaluation code is Fiji's
Trainable_Segmentation: `RandError.getMaximalVRandAfterThinning(0, 1, 0.1, true)`,
`VariationOfInformation.getMaximalVInfoAfterThinning(0, 1, 0.1)` and
`PixelError.getPixelErrorMaximalFScore(0, 1, 0.1)`). See docs/metrics.md.

Polarity: everything here takes the probability that a pixel is **cell interior** (not membrane), the
polarity of the challenge's labels (255 = cell) and of pixelwise's ISBI masks (class 1 = cell). The
reference thresholds the proposal as `value > t` -> cell; give `1 - p_membrane` for a membrane map.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage


def _fiji_thresholds(start: float = 0.0, stop: float = 1.0, step: float = 0.1) -> tuple[float, ...]:
    """The reference's `for (th = start; th <= stop; th += step)`: accumulated doubles, not k / 10."""
    out, t = [], start
    while t <= stop:
        out.append(t)
        t += step
    return tuple(out)


# 0.0, 0.1, 0.2, 0.30000000000000004, ..., 0.7999999999999999, 0.8999999999999999, 0.9999999999999999:
# the last one keeps a probability of exactly 1.0 on the cell side, as in the challenge
ISBI_THRESHOLDS = _fiji_thresholds()

_UNSET = -1  # border pixel not flooded yet; also the padding frame
_LINE = 0  # watershed line: a proposal-border pixel, scored as a segment of its own
_NEVER = np.iinfo(np.int32).max


# ------------------------------------------------------------------------------------------ segments
def cell_segments(labels: np.ndarray) -> np.ndarray:
    """Ground-truth segments: 4-connected components of the cell pixels (`labels > 0`); 0 = membrane.

    Shape:
        labels (H, W) -> (H, W) int32.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels of shape {labels.shape} must be one (H, W) slice")
    return ndimage.label(labels > 0)[0].astype(np.int32)  # SciPy's default structure in 2-D is 4-connected


def thin_borders(cell: np.ndarray) -> np.ndarray:
    """Segments of a binary proposal after thinning its borders to 1-pixel lines, as the challenge does.

    The challenge inverts the thresholded proposal (borders high, cells low) and runs Fiji's
    `WatershedTransform2D` with 4-connectivity: the Vincent & Soille (1991) immersion algorithm. On a
    binary map that is: the 4-connected components of `cell` are the basins; the border pixels are
    flooded breadth-first from them with one FIFO queue, seeded with the border pixels next to a cell in
    column-major order and growing in the neighbour order left, up, right, down. A border pixel takes
    the label of the neighbours already flooded when it is taken from the queue if they carry one label,
    and becomes a watershed line pixel if they carry two or more (or only line pixels). The queue order
    is reproduced exactly, one breadth-first layer at a time, so the lines fall on the same pixels as in
    Fiji. A map with no cell is one segment; a map with no border, its 4-connected components.

    Returns:
        (H, W) int32: 0 on watershed lines (proposal borders), segments 1, 2, ...

    Shape:
        cell (H, W) bool.
    """
    cell = np.asarray(cell, dtype=bool)
    if cell.ndim != 2:
        raise ValueError(f"cell of shape {cell.shape} must be one (H, W) slice")
    if cell.all() or not cell.any():  # a single grey level: Fiji labels its 4-connected components
        return ndimage.label(np.ones_like(cell) if not cell.any() else cell)[0].astype(np.int32)
    # transposed, C order is Fiji's column-major pixel list; a frame of non-border, non-cell pixels
    # saves the bounds checks
    cells = np.pad(cell.T, 1)  # (W + 2, H + 2)
    shape, stride = cells.shape, cells.shape[1]
    offsets = np.array([-stride, -1, stride, 1], dtype=np.int32)  # Fiji's order: x - 1, y - 1, x + 1, y + 1
    basins = ndimage.label(cells)[0].ravel()
    cells, border = cells.ravel(), np.pad(~cell.T, 1).ravel()
    lab = np.where(cells, basins, _UNSET).astype(np.int32)
    when = np.where(cells, -1, _NEVER).astype(np.int32)  # position in the FIFO; basins come first
    cand = np.full(lab.size, _UNSET, dtype=np.int32)
    claim = np.full(lab.size, _NEVER, dtype=np.int32)
    touch = np.zeros_like(cells)
    for off in offsets:
        touch[max(off, 0) : lab.size + min(off, 0)] |= cells[max(-off, 0) : lab.size + min(-off, 0)]
    cur = np.flatnonzero(border & touch).astype(np.int32)  # the first layer, in column-major order
    pending = border & ~touch
    polled = 0
    while cur.size:
        when[cur] = np.arange(polled, polled + cur.size, dtype=np.int32)
        nbrs = cur[:, None] + offsets  # (m, 4) in the order Fiji visits them
        _flood_layer(lab, when, cand, cur, nbrs, polled)
        polled += cur.size
        cur = _next_layer(nbrs, pending, claim)
    return np.ascontiguousarray(lab.reshape(shape)[1:-1, 1:-1].T)  # (H, W)


def _next_layer(nbrs: np.ndarray, pending: np.ndarray, claim: np.ndarray) -> np.ndarray:
    """Border pixels first reached from this layer, in the order the FIFO receives them."""
    q = nbrs.ravel()  # row-major: pixel by pixel in queue order, each in neighbour order
    q = q[pending[q]]
    order = np.arange(q.size, dtype=np.int32)
    np.minimum.at(claim, q, order)  # the first pixel to reach q enqueues it
    nxt = q[claim[q] == order]
    pending[nxt] = False
    return nxt


def _label_range(vals: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the smallest and largest positive label among the masked entries (big / 0 if none)."""
    pos = mask & (vals > 0)
    return np.where(pos, vals, _NEVER).min(1), np.where(pos, vals, 0).max(1)


def _flood_layer(
    lab: np.ndarray, when: np.ndarray, cand: np.ndarray, cur: np.ndarray, nbrs: np.ndarray, base: int
) -> None:
    """Label one breadth-first layer `cur` (in queue order) as the sequential FIFO would.

    A pixel sees the neighbours taken from the queue before it: basins, earlier layers and the earlier
    pixels of its own layer. Most pixels are settled by the earlier layers alone; the few whose own-layer
    predecessors may carry another label are settled in rounds, each pixel once its predecessors are.
    """
    when_q = when[nbrs]  # (m, 4)
    seen_before = when_q < when[cur][:, None]
    same = seen_before & (when_q >= base)  # earlier pixels of this layer, not labelled yet
    lo, hi = _label_range(lab[nbrs], seen_before & ~same)
    # what the earlier layers say: one label, a conflict (line) or nothing (_UNSET)
    own = np.where(hi == 0, _UNSET, np.where(lo == hi, hi, _LINE))
    cand[cur] = own
    peer = cand[nbrs]
    rival = same & (peer != _LINE) & (peer != own[:, None])  # may end with another label than ours
    settled = (own == _LINE) | ((own > 0) & ~rival.any(1))
    lab[cur[settled]] = own[settled]
    todo = np.flatnonzero(~settled)
    while todo.size:
        vals = lab[nbrs[todo]]
        ready = ~(same[todo] & (vals == _UNSET)).any(1)
        done = todo[ready]
        lo, hi = _label_range(vals[ready], seen_before[done])
        lab[cur[done]] = np.where((hi > 0) & (lo == hi), hi, _LINE)
        todo = todo[~ready]


# ------------------------------------------------------------------------------------------- scores
def _plogp(counts: np.ndarray, n: int) -> float:
    """sum of (c/n) log(c/n) over the counts (natural log; the scores are ratios of entropies)."""
    p = counts[counts > 0] / n
    return float((p * np.log(p)).sum())


def _f_score(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rand_info_scores(gt_segments: np.ndarray, proposal_segments: np.ndarray) -> dict[str, float]:
    """Foreground-restricted V_Rand and V_Info of one slice, with their split and merge parts.

    Only pixels inside ground-truth segments (`gt_segments > 0`) are scored, n of them. With p_ij the
    number of those pixels in true segment i and proposed segment j (j >= 1), a_i = sum_j p_ij plus the
    pixels of i on a proposal border (`proposal_segments == 0`; each such pixel is a segment of its own,
    s of them in all) and b_j = sum_i p_ij:

    - V_Rand = 2 (sum p_ij^2 + s) / (sum a_i^2 + sum b_j^2 + s): the F-score of
      V_Rand_split = (sum p_ij^2 + s) / sum a_i^2 and V_Rand_merge = (sum p_ij^2 + s) / (sum b_j^2 + s)
      (Rand index of ordered pixel pairs, a pixel paired with itself included).
    - V_Info = 2 I / (H(T) + H(S)): the F-score of V_Info_split = I / H(S) and V_Info_merge = I / H(T),
      with T the true and S the proposed segmentation, I their mutual information. As in the
      reference, V_Info is 0 when either segmentation is a single segment (an entropy of 0).

    Returns:
        v_rand, v_rand_split, v_rand_merge, v_info, v_info_split, v_info_merge.

    Shape:
        gt_segments (H, W) ints, 0 = membrane; proposal_segments (H, W) ints, 0 = border.
    """
    gt, prop = np.asarray(gt_segments), np.asarray(proposal_segments)
    if gt.shape != prop.shape:
        raise ValueError(f"proposal_segments shape {prop.shape} does not match gt_segments {gt.shape}")
    if gt.size and min(gt.min(), prop.min()) < 0:
        raise ValueError(f"segment labels must be >= 0; got minima {gt.min()} (gt) and {prop.min()} (proposal)")
    inside = gt > 0
    n = int(inside.sum())
    if n == 0:
        raise ValueError("gt_segments has no segment (no pixel > 0): the foreground-restricted scores are undefined")
    gt, prop = gt[inside].astype(np.int64), prop[inside].astype(np.int64)
    single = prop == 0
    s = int(single.sum())
    a = np.bincount(gt)
    b = np.bincount(prop[~single])
    _, p_ij = np.unique(gt[~single] * (int(prop.max()) + 1) + prop[~single], return_counts=True)
    tp = int((p_ij.astype(np.int64) ** 2).sum()) + s  # ordered pairs together in both, self-pairs included
    sum_a2 = int((a.astype(np.int64) ** 2).sum())
    sum_b2 = int((b.astype(np.int64) ** 2).sum()) + s
    rand_split, rand_merge = tp / sum_a2, tp / sum_b2

    s_log_n = s / n * math.log(n)  # each border pixel alone: s terms of (1/n) log(1/n)
    h_t = -_plogp(a, n)
    h_s = -_plogp(b, n) + s_log_n
    h_ts = -_plogp(p_ij, n) + s_log_n
    if np.count_nonzero(b) + s == 1:  # H(S) = 0: the reference sets merge 1, split 0 (its last word)
        info_merge, info_split = 1.0, 0.0
    elif np.count_nonzero(a) == 1:  # H(T) = 0: merge 0, split 1
        info_merge, info_split = 0.0, 1.0
    else:
        mutual = h_t + h_s - h_ts
        info_merge, info_split = mutual / h_t, mutual / h_s
    return {
        "v_rand": _f_score(rand_merge, rand_split),
        "v_rand_split": rand_split,
        "v_rand_merge": rand_merge,
        "v_info": _f_score(info_merge, info_split),
        "v_info_split": info_split,
        "v_info_merge": info_merge,
    }


def _as_stack(cell_prob: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) float64 holding float32 values (the reference reads a 32-bit stack), and (N, H, W) labels."""
    prob, labels = np.asarray(cell_prob), np.asarray(labels)
    if prob.ndim == 2:
        prob, labels = prob[None], labels[None]
    if prob.ndim != 3 or prob.shape != labels.shape:
        raise ValueError(
            f"cell_prob of shape {prob.shape} and labels of shape {labels.shape} must both be (H, W) or (N, H, W)"
        )
    prob = prob.astype(np.float32).astype(np.float64)
    if prob.size and not (0.0 <= prob.min() and prob.max() <= 1.0):  # also catches NaN
        raise ValueError(
            f"cell_prob spans {prob.min():g}..{prob.max():g}; give probabilities in [0, 1] "
            "(e.g. the softmax of the cell class)"
        )
    return prob, labels


def isbi_pixel_error(
    cell_prob: np.ndarray, labels: np.ndarray, *, thresholds: tuple[float, ...] = ISBI_THRESHOLDS
) -> dict[str, Any]:
    """The challenge's retired pixel error: 1 - the best F-score of the cell pixels over thresholds.

    At each threshold t, a pixel is predicted cell where `cell_prob > t`; true positives, false
    positives and false negatives of the cell class are summed over all slices and give one F-score
    (precision or recall is 1 when its error count is 0). The score is 1 - the maximum over thresholds.

    Returns:
        pixel_error, pixel_error_threshold (the first best t) and pixel_fscore_per_threshold.

    Shape:
        cell_prob (H, W) or (N, H, W) in [0, 1]; labels of the same shape, > 0 = cell interior.
    """
    prob, labels = _as_stack(cell_prob, labels)
    true = labels > 0
    scores = []
    for t in thresholds:
        pred = prob > t
        tp = int(np.count_nonzero(pred & true))
        fp, fn = int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(true)) - tp
        scores.append(_f_score(1.0 if fp == 0 else tp / (tp + fp), 1.0 if fn == 0 else tp / (tp + fn)))
    best = int(np.argmax(scores))
    return {
        "pixel_error": 1.0 - scores[best],
        "pixel_error_threshold": thresholds[best],
        "pixel_fscore_per_threshold": scores,
    }


def isbi_challenge_scores(
    cell_prob: np.ndarray, labels: np.ndarray, *, thresholds: tuple[float, ...] = ISBI_THRESHOLDS
) -> dict[str, Any]:
    """V_Rand and V_Info after border thinning, and pixel error, as the ISBI 2012 challenge scores a stack.

    `cell_prob` is the probability of **cell interior** (not membrane) per pixel: for a membrane map,
    pass `1 - p_membrane`. For each threshold t of `thresholds` (the reference's 0.0, 0.1, ..., 1.0) and
    each slice: the true segments are the 4-connected components of `labels > 0`; the proposal's cells
    are `cell_prob > t`, its borders thinned to one pixel (`thin_borders`); `rand_info_scores` compares
    the two. Each score is averaged over the slices at each threshold, and the best threshold is taken
    (separately for V_Rand and V_Info; the first one on a tie). Higher is better for V_Rand and V_Info;
    the leaderboard's Rand error is 1 - V_Rand.

    Returns:
        v_rand, v_info, pixel_error (floats); v_rand_threshold, v_info_threshold, pixel_error_threshold;
        v_rand_split / v_rand_merge and v_info_split / v_info_merge (slice means at the best threshold);
        v_rand_per_slice, v_info_per_slice (at the best threshold); thresholds, v_rand_per_threshold,
        v_info_per_threshold, pixel_fscore_per_threshold (lists).

    Shape:
        cell_prob (H, W) or (N, H, W) in [0, 1]; labels of the same shape, > 0 = cell interior
        (pixelwise's ISBI masks 0/1 or the challenge's 0/255 label images).
    """
    prob, labels = _as_stack(cell_prob, labels)
    keys = ("v_rand", "v_rand_split", "v_rand_merge", "v_info", "v_info_split", "v_info_merge")
    table = np.empty((len(keys), len(thresholds), len(prob)))  # (score, threshold, slice)
    for k, (p, lab) in enumerate(zip(prob, labels, strict=True)):
        if not (lab > 0).any():
            raise ValueError(f"labels slice {k} has no cell pixel (> 0): the challenge's scores are undefined")
        truth = cell_segments(lab)
        for i, t in enumerate(thresholds):
            scores = rand_info_scores(truth, thin_borders(p > t))
            table[:, i, k] = [scores[key] for key in keys]
    means = table.mean(2)  # (score, threshold)
    out: dict[str, Any] = {}
    for name in ("v_rand", "v_info"):
        row = keys.index(name)
        best = int(np.argmax(means[row]))
        out[name] = float(means[row, best])
        out[f"{name}_threshold"] = thresholds[best]
        for part in ("split", "merge"):
            out[f"{name}_{part}"] = float(means[keys.index(f"{name}_{part}"), best])
        out[f"{name}_per_slice"] = table[row, best].tolist()
        out[f"{name}_per_threshold"] = means[row].tolist()
    out.update(isbi_pixel_error(prob, labels, thresholds=thresholds))
    out["thresholds"] = list(thresholds)
    return out


class ISBIChallenge:
    """Streaming form of `isbi_challenge_scores` for `pixelwise.engine.evaluate(extra_metrics=...)`:
    collects each image's probability of the cell class and scores the stack at the end.

    Args:
        cell_class: the class index of cell interior (1 in pixelwise's ISBI 2012 data set).

    Shape:
        update(probs, target): probs (B, K, H, W) probabilities, target (B, H, W) labels.
    """

    def __init__(self, cell_class: int = 1) -> None:
        self.cell_class = cell_class
        self.probs: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def update(self, probs: Any, target: Any) -> None:
        for p, t in zip(probs, target, strict=True):
            self.probs.append(p[self.cell_class].float().cpu().numpy())
            self.labels.append((t == self.cell_class).cpu().numpy())

    def compute(self) -> dict[str, Any]:
        """{"isbi_challenge": v_rand, v_info, pixel_error, their thresholds, and V_Rand / V_Info per slice}
        (slices of one size)."""
        scores = isbi_challenge_scores(np.stack(self.probs), np.stack(self.labels))
        keys = ("v_rand", "v_rand_threshold", "v_info", "v_info_threshold", "pixel_error", "pixel_error_threshold")
        keys += ("v_rand_per_slice", "v_info_per_slice")  # at the best threshold, in the order scored
        return {"isbi_challenge": {k: scores[k] for k in keys}}
