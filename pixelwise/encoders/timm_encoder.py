"""Any timm model as an encoder: timm's ``features_only`` maps under pixelwise's encoder contract.

Wightman, "PyTorch Image Models" (timm). ``timm.create_model(name, features_only=True, output_stride=...)``
returns a model whose ``forward`` gives one map per stage and whose ``feature_info`` knows their channels
and reductions, the contract pixelwise's own encoders follow (``out_channels``, ``strides``). timm is an
optional dependency (``pip install 'pixelwise[timm]'``), imported only when such an encoder is built.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
import torch.nn as nn

from pixelwise.encoders.features import Features
from pixelwise.errors import UserError

OUTPUT_STRIDES = (8, 16, 32)


def import_timm():
    """The timm module, or a ModuleNotFoundError naming the extra that installs it."""
    try:
        import timm
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "timm encoders need the package 'timm': pip install 'pixelwise[timm]'", name="timm"
        ) from None
    return timm


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


class TimmEncoder(nn.Module):
    """A timm model's stage outputs, high to low resolution (timm ``features_only``).

    Args:
        name: a timm model name (``timm.list_models()``), e.g. "resnet50", "convnext_tiny", "efficientnet_b0".
        output_stride: 32, or 16 / 8 where the model supports atrous output stride (timm's
            ``output_stride``: ResNets, EfficientNets, ConvNeXts ...).
        weights: a local file (``.pth`` or ``.safetensors``) holding the timm model's state dict
            (``timm.create_model(name).state_dict()``), loaded by timm's own loader; None for timm's
            random initialisation. Never downloaded.

    Attributes:
        out_channels: channels of each map (``feature_info.channels()``).
        strides: their strides (``feature_info.reduction()``), e.g. (2, 4, 8, 16, 32) for a ResNet.
        input_multiple: the deepest stride; a model pads its input to a multiple of it (and crops the
            logits back), so that every map is exactly the input size over its stride at any input size.

    Shape:
        (B, 3, H, W), H and W multiples of ``input_multiple`` -> ``Features`` [(B, C_i, H/s_i, W/s_i)],
        no pooling record.
    """

    def __init__(self, name: str, *, output_stride: int = 32, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        timm = import_timm()
        if output_stride not in OUTPUT_STRIDES:
            raise UserError(f"output_stride={output_stride} is not supported; choose 8, 16 or 32")
        if name not in timm.list_models():
            close = difflib.get_close_matches(name, timm.list_models(), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see timm.list_models() or `pixelwise models --encoders`"
            raise UserError(f"encoder={name!r} is not a timm model; {hint}")
        self.body = _create(timm, name, output_stride, weights)
        self.out_channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        self.input_multiple = max(self.strides)
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> Features:
        return Features(self.body(x))  # [(B, C_i, H/s_i, W/s_i)], high to low resolution


def _create(timm, name: str, output_stride: int, weights: str | os.PathLike | None) -> nn.Module:
    """``timm.create_model(name, features_only=True, ...)``, its failures as one line naming the argument."""
    kwargs: dict = {"features_only": True}
    if output_stride != 32:  # only models with atrous support take the argument at all
        kwargs["output_stride"] = output_stride
    if weights is None:
        try:
            return timm.create_model(name, **kwargs)
        except Exception as e:  # timm raises many types for a model it cannot build this way
            raise UserError(_cannot_build(name, output_stride, e)) from None
    if not Path(weights).is_file():
        raise UserError(
            f"weights_backbone={weights}: no such file; give the local .pth or .safetensors state dict of "
            f"timm's {name!r} (pixelwise never downloads weights)"
        )
    try:  # timm's own loader: it maps a classifier's state dict onto the features_only model
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    except Exception as e:
        try:
            timm.create_model(name, **kwargs)  # the model builds without the file: the file is at fault
        except Exception:
            raise UserError(_cannot_build(name, output_stride, e)) from None
        raise UserError(
            f"weights_backbone={weights}: does not load into timm's {name!r} ({_short(e)}); give that "
            "model's state dict, e.g. torch.save(timm.create_model(name, pretrained=True).state_dict(), path)"
        ) from None


def _cannot_build(name: str, output_stride: int, e: BaseException) -> str:
    way_out = "choose output_stride=32 or another encoder" if output_stride != 32 else "choose another encoder"
    return (
        f"encoder={name!r} (output_stride={output_stride}): timm cannot build it with features_only "
        f"({_short(e)}); {way_out} (`pixelwise models --encoders` lists those checked)"
    )
