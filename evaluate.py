"""Scores a folder of predicted label masks against ground-truth masks (matched by file stem).

    python evaluate.py --prediction_folder preds --mask_folder masks --number_classes 2
    python evaluate.py --prediction_folder preds --mask_folder instances --instance 1

Writes ``metrics.json``, ``metrics.csv`` and ``metrics_per_image.csv`` to ``--output_folder``
(default: the prediction folder) and prints the table: per-class precision, recall, F1, IoU and Dice
with micro/macro/weighted averages over all pixels of all images (``enki_seg.evaluation.metrics``),
the same code and files as ``inference.py --mask_folder`` (``enki_seg.evaluation.semantic_evaluation``).
No TensorFlow is imported.

With ``--instance 1`` both folders hold instance-label images (0 background, any other value an
object id; ids need not agree between the two) and the scores are the object matching of nuclei
papers and the DSB2018 challenge: at IoU 0.5, 0.55, ..., 0.95 the TP/FP/FN counts summed over the
images, precision, recall, F1, accuracy TP/(TP+FP+FN) and panoptic quality, the per-image mean
accuracy, the DSB score, and COCO box/mask AP (objects ranked by id, lowest first; the ranking
``inference.py`` writes). ``metrics.json`` has the layout of ``inference.py --mask_folder`` for a
Mask R-CNN run; ``metrics.csv`` has one row per IoU threshold, ``metrics_per_image.csv`` one per
image (``enki_seg.evaluation.instance_evaluation``).

Exit codes: 0 every prediction scored; 1 some could not be (a missing mask, a size mismatch, a label
outside [0, number_classes), an unreadable file: each reported in one line, the rest scored);
2 nothing scored (bad folders, no prediction with a mask).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from enki_seg import cli, exit_codes
from enki_seg.data import image_io
from enki_seg.evaluation import instance_evaluation
from enki_seg.evaluation import metrics as seg_metrics
from enki_seg.evaluation.semantic_evaluation import Evaluation

logger = logging.getLogger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate", description="Score predicted masks against ground truth.")
    p.add_argument("--prediction_folder", required=True, help="predicted label masks (tif/png), one per image")
    p.add_argument("--mask_folder", required=True, help="ground-truth masks, matched by file stem")
    p.add_argument("--number_classes", type=int, help="classes including background (semantic masks)")
    p.add_argument("--instance", type=int, choices=(0, 1), default=0,
                   help="1: both folders hold instance labels (object ids); object matching and COCO AP")
    p.add_argument("--class_names", nargs="+", help="one name per class (default class_0 ...)")
    p.add_argument("--output_folder", help="where the metrics files go (default: --prediction_folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    try:
        if args.instance:
            if args.number_classes is not None or args.class_names is not None:
                raise image_io.InputError("--number_classes and --class_names are for semantic masks; drop them "
                                          "with --instance 1 (every object counts as one class)")
        elif args.number_classes is None:
            raise image_io.InputError("--number_classes is required for semantic masks (or pass --instance 1 "
                                      "for instance labels)")
        elif args.number_classes < 1:
            raise image_io.InputError(f"--number_classes must be >= 1, got {args.number_classes}")
        if args.class_names is not None and len(args.class_names) != args.number_classes:
            raise image_io.InputError(f"--class_names has {len(args.class_names)} names for "
                                      f"--number_classes {args.number_classes}")
        predictions = image_io.index_by_stem(args.prediction_folder, "prediction")
        masks = image_io.index_by_stem(args.mask_folder, "mask")
        if not predictions:
            raise image_io.InputError(f"no prediction images in {args.prediction_folder}")
        output = Path(args.output_folder or args.prediction_folder)
        output.mkdir(parents=True, exist_ok=True)
    except (image_io.InputError, OSError) as exc:
        logger.error("%s", exc)
        return exit_codes.BAD_INPUT
    if args.instance:
        evaluation = instance_evaluation.InstanceEvaluation()
        without_prediction = sorted(set(masks) - set(predictions))
        if without_prediction:
            logger.warning("%d mask(s) have no prediction and are not scored: %s", len(without_prediction),
                           ", ".join(masks[stem].name for stem in without_prediction[:5])
                           + (" ..." if len(without_prediction) > 5 else ""))
    else:
        evaluation = Evaluation(args.number_classes, args.class_names)
    what = "instance labels" if args.instance else "mask"
    failures = []
    for stem, path in sorted(predictions.items()):
        try:
            if stem not in masks:
                raise image_io.InputError(f"{path}: no mask named {stem}.* in {args.mask_folder}")
            truth = image_io.read_labels(masks[stem], what)
            prediction = image_io.read_labels(path, "prediction")
            try:
                evaluation.add(path.name, truth, prediction)
            except ValueError as exc:
                raise image_io.InputError(f"{path}: {what} {masks[stem]}: {exc}") from None
        except image_io.InputError as exc:
            logger.error("skipped: %s", exc)
            failures.append(str(exc))
    if not evaluation.rows:
        logger.error("no prediction could be scored")
        return exit_codes.BAD_INPUT
    scores = evaluation.write(output)
    table = instance_evaluation.format_table if args.instance else seg_metrics.format_table
    print(table(scores), flush=True)
    logger.info("%d prediction(s) scored: %s, %s", len(evaluation.rows), output / "metrics.json",
                output / "metrics.csv")
    if failures:
        logger.error("%d of %d prediction(s) could not be scored", len(failures), len(predictions))
        return exit_codes.FAILED
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
