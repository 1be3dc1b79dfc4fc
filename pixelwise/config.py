"""Training configuration: one dataclass per concern, loaded from YAML that maps 1:1 onto the fields.

A YAML file has up to seven sections (model, data, train, loss, eval, crf, output); every key is
a field below, every field has a default. `--set section.field=value` overrides a field, the value
parsed as a YAML scalar or list (`--set data.crop_size=[256,256]`); a builder's own keyword
arguments live in `model.kwargs` (`--set model.kwargs.base_channels=16`). There is no inheritance
between files and nothing is ever executed: an unknown key or a wrong type is a UserError naming it.
Relative paths (data.root, output.dir, model.kwargs.weights_backbone) are relative to the working
directory of the command, not to the YAML file.

The paper recipes ship inside the package (`pixelwise/configs/`, which a clone also shows as `configs/`)
and load by name: `load_config("camvid/segnet_basic")`, `pixelwise train camvid/segnet_basic`. Their
`data.root` assumes a clone with `../shared/data` beside it; elsewhere give `--set data.root=PATH`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pixelwise.errors import UserError


@dataclass
class ModelConfig:
    """Which network to build (see `pixelwise models`)."""

    name: str = "unet"  # small and fast to train from scratch: a sensible default for new data
    kwargs: dict[str, Any] = field(default_factory=dict)  # builder keywords besides num_classes, e.g. base_channels
    # FCN staged training (Long et al. 2015, §4.2): e.g. [fcn32s, fcn16s, fcn8s], each stage trained for
    # train.epochs and initialised from the previous stage's best weights; empty = train `name` once
    stages: list[str] = field(default_factory=list)
    # fine-tune (mmseg's load_from): start from these weights (.safetensors, a built-in name or a run's
    # last.pt), every tensor that fits by name and shape; empty = the builder's own initialisation
    init_weights: str = ""


def _imagenet(which: str) -> list[float]:
    """torchvision's ImageNet mean or std (`pixelwise.inference`), read when a config is built."""
    from pixelwise.inference import IMAGENET_MEAN, IMAGENET_STD

    return list(IMAGENET_MEAN if which == "mean" else IMAGENET_STD)


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented."""

    dataset: str = "synthetic"  # built-in shapes need no download; camvid, voc, cityscapes, ade20k, isbi2012, folder
    root: str = ""  # data set folder; unused by synthetic
    train_split: str = "train"  # the split names every built-in data set uses
    val_split: str = "val"  # tune on val; test splits are for final numbers only
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra build_dataset keywords (e.g. synthetic num_images)
    max_train_images: int = 0  # 0 = all; a small number gives a quick smoke run on real data
    max_val_images: int = 0  # 0 = all; a small number keeps frequent validation cheap
    crop_size: list[int] = field(default_factory=lambda: [256, 256])  # (H, W) random crop; fixed batch shapes
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random rescale (DeepLab's); [1, 1] = off
    flip: bool = True  # random left-right flips keep street and object semantics
    rotation: float = 0.0  # random rotation up to +-N degrees; off: the photo papers do not rotate
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; off: none of the papers jitter
    # elastic deformation, the U-Net paper's key augmentation for EM (off for photos): true or "grid" the paper's
    # 3x3 grid of displacements (std 10 px, bicubic); "smooth" torchvision's smoothed field (Simard et al. 2003)
    elastic: bool | str = False
    mean: list[float] = field(default_factory=lambda: _imagenet("mean"))  # ImageNet: the backbones' statistics
    std: list[float] = field(default_factory=lambda: _imagenet("std"))  # ImageNet, as mean
    batch_size: int = 8  # fits a 256x256 crop of the larger models in a few GB
    workers: int = 2  # loader processes; 0 loads in the training process (debugging, or cached data on few cores)
    cache_mb: int = 2048  # keep decoded training images in memory up to this many MB (CamVid train ~250); 0 = off


@dataclass
class TrainConfig:
    """Optimisation: optimiser, schedule, precision, reproducibility."""

    epochs: int = 50  # passes over the training set (per stage when model.stages is set)
    # wall-clock budget in minutes (resumed runs add up): the epoch in which it runs out is the last one,
    # validated and finished as usual; 0 = train.epochs alone decide
    max_minutes: float = 0.0
    optimizer: str = "sgd"  # sgd (+momentum) as FCN/SegNet/DeepLab; adamw for quick from-scratch runs
    lr: float = 0.01  # DeepLab's base rate with the poly schedule
    momentum: float = 0.9  # SGD momentum of every paper here
    weight_decay: float = 5e-4  # FCN/SegNet/DeepLab v1-v2 use 5e-4
    schedule: str = "poly"  # poly: lr * (1 - step/total)^power (DeepLab v2+); constant (SegNet, FCN); step (v1)
    poly_power: float = 0.9  # DeepLab's power
    step_every: int = 2000  # step schedule: multiply the lr by step_gamma every N optimiser steps (DeepLab v1)
    step_gamma: float = 0.1  # DeepLab v1's factor
    warmup_steps: int = 0  # linear warm-up from 0; helps AdamW and large batches, not needed for SGD recipes
    head_lr_mult: float = 1.0  # lr factor of the classifier head (DeepLab's solvers: 10 for fc8; FCN: 1)
    encoder_lr_mult: float = 1.0  # lr factor of the encoder; the papers fine-tune it at the base rate
    freeze_encoder: bool = False  # the papers fine-tune the whole net; true trains only decoder and head
    bias_lr_mult: float = 1.0  # lr factor of biases (FCN and DeepLab Caffe solvers: 2)
    bias_weight_decay: bool = False  # decay biases too; off as in the Caffe solvers (decay_mult 0)
    grad_accum: int = 1  # micro-batches per optimiser step: effective batch = data.batch_size * grad_accum
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping (none of the papers clip)
    amp: str = "auto"  # auto: bf16 autocast where the device runs bf16 natively, else fp32 | none | fp16 (CUDA) | bf16
    device: str = "auto"  # auto = cuda when available, else cpu
    channels_last: bool = True  # NHWC activations: oneDNN's fast layout (SegNet-Basic bf16 step 2x faster on CPU)
    seed: int = 0  # seeds weights, data order, augmentation and dropout
    deterministic: bool = False  # deterministic kernels: bit-exact reruns at some speed cost
    sync_bn: bool = False  # torchrun DDP on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)


@dataclass
class LossConfig:
    """The training loss (pixelwise.losses)."""

    name: str = "cross_entropy"  # cross_entropy | unet_weight_map | dice | lovasz_softmax | ohem
    # none | median_frequency (computed from the train split, as SegNet) | a list of one weight per class
    class_weights: str | list[float] = "none"
    aux_weight: float = 0.5  # auxiliary head loss factor (models built with aux=True), torchvision's value
    w0: float = 10.0  # U-Net weight map: border weight (Ronneberger et al. 2015)
    sigma: float = 5.0  # U-Net weight map: border width in pixels (paper: ~5)
    dice_smooth: float = 1.0  # keeps absent classes at loss 0 rather than 0/0
    lovasz_classes: str = "present"  # present | all: average over classes in the batch (Berman et al. default)
    lovasz_per_image: bool = False  # the reference default treats the batch as one image
    ohem_thresh: float = 0.7  # keep pixels whose true-class probability is below this (PSPNet-style OHEM)
    ohem_min_kept: int = 100_000  # ...but at least this many hardest pixels per batch


@dataclass
class EvalConfig:
    """Validation during and after training."""

    every_epochs: int = 1  # validate every N epochs and after the last; 0 = only at the end, keep the last weights
    # the validation score that picks best.safetensors: miou, pixel_acc, mean_acc, or a data set's own
    # (v_rand, v_info: ISBI 2012, whose challenge ranks by V_Rand)
    best_metric: str = "miou"
    mode: str = "whole"  # whole image; slide windows for images larger than the crop; multiscale (DeepLab)
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])  # multiscale: DeepLab's
    window: list[int] = field(default_factory=list)  # slide mode (H, W); empty = data.crop_size
    stride: list[int] = field(default_factory=list)  # slide mode (H, W); empty = 2/3 of the window
    flip: bool = False  # average with the flipped prediction: a small gain at twice the cost
    batch_size: int = 1  # images differ in size in most data sets; 1 always works


@dataclass
class CRFConfig:
    """Dense CRF post-processing of the final validation (DeepLab v1/v2)."""

    enabled: bool = False  # slow (seconds per image on CPU); DeepLab v1/v2 report numbers with it
    preset: str = "deeplab_vgg"  # deeplab_vgg | deeplab_resnet | pydensecrf parameter sets
    iterations: int = 10  # mean-field iterations (DeepLab uses 10)


@dataclass
class OutputConfig:
    """What a run writes and how often."""

    dir: str = "runs/default"  # every file of the run goes here
    checkpoint_every_steps: int = 0  # also write last.pt every N optimiser steps (resume mid-epoch); 0 = epoch ends
    log_every_steps: int = 10  # a metrics.jsonl line (loss, lr, images/s) every N optimiser steps
    report: bool = True  # report.html with curves, confusion matrix and example predictions at the end
    report_images: int = 4  # validation images shown in the report
    progress: bool = True  # tqdm bars; off for logs that are files
    # TensorBoard event files in dir/tensorboard (loss, lr, images/s, val metrics per class, example
    # predictions), where many users already watch runs; off by default: it needs the tensorboard extra
    tensorboard: bool = False


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


MAX_SIDE = 16384  # a training crop larger than this is a typo: one 16384^2 batch of 8 is already ~25 GB as float32


def choices() -> dict[str, tuple[str, ...]]:
    """Fields whose value must be one of a few names, each list taken from the library's own registry
    (read when a config is checked, so importing the config module stays light)."""
    from pixelwise.crf import CRF_PRESETS
    from pixelwise.engine.parts import OPTIMIZERS, SCHEDULES
    from pixelwise.inference import MODES
    from pixelwise.losses import LOSSES, LOVASZ_CLASSES
    from pixelwise.precision import PRECISIONS

    amp = ("auto", "none", *(p for p in PRECISIONS if p not in ("auto", "fp32")))  # train.amp spells fp32 "none"
    return {
        "train.optimizer": tuple(OPTIMIZERS),
        "train.schedule": SCHEDULES,
        "train.amp": amp,
        "loss.name": tuple(LOSSES),
        "loss.lovasz_classes": LOVASZ_CLASSES,
        "eval.mode": MODES,
        "crf.preset": tuple(CRF_PRESETS),
    }


CONFIGS_DIR = Path(__file__).parent / "configs"  # the paper recipes: package data, one YAML per recipe


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a file, or a shipped config's name such as "camvid/segnet_basic"; the
    defaults when `path` is None) and apply `--set` overrides."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = resolve_config(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"config {path}: cannot read it ({e.strerror or e}); check the path") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise UserError(
                f"{path}: expected a mapping of sections (model:, data:, train: ...), got {type(raw).__name__}"
            )
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw, source=source)


def builtin_configs() -> dict[str, Path]:
    """The shipped configs by name: "camvid/segnet_basic" -> .../pixelwise/configs/camvid/segnet_basic.yaml."""
    return {p.relative_to(CONFIGS_DIR).with_suffix("").as_posix(): p for p in sorted(CONFIGS_DIR.rglob("*.yaml"))}


def resolve_config(path_or_name: str | Path) -> Path:
    """A config file: `path_or_name` itself when it is a file, else the shipped config of that name
    (with or without `.yaml`); a UserError with the closest name otherwise."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    configs = builtin_configs()
    name = str(path_or_name).removesuffix(".yaml")
    if name in configs:
        return configs[name]
    close = difflib.get_close_matches(name, configs, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else "`pixelwise configs` lists the built-in ones"
    raise UserError(f"config {path_or_name}: no such file, nor a built-in config of that name; {hint}")


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> Config:
    """Build a validated Config from a nested dict (sections -> fields)."""
    sections = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise UserError(f"{source}: unknown section {name!r}{_suggest(str(name), _SECTIONS)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise UserError(f"{source}: section {name!r} must be a mapping of fields, got {value!r}")
        cls = _SECTIONS[name]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        allowed = choices()
        for key, v in value.items():
            if key not in hints:
                raise UserError(f"{source}: unknown key {name}.{key}{_suggest(str(key), hints, prefix=name + '.')}")
            kwargs[key] = _coerce(v, hints[key], f"{source}: {name}.{key}")
            names = allowed.get(f"{name}.{key}")
            if names and kwargs[key] not in names:
                raise UserError(
                    f"{source}: {name}.{key}={kwargs[key]!r} is not allowed; choose one of {', '.join(names)}"
                )
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    _check_values(cfg, source)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The plain nested dict of a Config (what `yaml.safe_dump` writes as the run's config.yaml)."""
    return dataclasses.asdict(cfg)


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.field[.key]=value` to the raw nested dict."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=10")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"--set {item!r}: the key needs a section and a field, e.g. train.lr")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"--set {item!r}: the value is not a YAML scalar or list; quote it") from None
    section, name, rest = parts[0], parts[1], parts[2:]
    if section not in _SECTIONS:
        raise UserError(f"--set {item!r}: unknown section {section!r}{_suggest(section, _SECTIONS)}")
    hints = typing.get_type_hints(_SECTIONS[section])
    if name not in hints:
        raise UserError(f"--set {item!r}: unknown key {section}.{name}{_suggest(name, hints, prefix=section + '.')}")
    target = raw.setdefault(section, {})
    if target is None:
        target = raw[section] = {}
    if rest:  # a key inside a dict field such as model.kwargs
        if typing.get_origin(hints[name]) is not dict:
            raise UserError(f"--set {item!r}: {section}.{name} is not a mapping; set it as a whole")
        target = target.setdefault(name, {})
        for p in rest[:-1]:
            target = target.setdefault(p, {})
        target[rest[-1]] = value
    else:
        target[name] = value


def _suggest(word: str, options: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; valid keys: {', '.join(prefix + o for o in options)}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {str: "text", int: "an integer", float: "a number", bool: "true/false", type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the field type `tp`; convert the harmless cases (int -> float, "1e-3" -> float)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except UserError:
                continue
        raise UserError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where} must be {_type_name(tp)}, got {value!r}; write it as [a, b]")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping (key: value), got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _finite(float(value), where)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                return _finite(float(value), where)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    raise UserError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _finite(x: float, where: str) -> float:
    """No field takes .nan or .inf (YAML spells them so): they would only surface as a NaN loss later."""
    if not math.isfinite(x):
        raise UserError(f"{where} must be a finite number, got {x}")
    return x


# Validation scores, each higher-is-better, that eval.best_metric may name: every validation logs the pixel
# ones; a data set's own come from engine.dataset_metrics (ISBI 2012's challenge scores)
PIXEL_SCORES = ("miou", "pixel_acc", "mean_acc")
# data.elastic's kinds besides true (= "grid") and false: the U-Net paper's 3x3 grid of displacements
# (data.transforms.GridElastic); torchvision's smoothed random field (Simard et al. 2003)
ELASTIC_KINDS = ("grid", "smooth")
DATASET_SCORES = {"isbi2012": ("v_rand", "v_info")}


def _check_values(cfg: Config, source: str) -> None:
    """Value checks that types cannot express."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(f"{source}: {msg}")

    _check_data(cfg.data, need)
    need(
        cfg.eval.best_metric in PIXEL_SCORES + DATASET_SCORES.get(cfg.data.dataset, ()),
        f"eval.best_metric={cfg.eval.best_metric!r} must be one of miou, pixel_acc, mean_acc (any data set) or "
        "v_rand, v_info (data.dataset isbi2012)",
    )
    need(cfg.output.dir.strip() != "", "output.dir is empty; give the run's folder, e.g. runs/my_run")
    need(cfg.train.epochs >= 1, f"train.epochs={cfg.train.epochs} must be at least 1")
    need(cfg.train.max_minutes >= 0, f"train.max_minutes={cfg.train.max_minutes} must be 0 (no limit) or more")
    need(cfg.train.lr > 0, f"train.lr={cfg.train.lr} must be positive")
    need(cfg.train.grad_accum >= 1, f"train.grad_accum={cfg.train.grad_accum} must be at least 1")
    need(cfg.train.step_every >= 1, f"train.step_every={cfg.train.step_every} must be at least 1")
    need(cfg.train.warmup_steps >= 0, f"train.warmup_steps={cfg.train.warmup_steps} must be 0 or more")
    need(
        cfg.train.encoder_lr_mult > 0,
        f"train.encoder_lr_mult={cfg.train.encoder_lr_mult} must be positive; "
        "to stop the encoder learning set train.freeze_encoder=true",
    )
    need(cfg.eval.every_epochs >= 0, f"eval.every_epochs={cfg.eval.every_epochs} must be 0 or more")
    need(len(cfg.eval.scales) > 0 and min(cfg.eval.scales) > 0, f"eval.scales={cfg.eval.scales} must be positive")
    need(cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size} must be at least 1")
    for name in ("window", "stride"):
        v = getattr(cfg.eval, name)
        need(v == [] or (len(v) == 2 and min(v) > 0), f"eval.{name}={v} must be [] or two positive sizes [H, W]")
    need(cfg.output.checkpoint_every_steps >= 0, "output.checkpoint_every_steps must be 0 or more")
    need(cfg.output.log_every_steps >= 1, "output.log_every_steps must be at least 1")
    cw = cfg.loss.class_weights
    need(
        not isinstance(cw, str) or cw in ("none", "median_frequency"),
        f"loss.class_weights={cw!r} must be none, median_frequency or a list of one weight per class",
    )
    need(
        not isinstance(cw, list) or (len(cw) > 0 and min(cw) >= 0),
        f"loss.class_weights={cw} must list one non-negative weight per class",
    )
    need(
        all(s.isidentifier() for s in cfg.model.stages),  # each stage trains into output.dir/<stage>
        f"model.stages={cfg.model.stages} must hold model names (see `pixelwise models`), not paths",
    )
    need(
        not cfg.model.stages or cfg.model.stages[-1] == cfg.model.name,
        f"model.stages={cfg.model.stages} must end with model.name={cfg.model.name!r}, the model the run delivers",
    )


# ------------------------------------------------------------------------------ `pixelwise configs`
def configs_command(args: argparse.Namespace) -> int:
    """`pixelwise configs [NAME]`: one line per shipped config, or the YAML of one (to copy and edit)."""
    if args.name:
        sys.stdout.write(resolve_config(args.name).read_text(encoding="utf-8"))
        return 0
    rows = [("name", "paper", "model", "data set", "schedule")]
    rows += [(name, config_paper(path), *_summary(load_config(path))) for name, path in builtin_configs().items()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[4])
    print("\n`pixelwise configs NAME` prints one; `pixelwise train NAME --set data.root=PATH` trains it")
    return 0


def _check_data(dc: DataConfig, need: Callable[[bool, str], None]) -> None:
    """data.* value checks (`need(ok, message)` raises)."""
    need(
        len(dc.crop_size) == 2 and min(dc.crop_size) > 0,
        f"data.crop_size={dc.crop_size} must be two positive sizes [H, W]",
    )
    need(
        max(dc.crop_size, default=0) <= MAX_SIDE,
        f"data.crop_size={dc.crop_size} is larger than {MAX_SIDE} pixels a side; give the training crop",
    )
    need(
        dc.elastic in (True, False, *ELASTIC_KINDS),
        f'data.elastic={dc.elastic!r} is unknown; give true (the paper\'s 3x3 grid), "grid", "smooth" or false',
    )
    need(  # torchvision's ElasticTransform blurs its field with a 41-pixel kernel, reflect-padded by 20
        dc.elastic != "smooth" or min(dc.crop_size) > 20,
        f"data.crop_size={dc.crop_size} is too small for data.elastic=smooth; give crops larger than 20 pixels",
    )
    need(
        len(dc.scale_range) == 2 and 0 < dc.scale_range[0] <= dc.scale_range[1],
        f"data.scale_range={dc.scale_range} must be [low, high] with 0 < low <= high",
    )
    need(
        len(dc.mean) == 3 and len(dc.std) == 3 and min(dc.std) > 0,
        "data.mean and data.std must be three numbers each (R, G, B), std > 0",
    )
    need(dc.batch_size >= 1, f"data.batch_size={dc.batch_size} must be at least 1")
    need(dc.workers >= 0, f"data.workers={dc.workers} must be 0 or more")


def config_paper(path: Path) -> str:
    """The paper a shipped config follows: its first line, `# paper: ...`."""
    first = path.read_text(encoding="utf-8").partition("\n")[0]
    return first.removeprefix("# paper:").strip() if first.startswith("# paper:") else "-"


def _summary(cfg: Config) -> tuple[str, str, str]:
    """The model(s), data set and schedule of a config, in a few words each."""
    t = cfg.train
    epochs = f"{t.epochs} epoch{'s' * (t.epochs > 1)}"
    if cfg.model.stages:
        epochs = f"{len(cfg.model.stages)} stages x {epochs}"
    schedule = f"{epochs}, {t.optimizer} lr {t.lr:g} {t.schedule}, batch {cfg.data.batch_size}"
    return ",".join(cfg.model.stages) or cfg.model.name, cfg.data.dataset, schedule
