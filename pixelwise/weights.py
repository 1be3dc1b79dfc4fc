"""Weights files and checkpoints, loaded without ever running code from the file.

Inference weights are `.safetensors` files whose metadata names the model, its builder's keyword
arguments, the class names, the palette and the input normalisation, so `--weights W.safetensors`
needs nothing else. Training checkpoints (`.pt`) are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import pickle
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pixelwise.errors import ArgumentError, UserError, translated
from pixelwise.fileio import atomic_path
from pixelwise.inference import IMAGENET_MEAN, IMAGENET_STD
from pixelwise.palette import default_palette

FORMAT_VERSION = "1"  # bump when the metadata layout changes
# int8 storage: a weight W stored as int8 Q with one float32 scale per output channel, W = Q * scale;
# the header lists those tensors, each scale sits beside its tensor under this suffix (not a module name:
# a file read by a pixelwise without int8 support fails its strict load instead of loading raw int8)
INT8_SCALE = "#int8_scale"
_INT8_MIN_NUMEL = 4096  # smaller tensors (biases, norms, tiny convs) gain nothing and stay floating


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
    int8: bool = False,
) -> None:
    """Write `model`'s state dict and its metadata to a `.safetensors` file, atomically.

    `model_kwargs` must be JSON-serialisable: they are passed back to the builder on load
    (without `num_classes`, which comes from `classes`, and without `weights_backbone`).
    `int8` stores every floating tensor of 2 or more dimensions and 4096 values or more (the conv and
    linear weights) as int8 with one scale per slice along dim 0 (a conv's output channels; symmetric;
    about a quarter of fp32, half of fp16); `load_weights` restores float tensors.
    """
    from safetensors.torch import save_file

    meta = meta_for(
        model_name=model_name,
        model_kwargs=model_kwargs,
        classes=classes,
        palette=palette,
        mean=mean,
        std=std,
        ignore_index=ignore_index,
        extra=extra,
    )
    try:
        header = {"format": "pixelwise", "version": FORMAT_VERSION, "meta": json.dumps(asdict(meta))}
    except TypeError as e:
        raise UserError(f"model_kwargs/extra for {path} must be JSON-serialisable: {e}") from None
    # safetensors refuses shared storage; contiguous clones make tied or sliced tensors safe to store
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if int8:
        state, header["int8"] = quantize_int8(state)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)


def quantize_int8(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """`state` with its large weights (dim >= 2, >= 4096 values) as int8 and a float32 scale per output
    channel beside each (key + INT8_SCALE), and the JSON list of the quantized keys for the header."""
    out, keys = {}, []
    for k, v in state.items():
        if k + INT8_SCALE in state:
            raise ArgumentError("state", k + INT8_SCALE, "is a name int8 storage needs for the scale of " + k)
        if v.is_floating_point() and v.dim() >= 2 and v.numel() >= _INT8_MIN_NUMEL:
            w = v.float()
            if not bool(torch.isfinite(w).all()):
                raise ArgumentError("state", k, "holds NaN or infinite values, which int8 cannot store")
            scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp(min=1e-12) / 127.0
            out[k] = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
            out[k + INT8_SCALE] = scale.flatten()  # (C_out,)
            keys.append(k)
        else:
            out[k] = v
    return out, json.dumps(keys)


def dequantize_int8(state: dict[str, torch.Tensor], keys: list[str], path: Path) -> dict[str, torch.Tensor]:
    """The float tensors of a file written with int8 storage (`keys`: the header's list)."""
    for k in keys:
        q, scale = state.get(k), state.pop(k + INT8_SCALE, None)
        if (
            q is None
            or scale is None
            or q.dtype != torch.int8
            or q.dim() == 0
            or scale.dtype != torch.float32
            or scale.shape != q.shape[:1]
        ):
            raise UserError(f"{path}: int8 tensor {k!r} or its scale is missing or malformed; the file is damaged")
        state[k] = q.float() * scale.view(-1, *([1] * (q.dim() - 1)))
    return state


def _int8_keys(path: Path) -> list[str]:
    """The header's list of int8-stored tensors (empty for float storage)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        listed = (f.metadata() or {}).get("int8")
    try:
        keys = json.loads(listed) if listed else []
    except ValueError:
        keys = None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise UserError(f"{path}: damaged pixelwise metadata (the int8 list); re-save the weights with pixelwise")
    return keys


def meta_for(
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    classes: list[str],
    palette: list[tuple[int, int, int]] | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    ignore_index: int = 255,
    extra: dict[str, Any] | None = None,
) -> WeightsMeta:
    """The metadata `save_weights` stores (and `save_pretrained`'s config.json): builder keywords without the
    class count (from `classes`) and without other files; a default palette when none is given."""
    palette = [tuple(int(v) for v in c) for c in (palette or default_palette(len(classes)))]
    if len(palette) < len(classes):
        raise UserError(f"palette has {len(palette)} colours for {len(classes)} classes; give one per class")
    kwargs = {k: v for k, v in model_kwargs.items() if k not in ("num_classes", "weights_backbone", "init_from")}
    return WeightsMeta(
        model_name,
        kwargs,
        list(classes),
        palette[: len(classes)],
        tuple(mean),
        tuple(std),
        int(ignore_index),
        dict(extra or {}),
    )


def read_weights_meta(path: str | Path) -> WeightsMeta:
    """Read only the metadata of a pixelwise `.safetensors` file (or of built-in weights by name: their
    entry's chosen CRF, if any, is added to `extra["crf"]`)."""
    from pixelwise.pretrained import resolve

    return _with_builtin_crf(_read_meta(resolve(path)), path)


def _with_builtin_crf(meta: WeightsMeta, path_or_name: str | Path) -> WeightsMeta:
    """`meta` with the CRF chosen for built-in weights when `path_or_name` names them (not a file)."""
    from pixelwise.pretrained import find

    entry = None if Path(path_or_name).is_file() else find(str(path_or_name))
    if entry is not None and entry.crf:
        meta.extra.setdefault("crf", dict(entry.crf))
    return meta


def _read_meta(path: Path) -> WeightsMeta:
    """The schema-checked metadata in the header of the `.safetensors` file `path`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise UserError(
            f"{path}: not a readable .safetensors file ({_short(e)}); "
            "give a file written by pixelwise (train, demo or init-weights)"
        ) from None
    if header.get("format") != "pixelwise" or "meta" not in header:
        raise UserError(
            f"{path}: this .safetensors file has no pixelwise metadata; "
            "make one with `pixelwise init-weights` or `pixelwise train`"
        )
    try:
        raw = json.loads(header["meta"])
    except ValueError as e:
        raise UserError(f"{path}: damaged pixelwise metadata ({_short(e)})") from None
    return check_meta(raw, path)


# builder keywords a weights file may not carry: the class count comes from `classes`, and a file holds its
# own tensors rather than naming other files
_NOT_STORED = ("num_classes", "weights", "weights_backbone", "init_from")
_MAX_INT = 65536  # no builder keyword (channels, depth, stride, rates) is sensibly larger
_MAX_CLASSES = 65536  # class-index PNGs hold 16 bits


class _Invalid(Exception):
    """One metadata field that fails the schema: (field, value, what it must be)."""


def check_meta(raw: Any, path: str | Path) -> WeightsMeta:
    """Check weights metadata against its schema before anything is built from it; one line per failure.

    Every field is checked for type and range, `model_kwargs` against the builder's own signature.
    """
    try:
        return _checked_meta(raw)
    except _Invalid as e:
        field_name, value, need = e.args
        shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
        raise UserError(
            f"{path}: metadata {field_name}={shown} is not valid: {need}; re-save the weights with "
            "pixelwise or fix the file"
        ) from None


def _checked_meta(raw: Any) -> WeightsMeta:
    from pixelwise.models import MODELS

    if not isinstance(raw, dict):
        raise _Invalid("meta", raw, "it must be a JSON object")
    known = {f.name for f in fields(WeightsMeta)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _Invalid(unknown[0], raw[unknown[0]], f"no such field; the fields are {', '.join(sorted(known))}")
    missing = [key for key in ("model_name", "model_kwargs", "classes", "palette") if key not in raw]
    if missing:
        raise _Invalid(missing[0], None, "the field is missing")
    name, classes, palette = raw["model_name"], raw["classes"], raw["palette"]
    if not isinstance(name, str) or name not in MODELS:
        raise _Invalid("model_name", name, f"choose one of {', '.join(MODELS)}")
    if not (
        isinstance(classes, list) and 1 <= len(classes) <= _MAX_CLASSES and all(isinstance(c, str) for c in classes)
    ):
        raise _Invalid("classes", classes, f"a list of 1 to {_MAX_CLASSES} class names")
    if not (isinstance(palette, list) and len(palette) == len(classes) and all(_is_rgb(c) for c in palette)):
        raise _Invalid("palette", palette, f"one [r, g, b] colour (0..255) per class, {len(classes)} in all")
    kwargs = _checked_kwargs(name, raw["model_kwargs"])
    channels = kwargs.get("in_channels", 3)
    ignore = raw.get("ignore_index", 255)
    if not (_is_int(ignore) and abs(ignore) < 2**31 and not 0 <= ignore < len(classes)):
        raise _Invalid("ignore_index", ignore, f"an integer that is not a class index (0..{len(classes) - 1})")
    return WeightsMeta(
        name,
        kwargs,
        list(classes),
        [tuple(c) for c in palette],
        _checked_stats(raw, "mean", channels),
        _checked_stats(raw, "std", channels),
        ignore,
        _checked_extra(raw.get("extra", {})),
    )


def _checked_stats(raw: dict, key: str, channels: int) -> tuple[float, ...]:
    """`mean` or `std`: one finite number per input channel (std > 0), ImageNet's when absent."""
    value = raw.get(key, list(IMAGENET_MEAN if key == "mean" else IMAGENET_STD))
    if not (
        isinstance(value, list)
        and len(value) == channels
        and all(_is_finite_number(v) for v in value)
        and (key == "mean" or min(value) > 0)
    ):
        raise _Invalid(
            key, value, f"{channels} finite numbers, one per input channel" + (", all above 0" if key == "std" else "")
        )
    return tuple(float(v) for v in value)


def _checked_kwargs(name: str, kwargs: Any) -> dict[str, Any]:
    """`model_kwargs` against builder `name`'s keyword parameters and their annotated types."""
    from pixelwise.models import MODELS

    if not isinstance(kwargs, dict):
        raise _Invalid("model_kwargs", kwargs, "a JSON object of builder keywords")
    params = inspect.signature(MODELS[name]).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {k: p for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    for key, value in kwargs.items():
        where = f"model_kwargs.{key}"
        if key in _NOT_STORED:
            raise _Invalid(
                where,
                value,
                "a weights file may not set it (the class count comes from `classes`, and "
                "a file holds its own tensors and may not point at other files)",
            )
        if key in params:
            kind = str(params[key].annotation)
        elif open_ended:  # a builder taking **kwargs (e.g. a wrapper): the value's own type, still bounded
            kind = {bool: "bool", int: "int", float: "float", str: "str", list: "tuple[int, ...]"}.get(type(value), "")
        else:
            allowed = ", ".join(k for k in params if k not in _NOT_STORED)
            raise _Invalid(where, value, f"model {name!r} has no option {key!r}; it takes {allowed}")
        ok = {
            "int": _is_int(value) and 0 <= value <= _MAX_INT,
            "bool": isinstance(value, bool),
            "float": _is_finite_number(value),
            "str": isinstance(value, str) and len(value) <= 64,
            "tuple[int, ...]": isinstance(value, list)
            and 0 < len(value) <= 64
            and all(_is_int(v) and 0 < v <= _MAX_INT for v in value),
        }.get(kind, False)
        if not ok:
            need = {
                "int": f"an integer in 0..{_MAX_INT}",
                "bool": "true or false",
                "float": "a finite number",
                "str": "a short string",
                "tuple[int, ...]": "a list of positive integers",
            }.get(kind, "not storable in a weights file")
            raise _Invalid(where, value, need)
    return dict(kwargs)


def _checked_extra(extra: Any) -> dict[str, Any]:
    """`extra` is free-form, except the sizes inference reads from it: two positive pixel counts each."""
    if not isinstance(extra, dict):
        raise _Invalid("extra", extra, "a JSON object")
    for key in ("crop_size", "synthetic_size"):
        size = extra.get(key)
        if size is not None and not (
            isinstance(size, list) and len(size) == 2 and all(_is_int(v) and 0 < v <= _MAX_INT for v in size)
        ):
            raise _Invalid(f"extra.{key}", size, f"[height, width], two integers in 1..{_MAX_INT}")
    if "crf" in extra:
        from pixelwise.crf import CRFParams

        try:
            CRFParams.from_dict(extra["crf"])
        except (ArgumentError, TypeError) as e:
            raise _Invalid("extra.crf", extra["crf"], f"the dense CRF's parameters ({e})") from None
    return dict(extra)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_rgb(c: Any) -> bool:
    return isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, WeightsMeta]:
    """Build the model named in the file's metadata and load its tensors (strictly). Eval mode.

    `path` may also name built-in weights (`segnet_basic_camvid`, see `pixelwise.pretrained`) or a folder
    written by `save_pretrained` (its model.safetensors)."""
    from safetensors.torch import load_file

    from pixelwise.models import get_model
    from pixelwise.pretrained import resolve

    file = resolve(path)  # a built-in name becomes its file, sha256 checked (once)
    meta = _with_builtin_crf(_read_meta(file), path)  # schema-checked: nothing reaches a builder unchecked
    path = file
    _check_shapes(path, meta)  # before the model is built for real: a file cannot make it build big
    model = get_model(meta.model_name, num_classes=meta.num_classes, **meta.model_kwargs)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:
        raise UserError(f"{path}: cannot read the tensors ({_short(e)}); the file is damaged") from None
    state = dequantize_int8(state, _int8_keys(path), path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: tensors do not fit model {meta.model_name!r} ({_short(e)})") from None
    model.weights_meta = meta  # save_pretrained keeps the classes, palette and normalisation
    return model.to(device).eval(), meta


def load_matching(model: nn.Module, source: str | Path) -> tuple[list[str], list[str]]:
    """Fine-tuning's start (mmseg's `load_from`): copy into `model` every tensor of `source` whose name
    and shape match, leaving the rest at the model's own initialisation (e.g. a head for other classes).
    At least half of the model's tensors must fit: anything less is another model's file.

    Args:
        source: pixelwise weights (`.safetensors` or a built-in name) or a training checkpoint (`last.pt`).

    Returns:
        (names loaded, names of `model` kept at their initialisation).
    """
    path = Path(source)
    if path.is_file() and path.suffix != ".safetensors":
        from pixelwise.engine.state import read_checkpoint

        state = read_checkpoint(path)["model"]  # layout, version and digest checked as for --resume
    else:
        state = load_weights(source)[0].state_dict()
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape}
    if len(fits) < len(own) / 2:  # a few tensors of another model fitting by chance is no start
        raise ArgumentError(
            "source",
            str(source),
            f"only {len(fits)} of the {len(own)} tensors of this {type(model).__name__} fit by name and shape; "
            "give weights of the same model (any number of classes)",
        )
    model.load_state_dict(fits, strict=False)
    return sorted(fits), sorted(k for k in own if k not in fits)


def _check_shapes(path: Path, meta: WeightsMeta) -> None:
    """The file's tensor names and shapes against the declared model, built on the meta device (no memory)."""
    from safetensors import safe_open

    from pixelwise.models import get_model

    try:
        with torch.device("meta"):
            skeleton = get_model(meta.model_name, num_classes=meta.num_classes, **meta.model_kwargs)
    except (UserError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(
            f"{path}: metadata model_kwargs={json.dumps(meta.model_kwargs)} do not build model "
            f"{meta.model_name!r} ({_short(e)}); re-save the weights with pixelwise"
        ) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises several types for a damaged file
        raise UserError(f"{path}: cannot read the tensors ({_short(e)}); the file is damaged") from None
    for k in _int8_keys(path):  # an int8 tensor has its float shape; its scale is no model tensor
        stored.pop(k + INT8_SCALE, None)
    # a strict load of shape-only tensors: the model's own checks, old key names (models.anatomy) included
    try:
        skeleton.load_state_dict({k: torch.empty(shape, device="meta") for k, shape in stored.items()})
    except RuntimeError as e:
        problem = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), _short(e))
        raise UserError(
            f"{path}: the tensors do not fit model {meta.model_name!r} with "
            f"{json.dumps(meta.model_kwargs)} ({problem[:300]}); the metadata does not describe these "
            "tensors — re-save the weights with pixelwise"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint with `weights_only=True`: a pickle that carries code is refused."""
    path = _existing(path, "checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path}: refused to load: the checkpoint holds objects other than tensors and plain "
            f"containers ({_short(e)}); only load checkpoints you trust with your own code"
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as e:
        raise UserError(
            f"{path}: damaged or truncated checkpoint ({_short(e)}); resume from an earlier one or start again"
        ) from None


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
