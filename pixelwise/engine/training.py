"""The training loop, in the order it runs: build the run, train epochs, validate, finish.

A run writes into `output.dir`:
    config.yaml        the resolved configuration
    last.pt            checkpoint (model, optimiser, scaler, `TrainState`, RNG states), atomic
    best.safetensors   the weights with the best validation mIoU, with metadata for predict/evaluate/serve
    metrics.jsonl      one line per logged step and per validation
    tensorboard/       the same scalars, per-class IoU and example predictions (output.tensorboard)
    metrics.json       the final validation of the best weights (the layout `pixelwise evaluate` writes)
    report.html        curves, confusion matrix, per-class IoU and example predictions (+ PNGs)

`resume=True` continues from last.pt exactly where it stopped, mid-epoch included: the sample order of
an epoch is stored, every sample is augmented with a seed fixed by (seed, epoch, index), and the RNG
states are restored, so an interrupted and resumed run equals an uninterrupted one (bit-exactly on
CPU with train.deterministic).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from pixelwise import distributed
from pixelwise.config import PIXEL_SCORES, Config, config_to_dict
from pixelwise.engine.evaluation import (
    InferenceSpec,
    dataset_metrics,
    evaluate,
    metrics_record,
    nan_to_none,
    read_metrics,
    weights_source,
)
from pixelwise.engine.parts import (
    SeededSamples,
    StopRequest,
    build_datasets,
    build_optimizer,
    check_writable,
    class_weights,
    freeze_encoder,
    ignore_sigint,
    is_main,
    learning_rate,
    seed_everything,
    truncate_log,
)
from pixelwise.engine.state import (
    TrainState,
    align_optimizer_state,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from pixelwise.engine.tensorboard import TensorBoardLog
from pixelwise.errors import UserError, translated
from pixelwise.fileio import atomic_path, atomic_write_text, remove_stale_temporaries
from pixelwise.inference import resolve_device
from pixelwise.losses import build_loss
from pixelwise.precision import precision_name

# config keys of the library arguments that validation takes from them
EVAL_KEYS = {
    "mode": "eval.mode",
    "window": "eval.window",
    "stride": "eval.stride",
    "scales": "eval.scales",
    "iterations": "crf.iterations",
    "preset": "crf.preset",
}


def train(
    cfg: Config, *, resume: bool = False, overwrite: bool = False, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Train as `cfg` says; with `model.stages`, train each stage in turn, each initialised from the last.

    Args:
        resume: continue from `output.dir/last.pt` (each stage from its own folder).
        overwrite: start afresh even if `output.dir` holds a checkpoint of an earlier run.
        stop_at_step: stop after this optimiser step as an interruption would (checkpoint, then return);
            used to split a run for time limits and by the resume tests.

    Returns:
        {"interrupted": bool, "step": int, "epoch": int, "best_miou": float | None,
         "metrics": final validation scores or None, "out_dir": str}
    """
    out = Path(cfg.output.dir)
    check_writable(out)
    if not cfg.model.stages:
        return train_model(cfg, out, cfg.model.name, resume=resume, overwrite=overwrite, stop_at_step=stop_at_step)
    previous: Path | None = None
    result: dict[str, Any] = {}
    for stage in cfg.model.stages:
        stage_dir = out / stage
        if not (resume and _finished(stage_dir, needs_metrics=bool(cfg.data.val_split))):
            result = train_model(
                cfg,
                stage_dir,
                stage,
                init_from=previous,
                overwrite=overwrite,
                resume=resume and (stage_dir / "last.pt").exists(),
                stop_at_step=stop_at_step,
            )
            if result["interrupted"]:
                return result
        previous = stage_dir / "best.safetensors"
    last = out / cfg.model.stages[-1]
    if is_main():  # the run's deliverable sits at the top of output.dir, as for a single model
        for name in ("best.safetensors", "metrics.json"):
            if (last / name).exists():  # no metrics.json without a validation split
                with atomic_path(out / name) as tmp:
                    tmp.write_bytes((last / name).read_bytes())
    if not result:  # every stage had finished before this --resume
        metrics = read_metrics(last / "metrics.json")["scores"] if (last / "metrics.json").exists() else None
        result = {"interrupted": False, "step": 0, "epoch": cfg.train.epochs, "best_miou": None, "metrics": metrics}
    return result | {"out_dir": str(out)}


