"""Class statistics of a data set: pixel frequencies and median-frequency balancing weights."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ClassStats:
    """Pixel counts per class over a data set (ignored pixels excluded).

    Attributes:
        pixels: (K,) pixels labelled with each class.
        present_pixels: (K,) total labelled pixels of the images in which each class occurs.
        images: (K,) number of images in which each class occurs.
        num_images: images counted.
        ignored_pixels: pixels with the ignore index (or any value outside 0..K-1).
    """

    pixels: np.ndarray
    present_pixels: np.ndarray
    images: np.ndarray
    num_images: int
    ignored_pixels: int

    @property
    def frequency(self) -> np.ndarray:
        """Share of all labelled pixels per class. Shape (K,)."""
        return self.pixels / max(1, self.pixels.sum())

    def median_frequency_weights(self) -> np.ndarray:
        """Median-frequency balancing (Eigen & Fergus 2015, used by SegNet).

        freq(c) = pixels of c / total pixels of the images where c is present;
        weight(c) = median_c(freq) / freq(c). A class that never occurs gets weight 0.

        Shape:
            (K,) float64.
        """
        present = self.pixels > 0
        freq = np.zeros(len(self.pixels))
        freq[present] = self.pixels[present] / self.present_pixels[present]
        weights = np.zeros(len(self.pixels))
        weights[present] = np.median(freq[present]) / freq[present]
        return weights


def class_stats(dataset, *, indices: Iterable[int] | None = None, num_classes: int | None = None) -> ClassStats:
    """Count class pixels over `dataset` (or the images `indices`), reading only the masks.

    Uses `dataset.load_mask(i)` when the data set has it (no image decoding, no transform), else
    `dataset[i][1]`. Pixels outside 0..K-1 (the ignore index) are not counted.
    """
    k = num_classes if num_classes is not None else dataset.num_classes
    pixels = np.zeros(k, dtype=np.int64)
    present_pixels = np.zeros(k, dtype=np.int64)
    images = np.zeros(k, dtype=np.int64)
    n = ignored = 0
    for i in indices if indices is not None else range(len(dataset)):
        mask = dataset.load_mask(i) if hasattr(dataset, "load_mask") else dataset[i][1]
        mask = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        valid = (mask >= 0) & (mask < k)
        counts = np.bincount(mask[valid].ravel(), minlength=k)[:k]
        here = counts > 0
        pixels += counts
        present_pixels[here] += int(valid.sum())
        images += here
        ignored += int(mask.size - valid.sum())
        n += 1
    return ClassStats(pixels=pixels, present_pixels=present_pixels, images=images, num_images=n, ignored_pixels=ignored)


def median_frequency_weights(dataset, *, indices: Iterable[int] | None = None) -> torch.Tensor:
    """SegNet's class weights for `dataset` as a float32 tensor, ready for `CrossEntropyLoss(weight=...)`.

    Shape:
        (K,).
    """
    return torch.tensor(class_stats(dataset, indices=indices).median_frequency_weights(), dtype=torch.float32)
