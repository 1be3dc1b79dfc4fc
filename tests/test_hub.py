"""Hub-style saving and loading (save_pretrained / from_pretrained / push_to_hub through huggingface_hub's
PyTorchModelHubMixin), offline: a folder round-trips to identical outputs with the network cut, the CLI
reads the folder with --weights, push_to_hub uploads that folder, and each failure is one clear line."""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import main
from pixelwise.errors import UserError
from pixelwise.models import MODELS, from_pretrained, get_model
from pixelwise.models.hub import HubMixin, _carrier
from pixelwise.models.segnet import SegNet
from pixelwise.models.unet import UNet
from pixelwise.weights import load_weights

pytest.importorskip("huggingface_hub")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

UNET = {"base_channels": 4, "depth": 2, "padding": "same"}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (loading a local folder must not touch the Hub)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("unet", UNET),
        ("segnet_basic", {"encoder_channels": 8, "decoder_channels": 8}),
        ("fcn8s", {"width_div": 16, "fc_channels": 32}),
    ],
)
def test_save_pretrained_round_trips_to_identical_outputs_offline(tmp_path, no_network, name, kwargs):
    torch.manual_seed(0)
    model = get_model(name, num_classes=3, **kwargs).eval()
    with torch.no_grad():  # FCN zero-initialises its scores: random values make the comparison meaningful
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "m", classes=["sky", "road", "car"])
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_name"] == name and config["model_kwargs"] == kwargs
    assert config["classes"] == ["sky", "road", "car"]

    loaded = from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.weights_meta.classes == ["sky", "road", "car"]
    assert type(model).from_pretrained(str(tmp_path / "m")).builder == (name, {"num_classes": 3, **kwargs})


def test_a_loaded_model_saves_again_with_its_metadata(tmp_path):
    model = get_model("unet", num_classes=2, **UNET)
    model.save_pretrained(tmp_path / "a", classes=["bg", "cell"], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("a", "b"))
    assert a == b and b["classes"] == ["bg", "cell"] and b["std"] == [0.25, 0.25, 0.25]


def test_every_model_class_has_the_hub_methods():
    for name in MODELS:
        with torch.device("meta"):  # no memory: only the class matters
            model = get_model(name, num_classes=2)
        assert isinstance(model, HubMixin), name
        assert model.builder == (name, {"num_classes": 2}), name


def test_the_folder_is_what_the_cli_reads_with_weights(tmp_path, capsys, monkeypatch):
    get_model("unet", num_classes=3, **UNET).save_pretrained(tmp_path / "m")
    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 28, 3), 120, dtype=np.uint8)).save(image)
    assert main(["predict", "--weights", str(tmp_path / "m"), str(image), "--out", str(tmp_path / "p")]) == 0
    mask = np.asarray(Image.open(tmp_path / "p" / "masks" / "x.png"))
    model, meta = load_weights(tmp_path / "m")
    x = (torch.full((1, 3, 20, 28), 120 / 255) - torch.tensor(meta.mean)[:, None, None]) / torch.tensor(meta.std)[
        :, None, None
    ]
    with torch.no_grad():
        assert (model(x).argmax(1)[0].numpy() == mask).all()

    rc = main(["evaluate", "--weights", str(tmp_path / "m"), "--data", "", "--dataset", "synthetic"])
    assert rc == 0
    assert (tmp_path / "eval_m_synthetic_val" / "metrics.json").is_file()  # beside the folder, not inside it

    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)
    assert main(["serve", "--weights", str(tmp_path / "m"), "--port", "0"]) == 0
    assert "pixelwise serve: unet (3 classes)" in capsys.readouterr().out


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploads.append((repo_id, sorted(p.name for p in folder_path.iterdir())))
            model, meta = load_weights(folder_path)  # what a user would download is loadable
            uploads.append(meta.classes)
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    model = get_model("unet", num_classes=2, **UNET)
    url = model.push_to_hub("someone/tiny-unet", classes=["bg", "fg"])
    assert url.startswith("https://huggingface.co/someone/tiny-unet")
    assert uploads == [("someone/tiny-unet", ["README.md", "config.json", "model.safetensors"]), ["bg", "fg"]]


def test_a_repo_id_is_downloaded_through_huggingface_hub(tmp_path, monkeypatch):
    get_model("unet", num_classes=2, **UNET).save_pretrained(tmp_path / "cache")
    asked = []

    def download(*, repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename, revision))
        return str(tmp_path / "cache" / filename)

    monkeypatch.setattr("huggingface_hub.hub_mixin.hf_hub_download", download)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    model = from_pretrained("someone/tiny-unet", revision="v1")
    assert isinstance(model, UNet)
    assert asked == [("someone/tiny-unet", "config.json", "v1"), ("someone/tiny-unet", "model.safetensors", "v1")]


def test_user_errors_are_one_line(tmp_path, no_network, capsys):
    with pytest.raises(UserError, match="does not record its builder; build it with pixelwise.models.get_model"):
        UNet(num_classes=2).save_pretrained(tmp_path / "x")

    get_model("unet", num_classes=2, **UNET).save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match=r"holds a UNet \(unet\), not a SegNet; load it with pixelwise.models"):
        SegNet.from_pretrained(tmp_path / "m")

    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "classes": ["a", "b"]}))
    with pytest.raises(UserError, match="config.json and model.safetensors describe different models"):
        from_pretrained(tmp_path / "m")

    with pytest.raises(UserError, match="no such folder, and the Hub does not give it"):
        from_pretrained("someone/not-here")

    (tmp_path / "empty").mkdir()
    rc = main(["evaluate", "--weights", str(tmp_path / "empty"), "--data", "", "--dataset", "synthetic"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "has no model.safetensors; give a folder written by" in err


def test_without_huggingface_hub_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now fails
    _carrier.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'pixelwise\[hub\]'") as e:
            get_model("unet", num_classes=2, **UNET).save_pretrained(tmp_path / "m")
        assert e.value.name == "huggingface_hub"  # what the CLI maps to the extra (MISSING_EXTRA)
    finally:
        _carrier.cache_clear()
