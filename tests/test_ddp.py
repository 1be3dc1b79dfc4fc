"""DistributedDataParallel training under torchrun: 2 CPU processes (gloo) equal one process with the same
global batch, both ranks end with the same weights, per-epoch metrics are all-reduced, resume works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pixelwise import distributed
from pixelwise.config import load_config
from pixelwise.train import train
from pixelwise.weights import load_checkpoint

# 16 synthetic 32x32 images, a 2-level U-Net without BatchNorm (SyncBatchNorm needs CUDA), no scale
# augmentation (padding with the ignore index would give the ranks different pixel counts)
COMMON = [
    "data.kwargs={size: [32, 32], num_images: 16, num_classes: 3}",
    "data.crop_size=[32, 32]",
    "data.scale_range=[1.0, 1.0]",
    "data.workers=0",
    "data.max_val_images=6",
    "model.name=unet",
    "model.kwargs={padding: same, base_channels: 4, depth: 2}",
    "train.optimizer=sgd",
    "train.lr=0.05",
    "train.epochs=2",
    "train.device=cpu",
    "eval.every_epochs=1",
    "train.amp=none",  # fp32: bf16 rounding would hide the 1e-5 agreement the test checks
    "output.progress=false",
    "output.report=false",
    "output.log_every_steps=1",
]

# Run by torchrun: train, then each rank saves the weights its DDP module ended with.
WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn as nn
    from pixelwise import distributed
    from pixelwise.config import load_config
    from pixelwise.train import train

    ddp_modules = []

    class Recording(nn.parallel.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ddp_modules.append(self)

    nn.parallel.DistributedDataParallel = Recording
    overrides, resume, stop_at = json.loads(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]) or None
    signal_at = int(sys.argv[4])  # rank 1 alone sends itself SIGINT during this step (0: never)
    cfg = load_config(None, overrides)
    with distributed.launched("cpu"):
        rank, world = distributed.rank(), distributed.world_size()
        if signal_at and rank == 1:
            import signal
            from pixelwise.engine import training

            step = training.optimizer_step

            def signalled_step(run):
                lr = step(run)
                if run.state.step == signal_at:
                    signal.raise_signal(signal.SIGINT)
                return lr

            training.optimizer_step = signalled_step
        result = train(cfg, resume=resume, stop_at_step=stop_at)
        torch.save(ddp_modules[-1].module.state_dict(), f"{cfg.output.dir}/rank{rank}_of_{world}.pt")
        print(json.dumps({"rank": rank, "step": result["step"], "interrupted": result["interrupted"]}))
""")


def _torchrun(
    tmp_path: Path, overrides: list[str], *, resume: bool = False, stop_at: int = 0, signal_at: int = 0
) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        json.dumps(overrides),
        str(int(resume)),
        str(stop_at),
        str(signal_at),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # both ranks print to one pipe: under load one's line can land inside the other's, so find the objects
    return sorted((json.loads(m) for m in re.findall(r'\{"rank"[^{}]*\}', r.stdout)), key=lambda d: d["rank"])


def _val_lines(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "val"]


def _assert_close_state(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch_and_resume(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the reference: one process, batch 4
        single = train(load_config(None, [*COMMON, "data.batch_size=4", f"output.dir={tmp_path / 'single'}"]))
    finally:
        torch.set_num_threads(before)
    assert single["step"] == 2 * 16 // 4

    # two processes with batch 2 each, interrupted after 3 steps, then resumed to the end
    ddp = [*COMMON, "data.batch_size=2", f"output.dir={tmp_path / 'ddp'}"]
    first = _torchrun(tmp_path, ddp, stop_at=3)
    assert [(r["rank"], r["step"], r["interrupted"]) for r in first] == [(0, 3, True), (1, 3, True)]
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["step"] == 3
    second = _torchrun(tmp_path, ddp, resume=True)
    assert [(r["step"], r["interrupted"]) for r in second] == [(8, False), (8, False)]

    out = tmp_path / "ddp"
    final_ddp = load_checkpoint(out / "last.pt")["model"]  # rank 0's weights at the end of training
    _assert_close_state(torch.load(out / "rank1_of_2.pt"), final_ddp, atol=0.0)  # DDP keeps replicas identical
    final_single = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    _assert_close_state(final_ddp, final_single, atol=1e-5)  # reduction order differs, nothing else

    # per-epoch validation: 6 images split 3/3 over the ranks, confusion matrices all-reduced
    val_ddp, val_single = _val_lines(out), _val_lines(tmp_path / "single")
    assert [r["epoch"] for r in val_ddp] == [1, 2] == [r["epoch"] for r in val_single]
    for a, b in zip(val_ddp, val_single, strict=True):
        for key in ("miou", "pixel_acc", "mean_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    final = json.loads((out / "metrics.json").read_text())["scores"]
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())["scores"]
    assert final["miou"] == pytest.approx(single["miou"], abs=1e-6)
    # the training log is rank 0's alone: one line per step, not two
    train_steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert train_steps == list(range(1, 9))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    # rank 1 alone is interrupted in step 2; the ranks vote without a blocking collective per step, so
    # both stop after step 3 (the vote is read one step later) and one checkpoint is written (resuming
    # from such a checkpoint is the test above)
    ddp = [*COMMON, "data.batch_size=2", f"output.dir={tmp_path / 'ddp'}"]
    first = _torchrun(tmp_path, ddp, signal_at=2)
    assert [(r["rank"], r["step"], r["interrupted"]) for r in first] == [(0, 3, True), (1, 3, True)]
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["step"] == 3


def test_single_process_helpers_are_no_ops():
    assert not dist.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.any_true(True) and not distributed.any_true(False)
    vote = distributed.StopVote(torch.device("cpu"))
    assert vote(True) and not vote(False) and not vote.settle()  # one process: the flag itself, at once
    distributed.barrier()
    with distributed.launched("cpu"):
        assert not dist.is_initialized()
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


def test_world_size_without_rendezvous_is_one_clear_error(monkeypatch):
    from pixelwise.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="torchrun --nproc-per-node"):
        with distributed.launched("cpu"):
            pass


def test_stop_vote_over_gloo_answers_one_step_later(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        vote = distributed.StopVote(torch.device("cpu"))
        assert [vote(True), vote(False), vote(False)] == [False, True, False]
        vote(True)
        assert vote.settle() and not vote.settle()
    finally:
        dist.destroy_process_group()
