"""`pixelwise train CONFIG.yaml`: the front end of the training engine (`pixelwise.engine.training`).

Reads the config and its `--set` overrides, starts the DDP process group when torchrun launched the
command, trains, and says how to continue when stopped. What a run writes: `pixelwise.engine.training`.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from pixelwise import distributed
from pixelwise.config import load_config
from pixelwise.engine.training import train

__all__ = ["train", "train_command"]


def train_command(args: argparse.Namespace) -> int:
    """`pixelwise train CONFIG [--set k=v ...] [--resume]`."""
    cfg = load_config(args.config, args.overrides)
    with distributed.launched(cfg.train.device):  # DDP: the process group torchrun asked for, if any
        result = train(cfg, resume=args.resume)
        if not distributed.is_main():  # DDP: rank 0 reports for the run
            return 130 if result["interrupted"] else 0
    if result["interrupted"]:
        sets = [x for o in args.overrides for x in ("--set", o)]
        print(
            f"stopped at step {result['step']}; continue with: "
            f"{shlex.join(['pixelwise', 'train', args.config, *sets, '--resume'])}"
        )
        return 130
    val = result.get("metrics") or {}
    miou = f", val mIoU {val['miou']:.4f}" if "miou" in val else ""
    print(f"done: {result['step']} steps{miou}; weights {Path(cfg.output.dir) / 'best.safetensors'}")
    return 0
