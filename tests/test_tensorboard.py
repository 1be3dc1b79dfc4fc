"""output.tensorboard: the training run's scalars, per-class IoU and example predictions, read back from the
event files with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json

import pytest

from pixelwise.config import load_config
from pixelwise.engine.training import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = [
    "data.kwargs={size: [32, 32], num_images: 8, num_classes: 3}",
    "data.crop_size=[32, 32]",
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
    "output.report_images=2",
]


def _events(out):
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_what_metrics_jsonl_holds_plus_classes_and_images(tmp_path):
    cfg = load_config(None, [*TINY, f"output.dir={tmp_path / 'run'}", "output.tensorboard=true"])
    train(cfg)
    out = tmp_path / "run"
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = _events(out)
    tags = acc.Tags()
    for kind, names in (("train", ("loss", "lr", "images_per_s")), ("val", ("miou", "pixel_acc", "mean_acc"))):
        records = [r for r in log if r["kind"] == kind]
        for name in names:
            events = acc.Scalars(f"{kind}/{name}")
            assert [e.step for e in events] == [r["step"] for r in records], (kind, name)
            assert [e.value for e in events] == pytest.approx([r[name] for r in records], rel=1e-6), (kind, name)
    # the last validation scored the best weights (its mIoU is the highest), as metrics.json does
    assert log[-1]["miou"] == max(r["miou"] for r in log if r["kind"] == "val")
    final = json.loads((out / "metrics.json").read_text())["scores"]["per_class_iou"]
    present = {name: v for name, v in final.items() if v is not None}
    assert present and {t for t in tags["scalars"] if t.startswith("val_iou/")} == {f"val_iou/{n}" for n in present}
    for name, value in present.items():
        assert acc.Scalars(f"val_iou/{name}")[-1].value == pytest.approx(value, rel=1e-5), name
    assert sorted(tags["images"]) == ["val_examples/0", "val_examples/1"]
    image = acc.Images("val_examples/0")[-1]
    assert (image.width, image.height) == (3 * 32, 32)  # image | ground truth | prediction
    assert image.step == log[-1]["step"]


def test_off_by_default_and_without_the_package_the_error_names_the_extra(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, f"output.dir={tmp_path / 'run'}", "train.epochs=1"])
    train(cfg)
    assert not (tmp_path / "run" / "tensorboard").exists()

    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = load_config(None, [*TINY, f"output.dir={tmp_path / 'run2'}", "output.tensorboard=true"])
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'pixelwise\[tensorboard\]'") as e:
        train(cfg)
    assert e.value.name == "tensorboard"
