"""The model zoo: name -> keyword-only builder. Every model returns logits (B, K, H, W)."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable

import torch.nn as nn

from pixelwise.errors import UserError
from pixelwise.models.deeplab import (
    deeplab_v1,
    deeplab_v2,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
    deeplabv3plus_resnet50,
    deeplabv3plus_resnet101,
)
from pixelwise.models.fcn import fcn8s, fcn16s, fcn32s
from pixelwise.models.fcn_resnet import fcn_resnet50, fcn_resnet101
from pixelwise.models.segnet import fcn_basic, segnet, segnet_basic
from pixelwise.models.unet import unet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "fcn32s": fcn32s,
    "fcn16s": fcn16s,
    "fcn8s": fcn8s,
    "fcn_resnet50": fcn_resnet50,
    "fcn_resnet101": fcn_resnet101,
    "segnet": segnet,
    "segnet_basic": segnet_basic,
    "fcn_basic": fcn_basic,
    "unet": unet,
    "deeplab_v1": deeplab_v1,
    "deeplab_v2": deeplab_v2,
    "deeplabv3_resnet50": deeplabv3_resnet50,
    "deeplabv3_resnet101": deeplabv3_resnet101,
    "deeplabv3plus_resnet50": deeplabv3plus_resnet50,
    "deeplabv3plus_resnet101": deeplabv3plus_resnet101,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the model `name` with the builder's keyword arguments."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; choose one of {', '.join(MODELS)}"
        raise UserError(f"unknown model {name!r}{hint}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as e:
        raise UserError(f"model {name!r}: {e}") from None


def models_command(args: argparse.Namespace) -> int:
    """`pixelwise models`: a table of every model with parameters and GFLOPs."""
    from pixelwise.models.summary import model_table

    print(model_table(num_classes=args.num_classes, size=args.size, flops=not args.no_flops))
    return 0
