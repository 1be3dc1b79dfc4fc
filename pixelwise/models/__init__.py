"""The model zoo: name -> keyword-only builder (`MODELS`, `get_model`).

Anatomy. Every model has three parts, each an ``nn.Module``, whose parameters partition the model's:

* ``encoder``: the network the features come from (VGG-16, ResNet, U-Net's contracting path). It
  returns a ``pixelwise.encoders.Features`` (a list of maps, high to low resolution, with the record
  of its max-pools) and exposes ``out_channels`` and ``strides``. ``train.freeze_encoder`` freezes it.
* ``decoder``: what turns features into the input of the class scores or upsamples the scores:
  U-Net's expanding path, SegNet's unpooling decoder, ASPP, LargeFOV's fc6/fc7, FCN's skip upsampling.
  ``nn.Identity`` where the paper has none (DeepLab v2, whose ASPP-L branches score directly).
* ``head``: the layers that produce class scores (K output channels); ``train.head_lr_mult`` applies
  to them.

Most models run ``encoder -> decoder -> head``. FCN and FCN-Basic score first and upsample the
scores (``encoder -> head -> decoder``). FCN-ResNet and DeepLabv3 keep torchvision's module names
(``backbone``, ``classifier``, ``aux_classifier``) so torchvision's state dicts load as they are;
their ``encoder``, ``decoder`` and ``head`` are views of those modules. Weights files of the layout
before the anatomy still load: each regrouped model renames the old keys (``OLD_KEYS``, see
``pixelwise.models.anatomy``).

Encoders from timm. ``unet_timm``, ``fcn_timm``, ``deeplabv3_timm`` and ``deeplabv3plus_timm`` take
``encoder``, a timm model name (``pixelwise.encoders.TimmEncoder``; the ``timm`` extra); the builder's
name says the encoder comes from timm, so ``encoder`` holds one kind of value, a timm name, and never a
prefix. Their input is padded to a multiple of the encoder's deepest stride and the logits cropped back.

Saving. Every model class inherits ``pixelwise.models.hub.HubMixin``: ``save_pretrained``,
``from_pretrained`` and ``push_to_hub`` (the ``hub`` extra); ``get_model`` records the builder and its
arguments on the model (``model.builder``) for them.

Output. ``model(x)`` returns the logits (B, K, H, W) at the input size, as one tensor. The one
exception is a model built with an auxiliary head (``aux=True``: ``fcn_resnet50/101``,
``deeplabv3_resnet50/101``, torchvision's ``aux_loss``, and ``fcn_timm``/``deeplabv3_timm``): in training
mode it returns ``(out, aux)``, two logit tensors of that shape (``aux`` from layer3, or the timm
encoder's second-deepest map; the training loss adds it weighted by
``loss.aux_weight``). In eval mode the auxiliary head does not run and ``out`` alone is returned, so
inference, export and metrics always see one tensor.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

from pixelwise.errors import ArgumentError, UserError
from pixelwise.models.deeplab import (
    deeplab_v1,
    deeplab_v2,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
    deeplabv3_timm,
    deeplabv3plus_resnet50,
    deeplabv3plus_resnet101,
    deeplabv3plus_timm,
)
from pixelwise.models.fcn import fcn8s, fcn16s, fcn32s
from pixelwise.models.fcn_resnet import fcn_resnet50, fcn_resnet101, fcn_timm
from pixelwise.models.hub import HubMixin
from pixelwise.models.segnet import fcn_basic, segnet, segnet_basic
from pixelwise.models.unet import unet, unet_timm

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
    # the same heads on any timm encoder (`encoder="convnext_tiny"`; the `timm` extra)
    "unet_timm": unet_timm,
    "fcn_timm": fcn_timm,
    "deeplabv3_timm": deeplabv3_timm,
    "deeplabv3plus_timm": deeplabv3plus_timm,
}


def get_model(name: str, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Build the model `name` with the builder's keyword arguments.

    With `weights` (a tag of built-in trained weights, e.g. `get_model("segnet_basic", weights="camvid")`)
    the model is built as those weights were trained and loaded with them, in eval mode; `num_classes`
    may then be left out. Their classes, palette and preprocessing: `pixelwise.pretrained`.

    Raises:
        ArgumentError: `name` is not in MODELS ("name"), or `kwargs` has an argument the builder does not
            take ("kwargs"). An error inside the builder keeps its own type and traceback.
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(MODELS)}"
        raise ArgumentError("name", name, f"unknown model; {hint}")
    if weights is not None:
        return _pretrained_model(name, weights, kwargs)
    _check_kwargs(name, kwargs)
    model = MODELS[name](**kwargs)
    # what save_pretrained records: the builder and its arguments, less those naming other files or models
    model.builder = (name, {k: v for k, v in kwargs.items() if k not in ("weights_backbone", "init_from")})
    return model


def from_pretrained(pretrained_model_name_or_path: str | Path, **hub_kwargs: Any) -> nn.Module:
    """Any pixelwise model saved by ``save_pretrained``: a local folder or a Hugging Face Hub repository id,
    in eval mode (``huggingface_hub``'s ``PyTorchModelHubMixin``; ``hub_kwargs`` are its ``map_location``,
    ``revision``, ``cache_dir``, ``token``, ``force_download``, ``local_files_only``). Needs the ``hub`` extra."""
    return HubMixin.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)


def _check_kwargs(name: str, kwargs: dict) -> None:
    """The builder's keyword arguments, checked against its signature before it runs."""
    params = inspect.signature(MODELS[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ArgumentError(
            "kwargs",
            {unknown[0]: kwargs[unknown[0]]},
            f"model {name!r} takes no argument {unknown[0]!r}; it takes {', '.join(params)}",
        )
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ArgumentError("kwargs", kwargs, f"model {name!r} needs {', '.join(missing)}")


def _pretrained_model(name: str, tag: str, kwargs: dict) -> nn.Module:
    """`name` with its built-in weights `tag`; `kwargs` may only repeat what the weights were built with."""
    from pixelwise.pretrained import for_model
    from pixelwise.weights import load_weights

    entry = for_model(name, tag)
    model, meta = load_weights(entry.path())
    built = {"num_classes": meta.num_classes, **meta.model_kwargs}
    clash = {k: v for k, v in kwargs.items() if built.get(k, v) != v or k not in built}
    if clash:
        raise UserError(
            f"model {name!r} with weights={tag!r} is built as {built}; drop {sorted(clash)} or build without weights"
        )
    return model


def models_command(args: argparse.Namespace) -> int:
    """`pixelwise models`: a table of every model with parameters and GFLOPs; `--encoders [PATTERN]`: the encoders."""
    from pixelwise.models.summary import encoder_table, model_table

    if args.encoders is not None:
        print(encoder_table(args.encoders or None))
        return 0
    print(model_table(num_classes=args.num_classes, size=args.size, flops=not args.no_flops))
    print()
    print(pretrained_table())
    return 0


def pretrained_table() -> str:
    """The built-in trained weights: name (for --weights), model, data and what it scored."""
    from pixelwise.pretrained import PRETRAINED

    if not PRETRAINED:
        return "trained weights: none in this install"
    rows = ["trained weights (use the name with --weights, or get_model(MODEL, weights=TAG)):"]
    for entry in PRETRAINED.values():
        m = entry.metrics
        scores = ", ".join(f"{k} {m[k]:.1f}" for k in ("global_acc", "class_avg", "miou", "boundary_f1") if k in m)
        rows.append(f"  {entry.name:<24} {entry.model:<14} {m.get('split', '')}: {scores}")
    return "\n".join(rows)
