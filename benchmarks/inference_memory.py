"""Peak memory of inference per model: what `serve` and `predict` need for one window and for a whole image.

Each model is built in a fresh process (fp32, eval, 21 classes, the builder's defaults), run once on
a 64x64 input (lazy initialisation), then under ``torch.inference_mode`` on a 512x512 window (what
every window of a larger image costs, see docs/deploy.md) and on a 1024x2048 image (the largest one
inferred whole, `pixelwise.segment.MAX_WHOLE_PIXELS`). The growth of the process's peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each forward) over its RSS at that point
is recorded: activations plus the backend's transient copies of the weights (oneDNN reorders), which
is why it is not proportional to the pixels.

Writes ``benchmarks/results/inference_memory.json`` and prints a table. Linux only (``/proc``).

    python benchmarks/inference_memory.py                    # every model, ~30 min on 2 busy CPU cores
    python benchmarks/inference_memory.py --models segnet_basic unet
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see docs/crf.md: spinning threads on a shared machine
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_info, progress, write_results  # noqa: E402

SIZES = ((512, 512), (1024, 2048))

CHILD = r"""
import json, sys
import torch
from pixelwise.models import get_model

def peak_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024

def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) / 1024

torch.set_num_threads(int(sys.argv[2]))
model = get_model(sys.argv[1], num_classes=21).eval()
params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
with torch.inference_mode():
    model(torch.randn(1, 3, 64, 64))
growth = []
for h, w in json.loads(sys.argv[3]):
    x = torch.randn(1, 3, h, w)
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS counts from here
    base = rss_mib()
    with torch.inference_mode():
        model(x)
    growth.append(peak_mib() - base)
print(json.dumps({"params_mib": params, "growth_mib": growth}))
"""


def measure(name: str, threads: int) -> dict:
    """Peak-RSS growth of one forward per size, in a fresh process."""
    run = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(threads), json.dumps(SIZES)], capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    from pixelwise.models import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="models to measure (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        r = measure(name, args.threads)
        rows.append(
            {
                "model": name,
                "params_mib": r["params_mib"],
                "window_512_mib": r["growth_mib"][0],
                "whole_2048x1024_mib": r["growth_mib"][1],
            }
        )
        progress(f"{name}: {rows[-1]}")
    write_results(
        "inference_memory", {"machine": machine_info(), "threads": args.threads, "sizes": SIZES, "rows": rows}
    )
    print(
        format_table(
            ["model", "weights MiB", "512x512 window: peak +MiB", "2048x1024 whole: peak +MiB"],
            [[r["model"], r["params_mib"], r["window_512_mib"], r["whole_2048x1024_mib"]] for r in rows],
        )
    )


if __name__ == "__main__":
    main()
