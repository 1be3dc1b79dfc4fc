"""Data: data sets, the built-in synthetic set, joint augmentation, class statistics, safe image I/O."""

from pixelwise.data.datasets import (
    ADE20K,
    DATASETS,
    ISBI2012,
    CamVid,
    Cityscapes,
    SegmentationDataset,
    SegmentationFolder,
    VOCSegmentation,
    build_dataset,
    raw_transforms,
)
from pixelwise.data.synthetic import SyntheticShapes
from pixelwise.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transforms, train_transforms

__all__ = [
    "ADE20K",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ISBI2012",
    "CamVid",
    "Cityscapes",
    "SegmentationDataset",
    "SegmentationFolder",
    "SyntheticShapes",
    "VOCSegmentation",
    "build_dataset",
    "eval_transforms",
    "raw_transforms",
    "train_transforms",
]
