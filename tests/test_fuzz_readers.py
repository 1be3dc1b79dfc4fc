"""Hostile and odd files through the image/label readers and the data sets.

Every case must end in the right array or in a one-line UserError that names the file: never a hang,
an interpreter crash, another exception type, or a label map read with wrong values. The hypothesis
tests are derandomised (the same cases every run) and bounded (`max_examples`, a per-case deadline);
the whole file has a hard time limit.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import EpsImagePlugin, Image

from pixelwise.data import build_dataset, raw_transforms
from pixelwise.data.datasets import ADE20K, ISBI2012, CamVid, Cityscapes, SegmentationFolder, VOCSegmentation
from pixelwise.data.imageio import read_color_mask, read_image, read_mask
from pixelwise.errors import UserError

pytestmark = pytest.mark.timeout(120)

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
FUZZ = settings(
    max_examples=100,
    deadline=2000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SIGNATURES = {  # file starts that steer the bytes into each decoder pixelwise accepts
    "none": b"",
    "png": b"\x89PNG\r\n\x1a\n",
    "png+ihdr": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "jpeg": b"\xff\xd8\xff\xe0",
    "bmp": b"BM",
    "tiff": b"II*\x00",
    "webp": b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    "pgm": b"P5\n",
}


# ---------------------------------------------------------------------------------------------- helpers
def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save_kw) -> bytes:
    im = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def palette_png(indices: np.ndarray) -> bytes:
    """A 'P' PNG whose palette colours differ from the indices, so reading colours would be caught."""
    im = Image.fromarray(indices.astype(np.uint8), mode="L").convert("P")
    im.putpalette([(7 * i + 13) % 256 for i in range(768)])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def i16_png(values: np.ndarray) -> bytes:
    im = Image.fromarray(values.astype(np.uint16))
    assert im.mode == "I;16"
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, color_type: int = 2) -> bytes:
    """A well-formed PNG (valid CRCs) whose IHDR declares width x height, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def assert_user_error(exc: UserError, *paths: Path) -> None:
    text = str(exc)
    assert "\n" not in text and "\r" not in text, text
    for p in paths:
        assert str(p) in text, (p, text)


def outcome(reader, path: Path):
    """The reader's array (checked for dtype and shape) or None after a checked UserError."""
    try:
        out = reader(path)
    except UserError as e:
        assert_user_error(e, path)
        return None
    if reader is read_image:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.writeable
    else:
        assert out.dtype == np.int64 and out.ndim == 2
    assert out.shape[0] >= 1 and out.shape[1] >= 1
    return out


