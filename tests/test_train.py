"""The training loop: outputs, exact resume, interruption, divergence, errors, schedules, FCN stages."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

import pixelwise.engine.training as training_module
from pixelwise.config import load_config
from pixelwise.crf import CRF_PRESETS
from pixelwise.engine.parts import build_optimizer
from pixelwise.errors import UserError
from pixelwise.layers import SeparableConv2d
from pixelwise.models import get_model
from pixelwise.train import train
from pixelwise.weights import load_checkpoint, load_matching, load_weights

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# 16 synthetic 32x32 images, a 2-level U-Net with 4 base channels: a step takes milliseconds
TINY = [
    "data.kwargs={size: [32, 32], num_images: 16, num_classes: 3}",
    "data.crop_size=[32, 32]",
    "data.scale_range=[0.75, 1.25]",
    "data.batch_size=4",
    "data.workers=0",
    "data.max_val_images=4",
    "model.name=unet",
    "model.kwargs={padding: same, base_channels: 4, depth: 2}",
    "train.optimizer=adamw",
    "train.lr=0.01",
    "train.epochs=2",
    "output.progress=false",
    "output.report=false",
    "output.log_every_steps=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(tmp_path: Path, *extra: str, out: str = "run"):
    return load_config(None, [*TINY, f"output.dir={tmp_path / out}", *extra])


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_every_output(tmp_path):
    cfg = _cfg(tmp_path, "output.report=true", "output.report_images=2")
    result = train(cfg)
    out = tmp_path / "run"
    assert not result["interrupted"] and result["step"] == 2 * 4 and result["epoch"] == 2
    for name in (
        "config.yaml",
        "last.pt",
        "best.safetensors",
        "metrics.jsonl",
        "metrics.json",
        "report.html",
        "curves.png",
        "confusion.png",
        "iou.png",
        "samples.png",
    ):
        assert (out / name).is_file(), name
    log = _log(out)
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 9))
    assert [r["epoch"] for r in log if r["kind"] == "val"] == [1, 2]
    model, meta = load_weights(out / "best.safetensors")
    assert meta.model_name == "unet" and meta.model_kwargs == {"padding": "same", "base_channels": 4, "depth": 2}
    assert meta.classes[0] == "background" and len(meta.classes) == 3 and len(meta.palette) == 3
    assert meta.mean == (0.485, 0.456, 0.406) and meta.extra["val_miou"] == max(
        r["miou"] for r in log if r["kind"] == "val"
    )
    final = json.loads((out / "metrics.json").read_text())
    assert final["scores"]["miou"] == pytest.approx(meta.extra["val_miou"])  # metrics.json scores the best weights
    assert set(final["scores"]["per_class_iou"]) == set(meta.classes)
    last_val = [r for r in log if r["kind"] == "val"][-1]  # the log keeps every validation's per-class IoU
    assert list(last_val["per_class_iou"]) == meta.classes
    present = [v for v in last_val["per_class_iou"].values() if v is not None]
    assert sum(present) / len(present) == pytest.approx(last_val["miou"])
    ckpt = torch.load(out / "last.pt", weights_only=True)  # plain tensors and containers only
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2
    assert '<img src="samples.png"' in (out / "report.html").read_text()


@pytest.mark.parametrize("model", ["unet", "fcn8s"])
def test_resume_mid_epoch_is_bit_exact(tmp_path, model):
    extra = [
        "train.deterministic=true",
        "train.grad_accum=2",
        "data.batch_size=2",
        "train.schedule=poly",
        "train.warmup_steps=2",
        "data.flip=true",
    ]
    if model == "fcn8s":  # dropout in fc6/fc7: the RNG state must be restored too
        extra += [
            "model.name=fcn8s",
            "model.kwargs={width_div: 16, fc_channels: 32}",
            "train.optimizer=sgd",
            "train.lr=0.001",
        ]
    whole = train(_cfg(tmp_path, *extra, out="whole"))
    first = train(_cfg(tmp_path, *extra, out="split"), stop_at_step=3)  # 4 steps per epoch: stops mid-epoch 1
    assert first["interrupted"] and first["step"] == 3
    ckpt = load_checkpoint(tmp_path / "split" / "last.pt")
    assert ckpt["step"] == 3 and ckpt["step_in_epoch"] == 3 and ckpt["epoch"] == 0
    # the rest in loader worker processes: augmentation is seeded per sample, so this changes nothing
    rest = train(_cfg(tmp_path, *extra, "data.workers=1", out="split"), resume=True)
    assert not rest["interrupted"] and rest["step"] == whole["step"] == 8
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = _log(tmp_path / "whole"), _log(tmp_path / "split")
    assert [r["loss"] for r in la if r["kind"] == "train"] == [r["loss"] for r in lb if r["kind"] == "train"]
    assert [r["miou"] for r in la if r["kind"] == "val"] == [r["miou"] for r in lb if r["kind"] == "val"]


def test_resume_at_an_epoch_boundary_and_periodic_checkpoints(tmp_path):
    whole = train(_cfg(tmp_path, "train.deterministic=true", out="whole"))
    train(_cfg(tmp_path, "train.deterministic=true", "output.checkpoint_every_steps=2", out="split"), stop_at_step=4)
    train(_cfg(tmp_path, "train.deterministic=true", out="split"), resume=True)
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and whole["step"] == 8


def _loss_that(monkeypatch, action):
    """Patch build_loss so that the n-th loss call runs `action(n, loss)` and returns its value."""
    real = training_module.build_loss
    calls = {"n": 0}

    class Patched(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, logits, target):
            calls["n"] += 1
            return action(calls["n"], self.inner(logits, target))

    def build(*args, **kwargs):
        return Patched(real(*args, **kwargs))

    monkeypatch.setattr(training_module, "build_loss", build)


def test_sigint_finishes_the_step_and_checkpoints(tmp_path, monkeypatch, capsys):
    def interrupt(n, loss):
        if n == 3:
            signal.raise_signal(signal.SIGINT)
        return loss

    _loss_that(monkeypatch, interrupt)
    before = signal.getsignal(signal.SIGINT)
    result = train(_cfg(tmp_path))
    assert result["interrupted"] and result["step"] == 3  # the step in flight was completed
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert "SIGINT" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3
    assert not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.undo()
    assert train(_cfg(tmp_path), resume=True)["step"] == 8


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    _loss_that(monkeypatch, lambda n, loss: loss * math.nan if n == 3 else loss)
    with pytest.raises(UserError, match=r"loss is nan at step 3 \(epoch 1, batch of data set indices \[\d+, \d+"):
        train(_cfg(tmp_path, "output.checkpoint_every_steps=1"))
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")  # the last good state is intact
    assert ckpt["step"] == 2


def test_nan_loss_between_logging_steps_is_named_and_never_saved(tmp_path, monkeypatch):
    # the loop reads losses only at logging, checkpoint and epoch-end steps: the NaN of step 2 is still the
    # one named, and found before the epoch's validation or checkpoint could keep its weights
    _loss_that(monkeypatch, lambda n, loss: loss * math.inf if n == 2 else loss)
    cfg = _cfg(tmp_path, "output.log_every_steps=100", "output.checkpoint_every_steps=0")
    with pytest.raises(UserError, match=r"loss is inf at step 2 \(epoch 1, "):
        train(cfg)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.safetensors").exists()


def test_user_errors_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"output\.dir=.*cannot write there"):
        train(_cfg(tmp_path, f"output.dir={blocker / 'sub'}"))
    with pytest.MonkeyPatch.context() as mp:  # a CPU that would emulate bf16
        mp.setattr("pixelwise.precision.cpu_has_native_bf16", lambda: False)
        with pytest.raises(UserError, match=r"train\.amp=bf16: bf16 is not executed natively by this CPU"):
            train(_cfg(tmp_path, "train.amp=bf16", "train.device=cpu"))
    with pytest.raises(UserError, match=r"train\.amp=fp16: fp16 autocast needs a CUDA device"):
        train(_cfg(tmp_path, "train.amp=fp16", "train.device=cpu"))
    with pytest.raises(UserError, match=r"--resume: no checkpoint"):
        train(_cfg(tmp_path), resume=True)
    train(_cfg(tmp_path, "train.epochs=1"))
    with pytest.raises(UserError, match=r"holds a checkpoint of an earlier run; continue it with --resume"):
        train(_cfg(tmp_path, "train.epochs=1"))
    with pytest.raises(UserError, match=r"loss\.class_weights lists 2 weights for 3 classes"):
        train(_cfg(tmp_path, "loss.class_weights=[1, 2]"), overwrite=True)
    with pytest.raises(UserError, match=r"fewer than one step"):
        train(_cfg(tmp_path, "data.batch_size=32"), overwrite=True)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # 8 steps; lr(step) for the optimiser steps 0..7
        (["train.schedule=poly", "train.poly_power=0.9"], [0.01 * (1 - s / 8) ** 0.9 for s in range(8)]),
        (
            ["train.schedule=poly", "train.warmup_steps=2"],
            [0.005, 0.01] + [0.01 * (1 - s / 8) ** 0.9 for s in range(2, 8)],
        ),
        (
            ["train.schedule=step", "train.step_every=3", "train.step_gamma=0.5"],
            [0.01] * 3 + [0.005] * 3 + [0.0025] * 2,
        ),
        (["train.schedule=constant"], [0.01] * 8),
    ],
)
def test_learning_rate_schedules(tmp_path, schedule, expected):
    train(_cfg(tmp_path, *schedule, "eval.every_epochs=0", "data.max_val_images=1"))
    lrs = [r["lr"] for r in _log(tmp_path / "run") if r["kind"] == "train"]
    assert lrs == pytest.approx(expected)


def test_median_frequency_weights_are_used(tmp_path, capsys, monkeypatch):
    seen = {}
    real = training_module.build_loss

    def spy(cfg, *, class_weights=None, ignore_index=255):
        seen["weights"] = class_weights
        return real(cfg, class_weights=class_weights, ignore_index=ignore_index)

    monkeypatch.setattr(training_module, "build_loss", spy)
    train(_cfg(tmp_path, "loss.class_weights=median_frequency", "train.epochs=1", "data.max_train_images=8"))
    from pixelwise.data import build_dataset
    from pixelwise.data.stats import median_frequency_weights

    ds = build_dataset("synthetic", "", "train", size=(32, 32), num_images=16, num_classes=3)
    assert torch.allclose(seen["weights"], median_frequency_weights(ds, indices=range(8)))  # the 8 used images
    assert "median-frequency class weights" in capsys.readouterr().out


def test_fcn_stages_train_in_turn(tmp_path):
    stages = [
        "model.name=fcn8s",
        "model.stages=[fcn32s, fcn16s, fcn8s]",
        "model.kwargs={width_div: 16, fc_channels: 32}",
        "train.epochs=1",
        "train.optimizer=sgd",
        "train.lr=0.001",
    ]
    result = train(_cfg(tmp_path, *stages))
    out = tmp_path / "run"
    for stage in ("fcn32s", "fcn16s", "fcn8s"):
        assert load_weights(out / stage / "best.safetensors")[1].model_name == stage
    assert load_weights(out / "best.safetensors")[1].model_name == "fcn8s"
    assert result["metrics"]["miou"] == json.loads((out / "metrics.json").read_text())["scores"]["miou"]
    # a finished staged run resumes to "done" without training again
    stamp = (out / "fcn8s" / "last.pt").stat().st_mtime_ns
    assert not train(_cfg(tmp_path, *stages), resume=True)["interrupted"]
    assert (out / "fcn8s" / "last.pt").stat().st_mtime_ns == stamp


def test_fcn16s_stage_starts_from_fcn32s(tmp_path, monkeypatch):
    from pixelwise.models import fcn as fcn_module

    captured = {}
    real = fcn_module.fcn16s

    def spy(**kwargs):
        captured["init_from"] = kwargs.get("init_from")
        return real(**kwargs)

    monkeypatch.setitem(__import__("pixelwise.models", fromlist=["MODELS"]).MODELS, "fcn16s", spy)
    train(
        _cfg(
            tmp_path,
            "model.name=fcn16s",
            "model.stages=[fcn32s, fcn16s]",
            "model.kwargs={width_div: 16, fc_channels: 32}",
            "train.epochs=1",
            "train.optimizer=sgd",
            "train.lr=0.001",
        )
    )
    first, _ = load_weights(tmp_path / "run" / "fcn32s" / "best.safetensors")
    init = captured["init_from"]
    assert type(init).__name__ == "FCN" and init.stride == 32
    theirs = first.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in init.state_dict().items())


@pytest.mark.skipif(not (DATA / "camvid").is_dir(), reason="needs ../shared/data/camvid")
def test_camvid_short_slice(tmp_path):
    cfg = load_config(
        "camvid/segnet_basic",
        [
            f"data.root={DATA / 'camvid'}",
            f"output.dir={tmp_path / 'camvid'}",
            "data.max_train_images=4",
            "data.max_val_images=2",
            "data.batch_size=2",
            "data.crop_size=[96, 128]",
            "data.scale_range=[0.3, 0.3]",
            "data.workers=0",
            "train.epochs=1",
            "model.kwargs={encoder_channels: 8, decoder_channels: 8}",
            "output.progress=false",
            "output.report=false",
            "train.lr=0.01",
        ],
    )
    result = train(cfg)
    assert result["step"] == 2
    final = json.loads((tmp_path / "camvid" / "metrics.json").read_text())
    assert list(final["scores"]["per_class_iou"]) == [
        "Sky",
        "Building",
        "Pole",
        "Road",
        "Pavement",
        "Tree",
        "SignSymbol",
        "Fence",
        "Car",
        "Pedestrian",
        "Bicyclist",
    ]
    assert final["scores"]["num_pixels"] > 0.8 * 2 * 360 * 480  # two full-size val images, Unlabelled ignored


def test_aux_output_adds_weighted_loss(tmp_path, monkeypatch):
    from pixelwise.models import MODELS

    class TwoHeads(torch.nn.Module):
        """Uniform logits from both heads: each cross-entropy is ln K; (main, aux) in training as DeepLabv3."""

        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.k = num_classes
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            logits = self.w * x[:, :1].expand(-1, self.k, -1, -1) * 0  # (B, K, H, W) zeros with a graph
            return (logits, logits) if self.training else logits

    monkeypatch.setitem(MODELS, "two_heads", lambda *, num_classes: TwoHeads(num_classes))
    train(_cfg(tmp_path, "model.name=two_heads", "model.kwargs={}", "loss.aux_weight=0.4", "train.epochs=1"))
    losses = [r["loss"] for r in _log(tmp_path / "run") if r["kind"] == "train"]
    assert losses == pytest.approx([1.4 * math.log(3)] * 4)


def test_report_tables_and_figures(tmp_path):
    import numpy as np

    from pixelwise.report import write_report

    history = [
        {"kind": "train", "epoch": 1, "step": s, "loss": 1 / s, "lr": 0.1, "images_per_s": 5.0} for s in range(1, 5)
    ] + [{"kind": "val", "epoch": 1, "step": 4, "miou": 0.5}]
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    mask = np.zeros((8, 8), dtype=np.int64)
    mask[0, 0] = 255
    path = write_report(
        tmp_path,
        history=history,
        confusion=np.array([[3, 1], [0, 4]]),
        classes=["a", "b"],
        palette=[(0, 0, 0), (255, 0, 0)],
        samples=[(image, mask, mask)],
        summary={"runs": 1},
        title="t <1>",
    )
    page = path.read_text()
    # IoU a = 3 / (3 + 1 + 0) = 0.75, b = 4 / (4 + 0 + 1) = 0.8
    assert "<th>a</th><td>0.7500</td>" in page and "<th>b</th><td>0.8000</td>" in page
    assert "t &lt;1&gt;" in page and "<th>runs</th><td>1</td>" in page
    for name in ("curves.png", "confusion.png", "iou.png", "samples.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_cli(tmp_path, capsys):
    from pixelwise.cli import main

    config = tmp_path / "tiny.yaml"
    sections: dict[str, dict] = {}
    for item in TINY:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    config.write_text(
        "".join(f"{s}:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items()) for s, fields in sections.items())
    )
    out = tmp_path / "cli"
    assert main(["train", str(config), "--set", f"output.dir={out}", "--set", "train.epochs=1"]) == 0
    assert "done: 4 steps, val mIoU" in capsys.readouterr().out
    assert load_config(out / "config.yaml") == load_config(config, [f"output.dir={out}", "train.epochs=1"])
    assert main(["train", str(config), "--set", "train.epoch=1"]) == 2
    assert "unknown key train.epoch; did you mean train.epochs?" in capsys.readouterr().err
    # a built-in config run where its data.root (a clone's ../shared/data) is not: one line naming the fix
    assert (
        main(
            [
                "train",
                "camvid/segnet_basic",
                "--set",
                f"data.root={tmp_path / 'nowhere'}",
                "--set",
                f"output.dir={tmp_path / 'c'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.root=" in err and "nowhere': no such folder" in err
    assert "--set data.root=PATH" in err


def test_final_validation_with_the_dense_crf(tmp_path):
    train(_cfg(tmp_path, "train.epochs=1", "crf.enabled=true", "crf.iterations=2", out="crf"))
    train(_cfg(tmp_path, "train.epochs=1", out="plain"))
    with_crf = json.loads((tmp_path / "crf" / "metrics.json").read_text())
    without = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert with_crf["inference"]["crf"] == {**CRF_PRESETS["deeplab_vgg"].to_dict(), "iterations": 2}
    assert without["inference"]["crf"] is None
    assert load_weights(tmp_path / "crf" / "best.safetensors")[1].extra["crf"]["iterations"] == 2  # recorded
    # same weights (same seed), scored with and without the CRF: the CRF changes some predictions
    assert with_crf["scores"]["num_pixels"] == without["scores"]["num_pixels"]
    assert with_crf["scores"]["per_class_acc"] != without["scores"]["per_class_acc"]


@pytest.mark.parametrize(
    "mode", [["eval.mode=slide", "eval.window=[32, 32]"], ["eval.mode=multiscale", "eval.scales=[1.0]"]]
)
def test_eval_modes_reduce_to_whole_image(tmp_path, mode):
    # one window covering the image, or the single scale 1: the same scores as whole-image inference
    train(_cfg(tmp_path, "train.epochs=1", out="whole"))
    train(_cfg(tmp_path, "train.epochs=1", *mode, out="mode"))
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())["scores"]
    b = json.loads((tmp_path / "mode" / "metrics.json").read_text())["scores"]
    assert a == b


def test_multiscale_eval_runs(tmp_path):
    train(_cfg(tmp_path, "train.epochs=1", "eval.mode=multiscale", "eval.scales=[0.5, 1.5]", "eval.flip=true"))
    assert 0 <= json.loads((tmp_path / "run" / "metrics.json").read_text())["scores"]["miou"] <= 1


def test_lr_multipliers_reach_the_optimiser_groups(tmp_path):
    """DeepLab's solver: the classifier at 10x, biases at 2x (so the classifier's bias at 20x), biases undecayed."""
    cfg = _cfg(
        tmp_path,
        "train.optimizer=sgd",
        "train.lr=0.01",
        "train.head_lr_mult=10",
        "train.bias_lr_mult=2",
        "train.weight_decay=0.001",
        "train.epochs=1",
    )
    model = get_model("segnet_basic", num_classes=3, encoder_channels=8, decoder_channels=8)
    optimizer = build_optimizer(cfg, model)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    expected = {
        "head.weight": (0.1, 0.001),
        "head.bias": (0.2, 0.0),
        "encoder.convs.0.0.weight": (0.01, 0.001),
        "encoder.convs.0.1.bias": (0.02, 0.0),
        "encoder.convs.0.1.weight": (0.01, 0.0),
    }
    for name, (lr, wd) in expected.items():
        g = group_of[id(names[name])]
        assert (g["lr"], g["weight_decay"]) == pytest.approx((lr, wd)), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)

    # the schedule keeps the factors: at every step each group's lr is the scheduled rate times its lr_mult
    seen = []
    real_step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(sorted((g["lr_mult"], g["lr"]) for g in self.param_groups))
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", spy)
        train(cfg)
    assert seen[0][0] == (1.0, pytest.approx(0.01)) and seen[-1][0][1] < 0.01  # poly decay
    assert all(lr == pytest.approx(step[0][1] * mult) for step in seen for mult, lr in step)
    assert {mult for mult, _ in seen[0]} == {1.0, 2.0, 10.0, 20.0}


def test_default_optimiser_has_two_groups(tmp_path):
    """Unchanged defaults give the layout checkpoints had before the multipliers (decayed / not decayed)."""
    cfg = _cfg(tmp_path)
    model = get_model("unet", num_classes=3, padding="same", base_channels=4, depth=2)
    optimizer = build_optimizer(cfg, model)
    assert [(g["lr_mult"], g["weight_decay"] > 0) for g in optimizer.param_groups] == [(1.0, True), (1.0, False)]


def test_decoded_cache_changes_nothing_but_speed(tmp_path):
    """Training from the in-memory cache sees exactly the samples it would decode from disk."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "camvid"
    for split, n in (("train", 8), ("val", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
            Image.fromarray(rng.integers(0, 12, (24, 32), dtype=np.uint8)).save(root / f"{split}annot" / f"{i}.png")
    common = [
        *TINY[1:],
        "data.dataset=camvid",
        f"data.root={root}",
        "data.crop_size=[16, 16]",
        "train.epochs=1",
        "train.deterministic=true",
    ]
    losses = {}
    for cache in (0, 64):
        cfg = load_config(None, [*common, f"data.cache_mb={cache}", f"output.dir={tmp_path / str(cache)}"])
        train(cfg)
        losses[cache] = [r["loss"] for r in _log(tmp_path / str(cache)) if r["kind"] == "train"]
    assert len(losses[0]) == 2 and losses[0] == losses[64]


def test_optimizer_state_of_an_fcn8s_checkpoint_before_the_anatomy_follows_its_parameters(tmp_path):
    """FCN-8s registered upscore2 between score_pool4 and score_pool3 before its layers were grouped into
    head and decoder; an optimiser lists parameters by position, so the momentum of an old checkpoint
    must be moved to the parameters it belongs to (engine.state.align_optimizer_state)."""
    from pixelwise.engine.state import align_optimizer_state

    cfg = _cfg(tmp_path, "train.optimizer=sgd", "train.bias_lr_mult=2")
    model = get_model("fcn8s", num_classes=3, width_div=16, fc_channels=32)
    to_old = {"encoder.fc.": "fc.", "head.": "", "decoder.": ""}  # the old names of today's prefixes
    old_name = {
        id(p): next((old + n[len(new) :] for new, old in to_old.items() if n.startswith(new)), n)
        for n, p in model.named_parameters()
    }
    old_order = [p for _, p in model.named_parameters()]
    names = [old_name[id(p)] for p in old_order]
    upscore2 = old_order.pop(names.index("upscore2.up.weight"))
    old_order.insert(names.index("score_pool3.weight"), upscore2)  # before it: the old registration order

    class OldLayout(torch.nn.Module):
        """The same parameter objects, registered in the old order (names with '_' for '.')."""

        def __init__(self) -> None:
            super().__init__()
            for p in old_order:
                self.register_parameter(old_name[id(p)].replace(".", "_"), p)

    old_optimizer = build_optimizer(cfg, OldLayout())
    for p in old_order:
        p.grad = torch.randn_like(p)
    old_optimizer.step()  # momentum buffers: one per parameter, of its shape
    old_keys = [old_name[id(p)] for p in old_order]

    optimizer = build_optimizer(cfg, model)
    optimizer.load_state_dict(align_optimizer_state(old_optimizer.state_dict(), old_keys, model, optimizer))
    for p in old_order:
        if p.requires_grad:
            assert torch.equal(optimizer.state[p]["momentum_buffer"], old_optimizer.state[p]["momentum_buffer"])
    # a checkpoint of the current layout comes back as it was
    current = optimizer.state_dict()
    assert align_optimizer_state(current, list(model.state_dict()), model, optimizer) == current


def test_freeze_encoder_trains_only_the_decoder_and_head(tmp_path, monkeypatch):
    seen = {}
    real_build_optimizer = training_module.build_optimizer

    def spy(cfg, model):
        seen["model"] = model
        seen["encoder"] = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        seen["head"] = {k: v.clone() for k, v in model.head.state_dict().items()}
        return real_build_optimizer(cfg, model)

    monkeypatch.setattr(training_module, "build_optimizer", spy)
    train(_cfg(tmp_path, "train.freeze_encoder=true", "train.epochs=1"))
    model = seen["model"]
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(torch.equal(v, seen["encoder"][k]) for k, v in model.encoder.state_dict().items())
    assert not all(torch.equal(v, seen["head"][k]) for k, v in model.head.state_dict().items())


def test_init_weights_fine_tunes_from_a_run_of_another_class_count(tmp_path, capsys):
    """model.init_weights (mmseg's load_from): every tensor that fits comes from the file, the head of a
    different class count keeps the builder's init; a file of another model is one line naming the key."""
    first = tmp_path / "three"
    train(load_config(None, [*TINY, "train.epochs=1", f"output.dir={first}"]))
    theirs = load_weights(first / "best.safetensors")[0].state_dict()
    fresh = get_model("unet", num_classes=5, padding="same", base_channels=4, depth=2)
    loaded, kept = load_matching(fresh, first / "best.safetensors")
    assert kept == ["head.bias", "head.weight"] and len(loaded) == len(theirs) - 2
    assert all(torch.equal(theirs[k], v) for k, v in fresh.state_dict().items() if k in loaded)
    other = get_model("unet", num_classes=5, padding="same", base_channels=4, depth=2)
    assert load_matching(other, first / "last.pt")[1] == ["head.bias", "head.weight"]  # a run's checkpoint too

    five = [*TINY, "train.epochs=1", "data.kwargs={size: [32, 32], num_images: 16, num_classes: 5}"]
    init = f"model.init_weights={first / 'best.safetensors'}"
    cfg = load_config(None, [*five, init, "train.freeze_encoder=true", f"output.dir={tmp_path / 'five'}"])
    train(cfg)
    assert "kept the builder's init for 2: head.bias, head.weight" in capsys.readouterr().out
    ours = load_weights(tmp_path / "five" / "best.safetensors")[0].state_dict()
    encoder = [k for k in ours if k.startswith("encoder.")]
    assert encoder and all(torch.equal(theirs[k], ours[k]) for k in encoder)  # frozen: still the file's
    assert ours["head.weight"].shape[0] == 5
    other = [*TINY, "model.name=segnet_basic", "model.kwargs={}", init, f"output.dir={tmp_path / 'other'}"]
    with pytest.raises(UserError, match=r"^model\.init_weights=.*: only 1 of the 50 tensors of this SegNet fit"):
        train(load_config(None, other))


def test_max_minutes_ends_the_run_after_the_epoch_in_which_it_runs_out(tmp_path, capsys):
    cfg = _cfg(tmp_path, "train.epochs=5", "train.max_minutes=0.00001", "eval.every_epochs=3")
    result = train(cfg)
    assert not result["interrupted"] and result["epoch"] == 1 and result["step"] == 4
    out = capsys.readouterr().out
    assert "train.max_minutes=1e-05 reached in epoch 1 (step 4)" in out
    assert "final validation: scoring the best weights" in out and "on 4 images -> metrics.json" in out
    log = _log(tmp_path / "run")
    assert [r["epoch"] for r in log if r["kind"] == "val"] == [1]  # the last epoch is validated, as epochs' last
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "best.safetensors").is_file()
    with pytest.raises(UserError, match=r"train\.max_minutes=-1\.0 must be 0 \(no limit\) or more"):
        _cfg(tmp_path, "train.max_minutes=-1")


def test_separable_deeplabv3plus_trains_and_its_weights_rebuild_it(tmp_path):
    # the builder option travels config -> model -> best.safetensors metadata -> the rebuilt model
    cfg = _cfg(
        tmp_path,
        "model.name=deeplabv3plus_resnet50",
        "model.kwargs={separable: true}",
        "data.kwargs={size: [32, 32], num_images: 4, num_classes: 3}",
        "data.max_val_images=2",
        "train.epochs=1",
        "output.log_every_steps=1",
    )
    result = train(cfg)
    assert not result["interrupted"] and result["step"] == 1
    model, meta = load_weights(tmp_path / "run" / "best.safetensors")
    assert meta.model_name == "deeplabv3plus_resnet50" and meta.model_kwargs == {"separable": True}
    assert sum(isinstance(m, SeparableConv2d) for m in model.modules()) == 5  # 3 in ASPP, 2 in the decoder
    assert math.isfinite(_log(tmp_path / "run")[0]["loss"])


@pytest.mark.skipif(not (DATA / "isbi2012").is_dir(), reason="needs ../shared/data/isbi2012")
def test_isbi_training_validates_with_the_challenge_scores(tmp_path):
    """Validation on ISBI 2012 logs V_Rand / V_Info / pixel error beside mIoU (the curve of a U-Net
    reproduction), and metrics.json holds them for the best weights."""
    sets = [
        f"data.root={DATA / 'isbi2012'}",
        f"output.dir={tmp_path / 'isbi'}",
        "data.max_train_images=2",
        "data.max_val_images=1",
        "data.crop_size=[32, 32]",
        "data.workers=0",
        "train.epochs=1",
        "model.kwargs={padding: valid, depth: 2, base_channels: 4}",
        "output.progress=false",
        "output.report=false",
    ]
    train(load_config("isbi2012/unet", sets))
    val = [r for r in _log(tmp_path / "isbi") if r["kind"] == "val"]
    assert len(val) == 1 and 0 <= val[0]["v_rand"] <= 1 and 0 <= val[0]["v_info"] <= 1
    final = json.loads((tmp_path / "isbi" / "metrics.json").read_text())["scores"]
    assert final["isbi_challenge"]["v_rand"] == pytest.approx(val[0]["v_rand"])


def test_elastic_deformation_kinds_and_the_crop_the_smooth_one_needs():
    with pytest.raises(UserError, match=r"data\.crop_size=\[20, 20\] is too small for data\.elastic=smooth"):
        load_config(None, ["data.elastic=smooth", "data.crop_size=[20, 20]"])
    assert load_config(None, ["data.elastic=true", "data.crop_size=[20, 20]"]).data.elastic is True  # the grid
    with pytest.raises(UserError, match=r"data\.elastic='warp' is unknown; give true"):
        load_config(None, ["data.elastic=warp"])


def test_weights_record_the_synthetic_geometry_evaluate_scores(tmp_path):
    """Trained on 32x32 synthetic images: `evaluate --dataset synthetic` scores 32x32 ones, not the default 128."""
    import argparse

    from pixelwise.evaluate import _dataset
    from pixelwise.weights import read_weights_meta

    train(_cfg(tmp_path, "train.epochs=1", "data.max_train_images=8"))
    meta = read_weights_meta(tmp_path / "run" / "best.safetensors")
    assert meta.extra["synthetic_size"] == [32, 32]
    args = argparse.Namespace(dataset="synthetic", data="", split="val", weights="w")
    image, _ = _dataset(args, meta)[0]
    assert tuple(image.shape[-2:]) == (32, 32)


def test_a_checkpoint_with_bytes_flipped_inside_a_tensor_is_refused_on_resume(tmp_path):
    """torch.load does not check the zip's CRCs: the checkpoint's own digest catches changed tensor bytes."""
    import zipfile

    cfg = _cfg(tmp_path, "train.epochs=2")
    train(cfg, stop_at_step=4)
    last = tmp_path / "run" / "last.pt"
    data = bytearray(last.read_bytes())
    with zipfile.ZipFile(last) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    local_extra = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    offset = info.header_offset + 30 + len(info.filename.encode()) + local_extra + info.file_size // 2  # stored
    data[offset] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"last\.pt: damaged: its contents do not match the checksum"):
        train(cfg, resume=True)