@dataclass
class Run:
    """Everything one model's training holds: what was built from the config, and where it stands."""

    cfg: Config
    out: Path
    model_name: str
    device: torch.device
    amp_dtype: torch.dtype | None
    data: dict[str, Any]  # train, val (or None), classes, palette, ignore_index, num_classes
    model: nn.Module  # the model itself: saved, evaluated
    train_model: nn.Module  # what the loop calls: the model, or its DistributedDataParallel wrapper
    model_kwargs: dict[str, Any]
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    spec: InferenceSpec  # validation; the final one adds the CRF when crf.enabled
    state: TrainState
    started: float = 0.0  # perf_counter when this process started training
    time_is_up: bool = False  # train.max_minutes ran out: the epoch just ended was the last
    tensorboard: TensorBoardLog | None = None  # output.tensorboard on the main process: gets what `log` writes

    @property
    def precision(self) -> str:
        return precision_name(self.amp_dtype)

    @property
    def samples_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.train.grad_accum * distributed.world_size()

    def elapsed(self) -> float:
        """Wall seconds of the whole run so far, across resumes."""
        return self.state.elapsed_s + time.perf_counter() - self.started

    def log(self, record: dict[str, Any]) -> None:
        record["elapsed_s"] = round(self.elapsed(), 1)
        if is_main():
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.record(record)

    def checkpoint(self) -> None:
        if is_main():
            state = TrainState(**{**self.state.to_dict(), "elapsed_s": self.elapsed()})
            save_checkpoint(
                self.out / "last.pt",
                state=state,
                model_name=self.model_name,
                config=config_to_dict(self.cfg),
                model=self.model,
                optimizer=self.optimizer,
                scaler=self.scaler,
            )


