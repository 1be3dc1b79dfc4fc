"""Reproduce the papers' numbers (shortened schedules on CPU) and compare with the published ones.

Experiments (the built-in configs ``reproduce/*`` in ``pixelwise/configs/``, trained by ``pixelwise.train.train``):

- ``camvid_segnet_basic``: SegNet-Basic on CamVid (Badrinarayanan et al., TPAMI 2017, Table 1, median-
  frequency balancing; paper test G/C/mIoU/BF = 82.7 / 62.0 / 47.7 / 35.78);
- ``camvid_segnet_basic_single_channel``, ``camvid_bilinear``: the paper's decoder variants
  SegNet-Basic-SingleChannelDecoder (81.2 / 60.7 / 46.1 / 31.62) and Bilinear-Interpolation
  (77.9 / 61.1 / 43.3 / 20.83). FCN-Basic is not built by ``segnet_basic`` (see its docstring);
- ``isbi2012_unet``: U-Net on ISBI 2012 (Ronneberger et al., MICCAI 2015; paper, challenge test set:
  Rand error 0.0382, pixel error 0.0611), trained on slices 0..24, scored on 25..29.

CamVid is scored on val (the test split is held out) by the shared engine (``pixelwise.engine.evaluate``,
multi-scale mode with the one training scale): each val image is resized to the scale the network was
trained at (antialiased, as training resized it), the logits are upsampled bilinearly to 360x480 and
G (global pixel accuracy), C (mean class accuracy), mIoU and BF (boundary F1, 0.75% of the diagonal)
are computed at full resolution against the original labels.

ISBI 2012 is scored on slices 25..29 at 512x512: pixel error at the argmax (1 - pixel accuracy), IoU
of the cell-interior class and mIoU of the two classes, and the challenge's own scores from the softmax
probability of cell interior (``pixelwise.metrics.isbi_challenge_scores``, docs/metrics.md): V_Rand and
V_Info after border thinning, each at its best threshold of 0.0, 0.1, ..., 1.0 for the five slices
together, with ``rand_error`` = 1 - V_Rand, and the challenge's pixel error (1 - the best F-score of the
cell pixels over the same thresholds).

    python benchmarks/reproduce.py run camvid_segnet_basic --eval-at-epochs 3
    python benchmarks/reproduce.py run isbi2012_unet
    python benchmarks/reproduce.py eval camvid_bilinear          # re-score a finished run
    python benchmarks/reproduce.py table                         # the markdown table of all results
    python benchmarks/reproduce.py run camvid_segnet_basic --quick   # smoke run: 8 images, 1 epoch

Each run writes ``benchmarks/results/reproduce_<name>.json`` (``--quick``: into the run folder only).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import RESULTS_DIR, ROOT, format_table, machine_info, progress, set_threads, write_results

from pixelwise.config import Config, config_to_dict, load_config


@dataclass(frozen=True)
class Experiment:
    """A config to train and the paper's row to compare with."""

    config: str  # a built-in config's name (pixelwise/configs/reproduce/)
    dataset: str  # camvid | isbi2012
    paper_row: str
    paper: dict[str, float]  # metric name -> the paper's value (percent for CamVid, fraction for ISBI)
    paper_split: str


EXPERIMENTS: dict[str, Experiment] = {
    "camvid_segnet_basic": Experiment(
        "reproduce/camvid_segnet_basic",
        "camvid",
        "SegNet-Basic (TPAMI 2017, Table 1)",
        {"G": 82.7, "C": 62.0, "mIoU": 47.7, "BF": 35.78},
        "CamVid test (233 images)",
    ),
    "camvid_segnet_basic_single_channel": Experiment(
        "reproduce/camvid_segnet_basic_single_channel",
        "camvid",
        "SegNet-Basic-SingleChannelDecoder (Table 1)",
        {"G": 81.2, "C": 60.7, "mIoU": 46.1, "BF": 31.62},
        "CamVid test (233 images)",
    ),
    "camvid_bilinear": Experiment(
        "reproduce/camvid_bilinear",
        "camvid",
        "Bilinear-Interpolation (Table 1)",
        {"G": 77.9, "C": 61.1, "mIoU": 43.3, "BF": 20.83},
        "CamVid test (233 images)",
    ),
    "isbi2012_unet": Experiment(
        "reproduce/isbi2012_unet",
        "isbi2012",
        "U-Net (MICCAI 2015, Table 1)",
        {"rand_error": 0.0382, "pixel_error": 0.0611, "warping_error": 0.000353},
        "ISBI 2012 challenge test stack",
    ),
}


