"""`pixelwise predict`: segment image files or folders into class-index PNGs and colour overlays.

For each input `x.ext` it writes `OUT/masks/x.png` (a palette-mode PNG: pixel value = class index,
palette = the weights' class colours) and `OUT/overlays/x.png` (the colours blended over the image).
Every file is written atomically. Inputs are checked before any work: a missing file, an empty
folder or two inputs with the same stem stop the run with one line. A file that cannot be read
stops the run too, unless `--skip-bad` lists it in `OUT/bad_files.txt` / `bad_files.json`.
An image above 2048x1024 pixels is inferred by sliding window one row of windows at a time
(`pixelwise.segment`), so memory is bounded by the window's height times a band of at most 16 strides,
or with `--large downscale` at 2048x1024 pixels and upsampled back; the summary line says how many were.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from pixelwise.data.imageio import IMAGE_EXTENSIONS
from pixelwise.errors import UserError


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files as given and the image files of folders (sorted, not recursive), checked for clashes."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(
                    f"{p}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "give a folder with images or image files"
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or folder; check the path")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen and seen[f.stem].resolve() != f.resolve():
            raise UserError(
                f"{seen[f.stem]} and {f} would both be written as {f.stem}.png; "
                "rename one or predict them into different --out folders"
            )
        seen[f.stem] = f
    return list(dict.fromkeys(seen.values()))


def predict_command(args: argparse.Namespace) -> int:
    """`pixelwise predict --weights W INPUT... --out DIR`."""
    from tqdm import tqdm

    from pixelwise.cli import inference_spec
    from pixelwise.evaluate import write_bad_files
    from pixelwise.inference import resolve_device, resolve_dtype
    from pixelwise.segment import MAX_WHOLE_PIXELS

    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha}: give an opacity between 0 and 1")
    files = collect_inputs(args.inputs)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    model, meta = _load_rgb_model(args.weights, device)
    spec = inference_spec(args, meta.extra, dtype)
    bad: list[tuple[str, str]] = []
    written = big = 0
    # the bar is shown on terminals only and cleared on exit, so an error stays a single clean line
    with tqdm(files, desc="predict", unit="image", leave=False, disable=None) as bar:
        for path in bar:
            try:
                image, labels = _segment_file(path, model, meta, spec, args.large)  # (H, W, 3), (H, W)
            except UserError as e:
                if not args.skip_bad:
                    raise e from None
                bad.append((str(path), str(e)))
                continue
            big += labels.size > MAX_WHOLE_PIXELS and (args.mode == "whole" or args.large == "downscale")
            _write(out, path.stem, image, labels, meta, alpha=args.alpha, side_by_side=args.side_by_side)
            written += 1
    if bad:
        write_bad_files(out, bad)
    if written == 0:
        raise UserError(f"none of the {len(files)} inputs could be read; see {out / 'bad_files.txt'}")
    how_large = "downscaled to that size" if args.large == "downscale" else "by sliding window"
    print(
        f"wrote {written} masks to {out / 'masks'} and overlays to {out / 'overlays'}"
        + (f"; {big} images above {MAX_WHOLE_PIXELS} pixels were inferred {how_large}" if big else "")
        + (f"; skipped {len(bad)} bad files, listed in {out / 'bad_files.txt'}" if bad else "")
    )
    return 0


def _load_rgb_model(weights: str, device: Any) -> tuple[Any, Any]:
    """The model and metadata of ``--weights``, refused unless it takes 3-channel images."""
    from pixelwise.weights import load_weights

    model, meta = load_weights(weights, device)
    channels = int(meta.model_kwargs.get("in_channels", 3))
    if channels != 3:
        raise UserError(
            f"{weights}: the model takes {channels}-channel input but predict feeds RGB images; "
            "use weights of a 3-channel model"
        )
    return model, meta


def _segment_file(path: Path, model: Any, meta: Any, spec: Any, large: str) -> tuple[np.ndarray, np.ndarray]:
    """The image at ``path`` (H, W, 3) uint8 and its labels (H, W); above MAX_WHOLE_PIXELS by sliding
    window (memory O(window height x a band of 16 strides), not O(image)) or downscaled, as ``--large`` says."""
    from pixelwise.data.imageio import read_image
    from pixelwise.segment import MAX_WHOLE_PIXELS, NeedsWholeImage, default_window, segment_image

    image = read_image(path)
    try:
        labels = segment_image(
            model,
            image,
            spec,
            mean=meta.mean,
            std=meta.std,
            num_classes=meta.num_classes,
            default_win=default_window(meta.extra),
            max_whole_pixels=MAX_WHOLE_PIXELS,
            large=large,
            name=str(path),
        )
    except NeedsWholeImage as e:  # the library's words name large="downscale", the user's a flag
        raise UserError(e.message("infer it downscaled (--large downscale)")) from None
    return image, labels


def _write(
    out: Path, stem: str, image: np.ndarray, labels: np.ndarray, meta: Any, *, alpha: float, side_by_side: bool
) -> None:
    """masks/STEM.png (class indices, palette mode) and overlays/STEM.png (colours over the image)."""
    from pixelwise.palette import overlay, save_index_png, save_rgb_png

    save_index_png(out / "masks" / f"{stem}.png", labels, meta.palette, ignore_index=meta.ignore_index)
    shown = overlay(image, labels, meta.palette, alpha=alpha, ignore_index=meta.ignore_index)
    if side_by_side:
        shown = np.concatenate([image, np.full((image.shape[0], 8, 3), 255, np.uint8), shown], axis=1)
    save_rgb_png(out / "overlays" / f"{stem}.png", shown)  # (H, W, 3) or (H, 2W + 8, 3)
