"""The `pixelwise models` table: every model in MODELS with parameters and GFLOPs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Parameter counts the papers report, in millions, with the class count they were reported for.
PAPER_PARAMS_M = {
    "fcn8s": (134.0, 21),  # Long et al. 2015, Table 1 (FCN-VGG16, PASCAL VOC)
    "segnet": (29.4, 11),  # Badrinarayanan et al. 2017, Table 6 (CamVid)
    "segnet_basic": (1.425, 11),  # Badrinarayanan et al. 2017, Table 1
    "fcn_basic": (0.65, 11),  # Badrinarayanan et al. 2017, Table 1
    "unet": (31.0, 2),  # the usual count for the 572x572 U-Net; Ronneberger et al. 2015 give none
    "deeplab_v1": (20.5, 21),  # Chen et al. 2015, DeepLab-LargeFOV, Table 2
}


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def flops_of(fn: Callable[[], object]) -> float:
    """FLOPs of everything ``fn`` runs, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    A multiply-accumulate counts as 2 FLOPs. Only ops with a registered formula count (convs,
    matmuls, attention); elementwise ops, norms and pooling are not counted, as in the usual MFU
    definitions. A backward pass run inside ``fn`` is counted too.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def count_flops(name: str, num_classes: int, size: int) -> float:
    """FLOPs of one eval forward pass on a (1, 3, size, size) input, counted by torch's FlopCounterMode.

    Counted on the meta device (no memory, no time) where every op has a meta kernel, else on the CPU.
    Multiply-accumulate counts as 2 FLOPs, as torch.utils.flop_counter does.
    """
    from pixelwise.models import MODELS

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = MODELS[name](num_classes=num_classes).eval()
                x = torch.zeros(1, 3, size, size)
            with torch.no_grad():
                return flops_of(lambda: model(x))  # noqa: B023 (called at once)
        except (NotImplementedError, RuntimeError):
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def model_table(*, num_classes: int = 21, size: int = 512, flops: bool = True) -> str:
    """A plain-text table: model, parameters (ours and the paper's) and GFLOPs at size x size."""
    from pixelwise.models import MODELS

    header = f"{'model':<26}{'params (M)':>12}{'paper (M @ classes)':>21}{f'GFLOPs@{size}':>14}"
    lines = [header, "-" * len(header)]
    for name in MODELS:
        with torch.device("meta"):
            n = count_params(MODELS[name](num_classes=num_classes))
        paper = PAPER_PARAMS_M.get(name)
        paper_text = f"{paper[0]} @ {paper[1]}" if paper else "-"
        g = f"{count_flops(name, num_classes, size) / 1e9:.1f}" if flops else "-"
        lines.append(f"{name:<26}{n / 1e6:>12.2f}{paper_text:>21}{g:>14}")
    lines.append(f"({num_classes} classes; FLOPs = 2 x multiply-accumulates, one {size}x{size} image, eval mode)")
    return "\n".join(lines)
