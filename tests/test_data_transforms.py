"""Joint augmentation: masks only ever resampled with NEAREST, ignore padding, image/mask kept aligned."""

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from pixelwise.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GridElastic,
    RandomScale,
    eval_transforms,
    train_transforms,
)


def _pair(h=40, w=56, values=(0, 3, 7)):
    """An image whose red channel encodes the mask value, so alignment can be checked after geometry."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(values), (h // 8, w // 8), generator=g)
    idx = idx.repeat_interleave(8, 0).repeat_interleave(8, 1)  # blocky, so NEAREST keeps blocks
    mask = torch.tensor(values)[idx]
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[0] = (mask * 30).to(torch.uint8)
    image[1] = 200
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


@pytest.mark.parametrize(
    "kw",
    [
        {"scale_range": (0.37, 1.9)},
        {"scale_range": None, "rotation": 33.0},
        {"scale_range": (0.6, 1.4), "elastic": True},
        {"scale_range": (0.6, 1.4), "elastic": "smooth"},
        {"scale_range": (0.5, 2.0), "rotation": 20.0, "elastic": True, "color_jitter": 0.3},
    ],
)
def test_mask_values_stay_in_original_set_plus_ignore(kw):
    torch.manual_seed(1)
    image, mask = _pair()
    tf = train_transforms(crop_size=(32, 48), **kw)
    for _ in range(5):
        img, m = tf(image, mask)
        assert img.shape == (3, 32, 48) and img.dtype == torch.float32
        assert m.shape == (32, 48) and m.dtype == torch.int64
        assert set(m.unique().tolist()) <= {0, 3, 7, 255}


def test_crop_pads_mask_with_ignore_and_image_with_mean():
    image, mask = _pair(h=16, w=16)
    tf = train_transforms(crop_size=(24, 40), scale_range=None, flip=False, ignore_index=255)
    img, m = tf(image, mask)
    assert img.shape == (3, 24, 40)
    pad = m == 255
    assert pad.sum() == 24 * 40 - 16 * 16  # exactly the added pixels
    # padded pixels hold the mean colour, i.e. ~0 after normalising (rounding to uint8 aside)
    assert img[:, pad].abs().max() < 0.02


def test_flip_and_scale_keep_image_and_mask_aligned():
    torch.manual_seed(0)
    image, mask = _pair()
    tf = train_transforms(crop_size=(40, 56), scale_range=(0.8, 1.25), flip=True, mean=(0, 0, 0), std=(1, 1, 1))
    for _ in range(6):
        img, m = tf(image, mask)
        keep = (m != 255) & (img[1] > 0.7)  # away from padding, green channel marks real image pixels
        red = (img[0] * 255 / 30)[keep]  # red encodes the mask value (bilinear blends only at block edges)
        agree = (red.round() == m[keep].float()).float().mean()
        assert agree > 0.85


def test_random_scale_uses_nearest_for_masks():
    torch.manual_seed(0)
    image, mask = _pair()
    for _ in range(5):
        img, m = RandomScale((0.3, 3.0))(image, mask)
        assert img.shape[-2:] == m.shape
        assert set(m.unique().tolist()) <= {0, 3, 7}


def test_eval_transforms_normalise_exactly():
    image = tv_tensors.Image(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(2, 2, dtype=torch.uint8))
    img, m = eval_transforms()(image, mask)
    expected = [(1 - mu) / sd for mu, sd in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert np.allclose(img[:, 0, 0].numpy(), expected, atol=1e-6) and m.dtype == torch.int64
    with pytest.raises(ValueError, match="std > 0"):
        eval_transforms(mean=(0.5,), std=(0.0,))


def test_grid_elastic_is_the_papers_3x3_grid_of_10_pixel_displacements():
    """Each output pixel's source, read off a mask of pixel ids: displacements have a 10-pixel standard
    deviation at the grid's points, vary smoothly between them, and the image moves with the mask."""
    h = w = 65  # grid points at pixels 0, 32 and 64
    ids = tv_tensors.Mask(torch.arange(h * w).view(h, w))
    image = tv_tensors.Image((3 * (ids % w)).to(torch.uint8).expand(3, h, w).clone())  # 3 x its column
    elastic = GridElastic({tv_tensors.Image: [0, 0, 0], tv_tensors.Mask: -1})
    torch.manual_seed(0)
    at_centre, steps = [], []
    for _ in range(300):
        img, src = elastic(image, ids)
        inside = src >= 0
        # one warp for both: the bilinear image's column within half a pixel of the mask's nearest one (away
        # from the border, where the image blends in its fill)
        rows, cols = src // w, src % w
        core = inside & (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
        assert ((img[0].float() / 3 - cols).abs()[core] <= 0.5 + 1 / 6 + 1e-3).all()  # + uint8 rounding / 3
        dx = cols - torch.arange(w)[None, :]  # the source column minus the output's
        if inside[32, 32]:
            at_centre.append(float(dx[32, 32]))
        both = inside[:, 1:] & inside[:, :-1]  # neighbours' displacements differ by rounding, not jumps
        steps.append(int((dx[:, 1:] - dx[:, :-1])[both].abs().max()))
    assert 8.5 < torch.tensor(at_centre).std() < 11.5 and max(steps) <= 3
    torch.manual_seed(5)
    a = elastic(image, ids)[1]
    torch.manual_seed(5)
    assert torch.equal(a, elastic(image, ids)[1])  # the global RNG, seeded per sample by the loader
