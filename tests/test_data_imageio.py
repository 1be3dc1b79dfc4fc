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
