"""Training state: where a run stands, saved to and restored from `last.pt`.

`TrainState` is the run's position (epoch, step, the epoch's sample order, best score, wall time);
the checkpoint adds the model, optimiser, gradient scaler and every RNG state, so that a resumed run
continues exactly. Checkpoints of an older layout are migrated on reading.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pixelwise.errors import UserError
from pixelwise.fileio import atomic_path

# 2: no "scheduler" entry (the learning rate is a function of the step), "elapsed_s" always present
CHECKPOINT_VERSION = 2
_REQUIRED = (
    "model_name",
    "config",
    "model",
    "optimizer",
    "scaler",
    "epoch",
    "step",
    "step_in_epoch",
    "perm",
    "best_miou",
    "rng",
    "elapsed_s",
)


@dataclass
class TrainState:
    """Where a training run stands."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimiser steps taken
    step_in_epoch: int = 0  # optimiser steps taken in the current epoch
    perm: torch.Tensor | None = None  # the current epoch's sample order (None before the first epoch)
    best_miou: float | None = None  # best validation score so far: mIoU, or what eval.best_metric names
    elapsed_s: float = 0.0  # wall seconds of the run before this process started (resumed runs add up)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "perm": self.perm,
            "best_miou": self.best_miou,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        return cls(
            epoch=int(ckpt["epoch"]),
            step=int(ckpt["step"]),
            step_in_epoch=int(ckpt["step_in_epoch"]),
            perm=ckpt["perm"],
            best_miou=ckpt["best_miou"],
            elapsed_s=float(ckpt["elapsed_s"]),
        )


def save_checkpoint(
    path: Path,
    *,
    state: TrainState,
    model_name: str,
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> None:
    """Write `last.pt` atomically: a crash mid-write leaves the previous checkpoint intact."""
    ckpt = {
        "version": CHECKPOINT_VERSION,
        "model_name": model_name,
        "config": config,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        **state.to_dict(),
        "rng": rng_state(),
    }
    ckpt["digest"] = digest(ckpt)  # torch.load does not check the zip's CRCs: flipped bytes would load
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint in the current layout (older ones migrated); a damaged one is a one-line UserError."""
    from pixelwise.weights import load_checkpoint

    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise UserError(
            f"{path}: not a pixelwise checkpoint (a {type(ckpt).__name__}); resume from another one or start again"
        )
    if "digest" in ckpt and ckpt["digest"] != digest(ckpt):  # checkpoints before the digest have none
        raise UserError(
            f"{path}: damaged: its contents do not match the checksum written with them; resume from an "
            "earlier checkpoint or start again"
        )
    ckpt = migrate_checkpoint(ckpt)
    missing = [k for k in _REQUIRED if k not in ckpt]
    if ckpt.get("version") != CHECKPOINT_VERSION or missing:
        raise UserError(
            f"{path}: not a pixelwise checkpoint of version {CHECKPOINT_VERSION} (version "
            f"{ckpt.get('version')!r}, missing {', '.join(missing) or 'nothing'}); start again"
        )
    if not all(isinstance(ckpt[k], int) and not isinstance(ckpt[k], bool) for k in ("epoch", "step", "step_in_epoch")):
        raise UserError(f"{path}: epoch/step entries are not integers; the checkpoint is damaged, start again")
    return ckpt


def digest(ckpt: dict[str, Any]) -> str:
    """blake2b of everything in a checkpoint but its "digest" entry: tensors by dtype, shape and bytes,
    other values by their repr, in a fixed order (dict keys sorted)."""
    h = hashlib.blake2b(digest_size=16)

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            h.update(b"{")
            for key in sorted(value, key=repr):
                if value is not ckpt or key != "digest":
                    h.update(repr(key).encode())
                    feed(value[key])
            h.update(b"}")
        elif isinstance(value, list | tuple):
            h.update(b"[")
            for item in value:
                feed(item)
            h.update(b"]")
        else:
            h.update(repr(value).encode())

    feed(ckpt)
    return h.hexdigest()


def migrate_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: drop the never-read "scheduler" entry; an absent elapsed_s (written before it was
    kept) counts as 0 s."""
    if ckpt.get("version") == 1:
        ckpt = {k: v for k, v in ckpt.items() if k != "scheduler"}
        ckpt.setdefault("elapsed_s", 0.0)
        ckpt["version"] = 2
    return ckpt


def align_optimizer_state(
    saved: dict[str, Any], saved_keys: list[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """`saved` (an optimiser's state dict) with each group's parameters listed in `model`'s current order.

    An optimiser lists its parameters by position. A checkpoint written before the model's modules were
    regrouped (its keys `saved_keys`, in the order the model registered them then, renamed to today's
    names by the model's OLD_KEYS) lists them in the old order, e.g. FCN-8s's upscore2 before its
    score_pool3. A checkpoint of the current layout comes back unchanged, and one that does not fit
    (other groups, another model) is left for `optimizer.load_state_dict` to refuse.
    """
    from pixelwise.models.anatomy import current_keys

    position = {key: i for i, key in enumerate(current_keys(model, saved_keys))}
    name_of = {id(p): name for name, p in model.named_parameters()}
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        return saved
    groups = []
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        names = [name_of[id(p)] for p in group["params"]]
        if len(names) != len(saved_group["params"]) or any(n not in position for n in names):
            return saved
        saved_id = dict(zip(sorted(names, key=position.__getitem__), saved_group["params"], strict=True))
        groups.append({**saved_group, "params": [saved_id[n] for n in names]})
    return {**saved, "param_groups": groups}


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, ints and lists (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
