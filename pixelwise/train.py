"""`pixelwise train CONFIG.yaml`: the training loop, one readable function from data to report.

A run writes into `output.dir`:
    config.yaml        the resolved configuration
    last.pt            checkpoint (model, optimiser, scaler, data order, RNG states), atomic
    best.safetensors   the weights with the best validation mIoU, with metadata for predict/evaluate/serve
    metrics.jsonl      one line per logged step and per validation
    metrics.json       the final validation of the best weights
    report.html        curves, confusion matrix, per-class IoU and example predictions (+ PNGs)

`--resume` continues from last.pt exactly where it stopped, mid-epoch included: the sample order of an
epoch is stored, every sample is augmented with a seed fixed by (seed, epoch, index), and the RNG
states are restored, so an interrupted and resumed run equals an uninterrupted one (bit-exactly on
CPU with train.deterministic).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from pixelwise import distributed
from pixelwise.config import Config, config_to_dict, load_config
from pixelwise.errors import UserError
from pixelwise.fileio import atomic_path, atomic_write_text, remove_stale_temporaries
from pixelwise.inference import resolve_device
from pixelwise.losses import build_loss
from pixelwise.precision import precision_name

CHECKPOINT_VERSION = 1  # bump when the checkpoint layout changes


def train_command(args: argparse.Namespace) -> int:
    """`pixelwise train CONFIG [--set k=v ...] [--resume]`."""
    cfg = load_config(args.config, args.overrides)
    with distributed.launched(cfg.train.device):  # DDP: the process group torchrun asked for, if any
        result = train(cfg, resume=args.resume)
        if not distributed.is_main():  # DDP: rank 0 reports for the run
            return 130 if result["interrupted"] else 0
    if result["interrupted"]:
        sets = [x for o in args.overrides for x in ("--set", o)]
        print(f"stopped at step {result['step']}; continue with: "
              f"{shlex.join(['pixelwise', 'train', args.config, *sets, '--resume'])}")
        return 130
    val = result.get("metrics") or {}
    miou = f", val mIoU {val['miou']:.4f}" if "miou" in val else ""
    print(f"done: {result['step']} steps{miou}; weights {Path(cfg.output.dir) / 'best.safetensors'}")
    return 0


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False,
          stop_at_step: int | None = None) -> dict[str, Any]:
    """Train as `cfg` says; with `model.stages`, train each stage in turn, each initialised from the last.

    Args:
        resume: continue from `output.dir/last.pt` (each stage from its own folder).
        overwrite: start afresh even if `output.dir` holds a checkpoint of an earlier run.
        stop_at_step: stop after this optimiser step as an interruption would (checkpoint, then return);
            used to split a run for time limits and by the resume tests.

    Returns:
        {"interrupted": bool, "step": int, "epoch": int, "best_miou": float | None,
         "metrics": final validation metrics or None, "out_dir": str}
    """
    out = Path(cfg.output.dir)
    _check_writable(out)
    if not cfg.model.stages:
        return _train_model(cfg, out, cfg.model.name, init_from=None, resume=resume, overwrite=overwrite,
                            stop_at_step=stop_at_step)
    previous: Path | None = None
    result: dict[str, Any] = {}
    for stage in cfg.model.stages:
        stage_dir = out / stage
        finished = resume and _finished(stage_dir, needs_metrics=bool(cfg.data.val_split))
        if not finished:
            result = _train_model(cfg, stage_dir, stage, init_from=previous,
                                  resume=resume and (stage_dir / "last.pt").exists(),
                                  overwrite=overwrite, stop_at_step=stop_at_step)
            if result["interrupted"]:
                return result
        previous = stage_dir / "best.safetensors"
    last = out / cfg.model.stages[-1]
    if _is_main():  # the run's deliverable sits at the top of output.dir, as for a single model
        for name in ("best.safetensors", "metrics.json"):
            if (last / name).exists():  # no metrics.json without a validation split
                with atomic_path(out / name) as tmp:
                    tmp.write_bytes((last / name).read_bytes())
    if not result:  # every stage had finished before this --resume
        metrics = json.loads((last / "metrics.json").read_text())["val"] if (last / "metrics.json").exists() else None
        result = {"interrupted": False, "step": 0, "epoch": cfg.train.epochs, "best_miou": None, "metrics": metrics}
    return result | {"out_dir": str(out)}


def _train_model(cfg: Config, out: Path, model_name: str, *, init_from: Path | None, resume: bool,
                 overwrite: bool, stop_at_step: int | None) -> dict[str, Any]:
    """Train one model into `out`: the loop itself."""
    from pixelwise.models import get_model
    from pixelwise.weights import load_checkpoint, load_weights, save_weights

    tc, dc = cfg.train, cfg.data
    # DDP: local_device picks the GPU of this process's LOCAL_RANK
    device = distributed.local_device(resolve_device(tc.device, "train.device"))
    amp_dtype = _amp_dtype(tc.amp, device)
    precision = precision_name(amp_dtype)  # recorded in metrics.jsonl, metrics.json, the report and the weights
    is_main = _is_main()
    ckpt_path = out / "last.pt"
    if not resume and ckpt_path.exists() and not overwrite:
        raise UserError(f"output.dir={out} holds a checkpoint of an earlier run; continue it with --resume "
                        "or choose another folder with --set output.dir=...")
    if resume and not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint {ckpt_path}; start without --resume or point output.dir "
                        "at the folder of the run to continue")
    _check_writable(out)
    if is_main:
        remove_stale_temporaries(out)  # half-written files of an earlier run that was killed mid-write
    restore_determinism = _seed_everything(tc.seed, tc.deterministic)
    try:
        # ---- data ------------------------------------------------------------------------------
        train_set, val_set, info = _datasets(cfg)
        num_classes = info["num_classes"]
        n_train = len(train_set)
        micro_bs = dc.batch_size
        world = distributed.world_size()  # DDP: each process takes data.batch_size per micro-step
        steps_per_epoch = n_train // (micro_bs * tc.grad_accum * world)  # optimiser steps; a ragged tail is dropped
        if steps_per_epoch == 0:
            raise UserError(f"data: {n_train} training images are fewer than one step of "
                            f"data.batch_size={micro_bs} x train.grad_accum={tc.grad_accum} x {world} process(es); "
                            "lower them")
        total_steps = steps_per_epoch * tc.epochs

        # ---- model, loss, optimiser ------------------------------------------------------------
        model_kwargs = dict(cfg.model.kwargs)
        build_kwargs = dict(model_kwargs)
        if init_from is not None:  # a later FCN stage: start from the previous stage's best weights
            build_kwargs.pop("weights_backbone", None)  # the previous stage already carries them
            build_kwargs["init_from"] = load_weights(init_from)[0]
        model = get_model(model_name, num_classes=num_classes, **build_kwargs).to(device)
        memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        # DDP: `train_model` averages gradients over processes; `model` (its module) is saved and evaluated
        if tc.sync_bn and world > 1:
            if device.type != "cuda":
                raise UserError("train.sync_bn=true needs CUDA devices (SyncBatchNorm does not run on CPU); "
                                "set train.sync_bn=false for CPU runs")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = model if world == 1 else nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        class_weights = _class_weights(cfg, train_set, num_classes)
        loss_fn = build_loss(cfg.loss, class_weights=class_weights, ignore_index=info["ignore_index"]).to(device)
        optimizer = _optimizer(cfg, model)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        def lr_at(step: int) -> float:
            """Linear warm-up, then poly decay (power 0.9 in DeepLab) or constant."""
            if step < tc.warmup_steps:
                return tc.lr * (step + 1) / tc.warmup_steps
            if tc.schedule == "poly":
                return tc.lr * (1 - step / total_steps) ** tc.poly_power
            if tc.schedule == "step":
                return tc.lr * tc.step_gamma ** (step // tc.step_every)
            return tc.lr

        # ---- state, or the checkpoint's state on --resume ----------------------------------------
        epoch, step, step_in_epoch, perm = 0, 0, 0, None
        best_miou: float | None = None
        elapsed_before = 0.0  # wall seconds of the run before this process (resumed runs add up)
        if resume:
            ckpt = load_checkpoint(ckpt_path)
            if ckpt.get("version") != CHECKPOINT_VERSION or ckpt.get("model_name") != model_name:
                raise UserError(f"{ckpt_path}: a checkpoint of model {ckpt.get('model_name')!r} "
                                f"(version {ckpt.get('version')}), not {model_name!r}; resume with its own config")
            try:
                model.load_state_dict(ckpt["model"])
            except RuntimeError as e:
                raise UserError(f"{ckpt_path}: the weights do not fit this config's model ({str(e)[:200]}); "
                                "resume with the config the run started with") from None
            mults = [group["lr_mult"] for group in optimizer.param_groups]
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except ValueError as e:  # other parameter groups: the lr/decay multipliers changed since
                raise UserError(f"{ckpt_path}: the optimiser state does not fit this config ({e}); resume with "
                                "the train.* settings the run started with") from None
            for group, mult in zip(optimizer.param_groups, mults, strict=True):
                group["lr_mult"] = mult  # the config's rate factors (checkpoints before them had none)
            scaler.load_state_dict(ckpt["scaler"])
            epoch, step, step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
            perm, best_miou = ckpt["perm"], ckpt["best_miou"]
            elapsed_before = ckpt.get("elapsed_s", 0.0)  # absent in checkpoints written before it was kept
            _set_rng_state(ckpt["rng"])
            _truncate_log(out / "metrics.jsonl", step=step, epoch=epoch, is_main=is_main)
            print(f"resumed {ckpt_path} at epoch {epoch + 1}, step {step}")
        elif is_main:
            (out / "metrics.jsonl").unlink(missing_ok=True)
            atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

        def save_checkpoint() -> None:
            if not is_main:
                return
            state = {
                "version": CHECKPOINT_VERSION, "model_name": model_name, "config": config_to_dict(cfg),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": {"schedule": tc.schedule, "step": step},  # the lr is a function of the step
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "step_in_epoch": step_in_epoch,
                "perm": perm, "best_miou": best_miou, "rng": _rng_state(), "elapsed_s": elapsed(),
            }
            with atomic_path(ckpt_path) as tmp:
                torch.save(state, tmp)

        started = time.perf_counter()

        def elapsed() -> float:
            """Wall seconds of the whole run so far, across resumes."""
            return elapsed_before + time.perf_counter() - started

        def log(record: dict[str, Any]) -> None:
            record["elapsed_s"] = round(elapsed(), 1)
            if is_main:
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")

        def save_best(miou: float | None) -> None:
            if is_main:
                save_weights(out / "best.safetensors", model, model_name=model_name, model_kwargs=model_kwargs,
                             classes=info["classes"], palette=info["palette"], mean=tuple(dc.mean),
                             std=tuple(dc.std), ignore_index=info["ignore_index"],
                             extra={"epoch": epoch, "step": step, "val_miou": miou, "crop_size": dc.crop_size,
                                    "precision": precision})

        # ---- the loop ------------------------------------------------------------------------------
        stop = _StopRequest()
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        interrupted = False
        with stop.installed():
            while epoch < tc.epochs and not interrupted:
                if perm is None or step_in_epoch == 0:  # a fresh epoch: its order comes from (seed, epoch)
                    g = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
                    perm = torch.randperm(n_train, generator=g)[: steps_per_epoch * micro_bs * tc.grad_accum * world]
                todo = perm[step_in_epoch * micro_bs * tc.grad_accum * world:].tolist()
                samples = _SeededSamples(train_set, todo, seed=(tc.seed * 100_003 + epoch) * 1_000_003)
                # DDP: process r takes todo[r::world], so a step sees the same images as one process would
                sampler = (DistributedSampler(samples, num_replicas=world, rank=distributed.rank(), shuffle=False,
                                              drop_last=True) if world > 1 else None)
                loader = DataLoader(
                    samples, sampler=sampler,
                    batch_size=micro_bs, shuffle=False, drop_last=True, num_workers=dc.workers,
                    pin_memory=device.type == "cuda", worker_init_fn=_ignore_sigint,
                    generator=torch.Generator().manual_seed(tc.seed),  # keeps the global RNG untouched
                )
                model.train()
                bar = _progress(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{tc.epochs}",
                                enabled=cfg.output.progress and is_main)
                t_log, images_since, loss_sum, micro, seen = time.perf_counter(), 0, 0.0, 0, 0
                for images, targets in loader:
                    images = images.to(device, non_blocking=True, memory_format=memory_format)
                    targets = targets.to(device, non_blocking=True)
                    accumulating = world > 1 and micro + 1 < tc.grad_accum  # DDP: all-reduce on the last micro-step
                    with train_model.no_sync() if accumulating else contextlib.nullcontext(), autocast:
                        outputs = train_model(images)  # (B, K, H, W), or (main, aux) for models built with aux=True
                    if isinstance(outputs, tuple):
                        main_out, aux_out = outputs
                        loss = loss_fn(main_out.float(), targets)
                        loss = loss + cfg.loss.aux_weight * loss_fn(aux_out.float(), targets)
                    else:
                        loss = loss_fn(outputs.float(), targets)
                    loss = loss / tc.grad_accum
                    loss_value = loss.item() * tc.grad_accum
                    if not math.isfinite(loss_value):
                        raise UserError(
                            f"loss is {loss_value} at step {step + 1} (epoch {epoch + 1}, batch of data set indices "
                            f"{todo[seen:seen + micro_bs]}); training stopped and {ckpt_path} still holds the last "
                            "good state: lower train.lr, set train.grad_clip or check those images")
                    scaler.scale(loss).backward()
                    loss_sum += loss_value
                    micro += 1
                    seen += images.shape[0]
                    images_since += images.shape[0]
                    if micro < tc.grad_accum:
                        continue

                    lr = lr_at(step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group["lr_mult"]
                    if tc.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    step_in_epoch += 1
                    step_loss, loss_sum, micro = loss_sum / tc.grad_accum, 0.0, 0

                    bar.update(1)
                    if step % cfg.output.log_every_steps == 0 or step_in_epoch == steps_per_epoch:
                        now = time.perf_counter()
                        speed = images_since / max(now - t_log, 1e-9)
                        t_log, images_since = now, 0
                        log({"kind": "train", "epoch": epoch + 1, "step": step, "loss": step_loss, "lr": lr,
                             "images_per_s": speed, "precision": precision})
                        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
                    if distributed.any_true(bool(stop.signal) or step == stop_at_step, device):  # DDP: all ranks stop
                        interrupted = True
                        break
                    if cfg.output.checkpoint_every_steps and step % cfg.output.checkpoint_every_steps == 0:
                        save_checkpoint()
                bar.close()
                if interrupted:
                    save_checkpoint()
                    why = f"{stop.signal} received" if stop.signal else f"stop_at_step={stop_at_step} reached"
                    print(f"{why}: wrote {ckpt_path} at epoch {epoch + 1}, step {step}; continue with --resume")
                    break

                # ---- end of epoch: validate, keep the best, checkpoint ------------------------------
                epoch += 1
                step_in_epoch = 0
                every = cfg.eval.every_epochs
                if val_set is not None and every and (epoch % every == 0 or epoch == tc.epochs):
                    cm, _ = evaluate(model, val_set, num_classes=num_classes, device=device, cfg=cfg,
                                     amp_dtype=amp_dtype, ignore_index=info["ignore_index"], shard=True)
                    scores = cm.compute()
                    miou = float(scores["miou"])
                    log({"kind": "val", "epoch": epoch, "step": step, "miou": miou,
                         "pixel_acc": float(scores["pixel_acc"]), "mean_acc": float(scores["mean_acc"])})
                    if is_main:
                        print(f"epoch {epoch}: val mIoU {miou:.4f} (pixel acc {float(scores['pixel_acc']):.4f})")
                    if best_miou is None or miou > best_miou:
                        best_miou = miou
                        save_best(miou)
                elif val_set is None or not every:
                    save_best(None)  # no validation: the latest weights are the deliverable
                save_checkpoint()

        distributed.barrier()  # DDP: rank 0's checkpoint and weights are on disk before any rank moves on
        result = {"interrupted": interrupted, "step": step, "epoch": epoch, "best_miou": best_miou,
                  "metrics": None, "out_dir": str(out)}
        if interrupted or not is_main:
            return result

        # ---- final: score the best weights (with the CRF if asked), metrics.json, report -----------
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(out / "best.safetensors"), device=str(device)))
        if val_set is None:
            return result
        cm, samples = evaluate(model, val_set, num_classes=num_classes, device=device, cfg=cfg,
                               amp_dtype=amp_dtype, ignore_index=info["ignore_index"], use_crf=cfg.crf.enabled,
                               keep_samples=cfg.output.report_images if cfg.output.report else 0)
        scores = _plain(cm.compute())
        scores["per_class_iou"] = dict(zip(info["classes"], scores["per_class_iou"], strict=True))
        final = {"model": model_name, "dataset": dc.dataset, "split": dc.val_split, "steps": step,
                 "epochs": epoch, "crf": cfg.crf.enabled, "precision": precision, "val": scores}
        atomic_write_text(out / "metrics.json", json.dumps(final, indent=2) + "\n")
        if cfg.output.report:
            from pixelwise.report import write_report

            history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
            write_report(out, history=history, confusion=cm.mat.cpu().numpy(), classes=info["classes"],
                         palette=info["palette"], samples=samples, ignore_index=info["ignore_index"],
                         title=f"{model_name} on {dc.dataset}",
                         summary={"model": model_name, "data set": dc.dataset, "epochs": epoch, "steps": step,
                                  "val mIoU": scores["miou"], "pixel accuracy": scores["pixel_acc"],
                                  "mean accuracy": scores["mean_acc"], "CRF": cfg.crf.enabled,
                                  "precision": precision})
        return result | {"metrics": scores}
    finally:
        restore_determinism()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, num_classes: int, device: torch.device, cfg: Config,
             amp_dtype: torch.dtype | None = None, ignore_index: int = 255, use_crf: bool = False,
             keep_samples: int = 0, shard: bool = False) -> tuple[Any, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Score `model` on `dataset` (normalised image, mask pairs); return the ConfusionMatrix and up to
    `keep_samples` (image uint8 (H, W, 3), ground truth (H, W), prediction (H, W)) triples.

    With `shard` under DDP, every process scores every world_size-th image and the confusion matrices
    are summed over processes (all of them must call this)."""
    from pixelwise.inference import predict_logits
    from pixelwise.metrics import ConfusionMatrix

    ec, dc = cfg.eval, cfg.data
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    mean = torch.tensor(dc.mean).view(3, 1, 1)
    std = torch.tensor(dc.std).view(3, 1, 1)
    # slide: the training crop unless eval.window says otherwise; multiscale slides only when told to
    window = tuple(ec.window) if ec.window else (tuple(dc.crop_size) if ec.mode == "slide" else None)
    samples = []
    if shard and distributed.world_size() > 1:
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = DataLoader(dataset, batch_size=ec.batch_size, shuffle=False, num_workers=dc.workers)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    for images, targets in loader:
        images = images.to(device)
        with autocast:
            logits = predict_logits(model, images, mode=ec.mode, window=window, scales=tuple(ec.scales),
                                    stride=tuple(ec.stride) if ec.stride else None, flip=ec.flip)
        logits = logits.float()  # (B, K, H, W)
        if use_crf:  # DeepLab v1/v2: refine the probabilities with the dense CRF on the RGB image
            from pixelwise.crf import crf_kwargs, dense_crf

            rgb = torch.stack([torch.from_numpy(_to_uint8(img, mean, std)).permute(2, 0, 1)
                               for img in images.cpu()])  # (B, 3, H, W) uint8
            probs = dense_crf(logits.softmax(1).cpu(), rgb,
                              **crf_kwargs(cfg.crf.preset, iterations=cfg.crf.iterations))  # (B, K, H, W)
            pred = probs.argmax(1)
        else:
            pred = logits.argmax(1).cpu()
        cm.update(pred, targets)
        for img, gt, p in zip(images.cpu(), targets, pred, strict=True):
            if len(samples) < keep_samples:
                samples.append((_to_uint8(img, mean, std), gt.numpy(), p.numpy()))
    if shard:
        cm.all_reduce()  # DDP: the scores of the whole data set on every process
    return cm, samples


