"""Config: YAML maps 1:1 onto the dataclasses, overrides, clear errors, and every shipped config loads."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from pixelwise.config import CONFIGS_DIR, Config, config_from_dict, config_to_dict, load_config
from pixelwise.errors import UserError

CONFIGS = sorted(CONFIGS_DIR.rglob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_fields(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  lr: 1e-3\n  epochs: 3\nmodel:\n  name: segnet_basic\n"))
    assert cfg.train.lr == 0.001  # YAML 1.1 reads 1e-3 as text; a float field accepts it
    assert cfg.train.epochs == 3 and cfg.model.name == "segnet_basic"
    assert cfg.data == Config().data  # untouched sections keep their defaults
    assert load_config(None) == Config()


def test_round_trip_through_yaml():
    cfg = load_config(None, ["train.lr=0.5", "data.crop_size=[64, 96]", "model.kwargs.base_channels=8"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_overrides():
    cfg = load_config(
        None,
        [
            "train.epochs=7",
            "train.amp=bf16",
            "data.crop_size=[32,48]",
            "model.kwargs.padding=same",
            "model.kwargs.depth=2",
            "loss.class_weights=[1, 2.5]",
            "crf.enabled=true",
            "data.root=",
        ],
    )
    assert cfg.train.epochs == 7 and cfg.train.amp == "bf16"
    assert cfg.data.crop_size == [32, 48]
    assert cfg.model.kwargs == {"padding": "same", "depth": 2}
    assert cfg.loss.class_weights == [1.0, 2.5]
    assert cfg.crf.enabled is True and cfg.data.root == ""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], r"unknown key train\.lrr; did you mean train\.lr\?"),
        (["trian.lr=1"], r"unknown section 'trian'; did you mean train\?"),
        (["train.lr=fast"], r"train\.lr must be a number, got 'fast'"),
        (["train.epochs=2.5"], r"train\.epochs must be an integer"),
        (["data.crop_size=64"], r"data\.crop_size must be a list of an integer"),
        (["data.flip=maybe"], r"data\.flip must be true/false"),
        (["train.optimizer=adam"], r"train\.optimizer='adam' is not allowed; choose one of sgd, adamw"),
        (["loss.class_weights=inverse"], r"loss\.class_weights='inverse' must be none, median_frequency or a list"),
        (["train.epochs"], r"expected KEY=VALUE"),
        (["train.lr.x=1"], r"train\.lr is not a mapping"),
        (["data.crop_size=[0, 4]"], r"crop_size=\[0, 4\] must be two positive sizes"),
    ],
)
def test_override_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_file_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(UserError, match=r"c\.yaml: unknown key data\.batchsize; did you mean data\.batch_size\?"):
        load_config(_write(tmp_path, "data:\n  batchsize: 4\n"))
    with pytest.raises(UserError, match=r"c\.yaml: not valid YAML"):
        load_config(_write(tmp_path, "train: [\n"))
    with pytest.raises(UserError, match=r"c\.yaml: section 'train' must be a mapping"):
        load_config(_write(tmp_path, "train: 3\n"))
    with pytest.raises(UserError, match=r"missing\.yaml: no such file, nor a built-in config of that name"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"model\.stages=.* must end with model\.name"):
        load_config(_write(tmp_path, "model:\n  name: fcn8s\n  stages: [fcn32s, fcn16s]\n"))


def test_every_default_has_a_why_comment():
    import dataclasses

    for section in dataclasses.fields(Config):
        lines = inspect.getsource(section.default_factory).splitlines()
        for f in dataclasses.fields(section.default_factory):
            i = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
            assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"{section.name}.{f.name} has no comment"


# every shipped config: keys valid, and the model builds (tiny widths where the builder allows it)
TINY = {
    "unet": {"base_channels": 4},
    "segnet_basic": {"encoder_channels": 8, "decoder_channels": 8},
    "fcn32s": {"width_div": 16, "fc_channels": 256},
    "fcn16s": {"width_div": 16, "fc_channels": 256},
    "fcn8s": {"width_div": 16, "fc_channels": 256},
}


def test_shipped_configs_exist():
    names = {f"{p.parent.name}/{p.name}" for p in CONFIGS}
    assert {
        "camvid/segnet_basic.yaml",
        "camvid/fcn8s.yaml",
        "camvid/unet.yaml",
        "camvid/deeplabv3plus.yaml",
        "isbi2012/unet.yaml",
        "voc/fcn8s_staged.yaml",
        "voc/deeplab_v1.yaml",
        "voc/deeplab_v2.yaml",
        "voc/deeplab_v3.yaml",
        "cityscapes/deeplabv3plus.yaml",
    } <= names


def test_shipped_configs_load_by_name_and_a_file_wins(tmp_path, monkeypatch):
    assert load_config("camvid/segnet_basic") == load_config(CONFIGS_DIR / "camvid" / "segnet_basic.yaml")
    assert load_config("camvid/segnet_basic.yaml", ["train.epochs=2"]).train.epochs == 2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "camvid").mkdir()
    (tmp_path / "camvid" / "segnet_basic").write_text("train:\n  epochs: 3\n")  # a user's file of the same name
    assert load_config("camvid/segnet_basic").train.epochs == 3
    with pytest.raises(UserError, match=r"config configs/camvid/segnet\.yaml: .* did you mean 'camvid/segnet_basic'"):
        load_config("configs/camvid/segnet.yaml")  # an old clone path, outside the clone


def test_every_shipped_config_names_its_paper():
    from pixelwise.config import builtin_configs, config_paper

    configs = builtin_configs()
    assert set(configs) == {p.relative_to(CONFIGS_DIR).with_suffix("").as_posix() for p in CONFIGS}
    assert all(config_paper(p) != "-" for p in configs.values())
    assert config_paper(configs["camvid/segnet_basic"]) == "SegNet (Badrinarayanan et al., TPAMI 2017)"


def test_configs_command_lists_each_and_prints_one(capsys):
    from pixelwise.cli import main

    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("camvid/segnet_basic "))
    assert row.split("  ")[0] == "camvid/segnet_basic"
    for cell in (
        "SegNet (Badrinarayanan et al., TPAMI 2017)",
        "segnet_basic",
        "camvid",
        "520 epochs, sgd lr 0.1 constant, batch 12",
    ):
        assert cell in row
    assert "3 stages x 30 epochs" in next(line for line in lines if line.startswith("voc/fcn8s_staged "))
    assert len([line for line in lines if "epoch" in line]) == len(CONFIGS)
    assert main(["configs", "camvid/segnet_basic"]) == 0
    assert capsys.readouterr().out == (CONFIGS_DIR / "camvid" / "segnet_basic.yaml").read_text()
    assert main(["configs", "camvid/nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "camvid/nope: no such file, nor a built-in config" in err


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads_and_builds(path):
    from pixelwise.data import DATASETS
    from pixelwise.models import MODELS, get_model

    cfg = load_config(path)
    assert cfg.data.dataset in DATASETS
    for name in cfg.model.stages or [cfg.model.name]:
        assert name in MODELS
        kwargs = dict(cfg.model.kwargs)
        params = inspect.signature(MODELS[name]).parameters
        assert set(kwargs) <= set(params), f"{path}: {name} takes no {set(kwargs) - set(params)}"
        if name in TINY:  # cheap to build: build it for real
            get_model(name, num_classes=3, **(kwargs | TINY[name]))
