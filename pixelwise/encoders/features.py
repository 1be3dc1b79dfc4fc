"""What every encoder's forward returns: `Features`, a list of maps with the record of its max-pools."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Features(list):
    """An encoder's feature maps, high to low resolution, and what its max-pools recorded.

    A plain list of tensors ``(B, out_channels[i], H/strides[i], W/strides[i])`` (sizes rounded as the
    encoder's pools round them), so ``feats[-1]`` is the deepest map for every encoder. Decoders that
    undo the pooling (SegNet's max-unpooling, FCN-Basic's size-exact upsampling) also read:

    Attributes:
        indices: the argmax positions of each max-pool, in the order the pools ran
            (``nn.MaxPool2d(return_indices=True)``; ``indices[i]`` has the shape of that pool's output),
            or None for an encoder that keeps none.
        sizes: the (H, W) each max-pool saw (``output_size`` for max-unpooling when a size was odd),
            or None for an encoder that does not record them.

    An encoder returns the same kind of `Features` on every call: whether it keeps indices is fixed
    when it is built.
    """

    def __init__(
        self,
        maps: Iterable[torch.Tensor] = (),
        *,
        indices: list[torch.Tensor] | None = None,
        sizes: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(maps)
        self.indices = indices
        self.sizes = sizes
