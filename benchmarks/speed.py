"""Speed of pixelwise models against their peers (torchvision, segmentation-models-pytorch).

For every pair (ours vs the peer's model of the same architecture, random init, same input),
in one process, alternating A B A B after warm-up, with the same thread count:

- inference images/s, eval, fp32, ``torch.no_grad``, batch 1 and 8 (default 360x480);
- one training step images/s (forward, cross-entropy, backward, SGD step), batch 4;
- with ``--fast``: inference through ``pixelwise.fast.prepare_fast`` (channels_last,
  ``torch.inference_mode``, ``--compile`` optional, bf16 autocast on CUDA only), applied to
  ours and to the peer alike, in its own columns;
- with ``--bf16`` (default where the CPU runs bf16 natively): ours with bf16 autocast + channels_last
  against the peer as it ships (fp32 eager) and against the peer with the same bf16 autocast,
  inference at batch 1 and the training step.

The ratio is ours/peer of images/s (> 1: ours is faster), the median over rounds of the
back-to-back time ratio (robust to load changes on a shared machine; the ratio of the medians is
kept in the JSON too). Where the two architectures differ
(smp has no plain-conv U-Net encoder; smp's default DeepLabV3+ decoder is depthwise-separable where the
paper's ResNet decoder, our default, is not) the table also gives GFLOPs per image and the
FLOP-throughput ratio; ``deeplabv3plus_resnet50_separable`` races equal layouts (ours with
``separable=True`` against smp's default decoder: equal parameter shapes and FLOPs). ``--mfu`` (default on CUDA)
measures DeepLabv3-ResNet-101, 512x512, batch 16 (bf16 on CUDA; fp32, and bf16 where native, on a
CPU) against the device's peak (``--peak-tflops``; a CPU's derived from its clock, see cpu_peak_tflops).

Writes ``benchmarks/results/speed.json`` (figures, machine, versions) and prints a table.

    python benchmarks/speed.py             # full run, ~15 min on 2 CPU cores
    python benchmarks/speed.py --quick     # smoke run: small input, few repetitions
    python benchmarks/speed.py --pairs unet --fast --profile
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import (
    RESULTS_DIR,
    add_common_args,
    count_flops,
    format_table,
    machine_info,
    paired_ratio,
    progress,
    ratio,
    resolve_device,
    set_threads,
    summarize,
    time_alternating,
    write_results,
)

from pixelwise.fast import prepare_fast
from pixelwise.models import get_model
from pixelwise.precision import cpu_has_native_bf16

NUM_CLASSES = 11  # CamVid's classes: the size of the head does not matter at this scale
# Peak for MFU on CUDA: H100 bf16 dense (BENCHMARKS.md). A CPU's peaks are derived from the machine (cpu_peak_tflops).
# Pass --peak-tflops for any other device.
CUDA_PEAK_TFLOPS = 790.0
# FLOPs per cycle and core: fp32 on 2 AVX-512 FMA units (16 lanes, 2 FLOPs a lane); bf16 on the AMX tile unit
# (TDPBF16PS: 16 x 16 x 32 multiply-adds every 16 cycles = 512 a cycle, 2 FLOPs each), or without AMX on the
# AVX512-BF16 dot product (VDPBF16PS: 32 multiply-adds a 512-bit lane set, 2 units)
CPU_FLOPS_PER_CYCLE = {"fp32": 2 * 16 * 2, "fp32_avx2": 2 * 8 * 2, "bf16_amx": 512 * 2, "bf16_avx512": 2 * 32 * 2}


def cpu_clock_ghz() -> float | None:
    """The CPU's maximum clock (sysfs), else the clock /proc/cpuinfo states (a VM's nominal one); None if neither."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) / 1000
    except (OSError, ValueError):
        pass
    return None


def cpu_unit(dtype: str) -> str | None:
    """The key of CPU_FLOPS_PER_CYCLE this CPU runs `dtype` on, or None where no peak is known (e.g. Arm bf16)."""
    if dtype == "fp32":
        capability = torch.backends.cpu.get_cpu_capability()
        return "fp32" if capability.startswith("AVX512") else "fp32_avx2" if capability == "AVX2" else None
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16_amx" if amx else "bf16_avx512" if avx512_bf16 else None


