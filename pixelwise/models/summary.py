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
        try:
            with torch.device("meta"):
                n = count_params(MODELS[name](num_classes=num_classes))
        except ModuleNotFoundError as e:  # a *_timm model without timm: the rest of the table still helps
            lines.append(f"{name:<26}  needs the package {e.name!r}: pip install 'pixelwise[timm]'")
            continue
        paper = PAPER_PARAMS_M.get(name)
        paper_text = f"{paper[0]} @ {paper[1]}" if paper else "-"
        g = f"{count_flops(name, num_classes, size) / 1e9:.1f}" if flops else "-"
        lines.append(f"{name:<26}{n / 1e6:>12.2f}{paper_text:>21}{g:>14}")
    lines.append(f"({num_classes} classes; FLOPs = 2 x multiply-accumulates, one {size}x{size} image, eval mode)")
    return "\n".join(lines)


# timm encoders the test suite trains, exports and round-trips (tests/test_timm_encoders.py), and the usual
# larger members of the same families; `pixelwise models --encoders PATTERN` checks any others.
CHECKED_TIMM = ("resnet18", "resnet50", "convnext_atto", "convnext_tiny", "efficientnet_b0", "efficientnet_b3")
MAX_TIMM_ROWS = 40  # a pattern matching hundreds of models would take minutes to check


def encoder_table(pattern: str | None = None) -> str:
    """The encoders: pixelwise's own, and timm models with the strides and output strides they build with
    (checked on the meta device: no memory, no download)."""
    lines = [
        "built-in encoders (torchvision layouts, ImageNet .pth files load by key):",
        "  vgg16, vgg16_bn     fcn32s/16s/8s, segnet, deeplab_v1",
        "  resnet50, resnet101 fcn_resnet*, deeplab_v2, deeplabv3_resnet*, deeplabv3plus_resnet*",
        "",
        'timm encoders: encoder="NAME" of unet_timm, fcn_timm, deeplabv3_timm, deeplabv3plus_timm',
    ]
    try:
        from pixelwise.encoders.timm_encoder import import_timm

        timm = import_timm()
    except ModuleNotFoundError:
        return "\n".join([*lines, "  (timm is not installed: pip install 'pixelwise[timm]')"])
    names = timm.list_models(pattern) if pattern else list(CHECKED_TIMM)
    if not names:
        return "\n".join([*lines, f"  no timm model matches {pattern!r}; see timm.list_models()"])
    lines.append(f"  {'name':<28}{'channels':<28}{'strides':<20}output strides")
    for name in names[:MAX_TIMM_ROWS]:
        lines.append("  " + _timm_row(timm, name))
    if len(names) > MAX_TIMM_ROWS:
        lines.append(f"  ... and {len(names) - MAX_TIMM_ROWS} more matching {pattern!r}; narrow the pattern")
    if not pattern:
        lines.append(
            "  any other timm model that builds with features_only works too: --encoders 'convnext*' checks them"
        )
    return "\n".join(lines)


def _timm_row(timm, name: str) -> str:
    """One timm model's channels and strides at output stride 32, and the output strides it builds with."""
    works = {}
    for output_stride in (32, 16, 8):
        try:
            with torch.device("meta"):
                kwargs = {"output_stride": output_stride} if output_stride != 32 else {}
                works[output_stride] = timm.create_model(name, features_only=True, **kwargs).feature_info
        except Exception as e:  # timm raises many types for a model without features_only or atrous support
            if output_stride == 32:
                return f"{name:<28}does not build with features_only ({type(e).__name__})"
    info = works[32]
    channels, strides = ",".join(map(str, info.channels())), ",".join(map(str, info.reduction()))
    return f"{name:<28}{channels:<28}{strides:<20}{', '.join(map(str, works))}"
