"""The `pixelwise` command line: one sub-command per job, each handled by a plain function.

Handlers are imported lazily so that `pixelwise --help` stays fast and an optional extra
(onnx, serve) is only needed by the command that uses it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pixelwise.errors import UserError
from pixelwise.fileio import describe_os_error

# sub-command -> "module:function" taking the parsed argparse.Namespace
HANDLERS = {
    "models": "pixelwise.models:models_command",
    "demo": "pixelwise.demo:demo_command",
    "train": "pixelwise.train:train_command",
    "evaluate": "pixelwise.evaluate:evaluate_command",
    "predict": "pixelwise.predict:predict_command",
    "init-weights": "pixelwise.weights:init_weights_command",
    "export": "pixelwise.export:export_command",
    "serve": "pixelwise.serve:serve_command",
}


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["whole", "slide", "multiscale"], default="whole",
                   help="inference mode (default: whole image)")
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"),
                   help="slide mode: window size (default: the model's training crop, else 512 512)")
    p.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"),
                   help="slide mode: stride (default: 2/3 of the window)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
                   help="multiscale mode: scales (default: DeepLab's 0.5..1.75)")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    p.add_argument("--crf", action="store_true", help="refine with the fully connected CRF")
    p.add_argument("--crf-preset", default="deeplab_vgg",
                   help="CRF parameter set: deeplab_vgg, deeplab_resnet or pydensecrf (default: deeplab_vgg)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    _add_precision_option(p)
    p.add_argument("--skip-bad", action="store_true",
                   help="list unreadable files in a report and go on (default: stop at the first)")


def _add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto (default): bf16 autocast where the device runs bf16 natively, else fp32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelwise",
        description="Semantic segmentation: FCN, SegNet, U-Net, DeepLab v1-v3+, dense CRF.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list every model with parameters and GFLOPs")
    p.add_argument("--num-classes", type=int, default=21, help="classes for the count (default 21, VOC)")
    p.add_argument("--size", type=int, default=512, help="square input side for GFLOPs (default 512)")
    p.add_argument("--no-flops", action="store_true", help="skip the (slower) FLOP count")

    p = sub.add_parser("demo", help="train, evaluate and predict on built-in synthetic data")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")

    p = sub.add_parser("evaluate", help="score a weights file on a data set split")
    p.add_argument("--weights", required=True, help=".safetensors weights file or built-in weights name")
    p.add_argument("--data", required=True, help="data set root folder")
    p.add_argument("--dataset", required=True,
                   help="camvid, voc, cityscapes, ade20k, isbi2012, folder (ROOT/SPLIT/images + masks) or synthetic")
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument("--out", default=None,
                   help="folder for metrics.json (default: beside the weights; ./eval_NAME for built-in weights)")
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
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                   help="example input size (default 512 512)")

    p = sub.add_parser("serve", help="HTTP service and web page for a weights file")
    p.add_argument("--weights", default="segnet_basic_camvid",
                   help=".safetensors weights file or built-in weights name (default: segnet_basic_camvid)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    _add_precision_option(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # OpenMP threads that spin-wait between torch ops steal the cores whenever anything else runs: the demo
    # took 617 s of CPU instead of 46 s beside one other busy process on 2 cores. Read when torch loads, so
    # it is set before any handler imports torch; an explicit OMP_WAIT_POLICY from the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module_name, func_name = HANDLERS[args.command].split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except UserError as e:
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
        extra = {"onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "fastapi": "serve",
                 "uvicorn": "serve", "multipart": "serve", "pydensecrf": "crf"}.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"pixelwise {args.command}: error: missing package {e.name!r}; "
              f"install the extra: pip install 'pixelwise[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pixelwise {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
