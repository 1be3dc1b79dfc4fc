"""The `pixelwise` command line: one sub-command per job, each handled by a plain function.

Handlers are imported lazily, so an optional extra (onnx, serve) is only needed by the command that
uses it. Choices and defaults come from the library's registries (`pixelwise.inference.MODES`,
`pixelwise.crf.CRF_PRESETS`, ...), never from a list kept here; the flags' names for the library's
arguments are `INFERENCE_FLAGS`, used to translate its errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from pixelwise.errors import ArgumentError, UserError
from pixelwise.fileio import describe_os_error

# top-level module an optional feature imports -> the extra that installs it (pyproject.toml)
MISSING_EXTRA = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "starlette": "serve",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "numba": "crf",  # pixelwise.crf_compiled imports it guarded; the hint is for anything that would not
    "huggingface_hub": "hub",
    "timm": "timm",
    "tensorboard": "tensorboard",
}

# sub-command -> "module:function" taking the parsed argparse.Namespace
HANDLERS = {
    "models": "pixelwise.models:models_command",
    "demo": "pixelwise.demo:demo_command",
    "configs": "pixelwise.config:configs_command",
    "train": "pixelwise.train:train_command",
    "evaluate": "pixelwise.evaluate:evaluate_command",
    "predict": "pixelwise.predict:predict_command",
    "init-weights": "pixelwise.weights:init_weights_command",
    "export": "pixelwise.export:export_command",
    "serve": "pixelwise.serve:serve_command",
    "gallery": "pixelwise.gallery:gallery_command",
}


# library argument (pixelwise.engine.InferenceSpec, CRFParams) -> the flag that gives it
INFERENCE_FLAGS = {
    "mode": "--mode",
    "window": "--window",
    "stride": "--stride",
    "scales": "--scales",
    "preset": "--crf-preset",
    "iterations": "--crf-iterations",
}


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    from pixelwise.crf import CRF_PRESETS
    from pixelwise.inference import DEEPLAB_SCALES, MODES

    p.add_argument("--mode", choices=MODES, default="whole", help="inference mode (default: whole image)")
    p.add_argument(
        "--window",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="slide mode: window size (default: the model's training crop, else 512 512)",
    )
    p.add_argument(
        "--stride", type=int, nargs=2, metavar=("H", "W"), help="slide mode: stride (default: 2/3 of the window)"
    )
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(DEEPLAB_SCALES),
        help=f"multiscale mode: scales (default: DeepLab's {' '.join(map(str, DEEPLAB_SCALES))})",
    )
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    p.add_argument("--crf", action="store_true", help="refine with the fully connected CRF")
    p.add_argument(
        "--crf-preset",
        choices=list(CRF_PRESETS),
        default=None,
        help="CRF parameters (default: those recorded in the weights, else deeplab_vgg)",
    )
    p.add_argument("--crf-iterations", type=int, default=None, help="mean-field iterations (default: the preset's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    _add_precision_option(p)
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="list unreadable files in a report and go on (default: stop at the first)",
    )


def inference_spec(args: argparse.Namespace, extra: dict, dtype: object) -> object:
    """The `InferenceSpec` the inference flags ask for; `extra` is the weights' metadata (their training
    crop is the default window, their recorded CRF the default CRF). Bad values name the flag."""
    from pixelwise.crf import CRFParams
    from pixelwise.engine import InferenceSpec
    from pixelwise.errors import translated

    with translated(INFERENCE_FLAGS, flags=True):
        crf = None
        if args.crf:
            base = (
                CRFParams.preset(args.crf_preset or "deeplab_vgg")  # the help's default, not preset(None)
                if args.crf_preset or "crf" not in extra
                else CRFParams.from_dict(extra["crf"])
            )
            crf = base.replace(iterations=args.crf_iterations) if args.crf_iterations is not None else base
        return InferenceSpec(
            mode=args.mode,
            window=_window(args, extra),
            stride=args.stride,
            scales=tuple(args.scales),
            flip=args.flip,
            crf=crf,
            dtype=dtype,
        )


def _window(args: argparse.Namespace, extra: dict) -> tuple[int, int] | None:
    """--window; in slide mode by default the training crop recorded in the weights (`extra["crop_size"]`),
    else 512x512. Whole and multiscale modes run each scale whole unless --window asks to slide (a window
    at every scale cost 24 s an image against 1.6 s whole, without being asked for)."""
    if args.window and args.mode != "whole":
        return (int(args.window[0]), int(args.window[1]))
    if args.mode != "slide":
        return None
    from pixelwise.segment import default_window

    return default_window(extra)


def _add_large_option(p: argparse.ArgumentParser) -> None:
    from pixelwise.segment import LARGE_KINDS, MAX_WHOLE_PIXELS

    p.add_argument(
        "--large",
        choices=LARGE_KINDS,
        default=LARGE_KINDS[0],
        help=f"an image above {MAX_WHOLE_PIXELS} pixels (2048x1024). {LARGE_KINDS[0]} (default): slide a window "
        "over it one row of windows at a time, memory bounded by the window's height x a band of 16 strides; "
        "downscale: infer it downscaled to that size as asked (--mode multiscale and --crf included) and "
        "upsample the scores back, memory bounded by that size",
    )


def _add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto (default): bf16 autocast where the device runs bf16 natively, else fp32",
    )


class _VersionAction(argparse.Action):
    """`--version`: pixelwise's version and torch's; torch is imported only when asked, so --help stays fast."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args) -> None:
        print(version_line())
        parser.exit()