# ------------------------------------------------------------------------------------ evaluate
def _train_scale(cfg: Config) -> float:
    lo, hi = cfg.data.scale_range
    return lo if lo == hi else 1.0


def _load_run_model(run_dir: Path, prefer_checkpoint: bool, checkpoint: Path | None = None) -> torch.nn.Module:
    """The run's model: a checkpoint's state (last.pt of an intermediate stop, or ``checkpoint``) or
    best.safetensors (the finished run)."""
    from pixelwise.models import get_model
    from pixelwise.weights import load_checkpoint, load_weights

    if prefer_checkpoint or checkpoint is not None:
        ckpt = load_checkpoint(checkpoint or run_dir / "last.pt")
        cfg = ckpt["config"]
        model = get_model(ckpt["model_name"], num_classes=_num_classes(cfg), **cfg["model"]["kwargs"])
        model.load_state_dict(ckpt["model"])
        return model.eval()
    return load_weights(run_dir / "best.safetensors")[0].eval()


def _num_classes(cfg: dict) -> int:
    return {"camvid": 11, "isbi2012": 2}[cfg["data"]["dataset"]]


def evaluate_camvid(model: torch.nn.Module, cfg: Config, scale: float) -> dict[str, Any]:
    """G, C, mIoU, BF (percent) on CamVid val, scored by the engine as `pixelwise evaluate --mode multiscale
    --scales <scale>` scores it: inference at ``scale`` (the input shrunk antialiased, as training scaled
    it), logits upsampled bilinearly to 360x480 and scored there."""
    from pixelwise.data import build_dataset, raw_transforms
    from pixelwise.engine import InferenceSpec, evaluate

    ds = build_dataset("camvid", cfg.data.root, "val", transforms=raw_transforms())
    spec = InferenceSpec() if scale == 1.0 else InferenceSpec(mode="multiscale", scales=(scale,))
    s = evaluate(
        model,
        ds,
        spec,
        mean=cfg.data.mean,
        std=cfg.data.std,
        num_classes=ds.num_classes,
        ignore_index=ds.ignore_index,
    ).scores
    return {
        "G": 100 * s["pixel_acc"],
        "C": 100 * s["mean_acc"],
        "mIoU": 100 * s["miou"],
        "BF": 100 * s["boundary_f1"],
        "per_class_iou": dict(zip(ds.classes, [100 * v for v in s["per_class_iou"]], strict=True)),
    }


def evaluate_isbi(model: torch.nn.Module, cfg: Config) -> dict[str, Any]:
    """Argmax pixel error and IoU, and the challenge's V_Rand, V_Info and pixel error on slices 25..29,
    scored by the engine as `pixelwise evaluate --dataset isbi2012` scores them."""
    from pixelwise.data import build_dataset, raw_transforms
    from pixelwise.engine import InferenceSpec, dataset_metrics, evaluate

    ds = build_dataset("isbi2012", cfg.data.root, "val", transforms=raw_transforms())
    result = evaluate(
        model,
        ds,
        InferenceSpec(),
        mean=cfg.data.mean,
        std=cfg.data.std,
        num_classes=2,
        ignore_index=255,
        boundary_f1=False,
        extra_metrics=dataset_metrics("isbi2012", ds.classes),
    )
    s, challenge = result.scores, result.scores["isbi_challenge"]
    return {
        "pixel_error": 1 - s["pixel_acc"],
        "iou_cell": s["per_class_iou"][1],
        "iou_membrane": s["per_class_iou"][0],
        "miou": s["miou"],
        "v_rand": challenge["v_rand"],
        "rand_error": 1 - challenge["v_rand"],
        "v_info": challenge["v_info"],
        "challenge_pixel_error": challenge["pixel_error"],
        "v_rand_threshold": challenge["v_rand_threshold"],
        "v_info_threshold": challenge["v_info_threshold"],
        "v_rand_per_slice": challenge["v_rand_per_slice"],
        "v_info_per_slice": challenge["v_info_per_slice"],
    }


def evaluate_run(
    name: str, cfg: Config, *, from_checkpoint: bool = False, checkpoint: Path | None = None
) -> dict[str, float]:
    exp = EXPERIMENTS[name]
    model = _load_run_model(Path(cfg.output.dir), from_checkpoint, checkpoint)
    if exp.dataset == "camvid":
        return evaluate_camvid(model, cfg, _train_scale(cfg))
    return evaluate_isbi(model, cfg)


