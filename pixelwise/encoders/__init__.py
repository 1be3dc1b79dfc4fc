"""Backbones with one contract: forward returns features high -> low resolution; `out_channels`, `strides`."""

from pixelwise.encoders.resnet import ResNetEncoder  # noqa: F401
from pixelwise.encoders.vgg import VGGEncoder, load_by_key, load_state_dict_file, vgg16_classifier  # noqa: F401
