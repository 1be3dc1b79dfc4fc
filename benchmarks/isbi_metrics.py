"""Speed of the ISBI 2012 challenge's scores: pixelwise.metrics.isbi_challenge_scores on a 512x512 stack.

The challenge's evaluation: V_Rand and V_Info after border thinning at 11 thresholds for every slice,
and the pixel error (docs/metrics.md). The labels are the 30 ISBI 2012 training slices
(``../shared/data/isbi2012``); the probability maps stand in for a network's:

- ``trained-like``: the labels blurred (Gaussian, sigma 1.5 px) plus N(0, 0.15) noise, clipped to [0, 1];
- ``untrained-like``: a smooth random field around 0.5 (sigma 2 px), the worst case for the thinning:
  every threshold cuts it into thousands of small basins.

Wall-clock and process CPU seconds of one call on the whole stack are reported (the shared machines'
load moves wall times far more than CPU times), with the scores as a sanity check.

Writes ``benchmarks/results/isbi_metrics.json`` and prints a table.

    python benchmarks/isbi_metrics.py            # ~1 min on 2 CPU cores
    python benchmarks/isbi_metrics.py --quick    # 5 slices
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import ROOT, format_table, machine_info, progress, write_results
from PIL import Image
from scipy import ndimage

from pixelwise.metrics import ISBI_THRESHOLDS, isbi_challenge_scores


def probability_maps(labels: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """(N, H, W) cell probabilities in [0, 1] for the labels (N, H, W), as described in the docstring."""
    rng = np.random.default_rng(seed)
    if kind == "trained-like":
        blurred = np.stack([ndimage.gaussian_filter((lab > 0).astype(np.float64), 1.5) for lab in labels])
        return np.clip(blurred + rng.normal(0.0, 0.15, labels.shape), 0.0, 1.0)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=labels.shape[1:]), 2.0) for _ in labels])
    return np.clip(0.5 + field / (4 * field.std()), 0.0, 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--root",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "isbi2012",
        help="ISBI 2012 root holding label/0.png .. 29.png",
    )
    p.add_argument("--slices", type=int, default=30, help="slices of the stack (default 30, the training stack)")
    p.add_argument("--out", default=None, help="JSON file to write (default benchmarks/results/isbi_metrics.json)")
    p.add_argument("--quick", action="store_true", help="5 slices (smoke test)")
    args = p.parse_args(argv)

    n = 5 if args.quick else args.slices
    paths = [args.root / "label" / f"{i}.png" for i in range(n)]
    if not all(path.is_file() for path in paths):
        raise SystemExit(f"{args.root}/label/0.png .. {n - 1}.png not found; give --root")
    labels = np.stack([np.array(Image.open(path)) for path in paths])
    rows, results = [], []
    for kind in ("trained-like", "untrained-like"):
        prob = probability_maps(labels, kind)
        progress(f"{kind}: {n} slices x {len(ISBI_THRESHOLDS)} thresholds")
        wall0, cpu0 = time.perf_counter(), time.process_time()
        scores = isbi_challenge_scores(prob, labels)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        results.append(
            {
                "maps": kind,
                "slices": n,
                "wall_s": wall,
                "cpu_s": cpu,
                **{k: v for k, v in scores.items() if not isinstance(v, list)},
            }
        )
        rows.append([kind, n, wall, cpu, cpu / n, scores["v_rand"], scores["v_info"], scores["pixel_error"]])
    table = format_table(
        ["maps", "slices", "wall s", "CPU s", "CPU s / slice", "V_Rand", "V_Info", "pixel error"], rows
    )
    print(table)
    out = write_results(
        "isbi_metrics",
        {
            "benchmark": "isbi_metrics",
            "workload": f"ISBI 2012 labels 0..{n - 1} (512x512), {len(ISBI_THRESHOLDS)} thresholds, "
            "isbi_challenge_scores on the whole stack",
            "machine": machine_info("cpu", extra_packages=["scipy"]),
            "results": results,
            "table": table,
        },
        args.out,
    )
    progress(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
