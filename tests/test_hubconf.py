"""torch.hub: hubconf.py offers every builder in MODELS, and loads them as get_model does (source="local")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixelwise.models import MODELS, get_model

REPO = str(Path(__file__).resolve().parents[1])
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_segnet_basic_with_its_built_in_weights_loads_through_torch_hub():
    model = torch.hub.load(REPO, "segnet_basic", source="local", weights="camvid")
    reference = get_model("segnet_basic", weights="camvid")
    assert not model.training
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_every_builder_is_a_torch_hub_entry_point():
    for name in MODELS:
        if name.endswith("_timm"):
            pytest.importorskip("timm")
        with torch.device("meta"):  # no memory: the entry point and its arguments are what is checked
            model = torch.hub.load(REPO, name, source="local", num_classes=3)
        assert model.builder == (name, {"num_classes": 3}), name


def test_builder_arguments_and_their_errors_pass_through():
    model = torch.hub.load(REPO, "unet", source="local", num_classes=2, base_channels=4, padding="same")
    assert model(torch.randn(1, 3, 20, 20)).shape == (1, 2, 20, 20)
    with pytest.raises(ValueError, match="model 'unet' takes no argument 'widht'"):
        torch.hub.load(REPO, "unet", source="local", num_classes=2, widht=4)
