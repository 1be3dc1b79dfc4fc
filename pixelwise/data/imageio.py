"""Safe image and label-map reading: every failure is a one-line UserError naming the file.

One decoder serves the command line (files) and the HTTP service (uploaded bytes), with one list of
accepted formats (`FORMATS`, the only Pillow decoders ever tried, whatever a file is named: Pillow
would otherwise sniff ~40 formats, EPS among them, which runs Ghostscript). A failure is one of
three `ImageError`s: `ImageFormatError` (not one of the accepted formats: "convert it"),
`ImageTooLarge` (more pixels than the limit, read from the header before any pixel is decoded) or
`CorruptImage` (an accepted format whose bytes do not decode: truncated or damaged). The format is
decided by the file's first bytes, with Pillow's own signature checks, never by its name or a
declared content type.

Images become RGB `uint8` arrays (H, W, 3), turned upright by their EXIF orientation. Label maps
become exact integer arrays (H, W): 'L' and 'P' PNGs give their stored indices (a palette PNG is
never converted to colours), 16-bit PNGs give their 16-bit values. Truncated files are errors, not
grey rows. Multi-frame files (GIF, TIFF, WebP) give their first frame.

EXIF orientation is applied to every file that carries it, label maps included, so a photo and a
label map stored in the same frame with the same tag stay aligned; an untagged label map is taken
as drawn on the upright photo. A PNG label map has every chunk CRC checked (Pillow skips those of
the pixel data), so a damaged file is an error rather than a map with wrong classes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pixelwise.errors import UserError

# Pillow's own default MAX_IMAGE_PIXELS (~9.5k x 9.5k), the limit it warns at; enforced here, by our check
MAX_PIXELS = 89_478_485
# the accepted formats: the only Pillow decoders ever tried, for files and uploads alike
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
FORMAT_NAMES = "PNG, JPEG, BMP, GIF, TIFF, WebP or PPM/PGM"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
PIL_FORMATS = FORMATS  # the name earlier releases exported

# modes Pillow converts to RGB without guessing: grey, palette, colour (+alpha, dropped), CMYK, YCbCr
_RGB_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError)
_SKIP_HINT = "replace it or use --skip-bad"  # what a command-line user can do about a bad input file


class ImageError(UserError):
    """An input that is not a readable image. `reason` says why without naming the file, so the
    service can word its own answer; the message is `"{name}: {reason}; {fix}"`."""

    def __init__(self, name: str, reason: str, fix: str):
        super().__init__(f"{name}: {reason}; {fix}")
        self.reason = reason


class ImageFormatError(ImageError):
    """Not one of the accepted `FORMATS` (or a pixel mode they cannot be converted from)."""


class ImageTooLarge(ImageError):
    """More pixels than the limit, known from the header: nothing was decoded."""


class CorruptImage(ImageError):
    """An accepted format whose bytes do not decode: truncated, damaged, or unreadable from disk."""


def sniff_format(prefix: bytes) -> str | None:
    """The Pillow format whose signature `prefix` (a file's first 16+ bytes) carries, accepted or not."""
    Image.init()
    for name in FORMATS + tuple(sorted(set(Image.OPEN) - set(FORMATS))):
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a plugin's signature check on odd bytes: not that format
            continue
    return None


def open_image(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    what: str = "image",
    max_pixels: int | None = None,
    verify: bool = False,
    hint: str = _SKIP_HINT,
) -> Image.Image:
    """Open and fully decode a file path or the bytes of an upload, upright (EXIF orientation applied).

    Only `FORMATS` are tried; the pixel count is checked against `max_pixels` (default `MAX_PIXELS`)
    from the header, before decoding. `verify` checks every PNG chunk CRC (label maps). `name` names
    the input in messages (default: the path); `hint` ends the corrupt-file message.
    """
    name = name or str(source)
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    with _stream(source, what) as f:
        kind = sniff_format(f.read(64))
        if kind not in FORMATS:
            found = f"it is {kind}, which is not supported" if kind else "the format is not recognised"
            raise ImageFormatError(name, f"cannot read this {what}: {found}", f"convert it to {FORMAT_NAMES}")
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have flipped it; a short file must fail
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
                im = Image.open(f, formats=FORMATS)
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageTooLarge(
                        name,
                        f"{w}x{h} pixels exceeds the limit of {max_pixels} (decompression-bomb guard)",
                        "downscale or tile the image first",
                    )
                im.load()
                if verify and im.format == "PNG":  # Pillow skips the CRCs of pixel data: check the map whole
                    f.seek(0)
                    with Image.open(f, formats=["PNG"]) as check:
                        check.verify()  # a flipped bit is an error here, not a silently wrong class
        except Image.DecompressionBombError:
            raise ImageTooLarge(
                name,
                f"the header declares more than {max_pixels} pixels (decompression-bomb guard)",
                "downscale or tile the image first",
            ) from None
        except _DECODE_ERRORS as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptImage(
                name, f"cannot read this {what}: the {kind} data is corrupt or truncated ({msg[:160]})", hint
            ) from None
        return _upright(im)


@contextlib.contextmanager
def _stream(source: str | Path | bytes, what: str) -> Iterator[BinaryIO]:
    """The bytes of an upload, or the open file; a missing or unreadable file is a UserError naming it."""
    if isinstance(source, bytes):
        yield io.BytesIO(source)
        return
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{path}: no such {what} file; check the path")
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; the with-block is the caller's)
    except OSError as e:
        raise CorruptImage(
            str(path), f"cannot open this {what} ({e.strerror or e})", "check the file's permissions"
        ) from None
    with f:
        yield f


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, as viewers and annotation tools show the file (a pure transpose:
    label values are untouched). A broken EXIF block keeps the stored orientation."""
    try:
        return ImageOps.exif_transpose(im)
    except _DECODE_ERRORS:
        return im


def to_rgb(im: Image.Image, name: str) -> np.ndarray:
    """An opened image as RGB: grey repeated over three channels, alpha dropped, 16-bit grey's top 8 bits.

    Shape:
        returns (H, W, 3) uint8.
    """
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray(np.clip(a >> 8 if a.max() > 255 else a, 0, 255).astype(np.uint8), mode="L")
    if im.mode not in _RGB_CONVERTIBLE:
        raise ImageFormatError(
            name,
            f"image mode {im.mode!r} ({len(im.getbands())} channels) is not supported",
            "save it as an 8-bit RGB or grey PNG/JPEG",
        )
    return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy needs one


def decode_image(
    data: bytes, *, name: str = "uploaded image", max_pixels: int | None = None, hint: str = "send an intact image file"
) -> np.ndarray:
    """Decode image bytes (an upload) exactly as `read_image` reads a file. Shape: returns (H, W, 3) uint8."""
    return to_rgb(open_image(data, name=name, max_pixels=max_pixels, hint=hint), name)


def read_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as an upright RGB array.

    Grey images are repeated over three channels, alpha is dropped, 16-bit grey keeps its top 8 bits.

    Shape:
        returns (H, W, 3) uint8.
    """
    return to_rgb(open_image(path, max_pixels=max_pixels), str(path))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label map's stored integer values, exactly.

    'L', 'P' (palette indices, not colours), '1' and 16-bit PNGs are read as they are stored. An RGB
    file whose three channels are equal is read as grey; a colour RGB file is refused here (the
    folder data set maps colour masks through a palette with `read_color_mask`).

    Shape:
        returns (H, W) int64.
    """
    im = open_image(path, what="label map", verify=True)
    if im.mode in ("L", "P", "1") or im.mode in _SIXTEEN_BIT:
        return np.asarray(im).astype(np.int64)
    if im.mode in ("RGB", "RGBA", "RGBX", "LA", "PA"):
        a = np.asarray(im)
        if im.mode in ("LA", "PA"):
            return a[..., 0].astype(np.int64)
        if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
            return a[..., 0].astype(np.int64)
        raise UserError(
            f"{path}: label map is a colour {im.mode} image with {a.shape[-1]} channels; "
            "class-index masks must have one channel ('L' or 'P' PNG) — or use the folder "
            "data set with a palette to map colours to classes"
        )
    raise UserError(f"{path}: label map mode {im.mode!r} is not supported; save it as an 8-bit 'L' or 'P' PNG")


def read_color_mask(
    path: str | Path,
    palette: list[tuple[int, int, int]],
    *,
    ignore_index: int = 255,
    ignore_color: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Read an RGB colour mask and map each colour to its index in `palette`.

    A colour in no palette entry (and not `ignore_color`) is a UserError naming the file and colour.
    'L'/'P' files are read as indices, as `read_mask` does.

    Shape:
        returns (H, W) int64.
    """
    im = open_image(path, what="label map", verify=True)
    if im.mode in ("L", "P", "1") or im.mode in _SIXTEEN_BIT:
        return np.asarray(im).astype(np.int64)
    if im.mode not in ("RGB", "RGBA", "RGBX"):
        raise UserError(f"{path}: colour mask mode {im.mode!r} is not supported; save it as an RGB PNG")
    rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W) one int per colour
    keys = [(r << 16) | (g << 8) | b for r, g, b in palette]
    values = list(range(len(palette)))
    if ignore_color is not None:
        r, g, b = ignore_color
        keys.append((r << 16) | (g << 8) | b)
        values.append(ignore_index)
    keys_arr, values_arr = np.asarray(keys, dtype=np.int64), np.asarray(values, dtype=np.int64)
    order = np.argsort(keys_arr)
    keys_arr, values_arr = keys_arr[order], values_arr[order]
    pos = np.clip(np.searchsorted(keys_arr, code), 0, len(keys_arr) - 1)
    known = keys_arr[pos] == code
    if not known.all():
        y, x = np.argwhere(~known)[0]
        c = tuple(int(v) for v in rgb[y, x])
        raise UserError(
            f"{path}: colour {c} at pixel (row {y}, col {x}) is not in the palette; "
            "add it to the palette (or pass it as the ignore colour) or fix the mask"
        )
    return values_arr[pos]


