"""Safe image / label-map reading: exact label values, EXIF, and one-line errors naming the file."""

import io

import numpy as np
import pytest
from PIL import Image

from pixelwise.data import imageio
from pixelwise.data.imageio import check_labels, check_same_size, read_color_mask, read_image, read_mask
from pixelwise.errors import UserError


def _save(path, array, mode=None, **kw):
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    im.save(path, **kw)
    return path


def test_grey_image_is_repeated_to_rgb_and_alpha_dropped(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = read_image(_save(tmp_path / "g.png", grey))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert (out == grey[..., None]).all()
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    out = read_image(_save(tmp_path / "a.png", rgba))
    assert out.shape == (2, 2, 3) and (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    a[0, 0] = 255  # marks the top-left pixel
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (3, 2, 3)  # width and height swapped
    assert out[0, 1].mean() > 128  # top-left went to the top-right


def test_palette_mask_gives_indices_not_colours(tmp_path):
    idx = np.array([[0, 1, 2], [255, 7, 20]], dtype=np.uint8)
    im = Image.fromarray(idx).convert("L")
    im.putpalette([(i * 37) % 256 for i in range(768)])  # -> mode 'P'
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = read_mask(tmp_path / "p.png")
    assert out.dtype == np.int64 and (out == idx).all()


def test_16_bit_mask_keeps_exact_values(tmp_path):
    a = np.array([[0, 300], [1000, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "m16.png")
    assert (read_mask(tmp_path / "m16.png") == a.astype(np.int64)).all()


def test_colour_rgb_mask_is_refused_by_read_mask(tmp_path):
    a = np.zeros((2, 2, 3), dtype=np.uint8)
    a[0, 0] = (255, 0, 0)
    with pytest.raises(UserError, match=r"c\.png.*colour RGB image with 3 channels"):
        read_mask(_save(tmp_path / "c.png", a))
    grey_rgb = np.repeat(np.array([[1, 2], [3, 4]], dtype=np.uint8)[..., None], 3, axis=2)
    assert (read_mask(_save(tmp_path / "g.png", grey_rgb)) == [[1, 2], [3, 4]]).all()


def test_colour_mask_through_palette_and_unknown_colour(tmp_path):
    palette = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    a[0, 1] = (255, 0, 0)
    a[1, 2] = (0, 255, 0)
    a[1, 0] = (9, 9, 9)  # the ignore colour
    out = read_color_mask(_save(tmp_path / "c.png", a), palette, ignore_color=(9, 9, 9))
    assert out.tolist() == [[0, 1, 0], [255, 0, 2]]
    a[0, 0] = (1, 2, 3)
    with pytest.raises(UserError, match=r"c2\.png: colour \(1, 2, 3\) at pixel \(row 0, col 0\)"):
        read_color_mask(_save(tmp_path / "c2.png", a), palette, ignore_color=(9, 9, 9))


def test_truncated_corrupt_and_missing_files_are_user_errors(tmp_path):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UserError, match=r"t\.png: cannot read this image"):
        read_image(tmp_path / "t.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=r"junk\.jpg: cannot read this label map"):
        read_mask(tmp_path / "junk.jpg")
    with pytest.raises(UserError, match=r"nope\.png: no such image file"):
        read_image(tmp_path / "nope.png")


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    _save(tmp_path / "big.png", np.zeros((40, 50), dtype=np.uint8))
    monkeypatch.setattr(imageio, "MAX_PIXELS", 1000)
    with pytest.raises(UserError, match=r"big\.png: 50x40 pixels exceeds the limit of 1000"):
        read_image(tmp_path / "big.png")


def test_float_image_mode_is_refused_with_channel_hint(tmp_path):
    Image.fromarray(np.zeros((3, 3), dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(UserError, match=r"f\.tif: image mode 'F' \(1 channels\) is not supported"):
        read_image(tmp_path / "f.tif")


def test_label_and_size_checks_name_file_and_value():
    mask = np.array([[0, 1], [255, 5]])
    with pytest.raises(UserError, match=r"m\.png: label value 5 is outside 0\.\.3 and is not the ignore index 255"):
        check_labels(mask, num_classes=4, ignore_index=255, path="m.png")
    check_labels(mask, num_classes=6, ignore_index=255, path="m.png")
    raw = np.array([[7, 8], [9, 42]])  # the stored value is reported, not the looked-up one
    with pytest.raises(UserError, match="label value 42"):
        check_labels(np.array([[0, 1], [2, -1]]), num_classes=4, ignore_index=255, path="m.png", raw=raw)
    with pytest.raises(UserError, match=r"a\.jpg is 4x3 but its label map b\.png is 4x2"):
        check_same_size(np.zeros((3, 4, 3)), np.zeros((2, 4)), "a.jpg", "b.png")


def test_fuzzed_bytes_give_arrays_or_user_errors(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 3, dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()

    @hypothesis.settings(max_examples=25, deadline=None, database=None)
    @hypothesis.given(cut=st.integers(0, len(png)), flips=st.lists(st.integers(0, len(png) - 1), max_size=4))
    def check(cut, flips):
        data = bytearray(png[:cut] if cut < len(png) else png)
        for i in flips:
            if i < len(data):
                data[i] ^= 0xFF
        path = tmp_path / "fuzz.png"
        path.write_bytes(bytes(data))
        for reader in (read_image, read_mask):
            try:
                out = reader(path)
            except UserError as e:
                assert "fuzz.png" in str(e) and "\n" not in str(e)
            else:
                assert out.shape[:2] == (8, 8)

    check()


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_gif_is_read_by_the_one_decoder_for_files_and_uploads(tmp_path):
    """`predict` once called a valid GIF corrupt while `serve` accepted it: one list of formats now."""
    a = np.zeros((4, 6, 3), np.uint8)
    a[:, :2] = (255, 0, 0)
    (tmp_path / "x.gif").write_bytes(_encoded(a, "GIF"))
    np.testing.assert_array_equal(read_image(tmp_path / "x.gif"), a)
    np.testing.assert_array_equal(imageio.decode_image(_encoded(a, "GIF")), a)
    assert ".gif" in imageio.IMAGE_EXTENSIONS and "GIF" in imageio.FORMATS


def test_unsupported_format_and_corrupt_file_are_different_errors(tmp_path):
    eps = tmp_path / "photo.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(
        imageio.ImageFormatError,
        match=r"photo\.png: cannot read this image: it is EPS, which is "
        r"not supported; convert it to PNG, JPEG",
    ):
        read_image(eps)
    (tmp_path / "text.jpg").write_bytes(b"hello, not an image")
    with pytest.raises(imageio.ImageFormatError, match="the format is not recognised"):
        read_image(tmp_path / "text.jpg")
    png = _encoded(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), "PNG")
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(
        imageio.CorruptImage,
        match=r"cut\.png: cannot read this image: the PNG data is corrupt "
        r"or truncated \(.*\); replace it or use --skip-bad",
    ):
        read_image(tmp_path / "cut.png")
    with pytest.raises(imageio.CorruptImage, match="uploaded image: .* corrupt or truncated"):
        imageio.decode_image(png[: len(png) // 2])


def test_bomb_message_states_the_limit_that_is_enforced(tmp_path):
    """A header of 10000 x 9000 = 90 MP is over Pillow's warning limit (89,478,485) but under its error limit
    (178,956,970): the message used to quote the error limit, which was never the one enforced."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 9000, 8, 0, 0, 0, 0))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b""))
    with pytest.raises(
        imageio.ImageTooLarge,
        match=r"bomb\.png: 10000x9000 pixels exceeds the limit of "
        r"89478485",
    ) as e:
        read_image(tmp_path / "bomb.png")
    assert "178956970" not in str(e.value)
