"""Trains a UNet or FC-DenseNet on LMDB databases built by build_lmdb.py, with MirroredStrategy.

    python train_unet.py --train_database lmdb/train-hes.lmdb --test_database lmdb/test-hes.lmdb \\
        --output_dir runs/hes --batch_size 8 --number_classes 2 --learning_rate 1e-4 \\
        --test_every_n_steps 1000 --early_stopping 10 --reader_count 1 --use_augmentation 1

NIST's flags keep their meaning (batch size and reader count are per replica and scale with the
number of GPUs). Every test interval evaluates the whole test database once; training stops when the
monitored value has not improved by 1e-4 for --early_stopping intervals, or at --max_steps. The best
model is exported as model.keras and saved_model/ with config.json (everything inference needs).

SIGTERM or SIGUSR1 (SLURM's warning before a time limit) finishes the current step, writes a full
checkpoint and exits with code 75; the same command (or --resume 1) continues from it. NaN loss
stops the run with code 3, keeping the last good checkpoint. Bad settings or data exit with code 2.

The trainer is ``enki_seg.training.unet``; this script only wires the command line to it.
"""
from __future__ import annotations

import argparse
import logging
import sys

from enki_seg import cli, exit_codes
from enki_seg.training.errors import TrainError
from enki_seg.training.loop import run_main
from enki_seg.training.unet import UNetTrainer, add_arguments, build_config

logger = logging.getLogger("train_unet")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_unet", description="Train a UNet/FC-DenseNet segmentation model.",
                                argument_default=argparse.SUPPRESS)
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.quiet_tensorflow(args.verbose)  # before TensorFlow is first imported (in run_main)
    cli.setup_logging(args.verbose)
    try:
        config = build_config(args)
    except TrainError as exc:
        logger.error("%s", exc)
        return exit_codes.BAD_INPUT
    return run_main(UNetTrainer, config, bool(args.resume), "train_unet")


if __name__ == "__main__":
    sys.exit(main())
