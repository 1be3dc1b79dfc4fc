"""Shared helpers of the benchmark scripts: machine info, alternating timing, medians, FLOPs, JSON, tables.

Every script in ``benchmarks/`` measures the way ``/work/shared/BENCHMARKS.md`` asks: candidates
side by side in one process, the same input, the same thread count, repetitions alternating
A B A B ... after warm-up, medians and the ratio ours/peer. Absolute CPU times on shared machines
are noisy; the ratios are what the tables report first.

Import it from a script in this folder as ``from common import ...``: ``python benchmarks/x.py`` puts
the script's folder on the import path, and pytest does the same for the tests (pyproject's
``pythonpath``); ``pixelwise`` itself comes from the install (``make test`` / ``make bench``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------ machine
def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed distribution versions by name; None for a package that is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The repository's HEAD commit (with '+dirty' for uncommitted changes), or None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str | torch.device = "cpu", extra_packages: Sequence[str] = ()) -> dict[str, Any]:
    """Where and with what a figure was measured: date, host, CPU/GPU, threads and package versions."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": cpu_name(),
        "git_commit": git_commit(),
        "versions": package_versions(["torch", "torchvision", "numpy", *extra_packages]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def set_threads(n: int) -> None:
    """Fix the intra-op thread count (BENCHMARKS.md: 2 on the 2-core CPU) for every candidate alike."""
    torch.set_num_threads(n)


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' -> a device (`pixelwise.inference.resolve_device`); a clear
    SystemExit when the machine lacks it."""
    from pixelwise.errors import UserError
    from pixelwise.inference import resolve_device as resolve

    try:
        return resolve(name, "--device")
    except UserError as e:
        raise SystemExit(str(e)) from None


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so that a wall-clock time covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- timing
def time_alternating(
    fns: dict[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Time several candidates side by side: ``warmup`` untimed rounds, then ``reps`` rounds A B A B ...

    Each round calls every candidate once, in the same order, and records its wall-clock seconds;
    interleaving spreads the machine's drifts (other processes, thermal state) over all candidates.

    Args:
        fns: name -> zero-argument callable doing one unit of work (one batch).
        reps: timed rounds (>= 1).
        warmup: untimed rounds first (allocator, oneDNN/cuDNN algorithm choice, compilation).
        device: synchronised around every call when CUDA.
        log: called with a short progress line after every round, or None.

    Returns:
        name -> list of ``reps`` seconds.
    """
    if reps < 1:
        raise ValueError(f"reps={reps} must be >= 1")
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if log is not None:
            log(f"  round {r + 1}/{reps}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    return times


def summarize(seconds: Sequence[float], items: int = 1) -> dict[str, float]:
    """Median, min, max seconds of one call, the median throughput (``items`` per call / median s), the raw times."""
    med = statistics.median(seconds)
    return {
        "median_s": med,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "reps": len(seconds),
        "items_per_s": items / med,
        "seconds": list(seconds),
    }


def ratio(ours: float, peer: float) -> float:
    """ours / peer of two throughputs (> 1: ours is faster); nan when the peer's is 0."""
    return ours / peer if peer else float("nan")


def paired_ratio(ours_seconds: Sequence[float], peer_seconds: Sequence[float]) -> float:
    """Median over rounds of peer_time / ours_time (> 1: ours is faster).

    Each round's two calls run back to back, so a load change on a shared machine between rounds
    cancels out of the round's ratio; the median then drops a round that a change split in two.
    """
    return statistics.median(p / o for o, p in zip(ours_seconds, peer_seconds, strict=True))


# -------------------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of everything ``fn`` runs: ``pixelwise.models.summary.flops_of`` (FlopCounterMode, a
    multiply-accumulate = 2 FLOPs, convs and matmuls only, a backward inside ``fn`` included)."""
    from pixelwise.models.summary import flops_of

    return flops_of(fn)


# --------------------------------------------------------------------------------- JSON/tables
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None  # JSON has no nan/inf
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path | torch.device | torch.dtype):
        return str(obj)
    return obj


def write_results(name: str, payload: dict[str, Any], path: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` as ``benchmarks/results/<name>.json`` (or ``path``) atomically; returns the path."""
    from pixelwise.fileio import atomic_write_text

    out = Path(path) if path is not None else RESULTS_DIR / f"{name}.json"
    atomic_write_text(out, json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")
    return out


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; floats get 3 significant digits, None prints as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in text]
    return "\n".join([line, sep, *body])


def add_common_args(parser: argparse.ArgumentParser, *, threads: int = 2) -> None:
    """--threads, --device, --out, --quick: the options every benchmark script shares."""
    parser.add_argument(
        "--threads",
        type=int,
        default=threads,
        help=f"torch intra-op threads for every candidate (default {threads}, BENCHMARKS.md)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--out", default=None, help="JSON file to write (default benchmarks/results/<name>.json)")
    parser.add_argument("--quick", action="store_true", help="a short run with few repetitions (smoke test)")


def progress(msg: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)