# ---- helpers: a few lines each ---------------------------------------------------------------------


class _SeededSamples(Dataset):
    """`dataset[indices[j]]`, each augmented under RNGs seeded by (epoch seed, index): the same sample
    gets the same augmentation whatever the worker count and whether the run was resumed."""

    def __init__(self, dataset: Dataset, indices: list[int], *, seed: int) -> None:
        self.dataset, self.indices, self.seed = dataset, indices, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> Any:
        i = self.indices[j]
        with _seeded((self.seed + i) % 2**63):
            return self.dataset[i]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
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


def _ignore_sigint(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which stops cleanly after the current step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StopRequest:
    """SIGINT/SIGTERM set `signal`; the loop finishes its step, checkpoints and returns. A second one aborts."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing the current step, then writing a checkpoint (send again to abort)",
              flush=True)

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


def _is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype train.amp asks for on `device` (None = fp32), refused where it would be emulated."""
    from pixelwise.precision import PrecisionError, resolve_precision

    try:
        return resolve_precision(amp, device)
    except PrecisionError as e:
        raise UserError(f"train.amp={amp}: {e}") from None


def _seed_everything(seed: int, deterministic: bool) -> Any:
    """Seed torch/numpy/python; in deterministic mode also pick deterministic kernels. Returns an undo."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
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


def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, ints and lists (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _check_writable(out: Path) -> None:
    """Fail before any training when output.dir cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output.dir={out}: cannot write there ({e.strerror or e}); "
                        "choose another folder with --set output.dir=PATH") from None