def cpu_peak_tflops(dtype: str, cores: int) -> tuple[float | None, str]:
    """Derived peak of `cores` cores of this CPU in `dtype` ("fp32" or "bf16"): cores x clock x FLOPs a
    cycle, and how it was derived; None where the clock or the unit is not known."""
    ghz, unit = cpu_clock_ghz(), cpu_unit(dtype)
    if ghz is None or unit is None:
        return None, "unknown for this CPU: give --peak-tflops"
    flops = CPU_FLOPS_PER_CYCLE[unit]
    return cores * ghz * flops / 1000, f"{cores} cores x {ghz:g} GHz x {flops} FLOPs a cycle ({unit})"


class Logits(nn.Module):
    """Unwraps a peer's output to the logits tensor (torchvision returns ``{"out": ...}``).

    Shape:
        (B, 3, H, W) -> (B, K, H, W).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y["out"] if isinstance(y, dict) else y


@dataclass(frozen=True)
class Pair:
    """One comparison: our model, the peer's, the input-size multiple both accept, and why they differ."""

    name: str
    ours: Callable[[], nn.Module]
    peer: Callable[[], nn.Module]
    peer_name: str
    multiple: int  # H and W are rounded up to a multiple of this (smp checks divisibility)
    same_weights: bool  # ours loads the peer's state dict: the same function is timed
    note: str


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models.segmentation as tvseg

        return Logits(
            getattr(tvseg, name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False)
        )

    return build


def _smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    # The U-Net paper's encoder is VGG-like: two 3x3 convs per level, 64..512 channels at strides 1..8.
    # smp's vgg13 encoder is exactly that up to stride 8; at stride 16 it has 512 (+ a 512 centre block)
    # where U-Net has 1024, and its decoder interpolates (nearest) where U-Net has 2x2 up-convolutions.
    # No BN on either side (U-Net predates BatchNorm; our default norm_layer=None).
    return smp.Unet(
        encoder_name="vgg13",
        encoder_depth=4,
        encoder_weights=None,
        decoder_use_norm=False,
        decoder_channels=(512, 256, 128, 64),
        classes=NUM_CLASSES,
    )


def _smp_deeplabv3plus() -> nn.Module:
    import segmentation_models_pytorch as smp

    # Matched to ours: output stride 16, the paper's rates at OS 16 (6, 12, 18), plain (not separable)
    # ASPP convs. Left as smp builds them: a separable 3x3 after ASPP and ONE separable 3x3 fusing
    # conv in the decoder, where ours (the paper's ResNet variant, Table 2) has two full 3x3 convs.
    return smp.DeepLabV3Plus(
        encoder_name="resnet50",
        encoder_weights=None,
        encoder_output_stride=16,
        decoder_atrous_rates=(6, 12, 18),
        decoder_aspp_separable=False,
        classes=NUM_CLASSES,
    )


def _smp_deeplabv3plus_separable() -> nn.Module:
    import segmentation_models_pytorch as smp

    # smp's default decoder (separable ASPP, a separable 3x3 after it, one separable 3x3 fusing conv) at
    # output stride 16 with the paper's rates for it, 6/12/18 (smp's default 12/24/36 belongs to stride 8):
    # the layout of ours with separable=True, equal parameter shapes and FLOPs (tests/test_deeplab.py)
    return smp.DeepLabV3Plus(
        encoder_name="resnet50",
        encoder_weights=None,
        encoder_output_stride=16,
        decoder_atrous_rates=(6, 12, 18),
        classes=NUM_CLASSES,
    )


