"""Object size statistics in the database metadata, anchors and inference overlap derived from them."""

import logging

import numpy as np
import pytest
import tifffile

import build_lmdb
from enki_seg.data import records
from enki_seg.data.object_sizes import object_sizes, summarize
from enki_seg.data.tiling import max_overlap, tile_stride
from enki_seg.inference import core
from enki_seg.inference.instance import default_overlap
from enki_seg.run_config import ClassesSection, InputSection, ModelSection, RunConfig
from enki_seg.training import loop
from enki_seg.training.maskrcnn import MaskRCNNTrainConfig, MaskRCNNTrainer
from enki_seg.training.object_scale import (CAP_FIELDS, anchor_range, derive_anchor_scale, detection_caps,
                                            inference_overlap, objects_per_tile, plan_object_scale, scaled_caps)


def two_objects(height=64, width=64):
    """A 40x20 rectangle (area 800, crossing the 32 px tile seams) and a 3x3 square (area 9)."""
    labels = np.zeros((height, width), np.uint16)
    labels[10:50, 20:40] = 7
    labels[55:58, 5:8] = 300
    return labels


def test_object_sizes_are_exact():
    labels = two_objects().astype(np.int32)
    labels[0, 60:64] = 2**20  # a sparse, large id; 1x4, area 4
    sizes = object_sizes(labels)
    assert sizes.tolist() == [[800, 40, 20], [9, 3, 3], [4, 1, 4]]
    assert object_sizes(np.zeros((4, 4), np.uint16)).shape == (0, 3)
    assert object_sizes(np.ones((3, 5), np.uint8)).tolist() == [[15, 3, 5]]  # no background


def test_summary_percentiles():
    summary = summarize(np.array([[800, 40, 20], [9, 3, 3], [4, 1, 4], [100, 10, 10]]))
    assert summary["count"] == 4
    assert summary["area"]["max"] == 800 and summary["area"]["p50"] == pytest.approx((9 + 100) / 2)
    assert summary["box_side"]["max"] == 40 and summary["box_side"]["p50"] == pytest.approx((4 + 10) / 2)
    assert summary["box_side"]["p5"] == pytest.approx(np.percentile([40, 3, 4, 10], 5))
    assert set(summary["area"]) == {"p5", "p25", "p50", "p75", "p95", "max"}
    assert summarize(np.zeros((0, 3))) == {}


def test_builder_measures_whole_source_objects(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "instances").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        tifffile.imwrite(tmp_path / "images" / f"im{i}.tif", rng.integers(0, 255, (64, 64), dtype=np.uint8))
        tifffile.imwrite(tmp_path / "instances" / f"im{i}.tif", two_objects())
    assert build_lmdb.main(["--image_folder", str(tmp_path / "images"),
                            "--instance_folder", str(tmp_path / "instances"), "--output_folder", str(tmp_path / "lmdb"), "--dataset_name", "o", "--use_tiling", "1",
                            "--tile_size", "32", "--train_fraction", "0.5", "--quiet", "--workers", "1"]) == 0
    for split in ("train", "test"):
        stats = records.read_metadata(str(tmp_path / "lmdb" / f"{split}-o.lmdb")).object_stats
        assert stats["count"] == 4  # two images, two objects each: not the pieces in the tiles
        assert stats["area"]["max"] == 800 and stats["area"]["p5"] == 9
        assert stats["box_side"]["max"] == 40 and stats["box_side"]["p5"] == 3  # 40 > the 32 px tile
        # the crowding of the records: the 32 px tiles hold the pieces of the objects cut by their edges
        # (the 40x20 rectangle crosses all four tiles' seams; the 3x3 square lies in the bottom-left tile)
        assert stats["per_record"] == {"max": 2, "per_megapixel_max": pytest.approx(2e6 / 32**2)}


def test_semantic_database_has_no_object_stats(tmp_path):
    from conftest import write_pairs

    images, masks = write_pairs(tmp_path, count=2, size=32)
    assert build_lmdb.main(["--image_folder", str(images), "--mask_folder", str(masks), "--output_folder",
                            str(tmp_path / "lmdb"), "--dataset_name", "s", "--number_classes", "3",
                            "--train_fraction", "0.5", "--quiet", "--workers", "1"]) == 0
    assert records.read_metadata(str(tmp_path / "lmdb" / "train-s.lmdb")).object_stats == {}


