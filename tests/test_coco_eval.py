"""coco_eval.py: RLE of crops, annotation/result conversion, box and mask AP on hand-made cases."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from enki_seg.evaluation import coco_ap as coco_eval

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),  # pycocotools
]


def _squares(height=64, width=64, corners=((5, 5), (5, 40), (40, 5), (40, 40)), side=12):
    """(H, W) int32 instance labels with one side x side square per corner (ids 1..N) and their boxes."""
    labels = np.zeros((height, width), np.int32)
    boxes = []
    for i, (y, x) in enumerate(corners):
        labels[y : y + side, x : x + side] = i + 1
        boxes.append([y, x, y + side, x + side])
    return labels, np.array(boxes, np.float32)


def _masks(labels):
    return np.stack([labels == k for k in range(1, labels.max() + 1)])


@pytest.mark.parametrize("seed", range(5))
def test_crop_rle_equals_the_full_image_encoding(seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 40, 2)
    full = np.zeros((height, width), bool)
    y0, x0 = rng.integers(0, height), rng.integers(0, width)
    y1, x1 = rng.integers(y0 + 1, height + 1), rng.integers(x0 + 1, width + 1)
    crop = rng.random((y1 - y0, x1 - x0)) < 0.5
    full[y0:y1, x0:x1] = crop
    rle = coco_eval.crop_to_rle(crop, y0, x0, height, width)
    assert rle["counts"] == mask_util.encode(np.asfortranarray(full.astype(np.uint8)))["counts"]
    np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), full)


def test_annotations_of_instance_labels():
    labels, boxes = _squares()
    labels[labels == 3] = 0  # an absent id is skipped
    annotations = coco_eval.instances_to_coco_annotations(labels, [1, 2, 2, 1], image_id=7)
    assert [a["category_id"] for a in annotations] == [1, 2, 1]
    assert all(a["image_id"] == 7 and a["iscrowd"] == 0 and a["area"] == 144 for a in annotations)
    assert annotations[1]["bbox"] == [40.0, 5.0, 12.0, 12.0]
    decoded = mask_util.decode(annotations[2]["segmentation"]).astype(bool)
    np.testing.assert_array_equal(decoded, labels == 4)
    with pytest.raises(ValueError, match="no class"):
        coco_eval.instances_to_coco_annotations(labels, [1], image_id=0)


def _evaluator(labels, boxes, masks, scores=None, classes=None, gt_classes=None):
    evaluator = coco_eval.CocoEvaluator([1, 2], {1: "cell", 2: "debris"})
    n_gt = int(labels.max())
    evaluator.add_image("a.tif", *labels.shape, labels, gt_classes or [1] * n_gt, boxes,
                        np.linspace(0.9, 0.6, len(boxes)) if scores is None else scores,
                        [1] * len(boxes) if classes is None else classes, masks)
    return evaluator


def test_perfect_detections_give_ap_one():
    labels, boxes = _squares()
    scores = _evaluator(labels, boxes, _masks(labels)).evaluate()
    for key in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"):
        assert scores[key] == pytest.approx(1.0), key
    assert scores["box_stats"]["AR_max"] == pytest.approx(1.0)
    assert set(scores["mask_stats"]) == set(coco_eval.STAT_NAMES)
    assert "note" not in scores


def test_a_missed_object_costs_a_quarter_of_recall():
    labels, boxes = _squares()
    masks = _masks(labels)
    scores = _evaluator(labels, boxes[:3], masks[:3]).evaluate()
    # precision 1 up to recall 0.75, nothing beyond: 76 of COCO's 101 recall points
    for prefix in ("box", "mask"):
        assert scores[f"{prefix}_AP"] == pytest.approx(76 / 101)
        assert scores[f"{prefix}_stats"]["AR_max"] == pytest.approx(0.75)


def test_a_shifted_mask_below_iou_half_does_not_count():
    labels, boxes = _squares(corners=((10, 10),), side=10)
    for shift, ap50, ap75 in ((6, 0.0, 0.0), (2, 1.0, 0.0)):  # IoU 40/160 = 0.25 and 80/120 = 0.67
        shifted_boxes = boxes + [0, shift, 0, shift]
        shifted_masks = np.roll(_masks(labels), shift, axis=2)
        scores = _evaluator(labels, shifted_boxes, shifted_masks).evaluate()
        for prefix in ("box", "mask"):
            assert scores[f"{prefix}_AP50"] == pytest.approx(ap50)
            assert scores[f"{prefix}_AP75"] == pytest.approx(ap75)


def test_a_wrong_class_counts_as_a_miss():
    labels, boxes = _squares()
    wrong = _evaluator(labels, boxes, _masks(labels), classes=[1, 1, 1, 2]).evaluate()
    assert wrong["mask_AP"] == pytest.approx(76 / 101)  # class 2 has no gt: only class 1 averages


def test_no_ground_truth_gives_nan_and_a_note():
    labels = np.zeros((32, 32), np.int32)
    box = np.array([[2, 2, 10, 10]], np.float32)
    mask = np.zeros((1, 32, 32), bool)
    mask[0, 2:10, 2:10] = True
    scores = _evaluator(labels, box, mask).evaluate()
    assert math.isnan(scores["box_AP"]) and math.isnan(scores["mask_AP75"])
    assert "no ground-truth" in scores["note"]
    assert all(math.isnan(v) for v in scores["mask_stats"].values())


def test_images_without_detections_or_ground_truth():
    labels, boxes = _squares()
    evaluator = coco_eval.CocoEvaluator([1])
    evaluator.add_image("full.tif", 64, 64, labels, [1] * 4, boxes, [0.9] * 4, [1] * 4, _masks(labels))
    evaluator.add_image("missed.tif", 64, 64, labels, [1] * 4, np.zeros((0, 4)), [], [], np.zeros((0, 64, 64), bool))
    evaluator.add_image("empty.tif", 64, 64, np.zeros((64, 64), np.int32), [], np.zeros((0, 4)), [], [], None)
    scores = evaluator.evaluate()
    assert scores["images"] == 3 and scores["ground_truth"] == 8 and scores["detections"] == 4
    assert scores["mask_stats"]["AR_max"] == pytest.approx(0.5)
    nothing = coco_eval.CocoEvaluator([1])
    nothing.add_image(0, 64, 64, labels, [1] * 4, np.zeros((0, 4)), [], [], None)
    assert nothing.evaluate()["box_AP"] == 0.0
    with pytest.raises(ValueError, match="added twice"):
        nothing.add_image(0, 64, 64, labels, [1] * 4, np.zeros((0, 4)), [], [], None)


def test_more_detections_than_coco_default_all_count():
    side, per_row = 4, 12
    corners = [(5 * (i // per_row), 5 * (i % per_row)) for i in range(per_row * per_row)]
    labels, boxes = _squares(60, 60, corners, side)  # 144 objects > COCO's 100
    scores = _evaluator(labels, boxes, _masks(labels), scores=np.full(len(boxes), 0.9)).evaluate()
    assert scores["max_detections"] == 144
    assert scores["mask_AP"] == pytest.approx(1.0)


def test_results_json_round_trips_and_loads_with_load_res():
    labels, boxes = _squares()
    evaluator = _evaluator(labels, boxes, _masks(labels))
    results = json.loads(json.dumps(evaluator.results_json()))
    assert results[0]["bbox"] == [5.0, 5.0, 12.0, 12.0] and isinstance(results[0]["segmentation"]["counts"], str)
    gt = COCO()
    gt.dataset = {"images": evaluator.images, "categories": evaluator.categories, "annotations": evaluator.annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        loaded = gt.loadRes(results)
    assert len(loaded.getAnnIds()) == 4
    np.testing.assert_array_equal(loaded.annToMask(loaded.anns[4]).astype(bool), labels == 4)


def test_detections_checks_lengths():
    with pytest.raises(ValueError, match="2 boxes"):
        coco_eval.detections_to_coco_results(np.zeros((2, 4)), [0.5], [1, 1], None, image_id=0)