def check_labels(
    mask: np.ndarray, *, num_classes: int, ignore_index: int, path: str | Path, raw: np.ndarray | None = None
) -> None:
    """Refuse label values outside 0..K-1 that are not the ignore index, naming the file and value.

    `raw` is the mask as stored in the file, reported instead when a lookup table produced `mask`.
    """
    bad = (mask < 0) | ((mask >= num_classes) & (mask != ignore_index))
    if bad.any():
        value = int((raw if raw is not None else mask)[bad][0])
        raise UserError(
            f"{path}: label value {value} is outside 0..{num_classes - 1} and is not the ignore "
            f"index {ignore_index}; fix the mask or choose the matching data set"
        )


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: str | Path, mask_path: str | Path) -> None:
    """Refuse an image and a label map of different sizes, naming both files."""
    if image.shape[:2] != mask.shape[:2]:
        ih, iw = image.shape[:2]
        mh, mw = mask.shape[:2]
        hint = (
            " (sizes transposed: images are turned upright by their EXIF orientation, so a label map "
            "drawn on the stored pixels must carry the same EXIF tag or be rotated)"
            if (ih, iw) == (mw, mh) and ih != iw
            else ""
        )
        raise UserError(
            f"{image_path} is {iw}x{ih} but its label map {mask_path} is {mw}x{mh}{hint}; "
            "they must have the same size — fix or remove the pair"
        )
