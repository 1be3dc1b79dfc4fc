"""A faster inference wrapper for any pixelwise (or other) segmentation model.

Four independent switches, each a few lines, none changing what the model computes beyond
floating-point rounding:

- ``channels_last``: weights and inputs in NHWC memory order, the layout oneDNN (CPU) and cuDNN
  (tensor cores) prefer for convolutions, so no layout reorder is paid per conv.
- ``torch.inference_mode``: no autograd bookkeeping (no version counters, no saved tensors).
- ``compile``: ``torch.compile`` (inductor) fuses the elementwise tail of every conv; it needs a
  C++ compiler on CPU and costs seconds to minutes on the first call.
- ``amp``: bf16 autocast, on CUDA only; on a CPU the wrapper stays fp32 (its outputs match eager
  mode). For bf16 on a CPU that runs it natively, decide with ``pixelwise.precision``
  (``resolve_precision("auto", device)``, what ``--precision auto`` does): an emulating CPU runs
  bf16 many times slower than fp32.

Usage::

    model = prepare_fast(get_model("deeplabv3_resnet50", num_classes=21))
    logits = model(images)  # (B, K, H, W) float32, computed without autograd
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pixelwise.errors import UserError


class FastInference(nn.Module):
    """Eval-only wrapper: NHWC input, ``torch.inference_mode``, optional bf16 autocast on CUDA.

    Args:
        model: the segmentation model, already in eval mode and converted to ``channels_last``
            when ``channels_last`` is set (``prepare_fast`` does both).
        channels_last: convert each input to NHWC memory order.
        amp: bf16 autocast when the input is on a CUDA device; ignored on CPU.

    Shape:
        (B, C, H, W) -> the wrapped model's output, (B, K, H, W) float32 for pixelwise models.
    """

    def __init__(self, model: nn.Module, channels_last: bool = True, amp: bool = True) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.amp = amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W), NHWC strides
        use_amp = self.amp and x.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            y = self.model(x)
        if isinstance(y, torch.Tensor) and y.is_floating_point() and y.dtype != torch.float32:
            y = y.float()  # logits leave in fp32 whatever ran inside
        return y

    def train(self, mode: bool = True) -> FastInference:
        if mode:
            raise UserError("FastInference is for inference only; train the unwrapped model (fast.model)")
        return super().train(False)


def prepare_fast(
    model: nn.Module,
    *,
    channels_last: bool = True,
    compile: bool = False,
    amp: bool = True,
) -> FastInference:
    """Wrap ``model`` for fast inference: eval mode, channels_last, inference_mode, optional compile and bf16.

    The model's parameters are converted in place (``model.to(memory_format=torch.channels_last)``);
    the wrapper shares them, so keep using the returned module for inference.

    Args:
        model: any module taking (B, C, H, W) images.
        channels_last: NHWC weights and inputs (faster convolutions on oneDNN and cuDNN).
        compile: ``torch.compile`` the model (inductor; needs a C++ compiler on CPU, slow first call).
        amp: bf16 autocast when the input is on CUDA; on a CPU the model always runs in fp32.

    Returns:
        a ``FastInference`` module in eval mode.
    """
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        if not hasattr(torch, "compile"):
            raise UserError(
                f"prepare_fast(compile=True) needs torch >= 2.0, found {torch.__version__}; pass compile=False"
            )
        model = torch.compile(model)
    return FastInference(model, channels_last=channels_last, amp=amp).eval()