PAIRS: dict[str, Pair] = {
    "fcn_resnet50": Pair(
        "fcn_resnet50",
        lambda: get_model("fcn_resnet50", num_classes=NUM_CLASSES),
        _tv("fcn_resnet50"),
        "torchvision fcn_resnet50",
        1,
        True,
        "same architecture and weights (ours loads torchvision's state dict)",
    ),
    "deeplabv3_resnet50": Pair(
        "deeplabv3_resnet50",
        lambda: get_model("deeplabv3_resnet50", num_classes=NUM_CLASSES),
        _tv("deeplabv3_resnet50"),
        "torchvision deeplabv3_resnet50",
        1,
        True,
        "same architecture and weights (ours loads torchvision's state dict)",
    ),
    "unet": Pair(
        "unet",
        lambda: get_model("unet", num_classes=NUM_CLASSES, padding="same"),
        _smp_unet,
        "smp Unet(vgg13, depth 4, decoder 512-256-128-64, no BN)",
        16,
        False,
        "closest smp config: same VGG-style double-conv encoder up to stride 8; at stride 16 smp has "
        "4 convs of 512 ch where U-Net has 2 of 1024; smp upsamples by nearest interpolation, ours by "
        "2x2 transposed convs; compare the FLOP-throughput ratio too",
    ),
    "deeplabv3plus_resnet50": Pair(
        "deeplabv3plus_resnet50",
        lambda: get_model("deeplabv3plus_resnet50", num_classes=NUM_CLASSES),
        _smp_deeplabv3plus,
        "smp DeepLabV3Plus(resnet50, OS16, rates 6/12/18, plain ASPP)",
        16,
        False,
        "smp's decoder has one depthwise-separable 3x3 conv (+ a separable 3x3 after ASPP) where ours "
        "has the paper's two full 3x3 convs at stride 4: fewer FLOPs for smp; compare the FLOP-throughput "
        "ratio too",
    ),
    "deeplabv3plus_resnet50_separable": Pair(
        "deeplabv3plus_resnet50_separable",
        lambda: get_model("deeplabv3plus_resnet50", num_classes=NUM_CLASSES, separable=True),
        _smp_deeplabv3plus_separable,
        "smp DeepLabV3Plus(resnet50, OS16, rates 6/12/18, separable decoder: smp's default)",
        16,
        False,
        "the same layout: separable ASPP, a separable 3x3 after it, one separable 3x3 at stride 4; equal "
        "parameter shapes and FLOPs, different random init",
    ),
}


# ------------------------------------------------------------------------------------ helpers
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _flops_per_image(build: Callable[[], nn.Module], size: tuple[int, int]) -> float:
    """Forward FLOPs of one eval image, counted on the meta device when every op allows, else on CPU."""
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = build().eval()
                x = torch.zeros(1, 3, *size)
            with torch.no_grad():
                return count_flops(lambda model=model, x=x: model(x))
        except (NotImplementedError, RuntimeError):
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def _infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def _bf16_infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Inference with bf16 autocast, channels_last and inference_mode (`model` already channels_last)."""
    x = x.contiguous(memory_format=torch.channels_last)

    def run() -> object:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(x)

    return run


def _train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> Callable[[], object]:
    """One SGD step; with `bf16`, under bf16 autocast on channels_last input (`model` already channels_last)."""
    # lr small enough that random-init weights stay finite over the repetitions (no NaN slow paths)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        return loss

    return step


def _bf16_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _profile(models: dict[str, nn.Module], x: torch.Tensor, rows: int = 15) -> dict[str, str]:
    """torch.profiler tables (ops by self CPU time) of one eval forward per model."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    tables = {}
    for name, model in models.items():
        with torch.no_grad():
            model(x)
            with profile(activities=activities, record_shapes=False) as prof:
                model(x)
        sort = "self_cuda_time_total" if x.device.type == "cuda" else "self_cpu_time_total"
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=rows)
    return tables


