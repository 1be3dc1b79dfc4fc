"""Dense CRF speed: pixelwise.crf.dense_crf vs pydensecrf (Krähenbühl's densecrf v2), side by side.

The workload of DeepLab's post-processing on CamVid: one 480x360 RGB image, 11 classes, the unary
made from the validation ground truth (softmax of 2 * one-hot + N(0, 1) noise; synthetic blobs when
``../shared/data/camvid`` is absent). For every parameter preset and for 5 and 10 mean-field
iterations both run the same full job (lattice build + inference) alternating A B A B after
warm-up, with the same thread count; pydensecrf itself is single-threaded. dense_crf keeps the
smoothness kernel of the last image size, as for the next image of a data set; the "first of its
size" column times it with that kernel forgotten before every call (`pixelwise.crf.clear_cache`). The batch case refines
16 different images: one ``dense_crf`` call on a (16, 11, 360, 480) batch against 16 pydensecrf
calls, reported per image.

Before timing, the labels of both are compared (the goal is >= 99% of the pixels).
Wall-clock medians are the figures (BENCHMARKS.md); the process CPU time of every call is recorded
too, since the shared machines' load moves wall times far more than CPU times.

Writes ``benchmarks/results/crf_speed.json`` and prints a table.

    python benchmarks/crf_speed.py             # ~3-5 min on 2 CPU cores
    python benchmarks/crf_speed.py --quick     # one preset, few repetitions, batch 4
    python benchmarks/crf_speed.py --profile   # also print torch.profiler's table of one dense_crf call
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

# On a shared, oversubscribed machine OpenMP's default spin-waiting makes every parallel op of a
# 2-thread PyTorch wait for a descheduled thread (10x slower, see docs/crf.md); sleeping waits cost
# nothing measurable on an idle machine. Must be set before torch starts; a value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from common import (
    ROOT,
    add_common_args,
    format_table,
    machine_info,
    progress,
    resolve_device,
    set_threads,
    summarize,
    time_alternating,
    write_results,
)

from pixelwise import crf_compiled
from pixelwise.crf import CRF_PRESETS, clear_cache, crf_kwargs, dense_crf

CAMVID = ROOT.parent / "shared" / "data" / "camvid"
NUM_CLASSES = 11
TENSOR = "pixelwise_tensor"  # the same dense_crf with the tensor lattice (what runs without numba, and on CUDA)
# dense_crf keeps the smoothness kernel of the last image size (the next image of a data set reuses it);
# this contender forgets it before every call: the first image of its size
COLD = "pixelwise_first"


def load_inputs(count: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """``count`` (image (H, W, 3) uint8, probs (K, H, W) float32) pairs and where they come from."""
    rng = np.random.default_rng(seed)
    images, probs = [], []
    names = sorted(p.name for p in (CAMVID / "val").glob("*.png")) if (CAMVID / "valannot").is_dir() else []
    if names:
        from PIL import Image

        step = max(1, len(names) // count)
        for name in names[::step][:count]:
            image = np.asarray(Image.open(CAMVID / "val" / name).convert("RGB"))
            label = np.asarray(Image.open(CAMVID / "valannot" / name))
            images.append(np.array(image))  # writable: pydensecrf's memoryview needs it
            probs.append(_noisy_softmax(label, rng))
        source = f"CamVid val ({len(images)} images)"
    while len(images) < count:  # synthetic: smooth colour blobs labelled by their colour
        label = _blobs(360, 480, rng)
        palette = rng.integers(0, 256, (NUM_CLASSES, 3))
        noise = rng.normal(0, 12, (360, 480, 3))
        images.append(np.clip(palette[label] + noise, 0, 255).astype(np.uint8))
        probs.append(_noisy_softmax(label, rng))
        source = "synthetic blobs (CamVid not found)"
    return images, probs, source


def _blobs(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A label map of Voronoi cells around random centres."""
    centres = rng.uniform([0, 0], [h, w], (24, 2))
    yy, xx = np.mgrid[:h, :w]
    dist = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    return (dist.argmin(-1) % NUM_CLASSES).astype(np.uint8)


