"""torch.hub entry points: one per pixelwise builder, as torchvision's hubconf.py has.

    model = torch.hub.load("path/to/pixelwise", "segnet_basic", source="local", weights="camvid")
    model = torch.hub.load("path/to/pixelwise", "deeplabv3plus_timm", source="local", num_classes=21,
                           encoder="convnext_tiny")

Each entry is ``pixelwise.models.get_model(name, weights=..., **kwargs)``: the builder's keyword arguments,
and ``weights`` a tag of the built-in trained weights (``pixelwise models`` lists them). The entries are
made from ``MODELS``, so torch.hub offers exactly the models pixelwise has.
"""

from collections.abc import Callable

import torch.nn as nn

from pixelwise.models import MODELS as _MODELS
from pixelwise.models import get_model as _get_model

dependencies = ["torch", "torchvision", "numpy", "safetensors"]  # what torch.hub checks before importing


def _entry(name: str) -> Callable[..., nn.Module]:
    def entry(*, weights: str | None = None, **kwargs) -> nn.Module:
        return _get_model(name, weights=weights, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"pixelwise.models.get_model({name!r}, weights=None, **kwargs):\n\n{_MODELS[name].__doc__}"
    return entry


globals().update({_name: _entry(_name) for _name in _MODELS})