# -------------------------------------------------------------------------------------- pairs
def bench_pair(pair: Pair, args: argparse.Namespace, device: torch.device) -> dict:
    """All measurements of one pair; returns its JSON record."""
    h, w = (_round_up(s, pair.multiple) for s in args.size)
    progress(f"[{pair.name}] {h}x{w} on {device}: ours vs {pair.peer_name}")
    torch.manual_seed(0)
    peer = pair.peer().to(device).eval()
    torch.manual_seed(0)
    ours = pair.ours().to(device).eval()
    rec: dict = {
        "pair": pair.name,
        "peer": pair.peer_name,
        "size": [h, w],
        "note": pair.note,
        "date": machine_info(device)["date"],
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "params_peer": sum(p.numel() for p in peer.parameters()),
    }

    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 3, h, w, generator=gen).to(device)
    if pair.same_weights:
        ours.load_state_dict(peer.model.state_dict(), strict=True)
    with torch.no_grad():
        diff = (ours(x1) - peer(x1)).abs().max().item()
    rec["max_abs_diff_logits"] = diff if pair.same_weights else None

    rec["gflops_ours"] = _flops_per_image(pair.ours, (h, w)) / 1e9
    rec["gflops_peer"] = _flops_per_image(pair.peer, (h, w)) / 1e9
    progress(
        f"  GFLOPs/image ours {rec['gflops_ours']:.1f}, peer {rec['gflops_peer']:.1f}"
        + (f"; same-weights max|diff| {diff:.2e}" if pair.same_weights else "")
    )
    models = {"ours": ours, "peer": peer}
    if args.fast:
        models["ours_fast"] = prepare_fast(copy.deepcopy(ours), compile=args.compile)
        models["peer_fast"] = prepare_fast(copy.deepcopy(peer), compile=args.compile)
        with torch.no_grad():
            rec["fast_max_abs_diff"] = (models["ours_fast"](x1).float() - ours(x1)).abs().max().item()
    if args.bf16:
        models["ours_bf16"], models["peer_bf16"] = _bf16_copy(ours), _bf16_copy(peer)
    rec["inference"] = {
        str(b): _bench_inference(models, torch.randn(b, 3, h, w, generator=gen).to(device), args, device)
        for b in args.batch_sizes
    }
    if args.train_batch > 0:
        b = args.train_batch
        x = torch.randn(b, 3, h, w, generator=gen).to(device)
        y = torch.randint(0, NUM_CLASSES, (b, h, w), generator=gen).to(device)
        rec["train"] = _bench_train(ours, peer, x, y, args, device)

    # FLOP-throughput ratio: how fast each runs per FLOP, for pairs whose FLOPs differ
    rec["flop_ratio"] = rec["gflops_ours"] / rec["gflops_peer"]
    if args.profile:
        rec["profile"] = _profile({"ours": ours, "peer": peer}, x1)
        for name, table in rec["profile"].items():
            progress(f"--- profile {pair.name} {name}\n{table}")
    return rec


def _bench_inference(models: dict[str, nn.Module], x: torch.Tensor, args: argparse.Namespace, device) -> dict:
    """Inference of one batch: ours and peer in fp32 eager, plus the --fast and --bf16 variants where due."""
    b = x.shape[0]
    fns = {"ours": _infer_fn(models["ours"], x), "peer": _infer_fn(models["peer"], x)}
    fast_here = args.fast and b in args.fast_batch_sizes
    if fast_here:
        fns["ours_fast"] = lambda: models["ours_fast"](x)
        fns["peer_fast"] = lambda: models["peer_fast"](x)
    bf16_here = args.bf16 and b in args.bf16_batch_sizes
    if bf16_here:
        fns["ours_bf16"] = _bf16_infer_fn(models["ours_bf16"], x)
        fns["peer_bf16"] = _bf16_infer_fn(models["peer_bf16"], x)
    reps = args.reps if b == 1 else args.reps_large
    progress(f"  inference batch {b}: {reps} rounds of {', '.join(fns)}")
    times = time_alternating(fns, reps=reps, warmup=args.warmup, device=device, log=progress)
    entry = _ratios(times, b, bf16_here)
    if fast_here:
        entry["ratio_fast"] = paired_ratio(times["ours_fast"], times["peer_fast"])
        entry["fast_speedup_ours"] = paired_ratio(times["ours_fast"], times["ours"])
    progress(_summary(entry))
    return entry


def _summary(entry: dict) -> str:
    """One progress line: images/s of ours and the peer, their ratio, and the bf16 ratios when measured."""
    stats = entry["times"]
    line = (
        f"  -> ours {stats['ours']['items_per_s']:.3f} img/s, peer {stats['peer']['items_per_s']:.3f} "
        f"img/s, ratio {entry['ratio']:.3f}"
    )
    if "ratio_bf16" in entry:
        line += f"; bf16 ours/peer fp32 {entry['ratio_bf16_vs_peer']:.3f}, ours/peer bf16 {entry['ratio_bf16']:.3f}"
    return line


