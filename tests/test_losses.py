"""Losses: hand-computed tiny cases and agreement with torch's cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelwise.config import LossConfig
from pixelwise.errors import UserError
from pixelwise.losses import (
    CrossEntropyLoss,
    DiceLoss,
    LovaszSoftmaxLoss,
    OhemCrossEntropyLoss,
    UNetWeightMapLoss,
    build_loss,
    dice_loss,
    lovasz_grad,
    lovasz_softmax,
    ohem_cross_entropy,
    ohem_mask,
    pixel_weighted_cross_entropy,
)


def _logits_from_probs(probs: list[list[float]]) -> torch.Tensor:
    """Pixels' class probabilities (N, K) -> logits (1, K, 1, N) whose softmax gives them back."""
    return torch.tensor(probs, dtype=torch.float64).log().T[None, :, None, :]


def test_cross_entropy_hand_computed_and_ignore():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).repeat(1, 1, 1, 3)  # p = (0.25, 0.75)
    target = torch.tensor([[[1, 0, 255]]])
    loss = CrossEntropyLoss()(logits, target)
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)
    weighted = CrossEntropyLoss(weight=torch.tensor([3.0, 1.0]))(logits, target)
    assert weighted.item() == pytest.approx((-math.log(0.75) * 1 - math.log(0.25) * 3) / 4)


def test_cross_entropy_matches_torch_with_class_weights():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    target[0, :2] = 255
    w = torch.rand(5, generator=g) + 0.1
    ref = F.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert torch.allclose(CrossEntropyLoss(weight=w)(logits, target), ref)
    # a per-pixel weight equal to the class weight of each pixel is the same loss
    pixel_w = w[target.clamp(max=4)]
    assert torch.allclose(pixel_weighted_cross_entropy(logits, target, pixel_w), ref, atol=1e-6)


def test_weight_map_loss_applies_the_map_per_pixel():
    def fake_map(mask: np.ndarray, *, w0: float, sigma: float, ignore_index: int) -> np.ndarray:
        return np.where(mask == 0, w0, 1.0)  # border pixels (class 0) weigh w0

    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).repeat(1, 1, 1, 2)  # p = (0.25, 0.75)
    target = torch.tensor([[[0, 1]]])
    loss = UNetWeightMapLoss(w0=4.0, weight_map=fake_map)(logits, target)
    assert loss.item() == pytest.approx((4 * -math.log(0.25) + 1 * -math.log(0.75)) / 5)


def test_weight_map_loss_with_the_unet_map_weights_gaps_between_cells():
    pytest.importorskip("pixelwise.models.unet")
    target = torch.ones(1, 16, 16, dtype=torch.long)
    target[0, :, 7:9] = 0  # a membrane between two cells
    target[0, :, 14:] = 0  # a membrane with a cell on one side only
    logits = torch.zeros(1, 2, 16, 16, requires_grad=True)
    loss = UNetWeightMapLoss()(logits, target)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)  # uniform prediction: CE = ln 2 whatever the weights
    loss.backward()
    g = logits.grad[0, 0].abs()  # proportional to each pixel's weight here
    # class balance: 64 membrane pixels of 256 in 2 classes -> w_c = 256 / (2 * 64) = 2; in the gap
    # d1 + d2 = 1 + 2 adds w0 * exp(-9 / 50) = 8.35, at the edge 1 + 8 adds w0 * exp(-81 / 50) = 1.98
    assert g[:, 7].mean() / g[:, 14].mean() == pytest.approx(
        (2 + 10 * math.exp(-9 / 50)) / (2 + 10 * math.exp(-81 / 50)), rel=1e-4
    )


def test_lovasz_grad_hand_computed():
    # |G| = 1, sorted indicator [0, 1]: J = [1 - 1/2, 1 - 0/2] = [0.5, 1], differences [0.5, 0.5]
    assert torch.allclose(lovasz_grad(torch.tensor([0, 1])), torch.tensor([0.5, 0.5]))
    assert torch.allclose(lovasz_grad(torch.tensor([1, 0])), torch.tensor([1.0, 0.0]))


