"""pixelwise.fast.prepare_fast: same logits as eager, NHWC weights, no autograd, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from pixelwise.errors import UserError
from pixelwise.fast import FastInference, prepare_fast
from pixelwise.models import get_model


def _tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_model(
        "unet", num_classes=3, padding="same", base_channels=4, depth=2, norm_layer=torch.nn.BatchNorm2d
    ).eval()


def test_prepare_fast_matches_eager_and_uses_channels_last():
    model = _tiny_unet()
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        ref = model(x)
    fast = prepare_fast(model)
    assert isinstance(fast, FastInference) and not fast.training
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()  # really NHWC, not a 1x1 kernel that is both
    y = fast(x)
    assert y.dtype == torch.float32  # amp=True does nothing on a CPU: never bf16 here
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert y.is_inference() and not y.requires_grad


def test_prepare_fast_without_channels_last_keeps_layout():
    model = _tiny_unet()
    fast = prepare_fast(model, channels_last=False)
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_fast_wrapper_refuses_training_mode():
    fast = prepare_fast(_tiny_unet())
    with pytest.raises(UserError, match="inference only"):
        fast.train()
    fast.eval()  # eval stays allowed
