"""Trains a Mask R-CNN (instance segmentation) on LMDB databases with instance labels, with MirroredStrategy.

    python train_maskrcnn.py --train_database lmdb/train-cells.lmdb --test_database lmdb/test-cells.lmdb \\
        --output_dir runs/cells --number_classes 2 --batch_size 4 --learning_rate 1e-3 \\
        --test_every_n_steps 500 --early_stopping 10 --preset small

The databases come from ``build_lmdb.py --instance_folder ...`` or ``--coco_json ...``;
``--number_classes`` counts background (TAO's convention: object classes 1..K, so K + 1). The same
reader, augmentation, flags, checkpoints, resume, SIGTERM/SIGUSR1 handling (exit 75), NaN exit (3),
TensorBoard and exports as ``train_unet.py`` (both are ``loop.Trainer``s). Each test interval runs
the model over the whole test database and scores it with pycocotools: box and mask AP, AP50, AP75.
Early stopping watches ``--monitor`` (mask_ap by default; box_ap, mask_ap50 or loss).

Model settings: ``--preset small`` (GroupNorm backbone, FPN P2-P4 at 64 channels: CPU runs, small
tiles) or ``resnet50`` / ``resnet101`` (TAO-like, FPN P2-P6 at 256 channels); any field of
``models.maskrcnn.MaskRCNNConfig`` can be set with ``--maskrcnn KEY=VALUE`` (repeatable) or the
``maskrcnn:`` mapping of a ``--config`` file, e.g. ``--maskrcnn rpn_batch_size_per_im=128``.

The trainer is ``enki_seg.training.maskrcnn``; this script only wires the command line to it.
"""
from __future__ import annotations

import argparse
import logging
import sys

from enki_seg import cli, exit_codes
from enki_seg.training.errors import TrainError
from enki_seg.training.loop import run_main
from enki_seg.training.maskrcnn import MaskRCNNTrainer, add_arguments, build_config

logger = logging.getLogger("train_maskrcnn")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_maskrcnn", description="Train a Mask R-CNN instance segmentation model.",
                                argument_default=argparse.SUPPRESS)
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # also keeps Grappler's cost model quiet: it logs a screenful per CropAndResize with a dynamic ROI
    # count on every trace (--verbose 1 shows it)
    cli.quiet_tensorflow(args.verbose)
    cli.setup_logging(args.verbose)
    try:
        config = build_config(args)
    except TrainError as exc:
        logger.error("%s", exc)
        return exit_codes.BAD_INPUT
    return run_main(MaskRCNNTrainer, config, bool(args.resume), "train_maskrcnn")


if __name__ == "__main__":
    sys.exit(main())
