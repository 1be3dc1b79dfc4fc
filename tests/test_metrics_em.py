"""ISBI 2012 challenge scores: border thinning against a pixel-by-pixel FIFO watershed, V_Rand / V_Info
against hand counts and brute-force pair counting, the threshold sweep and the pixel error."""

import itertools
import math
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pixelwise.metrics import (
    ISBI_THRESHOLDS,
    cell_segments,
    isbi_challenge_scores,
    isbi_pixel_error,
    rand_info_scores,
    thin_borders,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ------------------------------------------------------------------------------------ references
def fifo_watershed(cell):
    """Vincent & Soille's immersion on the inverted binary map, one pixel at a time, as Fiji's
    WatershedTransform2D runs it: column-major pixel list, neighbours left, up, right, down."""
    mask, line, inqueue = -2, 0, -3
    h, w = cell.shape
    order = [(x, y) for x in range(w) for y in range(h)]
    lab = dict.fromkeys(order, -1)

    def nbrs(x, y):
        return [(u, v) for u, v in ((x - 1, y), (x, y - 1), (x + 1, y), (x, y + 1)) if 0 <= u < w and 0 <= v < h]

    current, flag = 0, False
    for level in ([p for p in order if cell[p[1], p[0]]], [p for p in order if not cell[p[1], p[0]]]):
        fifo = deque()
        for p in level:
            lab[p] = mask
            if any(lab[q] >= line for q in nbrs(*p)):
                lab[p] = inqueue
                fifo.append(p)
        while fifo:
            p = fifo.popleft()
            for q in nbrs(*p):
                if lab[q] > 0:
                    if lab[p] == inqueue or (lab[p] == line and flag):
                        lab[p] = lab[q]
                    elif lab[p] > 0 and lab[p] != lab[q]:
                        lab[p], flag = line, False
                elif lab[q] == line and lab[p] == inqueue:
                    lab[p], flag = line, True
                elif lab[q] == mask:
                    lab[q] = inqueue
                    fifo.append(q)
        for p in level:  # new minima: the components not reached from an earlier level
            if lab[p] == mask:
                current += 1
                lab[p] = current
                fifo.append(p)
                while fifo:
                    for q in nbrs(*fifo.popleft()):
                        if lab[q] == mask:
                            lab[q] = current
                            fifo.append(q)
    out = np.zeros((h, w), dtype=np.int64)
    for (x, y), v in lab.items():
        out[y, x] = v
    return out


def same_partition(a, b):
    """Equal line pixels, and a one-to-one map between the segment labels."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = set(zip(a[a > 0].tolist(), b[b > 0].tolist(), strict=True))
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


def brute_force_scores(gt, prop):
    """V_Rand by counting ordered pixel pairs, V_Info from explicit distributions; border pixels of the
    proposal inside true cells are segments of their own."""
    flat = zip(gt.ravel().tolist(), prop.ravel().tolist(), strict=True)
    pixels = [(g, p if p else -k - 1) for k, (g, p) in enumerate(flat) if g > 0]
    together_t = together_s = together_both = 0
    for (g1, p1), (g2, p2) in itertools.product(pixels, repeat=2):
        together_t += g1 == g2
        together_s += p1 == p2
        together_both += g1 == g2 and p1 == p2
    split, merge = together_both / together_t, together_both / together_s

    def entropy(counter):
        n = sum(counter.values())
        return -sum(c / n * math.log(c / n) for c in counter.values())

    h_t, h_s = entropy(Counter(g for g, _ in pixels)), entropy(Counter(p for _, p in pixels))
    mutual = h_t + h_s - entropy(Counter(pixels))
    return {"v_rand": 2 * split * merge / (split + merge), "v_info": 2 * mutual / (h_t + h_s)}


def random_cells(rng, h, w):
    """A binary map: noise, or smooth blobs like a thresholded probability map."""
    if rng.random() < 0.3:
        return rng.random((h, w)) < rng.uniform(0.1, 0.9)
    z = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.7, 2.0))
    return z > np.quantile(z, rng.uniform(0.1, 0.8))


# -------------------------------------------------------------------------------------- thinning
def test_thinning_matches_the_pixel_by_pixel_fifo_watershed():
    rng = np.random.default_rng(0)
    for _ in range(150):
        cell = random_cells(rng, *rng.integers(1, 33, size=2))
        assert same_partition(thin_borders(cell), fifo_watershed(cell)), cell.astype(int)


def test_thinning_by_hand():
    c, b = True, False
    # a 2-pixel border between two cells: columns 2 and 3 are both next to a cell; the queue takes
    # column 2 first (column-major), which joins the left cell, and column 3 then sees both cells
    two = np.array([[c, c, b, b, c, c]] * 3)
    seg = thin_borders(two)
    assert (seg[:, 3] == 0).all() and (seg[:, [0, 1, 2, 4, 5]] > 0).all()
    assert len(np.unique(seg[:, :3])) == 1 and len(np.unique(seg[:, 4:])) == 1 and seg[0, 0] != seg[0, 5]
    # a 3-pixel border: the line is its middle column
    seg = thin_borders(np.array([[c, c, b, b, b, c, c]] * 3))
    assert (seg[:, 3] == 0).all() and (seg != 0).sum() == 18
    # a border that separates nothing (a speck, a dead end, a gap in a membrane) is no border
    speck = np.ones((5, 5), dtype=bool)
    speck[1:3, 1:3] = False
    assert (thin_borders(speck) == 1).all()
    gap = np.array([[c, b, c], [c, c, c], [c, b, c]])
    assert (thin_borders(gap) == 1).all()
    # one grey level only: no cell is one segment; no border, the 4-connected components
    assert (thin_borders(np.zeros((3, 4), dtype=bool)) == 1).all()
    diagonal = np.array([[c, b], [b, c]])
    assert (thin_borders(np.ones((2, 2), dtype=bool)) == 1).all()
    assert (thin_borders(diagonal) == 0).sum() == 2  # the two border pixels separate the two cells
    assert thin_borders(diagonal).dtype == np.int32


# ----------------------------------------------------------------------------------------- scores
def test_rand_and_info_by_hand():
    # truth: cells {0, 1} and {3, 4, 5}, membrane at 2 (not scored, whatever the proposal says there)
    gt = np.array([[1, 1, 0, 2, 2, 2]])
    prop = np.array([[1, 0, 5, 2, 2, 3]])  # pixel 1 on a proposal border: a segment of its own
    r = rand_info_scores(gt, prop)
    # n = 5; p_ij = 1, 2, 1 (+ the border pixel, a singleton): sum p^2 + s = 6 + 1 = 7
    # a = (2, 3): 4 + 9 = 13; b = (1, 2, 1) + singleton: 6 + 1 = 7
    assert r["v_rand_split"] == pytest.approx(7 / 13) and r["v_rand_merge"] == 1.0
    assert r["v_rand"] == pytest.approx(2 * 7 / (13 + 7))
    # the proposal refines the truth: I = H(T), merge 1, split H(T) / H(S)
    h_t = -(2 / 5 * math.log(2 / 5) + 3 / 5 * math.log(3 / 5))
    h_s = -(3 * (1 / 5) * math.log(1 / 5) + 2 / 5 * math.log(2 / 5))
    assert r["v_info_merge"] == pytest.approx(1.0) and r["v_info_split"] == pytest.approx(h_t / h_s)
    assert r["v_info"] == pytest.approx(2 * h_t / (h_t + h_s))
    # merging the two cells: split 1, merge (4 + 9) / 25; V_Info: one proposed segment, H(S) = 0 -> 0
    merged = rand_info_scores(gt, np.ones_like(gt))
    assert merged["v_rand_merge"] == pytest.approx(13 / 25) and merged["v_rand"] == pytest.approx(26 / 38)
    assert merged["v_info"] == 0.0
    assert rand_info_scores(gt, gt)["v_rand"] == 1.0 and rand_info_scores(gt, gt)["v_info"] == pytest.approx(1.0)


def test_rand_and_info_match_brute_force_pair_counting():
    rng = np.random.default_rng(1)
    for _ in range(40):
        shape = tuple(rng.integers(2, 9, size=2))
        gt = rng.integers(0, 4, size=shape)
        prop = rng.integers(0, rng.integers(2, 6), size=shape)
        if (gt > 0).sum() < 2 or len(np.unique(gt[gt > 0])) < 2 or (prop[gt > 0] > 0).sum() < 2:
            continue
        ours, ref = rand_info_scores(gt, prop), brute_force_scores(gt, prop)
        assert ours["v_rand"] == pytest.approx(ref["v_rand"]) and ours["v_info"] == pytest.approx(ref["v_info"])


# ------------------------------------------------------------------------------ threshold sweep
def test_thresholds_are_the_reference_loop():
    assert len(ISBI_THRESHOLDS) == 11 and ISBI_THRESHOLDS[3] == 0.30000000000000004
    assert ISBI_THRESHOLDS[-1] == 0.9999999999999999  # so a probability of 1.0 stays a cell at the last one


def test_sweep_takes_the_best_threshold_of_the_slice_mean():
    labels = np.ones((5, 7), dtype=np.int64)
    labels[:, 3] = 0  # two cells of 15 pixels split by a membrane column
    prob = np.full(labels.shape, 0.95)
    prob[:, 3] = 0.2
    prob[2, 3] = 0.55  # a weak membrane pixel: below t = 0.55 the two cells are joined
    r = isbi_challenge_scores(prob, labels)
    merged = 2 * 450 / (450 + 900)  # one proposed segment: split 1, merge (15^2 + 15^2) / 30^2
    expected = [merged] * 6 + [1.0] * 4 + [merged]  # t = 0.0..0.5 joined; 0.6..0.9 right; 1.0 no cell
    assert np.allclose(r["v_rand_per_threshold"], expected)
    assert r["v_rand"] == 1.0 and r["v_rand_threshold"] == 0.6 and r["v_rand_per_slice"] == [1.0]
    assert r["v_info"] == pytest.approx(1.0) and r["v_info_threshold"] == 0.6
    # the slice mean is taken before the maximum: one threshold for the whole stack
    shifted = prob.copy()
    shifted[2, 3] = 0.75  # this slice needs t >= 0.75 (t = 0.7999999999999999 and 0.8999999999999999)
    two = isbi_challenge_scores(np.stack([prob, shifted]), np.stack([labels, labels]))
    assert two["v_rand_threshold"] == 0.7999999999999999 and two["v_rand"] == 1.0
    assert two["v_rand_per_threshold"][6] == pytest.approx((1.0 + merged) / 2)
    # polarity: a membrane probability given as the cell probability scores badly
    assert isbi_challenge_scores(1 - prob, labels)["v_rand"] < 0.7


def test_pixel_error_by_hand():
    labels = np.array([[1, 1, 0, 0]])
    prob = np.array([[0.95, 0.45, 0.65, 0.05]])
    r = isbi_pixel_error(prob, labels)
    # predicted cells: t = 0: all; 0.1..0.4: 3 (F 0.8); 0.5, 0.6: 2 (F 0.5); 0.7..0.9: 1 (P 1, R 1/2); 1.0: none
    expected = [2 / 3] + [0.8] * 4 + [0.5] * 2 + [2 / 3] * 3 + [0.0]
    assert np.allclose(r["pixel_fscore_per_threshold"], expected)
    assert r["pixel_error"] == pytest.approx(0.2) and r["pixel_error_threshold"] == 0.1
    # true positives and errors are summed over the slices before the F-score
    two = isbi_pixel_error(np.stack([prob, np.ones_like(prob)]), np.stack([labels, labels]))
    tp, fp, fn = 2 + 2, 1 + 2, 0  # t = 0.1: the second slice predicts all four pixels as cell
    assert two["pixel_fscore_per_threshold"][1] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_bad_inputs_raise():
    labels = np.ones((4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="must both be"):
        isbi_challenge_scores(np.zeros((4, 5)), labels)
    with pytest.raises(ValueError, match="give probabilities in"):
        isbi_challenge_scores(np.full((4, 4), 255.0), labels)
    with pytest.raises(ValueError, match="no cell pixel"):
        isbi_challenge_scores(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="does not match"):
        rand_info_scores(labels, labels[:2])
    with pytest.raises(ValueError, match="must be >= 0"):
        rand_info_scores(labels, -labels)


@pytest.mark.data
@pytest.mark.skipif(not (DATA / "isbi2012").is_dir(), reason="needs ../shared/data/isbi2012")
def test_real_slices_perfect_and_with_a_membrane_gap():
    from PIL import Image

    labels = np.stack([np.array(Image.open(DATA / "isbi2012" / "label" / f"{i}.png")) for i in (25, 26)])
    prob = (labels > 0).astype(np.float32)  # the labels themselves: 0 = membrane, 255 = cell
    r = isbi_challenge_scores(prob, labels)
    assert r["v_rand"] == 1.0 and r["v_info"] == pytest.approx(1.0) and r["pixel_error"] == 0.0
    # call the membrane of slice 25 cell in a band of rows: the cells across the band merge
    gapped = prob.copy()
    gapped[0, 250:260] = 1.0
    assert len(np.unique(cell_segments(gapped[0]))) < len(np.unique(cell_segments(labels[0])))
    g = isbi_challenge_scores(gapped, labels)
    assert g["v_rand"] < 1.0 and g["v_rand_per_slice"][1] == 1.0
    assert g["v_rand_split"] == 1.0 and g["v_rand_merge"] < 1.0  # a merge, not a split