def _finished(out: Path, needs_metrics: bool) -> bool:
    """Whether `out` holds a run that completed: checkpoint at the last epoch, weights, final metrics if due."""
    from pixelwise.weights import load_checkpoint

    if not (out / "last.pt").exists() or not (out / "best.safetensors").exists():
        return False
    ckpt = load_checkpoint(out / "last.pt")
    done = ckpt["epoch"] >= ckpt["config"]["train"]["epochs"]
    return done and (not needs_metrics or (out / "metrics.json").exists())


def _truncate_log(path: Path, *, step: int, epoch: int, is_main: bool) -> None:
    """On resume, drop log lines written after the checkpoint (at `step`, `epoch` epochs done) so the
    log reads as one run."""
    if not is_main or not path.exists():
        return
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line torn by a crash or power cut mid-write was never a step of the run
            continue
    lines = [json.dumps(r) for r in records
             if (r["kind"] == "train" and r["step"] <= step) or (r["kind"] == "val" and r["epoch"] <= epoch)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _progress(*, total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _to_uint8(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) -> displayable (H, W, 3) uint8."""
    rgb = (image.float() * std + mean).clamp(0, 1) * 255
    return rgb.round().byte().permute(1, 2, 0).numpy()  # (H, W, 3)


def _plain(value: Any) -> Any:
    """Tensors/arrays/numpy scalars -> JSON-ready Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None  # JSON has no NaN: a class absent from both prediction and ground truth
    return value




def _datasets(cfg: Config) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """The train split with training augmentation, the val split (or None) with eval transforms, and
    the data set's classes/palette/ignore index."""
    from pixelwise.data import build_dataset
    from pixelwise.data.transforms import eval_transforms, train_transforms

    dc = cfg.data
    if dc.dataset != "synthetic" and not Path(dc.root).is_dir():  # e.g. a built-in config run outside a clone
        raise UserError(f"data.root={dc.root!r}: no such folder; give the {dc.dataset} data set's folder "
                        "with --set data.root=PATH")
    scale_range = None if dc.scale_range == [1.0, 1.0] else tuple(dc.scale_range)
    train_tf = train_transforms(crop_size=tuple(dc.crop_size), scale_range=scale_range, flip=dc.flip,
                                rotation=dc.rotation, color_jitter=dc.color_jitter, elastic=dc.elastic,
                                mean=tuple(dc.mean), std=tuple(dc.std))
    eval_tf = eval_transforms(mean=tuple(dc.mean), std=tuple(dc.std))
    train_set = build_dataset(dc.dataset, dc.root, dc.train_split, transforms=train_tf, **dc.kwargs)
    info = {"classes": list(train_set.classes), "palette": [tuple(c) for c in train_set.palette],
            "ignore_index": int(train_set.ignore_index), "num_classes": int(train_set.num_classes)}
    val_set = None
    if dc.val_split:
        val_set = build_dataset(dc.dataset, dc.root, dc.val_split, transforms=eval_tf, **dc.kwargs)
    train_used = range(min(dc.max_train_images or len(train_set), len(train_set)))
    if dc.cache_mb > 0 and hasattr(train_set, "cache_decoded"):  # before the loaders fork: shared, decoded once
        cached = train_set.cache_decoded(dc.cache_mb * 2**20, indices=train_used)
        if cached < len(train_used):
            print(f"data.cache_mb={dc.cache_mb}: {cached} of {len(train_used)} training images fit in memory; "
                  "the rest are decoded every epoch")
    if dc.max_train_images:
        train_set = Subset(train_set, train_used)
    if val_set is not None and dc.max_val_images:
        val_set = Subset(val_set, range(min(dc.max_val_images, len(val_set))))
    return train_set, val_set, info


def _class_weights(cfg: Config, train_set: Dataset, num_classes: int) -> torch.Tensor | None:
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


def _optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (the papers) or AdamW, with the Caffe solvers' per-parameter rates.

    The classifier head (`model.classifier_layers()`) learns at train.head_lr_mult x the rate, biases at
    train.bias_lr_mult x (multiplied for the head's biases: DeepLab's fc8 gets 10x / 20x); biases decay
    only with train.bias_weight_decay, norm layers never. Groups with equal settings are merged, so with
    the defaults there are two: decayed weights and the rest. Each group's `lr_mult` scales the schedule.
    """
    tc = cfg.train
    head = {id(p) for layer in _classifier_layers(model) for p in layer.parameters()}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = name.endswith("bias")
        mult = (tc.head_lr_mult if id(p) in head else 1.0) * (tc.bias_lr_mult if is_bias else 1.0)
        decays = p.ndim > 1 or (is_bias and tc.bias_weight_decay)
        groups.setdefault((mult, tc.weight_decay if decays else 0.0), []).append(p)
    param_groups = [{"params": ps, "weight_decay": wd, "lr_mult": mult, "lr": tc.lr * mult}
                    for (mult, wd), ps in groups.items()]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=tc.lr, momentum=tc.momentum)
    return torch.optim.AdamW(param_groups, lr=tc.lr)


def _classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers to class scores; none for a model that does not name them (e.g. a user's own)."""
    layers = getattr(model, "classifier_layers", None)
    return layers() if layers is not None else []
