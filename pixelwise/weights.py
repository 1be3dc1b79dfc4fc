"""Weights files and checkpoints, loaded without ever running code from the file.

Inference weights are `.safetensors` files whose metadata names the model, its builder's keyword
arguments, the class names, the palette and the input normalisation, so `--weights W.safetensors`
needs nothing else. Training checkpoints (`.pt`) are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import argparse
import json
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pixelwise.errors import ArgumentError, UserError, translated
from pixelwise.fileio import atomic_path
from pixelwise.inference import IMAGENET_MEAN, IMAGENET_STD
from pixelwise.palette import default_palette

FORMAT_VERSION = "1"  # bump when the metadata layout changes


@dataclass
class WeightsMeta:
    """What a weights file says about its model, besides the tensors."""

    model_name: str
    model_kwargs: dict[str, Any]
    classes: list[str]
    palette: list[tuple[int, int, int]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = 255
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def save_weights(
    path: str | Path,
    model: nn.Module,
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    classes: list[str],
    palette: list[tuple[int, int, int]] | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    ignore_index: int = 255,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write `model`'s state dict and its metadata to a `.safetensors` file, atomically.

    `model_kwargs` must be JSON-serialisable: they are passed back to the builder on load
    (without `num_classes`, which comes from `classes`, and without `weights_backbone`).
    """
    from safetensors.torch import save_file

    palette = [tuple(int(v) for v in c) for c in (palette or default_palette(len(classes)))]
    if len(palette) < len(classes):
        raise UserError(f"palette has {len(palette)} colours for {len(classes)} classes; give one per class")
    kwargs = {k: v for k, v in model_kwargs.items() if k not in ("num_classes", "weights_backbone", "init_from")}
    meta = WeightsMeta(model_name, kwargs, list(classes), palette[: len(classes)], tuple(mean), tuple(std),
                       int(ignore_index), dict(extra or {}))
    try:
        header = {"format": "pixelwise", "version": FORMAT_VERSION, "meta": json.dumps(asdict(meta))}
    except TypeError as e:
        raise UserError(f"model_kwargs/extra for {path} must be JSON-serialisable: {e}") from None
    # safetensors refuses shared storage; contiguous clones make tied or sliced tensors safe to store
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)


def read_weights_meta(path: str | Path) -> WeightsMeta:
    """Read only the metadata of a pixelwise `.safetensors` file (or of built-in weights by name: their
    entry's chosen CRF, if any, is added to `extra["crf"]`)."""
    from safetensors import safe_open

    from pixelwise.pretrained import find, resolve

    entry = None if Path(path).is_file() else find(str(path))
    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise UserError(f"{path}: not a readable .safetensors file ({_short(e)}); "
                        "give a file written by pixelwise (train, demo or init-weights)") from None
    if header.get("format") != "pixelwise" or "meta" not in header:
        raise UserError(f"{path}: this .safetensors file has no pixelwise metadata; "
                        "make one with `pixelwise init-weights` or `pixelwise train`")
    try:
        raw = json.loads(header["meta"])
        raw["palette"] = [tuple(c) for c in raw["palette"]]
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        meta = WeightsMeta(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: damaged pixelwise metadata ({_short(e)})") from None
    if entry is not None and entry.crf:
        meta.extra.setdefault("crf", dict(entry.crf))
    return meta


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, WeightsMeta]:
    """Build the model named in the file's metadata and load its tensors (strictly). Eval mode.

    `path` may also name built-in weights (`segnet_basic_camvid`, see `pixelwise.pretrained`)."""
    from safetensors.torch import load_file

    from pixelwise.models import get_model
    from pixelwise.pretrained import resolve

    meta = read_weights_meta(path)  # with a built-in's chosen CRF
    path = resolve(path)  # a built-in name becomes its file, sha256 checked
    for key in ("weights_backbone", "init_from"):  # save_weights never stores them: a file must not name files
        if key in meta.model_kwargs:
            raise UserError(f"{path}: metadata model_kwargs names {key}={meta.model_kwargs[key]!r}; a weights file "
                            "holds its own tensors and may not point at other files — re-save it with pixelwise")
    try:
        model = get_model(meta.model_name, num_classes=meta.num_classes, **meta.model_kwargs)
    except ArgumentError as e:
        raise UserError(f"{path}: its metadata cannot build a model ({e}); re-save the file with pixelwise") from None
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:
        raise UserError(f"{path}: cannot read the tensors ({_short(e)}); the file is damaged") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: tensors do not fit model {meta.model_name!r} ({_short(e)})") from None
    return model.to(device).eval(), meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint with `weights_only=True`: a pickle that carries code is refused."""
    path = _existing(path, "checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: the checkpoint holds objects other than tensors and plain "
                        f"containers ({_short(e)}); only load checkpoints you trust with your own code") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: damaged or truncated checkpoint ({_short(e)}); "
                        "resume from an earlier one or start again") from None


def load_torchvision_state(path: str | Path, argument: str = "weights") -> dict[str, torch.Tensor]:
    """Read a torchvision-format `.pth` (a plain state dict) or a `.safetensors` state dict from disk."""
    path = _existing(path, argument)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise UserError(f"{argument}={path}: not a readable .safetensors file ({_short(e)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{argument}={path}: refused to load: not a plain state dict ({_short(e)})") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{argument}={path}: damaged or not a torch file ({_short(e)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{argument}={path}: expected a state dict (name -> tensor), as torchvision's .pth files are")
    return state


def init_weights_command(args: argparse.Namespace) -> int:
    """`pixelwise init-weights MODEL --num-classes K --out W.safetensors`: weights without training."""
    from pixelwise.models import get_model

    if args.num_classes < 1:
        raise UserError(f"--num-classes={args.num_classes}: give at least 1 class")
    classes = args.classes or [f"class{i}" for i in range(args.num_classes)]
    if len(classes) != args.num_classes:
        raise UserError(f"--classes gives {len(classes)} names for --num-classes={args.num_classes}; give one each")
    torch.manual_seed(args.seed)
    kwargs: dict[str, Any] = {}
    if args.weights_backbone:
        kwargs["weights_backbone"] = args.weights_backbone
    with translated({"name": "MODEL"}, flags=True):
        model = get_model(args.model, num_classes=args.num_classes, **kwargs)
    save_weights(args.out, model, model_name=args.model, model_kwargs={}, classes=classes)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.model}, {args.num_classes} classes, {n / 1e6:.1f} M parameters")
    return 0


def _existing(path: str | Path, argument: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{argument}: no such file {path}; check the path")
    return path


def _short(e: BaseException) -> str:
    """First line of an exception message, trimmed for a one-line error."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
