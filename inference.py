"""Segments a folder of images of any size with a trained run: semantic (UNet, FC-DenseNet) or instance (Mask R-CNN).

    python inference.py --model runs/hes --image_folder imgs --output_folder preds \\
        --image_format tif --mask_folder masks --save_overlay 1

``--model`` is a run folder of train_unet.py or train_maskrcnn.py (or the ``model.keras`` inside it);
the model, classes, channels, normalization and default tile size come from its ``config.json``,
and its model name picks the path:

* semantic runs (``enki_seg.inference.semantic``): for each input ``a.tif``, ``OUT/a.tif`` (label
  mask, smallest integer type: uint8 for < 256 classes, zlib-compressed TIFF, or ``--output_format
  png``), with ``--save_overlay 1`` ``OUT/overlays/a.png`` (image with the classes tinted), with
  ``--save_probabilities 1`` ``OUT/probabilities/a.tif`` (softmax, one page per class, (K, H, W);
  float16, or ``--probability_dtype float32`` / ``uint8`` (round(255 p)) for Fiji), and with ``--mask_folder`` (masks matched by file stem) ``OUT/metrics.json``,
  ``OUT/metrics.csv`` (per class precision/recall/F1/IoU/Dice and micro/macro/weighted averages
  over all pixels of all images) and ``OUT/metrics_per_image.csv``. ``--margin`` overrides the
  measured receptive field that decides how much of each tile is kept. Images read by region
  (whole slides, README "Whole slides") get these as tiled, compressed, pyramidal OME-TIFFs written
  band by band (``enki_seg.inference.pyramid``).
* boundary-target runs (``train_unet.py --instance_target boundary``; ``enki_seg.inference.watershed``):
  the semantic model's interior/boundary probabilities, stitched over tiles, then a seeded watershed
  gives instances; the outputs and metrics are those of maskrcnn runs below.
* maskrcnn runs (``enki_seg.inference.instance``): tiled detection merged across tiles, ``OUT/a.tif``
  instance labels, ``OUT/detections.json`` (COCO results), overlays of instance outlines, and with
  ``--mask_folder`` of instance labels (plus ``--class_folder`` of semantic masks when there are
  several object classes) COCO box/mask AP in ``OUT/metrics.json``; ``--score_threshold`` and
  ``--overlap`` tune it.

One slide across many processes (``enki_seg.inference.blocks``, ``launch/inference_array.sbatch``):
``--num_blocks N --block_index I`` segments block I (whole rows of tiles) of every image into
``OUT/.blocks/``; ``--assemble 1`` with the same flags checks that all N blocks are stored and writes the
outputs above, equal to a single-process run's; finished blocks are skipped when a task is resubmitted.

Files are written under a hidden temporary name and renamed when complete, so a killed run never
leaves a mask that looks finished; leftovers of killed runs are removed at the next start.

Exit codes (``enki_seg.exit_codes``): 0 every image done; 1 some images failed (each reported in one
line naming the file, the rest processed, a summary at the end); 2 nothing done: bad arguments, a
missing or incomplete run, an empty image folder, images whose channel count does not match the model's.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from enki_seg import cli, exit_codes
from enki_seg.data import image_io
from enki_seg.files import WriteError, remove_leftovers
from enki_seg.inference import blocks, core, instance, semantic, watershed
from enki_seg.inference.core import InferenceError

logger = logging.getLogger("inference")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inference", description="Segment a folder of images with a trained run.")
    p.add_argument("--model", required=True, help="run folder of train_unet.py or train_maskrcnn.py, or the model.keras inside it")
    p.add_argument("--image_folder", required=True, help="images to segment (not recursive)")
    p.add_argument("--output_folder", required=True, help="masks, overlays/, probabilities/, metrics go here")
    p.add_argument("--image_format", default="tif", help="tif (also .tiff), png or jpg (default tif)")
    p.add_argument("--mask_folder", help="ground-truth masks matched by file stem: writes metrics.json/.csv")
    p.add_argument("--tile_size", type=int, help="model input tile (default: the training tile/record size)")
    p.add_argument("--batch_size", type=int, default=4, help="tiles per model call (default 4)")
    p.add_argument("--margin", type=int,
                   help="pixels kept from tile edges (default: the measured receptive field, at most tile/4)")
    p.add_argument("--save_overlay", type=int, choices=(0, 1), default=0, help="OUT/overlays/NAME.png")
    p.add_argument("--save_probabilities", type=int, choices=(0, 1), default=0,
                   help="OUT/probabilities/NAME.tif: softmax, one page per class (dtype: --probability_dtype)")
    p.add_argument("--probability_dtype", choices=("float16", "float32", "uint8"), default="float16",
                   help="probabilities as float16 (default; Fiji cannot open it), float32, or uint8 = round(255 p)")
    p.add_argument("--output_format", choices=("tif", "png"), default="tif", help="label mask format (tif)")
    p.add_argument("--tta", choices=("none", "flips", "dihedral"), default="none",
                   help="test-time augmentation of UNet/FC-DenseNet runs: average the softmax over the 4 mirrorings "
                        "(flips) or the 8 symmetries (dihedral) of each tile: 4x/8x the model work (default none)")
    p.add_argument("--precision", choices=("run", "float32"), default="run",
                   help="run the model in the precision it was trained in (run, default) or in float32")
    p.add_argument("--verbose", type=int, choices=(0, 1), default=0,
                   help="1 keeps TensorFlow's start-up and INFO lines (default 0: hidden)")
    array = p.add_argument_group("one slide across many processes (a SLURM job array: launch/inference_array.sbatch)")
    array.add_argument("--num_blocks", type=int,
                       help="cut every image into N blocks of rows of tiles; with --block_index I segment block I only "
                            "(stored in OUTPUT/.blocks/), with --assemble 1 write the outputs from all N blocks")
    array.add_argument("--block_index", type=int, help="the block this process segments, 0..N-1")
    array.add_argument("--assemble", type=int, choices=(0, 1), default=0,
                       help="1: check that every block is stored and write the outputs (labels, probabilities, "
                            "overlays, metrics) exactly as one process would; give the blocks' flags (no model run)")
    instances = p.add_argument_group("maskrcnn runs")
    instances.add_argument("--score_threshold", type=float, help="ignore detections scoring below it (default 0.5)")
    instances.add_argument("--max_detections", type=int,
                           help="detections per tile (default: the run's per training tile, scaled by the tile's area; "
                                "proposals follow)")
    instances.add_argument("--overlap", type=int,
                           help="pixels shared by neighbouring tiles, at least the largest object (default: the run's "
                                "recorded largest training object, else tile/4)")
    instances.add_argument("--class_folder",
                           help="semantic masks matched by stem giving each --mask_folder instance its class "
                                "(needed with more than one object class)")
    args = p.parse_args(argv)
    if args.num_blocks is not None and args.num_blocks < 1:
        p.error(f"--num_blocks must be >= 1, got {args.num_blocks}")
    if args.assemble and args.block_index is not None:
        p.error("--assemble 1 writes the outputs of all blocks: drop --block_index")
    if args.block_index is not None:
        if args.num_blocks is None:
            p.error("--block_index needs --num_blocks N")
        if not 0 <= args.block_index < args.num_blocks:
            p.error(f"--block_index must be in 0..{args.num_blocks - 1} for --num_blocks {args.num_blocks}, "
                    f"got {args.block_index}")
    elif args.num_blocks is not None and not args.assemble:
        p.error(f"--num_blocks {args.num_blocks} needs --block_index I (0..{args.num_blocks - 1}) or --assemble 1")
    return args


def prepare(args: argparse.Namespace) -> core.Job:
    """Every check that needs no model: run folder, flags for its kind, folders, file list, channels, label format."""
    run = core.load_run_info(args.model)
    instances = run.model_name == instance.MODEL_NAME or bool(run.instance_target)
    if run.model_name == instance.MODEL_NAME:
        instance.check_arguments(run, args)
        if args.tta != "none":
            raise InferenceError(f"--tta is for UNet/FC-DenseNet runs; {run.folder} is a maskrcnn run — drop it")
    elif (args.score_threshold is not None or args.overlap is not None or args.class_folder
          or args.max_detections is not None):
        raise InferenceError(f"--score_threshold, --overlap, --max_detections and --class_folder are for maskrcnn runs; "
                             f"{run.folder} is a {run.model_name} run — drop them")
    elif run.instance_target and args.save_probabilities:
        raise InferenceError(f"{run.folder} is an instance run (a {run.model_name} trained on "
                             f"{run.instance_target} targets): it writes instance labels — drop --save_probabilities")
    image_folder, output = Path(args.image_folder), Path(args.output_folder)
    if image_folder.is_dir() and output.resolve() == image_folder.resolve():
        raise InferenceError(f"--output_folder {output} is the image folder; masks would overwrite the inputs — "
                             "choose another folder")
    try:
        files = core.list_inputs(image_folder, args.image_format, output)
        masks = image_io.index_by_stem(args.mask_folder, "mask") if args.mask_folder else None
        class_masks = image_io.index_by_stem(args.class_folder, "class mask") if args.class_folder else None
    except image_io.InputError as exc:
        raise InferenceError(str(exc)) from None
    core.check_channels(files, run.channels, f"the model in {run.folder}")
    if args.output_format == "png" and not instances and run.label_dtype.itemsize > 2:
        raise InferenceError(f"{run.num_classes} classes do not fit a PNG mask (16 bits at most); "
                             "use --output_format tif")
    try:
        output.mkdir(parents=True, exist_ok=True)
        for sub, wanted in (("overlays", args.save_overlay), ("probabilities", args.save_probabilities)):
            if wanted:
                (output / sub).mkdir(exist_ok=True)
    except OSError as exc:
        raise InferenceError(f"cannot create --output_folder {output}: {exc.strerror}") from None
    if not os.access(output, os.W_OK):
        raise InferenceError(f"--output_folder {output} is not writable")
    for folder in (output, output / "overlays", output / "probabilities"):
        if (count := remove_leftovers(folder)):
            logger.info("removed %d incomplete file(s) of an interrupted run from %s", count, folder)
    return core.Job(run=run, files=files, output=output, masks=masks, class_masks=class_masks)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.quiet_tensorflow(args.verbose)  # before anything imports TensorFlow (the model loads below)
    cli.setup_logging(args.verbose)
    try:
        job = prepare(args)
        run = job.run
        if args.precision == "float32":
            run.precision = "float32"
        logger.info("%d image(s) from %s; model %s (%s, %d classes, %d channel(s), %s normalization, %s)",
                    len(job.files), args.image_folder, run.model_path, run.model_name, run.num_classes,
                    run.channels, run.normalization.method, run.precision)
        made_with = blocks.settings(run, args)
        if args.assemble:
            return assemble(job, args, made_with)
        block = None if args.block_index is None else blocks.Blocks(args.num_blocks, args.block_index)
        if block is not None:
            logger.info("block %d of %d of every image (stored in %s)", block.index, block.count,
                        job.output / blocks.FOLDER)
            if blocks.all_finished(job, block, made_with):
                logger.info("block %d of %d of every image is already done: nothing to do", block.index, block.count)
                return exit_codes.OK
        if run.model_name == instance.MODEL_NAME:
            detector = instance.load_detector(run, args)
            logger.info("tiles of %d px, overlap %d px, %d tiles per batch, score threshold %.2f", detector.tile_size,
                        detector.overlap, detector.batch_size, detector.score_threshold)
        else:
            segmenter = semantic.Segmenter(run, tile_size=args.tile_size, batch_size=args.batch_size,
                                           margin=args.margin, tta=args.tta)
            logger.info("tiles of %d px, stride %d px, margin %d px, %d tiles per batch%s", segmenter.tile_size,
                        segmenter.stride, segmenter.margin, segmenter.batch_size,
                        "" if args.tta == "none" else f", test-time augmentation {args.tta}")
            if run.instance_target:
                detector = watershed.BoundaryDetector(segmenter)
                logger.info("instances from %s targets by seeded watershed (%s)", run.instance_target,
                            detector.config)
    except InferenceError as exc:
        logger.error("%s", exc)
        return exit_codes.BAD_INPUT
    try:
        if block is not None:
            worker = (detector if run.model_name == instance.MODEL_NAME or run.instance_target else segmenter)
            return blocks.run_block(job, worker, block, made_with)
        if run.model_name == instance.MODEL_NAME:
            return instance.detect_folder(job, detector, args)
        if run.instance_target:
            return instance.detect_folder(job, detector, args, categories=[{"id": 1, "name": "object"}])
        return semantic.segment_folder(job, segmenter, args)
    except WriteError as exc:  # a full output disk: the half-written file is gone, the finished ones stay
        logger.error("%s; the outputs finished before it are complete", exc)
        return exit_codes.FAILED


def assemble(job: core.Job, args: argparse.Namespace, made_with: dict) -> int:
    """``--assemble 1``: the outputs of a single-process run, from the stored blocks (no model is loaded)."""
    run = job.run
    count, found = blocks.check_complete(job, made_with, args.num_blocks)  # InferenceError: nothing written
    logger.info("assembling %d image(s) from %d block(s) each in %s", len(job.files), count, job.output / blocks.FOLDER)
    try:
        if run.model_name == instance.MODEL_NAME:
            code = instance.detect_folder(job, blocks.AssembledDetector(run, job.output, found, "maskrcnn"), args)
        elif run.instance_target:
            code = instance.detect_folder(job, blocks.AssembledDetector(run, job.output, found, "boundary"), args,
                                          categories=[{"id": 1, "name": "object"}])
        else:
            code = semantic.segment_folder(job, blocks.AssembledSegmenter(run, job.output, found), args)
    except WriteError as exc:
        logger.error("%s; the outputs finished before it are complete, the blocks are kept", exc)
        return exit_codes.FAILED
    if code == exit_codes.OK:
        blocks.remove(job.output, job.files)
    else:
        logger.error("the blocks are kept in %s: fix the failures above and assemble again",
                     job.output / blocks.FOLDER)
    return code


if __name__ == "__main__":
    sys.exit(main())
