"""What only a CUDA device runs: training under bf16 and fp16 autocast (fp16 with the gradient scaler), and
SyncBatchNorm with DistributedDataParallel over NCCL under torchrun. Every test here is marked ``cuda``:
skipped without a GPU (tests/conftest.py), run on one by benchmarks/gpu_check.sh."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.config import load_config
from pixelwise.models import get_model
from pixelwise.train import train
from pixelwise.weights import load_checkpoint

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]

# 16 synthetic 32x32 images, SegNet-Basic at 8 channels: BatchNorm after every conv, so autocast meets norms too
TINY = [
    "data.kwargs={size: [32, 32], num_images: 16, num_classes: 3}",
    "data.crop_size=[32, 32]",
    "data.batch_size=4",
    "data.workers=0",
    "data.max_val_images=4",
    "model.name=segnet_basic",
    "model.kwargs={encoder_channels: 8, decoder_channels: 8}",
    "train.optimizer=adamw",
    "train.lr=0.01",
    "train.epochs=3",
    "train.device=cuda",
    "output.progress=false",
    "output.report=false",
    "output.log_every_steps=1",
]


def _train_losses(out: Path, amp: str) -> list[dict]:
    train(load_config(None, [*TINY, f"train.amp={amp}", f"output.dir={out}"]))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "train"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_training_follows_fp32(tmp_path, amp):
    fp32 = _train_losses(tmp_path / "fp32", "none")
    low = _train_losses(tmp_path / amp, amp)
    assert [r["precision"] for r in low] == [amp] * 12 and fp32[0]["precision"] == "fp32"
    losses = [r["loss"] for r in low]
    assert all(torch.isfinite(torch.tensor(losses)))
    # same weights and batch: the first loss differs from fp32's by rounding alone
    assert losses[0] == pytest.approx(fp32[0]["loss"], rel=0.03)
    assert statistics.mean(losses[-4:]) < statistics.mean(losses[:4])  # it learns, as fp32 does
    scaler = load_checkpoint(tmp_path / amp / "last.pt")["scaler"]
    # fp16 steps through the gradient scaler (its state is kept for resume); bf16 needs none
    assert (scaler != {} and scaler["scale"] > 0) if amp == "fp16" else scaler == {}


# Run by torchrun: SyncBatchNorm + DDP over NCCL, each rank on its share of the same global batches.
WORKER = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist, torch.nn as nn
    sys.path.insert(0, sys.argv[2])
    from test_cuda import build_segnet, sgd_steps

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_segnet())
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    sgd_steps(ddp, rank, world)
    if rank == 0:
        torch.save(model.state_dict(), sys.argv[1])
        syncs = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        print(json.dumps({"world": world, "backend": dist.get_backend(), "sync_bn": syncs}))
    dist.destroy_process_group()
""")


def build_segnet() -> nn.Module:
    """SegNet-Basic at 8 channels on this process's GPU, the same initial weights in every process."""
    torch.backends.cudnn.allow_tf32 = False  # fp32 convs: the comparison below is to 1e-4
    torch.manual_seed(0)
    return get_model("segnet_basic", num_classes=3, encoder_channels=8, decoder_channels=8).cuda()


def sgd_steps(model: nn.Module, rank: int = 0, world: int = 1, steps: int = 3) -> None:
    """`steps` SGD steps on global batches of 4 random 32x32 images; this rank trains on its share."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 3, (4, 32, 32), generator=gen)
        share = slice(rank * 4 // world, (rank + 1) * 4 // world)
        loss = F.cross_entropy(model(x[share].cuda()), y[share].cuda())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_sync_batchnorm_ddp_under_torchrun_equals_one_process(tmp_path):
    # two processes where two GPUs are (statistics over the global batch); on one GPU the one-process group
    world = min(2, torch.cuda.device_count())
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    cmd += [str(script), str(tmp_path / "ddp.pt"), str(Path(__file__).parent)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == {"world": world, "backend": "nccl", "sync_bn": 8}  # SegNet-Basic's 4 + 4 BatchNorms

    reference = build_segnet()  # plain BatchNorm, one process, the whole batch
    sgd_steps(reference)
    ddp_state = torch.load(tmp_path / "ddp.pt", map_location="cuda")
    assert ddp_state.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ddp_state[key], value, atol=1e-4, rtol=1e-4, msg=key)


def test_stop_vote_over_nccl_answers_one_step_later(tmp_path):
    """distributed.StopVote's NCCL path (fill, all-reduce on the stream, non-blocking copy, event) in a
    one-process NCCL group: each call answers with the vote before it."""
    import torch.distributed as dist

    from pixelwise.distributed import StopVote

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        vote = StopVote(torch.device("cuda"))
        assert [vote(True), vote(False), vote(False)] == [False, True, False]
        vote(True)
        assert vote.settle() and not vote.settle()
    finally:
        dist.destroy_process_group()