def test_lovasz_softmax_hand_worked_case():
    # two pixels, labels (0, 1). class 0: errors (0.2, 0.4) -> Lovász extension 0.4*0.5 + 0.2*0.5 = 0.3;
    # class 1: errors (0.2, 0.4) -> 0.4*1 + 0.2*0 = 0.4; mean over present classes 0.35
    logits = _logits_from_probs([[0.8, 0.2], [0.4, 0.6]])
    target = torch.tensor([[[0, 1]]])
    assert lovasz_softmax(logits, target).item() == pytest.approx(0.35)
    # an ignored third pixel changes nothing
    logits3 = _logits_from_probs([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1]])
    assert lovasz_softmax(logits3, torch.tensor([[[0, 1, 255]]])).item() == pytest.approx(0.35)
    # a third class absent from labels and (almost) from the prediction: "present" skips it,
    # "all" averages its ~0 loss in: (0.3 + 0.4 + 0) / 3
    three = _logits_from_probs([[0.8, 0.2, 1e-300], [0.4, 0.6, 1e-300]])
    assert lovasz_softmax(three, target, classes="present").item() == pytest.approx(0.35)
    assert lovasz_softmax(three, target, classes="all").item() == pytest.approx(0.7 / 3)


def test_lovasz_softmax_perfect_prediction_is_zero_and_errors_positive():
    target = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 100.0
    assert lovasz_softmax(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert LovaszSoftmaxLoss(per_image=True)(torch.zeros(1, 3, 2, 3), target).item() > 0.5


def test_lovasz_softmax_gradient_flows():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    lovasz_softmax(logits, target, per_image=True).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_dice_hand_computed_and_ignore():
    # class 0: 2*0.8 / (1.2 + 1) = 0.72727..., class 1: 2*0.6 / (0.8 + 1) = 0.6667; loss = 1 - mean
    logits = _logits_from_probs([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])
    target = torch.tensor([[[0, 1, 255]]])
    expected = 1 - (1.6 / 2.2 + 1.2 / 1.8) / 2
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(expected)
    perfect = F.one_hot(torch.tensor([[[0, 1]]]), 2).permute(0, 3, 1, 2).float() * 100
    assert DiceLoss()(perfect, torch.tensor([[[0, 1]]])).item() == pytest.approx(0.0, abs=1e-6)


def test_ohem_keeps_the_right_pixels():
    # true-class probabilities 0.05, 0.15, ..., 0.95 for ten pixels, plus two ignored pixels
    p = torch.arange(10, dtype=torch.float64) / 10 + 0.05
    probs = torch.stack([p, 1 - p], dim=1).tolist() + [[0.01, 0.99], [0.01, 0.99]]
    logits = _logits_from_probs(probs)
    target = torch.tensor([[[0] * 10 + [255, 255]]])
    kept = ohem_mask(logits, target, thresh=0.5, min_kept=2)
    assert kept[0, 0].tolist() == [True] * 5 + [False] * 7  # the five below 0.5
    kept = ohem_mask(logits, target, thresh=0.5, min_kept=8)
    assert kept[0, 0].tolist() == [True] * 8 + [False] * 4  # at least min_kept, the hardest first
    kept = ohem_mask(logits, target, thresh=0.5, min_kept=100)
    assert kept[0, 0].tolist() == [True] * 10 + [False] * 2  # never an ignored pixel
    loss = ohem_cross_entropy(logits, target, thresh=0.5, min_kept=2)
    assert loss.item() == pytest.approx(float(-p[:5].log().mean()))
    assert OhemCrossEntropyLoss(thresh=0.5, min_kept=2)(logits, target).item() == pytest.approx(loss.item())


def test_build_loss_names_and_errors():
    w = torch.ones(3)
    assert isinstance(build_loss(LossConfig(name="cross_entropy"), class_weights=w), CrossEntropyLoss)
    assert isinstance(build_loss(LossConfig(name="dice")), DiceLoss)
    assert isinstance(build_loss(LossConfig(name="lovasz_softmax")), LovaszSoftmaxLoss)
    assert isinstance(build_loss(LossConfig(name="ohem"), class_weights=w), OhemCrossEntropyLoss)
    with pytest.raises(UserError, match="class_weights"):
        build_loss(LossConfig(name="dice"), class_weights=w)
    with pytest.raises(UserError, match="loss.name"):
        build_loss(LossConfig(name="focal"))
