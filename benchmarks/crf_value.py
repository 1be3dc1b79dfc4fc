"""What the dense CRF buys: mIoU and boundary F1 on CamVid val with and without CRF refinement.

Runs `pixelwise evaluate` twice on the same weights (the SegNet paper reports +0.9 mIoU and +8 BF
for DeepLab-LargeFOV with its CRF) and writes `benchmarks/results/crf_value.json` plus a table.

    python benchmarks/crf_value.py --weights runs/reproduce/camvid_segnet_basic/best.safetensors --scale 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads stall a busy machine

from common import ROOT, add_common_args, format_table, machine_info, set_threads, write_results

from pixelwise.cli import main as pixelwise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a CamVid .safetensors file")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "camvid"), help="CamVid root")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="run the network at this input scale (the scale it was trained at); the CRF "
        "always refines the upsampled scores at full resolution, as DeepLab does",
    )
    parser.add_argument("--preset", default="deeplab_vgg", help="CRF parameter set (default deeplab_vgg)")
    add_common_args(parser)
    args = parser.parse_args()
    set_threads(args.threads)

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("without CRF", []), ("with CRF", ["--crf", "--crf-preset", args.preset])):
            out = Path(tmp) / name.replace(" ", "_")
            start = time.perf_counter()
            rc = pixelwise(
                [
                    "evaluate",
                    "--weights",
                    args.weights,
                    "--data",
                    args.data,
                    "--dataset",
                    "camvid",
                    "--split",
                    "val",
                    "--mode",
                    "multiscale",
                    "--scales",
                    str(args.scale),
                    "--out",
                    str(out),
                    *extra,
                ]
            )
            if rc != 0:
                raise SystemExit(rc)
            metrics = json.loads((out / "metrics.json").read_text())
            results[name] = {
                "miou": metrics["miou"],
                "boundary_f1": metrics["boundary_f1"],
                "pixel_acc": metrics["pixel_acc"],
                "seconds": time.perf_counter() - start,
            }
            rows.append([name, 100 * metrics["miou"], 100 * metrics["boundary_f1"], 100 * metrics["pixel_acc"]])
    gain = {k: results["with CRF"][k] - results["without CRF"][k] for k in ("miou", "boundary_f1", "pixel_acc")}
    rows.append(["gain", 100 * gain["miou"], 100 * gain["boundary_f1"], 100 * gain["pixel_acc"]])
    print(format_table(["CamVid val (101 images)", "mIoU", "BF", "G"], rows))
    write_results(
        "crf_value",
        {
            "weights": args.weights,
            "scale": args.scale,
            "preset": args.preset,
            "results": results,
            "gain": gain,
            "machine": machine_info("cpu"),
        },
    )


if __name__ == "__main__":
    main()
