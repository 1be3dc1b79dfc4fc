"""Multi-GPU / multi-node training helpers around torch.distributed, for runs started by torchrun.

``torchrun --nproc-per-node N -m pixelwise train CONFIG`` starts N processes with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; `launched` turns them into a
process group (NCCL for CUDA, gloo for CPU) for the run and tears it down after. Without those
variables (a plain ``pixelwise train``) every helper here is a no-op for a single process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from pixelwise.errors import UserError


def is_initialized() -> bool:
    """Whether a process group is up (torchrun run, or one set up by the caller)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK); 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs and weights."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if is_initialized():
        dist.barrier()


class StopVote:
    """Ranks agree on when to stop without a blocking collective at every step.

    Each call all-reduces this rank's flag asynchronously and answers with the vote of the call before,
    so every rank stops after the same step, one step after a rank raised its flag, and no rank waits
    for the device or the others at each step (on CUDA the host waits at most for the step before).
    With one process the flag is the answer, at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: tuple[Any, torch.Tensor] | None = None  # (what to wait for, the vote on the host)

    def __call__(self, flag: bool) -> bool:
        if not is_initialized():
            return flag
        decided = self.settle()
        if dist.get_backend() != "nccl":  # gloo: CPU tensors, the collective runs on gloo's own threads
            t = torch.tensor([int(flag)])
            self.pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True), t)
            return decided
        # NCCL: a fill kernel (a tensor from host data would sync the stream), the all-reduce ordered on the
        # stream by wait(), then a non-blocking copy to pinned memory and an event: settle() waits for that
        # event alone, which comes before the next step's kernels, so the host stays a step ahead
        t = torch.full((1,), int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True).wait()  # NCCL: the stream waits, not the host
        host = torch.empty(1, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (event, host)
        return decided

    def settle(self) -> bool:
        """Wait for the vote in flight (before any other collective, or at the end); True if it says stop."""
        if self.pending is None:
            return False
        waitable, t = self.pending
        self.pending = None
        if isinstance(waitable, torch.cuda.Event):
            waitable.synchronize()
        else:
            waitable.wait()
        return bool(t.item())


def any_true(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if `flag` is true on any rank: ranks agree on when to stop."""
    if not is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def local_device(device: torch.device) -> torch.device:
    """With CUDA and several processes, each process takes the GPU of its LOCAL_RANK."""
    if device.type != "cuda" or not is_initialized():
        return device
    index = local_rank()
    if index >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK={index} but this node has {torch.cuda.device_count()} GPU(s); "
            f"start at most {torch.cuda.device_count()} processes per node (--nproc-per-node)"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextlib.contextmanager
def launched(device: str = "auto") -> Iterator[None]:
    """Set up the process group torchrun asked for (if any) for the block, and destroy it after.

    `device` is ``train.device``: the backend is NCCL when it resolves to CUDA, gloo otherwise. A group
    that already exists (set up by the caller) is used as it is and left alone.
    """
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; start "
            "distributed runs with torchrun --nproc-per-node N -m pixelwise train CONFIG"
        )
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank())  # before NCCL starts, so each rank owns its GPU
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
