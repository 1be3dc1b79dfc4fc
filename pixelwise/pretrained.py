"""Trained weights that ship inside the package, named like torchvision's: `get_model("segnet_basic",
weights="camvid")` in Python, `--weights segnet_basic_camvid` on the command line.

Each entry names its file under `pixelwise/trained/`, the file's sha256 (checked on every load, so a
damaged or swapped file is refused), how it was trained and what it scored. The class names, palette
and input normalisation live in the file's own metadata (one source, read by `meta`); `transforms()`
gives the preprocessing that goes with them. Nothing is downloaded: the files are package data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pixelwise.errors import UserError


@dataclass(frozen=True)
class Pretrained:
    """One set of trained weights shipped with pixelwise.

    Attributes:
        model: the builder's name in `pixelwise.models.MODELS`.
        tag: the name after the model's, e.g. "camvid" in `segnet_basic_camvid`.
        file: the file name under `pixelwise/trained/`.
        sha256: hex digest of that file.
        recipe: how it was trained (config and command), in words.
        metrics: its scores, with the split they were measured on.
        crf: the dense CRF parameters chosen for it (`pixelwise.crf.CRFParams` fields), used by
            `--crf` and the service's `?crf=1` unless told otherwise; None if none was chosen.
    """

    model: str
    tag: str
    file: str
    sha256: str
    recipe: str
    metrics: dict[str, Any] = field(default_factory=dict)
    crf: dict[str, float] | None = None

    @property
    def name(self) -> str:
        return f"{self.model}_{self.tag}"

    def path(self) -> Path:
        """The file, after checking its sha256."""
        path = trained_dir() / self.file
        if not path.is_file():
            raise UserError(
                f"built-in weights {self.name}: {path} is missing from the installed package; reinstall pixelwise"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != self.sha256:
            raise UserError(
                f"built-in weights {self.name}: {path} has sha256 {digest[:16]}..., expected "
                f"{self.sha256[:16]}...; the file is damaged or was replaced: reinstall pixelwise"
            )
        return path

    @property
    def meta(self) -> Any:
        """The file's `WeightsMeta`: classes (categories), palette, mean/std, builder keywords."""
        from pixelwise.weights import read_weights_meta

        return read_weights_meta(self.path())

    def transforms(self) -> Any:
        """The preprocessing these weights expect: uint8 (3, H, W) -> normalised float32, whole image."""
        from pixelwise.data.transforms import eval_transforms

        meta = self.meta
        return eval_transforms(mean=meta.mean, std=meta.std)


# Each from a finished run: benchmarks/RESULTS.md has the run, its curve and per-class scores.
PRETRAINED: dict[str, Pretrained] = {
    "segnet_basic_camvid": Pretrained(
        model="segnet_basic",
        tag="camvid",
        file="segnet_basic_camvid.safetensors",
        sha256="58a0968ffed288d61eb2a1c2c97c7bd8a07bacbac217f06c4f0b0e99ca3ce436",
        recipe="SegNet-Basic (Badrinarayanan et al., TPAMI 2017) from scratch on CamVid train (367 images): "
        "config camvid/segnet_basic_fast, AdamW 1e-3 with poly decay, 240x320 native-scale crops "
        "and flips, square-rooted median-frequency class weights, batch 4, 36 epochs, bf16 autocast, "
        "87 min on 2 CPU cores; stored as fp16",
        metrics={
            "split": "CamVid val (101 images), whole 360x480 images",
            "global_acc": 87.86,
            "class_avg": 73.47,
            "miou": 57.00,
            "boundary_f1": 54.31,
        },
        # benchmarks/crf_search.py: DeepLab-style search on held-aside train images (RESULTS.md, dense CRF)
        crf={
            "iterations": 5,
            "bilateral_weight": 3.0,
            "bilateral_sxy": 100.0,
            "bilateral_srgb": 3.0,
            "gaussian_weight": 3.0,
            "gaussian_sxy": 3.0,
        },
    ),
    "unet_isbi2012": Pretrained(
        model="unet",
        tag="isbi2012",
        file="unet_isbi2012.safetensors",
        sha256="b9fff4dcd929c90a464d50822e120df6e0cb1ceb65fcc313193c12bfb6434c3f",
        recipe="U-Net (Ronneberger et al., MICCAI 2015), the paper's network (valid convs, depth 4, 64 base "
        "channels, 31.0 M parameters) from scratch on ISBI 2012 slices 0..24: config isbi2012/unet, border "
        "weight map (w0 10, sigma 5), elastic deformation, flips, +-10 degree rotation, one 388x388 output tile "
        "a step, AdamW 1e-4 constant, bf16 autocast, 2150 steps in 112 min on 2 CPU cores, the best of the "
        "every-100-steps validations by V_Rand (step 1700); stored with int8 conv weights (a scale per output "
        "channel; 31 MB instead of 62 in fp16: argmax agreement with the fp32 weights 99.94%)",
        metrics={
            "split": "ISBI 2012 slices 25..29 (held out), whole 512x512 slices, the challenge's scores",
            "v_rand": 0.979,
            "v_info": 0.9792,
            "pixel_error": 0.0508,
        },
    ),
}


def trained_dir() -> Path:
    """The package folder that holds the built-in weights files."""
    return Path(str(resources.files("pixelwise").joinpath("trained")))


def find(name: str) -> Pretrained | None:
    """The built-in weights called `name` (e.g. "segnet_basic_camvid"), or None."""
    return PRETRAINED.get(name)


def for_model(model: str, tag: str) -> Pretrained:
    """The built-in weights `tag` of `model`; a UserError naming those that exist otherwise."""
    entry = PRETRAINED.get(f"{model}_{tag}")
    if entry is None or entry.model != model:
        have = sorted(p.tag for p in PRETRAINED.values() if p.model == model)
        offer = f"choose {', '.join(repr(t) for t in have)}" if have else "it has none; train it with `pixelwise train`"
        raise UserError(f"model {model!r} has no built-in weights {tag!r}; {offer}")
    return entry


def resolve(path_or_name: str | Path, argument: str = "--weights") -> Path:
    """A weights file: `path_or_name` itself when it is a file, its model.safetensors when it is a folder
    written by `save_pretrained` (pixelwise.models.hub), else the verified built-in file of that name."""
    from pixelwise.models.hub import WEIGHTS_FILE

    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise UserError(
                f"{argument}: folder {path} has no {WEIGHTS_FILE}; give a folder written by save_pretrained, "
                "or a .safetensors file"
            )
        return path / WEIGHTS_FILE
    entry = find(str(path_or_name))
    if entry is not None:
        return entry.path()
    names = ", ".join(PRETRAINED) or "none in this install"
    raise UserError(f"{argument}: no such file {path}, nor built-in weights of that name ({names}); check the path")
