"""Where the time of `pixelwise demo` goes: the training loop split into its parts, before and after a change.

Each run is the real demo job (`pixelwise.demo.run_demo`, the built-in synthetic data set and U-Net) in a
fresh process, with wall-clock timers wrapped around the engine's parts (`pixelwise.engine.training`):
building the run (data sets, model, optimiser), waiting for the loader's next batch, forward + loss +
backward, the optimiser step, logging, checkpoints and best weights, validation, the final validation and
report, and the demo's predictions (with the imports the demo makes lazily). "loop, other" is what the
epochs spend outside those parts (progress bar, loss bookkeeping, the loop itself). The timers only read
`time.perf_counter`; no device sync is added.

`--before REV` also runs the code of git revision REV (extracted to a temporary folder and put first on
PYTHONPATH), alternating with this checkout (A B A B), and prints both splits side by side with their
ratio; the parts are found by name, so REV must have the same engine (commit ded4835 or later).

    python benchmarks/demo_split.py --before 3ef92f8 --rounds 2     # ~3 min on 2 CPU cores

Writes ``benchmarks/results/demo_split.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import ROOT, add_common_args, format_table, machine_info, progress, write_results

# engine.training functions (and Run methods) timed on their own, by the phase they count to
PHASES = {
    "build_run": "build (data, model, optimiser)",
    "backward": "forward + loss + backward",
    "optimizer_step": "optimiser step",
    "Run.log": "logging",
    "Run.checkpoint": "checkpoints + best weights",
    "save_best": "checkpoints + best weights",
    "validate": "validation",
    "finish": "final validation + report",
}
ORDER = [
    "build (data, model, optimiser)",
    "loader: next batch",
    "forward + loss + backward",
    "optimiser step",
    "logging",
    "checkpoints + best weights",
    "loop, other",
    "validation",
    "final validation + report",
    "predictions, lazy imports, rest",
    "total",
]


class Timers:
    """Wall seconds per phase; what runs inside `train_epoch` is also counted as the epochs' own."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.in_epoch = False
        self.depth = 0  # timed parts running now: a part called inside another counts to the outer one

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds
        if self.in_epoch:
            self.totals["_in_epoch"] += seconds

    def wrap(self, fn, phase: str):
        def wrapper(*args, **kwargs):
            if self.depth:  # e.g. the log line validation writes: validation's time
                return fn(*args, **kwargs)
            self.depth, t0 = 1, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth = 0
                self.add(phase, time.perf_counter() - t0)

        return wrapper

    def wrap_epoch(self, fn):
        def wrapper(*args, **kwargs):
            self.in_epoch, t0 = True, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_epoch = False
                self.totals["_epochs"] += time.perf_counter() - t0

        return wrapper

    def wrap_loader(self, fn):
        """epoch_loader whose iterator counts the time spent waiting for each batch."""
        timers = self

        class Timed:
            def __init__(self, loader) -> None:
                self.loader = loader

            def __iter__(self):
                t0 = time.perf_counter()
                it = iter(self.loader)  # starts the workers, if any
                timers.add("loader: next batch", time.perf_counter() - t0)
                while True:
                    t0 = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                    finally:
                        timers.add("loader: next batch", time.perf_counter() - t0)
                    yield batch

        return lambda run: Timed(fn(run))

    def split(self, total: float) -> dict[str, float]:
        """The phases of ORDER, in seconds, adding up to `total`."""
        t = dict(self.totals)
        epochs, in_epoch = t.pop("_epochs", 0.0), t.pop("_in_epoch", 0.0)
        t["loop, other"] = epochs - in_epoch
        t["predictions, lazy imports, rest"] = total - sum(t.values())
        t["total"] = total
        return t


def child(out: Path, threads: int, quick: bool) -> None:
    """One demo run in this process, with the engine's parts timed; the split goes to `out` as JSON."""
    import torch

    torch.set_num_threads(threads)
    from pixelwise.demo import demo_config, run_demo
    from pixelwise.engine import training

    timers = Timers()
    for name, phase in PHASES.items():
        owner, attr = (training.Run, name.split(".")[1]) if name.startswith("Run.") else (training, name)
        setattr(owner, attr, timers.wrap(getattr(owner, attr), phase))
    training.epoch_loader = timers.wrap_loader(training.epoch_loader)
    training.train_epoch = timers.wrap_epoch(training.train_epoch)
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = run_demo(demo_config(Path(tmp) / "demo", quick=quick))
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    out.write_text(json.dumps({"split": timers.split(total), "cpu_s": cpu, "miou": summary["miou"]}))


def run_child(code: Path, threads: int, quick: bool) -> dict:
    """One demo run of the code under `code` in a fresh interpreter."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        path = os.pathsep.join([str(code), str(Path(__file__).parent)])
        env = {**os.environ, "PYTHONPATH": path}
        cmd = [sys.executable, __file__, "--child", f.name, "--threads", str(threads)] + (["--quick"] if quick else [])
        done = subprocess.run(cmd, env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:  # the demo's progress bars are dropped, its errors are not
            raise SystemExit(f"the demo run of {code} failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


def extract(rev: str, into: Path) -> Path:
    """The files of git revision `rev` under `into`."""
    archive = into / "code.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "code", filter="data")
    return into / "code"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--before", metavar="REV", help="also run the code of this git revision, alternating")
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant (default 2)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.threads, args.quick)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"after": ROOT} | ({"before": extract(args.before, Path(tmp))} if args.before else {})
        runs: dict[str, list[dict]] = defaultdict(list)
        for r in range(args.rounds):
            for name, code in reversed(variants.items()):  # before first: the older code never runs warmer
                progress(f"round {r + 1}/{args.rounds}: {name}")
                runs[name].append(run_child(code, args.threads, args.quick))
    medians = {
        name: {k: statistics.median(run["split"].get(k, 0.0) for run in rs) for k in ORDER} for name, rs in runs.items()
    }
    headers = ["part"] + [f"{n} s (share)" for n in medians] + (["after / before"] if "before" in medians else [])
    rows = []
    for k in ORDER:
        row = [k] + [f"{m[k]:.2f} ({m[k] / m['total']:.0%})" for m in medians.values()]
        if "before" in medians:
            row.append(f"{medians['after'][k] / medians['before'][k]:.2f}" if medians["before"][k] > 0.005 else "")
        rows.append(row)
    path = write_results(
        "demo_split",
        {
            "benchmark": "demo_split",
            "machine": machine_info("cpu"),
            "settings": {"before": args.before, "rounds": args.rounds, "threads": args.threads, "quick": args.quick},
            "median_split_s": medians,
            "runs": runs,
        },
        args.out,
    )
    print(format_table(headers, rows))
    print("mIoU: " + ", ".join(f"{n} {[round(r['miou'], 4) for r in rs]}" for n, rs in runs.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
