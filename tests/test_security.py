"""Paths never escape and files never run code: request data is never a path, data set lists stay
inside their root, config paths resolve against the working directory, weights files cannot point at
other files, and a code-carrying `last.pt` is refused by `pixelwise train --resume`.

File access is observed with a Python audit hook (PEP 578): it sees every `open`, listing, rename and
removal the process makes, whichever library makes it.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelwise.cli import main
from pixelwise.config import load_config
from pixelwise.data.datasets import ISBI2012, VOCSegmentation
from pixelwise.errors import UserError
from pixelwise.weights import load_weights, save_weights

pytestmark = pytest.mark.timeout(120)

_FS_EVENTS = {
    "open",
    "os.listdir",
    "os.scandir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "shutil.rmtree",
    "os.symlink",
    "os.link",
    "os.chmod",
    "os.truncate",
}
_RECORDING: list[list[tuple[str, str]]] = []  # the audit hook cannot be removed; it records only when asked


def _audit(event: str, args: tuple) -> None:
    if _RECORDING and event in _FS_EVENTS:
        target = args[0] if args else None
        if isinstance(target, int):  # open() of a file descriptor: no path involved
            return
        _RECORDING[-1].append(
            (event, os.fsdecode(target) if isinstance(target, str | bytes | os.PathLike) else str(target))
        )


sys.addaudithook(_audit)


class FileAccess:
    """Context manager collecting (event, path) of the whole process while active."""

    def __enter__(self) -> list[tuple[str, str]]:
        self.events: list[tuple[str, str]] = []
        _RECORDING.append(self.events)
        return self.events

    def __exit__(self, *exc) -> None:
        _RECORDING.remove(self.events)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class _Evil:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------ the service
@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from pixelwise.models import get_model
    from pixelwise.serve.app import create_app
    from pixelwise.weights import WeightsMeta

    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "depth": 2, "padding": "same"}
    model = get_model("unet", num_classes=2, **kwargs)
    meta = WeightsMeta(model_name="unet", model_kwargs=kwargs, classes=["a", "b"], palette=[(0, 0, 0), (255, 0, 0)])
    with TestClient(create_app(model, meta)) as c:
        yield c


HOSTILE_NAMES = [
    "../../etc/passwd",
    "/etc/passwd",
    "..\\..\\windows\\win.ini",
    "....//....//etc/shadow",
    "%2e%2e%2fetc%2fpasswd",
    "x.png\x00../../etc/passwd",
    "~root/.ssh/id_rsa",
]


def test_upload_file_names_are_never_paths(client, tmp_path):
    image = png(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    plain = client.post("/v1/segment", files={"image": ("plain.png", image, "image/png")})
    assert plain.status_code == 200
    for name in HOSTILE_NAMES + [str(tmp_path / "written-by-request.png")]:
        with FileAccess() as events:
            r = client.post("/v1/segment", files={"image": (name, image, "image/png")})
        assert r.status_code == 200, (name, r.text)
        assert r.content == plain.content  # the name changes nothing
        assert events == [], f"upload named {name!r} made the service touch {events}"
    assert list(tmp_path.iterdir()) == []


def test_query_and_url_paths_touch_no_file(client):
    image = png(np.zeros((8, 8, 3), np.uint8))
    with FileAccess() as events:
        for fmt in ("../../etc/passwd", "/etc/passwd", "png/../../x"):
            r = client.post(f"/v1/segment?format={fmt}", files={"image": ("a.png", image, "image/png")})
            assert r.status_code == 400 and "format" in r.json()["error"]
        for url in (
            "/../../etc/passwd",
            "/static/../../pixelwise/weights.py",
            "/%2e%2e/%2e%2e/etc/passwd",
            "/v1/segment/../../../etc/passwd",
            "/..%2f..%2fetc%2fpasswd",
        ):
            assert client.get(url).status_code == 404
    assert events == [], events


# --------------------------------------------------------------------------------- data set file lists
def _voc(root: Path, ids: list[str], split: str = "val") -> Path:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "JPEGImages" / "2007_000001.jpg")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "SegmentationClass" / "2007_000001.png")
    (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return root


@pytest.mark.parametrize(
    "entry", ["../../../../etc/passwd", "/etc/passwd", "../SegmentationClass/2007_000001", ".hidden", "a\\..\\..\\b"]
)
def test_voc_split_lists_cannot_leave_the_root(tmp_path, entry):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(png(np.zeros((4, 4, 3), np.uint8)))
    root = _voc(tmp_path / "voc", ["2007_000001", entry])
    with FileAccess() as events, pytest.raises(UserError) as e:
        VOCSegmentation(root, "val")
    msg = str(e.value)
    assert "\n" not in msg and "val.txt" in msg and "line 2" in msg and repr(entry) in msg
    assert not any("passwd" in path or "outside" in path for _, path in events), events


def test_sbd_lists_for_train_aug_cannot_leave_the_root(tmp_path):
    root = _voc(tmp_path / "voc", ["2007_000001"], split="train")
    _voc(root, ["2007_000001"], split="val")
    sbd = tmp_path / "sbd"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("2008_000002\n../../../etc/passwd\n")
    (sbd / "val.txt").write_text("")
    with pytest.raises(UserError, match=r"train\.txt: line 2 holds '\.\./\.\./\.\./etc/passwd'"):
        VOCSegmentation(root, "train_aug", sbd_root=sbd)


def test_good_voc_list_still_loads(tmp_path):
    ds = VOCSegmentation(_voc(tmp_path / "voc", ["2007_000001"]), "val")
    assert len(ds) == 1 and tuple(ds[0][1].shape) == (4, 4)


@pytest.mark.parametrize("slices", [["../../etc/passwd"], [-1], [0.5], [True]])
def test_isbi_slice_numbers_are_numbers(tmp_path, slices):
    for sub in ("image", "label"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / sub / "0.png")
    assert len(ISBI2012(tmp_path, slices=[0])) == 1
    with pytest.raises(UserError, match="is not a slice number"):
        ISBI2012(tmp_path, slices=slices)


# ------------------------------------------------------------------------------------------- configs
def _folder_data(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(rng.integers(0, 2, (16, 16), dtype=np.uint8)).save(root / split / "masks" / f"{i}.png")


def test_config_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    """Documented rule (docs/reliability.md): relative paths in a config (data.root, output.dir) are
    relative to the working directory, as for any command-line tool, not to the config file's folder."""
    from pixelwise.train import train

    work, configs = tmp_path / "work", tmp_path / "configs"
    _folder_data(work / "mydata")
    _folder_data(configs / "mydata")  # a decoy beside the config: it must not be used
    (configs / "mydata" / "train" / "images" / "0.png").write_bytes(b"decoy: not an image")
    configs.joinpath("c.yaml").write_text(
        "model: {name: unet, kwargs: {base_channels: 4, depth: 2, padding: same}}\n"
        "data: {dataset: folder, root: mydata, kwargs: {classes: [a, b]}, crop_size: [16, 16],\n"
        "       scale_range: [1.0, 1.0], batch_size: 2, workers: 0}\n"
        "train: {epochs: 1, device: cpu}\n"
        "output: {dir: runs/rel, report: false, progress: false}\n"
    )
    monkeypatch.chdir(work)
    result = train(load_config(configs / "c.yaml"))
    assert Path(result["out_dir"]) == Path("runs/rel")
    assert (work / "runs" / "rel" / "best.safetensors").is_file() and not (configs / "runs").exists()


