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
    save_weights(
        path,
        model,
        model_name="unet",
        model_kwargs=kwargs,
        classes=["a", "b", "c"],
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        extra={"crop": [32, 32]},
    )
    meta = read_weights_meta(path)
    assert meta.model_name == "unet" and meta.model_kwargs == kwargs and meta.classes == ["a", "b", "c"]
    assert meta.palette == default_palette(3) and meta.mean == (0.5, 0.5, 0.5) and meta.extra == {"crop": [32, 32]}
    loaded, _ = load_weights(path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training


def test_int8_storage_round_trip_is_smaller_and_close(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from pixelwise.models import get_model
    from pixelwise.weights import INT8_SCALE

    torch.manual_seed(0)
    kwargs = {"base_channels": 16, "depth": 2, "padding": "same"}
    model = get_model("unet", num_classes=3, **kwargs).eval()
    paths = {"float": tmp_path / "f.safetensors", "int8": tmp_path / "q.safetensors"}
    for name, path in paths.items():
        save_weights(path, model, model_name="unet", model_kwargs=kwargs, classes=["a", "b", "c"], int8=name == "int8")
    assert paths["int8"].stat().st_size < 0.35 * paths["float"].stat().st_size  # fp32 -> int8, small ones kept
    with safe_open(str(paths["int8"]), framework="pt") as f:
        keys = json.loads(f.metadata()["int8"])
        assert keys and all(f.get_tensor(k).dtype == torch.int8 for k in keys)
        header = f.metadata()
    assert all(model.state_dict()[k].numel() >= 4096 for k in keys)  # small tensors stay floating
    loaded, _ = load_weights(paths["int8"])
    for k, v in model.state_dict().items():  # each weight within half a quantisation step of its channel's scale
        step = v.abs().amax(dim=tuple(range(1, v.dim())), keepdim=True) / 127 if k in keys else 0
        assert ((loaded.state_dict()[k] - v).abs() <= step / 2 + 1e-7).all(), k
    x = torch.randn(1, 3, 32, 32)
    assert (loaded(x).argmax(1) == model(x).argmax(1)).float().mean() > 0.99
    for damage in ("lost", "float16", "complex64"):  # a scale lost or of another type: one line naming the tensor
        state = load_file(str(paths["int8"]))
        scale = state.pop(keys[0] + INT8_SCALE)
        if damage != "lost":
            state[keys[0] + INT8_SCALE] = scale.to(getattr(torch, damage))
        save_file(state, str(tmp_path / "bad.safetensors"), metadata=header)
        with pytest.raises(UserError, match=r"bad\.safetensors: .*" + keys[0].replace(".", r"\.")):
            load_weights(tmp_path / "bad.safetensors")


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


# ---- metadata schema: every field checked before anything is built -------------------------------------

UNET = {"base_channels": 4, "depth": 2, "padding": "same"}


def _with_meta(tmp_path, change) -> "os.PathLike":
    """A valid U-Net weights file whose metadata JSON was edited by `change(meta)`."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from pixelwise.models import get_model

    good = tmp_path / "good.safetensors"
    save_weights(
        good,
        get_model("unet", num_classes=3, **UNET),
        model_name="unet",
        model_kwargs=UNET,
        classes=["a", "b", "c"],
        extra={"crop_size": [32, 32]},
    )
    with safe_open(str(good), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(header["meta"])
    change(meta)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata={**header, "meta": json.dumps(meta)})
    return path


def _set(key, value):
    def change(meta):
        target, _, leaf = key.rpartition(".")
        (meta[target] if target else meta)[leaf] = value

    return change


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("model_kwargs.num_classes", 3, "may not set it"),
        ("model_kwargs.base_channels", "4", "an integer"),
        ("model_kwargs.depth", 10**9, "an integer in 0..65536"),
        ("model_kwargs.colour", 1, "no option 'colour'; it takes"),
        ("model_kwargs.norm_layer", "BatchNorm2d", "not storable"),
        ("model_name", "unet3d", "choose one of"),
        ("classes", [], "1 to 65536 class names"),
        ("palette", [[0, 0, 0], [1, 1, 1]], "one [r, g, b] colour (0..255) per class, 3 in all"),
        ("palette", [[0, 0, 0], [1, 1, 1], [300, 0, 0]], "per class"),
        ("ignore_index", 1, "not a class index (0..2)"),
        ("ignore_index", "255", "an integer"),
        ("mean", [0.5, 0.5], "3 finite numbers"),
        ("std", [0.2, 0.0, 0.2], "all above 0"),
        ("std", [0.2, float("nan"), 0.2], "finite"),
        ("extra.crop_size", [100000, 100000], "two integers in 1..65536"),
        ("extra.crop_size", "big", "[height, width]"),
        ("extra", [], "a JSON object"),
        ("surprise", 1, "no such field"),
    ],
)
def test_metadata_is_checked_against_a_schema_before_use(tmp_path, key, value, words):
    """Each of these was a traceback in predict or serve (TypeError, IndexError, ...), or was accepted and made
    every request of the service a 500."""
    path = _with_meta(tmp_path, _set(key, value))
    with pytest.raises(UserError) as e:
        load_weights(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: metadata {key}=") and words in message, message


def test_tensor_shapes_are_checked_before_the_model_is_built_for_real(tmp_path, monkeypatch):
    """base_channels=4096 built a multi-GB model before any tensor was compared with it."""
    from pixelwise import models

    devices = []
    build = models.get_model

    def recording(*args, **kwargs):
        devices.append(torch.empty(0).device.type)  # "meta" inside `with torch.device("meta")`
        return build(*args, **kwargs)

    monkeypatch.setattr(models, "get_model", recording)
    path = _with_meta(tmp_path, _set("model_kwargs.base_channels", 64))
    devices.clear()
    with pytest.raises(UserError) as e:
        load_weights(path)
    assert devices == ["meta"]  # never built with real memory
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: the tensors do not fit model 'unet' with ")
    assert '"base_channels": 64' in message and "size mismatch" in message
    assert "torch.Size([64, 3, 3, 3])" in message  # the declared (big) model's shape
    path = _with_meta(tmp_path, lambda meta: None)
    devices.clear()
    load_weights(path)
    assert devices == ["meta", "cpu"]  # checked, then built
