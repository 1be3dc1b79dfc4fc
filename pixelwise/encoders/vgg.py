"""VGG-16 encoders (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015) for FCN, SegNet and DeepLab v1.

The layers are torchvision's own (``torchvision.models.vgg.make_layers`` with config "D"), kept under
torchvision's key names ``features.N``, so a torchvision ImageNet file (``vgg16-397923af.pth``,
``vgg16_bn-6c64b313.pth``) loads by key from a local path. The per-paper changes are made on those
layers in place and never add parameters:

* FCN (Long et al., CVPR 2015), Caffe geometry: ``conv1_padding=100`` and ``ceil_mode=True``.
* SegNet (Badrinarayanan et al., TPAMI 2017): ``batch_norm=True``, ``return_indices=True``,
  ``ceil_mode=True`` (Caffe pooling rounds up: 45 -> 23 -> 45 on CamVid).
* DeepLab-LargeFOV (Chen et al., ICLR 2015; ``DeepLab-LargeFOV/train.prototxt``): every pool is
  3x3 with padding 1 (``pool_kernel=3``); pool1-3 keep stride 2, pool4/pool5 get stride 1 and the
  conv5 layers dilation 2 (``output_stride=8``); Caffe rounds up (``ceil_mode=True``), so a 321-pixel
  input gives 161, 81, 41, 41, 41.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.models.vgg import cfgs, make_layers

from pixelwise.encoders.features import Features
from pixelwise.errors import UserError

_VGG16_CFG = cfgs["D"]  # [64, 64, "M", 128, 128, "M", 256 x3, "M", 512 x3, "M", 512 x3, "M"]
_FC_SPATIAL = 7  # torchvision's VGG classifier flattens a 512 x 7 x 7 map


def _check_width_div(width_div: int) -> int:
    if not isinstance(width_div, int) or isinstance(width_div, bool) or width_div < 1 or 64 % width_div:
        raise UserError(f"width_div={width_div!r} is not supported; use a divisor of 64 (1, 2, 4, 8, 16, 32, 64)")
    return width_div


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: no such weights file; pass the local path of a torchvision ImageNet file "
            f"(e.g. vgg16-397923af.pth), pixelwise never downloads weights"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's to fix
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"{path}: cannot read it as a state dict ({type(e).__name__}: {first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"{path}: not a state dict (a mapping of names to tensors); save one with torch.save(model.state_dict())"
        )
    return state


def load_by_key(
    module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *, path: str | os.PathLike, hint: str
) -> None:
    """Copy ``state[prefix + key]`` into every entry of ``module.state_dict()``; raise a UserError naming
    the missing, unexpected or mis-shaped keys. Keys of ``state`` outside ``prefix`` are ignored.

    BatchNorm's ``num_batches_tracked`` may be absent (torchvision's older files lack it).
    """
    own = module.state_dict()
    given = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in given and given[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(prefix + k for k in missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(
            f"unexpected {', '.join(prefix + k for k in unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
        )
    if shapes:
        problems.append(f"shape mismatch {prefix}{shapes[0]}{' ...' if len(shapes) > 1 else ''}")
    if problems:
        raise UserError(f"{path}: does not fit this network ({'; '.join(problems)}); {hint}")
    module.load_state_dict(given, strict=False)


class VGGEncoder(nn.Module):
    """VGG-16 / VGG-16-BN as an encoder returning the five pooled stage outputs.

    Args:
        batch_norm: VGG-16-BN (BatchNorm after every conv; SegNet) instead of VGG-16.
        return_indices: keep the max-pooling indices in the output's ``indices`` (SegNet).
        output_stride: 32, or 8 for DeepLab: pool4/pool5 become 3x3 stride 1 padding 1 and the
            conv5 layers get dilation 2 (padding 2), so pool3..pool5 all have stride 8.
        pool_kernel: 2 (VGG's 2x2 stride-2 pools) or 3 (DeepLab's 3x3 padding-1 pools, stride kept).
        ceil_mode: round pooled sizes up, as Caffe does (FCN, SegNet and DeepLab were Caffe nets).
        conv1_padding: padding of conv1_1; 100 is the original FCN's (Caffe ``pad: 100``).
        width_div: divide every width by this (tiny test networks); 1 for the real VGG-16.
        weights: local torchvision ImageNet ``.pth`` whose ``features.*`` keys load into this
            encoder (other keys, e.g. ``classifier.*``, are ignored). Never downloaded.

    Attributes:
        out_channels: channels of pool1..pool5, ``[64, 128, 256, 512, 512]`` (divided by ``width_div``).
        strides: nominal strides of pool1..pool5, ``[2, 4, 8, 16, 32]`` or ``[2, 4, 8, 8, 8]``.

    Shape:
        (B, 3, H, W) -> ``Features`` [(B, C_i, H/s_i, W/s_i) for i in 1..5], high to low resolution.
        ``sizes[i]`` is the (H, W) stage i had before pooling (``max_unpool2d``'s ``output_size``, needed
        for odd sizes); ``indices[i]``, with ``return_indices``, has the shape of the i-th map (else None).
    """

    def __init__(
        self,
        *,
        batch_norm: bool = False,
        return_indices: bool = False,
        output_stride: int = 32,
        pool_kernel: int = 2,
        ceil_mode: bool = False,
        conv1_padding: int = 1,
        width_div: int = 1,
        weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 32):
            raise UserError(f"VGG output_stride={output_stride!r} is not supported; choose 32 or 8 (DeepLab-LargeFOV)")
        if pool_kernel not in (2, 3):
            raise UserError(f"VGG pool_kernel={pool_kernel!r} is not supported; choose 2 (VGG) or 3 (DeepLab)")
        width_div = _check_width_div(width_div)
        cfg = [v if v == "M" else v // width_div for v in _VGG16_CFG]
        self.features = make_layers(cfg, batch_norm=batch_norm)
        self.return_indices = return_indices
        self.batch_norm = batch_norm
        self._pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        for stage, i in enumerate(self._pools):
            stride = 1 if output_stride == 8 and stage >= 3 else 2
            kernel, padding = (3, 1) if pool_kernel == 3 or stride == 1 else (2, 0)
            self.features[i] = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode, return_indices=return_indices)
        if output_stride == 8:
            # conv5_x sit after pool4, whose stride is now 1: dilation 2 keeps their field of view.
            for m in self.features[self._pools[3] + 1 : self._pools[4]]:
                if isinstance(m, nn.Conv2d):
                    m.dilation, m.padding = (2, 2), (2, 2)
        conv1 = self.features[0]
        conv1.padding = (conv1_padding, conv1_padding)
        self.out_channels = [v // width_div for v in (64, 128, 256, 512, 512)]
        self.strides = [2, 4, 8, 16, 32] if output_stride == 32 else [2, 4, 8, 8, 8]
        if weights is not None:
            name = "vgg16_bn-6c64b313.pth" if batch_norm else "vgg16-397923af.pth"
            load_by_key(
                self.features,
                load_state_dict_file(weights),
                "features.",
                path=weights,
                hint=f"pass torchvision's {name} (batch_norm={batch_norm}, width_div must be 1)",
            )

    def forward(self, x: torch.Tensor) -> Features:
        maps: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        sizes: list[tuple[int, int]] = []
        for i, layer in enumerate(self.features):
            if i in self._pools:
                sizes.append((x.shape[-2], x.shape[-1]))
                if self.return_indices:
                    x, idx = layer(x)  # (B, C, ~H/2, ~W/2) and its argmax positions
                    indices.append(idx)
                else:
                    x = layer(x)
                maps.append(x)
            else:
                x = layer(x)
        return Features(maps, indices=indices if self.return_indices else None, sizes=sizes)


def vgg16_classifier(
    *,
    width_div: int = 1,
    fc_channels: int = 4096,
    dropout: float = 0.5,
    weights: str | os.PathLike | None = None,
) -> nn.Sequential:
    """VGG-16's fc6/fc7 as torchvision builds them (``classifier.0`` and ``classifier.3``), without fc8.

    ``Linear(512*7*7, 4096) -> ReLU -> Dropout -> Linear(4096, 4096) -> ReLU -> Dropout``; FCN turns it
    into a 7x7 and a 1x1 convolution with ``pixelwise.layers.convolutionalize``. With ``weights``
    the ``classifier.0.*`` and ``classifier.3.*`` tensors of a torchvision VGG-16 file are loaded.

    Shape:
        (B, 512*7*7) -> (B, 4096) (widths divided by ``width_div``).
    """
    width_div = _check_width_div(width_div)
    c5, fc = 512 // width_div, fc_channels // width_div
    if fc < 1:
        raise UserError(
            f"fc_channels={fc_channels} // width_div={width_div} leaves no channels; use a larger fc_channels"
        )
    classifier = nn.Sequential(
        nn.Linear(c5 * _FC_SPATIAL * _FC_SPATIAL, fc),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(fc, fc),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
    )
    if weights is not None:
        load_by_key(
            classifier,
            {
                k: v
                for k, v in load_state_dict_file(weights).items()
                if k.startswith(("classifier.0.", "classifier.3."))
            },
            "classifier.",
            path=weights,
            hint="pass torchvision's vgg16-397923af.pth (with its classifier; fc_channels=4096, width_div=1)",
        )
    return classifier