def test_best_metric_picks_the_weights_by_another_validation_score(tmp_path):
    """eval.best_metric: the kept weights are those of the best validation by that score (here pixel
    accuracy); a data set's own score on another data set is one line naming the key."""
    train(_cfg(tmp_path, "train.epochs=3", "eval.best_metric=pixel_acc"))
    val = [r for r in _log(tmp_path / "run") if r["kind"] == "val"]
    best = max(val, key=lambda r: r["pixel_acc"])
    assert load_weights(tmp_path / "run" / "best.safetensors")[1].extra["epoch"] == best["epoch"]
    with pytest.raises(UserError, match=r"eval\.best_metric='v_rand' must be one of .* \(data\.dataset isbi2012\)"):
        _cfg(tmp_path, "eval.best_metric=v_rand")


def test_optimizers_use_the_fused_step_where_torch_has_one_and_resume_keeps_it(tmp_path, monkeypatch):
    """SGD and AdamW take torch's fused kernel (one kernel over all tensors) on this CPU; a checkpoint
    written by a for-loop optimiser resumes with this process's fused step."""
    model = get_model("unet", num_classes=3, padding="same", base_channels=4, depth=2)
    for name in ("sgd", "adamw"):
        cfg = load_config(None, [f"train.optimizer={name}"])
        assert all(group["fused"] for group in build_optimizer(cfg, model).param_groups)
    cfg = _cfg(tmp_path, "train.epochs=2")
    train(cfg, stop_at_step=4)
    last = tmp_path / "run" / "last.pt"
    ckpt = load_checkpoint(last)
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"] = None  # as a torch without the fused CPU kernel writes it
    from pixelwise.engine.state import digest

    ckpt["digest"] = digest(ckpt)
    torch.save(ckpt, last)
    seen = []
    original = training_module.restore

    def spy(run):
        original(run)
        seen.extend(group["fused"] for group in run.optimizer.param_groups)

    monkeypatch.setattr(training_module, "restore", spy)
    train(cfg, resume=True)
    assert seen and all(seen)
