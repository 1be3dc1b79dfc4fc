"""pixelwise: semantic segmentation in PyTorch, faithful to the papers."""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it from here
