"""Runs the figures of the gallery and writes gallery.md; the `pixelwise gallery` command."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pixelwise.errors import ArgumentError
from pixelwise.gallery.common import Drawn, Sample, camvid_samples

BUILTIN = "segnet_basic_camvid"  # every CamVid figure's model
UNET_BUILTIN = "unet_isbi2012"  # figure 5's default, once pixelwise.pretrained registers it
UPSAMPLING_IMAGE, UPSAMPLING_BOX = "0016E5_08117.png", (slice(160, 220), slice(0, 80))  # a cyclist and a pedestrian
DECODER_IMAGES = ("0016E5_08117.png", "0016E5_07977.png")
CRF_IMAGES = ("0016E5_07965.png", "0016E5_08085.png", "0016E5_08137.png")
ISBI_SLICE = 25  # the first of the slices held out of training (25..29)
QUICK_SCALE = 0.25  # --quick: CamVid at 90x120, a 128x128 corner of the ISBI slice


def write_gallery(
    out: Path,
    *,
    data: Path,
    results: Path | None,
    bilinear_weights: str | None = None,
    unet_weights: str | None = None,
    quick: bool = False,
    command: str = "pixelwise gallery --out DIR",
    log: Callable[[str], None] = print,
) -> list[Drawn]:
    """Draw every figure that its inputs allow into `out` and write `out/gallery.md`; return the figures.

    Args:
        data: the reference data folder holding camvid/ and isbi2012/ (figures 1-4 and 5).
        results: the repository's benchmarks/results (figure 6), or None to leave figure 6 out.
        bilinear_weights: weights file of SegNet-Basic's bilinear-decoder variant (figure 3).
        unet_weights: weights file or built-in name of a valid-padding U-Net for ISBI 2012 (figure 5's
            prediction); None: the built-in `unet_isbi2012` where pixelwise ships it.
        quick: small images (CamVid at 1/4 scale, a corner of the ISBI slice): every figure is drawn in
            seconds, to check that it works; these are not the documented figures.
        command: the command that regenerates the gallery, quoted in gallery.md.
    """
    from pixelwise.pretrained import find
    from pixelwise.weights import load_weights

    if not data.is_dir():
        raise ArgumentError("data", str(data), "no such folder; give the folder holding camvid/ and isbi2012/")
    bilinear = _load(bilinear_weights, "bilinear_weights") if bilinear_weights else None
    unet_name = unet_weights or (UNET_BUILTIN if find(UNET_BUILTIN) else None)
    unet = _load(unet_name, "unet_weights") if unet_name else None
    _check_unet(unet, unet_name)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_weights(BUILTIN)
    if bilinear is not None and bilinear[1].classes != meta.classes:
        raise ArgumentError("bilinear_weights", bilinear_weights, f"has classes {bilinear[1].classes}, not CamVid's")
    steps = [
        ("upsampling", lambda: _upsampling(out, data / "camvid", model, meta)),
        ("atrous", lambda: _atrous(out, data / "camvid", model, meta, quick)),
        ("decoders", lambda: _decoders(out, data / "camvid", (model, meta), bilinear, quick)),
        ("crf", lambda: _crf(out, data / "camvid", model, meta, quick)),
        ("overlap_tile", lambda: _overlap_tile(out, data / "isbi2012", unet, unet_name, quick)),
        ("training", lambda: _training(out, results, meta.palette)),
    ]
    drawn = []
    for name, step in steps:
        start = time.perf_counter()
        figure = step()
        log(f"{name}: {figure.file or 'not drawn'} ({time.perf_counter() - start:.1f} s)")
        drawn.append(figure)
    write_markdown(out, drawn, command, quick)
    return drawn


def _load(weights: str, argument: str) -> tuple[torch.nn.Module, Any]:
    """The model and metadata of a weights file or built-in name; an ArgumentError naming `argument` if neither."""
    from pixelwise.pretrained import PRETRAINED, find
    from pixelwise.weights import load_weights

    if not Path(weights).is_file() and find(weights) is None:
        names = ", ".join(PRETRAINED)
        raise ArgumentError(argument, weights, f"no such file, nor built-in weights of that name ({names})")
    return load_weights(weights)


def _check_unet(unet: tuple[torch.nn.Module, Any] | None, name: str | None) -> None:
    if unet is None:
        return
    model, meta = unet
    if int(getattr(model, "margin", 0)) <= 0 or "cell" not in meta.classes:
        raise ArgumentError(
            "unet_weights",
            name,
            f"is {meta.model_name} with classes {meta.classes}; give a valid-padding U-Net "
            "trained on ISBI 2012 (classes membrane, cell)",
        )


def _missing(title: str, what: str, need: str) -> Drawn:
    return Drawn(title, None, f"**Not drawn: {what}.** {need}")


def _camvid(root: Path, names: Sequence[str], scale: float) -> list[Sample] | None:
    return camvid_samples(root, names, scale) if root.is_dir() else None


NO_CAMVID = "Put CamVid (the SegNet split, see the data README) under `--data`/camvid"


def _upsampling(out: Path, camvid: Path, model: torch.nn.Module, meta: Any) -> Drawn:
    from pixelwise.gallery.upsampling import draw_upsampling, feature_map

    samples = _camvid(camvid, [UPSAMPLING_IMAGE], 1.0)
    if samples is None:
        return _missing("Upsampling, side by side", "no CamVid data", NO_CAMVID)
    rows, cols = UPSAMPLING_BOX
    image = samples[0].image
    feature = feature_map(model, image, UPSAMPLING_BOX, meta.mean, meta.std)
    source = f"A {rows.stop - rows.start}x{cols.stop - cols.start} crop of CamVid val `{UPSAMPLING_IMAGE}`"
    return draw_upsampling(image[rows, cols], feature, out / "upsampling.png", source)


def _atrous(out: Path, camvid: Path, model: torch.nn.Module, meta: Any, quick: bool) -> Drawn:
    from pixelwise.gallery.atrous import draw_atrous, erf_row
    from pixelwise.models import get_model

    samples = _camvid(camvid, [UPSAMPLING_IMAGE], QUICK_SCALE if quick else 1.0)
    if samples is None:
        return _missing("Atrous convolution: effective receptive fields", "no CamVid data", NO_CAMVID)
    torch.manual_seed(0)
    untrained = get_model(meta.model_name, num_classes=meta.num_classes, **meta.model_kwargs).eval()
    image = samples[0].image
    rows = [
        ("untrained encoder", erf_row(untrained.encoder, image, meta.mean, meta.std)),
        ("trained encoder\n(segnet_basic_camvid)", erf_row(model.encoder, image, meta.mean, meta.std)),
    ]
    return draw_atrous(rows, UPSAMPLING_IMAGE, image.shape[:2], out / "atrous.png")


def _decoders(
    out: Path,
    camvid: Path,
    builtin: tuple[torch.nn.Module, Any],
    bilinear: tuple[torch.nn.Module, Any] | None,
    quick: bool,
) -> Drawn:
    from pixelwise.gallery.decoders import Decoder, draw_decoders

    title = "Decoders compared on the same image"
    if bilinear is None:
        return _missing(title, "it needs trained weights of the bilinear-decoder variant", NO_BILINEAR)
    samples = _camvid(camvid, DECODER_IMAGES, QUICK_SCALE if quick else 1.0)
    if samples is None:
        return _missing(title, "no CamVid data", NO_CAMVID)
    decoders = [
        Decoder("SegNet-Basic (max-unpooling)", *builtin),
        Decoder(f"{bilinear[1].model_kwargs.get('upsample', '?')} decoder", *bilinear),
    ]
    return draw_decoders(decoders, samples, out / "decoders.png")


def _crf(out: Path, camvid: Path, model: torch.nn.Module, meta: Any, quick: bool) -> Drawn:
    from pixelwise.crf import CRFParams
    from pixelwise.gallery.crf_refinement import draw_crf

    samples = _camvid(camvid, CRF_IMAGES, QUICK_SCALE if quick else 1.0)
    if samples is None:
        return _missing("Dense CRF before / after", "no CamVid data", NO_CAMVID)
    return draw_crf(model, meta, CRFParams.from_dict(meta.extra["crf"]), samples, out / "crf.png")


def _overlap_tile(
    out: Path, isbi: Path, unet: tuple[torch.nn.Module, Any] | None, unet_name: str | None, quick: bool
) -> Drawn:
    from pixelwise.data.datasets import ISBI2012
    from pixelwise.gallery.overlap_tile import draw_overlap_tile, tile_grid
    from pixelwise.models import get_model

    title = "U-Net overlap-tile"
    if not isbi.is_dir():
        return _missing(title, "no ISBI 2012 data", "Put ISBI 2012 under `--data`/isbi2012")
    image, mask = ISBI2012(isbi, slices=[ISBI_SLICE]).load(0)
    side = 128 if quick else image.shape[0]
    image, mask = image[:side, :side], mask[:side, :side]
    # the tiles' geometry is that of the U-Net given, else of the paper's (depth 4, valid convs; any width)
    geometry = unet[0] if unet is not None else get_model("unet", num_classes=2, base_channels=1)
    grid = tile_grid(geometry, mask.shape, tile_out=-(-side // 2))  # 2 x 2 tiles
    drawn = draw_overlap_tile(image, mask, grid, unet, str(ISBI_SLICE), out / "overlap_tile.png")
    if unet is None:
        note = (
            f" **The stitched prediction is not drawn: no U-Net weights.** Neither `--unet-weights` was given nor "
            f"does this pixelwise ship the built-in `{UNET_BUILTIN}`; give a valid-padding U-Net trained on ISBI 2012, "
            "e.g. `pixelwise train isbi2012/unet` then `--unet-weights OUT/best.safetensors`. The tiles above are "
            "those of the paper's network (depth 4)."
        )
        drawn = Drawn(drawn.title, drawn.file, drawn.caption + note)
    return drawn


def _training(out: Path, results: Path | None, palette: Sequence[Sequence[int]]) -> Drawn:
    from pixelwise.gallery.training_run import draw_training

    if results is None:
        return _missing(
            "Training at a glance", "no benchmark results", "Give `--results` the repository's benchmarks/results"
        )
    return draw_training(results, palette, out / "training.png")


NO_BILINEAR = (
    "No trained weights of SegNet-Basic's bilinear-decoder variant ship with pixelwise, and this figure shows "
    "trained models only. Train them with the built-in model's recipe, changing only the decoder's upsampling "
    "(about 90 minutes on 2 CPU cores, as the built-in model took):\n\n"
    "    pixelwise train camvid/segnet_basic_fast --set model.kwargs.upsample=bilinear "
    "--set output.dir=runs/segnet_basic_bilinear\n\n"
    "then add `--bilinear-weights runs/segnet_basic_bilinear/best.safetensors` to the command above. The paper's "
    "own Table 1 variant (bilinear upsampling with single-channel decoder filters, 0.625 M parameters) is "
    "`configs/reproduce/camvid_bilinear.yaml` (`pixelwise train configs/reproduce/camvid_bilinear.yaml`), a "
    "shortened run on 1/4-scale images: its weights would be shown here on whole 360x480 images, a scale they "
    "never saw in training."
)


def write_markdown(out: Path, drawn: Sequence[Drawn], command: str, quick: bool) -> Path:
    """`out/gallery.md`: every figure with its caption, or what it needs to be drawn."""
    from pixelwise.fileio import atomic_write_text

    lines = [
        "# The gallery: the lineage's mechanisms, drawn by pixelwise's own code",
        "",
        "Every figure below is drawn by `pixelwise gallery` from pixelwise's own layers, models and metrics, on",
        "real CamVid and ISBI 2012 images and the built-in trained model, so it cannot drift from the code.",
        "Written by this command, from the repository root (about a minute on 2 busy CPU cores, no GPU needed):",
        "",
        f"    {command}",
        "",
    ]
    if quick:
        lines += ["**--quick**: small images, to check that every figure is drawn; not the documented figures.", ""]
    for n, figure in enumerate(drawn, start=1):
        lines += [f"## {n}. {figure.title}", ""]
        if figure.file is not None:
            lines += [f"![{figure.title}]({figure.file})", ""]
        lines += [figure.caption, ""]
    path = out / "gallery.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# library argument -> the flag that gives it
GALLERY_FLAGS = {
    "data": "--data",
    "results": "--results",
    "bilinear_weights": "--bilinear-weights",
    "unet_weights": "--unet-weights",
}


def gallery_command(args: argparse.Namespace) -> int:
    """`pixelwise gallery --out DIR [--data D] [--results R] [--bilinear-weights W] [--unet-weights W] [--quick]`."""
    from pixelwise.errors import translated

    results = Path(args.results) if args.results else Path("benchmarks/results")
    parts = ["pixelwise gallery", f"--out {args.out}", f"--data {args.data}"]
    parts += [
        f"{flag} {getattr(args, key)}" for key, flag in GALLERY_FLAGS.items() if key != "data" and getattr(args, key)
    ]
    command = " ".join(parts + (["--quick"] if args.quick else []))
    out = Path(args.out)
    with translated(GALLERY_FLAGS, flags=True):
        if args.results and not results.is_dir():
            raise ArgumentError("results", args.results, "no such folder; give the repository's benchmarks/results")
        drawn = write_gallery(
            out,
            data=Path(args.data),
            results=results if results.is_dir() else None,
            bilinear_weights=args.bilinear_weights,
            unet_weights=args.unet_weights,
            quick=args.quick,
            command=command,
        )
    print(f"gallery done: {sum(f.file is not None for f in drawn)} of {len(drawn)} figures, {out / 'gallery.md'}")
    return 0
