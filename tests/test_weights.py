"""Weights files round-trip with their metadata; checkpoints never run code on load."""

import os
import pickle

import pytest
import torch

from pixelwise.errors import UserError
from pixelwise.fileio import atomic_path, atomic_write_text
from pixelwise.weights import (
    default_palette,
    load_checkpoint,
    load_torchvision_state,
    load_weights,
    read_weights_meta,
    save_weights,
)


def test_default_palette_is_the_voc_colour_map():
    p = default_palette(21)
    assert p[0] == (0, 0, 0) and p[1] == (128, 0, 0) and p[2] == (0, 128, 0) and p[15] == (192, 128, 128)
    assert len(set(default_palette(256))) == 256


def test_weights_round_trip(tmp_path):
    from pixelwise.models import get_model

    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "depth": 2, "padding": "same"}
    model = get_model("unet", num_classes=3, **kwargs).eval()
    path = tmp_path / "w.safetensors"
    save_weights(path, model, model_name="unet", model_kwargs=kwargs, classes=["a", "b", "c"],
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), extra={"crop": [32, 32]})
    meta = read_weights_meta(path)
    assert meta.model_name == "unet" and meta.model_kwargs == kwargs and meta.classes == ["a", "b", "c"]
    assert meta.palette == default_palette(3) and meta.mean == (0.5, 0.5, 0.5) and meta.extra == {"crop": [32, 32]}
    loaded, _ = load_weights(path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training


def test_weights_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_weights_meta(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="bad.safetensors"):
        read_weights_meta(bad)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(_Evil.marker),))


def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    ckpt = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, ckpt)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(ckpt)
    with pytest.raises(UserError, match="refused"):
        load_torchvision_state(ckpt)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_checkpoint_round_trip_and_truncation(tmp_path):
    ckpt = tmp_path / "ok.pt"
    state = {"model": {"w": torch.arange(4.0)}, "step": 3, "rng": torch.get_rng_state()}
    torch.save(state, ckpt)
    assert load_checkpoint(ckpt)["step"] == 3
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(UserError, match="damaged or truncated"):
        load_checkpoint(cut)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    target = tmp_path / "mode.txt"
    atomic_write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_weights_file_gets_the_usual_file_mode(tmp_path):
    import torch.nn as nn

    path = tmp_path / "w.safetensors"
    save_weights(path, nn.Conv2d(3, 2, 1), model_name="unet", model_kwargs={}, classes=["a", "b"])
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
