"""The wheel is the product: build the sdist, the wheel from that sdist alone, install it into a fresh venv
with no package index, and run the main job there, outside the source tree, as a user would.

The fresh venv takes torch and the other dependencies from the install running this test (no download):
a `.pth` file points it at links to every distribution that install holds except pixelwise itself, so pip
resolves the wheel's requirements against them and the only pixelwise it can import is the wheel's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import site
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_camvid
from PIL import Image

import pixelwise
from pixelwise.config import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = sorted(
    [p.relative_to(ROOT).as_posix() for p in CONFIGS_DIR.rglob("*.yaml")]
    + ["pixelwise/serve/static/index.html"]
    + [f"pixelwise/trained/{name}.safetensors" for name in ("segnet_basic_camvid", "unet_isbi2012")]
)

pytestmark = pytest.mark.slow


def _user_env() -> dict[str, str]:
    """A user's shell: no PYTHONPATH into the source tree, no pip configuration, index or find-links."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    """Run `cmd`; its stdout, or a failure that shows both streams."""
    r = subprocess.run(cmd, cwd=cwd, env=_user_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _build(out: Path) -> tuple[Path, Path]:
    """The sdist from the source tree, then the wheel from the sdist alone (so the sdist must carry it all)."""
    have = version("setuptools")
    if int(have.split(".")[0]) < 77:  # older ones reject the SPDX license string with a page of schema
        pytest.fail(f"setuptools {have} cannot build pixelwise; install the dev extra (setuptools>=77): make test")
    _run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
            str(out),
        ],
        cwd=ROOT,
    )
    sdist = next(out.glob("pixelwise-*.tar.gz"))
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(sdist),
        ],
        cwd=out,
    )
    return sdist, next(out.glob("pixelwise-*.whl"))


def _dependencies_view(dest: Path) -> list[Path]:
    """Folders of links to what this interpreter's site-packages hold, pixelwise (editable or not) left out."""
    site_dirs = dict.fromkeys([*site.getsitepackages(), str(Path(torch.__file__).parents[1])])
    views = []
    for i, site_dir in enumerate(d for d in site_dirs if Path(d).is_dir()):
        view = dest / f"site{i}"
        view.mkdir(parents=True)
        for entry in Path(site_dir).iterdir():
            if not entry.name.lower().startswith(("pixelwise", "__editable__")):
                (view / entry.name).symlink_to(entry)
        views.append(view)
    return views


def _install(wheel: Path, venv: Path) -> Path:
    """A fresh venv with `wheel[serve]` installed from the file alone; its bin folder."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)  # ensurepip: 20+ s
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv).strip()
    views = _dependencies_view(venv.parent / "dependencies")
    Path(purelib, "_pixelwise_test_dependencies.pth").write_text("".join(f"{v}\n" for v in views))
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "-q", f"{wheel}[serve]"],
        cwd=venv.parent,
    )
    return venv / "bin"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    return _build(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def bin_dir(built, tmp_path_factory) -> Path:
    return _install(built[1], tmp_path_factory.mktemp("install") / "venv")


@pytest.fixture
def work(tmp_path) -> Path:
    """A working folder outside the source tree."""
    assert ROOT not in tmp_path.resolve().parents
    return tmp_path


def test_sdist_and_wheel_carry_the_package_data_and_the_version(built):
    sdist, wheel = built
    assert wheel.name == f"pixelwise-{pixelwise.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"pixelwise-{pixelwise.__version__}.dist-info/METADATA").decode()
    assert set(PACKAGE_DATA) <= names
    assert f"\nVersion: {pixelwise.__version__}\n" in metadata
    assert {f"Provides-Extra: {e}" for e in ("serve", "onnx", "crf", "hub", "timm", "all")} <= set(
        metadata.splitlines()
    )
    with tarfile.open(sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert set(PACKAGE_DATA) <= in_sdist


def test_installed_wheel_is_the_one_imported_and_prints_its_version(bin_dir, work):
    where = _run([str(bin_dir / "python"), "-c", "import pixelwise; print(pixelwise.__file__)"], cwd=work)
    assert Path(where.strip()).is_relative_to(bin_dir.parent)  # not the source tree, not an editable install
    assert (
        _run([str(bin_dir / "pixelwise"), "--version"], cwd=work)
        == f"pixelwise {pixelwise.__version__} (torch {torch.__version__})\n"
    )


def test_demo_and_configs_from_the_wheel(bin_dir, work):
    out = _run([str(bin_dir / "pixelwise"), "demo", "--quick", "--out", "demo", "--device", "cpu"], cwd=work)
    assert "demo done" in out and (work / "demo" / "best.safetensors").is_file()
    assert (work / "demo" / "report.html").is_file() and (work / "demo" / "predictions" / "val_000.png").is_file()
    listing = _run([str(bin_dir / "pixelwise"), "configs"], cwd=work)
    assert re.search(r"^camvid/segnet_basic +SegNet .* segnet_basic +camvid +520 epochs", listing, re.M)
    assert (
        _run([str(bin_dir / "pixelwise"), "configs", "camvid/segnet_basic"], cwd=work)
        == (CONFIGS_DIR / "camvid" / "segnet_basic.yaml").read_text()
    )


def test_train_a_builtin_config_and_predict_with_the_builtin_weights(bin_dir, work):
    write_camvid(work / "camvid", splits={"train": 4, "val": 1}, size=(96, 128))
    sets = [
        "data.root=camvid",
        "output.dir=run",
        "train.epochs=1",
        "data.max_train_images=4",
        "data.batch_size=2",
        "data.crop_size=[96, 128]",
        "data.workers=0",
        "train.device=cpu",
        "output.progress=false",
    ]
    out = _run(
        [str(bin_dir / "pixelwise"), "train", "camvid/segnet_basic", *[x for s in sets for x in ("--set", s)]], cwd=work
    )
    assert "done: 2 steps" in out and (work / "run" / "best.safetensors").is_file()
    _run(
        [
            str(bin_dir / "pixelwise"),
            "predict",
            "--weights",
            "segnet_basic_camvid",
            "camvid/val/f0.png",
            "--out",
            "pred",
            "--device",
            "cpu",
        ],
        cwd=work,
    )
    mask = np.asarray(Image.open(work / "pred" / "masks" / "f0.png"))
    assert mask.shape == (96, 128) and mask.max() < 11
    assert Image.open(work / "pred" / "overlays" / "f0.png").size == (128, 96)


def test_serve_answers_healthz_and_the_page(bin_dir, work):
    proc = subprocess.Popen(
        [str(bin_dir / "pixelwise"), "serve", "--port", "0", "--device", "cpu"],
        cwd=work,
        env=_user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        url = re.search(r"http://[\d.]+:\d+/", first)
        assert url, f"serve printed {first!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        assert "segnet_basic (11 classes)" in first  # the built-in weights are the default
        with urllib.request.urlopen(url.group(0) + "healthz", timeout=60) as r:
            assert json.load(r)["status"] == "ok"
        with urllib.request.urlopen(url.group(0), timeout=60) as r:
            assert "<html" in r.read().decode().lower()  # the web page is package data too
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
