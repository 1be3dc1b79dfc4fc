"""pixelwise: semantic segmentation in PyTorch, faithful to the papers."""

__version__ = "0.1.0"