def _ratios(times: dict[str, list[float]], items: int, bf16: bool) -> dict:
    """Stats of every candidate and the ratios (paired, and of the medians) of ours against the peer."""
    stats = {k: summarize(v, items=items) for k, v in times.items()}
    entry = {
        "times": stats,
        "ratio": paired_ratio(times["ours"], times["peer"]),
        "ratio_of_medians": ratio(stats["ours"]["items_per_s"], stats["peer"]["items_per_s"]),
    }
    if bf16:  # ours in bf16 against the peer as it ships (fp32 eager) and against the peer in the same bf16
        entry["ratio_bf16_vs_peer"] = paired_ratio(times["ours_bf16"], times["peer"])
        entry["ratio_bf16"] = paired_ratio(times["ours_bf16"], times["peer_bf16"])
        entry["bf16_speedup_ours"] = paired_ratio(times["ours_bf16"], times["ours"])
    return entry


def _bench_train(ours: nn.Module, peer: nn.Module, x, y, args: argparse.Namespace, device) -> dict:
    """One training step of batch x: ours and peer in fp32 eager, and both in bf16 + channels_last with --bf16."""
    fns = {"ours": _train_fn(ours.train(), x, y), "peer": _train_fn(peer.train(), x, y)}
    if args.bf16:
        fns["ours_bf16"] = _train_fn(_bf16_copy(ours), x, y, bf16=True)
        fns["peer_bf16"] = _train_fn(_bf16_copy(peer), x, y, bf16=True)
    progress(f"  training step batch {x.shape[0]}: {args.reps_large} rounds of {', '.join(fns)}")
    times = time_alternating(fns, reps=args.reps_large, warmup=args.warmup, device=device, log=progress)
    ours.eval()
    peer.eval()
    entry = {"batch": x.shape[0]} | _ratios(times, x.shape[0], args.bf16)
    progress(_summary(entry))
    return entry


# ---------------------------------------------------------------------------------------- MFU
def bench_mfu(args: argparse.Namespace, device: torch.device, dtype: str) -> dict:
    """DeepLabv3-ResNet-101 inference and training-step throughput in `dtype` as a fraction of the device's peak."""
    b, s = args.mfu_batch, args.mfu_size
    bf16 = dtype == "bf16"
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops, "--peak-tflops"
    elif device.type == "cuda":
        peak, peak_source = CUDA_PEAK_TFLOPS, "H100 bf16 dense (BENCHMARKS.md)"
    else:
        peak, peak_source = cpu_peak_tflops(dtype, args.threads)
    progress(f"[mfu] deeplabv3_resnet101 {s}x{s} batch {b} {dtype} on {device}, peak {peak} TFLOP/s")
    torch.manual_seed(0)
    model = get_model("deeplabv3_resnet101", num_classes=21).to(device)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 21, (b, s, s), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def infer() -> object:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x)

    def train_step() -> object:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    out: dict = {"model": "deeplabv3_resnet101", "size": s, "batch": b, "dtype": dtype}
    out |= {"peak_tflops": peak, "peak_source": peak_source}
    for name, fn, mode in (("inference", infer, "eval"), ("train", train_step, "train")):
        model.train(mode == "train")
        flops = count_flops(fn)  # one call, also a warm-up
        times = time_alternating({name: fn}, reps=args.reps_large, warmup=args.warmup, device=device, log=progress)
        st = summarize(times[name], items=b)
        achieved = flops / st["median_s"] / 1e12
        mfu = achieved / peak if peak else None
        out[name] = {"tflop_per_call": flops / 1e12, "times": st, "achieved_tflops": achieved, "mfu": mfu}
        progress(
            f"  {name}: {st['items_per_s']:.2f} img/s, {achieved:.3f} TFLOP/s" + (f", MFU {mfu:.1%}" if mfu else "")
        )
    return out


def mfu_dtypes(args: argparse.Namespace, device: torch.device) -> list[str]:
    """bf16 on CUDA; on a CPU fp32, and bf16 too where it runs natively (--bf16)."""
    return ["bf16"] if device.type == "cuda" else ["fp32"] + (["bf16"] if args.bf16 else [])


