"""Confusion-matrix metrics vs torchmetrics and hand computations; SegNet's boundary F1 on hand-made maps."""

import math

import numpy as np
import pytest
import torch

from pixelwise.metrics import BoundaryF1, ConfusionMatrix, boundary_f1, boundary_f1_per_image


def _random_case(seed=0, k=5, shape=(3, 17, 23)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], k, *shape[1:], generator=g)
    target = torch.randint(0, k, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.2] = 255
    return logits, target


def test_matches_torchmetrics_on_random_data_with_ignore():
    tm = pytest.importorskip("torchmetrics.classification")
    k = 5
    cm = ConfusionMatrix(k)
    jac = tm.MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="none")
    acc_macro = tm.MulticlassAccuracy(num_classes=k, ignore_index=255, average="macro")
    acc_micro = tm.MulticlassAccuracy(num_classes=k, ignore_index=255, average="micro")
    tmcm = tm.MulticlassConfusionMatrix(num_classes=k, ignore_index=255)
    for seed in range(3):
        logits, target = _random_case(seed, k)
        cm.update(logits, target)
        for m in (jac, acc_macro, acc_micro, tmcm):
            m.update(logits, target)
    r = cm.compute()
    assert torch.equal(cm.mat, tmcm.compute())
    assert np.allclose(r["per_class_iou"], jac.compute().numpy(), atol=1e-6)
    assert math.isclose(r["miou"], float(jac.compute().mean()), abs_tol=1e-6)
    assert math.isclose(r["mean_acc"], float(acc_macro.compute()), abs_tol=1e-6)
    assert math.isclose(r["pixel_acc"], float(acc_micro.compute()), abs_tol=1e-6)


def test_absent_class_is_nan_and_left_out_of_the_mean_like_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    pred = torch.tensor([[[0, 0, 1, 1]]])
    target = torch.tensor([[[0, 1, 1, 255]]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    r = cm.compute()
    assert math.isnan(r["per_class_iou"][2]) and math.isnan(r["dice"][2]) and math.isnan(r["per_class_acc"][2])
    assert math.isclose(r["miou"], (1 / 2 + 1 / 2) / 2)
    jac = tm.MulticlassJaccardIndex(num_classes=3, ignore_index=255, average="macro")
    assert math.isclose(r["miou"], float(jac(pred, target)), abs_tol=1e-6)


def test_hand_computed_small_case():
    # target 0 0 0 1 1 2 | pred 0 0 1 1 2 2  (+ one ignored pixel predicted 2)
    pred = torch.tensor([[0, 0, 1, 1, 2, 2, 2]])
    target = torch.tensor([[0, 0, 0, 1, 1, 2, 255]])
    cm = ConfusionMatrix(3)
    cm.update(pred[None], target[None])
    assert cm.mat.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    r = cm.compute()
    iou = [2 / 3, 1 / 3, 1 / 2]
    assert np.allclose(r["per_class_iou"], iou)
    assert math.isclose(r["miou"], sum(iou) / 3)
    assert math.isclose(r["pixel_acc"], 4 / 6)
    assert math.isclose(r["mean_acc"], (2 / 3 + 1 / 2 + 1) / 3)
    assert math.isclose(r["fwiou"], 3 / 6 * iou[0] + 2 / 6 * iou[1] + 1 / 6 * iou[2])
    assert np.allclose(r["dice"], [4 / 5, 2 / 4, 2 / 3]) and math.isclose(r["mean_dice"], (4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert r["num_pixels"] == 6


def test_logits_and_labels_agree_including_ties_and_reset():
    logits, target = _random_case(1, k=4, shape=(2, 9, 11))
    logits[0, :, 0, 0] = 1.0  # a four-way tie: the first index wins, as torch.argmax
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.mat, b.mat)
    a.reset()
    assert int(a.mat.sum()) == 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="ignore_index=2 is a class index"):
        ConfusionMatrix(3, ignore_index=2)
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="4 channels"):
        cm.update(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside 0..2"):
        cm.update(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long))


def test_all_reduce_sums_over_processes(monkeypatch):
    import torch.distributed as dist

    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[[1]]]), torch.tensor([[[1]]]))
    cm.all_reduce()  # not initialised: a no-op
    assert cm.mat.tolist() == [[0, 0], [0, 1]]
    other_rank = torch.tensor([[3, 0], [1, 0]])  # what a second process counted

    def fake_all_reduce(tensor, op=None):
        assert op == dist.ReduceOp.SUM and tensor is cm.mat
        tensor += other_rank

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    cm.all_reduce()
    assert cm.mat.tolist() == [[3, 0], [1, 1]]


def test_boundary_f1_hand_made_case():
    # 40x40, diagonal 56.6 -> tolerance 0.42 px: only exact boundary matches count
    target = np.zeros((40, 40), dtype=np.int64)
    target[10:30, 10:30] = 1
    assert np.allclose(boundary_f1_per_image(target, target, 2), [1.0, 1.0])
    shifted = np.zeros_like(target)
    shifted[10:30, 12:32] = 1  # square moved right by 2 px
    s = boundary_f1_per_image(shifted, target, 2)
    # class 1's inner boundary: 76 pixels each; matched: top and bottom rows' overlap (2 * 18) -> P = R = 36/76
    assert math.isclose(s[1], 36 / 76)
    # class 0's boundary (outer ring of the square, 80 px) shifted likewise: the rows overlap on 18 px each
    assert math.isclose(s[0], 36 / 80)
    # with a 2 px tolerance (0.0354 of the diagonal) every boundary pixel is matched
    assert np.allclose(boundary_f1_per_image(shifted, target, 2, tolerance=2.01 / math.hypot(40, 40)), [1, 1])
    # default tolerance 0.75% of the diagonal
    assert math.isclose(boundary_f1(shifted, target, 2), (36 / 76 + 36 / 80) / 2)


def test_boundary_f1_absent_ignored_and_streaming():
    target = np.zeros((20, 20), dtype=np.int64)
    target[:, 10:] = 255  # right half ignored: no class-0 boundary at the ignore border counts twice
    pred = np.ones_like(target)  # predicts only class 1
    s = boundary_f1_per_image(pred, target, 3)
    assert s[0] == 0.0 and math.isnan(s[1]) and math.isnan(s[2])  # class 1 not in the target: not scored
    assert np.allclose(boundary_f1_per_image(target.clip(0, 1) * 0, target, 3)[0], 1.0)
    bf = BoundaryF1(3)
    bf.update(torch.from_numpy(np.stack([pred, np.zeros_like(pred)])), torch.from_numpy(np.stack([target, target])))
    r = bf.compute()
    assert math.isclose(r["boundary_f1"], 0.5) and math.isclose(r["per_class_boundary_f1"][0], 0.5)
    assert math.isnan(r["per_class_boundary_f1"][2])