def real_photo() -> np.ndarray:
    """A 96x128 crop of a real CamVid frame (real JPEG/PNG statistics), or a smooth synthetic picture."""
    if CAMVID.is_dir():
        return np.asarray(Image.open(sorted((CAMVID / "val").glob("*.png"))[0]).convert("RGB"))[100:196, 200:328]
    y, x = np.mgrid[0:96, 0:128]
    return np.stack([x * 2, y * 2, (x + y) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------------------- random bytes
@FUZZ
@given(start=st.sampled_from(sorted(SIGNATURES)), tail=st.binary(max_size=1500))
def test_random_bytes_are_an_error_naming_the_file(work, start, tail):
    path = work / "random.png"
    path.write_bytes(SIGNATURES[start] + tail)
    for reader in (read_image, read_mask):
        outcome(reader, path)


# ------------------------------------------------------------------- corrupted label maps: no wrong label
@FUZZ
@given(
    kind=st.sampled_from(["L", "P", "I;16"]),
    mask=hnp.arrays(np.int64, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 20)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3),
)
def test_flipped_bytes_in_a_png_mask_never_give_a_wrong_label(work, kind, mask, flips):
    data = {"L": lambda m: encode(m.astype(np.uint8)), "P": palette_png, "I;16": i16_png}[kind](mask)
    corrupt = bytearray(data)
    for where, xor in flips:  # anywhere after the 8-byte signature
        corrupt[8 + int(where * (len(data) - 8))] ^= xor
    path = work / "flipped.png"
    path.write_bytes(bytes(corrupt))
    got = outcome(read_mask, path)
    assert got is None or np.array_equal(got, mask), "a damaged PNG label map was read with different values"


@pytest.mark.parametrize("kind", ["L", "P", "I;16"])
def test_every_bit_flip_in_a_png_mask_is_caught(work, kind):
    """Flip one bit (bit pos % 8) of every byte from the IDAT chunk on, in a label map with real edges:
    each flip is an error or decodes to the same labels; none gives other labels. (Flips in the header
    and palette chunks are caught by the CRCs Pillow always checks.)"""
    labels = (real_photo()[:32, :40, 1] // 40).astype(np.int64)  # 0..6, with real edges
    data = {"L": lambda m: encode(m.astype(np.uint8)), "P": palette_png, "I;16": i16_png}[kind](labels)
    path = work / "every_flip.png"
    wrong = 0
    for pos in range(data.find(b"IDAT") - 4, len(data)):
        corrupt = bytearray(data)
        corrupt[pos] ^= 1 << (pos % 8)
        got = outcome(read_mask, _write(path, bytes(corrupt)))
        wrong += got is not None and not np.array_equal(got, labels)
    assert wrong == 0, f"{wrong} single-bit flips in a {len(data)}-byte PNG gave other labels"


def test_truncated_files_are_errors_or_exact(work):
    """Cut a real PNG/JPEG photo and PNG label maps every 97 bytes: error, or (images only) the full picture."""
    photo = real_photo()
    labels = (photo[..., 0] // 26).astype(np.int64)  # 0..9 with real structure
    cases = {
        "photo.png": (encode(photo), read_image, photo),
        "photo.jpg": (encode(photo, "JPEG", quality=90), read_image, None),
        "mask_l.png": (encode(labels.astype(np.uint8)), read_mask, labels),
        "mask_p.png": (palette_png(labels), read_mask, labels),
    }
    counts = {}
    for name, (data, reader, exact) in cases.items():
        full = outcome(reader, _write(work / name, data))
        assert full is not None
        if exact is not None:
            assert np.array_equal(full, np.asarray(exact))
        n_ok = 0
        cuts = [*range(0, len(data), 97), len(data) - 12, len(data) - 8, len(data) - 1]  # ... and the trailer
        for cut in cuts:
            got = outcome(reader, _write(work / name, data[:cut]))
            if got is not None:
                n_ok += 1
                assert np.array_equal(got, full), f"{name} cut at {cut} bytes gave other pixels"
                # a label map is read only when every chunk CRC was there to check: at most the
                # 4-byte CRC of the empty IEND chunk may be missing
                assert reader is read_image or cut >= len(data) - 4, f"{name} cut at {cut} of {len(data)} read"
        counts[name] = (len(cuts), n_ok)
    assert counts["photo.jpg"][1] == 0, counts  # JPEG has no trailer to lose


@pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")
def test_truncated_real_camvid_files(work):
    """The real 480x360 CamVid image and label map, cut at 16 places each."""
    image_file = sorted((CAMVID / "val").glob("*.png"))[0]
    label_file = CAMVID / "valannot" / image_file.name
    for src, reader in ((image_file, read_image), (label_file, read_mask)):
        data = src.read_bytes()
        full = reader(src)
        for cut in np.linspace(0, len(data) - 13, 16).astype(int):  # -13: at least the IEND chunk is gone
            got = outcome(reader, _write(work / src.name, data[:cut]))
            assert got is None or (reader is read_image and np.array_equal(got, full))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------- huge declared sizes
def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(np.zeros((2, 2, 3), np.uint8), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


@pytest.mark.parametrize(
    "name, data",
    [
        ("rgb_100000x100000.png", png_claiming(100_000, 100_000)),
        ("grey_100000x100000.png", png_claiming(100_000, 100_000, color_type=0)),
        ("grey_20000x10000.png", png_claiming(20_000, 10_000, color_type=0)),
        ("65000x65000.jpg", _jpeg_claiming(65_000, 65_000)),
        ("100000x100000.bmp", _bmp_claiming(100_000, 100_000)),
    ],
)
def test_huge_declared_dimensions_are_refused_before_decoding(work, name, data):
    path = _write(work / name, data)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for reader in (read_image, read_mask, lambda p: read_color_mask(p, [(0, 0, 0)])):
        t0 = time.perf_counter()
        with pytest.raises(UserError) as e:
            reader(path)
        assert time.perf_counter() - t0 < 1.0
        assert_user_error(e.value, path)
        assert "decompression-bomb" in str(e.value) and "downscale" in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # KiB: nothing allocated


def test_a_small_declared_size_with_missing_pixels_is_truncated(work):
    path = _write(work / "short.png", png_claiming(3000, 2000))
    for reader in (read_image, read_mask):
        with pytest.raises(UserError, match="truncated") as e:
            reader(path)
        assert_user_error(e.value, path)


# ------------------------------------------------------------------------- modes: 16-bit, palette, alpha
def test_sixteen_bit_masks_keep_values_and_images_keep_the_top_byte(work):
    values = np.array([[0, 1, 255], [256, 1000, 65535]], np.int64)
    path = _write(work / "m16.png", i16_png(values))
    assert np.array_equal(read_mask(path), values)
    image = read_image(path)
    assert np.array_equal(image, np.repeat((values >> 8).astype(np.uint8)[..., None], 3, -1))
    small = _write(work / "m16_small.png", i16_png(np.array([[0, 7, 255]])))
    assert np.array_equal(read_image(small)[..., 0], [[0, 7, 255]])  # 8-bit data in a 16-bit file stays as is


def test_palette_masks_give_indices_and_palette_images_give_colours(work):
    idx = np.array([[0, 1, 2], [3, 4, 255]])
    path = _write(work / "p.png", palette_png(idx))
    assert np.array_equal(read_mask(path), idx)
    colours = np.array([[(7 * (3 * i + c) + 13) % 256 for c in range(3)] for i in range(256)], np.uint8)
    assert np.array_equal(read_image(path), colours[idx])


def test_alpha_is_dropped_and_grey_is_repeated(work):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    assert np.array_equal(read_image(_write(work / "rgba.png", encode(rgba))), rgba[..., :3])
    la = rng.integers(0, 256, (5, 7, 2), dtype=np.uint8)
    assert np.array_equal(read_image(_write(work / "la.png", encode(la, mode="LA"))), np.repeat(la[..., :1], 3, -1))
    assert np.array_equal(read_mask(work / "la.png"), la[..., 0])
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert np.array_equal(read_image(_write(work / "grey.png", encode(grey))), np.repeat(grey[..., None], 3, -1))
    same = np.repeat(grey[..., None], 3, -1)
    assert np.array_equal(read_mask(_write(work / "grey_rgb.png", encode(same))), grey)
    bits = Image.fromarray(grey > 127).convert("1")
    bits.save(work / "bits.png")
    assert np.array_equal(read_image(work / "bits.png")[..., 0], np.where(grey > 127, 255, 0))
    assert np.array_equal(read_mask(work / "bits.png"), (grey > 127).astype(np.int64))


def test_colour_masks_and_unsupported_modes_are_refused_by_name(work):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1] = (10, 20, 30)
    path = _write(work / "colour.png", encode(rgb))
    with pytest.raises(UserError, match="colour RGB") as e:
        read_mask(path)
    assert_user_error(e.value, path)
    with pytest.raises(UserError, match=r"colour \(10, 20, 30\) at pixel \(row 0, col 1\)") as e:
        read_color_mask(path, [(0, 0, 0)])
    assert_user_error(e.value, path)
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(work / "float.tif")
    for reader in (read_image, read_mask):
        with pytest.raises(UserError, match="mode 'F'") as e:
            reader(work / "float.tif")
        assert_user_error(e.value, work / "float.tif")


# --------------------------------------------------------------------------------------- EXIF rotation
ORIENTATIONS = {  # EXIF 0x0112 value -> how the stored pixels are turned upright (TIFF/EXIF spec)
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.swapaxes(np.rot90(a, 2), 0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_turns_images_and_tagged_masks_the_same_way(work, orientation):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)  # not square: a wrong turn changes the shape
    labels = rng.integers(0, 5, (4, 6)).astype(np.uint8)
    expected = ORIENTATIONS[orientation]
    img = _write(work / "exif.png", encode(stored, exif=_exif(orientation)))
    jpg = _write(work / "exif.jpg", encode(stored, "JPEG", exif=_exif(orientation), quality=95))
    msk = _write(work / "exif_mask.png", encode(labels, exif=_exif(orientation)))
    assert np.array_equal(read_image(img), expected(stored))
    assert read_image(jpg).shape == expected(stored).shape
    assert np.array_equal(read_mask(msk), expected(labels.astype(np.int64)))


def _folder(root: Path, image: bytes, mask: bytes, classes: int = 2) -> SegmentationFolder:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    _write(root / "images" / "a.png", image)
    _write(root / "masks" / "a.png", mask)
    return SegmentationFolder(root, "all", classes=[f"c{i}" for i in range(classes)], transforms=raw_transforms())


def test_exif_rule_in_a_data_set(work):
    """The rule: EXIF orientation is applied to every file that carries it, image or label map. A label
    map without the tag is taken as drawn on the upright image (what viewers and annotation tools show);
    one drawn on the stored pixels of a rotated photo has transposed size and is refused by name."""
    stored = np.zeros((4, 6, 3), np.uint8)
    stored[0, 0] = (255, 0, 0)  # stored top-left -> upright top-right under orientation 6
    upright_labels = np.zeros((6, 4), np.uint8)
    upright_labels[0, 3] = 1
    stored_labels = np.zeros((4, 6), np.uint8)
    stored_labels[0, 0] = 1
    photo = encode(stored, exif=_exif(6))
    for name, mask in (
        ("untagged_upright", encode(upright_labels)),
        ("tagged_stored", encode(stored_labels, exif=_exif(6))),
    ):
        image, labels = _folder(work / name, photo, mask)[0]
        assert tuple(image.shape) == (3, 6, 4) and tuple(labels.shape) == (6, 4)
        assert image[:, 0, 3].tolist() == [255, 0, 0] and labels[0, 3] == 1 and int(labels.sum()) == 1
    ds = _folder(work / "untagged_stored", photo, encode(stored_labels))
    with pytest.raises(UserError, match="EXIF") as e:
        ds[0]
    assert_user_error(e.value, ds.samples[0][0], ds.samples[0][1])


# ------------------------------------------------------------------------------------ tiny and grey
@pytest.mark.parametrize("mode", ["RGB", "L", "P"])
def test_one_pixel_images_through_eval_and_train_transforms(work, mode):
    from pixelwise.data.transforms import eval_transforms, train_transforms

    image = (
        encode(np.array([[[9, 99, 199]]], np.uint8))
        if mode == "RGB"
        else (encode(np.array([[77]], np.uint8)) if mode == "L" else palette_png(np.array([[1]])))
    )
    ds = _folder(work / f"one_{mode}", image, encode(np.array([[1]], np.uint8)))
    img, msk = ds[0]
    assert tuple(img.shape) == (3, 1, 1) and msk.tolist() == [[1]]
    ds.transforms = eval_transforms()
    img, msk = ds[0]
    assert img.dtype.is_floating_point and tuple(img.shape) == (3, 1, 1) and msk.tolist() == [[1]]
    ds.transforms = train_transforms(crop_size=(8, 8), scale_range=(0.5, 2.0))
    img, msk = ds[0]
    assert tuple(img.shape) == (3, 8, 8) and tuple(msk.shape) == (8, 8)
    values = set(msk.unique().tolist())
    assert values <= {1, 255} and 1 in values  # padding is ignore, the one pixel keeps its class


# ---------------------------------------------------------------------- data sets: labels out of range
def _lut_case(kind: str, root: Path, stored: int) -> tuple[object, Path]:
    """Build a one-sample data set of `kind` whose label map holds `stored` at one pixel; return it and the mask."""
    photo = encode(np.full((3, 4, 3), 120, np.uint8))
    labels = np.zeros((3, 4), np.int64)
    labels[1, 2] = stored
    mask = i16_png(labels) if stored > 255 else encode(labels.astype(np.uint8))
    if kind == "camvid":
        _write(_mk(root / "val") / "x.png", photo)
        m = _write(_mk(root / "valannot") / "x.png", mask)
        return CamVid(root, "val", transforms=raw_transforms()), m
    if kind == "voc":
        _write(_mk(root / "JPEGImages") / "x.jpg", encode(np.full((3, 4, 3), 120, np.uint8), "JPEG"))
        m = _write(_mk(root / "SegmentationClass") / "x.png", mask)
        _write(_mk(root / "ImageSets" / "Segmentation") / "val.txt", b"x\n")
        return VOCSegmentation(root, "val", transforms=raw_transforms()), m
    if kind == "cityscapes":
        _write(_mk(root / "leftImg8bit" / "val" / "c") / "c_1_leftImg8bit.png", photo)
        m = _write(_mk(root / "gtFine" / "val" / "c") / "c_1_gtFine_labelIds.png", mask)
        return Cityscapes(root, "val", transforms=raw_transforms()), m
    if kind == "ade20k":
        _write(_mk(root / "images" / "validation") / "x.jpg", encode(np.full((3, 4, 3), 120, np.uint8), "JPEG"))
        m = _write(_mk(root / "annotations" / "validation") / "x.png", mask)
        return ADE20K(root, "val", transforms=raw_transforms()), m
    _write(_mk(root / "image") / "0.png", photo)
    m = _write(_mk(root / "label") / "0.png", mask)
    return ISBI2012(root, slices=[0], transforms=raw_transforms()), m


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# (data set, stored value, expected class index or None for "refused naming the value")
LUT_CASES = [
    ("camvid", 10, 10),
    ("camvid", 11, 255),
    ("camvid", 12, None),
    ("camvid", 300, None),
    ("voc", 20, 20),
    ("voc", 255, 255),
    ("voc", 21, None),
    ("voc", 254, None),
    ("cityscapes", 7, 0),
    ("cityscapes", 33, 18),
    ("cityscapes", 3, 255),
    ("cityscapes", 34, None),
    ("ade20k", 150, 149),
    ("ade20k", 151, None),
    ("isbi2012", 128, None),
]


@pytest.mark.parametrize("kind, stored, expected", LUT_CASES)
def test_stored_label_values_map_or_are_refused_by_name(work, kind, stored, expected):
    ds, mask_path = _lut_case(kind, work / f"{kind}_{stored}", stored)
    if expected is None:
        with pytest.raises(UserError, match=rf"label value {stored} is outside") as e:
            ds[0]
        assert_user_error(e.value, mask_path)
        return
    _, labels = ds[0]
    zero_class = {"camvid": 0, "voc": 0, "cityscapes": 255, "ade20k": 255, "isbi2012": 0}[kind]
    want = np.full((3, 4), zero_class)
    want[1, 2] = expected
    assert np.array_equal(labels.numpy(), want)


IMAGE_MODES = ["RGB", "L", "P", "RGBA", "LA", "I;16"]


def _expected_rgb(mode: str, values: np.ndarray) -> np.ndarray:
    """What read_image must return for an image of `mode` built from `values` (H, W, 4) uint8-range ints."""
    if mode in ("RGB", "RGBA"):
        return values[..., :3].astype(np.uint8)
    if mode in ("L", "LA"):
        return np.repeat(values[..., :1], 3, -1).astype(np.uint8)
    if mode == "P":
        colours = np.array([[(7 * (3 * i + c) + 13) % 256 for c in range(3)] for i in range(256)], np.uint8)
        return colours[values[..., 0]]
    v16 = values[..., 0].astype(np.int64) * 257  # spreads 0..255 over 0..65535
    top = v16 >> 8 if v16.max() > 255 else v16
    return np.repeat(top[..., None], 3, -1).astype(np.uint8)


def _image_bytes(mode: str, values: np.ndarray) -> bytes:
    if mode in ("RGB", "RGBA", "LA"):
        n = {"RGB": 3, "RGBA": 4, "LA": 2}[mode]
        return encode(values[..., :n].astype(np.uint8), mode=mode)
    if mode == "L":
        return encode(values[..., 0].astype(np.uint8))
    if mode == "P":
        return palette_png(values[..., 0])
    return i16_png(values[..., 0].astype(np.int64) * 257)


@settings(
    max_examples=60,
    deadline=3000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    image_mode=st.sampled_from(IMAGE_MODES),
    mask_mode=st.sampled_from(["L", "P", "I;16"]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    num_classes=st.integers(2, 5),
    resize=st.booleans(),
    data=st.data(),
)
def test_folder_data_set_pairs_are_right_or_refused(work, image_mode, mask_mode, h, w, num_classes, resize, data):
    """Random image modes, mask modes and values: the sample equals the expected arrays, or the error names
    the file and the first wrong value; a size mismatch names both files."""
    values = data.draw(hnp.arrays(np.int64, (h, w, 4), elements=st.integers(0, 255)), label="image")
    top = 300 if mask_mode == "I;16" else 255
    labels = data.draw(
        hnp.arrays(
            np.int64,
            (h, w),
            elements=st.one_of(st.integers(0, num_classes - 1), st.sampled_from([255, num_classes, top])),
        ),
        label="labels",
    )
    mh, mw = (h + 1, w) if resize else (h, w)
    mask_values = np.zeros((mh, mw), np.int64)
    mask_values[:h, :w] = labels
    mask = {"L": lambda m: encode(m.astype(np.uint8)), "P": palette_png, "I;16": i16_png}[mask_mode](mask_values)
    root = work / "pairs"
    ds = _folder(root, _image_bytes(image_mode, values), mask, classes=num_classes)
    image_path, mask_path = ds.samples[0]
    bad = (mask_values >= num_classes) & (mask_values != 255)
    try:
        image, got = ds[0]
    except UserError as e:
        assert_user_error(e, mask_path)
        if bad.any():
            assert f"label value {int(mask_values[bad][0])} " in str(e)
        else:
            assert resize and str(image_path) in str(e) and "same size" in str(e)
        return
    assert not bad.any() and not resize, "a wrong label map was accepted"
    assert np.array_equal(got.numpy(), labels)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), _expected_rgb(image_mode, values))


# ------------------------------------------------------------------------ only the formats pixelwise lists
def test_other_formats_under_an_image_name_are_refused_and_ghostscript_never_runs(work, monkeypatch):
    calls = []

    def fake_ghostscript(*args, **kwargs):
        calls.append(args)
        raise OSError("ghostscript must not run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", fake_ghostscript)
    eps = _write(
        work / "evil.png",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
        b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n",
    )
    tga = _write(work / "tga.png", encode(np.zeros((3, 4, 3), np.uint8), "TGA"))
    pcx = _write(work / "pcx.png", encode(np.zeros((3, 4), np.uint8), "PCX"))
    for path in (eps, tga, pcx):
        for reader in (read_image, read_mask):
            with pytest.raises(UserError, match="cannot read") as e:
                reader(path)
            assert_user_error(e.value, path)
    assert calls == []


def test_build_dataset_with_a_missing_root_names_it(work):
    with pytest.raises(UserError) as e:
        build_dataset("camvid", work / "nowhere", "val")
    assert_user_error(e.value, work / "nowhere")


# ------------------------------------------------------------------------- --skip-bad in evaluate/predict
def _tiny_weights(path: Path, classes: list[str], palette: list[tuple[int, int, int]]) -> Path:
    import torch

    from pixelwise.models import get_model
    from pixelwise.weights import save_weights

    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "depth": 2, "padding": "same"}
    save_weights(
        path,
        get_model("unet", num_classes=len(classes), **kwargs),
        model_name="unet",
        model_kwargs=kwargs,
        classes=classes,
        palette=palette,
    )
    return path


def _flip_in_idat(data: bytes) -> bytes:
    corrupt = bytearray(data)
    corrupt[data.find(b"IDAT") + 6] ^= 0x10
    return bytes(corrupt)


def _camvid_with_bad_files(root: Path, *, with_bad: bool) -> dict[str, str]:
    """CamVid layout, 3 good pairs and (with_bad) 6 bad ones; returns {bad image name: what is wrong}."""
    from pixelwise.data.datasets import CAMVID_CLASSES

    rng = np.random.default_rng(1)
    images, labels = _mk(root / "val"), _mk(root / "valannot")
    for i in range(3):
        _write(images / f"g{i}.png", encode(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)))
        _write(labels / f"g{i}.png", encode(rng.integers(0, len(CAMVID_CLASSES) + 1, (12, 16), dtype=np.uint8)))
    if not with_bad:
        return {}
    good_image = encode(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    good_label = encode(rng.integers(0, 11, (12, 16), dtype=np.uint8))
    bad = {
        "a_truncated.png": (good_image[:200], good_label, "cannot read"),
        "b_random.png": (rng.bytes(300), good_label, "cannot read"),
        "c_label.png": (good_image, encode(np.full((12, 16), 40, np.uint8)), "label value 40"),
        "d_size.png": (good_image, encode(np.zeros((12, 15), np.uint8)), "same size"),
        "e_bomb.png": (png_claiming(100_000, 100_000), good_label, "decompression-bomb"),
        "f_flipped.png": (good_image, _flip_in_idat(good_label), "cannot read"),
    }
    for name, (image, label, _) in bad.items():
        _write(images / name, image)
        _write(labels / name, label)
    return {name: why for name, (_, _, why) in bad.items()}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from pixelwise.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_evaluate_skip_bad_lists_every_bad_file_and_scores_the_rest(work, capsys):
    from pixelwise.data.datasets import CAMVID_CLASSES, CAMVID_PALETTE

    weights = _tiny_weights(work / "camvid.safetensors", CAMVID_CLASSES, CAMVID_PALETTE)
    dirty, clean = work / "dirty", work / "clean"
    bad = _camvid_with_bad_files(dirty, with_bad=True)
    _camvid_with_bad_files(clean, with_bad=False)
    rc, _, err = _cli(
        capsys, "evaluate", "--weights", weights, "--data", dirty, "--dataset", "camvid", "--out", work / "ev-stop"
    )
    assert rc == 2 and err.count("\n") == 1 and str(dirty / "val" / "a_truncated.png") in err
    assert not (work / "ev-stop" / "metrics.json").exists()
    rc, _, err = _cli(
        capsys, "evaluate", "--weights", weights, "--data", clean, "--dataset", "camvid", "--out", work / "ev-clean"
    )
    assert rc == 0, err
    reference = json.loads((work / "ev-clean" / "metrics.json").read_text())
    for workers in (0, 2):
        out = work / f"ev-skip-{workers}"
        rc, stdout, err = _cli(
            capsys,
            "evaluate",
            "--weights",
            weights,
            "--data",
            dirty,
            "--dataset",
            "camvid",
            "--out",
            out,
            "--skip-bad",
            "--workers",
            workers,
        )
        assert rc == 0, err
        assert f"skipped {len(bad)} bad files" in stdout
        report = json.loads((out / "bad_files.json").read_text())
        assert [Path(r["file"]).name for r in report] == sorted(bad)
        for r in report:
            assert bad[Path(r["file"]).name] in r["error"] and "\n" not in r["error"]
        lines = (out / "bad_files.txt").read_text().splitlines()
        assert len(lines) == len(bad) and all("\t" in line for line in lines)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["num_images"] == 3 and len(metrics["skipped"]) == len(bad)
        for key in ("pixel_acc", "mean_acc", "miou", "fwiou", "per_class_iou", "per_class_dice"):
            assert metrics["scores"][key] == reference["scores"][key], key  # the bad files changed nothing else


def test_predict_skip_bad_lists_every_bad_file_and_writes_the_rest(work, capsys):
    weights = _tiny_weights(work / "two.safetensors", ["a", "b"], [(0, 0, 0), (255, 0, 0)])
    rng = np.random.default_rng(2)
    good, mixed = _mk(work / "pred-good"), _mk(work / "pred-mixed")
    for i in range(3):
        data = encode(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
        _write(good / f"g{i}.png", data)
        _write(mixed / f"g{i}.png", data)
    bad = {
        "a_truncated.jpg": encode(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8), "JPEG")[:300],
        "b_random.png": rng.bytes(500),
        "c_bomb.png": png_claiming(100_000, 100_000),
        "d_eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        "e_float.tif": None,
    }
    for name, data in bad.items():
        if data is None:
            Image.fromarray(np.zeros((4, 4), np.float32)).save(mixed / name)
        else:
            _write(mixed / name, data)
    rc, _, err = _cli(capsys, "predict", "--weights", weights, mixed, "--out", work / "pred-stop")
    assert rc == 2 and err.count("\n") == 1 and str(mixed / "a_truncated.jpg") in err
    rc, _, err = _cli(capsys, "predict", "--weights", weights, good, "--out", work / "pred-ref")
    assert rc == 0, err
    rc, stdout, err = _cli(capsys, "predict", "--weights", weights, mixed, "--out", work / "pred-skip", "--skip-bad")
    assert rc == 0 and f"skipped {len(bad)} bad files" in stdout, err
    listed = [line.split("\t")[0] for line in (work / "pred-skip" / "bad_files.txt").read_text().splitlines()]
    assert listed == [str(mixed / name) for name in sorted(bad)]
    for kind in ("masks", "overlays"):
        written = sorted(p.name for p in (work / "pred-skip" / kind).iterdir())
        assert written == ["g0.png", "g1.png", "g2.png"]
        for name in written:
            assert (work / "pred-skip" / kind / name).read_bytes() == (work / "pred-ref" / kind / name).read_bytes()