# ------------------------------------------------------------------------------------------ run
def _resolve(cfg: Config) -> Config:
    """Relative data roots and output dirs are relative to the repository root, wherever we run from."""
    if not Path(cfg.data.root).is_absolute():
        cfg.data.root = str((ROOT / cfg.data.root).resolve())
    if not Path(cfg.output.dir).is_absolute():
        cfg.output.dir = str(ROOT / cfg.output.dir)
    return cfg


def load_experiment(name: str, overrides: list[str], quick: bool) -> Config:
    exp = EXPERIMENTS[name]
    extra = []
    if quick:
        extra = ["data.max_train_images=8", "train.epochs=1", f"output.dir=runs/reproduce_quick/{name}"]
    return _resolve(load_config(exp.config, [*extra, *overrides]))


def run(name: str, overrides: list[str], *, quick: bool, eval_at_epochs: list[int], fresh: bool) -> dict:
    from pixelwise.train import train

    exp = EXPERIMENTS[name]
    cfg = load_experiment(name, overrides, quick)
    run_dir = Path(cfg.output.dir)
    n_train = cfg.data.max_train_images or _count_train(cfg)
    steps_per_epoch = n_train // (cfg.data.batch_size * cfg.train.grad_accum)
    progress(
        f"[{name}] {cfg.model.name} {cfg.model.kwargs}: {cfg.train.epochs} epochs x {steps_per_epoch} steps "
        f"-> {run_dir}"
    )
    t0 = time.perf_counter()
    intermediate = {}
    resume = (run_dir / "last.pt").exists() and not fresh
    for epochs in sorted(e for e in eval_at_epochs if e < cfg.train.epochs):
        result = train(cfg, resume=resume, overwrite=not resume, stop_at_step=epochs * steps_per_epoch)
        resume = True
        if result["interrupted"]:
            progress(f"[{name}] scoring the weights after {epochs} epochs")
            intermediate[str(epochs)] = {
                "steps": result["step"],
                "wall_s": time.perf_counter() - t0,
                "metrics": evaluate_run(name, cfg, from_checkpoint=True),
            }
            progress(f"  {_short(intermediate[str(epochs)]['metrics'])}")
    result = train(cfg, resume=resume, overwrite=not resume)
    train_s = time.perf_counter() - t0
    # the run's own wall time, also across interrupted and resumed processes: first file to last checkpoint
    run_wall_s = (run_dir / "last.pt").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    metrics = evaluate_run(name, cfg)
    progress(f"[{name}] final after {result['step']} steps, {train_s / 60:.1f} min: {_short(metrics)}")
    payload = {
        "benchmark": f"reproduce_{name}",
        "experiment": name,
        "paper_row": exp.paper_row,
        "paper": exp.paper,
        "paper_split": exp.paper_split,
        "ours_split": "CamVid val (101 images)" if exp.dataset == "camvid" else "ISBI 2012 slices 25..29",
        "ours": metrics,
        "intermediate": intermediate,
        "schedule": {
            "epochs": cfg.train.epochs,
            "steps": result["step"],
            "batch_size": cfg.data.batch_size,
            "train_scale": _train_scale(cfg),
            "crop_size": cfg.data.crop_size,
            "optimizer": cfg.train.optimizer,
            "lr": cfg.train.lr,
            "momentum": cfg.train.momentum,
            "shortened": True,
            "wall_s": run_wall_s,
            "wall_s_this_process": train_s,
        },
        "config": config_to_dict(cfg),
        "machine": machine_info("cpu"),
    }
    if quick:
        write_results(name, payload, run_dir / "reproduce.json")
    else:
        write_results(f"reproduce_{name}", payload)
    return payload


def _count_train(cfg: Config) -> int:
    from pixelwise.data import build_dataset

    return len(build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split, **cfg.data.kwargs))


def record_intermediate(name: str, epoch: int, checkpoint: Path | None, metrics: dict) -> None:
    """Add the scores of an earlier checkpoint of a finished run to its results JSON."""
    from pixelwise.weights import load_checkpoint

    if checkpoint is None:
        raise SystemExit("--record-epoch needs --checkpoint (the saved last.pt of that epoch)")
    path = RESULTS_DIR / f"reproduce_{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist yet; run the experiment first")
    payload = json.loads(path.read_text())
    payload.setdefault("intermediate", {})[str(epoch)] = {
        "steps": load_checkpoint(checkpoint)["step"],
        "metrics": metrics,
    }
    payload["intermediate"] = dict(sorted(payload["intermediate"].items(), key=lambda kv: int(kv[0])))
    write_results(f"reproduce_{name}", payload)


