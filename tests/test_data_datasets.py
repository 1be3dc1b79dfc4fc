"""Data sets: label mappings checked numerically on tiny fake trees, real CamVid/ISBI slices, synthetic data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_camvid
from PIL import Image

from pixelwise.data import (
    ADE20K,
    ISBI2012,
    CamVid,
    Cityscapes,
    SegmentationFolder,
    SyntheticShapes,
    VOCSegmentation,
    build_dataset,
    raw_transforms,
)
from pixelwise.errors import ArgumentError, UserError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RNG = np.random.default_rng(0)


def _img(path: Path, h: int = 4, w: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
    return path


def _mask(path: Path, values, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(values, dtype=np.uint8))
    if palette:
        im.putpalette([v for i in range(256) for v in ((i * 40) % 256, (i * 80) % 256, 255 - i)])
    im.save(path)
    return path


def test_voc_maps_palette_indices_and_boundary_and_sbd_mat(tmp_path):
    import scipy.io

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    seg = np.array([[0, 0, 15, 15, 255, 20]] * 4)
    for i in ("a", "b"):
        _img(voc / "JPEGImages" / f"{i}.jpg")
    _mask(voc / "SegmentationClass" / "a.png", seg, palette=True)
    _mask(voc / "SegmentationClass" / "b.png", seg, palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    ds = VOCSegmentation(tmp_path, "train", transforms=raw_transforms())  # found below the given root
    image, mask = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 6)
    assert mask.dtype == torch.int64 and (mask.numpy() == seg).all()
    assert ds.num_classes == 21 and ds.palette[1] == (128, 0, 0)

    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("c\nb\n")
    (sbd / "val.txt").write_text("a\n")
    _img(sbd / "img" / "c.jpg")
    scipy.io.savemat(
        sbd / "cls" / "c.mat", {"GTcls": {"Segmentation": np.array([[3, 4, 0, 0, 0, 0]] * 4, dtype=np.uint8)}}
    )
    aug = VOCSegmentation(voc, "train_aug", transforms=raw_transforms(), sbd_root=tmp_path / "benchmark_RELEASE")
    # (SBD train+val + VOC train) - VOC val: b is VOC val, so a (VOC png) and c (SBD .mat)
    assert [p[0].stem for p in aug.samples] == ["a", "c"]
    assert aug.samples[1][0] == sbd / "img" / "c.jpg"
    assert aug[1][1][0].tolist() == [3, 4, 0, 0, 0, 0]
    with pytest.raises(UserError, match="needs sbd_root"):
        VOCSegmentation(voc, "train_aug")
    _mask(voc / "SegmentationClass" / "a.png", np.full((4, 6), 21), palette=True)
    with pytest.raises(UserError, match=r"a\.png: label value 21 is outside 0\.\.20"):
        ds[0]


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    ids = np.array([[0, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22], [23, 24, 25, 26, 27, 28, 31, 32, 33, 30, 255]])
    expected = np.array([[255, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 255, 255]])
    _img(tmp_path / "leftImg8bit" / "val" / "bonn" / "bonn_000000_000019_leftImg8bit.png", 2, 11)
    _mask(tmp_path / "gtFine" / "val" / "bonn" / "bonn_000000_000019_gtFine_labelIds.png", ids)
    ds = build_dataset("cityscapes", tmp_path, "val", transforms=raw_transforms())
    assert isinstance(ds, Cityscapes) and ds.num_classes == 19
    assert (ds[0][1].numpy() == expected).all()
    _mask(tmp_path / "gtFine" / "val" / "bonn" / "bonn_000000_000019_gtFine_labelIds.png", np.full((2, 11), 34))
    with pytest.raises(UserError, match="label value 34"):
        ds[0]


def test_ade20k_zero_is_ignored_and_others_shift_down(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _img(root / "images" / "validation" / "ADE_val_1.jpg", 1, 4)
    _mask(root / "annotations" / "validation" / "ADE_val_1.png", [[0, 1, 2, 150]])
    ds = ADE20K(tmp_path, "val", transforms=raw_transforms())
    assert len(ADE20K.classes) == 150 and len(set(ADE20K.classes)) == 150
    assert ds[0][1].tolist() == [[255, 0, 1, 149]]
    _mask(root / "annotations" / "validation" / "ADE_val_1.png", [[0, 1, 2, 151]])
    with pytest.raises(UserError, match="label value 151"):
        ds[0]


def test_folder_index_and_colour_masks(tmp_path):
    palette = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]
    _img(tmp_path / "val" / "images" / "x.jpg", 2, 3)
    _mask(tmp_path / "val" / "masks" / "x.png", [[0, 1, 2], [255, 2, 1]])
    colour = np.zeros((2, 3, 3), dtype=np.uint8)
    colour[0, 1], colour[1, 2], colour[1, 0] = (255, 0, 0), (0, 0, 255), (7, 7, 7)
    _img(tmp_path / "val" / "images" / "y.png", 2, 3)
    Image.fromarray(colour).save(tmp_path / "val" / "masks" / "y.png")
    ds = build_dataset(
        "folder",
        tmp_path,
        "val",
        transforms=raw_transforms(),
        classes=["bg", "red", "blue"],
        palette=palette,
        ignore_color=(7, 7, 7),
    )
    assert [p[0].name for p in ds.samples] == ["x.jpg", "y.png"]
    assert ds[0][1].tolist() == [[0, 1, 2], [255, 2, 1]]
    assert ds[1][1].tolist() == [[0, 1, 0], [255, 0, 2]]
    colour[0, 0] = (1, 1, 1)
    Image.fromarray(colour).save(tmp_path / "val" / "masks" / "y.png")
    with pytest.raises(UserError, match=r"y\.png: colour \(1, 1, 1\)"):
        ds[1]
    _img(tmp_path / "val" / "images" / "z.png", 2, 3)
    with pytest.raises(UserError, match=r"z\.png: no mask with stem 'z'"):
        SegmentationFolder(tmp_path, "val", classes=["bg", "red", "blue"])
    with pytest.raises(UserError, match="split 'train'"):
        SegmentationFolder(tmp_path, "train", classes=["bg"])


def test_size_mismatch_names_both_files(tmp_path):
    _img(tmp_path / "images" / "a.png", 4, 6)
    _mask(tmp_path / "masks" / "a.png", np.zeros((4, 5)))
    ds = SegmentationFolder(tmp_path, "all", classes=["bg", "fg"])
    with pytest.raises(UserError, match=r"images/a\.png is 6x4 but its label map .*masks/a\.png is 5x4"):
        ds[0]


def test_build_dataset_errors():
    with pytest.raises(ArgumentError, match="did you mean 'camvid'"):
        build_dataset("camvd", ".", "val")
    with pytest.raises(UserError, match="does not exist"):
        build_dataset("camvid", "/no/such/folder", "val")
    with pytest.raises(ArgumentError, match="takes no option 'sbd_root'"):
        build_dataset("ade20k", ".", "val", sbd_root="x")
    # a data set without options once ended its message at "it takes"
    with pytest.raises(ArgumentError, match=r"'camvid' takes no option 'num_classes'; it takes no options at all$"):
        build_dataset("camvid", ".", "val", num_classes=3)


@pytest.mark.skipif(not (DATA / "camvid").is_dir(), reason="needs ../shared/data/camvid")
def test_camvid_real_split_and_unlabelled_to_ignore():
    train = CamVid(DATA / "camvid", "train")
    val = build_dataset("camvid", DATA / "camvid", "val")
    assert (len(train), len(val)) == (367, 101)
    image, mask = val[0]
    assert image.dtype == torch.float32 and image.shape == (3, 360, 480) and mask.shape == (360, 480)
    assert -2.2 < float(image.min()) and float(image.max()) < 2.7  # ImageNet-normalised
    raw = np.asarray(Image.open(val.samples[0][1]))
    assert ((raw == 11) == (mask.numpy() == 255)).all()
    assert (mask.numpy()[raw < 11] == raw[raw < 11]).all()


@pytest.mark.skipif(not (DATA / "isbi2012").is_dir(), reason="needs ../shared/data/isbi2012")
def test_isbi_membrane_is_class_0_and_cell_class_1():
    train = ISBI2012(DATA / "isbi2012", "train")
    val = ISBI2012(DATA / "isbi2012", "val", transforms=raw_transforms())
    assert (len(train), len(val)) == (25, 5) and val.samples[0][0].name == "25.png"
    assert train.classes == ["membrane", "cell"]
    image, mask = val[0]
    raw = np.asarray(Image.open(val.samples[0][1]))
    assert image.shape == (3, 512, 512) and (mask.numpy() == (raw == 255)).all()
    assert torch.equal(image[0], image[1])  # grey repeated over three channels
    assert len(ISBI2012(DATA / "isbi2012", slices=[3, 4])) == 2


def test_synthetic_is_deterministic_and_learnable_looking():
    a = SyntheticShapes(num_images=4, size=(48, 64), num_classes=5, seed=3)
    b = SyntheticShapes(num_images=4, size=(48, 64), num_classes=5, seed=3)
    c = SyntheticShapes(num_images=4, size=(48, 64), num_classes=5, seed=4)
    for i in range(4):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i], strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    assert a[0][0].shape == (3, 48, 64) and a[0][1].dtype == torch.int64
    assert len(a.classes) == len(a.palette) == 5 and len(set(a.classes)) == 5
    masks = torch.stack([a[i][1] for i in range(4)])
    assert set(masks.unique().tolist()) <= set(range(5)) and (masks == 0).any() and (masks > 0).any()
    # per-class mean colours differ: the classes are separable by appearance
    means = {}
    for i in range(4):
        img, m = a.load(i)
        for k in np.unique(m):
            means.setdefault(int(k), []).append(img[m == k].mean(0))
    cols = np.stack([np.mean(v, 0) for v in means.values()])
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert d[~np.eye(len(cols), dtype=bool)].min() > 30


def test_synthetic_same_with_loader_workers():
    ds = build_dataset("synthetic", "", "val", num_images=4, size=(32, 32), num_classes=3, seed=1)
    single = [m for _, m in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)]
    multi = [m for _, m in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(single, multi, strict=True))
    train = build_dataset("synthetic", "", "train", num_images=4, size=(32, 32), num_classes=3, seed=1)
    assert not torch.equal(train[0][1], ds[0][1])  # splits draw from different seeds


def test_cache_decoded_keeps_samples_within_the_bound(tmp_path, monkeypatch):
    ds = CamVid(write_camvid(tmp_path, splits={"train": 5}, size=(12, 16)), "train")
    expected = [ds[i] for i in range(len(ds))]
    per_sample = 12 * 16 * 3 + 12 * 16  # uint8 image + mask narrowed to uint8
    assert ds.cache_decoded(3 * per_sample) == 3  # stops when the next sample would not fit
    assert ds.cache_decoded(10 * per_sample, indices=[4]) == 4  # adds only what it is asked for
    assert all(ds._decoded[i][1].dtype == np.uint8 for i in ds._decoded)

    def no_disk(*args, **kwargs):
        raise AssertionError("a cached sample was read from disk")

    monkeypatch.setattr("pixelwise.data.datasets.read_image", no_disk)
    for i in (0, 1, 2, 4):
        image, mask = ds[i]
        assert torch.equal(image, expected[i][0]) and torch.equal(mask, expected[i][1])
        assert mask.dtype == torch.int64
    with pytest.raises(AssertionError, match="read from disk"):
        ds[3]  # not cached: decoded as usual