def version_line() -> str:
    """What `pixelwise --version` prints, e.g. "pixelwise 0.1.0 (torch 2.14.1+cu128)"."""
    import torch

    from pixelwise import __version__

    return f"pixelwise {__version__} (torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelwise",
        description="Semantic segmentation: FCN, SegNet, U-Net, DeepLab v1-v3+, dense CRF.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the versions of pixelwise and torch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_job_commands(sub)
    _add_weights_commands(sub)
    _add_gallery_command(sub)
    return parser


def _add_job_commands(sub: Any) -> None:
    """models, demo, configs, train: the commands that start from a name or a config."""
    p = sub.add_parser("models", help="list every model with parameters and GFLOPs")
    p.add_argument("--num-classes", type=int, default=21, help="classes for the count (default 21, VOC)")
    p.add_argument("--size", type=int, default=512, help="square input side for GFLOPs (default 512)")
    p.add_argument("--no-flops", action="store_true", help="skip the (slower) FLOP count")
    p.add_argument(
        "--encoders",
        nargs="?",
        const="",
        default=None,
        metavar="PATTERN",
        help="list the encoders instead: pixelwise's own and timm models (those checked by the tests, or those "
        "matching PATTERN, e.g. 'convnext*'), with their strides and the output strides they build with",
    )

    p = sub.add_parser("demo", help="train, evaluate and predict on built-in synthetic data")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="16 images of 32x32 for one epoch: checks an install in seconds (its mIoU means nothing)",
    )

    p = sub.add_parser("configs", help="list the built-in paper configs, or print one")
    p.add_argument("name", nargs="?", help="print this config's YAML (e.g. camvid/segnet_basic) to copy and edit")

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file, or a built-in config's name (see `pixelwise configs`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.epochs=10 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")


def _add_weights_commands(sub: Any) -> None:
    """evaluate, predict, init-weights, export, serve: the commands that use (or write) a weights file."""
    from pixelwise.data import DATASETS

    p = sub.add_parser("evaluate", help="score a weights file on a data set split")
    p.add_argument("--weights", required=True, help=".safetensors weights file or built-in weights name")
    p.add_argument("--data", required=True, help="data set root folder")
    p.add_argument(
        "--dataset",
        required=True,
        help=f"{', '.join(DATASETS)} (folder: ROOT/SPLIT/images + masks)",
    )
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument(
        "--out",
        default=None,
        help="folder for metrics.json (default: eval_DATASET_SPLIT beside the weights, never over a run's own "
        "files; ./eval_NAME_DATASET_SPLIT for built-in weights)",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    _add_inference_options(p)

    p = sub.add_parser("predict", help="segment images: class-index PNGs and colour overlays")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--weights", required=True, help=".safetensors weights file or built-in weights name")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--side-by-side", action="store_true", help="overlays show the image and the overlay side by side")
    _add_inference_options(p)
    _add_large_option(p)

    p = sub.add_parser("init-weights", help="write a weights file without training")
    p.add_argument("model", help="model name (see `pixelwise models`)")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--weights-backbone", default=None, help="torchvision ImageNet .pth file for the backbone")
    p.add_argument("--classes", nargs="+", default=None, help="class names (default class0..classK-1)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("export", help="export a weights file to ONNX or torch.export")
    p.add_argument("--weights", required=True, help=".safetensors weights file or built-in weights name")
    p.add_argument("--format", choices=["onnx", "torch-export"], required=True)
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--static", action="store_true", help="fixed batch and spatial size")
    p.add_argument(
        "--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"), help="example input size (default 512 512)"
    )

    p = sub.add_parser("serve", help="HTTP service and web page for a weights file")
    p.add_argument(
        "--weights",
        default="segnet_basic_camvid",
        help=".safetensors weights file or built-in weights name (default: segnet_basic_camvid)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    _add_precision_option(p)
    _add_large_option(p)


def _add_gallery_command(sub: Any) -> None:
    """gallery: the figures of docs/gallery, drawn by the library's own code."""
    p = sub.add_parser(
        "gallery",
        help="draw the lineage's mechanisms (upsampling, atrous, decoders, CRF, overlap-tile, training) as PNGs",
    )
    p.add_argument("--out", required=True, help="output folder for the PNGs and gallery.md")
    p.add_argument(
        "--data", default="../shared/data", help="folder holding camvid/ and isbi2012/ (default ../shared/data)"
    )
    p.add_argument(
        "--results",
        default=None,
        help="the repository's benchmarks/results, for the training figure (default: benchmarks/results if present)",
    )
    p.add_argument(
        "--bilinear-weights",
        default=None,
        help="weights of SegNet-Basic's bilinear-decoder variant, for the decoder figure (left out without them)",
    )
    p.add_argument(
        "--unet-weights",
        default=None,
        help="valid-padding U-Net weights trained on ISBI 2012, for the overlap-tile prediction "
        "(default: the built-in unet_isbi2012 where this pixelwise ships it)",
    )
    p.add_argument("--quick", action="store_true", help="small images: checks that every figure is drawn, in seconds")


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin-wait between torch ops steal the cores whenever anything else runs: the demo
    # took 617 s of CPU instead of 46 s beside one other busy process on 2 cores. Read when torch loads, so
    # it is set before anything imports torch (--version, the handlers); an explicit value from the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    module_name, func_name = HANDLERS[args.command].split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except (UserError, ArgumentError) as e:  # an ArgumentError no front end translated: library words
        one_line = " ".join(str(e).split())  # a message quoting a library's multi-line text stays one line
        print(f"pixelwise {args.command}: error: {one_line}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk, not the code: full, read-only, a file where a folder should be...
        line = describe_os_error(e)
        if line is None:
            raise
        print(f"pixelwise {args.command}: error: {line}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = MISSING_EXTRA.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"pixelwise {args.command}: error: missing package {e.name!r}; "
            f"install the extra: pip install 'pixelwise[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"pixelwise {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
