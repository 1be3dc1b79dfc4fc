"""Convolutionalization: turning a classifier's fully connected layers into convolutions.

Long et al., "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015, Sec. 3.1: a fully
connected layer is a convolution whose kernel covers its whole input region, so the classifier of
e.g. VGG-16 becomes fc6 = 7x7 conv, fc7 = 1x1 conv, fc8 = 1x1 conv; on a larger input the network
then produces a coarse map of class scores instead of one vector.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_KEPT = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)


def convolutionalize(classifier: nn.Module, in_channels: int, spatial: int) -> nn.Sequential:
    """Return a convolutional copy of ``classifier`` that computes the same function at every position.

    The first ``nn.Linear`` (``in_features == in_channels * spatial**2``) becomes a
    ``spatial x spatial`` conv (its weight reshaped (out, C*s*s) -> (out, C, s, s), the C-H-W order
    of ``torch.flatten(x, 1)``); later ``nn.Linear`` layers become 1x1 convs. Element-wise layers
    (ReLU and friends, ``nn.Dropout``, ``nn.Identity``) are kept, ``nn.Flatten`` is dropped. The
    weights are copied, so the original classifier is untouched.

    Args:
        classifier: an ``nn.Sequential`` (or a single ``nn.Linear``), e.g. torchvision VGG-16's
            ``classifier`` (25088 -> 4096 -> ReLU -> Dropout -> 4096 -> ReLU -> Dropout -> 1000).
        in_channels: channels of the feature map the classifier flattened (512 for VGG-16).
        spatial: side of the feature map the classifier flattened (7 for VGG-16 at 224x224).

    Returns:
        ``nn.Sequential`` of convs and the kept layers.

    Shape:
        (B, in_channels, H, W) -> (B, out_features, H - spatial + 1, W - spatial + 1); a
        (B, in_channels, spatial, spatial) input gives (B, out_features, 1, 1) equal to the
        classifier's output on the flattened input.
    """
    modules = list(classifier) if isinstance(classifier, nn.Sequential) else [classifier]
    layers: list[nn.Module] = []
    first = True
    for i, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            if first:
                expected = in_channels * spatial * spatial
                if module.in_features != expected:
                    raise ValueError(
                        f"convolutionalize: the first Linear layer has in_features={module.in_features}, but "
                        f"in_channels={in_channels} x spatial={spatial}^2 = {expected}; pass the shape of the "
                        f"feature map the classifier flattens"
                    )
                conv = nn.Conv2d(in_channels, module.out_features, spatial, bias=module.bias is not None)
                weight = module.weight.detach().reshape(module.out_features, in_channels, spatial, spatial)
                first = False
            else:
                conv = nn.Conv2d(module.in_features, module.out_features, 1, bias=module.bias is not None)
                weight = module.weight.detach()[:, :, None, None]  # (out, in, 1, 1)
            conv = conv.to(device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                conv.weight.copy_(weight)
                if module.bias is not None:
                    conv.bias.copy_(module.bias.detach())
            layers.append(conv)
        elif isinstance(module, nn.Flatten):
            continue
        elif isinstance(module, _KEPT):
            layers.append(module.__class__(**_init_kwargs(module)))
        else:
            raise ValueError(
                f"convolutionalize: layer {i} ({module.__class__.__name__}) has no convolutional equivalent here; "
                f"supported are Linear, Flatten, Dropout, Identity and element-wise activations"
            )
    if first:
        raise ValueError("convolutionalize: the classifier has no nn.Linear layer to convert")
    return nn.Sequential(*layers)


def _init_kwargs(module: nn.Module) -> dict:
    """The constructor arguments that define a kept element-wise layer."""
    if isinstance(module, nn.Dropout):
        return {"p": module.p, "inplace": module.inplace}
    if isinstance(module, nn.LeakyReLU):
        return {"negative_slope": module.negative_slope, "inplace": module.inplace}
    if isinstance(module, nn.GELU):
        return {"approximate": module.approximate}
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.SiLU)):
        return {"inplace": module.inplace}
    return {}
