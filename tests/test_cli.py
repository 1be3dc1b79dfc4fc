"""The command line: help, the model table, one-line errors."""

import subprocess
import sys

import pytest

from pixelwise.cli import main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("models", "configs", "demo", "train", "evaluate", "predict", "init-weights", "export", "serve"):
        assert cmd in out


def test_version_is_pixelwise_and_torch_from_one_source(capsys):
    import tomllib
    from pathlib import Path

    import torch

    import pixelwise

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"pixelwise {pixelwise.__version__} (torch {torch.__version__})\n"
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pixelwise.__version__"}


def test_models_table_lists_every_model(capsys):
    from pixelwise.models import MODELS

    assert main(["models", "--no-flops"]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert f"\n{name} " in out


def test_every_extra_has_its_one_line_error():
    import tomllib
    from pathlib import Path

    from pixelwise.cli import MISSING_EXTRA

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(MISSING_EXTRA.values()) == {"serve", "onnx", "crf", "hub", "timm", "tensorboard"}
    assert extras["all"] == ["pixelwise[serve,onnx,crf,hub,timm,tensorboard]"]
    assert all(extras[name] for name in MISSING_EXTRA.values())


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("fastapi.responses", "serve"),
        ("onnxruntime", "onnx"),
        ("numba", "crf"),
        ("huggingface_hub", "hub"),
        ("tensorboard", "tensorboard"),
        ("timm", "timm"),
    ],
)
def test_missing_extra_is_one_line_naming_it(module, extra, monkeypatch, capsys):
    def needs_it(args):
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr("pixelwise.models.models_command", needs_it)
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"pixelwise models: error: missing package {module!r}; install the extra: pip install 'pixelwise[{extra}]'\n"
    )


def test_unknown_model_is_one_line_error_with_suggestion(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pixelwise",
            "init-weights",
            "fcn8",
            "--num-classes",
            "3",
            "--out",
            str(tmp_path / "w.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "did you mean 'fcn8s'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "w.safetensors").exists()
