"""Encoders with one contract.

``encoder(x)`` returns a `Features`: a list of feature maps, high to low resolution, that also carries
the indices and input sizes of the encoder's max-pools where it keeps them (SegNet's unpooling reads
them). Every encoder exposes ``out_channels`` and ``strides``, one entry per map. ``TimmEncoder`` wraps any timm
model (``features_only``) in the same contract; timm itself is imported only when one is built.
"""

from pixelwise.encoders.features import Features  # noqa: F401
from pixelwise.encoders.resnet import ResNetEncoder  # noqa: F401
from pixelwise.encoders.timm_encoder import TimmEncoder  # noqa: F401
from pixelwise.encoders.vgg import VGGEncoder, load_by_key, load_state_dict_file, vgg16_classifier  # noqa: F401