def test_anchor_scale_follows_the_objects():
    # small preset: levels 2..4, anchors 8, 16, 32 px at scale 2
    assert anchor_range(2.0, 2, 4) == (8.0, 32.0)
    assert derive_anchor_scale(10, 30, 2, 4, 1, default=2.0) == 2.0  # the preset's anchors already fit
    small = derive_anchor_scale(4, 12, 2, 4, 1, default=2.0)  # small nuclei: smallest anchor <= 4 px
    assert small == 1.0 and anchor_range(small, 2, 4)[0] <= 4
    large = derive_anchor_scale(40, 100, 2, 4, 1, default=2.0)  # large objects: largest anchor >= 100 px
    assert anchor_range(large, 2, 4)[1] >= 100 and anchor_range(large, 2, 4)[0] <= 40
    assert small < 2.0 < large
    # objects from 4 to 500 px cannot all fit three octaves: the small ones decide
    assert derive_anchor_scale(4, 500, 2, 4, 1, default=2.0) == 1.0
    with pytest.raises(ValueError):
        derive_anchor_scale(0, 10, 2, 4)


def test_inference_overlap_covers_the_largest_object():
    assert inference_overlap(10, 128, 16) == 32  # a quarter tile is more
    assert inference_overlap(79.0, 128, 16) == 79
    assert inference_overlap(300, 128, 16) == max_overlap(128, 16) == 112
    tile_stride(128, -(-112 // 2), 16)  # the capped overlap still leaves a stride
    assert inference_overlap(50, None) is None


def stats(p5, largest):
    return {"count": 10, "area": {"p5": p5 * p5, "max": largest * largest},
            "box_side": {"p5": p5, "p50": (p5 + largest) / 2, "max": largest}}


def test_plan_sources_and_warnings():
    derived = plan_object_scale(stats(4, 16), 2, 4, 1, 2.0, tile_size=96, size_multiple=16)
    assert derived.anchor_source == "data" and derived.anchor_scale == 1.0 and derived.warnings == []
    assert derived.inference_overlap == 24  # a quarter tile is more than 16
    user = plan_object_scale(stats(4, 200), 2, 4, 1, 2.0, user_scale=3.0, tile_size=128, size_multiple=16)
    assert user.anchor_source == "user" and user.anchor_scale == 3.0
    text = " ".join(user.warnings)
    assert "smaller than the smallest anchor (12 px)" in text and "larger than the training tile (128 px)" in text
    assert "beyond the largest anchor (48 px)" in text
    unknown = plan_object_scale({}, 2, 4, 1, 2.0, tile_size=128)
    assert (unknown.anchor_source, unknown.anchor_scale, unknown.inference_overlap) == ("preset", 2.0, None)


def metadata(object_stats, tile=64):
    return records.DatasetMetadata(
        record_count=4, image_dtype="uint8", channels=1, tile_size=tile, record_height=tile, record_width=tile,
        mask_dtype="uint8", has_instances=True, class_ids=[0, 1], class_records={}, class_pixel_counts={},
        channel_stats={}, split="train", split_seed=0, compression="none", build_args={}, sources=[],
        object_stats=object_stats)


def test_trainer_builds_and_records_the_derived_anchors(tmp_path, monkeypatch, caplog):
    """No training: the model config and config.json of a trainer over databases of small objects."""
    config = MaskRCNNTrainConfig(train_database="train.lmdb", test_database="test.lmdb",
                                 output_dir=str(tmp_path / "run"), number_classes=2)
    with caplog.at_level(logging.INFO):
        trainer = MaskRCNNTrainer(config, metadata(stats(4, 20)), metadata({}), resume=False)
    assert trainer.model_config().anchor_scale == 1.0 and config.model_config().anchor_scale == 2.0
    assert "anchor_scale 1 (data): anchors 4 to 16 px" in caplog.text
    assert "anchor_scale" not in config.maskrcnn  # the train settings (compared on resume) are untouched

    def base_run_config(self):  # loop.Trainer.run_config needs a built model; its sections are not under test
        return RunConfig(model=ModelSection("maskrcnn", {"config": self.model_config().to_dict()}, 16),
                         classes=ClassesSection(2), input=InputSection(channels=1, tile_size=64),
                         normalization={})

    monkeypatch.setattr(loop.Trainer, "run_config", base_run_config)
    (tmp_path / "run").mkdir()
    trainer.run_config().save(tmp_path / "run" / "config.json")
    saved = RunConfig.load(tmp_path / "run" / "config.json")
    assert saved.input.inference_overlap == 20
    assert saved.extra["object_scale"]["anchor_scale"] == 1.0
    assert saved.extra["object_scale"]["object_stats"]["box_side"]["max"] == 20
    assert saved.model.config["config"]["anchor_scale"] == 1.0

    # the user's anchor scale wins; a database without statistics keeps the preset's
    config.maskrcnn = {"anchor_scale": 4.0}
    assert MaskRCNNTrainer(config, metadata(stats(4, 20)), metadata({}), False).model_config().anchor_scale == 4.0
    config.maskrcnn = {}
    assert MaskRCNNTrainer(config, metadata({}), metadata({}), False).model_config().anchor_scale == 2.0


def test_inference_uses_the_recorded_overlap(tmp_path, caplog):
    run = core.RunInfo(folder=tmp_path, model_path=tmp_path / "model.keras", normalization=None,
                       config=RunConfig(model=ModelSection("maskrcnn", {}, 16), classes=ClassesSection(2),
                                        input=InputSection(channels=1, tile_size=128, inference_overlap=79),
                                        normalization={}))
    assert default_overlap(run, 128) == 79
    with caplog.at_level(logging.WARNING):
        assert default_overlap(run, 64) == max_overlap(64, 16) == 48
    assert "recommends an overlap of 79 px" in caplog.text
    run.config.input.inference_overlap = None
    assert default_overlap(run, 128) is None


# ----------------------------------------------------------------------------- crowding: caps per tile


def crowded(most, tile):
    """Statistics of records of ``tile`` px whose most crowded one holds ``most`` objects."""
    return {**stats(4, 20), "per_record": {"max": most, "per_megapixel_max": 1e6 * most / tile**2}}


SMALL_PRESET_CAPS = {"test_detections_per_image": 100, "rpn_post_nms_topn_test": 256, "rpn_pre_nms_topn_test": 500}


def test_caps_follow_the_most_crowded_record_and_the_tile_area():
    # the most crowded 256 px record holds 207 objects: a tile of the same size as many, one of 4x the area 4x
    assert objects_per_tile(crowded(207, 256), 256 * 256) == 207
    assert objects_per_tile(crowded(207, 256), 512 * 512) == 828
    assert objects_per_tile(stats(4, 20), 256 * 256) is None  # a database built before per-record counts
    caps = detection_caps(828, SMALL_PRESET_CAPS)  # the preset's ratios: 2.56 proposals per detection, 2 pre-NMS
    assert caps == {"test_detections_per_image": 828, "rpn_post_nms_topn_test": 2120, "rpn_pre_nms_topn_test": 4240}
    assert detection_caps(10, SMALL_PRESET_CAPS) == {**SMALL_PRESET_CAPS, "test_detections_per_image": 10}
    # inference: the training tile's caps times the area ratio (never fewer), or --max_detections
    assert scaled_caps(SMALL_PRESET_CAPS, 256, 512)["test_detections_per_image"] == 400
    assert scaled_caps(SMALL_PRESET_CAPS, 256, 512)["rpn_post_nms_topn_test"] == 1024
    assert scaled_caps(SMALL_PRESET_CAPS, 256, 128) == SMALL_PRESET_CAPS
    assert scaled_caps(SMALL_PRESET_CAPS, None, 512) == SMALL_PRESET_CAPS
    assert scaled_caps(SMALL_PRESET_CAPS, 256, 512, detections=50)["test_detections_per_image"] == 50


def test_trainer_sizes_its_caps_from_the_crowding(tmp_path, caplog):
    """max_num_instances and the test-time caps of the training tile follow the most crowded record; the
    user's --max_num_instances / --maskrcnn caps win (with a warning when too few); old databases keep the
    preset's."""
    config = MaskRCNNTrainConfig(train_database="train.lmdb", test_database="test.lmdb",
                                 output_dir=str(tmp_path / "run"), number_classes=2)
    with caplog.at_level(logging.INFO):
        trainer = MaskRCNNTrainer(config, metadata(crowded(328, 128), tile=128), metadata({}), resume=False)
    model = trainer.model_config()  # 328 objects x 1 / 0.9**2: the default scale augmentation zooms out by 0.9
    assert trainer.object_scale.max_num_instances == model.max_num_instances == 405
    assert trainer.reader_options == {"max_instances": 405}
    assert (model.test_detections_per_image, model.rpn_post_nms_topn_test, model.rpn_pre_nms_topn_test) == (
        328, 840, 1680)
    assert "the most crowded training record holds 328 objects" in caplog.text and "x1.23" in caplog.text
    assert "at most 328 detections from 840 proposals per 128 px tile" in caplog.text
    assert trainer.object_scale.to_dict()["detection_caps"]["test_detections_per_image"] == 328  # config.json
    assert config.max_num_instances is None  # the train settings (compared on resume) are untouched

    # records of 256 px, cropped to 128 px for training (--crop_size): a crop holds a quarter of the objects
    config.crop_size = 128
    cropped = MaskRCNNTrainer(config, metadata(crowded(1000, 256), tile=256), metadata({}), False).model_config()
    assert (cropped.max_num_instances, cropped.test_detections_per_image) == (1235, 250)
    config.use_augmentation = False  # no zoom-out: the record's count
    assert MaskRCNNTrainer(config, metadata(crowded(1000, 256), tile=256), metadata({}), False).model_config(
        ).max_num_instances == 1000
    config.use_augmentation = True
    config.crop_size = None
    sparse = MaskRCNNTrainer(config, metadata(crowded(12, 128), tile=128), metadata({}), False).model_config()
    assert (sparse.max_num_instances, *(getattr(sparse, k) for k in CAP_FIELDS)) == (100, 100, 256, 500)
    old = MaskRCNNTrainer(config, metadata(stats(4, 20), tile=128), metadata({}), False).model_config()
    assert (old.max_num_instances, old.test_detections_per_image) == (100, 100)

    config.max_num_instances, config.maskrcnn = 50, {"test_detections_per_image": 70}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        user = MaskRCNNTrainer(config, metadata(crowded(328, 128), tile=128), metadata({}), False)
    assert user.model_config().max_num_instances == 50 and user.model_config().test_detections_per_image == 70
    assert "--max_num_instances 50 is below the 328 objects" in caplog.text
    assert "at most 70 detections" in caplog.text


def test_inference_scales_the_models_caps_to_its_tile(tmp_path, monkeypatch):
    """model_functions sets the loaded model's caps for the inference tile: 4x the training tile's area
    holds 4x the objects (the cap of a 256 px training tile dropped most nuclei of crowded 512 px tiles)."""
    import types

    from enki_seg.inference import instance
    from models.maskrcnn import MaskRCNNConfig

    model = types.SimpleNamespace(config=MaskRCNNConfig.preset("small"))
    monkeypatch.setattr(core, "load_model", lambda run, check_outputs=False: model)
    run = core.RunInfo(folder=tmp_path, model_path=tmp_path / "model.keras", normalization=None,
                       config=RunConfig(model=ModelSection("maskrcnn", {}, 16), classes=ClassesSection(2),
                                        input=InputSection(channels=1, tile_size=256), normalization={}))
    instance.model_functions(run, 512)
    assert (model.config.test_detections_per_image, model.config.rpn_post_nms_topn_test) == (400, 1024)
    model.config = MaskRCNNConfig.preset("small")
    instance.model_functions(run, 512, max_detections=300)
    assert model.config.test_detections_per_image == 300