@pytest.mark.parametrize("stages", ["[../../escape, unet]", "[/tmp/abs, unet]", "['a/b', unet]"])
def test_stage_names_cannot_be_paths(tmp_path, stages):
    with pytest.raises(UserError, match="model.stages"):
        load_config(None, [f"model.stages={stages}", f"output.dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ weights and pickles
def test_weights_metadata_cannot_name_other_files(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pixelwise.models import get_model

    kwargs = {"base_channels": 4, "depth": 2, "padding": "same"}
    good = tmp_path / "good.safetensors"
    save_weights(
        good, get_model("unet", num_classes=2, **kwargs), model_name="unet", model_kwargs=kwargs, classes=["a", "b"]
    )
    with safe_open(str(good), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    secret = tmp_path / "secret.pth"
    torch.save({"w": torch.zeros(1)}, secret)
    for key in ("weights_backbone", "init_from"):
        meta = json.loads(header["meta"])
        meta["model_kwargs"][key] = str(secret)
        evil = tmp_path / f"evil-{key}.safetensors"
        save_file(tensors, str(evil), metadata={**header, "meta": json.dumps(meta)})
        with FileAccess() as events, pytest.raises(UserError, match=key) as e:
            load_weights(evil)
        assert "\n" not in str(e.value) and str(evil) in str(e.value)
        assert not any("secret" in path for _, path in events), events
    load_weights(good)


def test_resume_with_a_code_carrying_last_pt_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    _Evil.marker = tmp_path / "pwned"
    torch.save({"version": 1, "model": _Evil()}, out / "last.pt")
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {name: unet, kwargs: {base_channels: 4, depth: 2, padding: same}}\n"
        "data: {kwargs: {num_images: 2, size: [16, 16]}, crop_size: [16, 16], batch_size: 2, "
        "workers: 0}\ntrain: {epochs: 1, device: cpu}\noutput: {report: false, progress: false}\n"
    )
    rc = main(["train", str(config), "--set", f"output.dir={out}", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "refused to load" in err and str(out / "last.pt") in err
    assert not _Evil.marker.exists()


def test_code_carrying_backbone_file_is_refused(tmp_path, capsys):
    _Evil.marker = tmp_path / "pwned-backbone"
    evil = tmp_path / "vgg16.pth"
    torch.save({"features.0.weight": _Evil()}, evil)
    rc = main(
        [
            "init-weights",
            "segnet",
            "--num-classes",
            "2",
            "--out",
            str(tmp_path / "w.safetensors"),
            "--weights-backbone",
            str(evil),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(evil) in err
    assert not _Evil.marker.exists() and not (tmp_path / "w.safetensors").exists()


def test_predict_writes_only_under_out(tmp_path, capsys):
    """Output names come from input stems (never a folder part), so odd input names stay under --out."""
    from pixelwise.models import get_model

    kwargs = {"base_channels": 4, "depth": 2, "padding": "same"}
    weights = tmp_path / "w.safetensors"
    save_weights(
        weights, get_model("unet", num_classes=2, **kwargs), model_name="unet", model_kwargs=kwargs, classes=["a", "b"]
    )
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("..png", "...png", "-rf.png", "~.png"):  # stems ".", "..", "-rf", "~"
        (inputs / name).write_bytes(png(np.zeros((8, 8, 3), np.uint8)))
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "deep" / "out"
    assert main(["predict", "--weights", str(weights), str(inputs), "--out", str(out)]) == 0, capsys.readouterr()
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(p == out or out in p.parents or p == out.parent for p in new), sorted(new)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["-rf.png", "...png", "..png", "~.png"]
