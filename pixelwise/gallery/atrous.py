"""Figure 2: effective receptive fields of atrous convolution and ASPP (Luo et al., NIPS 2016: the gradient
of one output pixel with respect to the input image).

Each block of `pixelwise.layers` sits on SegNet-Basic's encoder cut at stride 8 (three 7x7 conv + 2x2
pool stages, DeepLab's output stride 8), once untrained and once with the built-in CamVid weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pixelwise.gallery.common import Drawn, pyplot, save_png, show
from pixelwise.inference import normalize
from pixelwise.layers import ASPP, ASPPv2, aspp_rates, atrous_conv3x3

STRIDE = 8  # the encoder's map used: the third of SegNet-Basic's four pooled maps
RATES = (1, 2, 4, 8)
ASPP_V2_RATES = (6, 12, 18, 24)  # ASPP-L (DeepLab v2, output stride 8)


def atrous_stack(channels: int, rate: int, layers: int = 3) -> nn.Sequential:
    """`layers` x (3x3 atrous conv at `rate`, ReLU). Shape: (B, C, H, W) -> (B, C, H, W)."""
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [atrous_conv3x3(channels, channels, rate), nn.ReLU()]
    return nn.Sequential(*mods)


def blocks(channels: int, num_classes: int) -> list[tuple[str, nn.Module]]:
    """The compared heads, at their initialisation (seed 0): none, conv stacks at each rate, ASPP v2 and v3."""
    torch.manual_seed(0)
    heads: list[tuple[str, nn.Module]] = [("encoder alone", nn.Identity())]
    heads += [(f"+ 3 x 3x3 conv, rate {r}", atrous_stack(channels, r)) for r in RATES]
    heads.append(
        (f"+ ASPP v2 ({', '.join(map(str, ASPP_V2_RATES))})", ASPPv2(channels, num_classes, ASPP_V2_RATES, None))
    )
    v3 = aspp_rates(STRIDE)
    heads.append((f"+ ASPP v3 ({', '.join(map(str, v3))}, 1x1, pool)", ASPP(channels, v3, channels)))
    return [(name, head.eval()) for name, head in heads]


def effective_rf(features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[np.ndarray, tuple]:
    """|d out / d x| of the centre output pixel (summed over output channels and RGB), and that pixel's
    centre in input coordinates. Shape: x (1, 3, H, W) normalised -> (H, W) float64, (row, col)."""
    x = x.clone().requires_grad_(True)
    y = features(x)  # (1, C, h, w)
    i, j = y.shape[-2] // 2, y.shape[-1] // 2
    y[0, :, i, j].sum().backward()
    return x.grad[0].abs().sum(0).double().numpy(), (i * STRIDE + STRIDE / 2 - 0.5, j * STRIDE + STRIDE / 2 - 0.5)


def mass_radius(grad: np.ndarray, centre: tuple[float, float], share: float) -> float:
    """The radius (pixels) of the disc round `centre` that holds `share` of the gradient's total."""
    rows, cols = np.indices(grad.shape)
    r = np.hypot(rows - centre[0], cols - centre[1]).ravel()
    order = np.argsort(r)
    cum = np.cumsum(grad.ravel()[order])
    return float(r[order][np.searchsorted(cum, share * cum[-1])])


def erf_row(encoder: nn.Module, image: np.ndarray, mean: tuple, std: tuple) -> list[tuple[str, np.ndarray, tuple]]:
    """(title, gradient map, output pixel) for each head of `blocks` on `encoder` (its stride-8 map)."""
    x = normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], mean, std)  # (1, 3, H, W)
    encoder = encoder.eval()
    row = []
    for name, head in blocks(encoder.out_channels[2], 11):
        grad, centre = effective_rf(lambda t, head=head: head(encoder(t)[2]), x)  # encoder(t)[2]: (1, C, H/8, W/8)
        r50, r90 = mass_radius(grad, centre, 0.5), mass_radius(grad, centre, 0.9)
        row.append((f"{name}\nr50 {r50:.0f} px, r90 {r90:.0f} px", grad, centre))
    return row


def draw_atrous(rows: list[tuple[str, list]], image_name: str, size: tuple[int, int], path: Path) -> Drawn:
    """Figure 2 from `erf_row` results, one row per encoder: (row label, erf_row output)."""
    from matplotlib.colors import LogNorm

    plt = pyplot()
    cmap = plt.get_cmap("magma").with_extremes(bad="white")  # exactly 0 (outside the receptive field): white
    h, w = size
    cols = len(rows[0][1])
    size_in = (2.55 * cols + 0.8, len(rows) * 2.55 * h / w + 1.0)
    fig, axes = plt.subplots(len(rows), cols, figsize=size_in, squeeze=False)
    for (label, row), ax_row in zip(rows, axes, strict=True):
        for ax, (title, grad, centre) in zip(ax_row, row, strict=True):
            artist = show(ax, grad / grad.max(), title, cmap=cmap, norm=LogNorm(1e-3, 1.0))
            ax.plot(centre[1], centre[0], marker="+", color="cyan", ms=8, mew=1.5)
        ax_row[0].set_ylabel(label, fontsize=9)
    fig.colorbar(artist, ax=axes.ravel().tolist(), fraction=0.012, pad=0.01, label="|gradient| / its maximum (log)")
    fig.suptitle(
        f"Effective receptive field of the output pixel at + (input {h}x{w}, encoder output stride {STRIDE})",
        fontsize=11,
    )
    save_png(fig, path)
    caption = (
        f"The gradient of one output pixel (the centre of the stride-{STRIDE} map, marked +; summed over its "
        f"channels) with respect to the {h}x{w} input, CamVid val `{image_name}`, on a log scale: the effective "
        "receptive field; white: exactly zero (outside the receptive field), black: below 1/1000 of the maximum. "
        "r50 / r90: radius of the disc round + holding 50% / 90% of the gradient. The input goes "
        f"through SegNet-Basic's encoder up to its third pooling (stride {STRIDE}: three 7x7 conv + BN + ReLU + 2x2 "
        "max-pool stages) and then through each head built from `pixelwise.layers`: three 3x3 convs at one "
        "atrous rate (`atrous_conv3x3`, with ReLU), DeepLab v2's ASPP (`ASPPv2`, the single-conv branches of "
        f"its ResNet head, rates {ASPP_V2_RATES}) and DeepLab v3's ASPP (`ASPP`, rates `aspp_rates(8)`, with the "
        "1x1 and image-pooling branches, whose gradient reaches every pixel). **Trained encoder** means the "
        "encoder of the built-in `segnet_basic_camvid` (SegNet-Basic trained from scratch on CamVid here: no "
        "ImageNet weights are available offline); **untrained** means the same encoder at PyTorch's default "
        "initialisation (seed 0). The heads themselves are untrained (seed 0) in both rows: pixelwise ships no "
        "trained atrous head, so the rows differ by the encoder only."
    )
    return Drawn("Atrous convolution: effective receptive fields", path.name, caption)
