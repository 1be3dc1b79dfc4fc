"""`pixelwise gallery`: the lineage's mechanisms drawn by pixelwise's own code, on real images and the
built-in models, as PNG figures plus a `gallery.md` that shows them with their captions.

1. upsampling.png: one CamVid crop and one feature map upsampled x4 by each of the six `UPSAMPLE_KINDS`.
2. atrous.png: effective receptive fields of atrous conv stacks and ASPP v2 / v3, untrained / trained encoder.
3. decoders.png: SegNet-Basic's max-unpooling decoder against its bilinear variant (needs those weights).
4. crf.png: the dense CRF before / after on the built-in model's scores.
5. overlap_tile.png: U-Net's overlap-tile strategy on an ISBI 2012 slice (the prediction needs U-Net weights).
6. training.png: the built-in model's training run next to the SegNet paper's row.

A figure that cannot be drawn (no weights for it, no data) is left out and gallery.md says what it needs.
One module per figure; `build` runs them and writes gallery.md.
"""

from pixelwise.gallery.build import gallery_command, write_gallery

__all__ = ["gallery_command", "write_gallery"]
