"""The training loop's parts that are not the loop: data, optimiser, schedule, seeding, signals, files.

Each is a few lines with one job, so that `pixelwise.engine.training` reads as the loop itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from pixelwise.config import Config, TrainConfig
from pixelwise.errors import UserError, translated
from pixelwise.fileio import atomic_write_text

SCHEDULES = ("poly", "constant", "step")  # train.schedule: see learning_rate


def learning_rate(tc: TrainConfig, step: int, total_steps: int) -> float:
    """The base rate at `step`: linear warm-up, then poly decay (power 0.9 in DeepLab), steps or constant."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "poly":
        return tc.lr * (1 - step / total_steps) ** tc.poly_power
    if tc.schedule == "step":
        return tc.lr * tc.step_gamma ** (step // tc.step_every)
    return tc.lr


class SeededSamples(Dataset):
    """`dataset[indices[j]]`, each augmented under RNGs seeded by (epoch seed, index): the same sample
    gets the same augmentation whatever the worker count and whether the run was resumed."""

    def __init__(self, dataset: Dataset, indices: list[int], *, seed: int) -> None:
        self.dataset, self.indices, self.seed = dataset, indices, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> Any:
        i = self.indices[j]
        with seeded((self.seed + i) % 2**63):
            return self.dataset[i]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under torch/numpy/python RNGs seeded with `seed`, then restore the previous states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def ignore_sigint(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which stops cleanly after the current step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """SIGINT/SIGTERM set `signal`; the loop finishes its step, checkpoints and returns. A second one aborts."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(
            f"\n{self.signal}: finishing the current step, then writing a checkpoint (send again to abort)", flush=True
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def seed_everything(seed: int, deterministic: bool) -> Any:
    """Seed torch/numpy/python; in deterministic mode also pick deterministic kernels. Returns an undo."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not fail, for ops without one
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick the fastest kernels

    def undo() -> None:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]

    return undo


def check_writable(out: Path) -> None:
    """Fail before any training when output.dir cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"output.dir={out}: cannot write there ({e.strerror or e}); "
            "choose another folder with --set output.dir=PATH"
        ) from None


def truncate_log(path: Path, *, step: int, epoch: int) -> None:
    """On resume, drop log lines written after the checkpoint (at `step`, `epoch` epochs done) so the
    log reads as one run."""
    if not is_main() or not path.exists():
        return
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line torn by a crash or power cut mid-write was never a step of the run
            continue
    lines = [
        json.dumps(r)
        for r in records
        if (r["kind"] == "train" and r["step"] <= step) or (r["kind"] == "val" and r["epoch"] <= epoch)
    ]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def build_datasets(cfg: Config) -> dict[str, Any]:
    """{"train": the train split with training augmentation, "val": the val split as uint8 images (or
    None), and the data set's "classes", "palette", "ignore_index", "num_classes"}."""
    from pixelwise.data import build_dataset, raw_transforms
    from pixelwise.data.transforms import train_transforms

    dc = cfg.data
    if dc.dataset != "synthetic" and not Path(dc.root).is_dir():  # e.g. a built-in config run outside a clone
        raise UserError(
            f"data.root={dc.root!r}: no such folder; give the {dc.dataset} data set's folder with --set data.root=PATH"
        )
    scale_range = None if dc.scale_range == [1.0, 1.0] else tuple(dc.scale_range)
    train_tf = train_transforms(
        crop_size=tuple(dc.crop_size),
        scale_range=scale_range,
        flip=dc.flip,
        rotation=dc.rotation,
        color_jitter=dc.color_jitter,
        elastic=dc.elastic,
        mean=tuple(dc.mean),
        std=tuple(dc.std),
    )
    with translated({"name": "data.dataset", "kwargs": "data.kwargs"}):
        train_set = build_dataset(dc.dataset, dc.root, dc.train_split, transforms=train_tf, **dc.kwargs)
        val_set = (
            build_dataset(dc.dataset, dc.root, dc.val_split, transforms=raw_transforms(), **dc.kwargs)
            if dc.val_split
            else None
        )
    info = {
        "classes": list(train_set.classes),
        "palette": [tuple(c) for c in train_set.palette],
        "ignore_index": int(train_set.ignore_index),
        "num_classes": int(train_set.num_classes),
    }
    train_used = range(min(dc.max_train_images or len(train_set), len(train_set)))
    if dc.cache_mb > 0 and hasattr(train_set, "cache_decoded"):  # before the loaders fork: shared, decoded once
        cached = train_set.cache_decoded(dc.cache_mb * 2**20, indices=train_used)
        if cached < len(train_used):
            print(
                f"data.cache_mb={dc.cache_mb}: {cached} of {len(train_used)} training images fit in memory; "
                "the rest are decoded every epoch"
            )
    if dc.max_train_images:
        train_set = Subset(train_set, train_used)
    if val_set is not None and dc.max_val_images:
        val_set = Subset(val_set, range(min(dc.max_val_images, len(val_set))))
    return {"train": train_set, "val": val_set, **info}


def class_weights(cfg: Config, train_set: Dataset, num_classes: int) -> torch.Tensor | None:
    cw = cfg.loss.class_weights
    if cw == "none":
        return None
    if cw == "median_frequency":
        from pixelwise.data.stats import median_frequency_weights

        if isinstance(train_set, Subset):  # count the masks of the subset only, without augmentation
            weights = median_frequency_weights(train_set.dataset, indices=train_set.indices)
        else:
            weights = median_frequency_weights(train_set)
        print("median-frequency class weights: " + ", ".join(f"{w:.4f}" for w in weights.tolist()))
        return weights
    if len(cw) != num_classes:
        raise UserError(f"loss.class_weights lists {len(cw)} weights for {num_classes} classes; give one per class")
    return torch.tensor(cw, dtype=torch.float32)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (the papers) or AdamW, with per-part and the Caffe solvers' per-parameter rates.

    The parts are the model's anatomy (`pixelwise.models`): the encoder learns at train.encoder_lr_mult x
    the rate, or not at all with train.freeze_encoder (`freeze_encoder`); the head (the layers to class
    scores) at train.head_lr_mult x; the decoder at the rate. Biases learn at train.bias_lr_mult x on top
    (DeepLab's fc8: 10x / 20x) and decay only with train.bias_weight_decay; norm layers never decay.
    Groups with equal settings are merged, so with the defaults there are two: decayed weights and the
    rest. Each group's `lr_mult` scales the schedule. A model without an anatomy (a user's own) learns at
    the rate everywhere.
    """
    tc = cfg.train
    freeze_encoder(cfg, model)
    part_mult = _part_lr_mults(cfg, model)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = name.endswith("bias")
        mult = part_mult.get(id(p), 1.0) * (tc.bias_lr_mult if is_bias else 1.0)
        decays = p.ndim > 1 or (is_bias and tc.bias_weight_decay)
        groups.setdefault((mult, tc.weight_decay if decays else 0.0), []).append(p)
    param_groups = [
        {"params": ps, "weight_decay": wd, "lr_mult": mult, "lr": tc.lr * mult} for (mult, wd), ps in groups.items()
    ]
    return OPTIMIZERS[tc.optimizer](param_groups, tc)


def freeze_encoder(cfg: Config, model: nn.Module) -> None:
    """train.freeze_encoder: the encoder's parameters stop learning (requires_grad False, so no gradients
    are computed for them and `build_optimizer` leaves them out). Call it before DDP wraps the model: DDP
    reduces the gradients of the parameters that require them when it is built. The encoder's BatchNorm
    running statistics are buffers, not parameters: they still follow the data in training mode."""
    if not cfg.train.freeze_encoder:
        return
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise UserError(
            f"train.freeze_encoder=true: the model ({type(model).__name__}) has no encoder to freeze; "
            "set train.freeze_encoder=false"
        )
    encoder.requires_grad_(False)


def _part_lr_mults(cfg: Config, model: nn.Module) -> dict[int, float]:
    """id(parameter) -> the rate factor of its part: the encoder's or the head's (the decoder's is 1)."""
    mults: dict[int, float] = {}
    for part, mult in (("encoder", cfg.train.encoder_lr_mult), ("head", cfg.train.head_lr_mult)):
        module = getattr(model, part, None)
        if isinstance(module, nn.Module):
            mults.update({id(p): mult for p in module.parameters()})
    return mults


# train.optimizer -> the optimiser over parameter groups: SGD with momentum (the papers) or AdamW
def fused(optimizer: type[torch.optim.Optimizer], groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    """`optimizer(groups, fused=True, **kwargs)` where this torch has a fused kernel for the parameters'
    device and dtype, else torch's default. The fused step updates every tensor in one kernel instead of
    a Python loop over them: AdamW on the 31 M-parameter U-Net, 202 -> 36 ms of CPU a step on one core
    (benchmarks/optimizer_step.py). Older torch versions lack some CPU kernels (TypeError or RuntimeError)."""
    try:
        return optimizer(groups, fused=True, **kwargs)
    except (TypeError, RuntimeError, ValueError):  # no fused kernel here: the for-loop step
        return optimizer(groups, **kwargs)


OPTIMIZERS: dict[str, Any] = {
    "sgd": lambda groups, tc: fused(torch.optim.SGD, groups, lr=tc.lr, momentum=tc.momentum),
    "adamw": lambda groups, tc: fused(torch.optim.AdamW, groups, lr=tc.lr),
}