def _noisy_softmax(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """softmax(2 * one_hot(label) + N(0, 1)) over 11 classes; label 11 (void) gets no bump."""
    onehot = np.eye(NUM_CLASSES + 1, dtype=np.float32)[label][..., :NUM_CLASSES].transpose(2, 0, 1)
    logits = 2.0 * onehot + rng.normal(0.0, 1.0, onehot.shape).astype(np.float32)
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def pydensecrf_refine(image: np.ndarray, probs: np.ndarray, params: dict) -> np.ndarray:
    """pydensecrf with the same unary (-log of probs clipped at 1e-5), kernels and iterations."""
    import pydensecrf.densecrf as dcrf

    k, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(k, -1)))
    crf.addPairwiseGaussian(sxy=params["gaussian_sxy"], compat=params["gaussian_weight"])
    crf.addPairwiseBilateral(
        sxy=params["bilateral_sxy"], srgb=params["bilateral_srgb"], rgbim=image, compat=params["bilateral_weight"]
    )
    return np.asarray(crf.inference(params["iterations"])).reshape(k, h, w)


def tensor_path(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with pixelwise's tensor lattice (PIXELWISE_CRF_COMPILED=0) instead of the compiled one."""

    def run() -> object:
        previous = os.environ.get("PIXELWISE_CRF_COMPILED")
        os.environ["PIXELWISE_CRF_COMPILED"] = "0"
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["PIXELWISE_CRF_COMPILED"]
            else:
                os.environ["PIXELWISE_CRF_COMPILED"] = previous

    return run


def first_of_its_size(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run after `pixelwise.crf.clear_cache`: nothing kept from an earlier image of the same size."""

    def run() -> object:
        clear_cache()
        return fn()

    return run


def with_cpu_time(fn: Callable[[], object], sink: list[float]) -> Callable[[], object]:
    """``fn`` that also appends the process CPU seconds of every call to ``sink``."""

    def run() -> object:
        t0 = time.process_time()
        out = fn()
        sink.append(time.process_time() - t0)
        return out

    return run


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by gpu_check.py, which validates its planned runs against it)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p)
    p.add_argument(
        "--presets",
        nargs="+",
        default=None,
        choices=list(CRF_PRESETS),
        help="parameter sets to time (default pydensecrf deeplab_vgg; pydensecrf with --quick)",
    )
    p.add_argument("--iterations", type=int, nargs="+", default=[5, 10], help="mean-field iterations (5 10)")
    p.add_argument("--batch", type=int, default=None, help="images of the batch case (default 16; 4 --quick)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table of one dense_crf call")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    presets = args.presets or (["pydensecrf"] if args.quick else ["pydensecrf", "deeplab_vgg"])
    batch = args.batch or (4 if args.quick else 16)
    reps = args.reps or (3 if args.quick else 7)
    set_threads(args.threads)
    device = resolve_device(args.device)
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        raise SystemExit("pydensecrf is not installed: pip install -e '.[bench]' (package pydensecrf2)") from None

    # where numba compiles the lattice (pixelwise.crf_compiled), the tensor implementation is timed too
    compiled = device.type == "cpu" and crf_compiled.available()
    contenders = ("pixelwise", COLD, "pydensecrf") + ((TENSOR,) if compiled else ())
    progress(f"pixelwise's CPU lattice: {'compiled (numba)' if compiled else 'tensor operations'}")
    images, probs, source = load_inputs(max(batch, 1))
    progress(f"inputs: {source}, {NUM_CLASSES} classes, {images[0].shape[1]}x{images[0].shape[0]}")
    image_t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(device)  # (N, 3, H, W)
    probs_t = torch.from_numpy(np.stack(probs)).to(device)  # (N, K, H, W)

    rows, results = [], []
    for preset in presets:
        for iterations in args.iterations:
            params = crf_kwargs(preset, iterations=iterations)
            ref = pydensecrf_refine(images[0], probs[0], params)
            ours_q = dense_crf(probs_t[:1], image_t[:1], **params)[0].cpu().numpy()
            agreement = float((ours_q.argmax(0) == ref.argmax(0)).mean())
            cpu: dict[str, list[float]] = {name: [] for name in contenders}
            fns = {
                "pixelwise": with_cpu_time(lambda p=params: dense_crf(probs_t[:1], image_t[:1], **p), cpu["pixelwise"]),
                "pydensecrf": with_cpu_time(
                    lambda p=params: pydensecrf_refine(images[0], probs[0], p), cpu["pydensecrf"]
                ),
            }
            fns[COLD] = with_cpu_time(
                first_of_its_size(lambda p=params: dense_crf(probs_t[:1], image_t[:1], **p)), cpu[COLD]
            )
            if TENSOR in contenders:
                fns[TENSOR] = with_cpu_time(
                    tensor_path(lambda p=params: dense_crf(probs_t[:1], image_t[:1], **p)), cpu[TENSOR]
                )
            progress(f"{preset}, {iterations} iterations, 1 image: label agreement {agreement:.5f}")
            times = time_alternating(fns, reps=reps, warmup=1, device=device, log=progress)
            results.append(_case(preset, iterations, 1, times, cpu, agreement))
            rows.append(_row(results[-1]))

    if batch > 1:
        params = crf_kwargs(presets[0], iterations=args.iterations[-1])
        cpu = {name: [] for name in ("pixelwise", "pydensecrf")}
        fns = {
            "pixelwise": with_cpu_time(lambda: dense_crf(probs_t[:batch], image_t[:batch], **params), cpu["pixelwise"]),
            "pydensecrf": with_cpu_time(
                lambda: [pydensecrf_refine(i, q, params) for i, q in zip(images[:batch], probs[:batch], strict=True)],
                cpu["pydensecrf"],
            ),
        }
        progress(f"{presets[0]}, {params['iterations']} iterations, batch {batch}")
        times = time_alternating(fns, reps=max(2, reps // 2), warmup=1, device=device, log=progress)
        results.append(_case(presets[0], params["iterations"], batch, times, cpu, None))
        rows.append(_row(results[-1]))

    headers = [
        "preset",
        "iterations",
        "batch",
        "pixelwise s/img",
        "pydensecrf s/img",
        "ours/peer time",
        "first of its size/peer",
        "tensor path/peer time",
        "pixelwise cpu s/img",
        "pydensecrf cpu s/img",
        "label agreement",
    ]
    table = format_table(headers, rows)
    print(table)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        params = crf_kwargs(presets[0], iterations=args.iterations[-1])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dense_crf(probs_t[:1], image_t[:1], **params)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    out = write_results(
        "crf_speed",
        {
            "benchmark": "crf_speed",
            "workload": f"{source}; {NUM_CLASSES} classes; unary -log(clip(softmax(2*onehot + N(0,1)), 1e-5))",
            "settings": {
                "threads": args.threads,
                "reps": reps,
                "batch": batch,
                "presets": presets,
                "iterations": args.iterations,
                "quick": args.quick,
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            },
            "machine": machine_info(device, extra_packages=["pydensecrf2"]),
            "results": results,
            "table": table,
        },
        args.out,
    )
    progress(f"wrote {out}")
    return 0


def _case(
    preset: str,
    iterations: int,
    batch: int,
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    agreement: float | None,
) -> dict:
    """One measured case as JSON: per-call summaries, per-image medians and the ratio ours/peer."""
    warm = len(cpu["pixelwise"]) - len(times["pixelwise"])  # drop the warm-up calls' CPU times
    case = {"preset": preset, "iterations": iterations, "batch": batch, "label_agreement": agreement}
    for name in times:
        case[name] = summarize(times[name], items=batch)
        case[name]["median_s_per_image"] = case[name]["median_s"] / batch
        case[name]["cpu_median_s_per_image"] = statistics.median(cpu[name][warm:]) / batch
    case["time_ratio_ours_over_peer"] = case["pixelwise"]["median_s"] / case["pydensecrf"]["median_s"]
    if COLD in times:
        case["time_ratio_first_of_size_over_peer"] = case[COLD]["median_s"] / case["pydensecrf"]["median_s"]
    if TENSOR in times:
        case["time_ratio_tensor_over_peer"] = case[TENSOR]["median_s"] / case["pydensecrf"]["median_s"]
    return case


def _row(case: dict) -> list:
    ours, peer = case["pixelwise"], case["pydensecrf"]
    return [
        case["preset"],
        case["iterations"],
        case["batch"],
        ours["median_s_per_image"],
        peer["median_s_per_image"],
        case["time_ratio_ours_over_peer"],
        case.get("time_ratio_first_of_size_over_peer"),
        case.get("time_ratio_tensor_over_peer"),
        ours["cpu_median_s_per_image"],
        peer["cpu_median_s_per_image"],
        None if case["label_agreement"] is None else f"{100 * case['label_agreement']:.2f}%",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
