"""Export a model to ONNX or to a torch.export program (``.pt2``), with dynamic batch and spatial size
where the model allows.

ONNX exporters, in the order tried:
    ``torchscript``: ``torch.onnx.export(..., dynamo=False)``, the tracing exporter. Fast (seconds for
        a ResNet-101), on every torch >= 2.4; but tracing can silently bake a size into the graph.
    ``dynamo``: ``torch.onnx.export(..., dynamo=True)`` (torch >= 2.5, needs onnxscript): graph capture
        by torch.export with symbolic sizes; 2-3x slower.
Every candidate file is checked against the PyTorch model (onnxruntime for ONNX, the program itself
for ``.pt2``) at the example size and, when a dimension is dynamic, at a second size: a graph that
does not match is discarded. The dimensions tried, in order: batch + height + width, batch only,
none. A valid-convolution U-Net (``margin > 0``) skips the spatial step: its overlap-tile padding
depends on the input size through a variable number of mirror steps, which no exporter can express.
Files are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import inspect
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pixelwise.errors import UserError
from pixelwise.fileio import atomic_path, atomic_write_bytes

ONNX_EXPORTERS = ("torchscript", "dynamo")
INPUT_NAME, OUTPUT_NAME = "image", "logits"
ALL_DIMS = ("batch", "height", "width")
_AXES = {"batch": 0, "height": 2, "width": 3}
# An exported graph passes when it matches PyTorch within CHECK_RTOL of the logits' size; beyond that, when
# it stays within twice what float32 rounding alone moves PyTorch's own logits from a float64 run of the
# same weights (a deep trained net with max-pooling ties, e.g. SegNet, moves by ~1e-2 in a few pixels),
# and in every case when its labels agree with PyTorch's on all but LABEL_TOLERANCE of the pixels.
CHECK_RTOL = 1e-3
LABEL_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ExportResult:
    """What an export produced: the exporter and the dimensions left dynamic."""

    exporter: str  # "torchscript", "dynamo" (ONNX) or "torch.export"
    dynamic_dims: tuple[str, ...]  # a subset of ("batch", "height", "width")
    max_rel_error: float | None  # largest check difference relative to the logits, None if unchecked


def _example(size: tuple[int, int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    h, w = size
    if h < 1 or w < 1:
        raise UserError(f"--size {h} {w}: give a positive example height and width, e.g. --size 512 512")
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def second_size(size: tuple[int, int]) -> tuple[int, int]:
    """A different input size for the dynamic-shape check: about 3/4 of the height and 5/4 of the width,
    both odd, so that padding and cropping paths a size divisible by the stride skips are exercised."""
    h, w = size
    return max(33, round(0.75 * h) | 1), max(33, round(1.25 * w) | 1)


def _dims_to_try(model: nn.Module, dynamic: bool) -> list[tuple[str, ...]]:
    if not dynamic:
        return [()]
    if int(getattr(model, "margin", 0)) > 0:  # valid-convolution U-Net: see the module docstring
        return [("batch",), ()]
    return [ALL_DIMS, ("batch",), ()]


def _check_inputs(size: tuple[int, int], dims: tuple[str, ...], device: torch.device) -> list[torch.Tensor]:
    """Inputs a graph with dynamic `dims` must handle: new values at the example size (a traced graph
    can hold the example's values as constants), and a second size varying every dynamic dim."""
    inputs = [_example(size, batch=1, seed=1)]
    if dims:
        other = second_size(size) if "height" in dims else size
        inputs.append(_example(other, batch=2 if "batch" in dims else 1, seed=2))
    return [x.to(device) for x in inputs]


def _reason(e: BaseException) -> str:
    """The root cause's first line, without terminal colours: what a one-line error can say."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _summary(failures: list[tuple[str, str]]) -> str:
    """'what: reason' for each distinct reason, in order."""
    seen: dict[str, list[str]] = {}
    for what, reason in failures:
        whats = seen.setdefault(reason, [])
        if what not in whats:
            whats.append(what)
    return " | ".join(f"{', '.join(whats)}: {reason}" for reason, whats in seen.items())


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _supported(func, **kwargs) -> dict[str, Any]:
    """The keyword arguments `func` accepts (torch.onnx.export grew several between 2.4 and 2.14)."""
    params = inspect.signature(func).parameters
    return {k: v for k, v in kwargs.items() if k in params}


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress lines, warnings and graph dumps; failures still raise."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    saved_fd = os.dup(2)  # the TorchScript exporter prints IR graphs from C++, past sys.stderr
    try:
        with (
            open(os.devnull, "w") as devnull,
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            os.dup2(devnull.fileno(), 2)
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        logger.setLevel(level)


def _export_dims(dims: tuple[str, ...]) -> tuple[dict[int, Any]] | None:
    """torch.export dynamic shapes for the image argument."""
    if not dims:
        return None
    auto = getattr(torch.export.Dim, "AUTO", None)  # torch >= 2.6: infer the ranges
    if auto is not None:
        return ({_AXES[d]: auto for d in dims},)
    return ({_AXES[d]: torch.export.Dim(d, max=16384) for d in dims},)


def _onnx_torchscript(model: nn.Module, x: torch.Tensor, f: Path, opset: int | None, dims: tuple[str, ...]) -> None:
    axes = {_AXES[d]: d for d in dims}
    with _quiet():  # TracerWarnings and the deprecation notice: the check decides, not the warnings
        torch.onnx.export(
            model,
            (x,),
            str(f),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset or 17,  # 17: read by onnxruntime >= 1.14, written by every torch >= 2.4
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if axes else None,
            do_constant_folding=True,
            **_supported(torch.onnx.export, dynamo=False),
        )


def _onnx_dynamo(model: nn.Module, x: torch.Tensor, f: Path, opset: int | None, dims: tuple[str, ...]) -> None:
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise RuntimeError(f"torch {torch.__version__} has no torch.onnx.export(dynamo=True); it needs torch >= 2.5")
    if "batch" in dims and x.shape[0] == 1:
        x = x.expand(2, -1, -1, -1).contiguous()  # torch.export fixes dimensions of size 1
    kwargs = _supported(torch.onnx.export, external_data=False, optimize=True, verbose=False)
    with _quiet():
        torch.onnx.export(
            model,
            (x,),
            str(f),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=_export_dims(dims),
            **kwargs,
        )


def check_onnx(model: nn.Module, path: str | Path, inputs: list[torch.Tensor]) -> float:
    """Run the ONNX file with onnxruntime on `inputs`; the largest difference to `model`, relative to
    the logits' magnitude (at least 1). Raises ValueError on a shape mismatch or a difference beyond
    float32 rounding (see `CHECK_RTOL`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # the check reports failures itself
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    device = _model_device(model)
    rounding = _float32_rounding(model)
    worst = 0.0
    for x in inputs:
        with torch.inference_mode():
            ref = model(x.to(device)).float().cpu()
        out = torch.from_numpy(session.run(None, {INPUT_NAME: x.cpu().numpy()})[0])
        worst = max(worst, _compare(rounding, x, out, ref))
    return worst


def _compare(
    rounding: Callable[[torch.Tensor, torch.Tensor], float], x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor
) -> float:
    """The difference of an exported graph's logits `out` to PyTorch's `ref` on `x`, relative to the logits'
    magnitude; ValueError when the shapes, the labels or the values disagree beyond float32 rounding
    (`rounding(x, ref)`, see `_float32_rounding`)."""
    if out.shape != ref.shape:
        raise ValueError(
            f"the graph gives shape {tuple(out.shape)} for input {tuple(x.shape)}, PyTorch {tuple(ref.shape)}"
        )
    scale = max(1.0, float(ref.abs().max()))
    err = float((out - ref).abs().max()) / scale
    disagree = float((out.argmax(1) != ref.argmax(1)).float().mean())
    if disagree > LABEL_TOLERANCE:
        raise ValueError(f"the graph's labels differ from PyTorch's on {disagree:.2%} of the pixels")
    if err > CHECK_RTOL:
        allowed = rounding(x, ref) / scale
        if err > 2 * allowed:
            raise ValueError(
                f"the graph differs from PyTorch by {err:.2g} (relative), more than twice float32 rounding's "
                f"{allowed:.2g}"
            )
    return err


def _float32_rounding(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """`rounding(x, ref)`: how far float32 rounding moves `model`'s logits `ref` on `x` from a float64 run of
    the same weights. The float64 copy of the model is made once, when a check first needs it."""
    exact: nn.Module | None = None

    def rounding(x: torch.Tensor, ref: torch.Tensor) -> float:
        nonlocal exact
        if exact is None:
            exact = copy.deepcopy(model).double()
        with torch.inference_mode():
            ref64 = exact(x.to(_model_device(model), torch.float64)).cpu()
        return float((ref.double() - ref64).abs().max())

    return rounding


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic: bool = True,
    size: tuple[int, int] = (512, 512),
    exporter: str = "auto",
    check: bool = True,
    metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export `model` (in eval mode) to an ONNX file, atomically.

    Args:
        model: a segmentation model, ``(B, 3, H, W) -> (B, K, H, W)``.
        path: output ``.onnx`` file.
        opset: ONNX opset; None picks the exporter's default (17 for torchscript).
        dynamic: make batch, height and width symbolic where the model allows (see the module
            docstring); False fixes the graph to batch 1 at `size`.
        size: example input (H, W) for tracing and the check.
        exporter: ``"auto"`` (torchscript, then dynamo), ``"torchscript"`` or ``"dynamo"``.
        check: compare onnxruntime with PyTorch on every candidate graph (skipped, and the first
            graph kept, when onnxruntime is not installed).
        metadata: strings stored in the file's ``metadata_props`` (needs the ``onnx`` package).

    Returns:
        The exporter used, the dynamic dimensions and the checked error.

    Shape:
        graph input ``image`` (B, 3, H, W) float32 -> output ``logits`` (B, K, H, W).
    """
    if exporter not in ("auto", *ONNX_EXPORTERS):
        raise UserError(f"exporter={exporter!r} is not supported; choose auto, torchscript or dynamo")
    names = ONNX_EXPORTERS if exporter == "auto" else (exporter,)
    builders = {"torchscript": _onnx_torchscript, "dynamo": _onnx_dynamo}
    run_check = check and importlib.util.find_spec("onnxruntime") is not None
    model = model.eval()
    device = _model_device(model)
    x = _example(size).to(device)
    failures = []
    for dims in _dims_to_try(model, dynamic):
        for name in names:
            try:
                with atomic_path(path) as tmp:
                    builders[name](model, x, tmp, opset, dims)
                    err = check_onnx(model, tmp, _check_inputs(size, dims, device)) if run_check else None
                    if metadata:
                        _set_onnx_metadata(tmp, metadata)
                return ExportResult(name, dims, err)
            except Exception as e:  # every exporter raises its own types; the message is what matters
                failures.append((name, _reason(e)))
    raise UserError(
        f"cannot export {type(model).__name__} to ONNX ({_summary(failures)}); "
        "try another --opset or --size, or --format torch-export"
    )


def _set_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def export_torch(
    model: nn.Module,
    path: str | Path,
    *,
    dynamic: bool = True,
    size: tuple[int, int] = (512, 512),
    check: bool = True,
    metadata: dict[str, Any] | None = None,
) -> ExportResult:
    """Export `model` (eval mode) with ``torch.export`` and save the program (``.pt2``), atomically.

    Load it with ``torch.export.load(path).module()``; `metadata` is stored in the archive as the
    extra file ``pixelwise.json``.

    Args:
        model: a segmentation model, ``(B, 3, H, W) -> (B, K, H, W)``.
        path: output ``.pt2`` file.
        dynamic: make batch, height and width symbolic where the model allows; False fixes batch 1 at `size`.
        size: example input (H, W).
        check: run each candidate program at the example size and at a second size and compare with
            `model`; a program that guards on the example's size, or differs, is discarded.
        metadata: a JSON-able dict, stored with the program as the JSON file ``pixelwise.json``.

    Returns:
        ``exporter="torch.export"``, the dynamic dimensions and the checked error.

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """
    model = model.eval()
    device = _model_device(model)
    failures = []
    for dims in _dims_to_try(model, dynamic):
        # batch 2 when the batch is dynamic: torch.export fixes dimensions of size 0 or 1
        x = _example(size, batch=2 if "batch" in dims else 1).to(device)
        try:
            with _quiet():
                program = torch.export.export(model, (x,), dynamic_shapes=_export_dims(dims))
            err = _check_program(model, program, _check_inputs(size, dims, device)) if check else None
        except Exception as e:  # torch.export raises a zoo of types; runtime guards raise AssertionError
            failures.append((f"dynamic {'/'.join(dims) or 'none'}", _reason(e)))
            continue
        buf = io.BytesIO()
        extra = {"pixelwise.json": json.dumps(metadata)} if metadata else None
        torch.export.save(program, buf, extra_files=extra)
        atomic_write_bytes(path, buf.getvalue())
        return ExportResult("torch.export", dims, err)
    raise UserError(
        f"cannot export {type(model).__name__} with torch.export ({_summary(failures)}); "
        "try another --size or --format onnx"
    )


def _check_program(model: nn.Module, program: torch.export.ExportedProgram, inputs: list[torch.Tensor]) -> float:
    """Largest difference between `program` and `model` on `inputs`, relative to the logits (at least 1);
    ValueError beyond float32 rounding, as `check_onnx`."""
    module = program.module()
    rounding = _float32_rounding(model)
    worst = 0.0
    for x in inputs:
        with torch.inference_mode():
            ref, out = model(x), module(x)
        worst = max(worst, _compare(rounding, x, out.float().cpu(), ref.float().cpu()))
    return worst


def export_command(args: argparse.Namespace) -> int:
    """`pixelwise export --weights W.safetensors --format onnx|torch-export --out FILE`."""
    from dataclasses import asdict

    from pixelwise.weights import load_weights

    model, meta = load_weights(args.weights)
    metadata = {"pixelwise": json.dumps(asdict(meta))}  # ONNX metadata_props map strings to strings
    size = (int(args.size[0]), int(args.size[1]))
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / (meta.model_name + '.onnx')}")
    if args.format == "onnx":
        if args.opset is not None and not 7 <= args.opset <= 23:
            raise UserError(f"--opset {args.opset} is outside 7..23; leave it out for 17, or give 18")
        result = export_onnx(model, out, opset=args.opset, dynamic=not args.static, size=size, metadata=metadata)
        how = f"ONNX ({result.exporter} exporter)"
        use = (
            f"input '{INPUT_NAME}' (B, 3, H, W) float32, normalised with mean {list(meta.mean)} "
            f"std {list(meta.std)}; output '{OUTPUT_NAME}' (B, K, H, W)"
        )
    else:
        if args.opset is not None:
            raise UserError("--opset applies to --format onnx only; leave it out for torch-export")
        result = export_torch(model, out, dynamic=not args.static, size=size, metadata=asdict(meta))  # JSON, once
        how = "torch.export program"
        use = f"load with torch.export.load({str(out)!r}).module()"
    fixed = {"batch": 1, "height": size[0], "width": size[1]}
    fixed_text = ", ".join(f"{d} {v}" for d, v in fixed.items() if d not in result.dynamic_dims)
    dynamic_text = ", ".join(result.dynamic_dims)
    parts = (dynamic_text and f"dynamic {dynamic_text}", fixed_text and f"fixed {fixed_text}")
    shape = "; ".join(t for t in parts if t)
    checked = "" if result.max_rel_error is None else f", checked (max rel. error {result.max_rel_error:.1e})"
    print(f"wrote {out}: {meta.model_name}, {how}, {shape}{checked}; {use}")
    return 0
