"""Shards a folder of images + masks (or COCO annotations) into train/test LMDB databases.

    python build_lmdb.py --image_folder data/images --mask_folder data/masks \\
        --output_folder data/lmdb --dataset_name hes --train_fraction 0.8 --image_format tif \\
        --use_tiling 1 --tile_size 256 --seed 0

Writes ``train-<name>.lmdb`` and ``test-<name>.lmdb`` (records in the format of
``enki_seg/data/records.py``) and ``manifest-<name>.csv`` (which source file and tile went to which
database). The split is made by source image before tiling, from ``--seed``, so no image contributes
to both databases. Outputs are built in a hidden temporary folder inside ``--output_folder`` and
renamed into place only when complete: a killed build never leaves a database that looks finished,
and a rerun starts clean. The work is done by ``enki_seg.data.build``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from enki_seg import exit_codes
from enki_seg.cli import setup_logging
from enki_seg.data import records
from enki_seg.data.build import BuildConfig, Interrupted, build, default_workers, format_summary
from enki_seg.data.image_io import InputError
from enki_seg.files import WriteError

logger = logging.getLogger("build_lmdb")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="build_lmdb",
        description="Convert folders of images and masks (or COCO annotations) into a pair of LMDB "
        "databases for training.",
    )
    p.add_argument("--image_folder", required=True, help="folder containing the images")
    p.add_argument("--mask_folder", help="folder containing the semantic masks (integer class ids, "
                   "matched to images by file stem: a.tif pairs with a.png)")
    p.add_argument("--instance_folder", help="optional folder of instance-label images (each object "
                   "its own integer id, matched by stem); an object's class is the majority class of "
                   "the semantic mask under it, or 1 when --mask_folder is not given")
    p.add_argument("--coco_json", help="COCO instances JSON instead of mask folders (polygons or RLE; "
                   "categories remapped to contiguous ids starting at 1)")
    p.add_argument("--output_folder", required=True, help="folder where the databases are written")
    p.add_argument("--dataset_name", default=BuildConfig.dataset_name,
                   help="name used in train-<name>.lmdb etc.")
    p.add_argument("--train_fraction", type=float, default=BuildConfig.train_fraction,
                   help="fraction of source images for training, in (0, 1) (default %(default)s)")
    p.add_argument("--image_format", default=BuildConfig.image_format,
                   help="extension of the input images {tif, png, jpg}")
    p.add_argument("--use_tiling", type=int, choices=(0, 1), default=BuildConfig.use_tiling,
                   help="cut source images into tiles [0 = False, 1 = True]")
    p.add_argument("--tile_size", type=int, default=BuildConfig.tile_size,
                   help="tile side in pixels (default %(default)s)")
    p.add_argument("--tile_overlap", type=int, default=BuildConfig.tile_overlap,
                   help="pixels shared by neighbouring tiles")
    p.add_argument("--size_multiple", type=int, default=BuildConfig.size_multiple,
                   help="tile size must be a multiple of this (the model's downsampling factor)")
    p.add_argument("--number_classes", type=int, default=BuildConfig.number_classes,
                   help="if given, every mask label must be < this number")
    p.add_argument("--label_map", default=BuildConfig.label_map,
                   help="map mask values to class ids before anything else, VALUE=CLASS[,...]; e.g. "
                   "255=1 for masks exported as 0/255 (values not listed are kept)")
    p.add_argument("--seed", type=int, default=BuildConfig.seed,
                   help="seed of the train/test split (default %(default)s)")
    p.add_argument("--compression", default=BuildConfig.compression, choices=sorted(records.CODECS),
                   help="per-record compression (default %(default)s)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that read and encode source images (default: CPUs, at most 8)")
    p.add_argument("--skip_bad", type=int, choices=(0, 1), default=BuildConfig.skip_bad,
                   help="skip bad image/mask pairs with a warning instead of stopping")
    p.add_argument("--overwrite", type=int, choices=(0, 1), default=BuildConfig.overwrite,
                   help="replace existing databases of the same name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    setup_logging()
    config = BuildConfig(**vars(parse_args(argv)))
    try:
        summary = build(config)
    except InputError as exc:
        logger.error("%s", exc)
        return exit_codes.BAD_INPUT
    except WriteError as exc:  # a full disk: nothing was left behind
        logger.error("%s", exc)
        return exit_codes.FAILED
    except (Interrupted, KeyboardInterrupt) as exc:
        logger.error("build interrupted (%s); nothing was written", exc or "Ctrl-C")
        return 130  # 128 + SIGINT, the shell's code for an interrupted command
    print(format_summary(summary))  # the command's result goes to stdout; diagnostics are logged
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
