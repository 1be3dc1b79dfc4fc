"""Why did the U-Net paper's SGD collapse on ISBI 2012? Short runs of the full-width network, diagnosed.

Each setting trains the paper's U-Net (valid convs, depth 4, 64 base channels, border weight map,
elastic deformation) for the same number of single-tile steps from the same seed, then reports on
the held-out slices 25..29: the training loss at the start and the end, the argmax pixel error, the
fraction of pixels predicted "membrane" (1.0 = the collapse), and the fraction of dead ReLU channels
(channels whose output is zero on every pixel of a held-out slice: a collapsed net's are all dead).

The settings: the paper's optimiser as the config had it (SGD, lr 0.01, momentum 0.99 on a loss that is
a per-pixel mean), the same with smaller learning rates, AdamW, and two at the quarter width (16 base
channels) of the earlier shortened run, where SGD was seen to collapse.

Writes ``benchmarks/results/unet_optimizer_probe.json`` after each setting (settings measured earlier
with the same step count are kept); run folders go under ``--runs``, and a setting whose folder already
holds a run of that many steps is scored again without training.

    python benchmarks/unet_optimizer_probe.py --steps 120            # ~20 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import RESULTS_DIR, ROOT, machine_info, progress, write_results

from pixelwise.config import load_config
from pixelwise.data import build_dataset
from pixelwise.data.transforms import eval_transforms
from pixelwise.weights import load_checkpoint

SETTINGS = {
    "sgd_lr1e-2": ["train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.99"],
    "sgd_lr1e-3": ["train.optimizer=sgd", "train.lr=0.001", "train.momentum=0.99"],
    "sgd_lr1e-4": ["train.optimizer=sgd", "train.lr=0.0001", "train.momentum=0.99"],
    "adamw_lr1e-4": ["train.optimizer=adamw", "train.lr=0.0001"],
    "adamw_lr1e-3": ["train.optimizer=adamw", "train.lr=0.001"],
    # the earlier shortened run's width (16 base channels), where the paper's SGD was seen to collapse
    "sgd_lr1e-2_width16": [
        "train.optimizer=sgd",
        "train.lr=0.01",
        "train.momentum=0.99",
        "model.kwargs.base_channels=16",
    ],
    "adamw_lr1e-3_width16": ["train.optimizer=adamw", "train.lr=0.001", "model.kwargs.base_channels=16"],
}


@torch.no_grad()
def diagnose(model: torch.nn.Module, cfg) -> dict[str, float]:
    """Pixel error, predicted membrane fraction and dead ReLU channels on the held-out slices."""
    ds = build_dataset(
        "isbi2012", cfg.data.root, "val", transforms=eval_transforms(mean=cfg.data.mean, std=cfg.data.std)
    )
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    alive: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: alive.append(out.amax(dim=(0, 2, 3)) > 0)) for r in relus]
    wrong = membrane = total = 0
    dead = channels = 0
    for i in range(len(ds)):
        image, mask = ds[i]
        alive.clear()
        pred = model(image.unsqueeze(0)).argmax(1)[0]
        valid = mask != 255
        wrong += int((pred != mask)[valid].sum())
        membrane += int((pred == 0).sum())
        total += int(valid.sum())
        if i == 0:
            dead = sum(int((~a).sum()) for a in alive)
            channels = sum(a.numel() for a in alive)
    for h in hooks:
        h.remove()
    return {
        "pixel_error": wrong / total,
        "membrane_fraction": membrane / (len(ds) * mask.numel()),
        "dead_relu_channels": dead / channels,
    }


def probe(name: str, overrides: list[str], steps: int, runs: Path) -> dict:
    from reproduce import _load_run_model

    from pixelwise.train import train

    run_dir = runs / name
    base = [
        "model.kwargs.base_channels=64",
        "data.crop_size=[196,196]",
        f"train.epochs={-(-steps // 25)}",
        "eval.every_epochs=0",
        f"output.dir={run_dir}",
        "output.log_every_steps=5",
    ]
    cfg = load_config("reproduce/isbi2012_unet", [*base, *overrides])
    cfg.data.root = str((ROOT / cfg.data.root).resolve())
    last = run_dir / "last.pt"
    if not (last.is_file() and load_checkpoint(last)["step"] == steps):  # a finished probe run is reused
        train(cfg, overwrite=True, stop_at_step=steps)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    wall = records[-1]["elapsed_s"]
    model = _load_run_model(run_dir, True)
    curve = [r["loss"] for r in records if r["kind"] == "train"]
    out = {
        "setting": name,
        "overrides": overrides,
        "steps": load_checkpoint(run_dir / "last.pt")["step"],
        "wall_s": wall,
        "loss_first_20": sum(curve[:4]) / len(curve[:4]),
        "loss_last_20": sum(curve[-4:]) / len(curve[-4:]),
        "loss_curve": curve,
        **diagnose(model, cfg),
    }
    progress(
        f"{name}: loss {out['loss_first_20']:.3f} -> {out['loss_last_20']:.3f}, pixel error "
        f"{out['pixel_error']:.3f}, membrane {out['membrane_fraction']:.2f}, dead "
        f"{out['dead_relu_channels']:.2f}, {wall / 60:.1f} min"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--runs", type=Path, default=Path.home() / "runs" / "unet_probe")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    done = RESULTS_DIR / "unet_optimizer_probe.json"
    kept = json.loads(done.read_text())["results"] if done.is_file() else []  # settings measured before
    results = [r for r in kept if r["setting"] not in args.settings and r["steps"] == args.steps]
    for name in args.settings:
        results.append(probe(name, SETTINGS[name], args.steps, args.runs))
        results.sort(key=lambda r: list(SETTINGS).index(r["setting"]))
        write_results(
            "unet_optimizer_probe",
            {
                "benchmark": "unet_optimizer_probe",
                "steps": args.steps,
                "results": results,
                "machine": machine_info("cpu"),
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
