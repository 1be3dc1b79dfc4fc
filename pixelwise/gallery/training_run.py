"""Figure 6: the built-in model's training run at a glance, next to the SegNet paper's row.

Read from the benchmark results of this repository (`benchmarks/results/`, see benchmarks/RESULTS.md):
the run's log, the shipped weights' evaluation and the paper's Table 1 row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.errors import ArgumentError
from pixelwise.gallery.common import Drawn, pyplot, rgb, save_png

RUN_LOG = "camvid_segnet_basic_fast/metrics.jsonl"  # the built-in model's training log
FINAL = "camvid_segnet_basic_fast/evaluate_builtin_bf16.json"  # `pixelwise evaluate` of the shipped weights
PAPER = "reproduce_camvid_segnet_basic.json"  # holds the paper's SegNet-Basic row (Table 1)
RESUMED_AT = 491  # the run was stopped here and resumed on a 36-epoch schedule (its SCHEDULE_NOTE.txt)
SUMMARY = (("mIoU", "miou"), ("G", "pixel_acc"), ("C", "mean_acc"))  # paper's name, our key


def read_results(results: Path) -> tuple[list[dict], dict, dict]:
    """The run's log (one record per step: a resumed run's repeated steps keep their last record), the
    shipped weights' scores and the paper's row; an ArgumentError naming `results` if a file is missing."""
    missing = [name for name in (RUN_LOG, FINAL, PAPER) if not (results / name).is_file()]
    if missing:
        raise ArgumentError("results", str(results), f"has no {missing[0]}; give the repository's benchmarks/results")
    by_step: dict[tuple[str, int], dict] = {}
    for line in (results / RUN_LOG).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[(record["kind"], record["step"])] = record
    log = sorted(by_step.values(), key=lambda r: r["step"])
    final = json.loads((results / FINAL).read_text(encoding="utf-8"))
    paper = json.loads((results / PAPER).read_text(encoding="utf-8"))
    return log, final, paper


def _loss_panel(ax: Any, log: list[dict]) -> None:
    train = [r for r in log if r["kind"] == "train"]
    steps, loss = np.array([r["step"] for r in train]), np.array([r["loss"] for r in train])
    ax.plot(steps, loss, lw=0.6, color="0.7", label="logged every 10 steps")
    smooth = np.convolve(loss, np.ones(15) / 15, mode="valid")
    ax.plot(steps[7 : 7 + len(smooth)], smooth, lw=1.5, color="C0", label="moving mean of 15")
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in train], lw=1, color="C3", ls="--")
    lr.set_ylabel("learning rate (dashed)", color="C3", fontsize=9)
    lr.tick_params(labelsize=8)
    ax.axvline(RESUMED_AT, color="0.4", lw=0.8, ls=":")
    note = "stopped, resumed\n(36-epoch schedule)"
    ax.text(RESUMED_AT + 40, 0.55, note, fontsize=7.5, transform=ax.get_xaxis_transform())  # y: axes fraction
    ax.set(xlabel="optimiser step (batch of 4 crops 240x320)", ylabel="training loss (weighted CE)", title="Loss")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)


def _val_panel(ax: Any, log: list[dict], paper: dict) -> None:
    val = [r for r in log if r["kind"] == "val"]
    epochs = [r["epoch"] for r in val]
    for n, (name, key) in enumerate(SUMMARY):
        ax.plot(epochs, [100 * r[key] for r in val], marker="o", ms=3, color=f"C{n}", label=f"{name}, ours (val)")
        ax.axhline(paper["paper"][name], color=f"C{n}", ls="--", lw=1, label=f"{name}, paper (test)")
    minutes = val[-1]["elapsed_s"] / 60
    ax.set(
        xlabel=f"epoch (36 epochs = {minutes:.0f} min on 2 CPU cores)", ylabel="%", title="Validation", ylim=(0, 100)
    )
    ax.legend(fontsize=7.5, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)


def _class_panel(ax: Any, final: dict, paper: dict, palette: Sequence[Sequence[int]]) -> None:
    classes = final["classes"]
    x = np.arange(len(classes))
    colours = [rgb(c) for c in palette]
    iou, bf = 100 * np.array(final["per_class_iou"]), 100 * np.array(final["per_class_boundary_f1"])
    ax.bar(x - 0.2, iou, 0.4, color=colours, edgecolor="black", lw=0.5, label="IoU")
    ax.bar(x + 0.2, bf, 0.4, color=colours, edgecolor="black", lw=0.5, hatch="///", alpha=0.7, label="boundary F1")
    ax.axhline(100 * final["miou"], color="k", lw=1.2, label=f"mIoU, ours {100 * final['miou']:.1f}")
    ax.axhline(paper["paper"]["mIoU"], color="k", ls="--", lw=1.2, label=f"mIoU, paper {paper['paper']['mIoU']:.1f}")
    ax.axhline(paper["paper"]["BF"], color="0.5", ls=":", lw=1.5, label=f"BF, paper {paper['paper']['BF']:.1f}")
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=8.5)
    ax.set(ylabel="%", ylim=(0, 100), title="Per class, the shipped weights (val)")
    ax.legend(fontsize=7.5, loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)


def draw_training(results: Path, palette: Sequence[Sequence[int]], path: Path) -> Drawn:
    """Figure 6 from the results folder; `palette` colours the classes (the built-in weights')."""
    plt = pyplot()
    log, final, paper = read_results(results)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), width_ratios=(1, 1, 1.25))
    _loss_panel(axes[0], log)
    _val_panel(axes[1], log, paper)
    _class_panel(axes[2], final, paper, palette)
    fig.suptitle("Training at a glance: the built-in segnet_basic_camvid against the SegNet paper", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
    caption = (
        f"From `{results}`: the run's log (`{RUN_LOG}`; the run was stopped at step 491 and resumed, see "
        f"benchmarks/RESULTS.md), the shipped weights' `pixelwise evaluate` (`{FINAL}`, CamVid val, 101 whole "
        f"images, bf16) and the paper's row (`{PAPER}`: {paper['paper_row']}, on {paper['paper_split']}). "
        "The run logged validation mIoU / G / C every 3 epochs, not per class: per-class IoU and boundary F1 "
        "exist for the final (shipped) weights only, and the paper gives no per-class numbers for SegNet-Basic, "
        "so its row is drawn as its summary scores (dashed). Ours are on val, the paper's on the test split, "
        "which this repository holds out."
    )
    return Drawn("Training at a glance", path.name, caption)