def _short(m: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float))


# ---------------------------------------------------------------------------------------- table
def table() -> str:
    """Markdown tables of every ``results/reproduce_*.json``: paper vs ours."""
    camvid, isbi = [], []
    for name in EXPERIMENTS:  # the paper's row order, not the file names
        path = RESULTS_DIR / f"reproduce_{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        s = r["schedule"]
        sched = (
            f"{s['epochs']} ep / {s['steps']} steps, batch {s['batch_size']}, scale {s['train_scale']:g}, "
            f"{s.get('wall_s', s.get('wall_s_including_intermediate_evals', 0.0)) / 60:.0f} min wall"
        )
        if EXPERIMENTS[r["experiment"]].dataset == "camvid":
            keys = ["G", "C", "mIoU", "BF"]
            camvid.append([r["paper_row"], "paper (test)", *[r["paper"][k] for k in keys], "until convergence"])
            for ep, inter in r.get("intermediate", {}).items():
                camvid.append(
                    [
                        "",
                        f"ours (val) @{ep} ep",
                        *[inter["metrics"][k] for k in keys],
                        f"{ep} ep / {inter['steps']} steps",
                    ]
                )
            camvid.append(["", "ours (val)", *[r["ours"][k] for k in keys], sched])
        else:
            isbi.append(
                [
                    r["paper_row"],
                    "paper (challenge test)",
                    r["paper"]["pixel_error"],
                    None,
                    r["paper"]["rand_error"],
                    None,
                    None,
                    None,
                    "-",
                ]
            )
            o = r["ours"]
            rand_error = 1 - o["v_rand"] if "v_rand" in o else None  # results from before the challenge's V_Rand
            isbi.append(
                [
                    "",
                    "ours (slices 25-29)",
                    o.get("challenge_pixel_error"),
                    o["pixel_error"],
                    rand_error,
                    o.get("v_info"),
                    o["iou_cell"],
                    o["miou"],
                    sched,
                ]
            )
    out = []
    if camvid:
        out.append(format_table(["model", "", "G", "C", "mIoU", "BF", "schedule"], camvid))
    if isbi:
        out.append(
            format_table(
                [
                    "model",
                    "",
                    "pixel error (1 - max F)",
                    "pixel error (argmax)",
                    "Rand error (1 - V_Rand)",
                    "V_Info",
                    "IoU cell",
                    "mIoU",
                    "schedule",
                ],
                isbi,
            )
        )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train an experiment and score it")
    r.add_argument("name", choices=list(EXPERIMENTS))
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as for `pixelwise train` (e.g. --set train.epochs=2)",
    )
    r.add_argument(
        "--eval-at-epochs",
        type=int,
        nargs="*",
        default=[],
        help="also score the weights after these epochs (e.g. to compare with shorter variant runs)",
    )
    r.add_argument("--fresh", action="store_true", help="start afresh even if the run folder holds a checkpoint")
    r.add_argument("--quick", action="store_true", help="smoke run: 8 training images, 1 epoch, own folder")
    r.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    e = sub.add_parser("eval", help="score a finished run again and print its metrics")
    e.add_argument("name", choices=list(EXPERIMENTS))
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="score this checkpoint (a saved copy of the run's last.pt) instead of best.safetensors",
    )
    e.add_argument(
        "--record-epoch",
        type=int,
        default=None,
        help="with --checkpoint: store the scores as this epoch's in results/reproduce_<name>.json",
    )
    e.add_argument("--threads", type=int, default=2)
    sub.add_parser("table", help="print the markdown table of all reproduce_*.json results")
    args = p.parse_args(argv)

    if args.cmd == "table":
        print(table())
        return 0
    set_threads(args.threads)
    if args.cmd == "eval":
        cfg = load_experiment(args.name, args.overrides, quick=False)
        metrics = evaluate_run(args.name, cfg, checkpoint=args.checkpoint)
        print(json.dumps(metrics, indent=2))
        if args.record_epoch is not None:
            record_intermediate(args.name, args.record_epoch, args.checkpoint, metrics)
        return 0
    payload = run(args.name, args.overrides, quick=args.quick, eval_at_epochs=args.eval_at_epochs, fresh=args.fresh)
    print(
        json.dumps(
            {
                "experiment": payload["experiment"],
                "paper": payload["paper"],
                "ours": {k: v for k, v in payload["ours"].items() if not isinstance(v, dict)},
            },
            indent=2,
        )
    )
    if not math.isfinite(sum(v for v in payload["ours"].values() if isinstance(v, float))):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
