"""Segments a folder of images of any size with a trained run (UNet/FC-DenseNet or Mask R-CNN).

    python inference.py --model runs/hes --image_folder imgs --output_folder preds \\
        --image_format tif --mask_folder masks --save_overlay 1

The work is done by ``enki_seg.inference``; see the README's Inference section for the outputs.
"""
from __future__ import annotations

import sys

from enki_seg.inference.semantic import main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