# -------------------------------------------------------------------------------------- table
def table(results: list[dict], fast: bool) -> str:
    headers = ["pair", "size", "GFLOPs ours/peer"]
    rows = []
    batches = sorted({int(k) for r in results for k in r["inference"]})
    for b in batches:
        headers += [f"b{b} img/s ours", f"b{b} peer", f"b{b} ratio"]
    fast_batches = sorted({int(k) for r in results for k, e in r["inference"].items() if "ratio_fast" in e})
    fast = fast and bool(fast_batches)
    if fast:
        headers += [f"fast b{b} ratio" for b in fast_batches] + [f"fast speed-up ours (b{fast_batches[0]})"]
    headers += ["train img/s ours", "train peer", "train ratio", "train ratio per FLOP"]
    bf16_batches = sorted({int(k) for r in results for k, e in r["inference"].items() if "ratio_bf16" in e})
    for b in bf16_batches:
        headers += [f"bf16 b{b} ours / peer fp32", f"bf16 b{b} ours / peer bf16"]
    bf16_train = any("ratio_bf16" in r.get("train", {}) for r in results)
    if bf16_train:
        headers += ["bf16 train ours / peer fp32", "bf16 train ours / peer bf16"]
    for r in results:
        row = [r["pair"], f"{r['size'][0]}x{r['size'][1]}", f"{r['gflops_ours']:.0f}/{r['gflops_peer']:.0f}"]
        for b in batches:
            e = r["inference"].get(str(b))
            row += (
                [e["times"]["ours"]["items_per_s"], e["times"]["peer"]["items_per_s"], e["ratio"]]
                if e
                else [None, None, None]
            )
        if fast:
            row += [
                r["inference"][str(b)].get("ratio_fast") if str(b) in r["inference"] else None for b in fast_batches
            ]
            row.append(r["inference"].get(str(fast_batches[0]), {}).get("fast_speedup_ours"))
        t = r.get("train")
        row += (
            [
                t["times"]["ours"]["items_per_s"],
                t["times"]["peer"]["items_per_s"],
                t["ratio"],
                t["ratio"] * r["flop_ratio"],
            ]
            if t
            else [None] * 4
        )
        for b in bf16_batches:
            e = r["inference"].get(str(b), {})
            row += [e.get("ratio_bf16_vs_peer"), e.get("ratio_bf16")]
        if bf16_train:
            row += [(t or {}).get("ratio_bf16_vs_peer"), (t or {}).get("ratio_bf16")]
        rows.append(row)
    return format_table(headers, rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by gpu_check.py, which validates its planned runs against it)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Ratios are ours/peer of images per second: > 1 means pixelwise is faster.",
    )
    add_common_args(p)
    p.add_argument(
        "--pairs",
        nargs="*",
        choices=list(PAIRS),
        default=list(PAIRS),
        help="pairs to run (default all; none with --mfu: only the MFU measurement)",
    )
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input size (default 360 480, CamVid; 176 240 with --quick); smp pairs round up to /16",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="inference batches (default 1 8)")
    p.add_argument("--train-batch", type=int, default=None, help="training-step batch (default 4; 0 = skip)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds at batch 1 (default 5)")
    p.add_argument("--reps-large", type=int, default=None, help="timed rounds at larger batches/training (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--fast", action="store_true", help="also time the prepare_fast path (ours and peer alike)")
    p.add_argument(
        "--fast-batch-sizes",
        type=int,
        nargs="+",
        default=[1],
        help="inference batches that also get the --fast columns (default 1)",
    )
    p.add_argument("--compile", action="store_true", help="with --fast: torch.compile (slow first call)")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CPU: also time ours and the peer with bf16 autocast + channels_last (inference and training step), "
        "and the MFU in bf16 (default: on where the CPU runs bf16 natively, see pixelwise.precision)",
    )
    p.add_argument(
        "--bf16-batch-sizes",
        type=int,
        nargs="+",
        default=[1],
        help="inference batches that also get the --bf16 columns (default 1)",
    )
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of ours and the peer")
    p.add_argument(
        "--update",
        action="store_true",
        help="replace only the pairs run now in an existing results file, keep the others",
    )
    p.add_argument(
        "--mfu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure MFU of deeplabv3_resnet101 (default: on for CUDA, off for CPU)",
    )
    p.add_argument("--mfu-batch", type=int, default=16, help="MFU batch (default 16)")
    p.add_argument("--mfu-size", type=int, default=512, help="MFU square input side (default 512)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU, used for every dtype measured (default 790 on CUDA: H100 bf16 dense; on a "
        "CPU derived per dtype: threads x clock x FLOPs a cycle, 64 fp32 on AVX-512, 1024 bf16 on AMX, 128 on "
        "AVX512-BF16 without AMX)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    args.size = args.size or ([176, 240] if quick else [360, 480])
    args.batch_sizes = args.batch_sizes or ([1] if quick else [1, 8])
    args.train_batch = args.train_batch if args.train_batch is not None else (2 if quick else 4)
    args.reps = args.reps or (2 if quick else 5)
    args.reps_large = args.reps_large or (1 if quick else 3)
    device = resolve_device(args.device)
    set_threads(args.threads)
    run_mfu = args.mfu if args.mfu is not None else device.type == "cuda"
    if args.bf16 is None:
        args.bf16 = device.type == "cpu" and cpu_has_native_bf16()
    elif args.bf16 and (device.type != "cpu" or not cpu_has_native_bf16()):
        raise SystemExit("--bf16: for a CPU that runs bf16 natively (CUDA runs bf16 in the --fast columns)")

    results = [bench_pair(PAIRS[name], args, device) for name in args.pairs]
    out_path = Path(args.out) if args.out else RESULTS_DIR / "speed.json"
    if args.update and out_path.is_file():  # keep the other pairs' earlier figures, in PAIRS order
        fresh = {r["pair"]: r for r in results}
        kept = {r["pair"]: r for r in json.loads(out_path.read_text())["pairs"] if r["pair"] not in fresh}
        merged = kept | fresh
        results = [merged[name] for name in PAIRS if name in merged]
    payload = {
        "benchmark": "speed",
        "machine": machine_info(device, ["segmentation-models-pytorch", "torchmetrics"]),
        "settings": {
            k: getattr(args, k)
            for k in (
                "size",
                "batch_sizes",
                "train_batch",
                "reps",
                "reps_large",
                "warmup",
                "threads",
                "fast",
                "fast_batch_sizes",
                "compile",
                "bf16",
                "bf16_batch_sizes",
                "quick",
            )
        },
        "dtype": "fp32 eager (fast columns: bf16 autocast on CUDA, fp32 on CPU; bf16 columns: bf16 autocast + "
        "channels_last on the CPU, ours and the peer alike)",
        "pairs": results,
    }
    if run_mfu:
        payload["mfu"] = [bench_mfu(args, device, dtype) for dtype in mfu_dtypes(args, device)]
    path = write_results("speed", payload, args.out)
    m = payload["machine"]
    print(
        f"speed on {m['device_name']} ({device}, {args.threads} threads), torch {m['versions']['torch']}; "
        f"ratio = ours/peer images/s (> 1: ours faster); 'per FLOP' = ratio x GFLOPs ours/peer"
    )
    if results:
        print(table(results, args.fast))
    for mf in payload.get("mfu", []):
        for k in ("inference", "train"):
            share = f" = {mf[k]['mfu']:.1%}" if mf[k]["mfu"] is not None else " (peak unknown)"
            print(
                f"MFU {k}: deeplabv3_resnet101 {mf['size']}x{mf['size']} b{mf['batch']} {mf['dtype']}: "
                f"{mf[k]['achieved_tflops']:.3f} TFLOP/s; peak {mf['peak_tflops'] or 0:.3g} "
                f"({mf['peak_source']}){share}"
            )
    print(f"wrote {path}")
    worst = min((r["inference"][k]["ratio"] for r in results for k in r["inference"]), default=math.nan)
    if worst < 1.0:
        print(f"note: slowest inference ratio {worst:.3f} < 1.0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
