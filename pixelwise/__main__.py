"""`python -m pixelwise` (also what `torchrun -m pixelwise train ...` runs)."""

from pixelwise.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