def train_model(
    cfg: Config,
    out: Path,
    model_name: str,
    *,
    init_from: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Train one model into `out`: build, (restore,) train epoch by epoch, finish."""
    _check_start(out, resume=resume, overwrite=overwrite)
    restore_determinism = seed_everything(cfg.train.seed, cfg.train.deterministic)
    try:
        run = build_run(cfg, out, model_name, init_from=init_from)
        if resume:
            restore(run)
        elif is_main():
            (out / "metrics.jsonl").unlink(missing_ok=True)
            atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        _announce(run)
        stop = StopRequest()
        run.started = time.perf_counter()
        with stop.installed(), _tensorboard(run):
            while run.state.epoch < cfg.train.epochs and not run.time_is_up:
                if not train_epoch(run, stop, stop_at_step):
                    return _interrupted(run, stop, stop_at_step)
                end_epoch(run)
        return finish(run)
    finally:
        restore_determinism()


@contextlib.contextmanager
def _tensorboard(run: Run) -> Iterator[None]:
    """output.tensorboard: a TensorBoard writer for the main process while the run trains, closed after."""
    if run.cfg.output.tensorboard and is_main():
        run.tensorboard = TensorBoardLog(run.out / "tensorboard", purge_step=run.state.step or None)
    try:
        yield
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()


def _check_start(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start over an earlier run's checkpoint, or to resume without one."""
    ckpt_path = out / "last.pt"
    if not resume and ckpt_path.exists() and not overwrite:
        raise UserError(
            f"output.dir={out} holds a checkpoint of an earlier run; continue it with --resume "
            "or choose another folder with --set output.dir=..."
        )
    if resume and not ckpt_path.exists():
        raise UserError(
            f"--resume: no checkpoint {ckpt_path}; start without --resume or point output.dir "
            "at the folder of the run to continue"
        )
    check_writable(out)
    if is_main():
        remove_stale_temporaries(out)  # half-written files of an earlier run that was killed mid-write


def build_run(cfg: Config, out: Path, model_name: str, *, init_from: Path | None = None) -> Run:
    """Data, model, loss, optimiser and validation settings for training `model_name` as `cfg` says."""
    from pixelwise.precision import PrecisionError, resolve_precision

    tc = cfg.train
    device = distributed.local_device(resolve_device(tc.device, "train.device"))  # DDP: this rank's GPU
    try:
        amp_dtype = resolve_precision(tc.amp, device)
    except PrecisionError as e:
        raise UserError(f"train.amp={tc.amp}: {e}") from None
    with translated(EVAL_KEYS):
        spec = _eval_spec(cfg, amp_dtype)
    data = build_datasets(cfg)
    steps_per_epoch = len(data["train"]) // (cfg.data.batch_size * tc.grad_accum * distributed.world_size())
    if steps_per_epoch == 0:
        raise UserError(
            f"data: {len(data['train'])} training images are fewer than one step of "
            f"data.batch_size={cfg.data.batch_size} x train.grad_accum={tc.grad_accum} x "
            f"{distributed.world_size()} process(es); lower them"
        )
    model, train_model_, model_kwargs = _build_model(cfg, model_name, data["num_classes"], device, init_from)
    weights = class_weights(cfg, data["train"], data["num_classes"])
    loss_fn = build_loss(cfg.loss, class_weights=weights, ignore_index=data["ignore_index"]).to(device)
    return Run(
        cfg=cfg,
        out=out,
        model_name=model_name,
        device=device,
        amp_dtype=amp_dtype,
        data=data,
        model=model,
        train_model=train_model_,
        model_kwargs=model_kwargs,
        loss_fn=loss_fn,
        optimizer=build_optimizer(cfg, model),
        steps_per_epoch=steps_per_epoch,
        spec=spec,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        state=TrainState(),
    )


def _eval_spec(cfg: Config, amp_dtype: torch.dtype | None) -> InferenceSpec:
    """Validation as `eval.*` says: a slide window defaults to the training crop."""
    ec = cfg.eval
    window = tuple(ec.window) if ec.window else (tuple(cfg.data.crop_size) if ec.mode == "slide" else None)
    if cfg.crf.enabled:  # checked now, used by the final validation
        from pixelwise.crf import CRFParams

        CRFParams.preset(cfg.crf.preset, iterations=cfg.crf.iterations)
    return InferenceSpec(
        mode=ec.mode,
        window=window,
        stride=tuple(ec.stride) if ec.stride else None,
        scales=tuple(ec.scales),
        flip=ec.flip,
        dtype=amp_dtype,
    )


def _build_model(
    cfg: Config, model_name: str, num_classes: int, device: torch.device, init_from: Path | None
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The model (channels_last if asked, SyncBatchNorm under DDP if asked), what the loop calls
    (DistributedDataParallel under DDP) and the builder arguments to record in the weights."""
    from pixelwise.models import get_model
    from pixelwise.weights import load_weights

    model_kwargs = dict(cfg.model.kwargs)
    build_kwargs = dict(model_kwargs)
    if init_from is not None:  # a later FCN stage: start from the previous stage's best weights
        build_kwargs.pop("weights_backbone", None)  # the previous stage already carries them
        build_kwargs["init_from"] = load_weights(init_from)[0]
    with translated({"name": "model.name", "kwargs": "model.kwargs"}):
        model = get_model(model_name, num_classes=num_classes, **build_kwargs).to(device)
    if cfg.model.init_weights and init_from is None:  # a later stage starts from the previous one instead
        _init_weights(model, cfg.model.init_weights)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    world = distributed.world_size()
    if cfg.train.sync_bn and world > 1:
        if device.type != "cuda":
            raise UserError(
                "train.sync_bn=true needs CUDA devices (SyncBatchNorm does not run on CPU); "
                "set train.sync_bn=false for CPU runs"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    freeze_encoder(cfg, model)  # before DDP, which only reduces the gradients of parameters that require them
    # DDP: the wrapper averages gradients over processes; `model` (its module) is saved and evaluated
    wrapped = (
        model
        if world == 1
        else nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    )
    return model, wrapped, model_kwargs


def _init_weights(model: nn.Module, source: str) -> None:
    """model.init_weights: load what fits and say what kept the builder's initialisation."""
    from pixelwise.weights import load_matching

    with translated({"source": "model.init_weights"}):
        loaded, kept = load_matching(model, source)
    if is_main():
        rest = f"; kept the builder's init for {len(kept)}: {', '.join(kept[:4])}" if kept else ""
        print(f"model.init_weights: {len(loaded)} tensors from {source}{rest}{', ...' if len(kept) > 4 else ''}")


def restore(run: Run) -> None:
    """Load last.pt into `run`: model, optimiser, scaler, state, RNG; cut the log back to it."""
    path = run.out / "last.pt"
    ckpt = read_checkpoint(path)
    if ckpt["model_name"] != run.model_name:
        raise UserError(
            f"{path}: a checkpoint of model {ckpt['model_name']!r}, not {run.model_name!r}; resume with its own config"
        )
    try:
        run.model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(
            f"{path}: the weights do not fit this config's model ({str(e)[:200]}); "
            "resume with the config the run started with"
        ) from None
    mults = [group["lr_mult"] for group in run.optimizer.param_groups]
    kernels = [(group.get("fused"), group.get("foreach")) for group in run.optimizer.param_groups]
    try:
        run.optimizer.load_state_dict(
            align_optimizer_state(ckpt["optimizer"], list(ckpt["model"]), run.model, run.optimizer)
        )
    except ValueError as e:  # other parameter groups: the lr/decay multipliers changed since
        raise UserError(
            f"{path}: the optimiser state does not fit this config ({e}); resume with "
            "the train.* settings the run started with"
        ) from None
    for group, mult, (fused, foreach) in zip(run.optimizer.param_groups, mults, kernels, strict=True):
        group["lr_mult"] = mult  # the config's rate factors (checkpoints before them had none)
        group["fused"], group["foreach"] = fused, foreach  # this torch's step kernel, not the writer's
    run.scaler.load_state_dict(ckpt["scaler"])
    run.state = TrainState.from_checkpoint(ckpt)
    _warn_changed_batch(run, ckpt["config"])
    set_rng_state(ckpt["rng"])
    truncate_log(run.out / "metrics.jsonl", step=run.state.step, epoch=run.state.epoch)
    print(f"resumed {path} at epoch {run.state.epoch + 1}, step {run.state.step}")


def _warn_changed_batch(run: Run, saved: dict[str, Any]) -> None:
    """Resume promises an exact continuation; a different batch is not one, so say so."""
    before = (saved.get("data", {}).get("batch_size"), saved.get("train", {}).get("grad_accum"))
    now = (run.cfg.data.batch_size, run.cfg.train.grad_accum)
    if before != now:
        print(
            f"warning: the run started with data.batch_size={before[0]}, train.grad_accum={before[1]}; "
            f"resuming with {now[0]}, {now[1]} continues it, but not as the unsplit run would have"
        )


def _announce(run: Run) -> None:
    """One line on what is about to run: the feedback users expect at the start."""
    if is_main():
        tc = run.cfg.train
        n_val = len(run.data["val"]) if run.data["val"] is not None else 0
        print(
            f"train {run.model_name} on {run.device} ({run.precision}): {len(run.data['train'])} training and "
            f"{n_val} validation images, {run.steps_per_epoch} steps per epoch, {tc.epochs} epochs "
            f"-> {run.out}",
            flush=True,
        )


def epoch_loader(run: Run) -> DataLoader:
    """This epoch's remaining samples, in its order (fixed by seed and epoch), each with its own seed."""
    tc, dc, state = run.cfg.train, run.cfg.data, run.state
    n_per_epoch = run.steps_per_epoch * run.samples_per_step
    if state.perm is None or state.step_in_epoch == 0:  # a fresh epoch: its order comes from (seed, epoch)
        g = torch.Generator().manual_seed(tc.seed * 100_003 + state.epoch)
        state.perm = torch.randperm(len(run.data["train"]), generator=g)[:n_per_epoch]
    todo = state.perm[state.step_in_epoch * run.samples_per_step :].tolist()
    samples = SeededSamples(run.data["train"], todo, seed=(tc.seed * 100_003 + state.epoch) * 1_000_003)
    world = distributed.world_size()
    # DDP: process r takes todo[r::world], so a step sees the same images as one process would
    sampler = (
        DistributedSampler(samples, num_replicas=world, rank=distributed.rank(), shuffle=False, drop_last=True)
        if world > 1
        else None
    )
    return DataLoader(
        samples,
        sampler=sampler,
        batch_size=dc.batch_size,
        shuffle=False,
        drop_last=True,
        num_workers=dc.workers,
        pin_memory=run.device.type == "cuda",
        worker_init_fn=ignore_sigint,
        generator=torch.Generator().manual_seed(tc.seed),
    )  # keeps the global RNG untouched


def train_epoch(run: Run, stop: StopRequest, stop_at_step: int | None = None) -> bool:
    """Train the rest of the current epoch; False when stopped by a signal or `stop_at_step`."""
    from tqdm import tqdm

    tc, state = run.cfg.train, run.state
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    run.train_model.train()
    bar = tqdm(
        total=run.steps_per_epoch,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}/{tc.epochs}",
        disable=not (run.cfg.output.progress and is_main()),
        leave=False,
        dynamic_ncols=True,
    )
    t_log, images_since, loss_sum, micro = time.perf_counter(), 0, 0.0, 0
    losses, vote = PendingLosses(), distributed.StopVote(run.device)
    with bar:
        for images, targets in epoch_loader(run):
            images = images.to(run.device, non_blocking=True, memory_format=memory_format)
            loss = backward(run, images, targets.to(run.device, non_blocking=True), micro)
            losses.add(loss, run, micro, images.shape[0])
            loss_sum += loss
            micro += 1
            images_since += images.shape[0]
            if micro < tc.grad_accum:
                continue
            lr = optimizer_step(run)
            step_loss, loss_sum, micro = loss_sum / tc.grad_accum, 0.0, 0
            bar.update(1)
            checkpoint = bool(run.cfg.output.checkpoint_every_steps) and (
                state.step % run.cfg.output.checkpoint_every_steps == 0
            )
            if state.step % run.cfg.output.log_every_steps == 0 or state.step_in_epoch == run.steps_per_epoch:
                losses.check(run)
                now = time.perf_counter()
                speed, t_log, images_since = images_since / max(now - t_log, 1e-9), now, 0
                record = {"kind": "train", "epoch": state.epoch + 1, "step": state.step, "loss": step_loss.item()}
                run.log(record | {"lr": lr, "images_per_s": speed, "precision": run.precision})
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
            # DDP: a signal reaches the ranks at different steps; the vote stops them all after the same one
            if state.step == stop_at_step or vote(bool(stop.signal)):
                return _stop_here(run, losses, vote)
            if checkpoint:
                losses.check(run)
                run.checkpoint()
    if vote.settle():  # a rank was signalled during the epoch's last step
        return _stop_here(run, losses, vote)
    losses.check(run)  # before the epoch's validation and checkpoint
    return True


def _stop_here(run: Run, losses: PendingLosses, vote: distributed.StopVote) -> bool:
    """The loop stops after this step: settle the vote in flight and check the losses before the checkpoint."""
    vote.settle()
    losses.check(run)  # the checkpoint written on the way out must hold finite weights
    return False


class PendingLosses:
    """The losses of the micro-batches since the last check, left on the device.

    Reading a loss (`.item()`) waits for the device to finish the step; checking them in one read at
    logging, checkpoint and epoch-end steps keeps a GPU queue full between those. A non-finite loss is
    found before any checkpoint or validation could keep the weights it produced.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, int, int, int, int]] = []  # loss, step, epoch, first, count

    def add(self, loss: torch.Tensor, run: Run, micro: int, batch: int) -> None:
        state, world = run.state, distributed.world_size()
        # this process's micro-batch in the epoch's order: DDP rank r takes every world-th sample from r
        first = state.step_in_epoch * run.samples_per_step + micro * batch * world + distributed.rank()
        self.entries.append((loss, state.step, state.epoch, first, batch))

    def check(self, run: Run) -> None:
        """UserError naming the step and samples of the first non-finite loss since the last check (under
        DDP on every process, which all check at the same steps: none is left waiting in a collective)."""
        if not self.entries:
            return
        values = torch.stack([e[0] for e in self.entries]).tolist()  # one device sync for all
        entries, self.entries = self.entries, []
        bad = next(((v, e) for v, e in zip(values, entries, strict=True) if not math.isfinite(v)), None)
        if not distributed.any_true(bad is not None, run.device):
            return
        stop = f"training stopped and {run.out / 'last.pt'} still holds the last good state"
        if bad is None:
            raise UserError(f"a loss on another process is not finite (its message names the step); {stop}")
        value, (_, step, epoch, first, count) = bad
        indices = run.state.perm[first : first + count * distributed.world_size() : distributed.world_size()]
        raise UserError(
            f"loss is {value} at step {step + 1} (epoch {epoch + 1}, batch of data set indices "
            f"{indices.tolist()}); {stop}: lower train.lr, set train.grad_clip or check those images"
        )


def backward(run: Run, images: torch.Tensor, targets: torch.Tensor, micro: int) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its loss, detached, on the device (not read:
    `PendingLosses` checks it later without a sync per step)."""
    tc = run.cfg.train
    accumulating = distributed.world_size() > 1 and micro + 1 < tc.grad_accum  # DDP: all-reduce on the last
    autocast = (
        torch.autocast(run.device.type, dtype=run.amp_dtype) if run.amp_dtype is not None else contextlib.nullcontext()
    )
    with run.train_model.no_sync() if accumulating else contextlib.nullcontext(), autocast:
        outputs = run.train_model(images)  # (B, K, H, W), or (main, aux) for models built with aux=True
    if isinstance(outputs, tuple):
        main_out, aux_out = outputs
        loss = run.loss_fn(main_out.float(), targets)
        loss = loss + run.cfg.loss.aux_weight * run.loss_fn(aux_out.float(), targets)
    else:
        loss = run.loss_fn(outputs.float(), targets)
    run.scaler.scale(loss / tc.grad_accum).backward()
    return loss.detach()


def optimizer_step(run: Run) -> float:
    """One optimiser step at the schedule's rate (times each group's multiplier); returns the rate."""
    tc, state = run.cfg.train, run.state
    lr = learning_rate(tc, state.step, run.steps_per_epoch * tc.epochs)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    if tc.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.step_in_epoch += 1
    return lr


def _interrupted(run: Run, stop: StopRequest, stop_at_step: int | None) -> dict[str, Any]:
    """Checkpoint where the loop stopped and report it."""
    run.checkpoint()
    if stop.signal:
        why = f"{stop.signal} received"
    elif run.state.step == stop_at_step:
        why = f"stop_at_step={stop_at_step} reached"
    else:
        why = "a stop signal on another process"  # DDP: the ranks voted to stop
    print(
        f"{why}: wrote {run.out / 'last.pt'} at epoch {run.state.epoch + 1}, step {run.state.step}; "
        "continue with --resume"
    )
    distributed.barrier()  # DDP: rank 0's checkpoint is on disk before any rank moves on
    return _result(run, interrupted=True)


def end_epoch(run: Run) -> None:
    """Count the epoch; validate when due (keeping the best weights), then checkpoint."""
    state, every = run.state, run.cfg.eval.every_epochs
    state.epoch += 1
    state.step_in_epoch = 0
    budget = run.cfg.train.max_minutes * 60
    run.time_is_up = distributed.any_true(bool(budget) and run.elapsed() >= budget, run.device)  # DDP: all agree
    if run.time_is_up and state.epoch < run.cfg.train.epochs and is_main():
        print(f"train.max_minutes={run.cfg.train.max_minutes:g} reached in epoch {state.epoch} (step {state.step})")
    last = state.epoch == run.cfg.train.epochs or run.time_is_up
    if run.data["val"] is not None and every and (state.epoch % every == 0 or last):
        scores = validate(run)
        score = scores[run.cfg.eval.best_metric]  # higher is better for every choice
        if state.best_miou is None or score > state.best_miou:
            state.best_miou = score
            save_best(run, scores["miou"])
    elif run.data["val"] is None or not every:
        save_best(run, None)  # no validation: the latest weights are the deliverable
    run.checkpoint()


def validate(run: Run) -> dict[str, Any]:
    """Score the model on the validation split (all processes share it under DDP); log and return the
    scores (miou, pixel_acc, mean_acc, and the data set's own, e.g. ISBI's v_rand)."""
    data = run.data
    result = evaluate(
        run.model,
        data["val"],
        run.spec,
        mean=run.cfg.data.mean,
        std=run.cfg.data.std,
        num_classes=data["num_classes"],
        ignore_index=data["ignore_index"],
        batch_size=run.cfg.eval.batch_size,
        workers=run.cfg.data.workers,
        boundary_f1=False,
        shard=True,
        keep_samples=run.cfg.output.report_images if run.tensorboard is not None else 0,
        progress=run.cfg.output.progress and is_main(),
        # the data set's own scores (ISBI's V_Rand...) need every image in one process
        extra_metrics=dataset_metrics(run.cfg.data.dataset, data["classes"]) if distributed.world_size() == 1 else (),
    )
    s = result.scores
    record = {name: s[name] for name in PIXEL_SCORES}
    record.update(s.get("isbi_challenge", {}))  # v_rand, v_info, pixel_error and their thresholds
    # per class too, so a run's log can show which classes learn when (null: a class absent from val)
    record["per_class_iou"] = {c: nan_to_none(v) for c, v in zip(data["classes"], s["per_class_iou"], strict=True)}
    run.log({"kind": "val", "epoch": run.state.epoch, "step": run.state.step, **record})
    if run.tensorboard is not None:  # per-class IoU and example predictions
        run.tensorboard.validation(s, data, result.samples, run.state.step)
    if is_main():
        rand = f", V_Rand {record['v_rand']:.4f}" if "v_rand" in record else ""
        print(f"epoch {run.state.epoch}: val mIoU {s['miou']:.4f} (pixel acc {s['pixel_acc']:.4f}{rand})")
    return record


def save_best(run: Run, miou: float | None) -> None:
    """best.safetensors: the weights and what predict/evaluate/serve need to use them."""
    from pixelwise.weights import save_weights

    if not is_main():
        return
    dc, data = run.cfg.data, run.data
    extra = {
        "epoch": run.state.epoch,
        "step": run.state.step,
        "val_miou": miou,
        "crop_size": dc.crop_size,
        "precision": run.precision,
    }
    if dc.dataset == "synthetic":  # `evaluate --dataset synthetic` scores images of the trained geometry
        train_set = data["train"].dataset if isinstance(data["train"], Subset) else data["train"]
        extra["synthetic_size"] = list(train_set.size)
    if run.cfg.crf.enabled:  # the CRF the model is evaluated with: predict/evaluate/serve default to it
        from pixelwise.crf import CRFParams

        extra["crf"] = CRFParams.preset(run.cfg.crf.preset, iterations=run.cfg.crf.iterations).to_dict()
    save_weights(
        run.out / "best.safetensors",
        run.model,
        model_name=run.model_name,
        model_kwargs=run.model_kwargs,
        classes=data["classes"],
        palette=data["palette"],
        mean=tuple(dc.mean),
        std=tuple(dc.std),
        ignore_index=data["ignore_index"],
        extra=extra,
    )


def finish(run: Run) -> dict[str, Any]:
    """Score the best weights (with the CRF if asked) into metrics.json and the report."""
    from safetensors.torch import load_file

    from pixelwise.weights import read_weights_meta

    distributed.barrier()  # DDP: rank 0's checkpoint and weights are on disk before any rank moves on
    if not is_main() or run.data["val"] is None:
        return _result(run)
    best = run.out / "best.safetensors"
    run.model.load_state_dict(load_file(str(best), device=str(run.device)))
    meta = read_weights_meta(best)
    spec = run.spec
    if "crf" in meta.extra:
        from dataclasses import replace

        from pixelwise.crf import CRFParams

        spec = replace(spec, crf=CRFParams.from_dict(meta.extra["crf"]))
    keep = run.cfg.output.report_images if run.cfg.output.report else 0
    data = run.data
    crf = " with the dense CRF" if spec.crf is not None else ""
    print(f"final validation: scoring the best weights {best} on {len(data['val'])} images{crf} -> metrics.json")
    result = evaluate(
        run.model,
        data["val"],
        spec,
        mean=meta.mean,
        std=meta.std,
        num_classes=data["num_classes"],
        ignore_index=data["ignore_index"],
        batch_size=run.cfg.eval.batch_size,
        workers=run.cfg.data.workers,
        keep_samples=keep,
        progress=run.cfg.output.progress,
        extra_metrics=dataset_metrics(run.cfg.data.dataset, data["classes"]),
    )
    # the weights beside metrics.json, named relative to it: a run's files do not depend on its folder
    record = metrics_record(
        result,
        data["classes"],
        spec,
        **weights_source(Path(best.name), meta),
        dataset=run.cfg.data.dataset,
        split=run.cfg.data.val_split,
    )
    atomic_write_text(run.out / "metrics.json", json.dumps(record, indent=2) + "\n")
    if run.cfg.output.report:
        _write_report(run, result, record)
    return _result(run) | {"metrics": record["scores"]}


def _write_report(run: Run, result: Any, record: dict[str, Any]) -> None:
    from pixelwise.report import write_report

    data, s = run.data, record["scores"]
    history = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines() if line]
    write_report(
        run.out,
        history=history,
        confusion=result.confusion.numpy(),
        classes=data["classes"],
        palette=data["palette"],
        samples=result.samples,
        ignore_index=data["ignore_index"],
        title=f"{run.model_name} on {run.cfg.data.dataset}",
        summary={
            "model": run.model_name,
            "data set": run.cfg.data.dataset,
            "epochs": run.state.epoch,
            "steps": run.state.step,
            "val mIoU": s["miou"],
            "pixel accuracy": s["pixel_acc"],
            "mean accuracy": s["mean_acc"],
            "boundary F1": s.get("boundary_f1"),
            "CRF": record["inference"]["crf"] is not None,
            "precision": run.precision,
        },
    )


def _result(run: Run, *, interrupted: bool = False) -> dict[str, Any]:
    s = run.state
    return {
        "interrupted": interrupted,
        "step": s.step,
        "epoch": s.epoch,
        "best_miou": s.best_miou,
        "metrics": None,
        "out_dir": str(run.out),
    }


def _finished(out: Path, needs_metrics: bool) -> bool:
    """Whether `out` holds a run that completed: checkpoint at the last epoch, weights, final metrics if due."""
    if not (out / "last.pt").exists() or not (out / "best.safetensors").exists():
        return False
    ckpt = read_checkpoint(out / "last.pt")
    done = ckpt["epoch"] >= ckpt["config"]["train"]["epochs"]
    return done and (not needs_metrics or (out / "metrics.json").exists())
