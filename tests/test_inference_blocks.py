"""One slide across many processes: ``inference.py --num_blocks N --block_index I`` then ``--assemble 1``.

The outputs assembled from N blocks equal a single-process run file for file (labels, probabilities,
overlays, metrics, detections) for semantic, boundary (watershed) and Mask R-CNN (model faked as in
test_instance_inference.py) runs, on images read whole and on a tiled TIFF read by region (threshold
lowered as in test_tilewise.py); finished blocks are skipped without loading the model, blocks of
other settings are made again, and an assembly with a block missing writes nothing and names it.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tifffile

import inference
from enki_seg import exit_codes
from enki_seg.data import image_io
from enki_seg.inference import blocks, semantic

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]


def _read(path):
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        data.pop("seconds", None)
        return data
    if path.suffix == ".csv":
        return path.read_text()
    if path.suffix == ".png":
        import imagecodecs

        return imagecodecs.imread(str(path))
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def _assert_same_outputs(single, assembled):
    names = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(assembled) for p in assembled.rglob("*") if p.is_file())
    assert names
    for name in names:
        a, b = _read(single / name), _read(assembled / name)
        if isinstance(a, list):
            assert len(a) == len(b), name
            for x, y in zip(a, b):
                assert x.dtype == y.dtype, name
                np.testing.assert_array_equal(x, y, err_msg=str(name))
        elif isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=str(name))
        else:
            assert a == b, name


def _blocks_then_assemble(common, out, count, order=None):
    for index in order if order is not None else range(count):
        assert inference.main([*common, "--output_folder", str(out), "--num_blocks", str(count),
                               "--block_index", str(index)]) == 0
        assert not (out / "a.tif").exists()  # a block writes no outputs, only its part under .blocks
    assert (out / blocks.FOLDER).is_dir()
    assert inference.main([*common, "--output_folder", str(out), "--assemble", "1"]) == 0
    assert not (out / blocks.FOLDER).exists()  # assembled: the blocks are removed


@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory):
    from test_inference import _build_model, write_run

    return write_run(tmp_path_factory.mktemp("run") / "run", _build_model(), {"method": "zscore", "mean": [], "std": []})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from test_tilewise import _slide, _write_tiled

    root = tmp_path_factory.mktemp("images")
    image, mask = _slide()
    for folder in ("small", "slide", "masks"):
        (root / folder).mkdir()
    tifffile.imwrite(root / "small" / "a.tif", image[:700, :530])  # read whole (one strip)
    tifffile.imwrite(root / "small" / "b.tif", image[1000:1200, :300])
    tifffile.imwrite(root / "masks" / "a.tif", mask[:700, :530])
    tifffile.imwrite(root / "masks" / "b.tif", mask[1000:1200, :300])
    _write_tiled(root / "slide" / "a.tif", image)
    tifffile.imwrite(root / "masks" / "a_slide.tif", mask)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("count", [3, 40])  # 40 > the rows of tiles: some blocks are empty
def test_semantic_blocks_assemble_to_the_single_process_outputs(semantic_run, images, tmp_path, count):
    common = ["--model", str(semantic_run), "--image_folder", str(images / "small"), "--tile_size", "128",
              "--batch_size", "3", "--save_overlay", "1", "--save_probabilities", "1",
              "--mask_folder", str(images / "masks")]
    assert inference.main([*common, "--output_folder", str(tmp_path / "single")]) == 0
    _blocks_then_assemble(common, tmp_path / "blocks", count, order=reversed(range(count)))
    _assert_same_outputs(tmp_path / "single", tmp_path / "blocks")


@pytest.mark.slow
def test_slide_blocks_read_by_region_assemble_to_the_single_process_pyramids(semantic_run, images, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setattr(image_io, "REGION_READ_MIN_PIXELS", 0)
    common = ["--model", str(semantic_run), "--image_folder", str(images / "slide"), "--tile_size", "256",
              "--batch_size", "4", "--save_probabilities", "1", "--probability_dtype", "uint8"]
    assert inference.main([*common, "--output_folder", str(tmp_path / "single")]) == 0

    def no_whole_labels(self, image, *args, **kwargs):
        raise AssertionError("a block assembled the label image of a slide whole")

    monkeypatch.setattr(semantic.Segmenter, "segment", no_whole_labels)
    _blocks_then_assemble(common, tmp_path / "blocks", 4)
    _assert_same_outputs(tmp_path / "single", tmp_path / "blocks")
    with tifffile.TiffFile(tmp_path / "blocks" / "a.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) > 1


@pytest.mark.slow
def test_finished_blocks_are_skipped_changed_ones_redone_missing_ones_named(semantic_run, images, tmp_path,
                                                                            monkeypatch, caplog):
    out = tmp_path / "out"
    common = ["--model", str(semantic_run), "--image_folder", str(images / "small"), "--tile_size", "128",
              "--output_folder", str(out)]
    assert inference.main([*common, "--num_blocks", "3", "--block_index", "1"]) == 0
    stored = out / blocks.FOLDER / "a" / blocks.name(1, 3)
    made = (stored / "block.json").stat().st_mtime_ns

    # a block missing: the assembly writes nothing and says which, and how to make it
    caplog.clear()
    assert inference.main([*common, "--assemble", "1"]) == exit_codes.BAD_INPUT
    assert "a.tif: block(s) 0, 2 of 3 missing" in caplog.text and "--block_index" in caplog.text
    assert not (out / "a.tif").exists() and stored.is_dir()

    # resubmitted: every block of this index is done, so the model is not even loaded
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for finished blocks")

    with monkeypatch.context() as patched:
        patched.setattr(semantic, "Segmenter", no_model)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="inference"):
            assert inference.main([*common, "--num_blocks", "3", "--block_index", "1"]) == 0
        assert "already done" in caplog.text
    assert (stored / "block.json").stat().st_mtime_ns == made

    # a leftover of a killed task of this index is removed; other settings make the block again
    leftover = out / blocks.FOLDER / "a" / f".{blocks.name(1, 3)}.tmp-99999"
    leftover.mkdir()
    assert inference.main([*common, "--num_blocks", "3", "--block_index", "1", "--batch_size", "2"]) == 0
    assert not leftover.exists()
    assert json.loads((stored / "block.json").read_text())["settings"]["batch_size"] == 2
    for index in (0, 2):
        assert inference.main([*common, "--num_blocks", "3", "--block_index", str(index)]) == 0
    caplog.clear()
    assert inference.main([*common, "--assemble", "1"]) == exit_codes.BAD_INPUT  # block 1 has batch_size 2
    assert "other settings (batch_size)" in caplog.text
    assert inference.main([*common, "--num_blocks", "3", "--block_index", "1"]) == 0
    assert inference.main([*common, "--assemble", "1"]) == 0
    assert (out / "a.tif").is_file() and not (out / blocks.FOLDER).exists()


def test_block_flags_are_checked(capsys):
    base = ["--model", "m", "--image_folder", "i", "--output_folder", "o"]
    for extra, message in ((["--block_index", "0"], "needs --num_blocks"),
                           (["--num_blocks", "2"], "needs --block_index"),
                           (["--num_blocks", "2", "--block_index", "2"], "in 0..1"),
                           (["--num_blocks", "0", "--assemble", "1"], ">= 1"),
                           (["--num_blocks", "2", "--block_index", "0", "--assemble", "1"], "drop --block_index")):
        with pytest.raises(SystemExit):
            inference.parse_args(base + extra)
        assert message in capsys.readouterr().err


def test_block_tiles_are_whole_rows_and_partition_the_plan():
    from enki_seg.data import tiling

    tiles = tiling.plan_tiles(1024, 640, 128, 16, 16)
    for count in (1, 2, 3, 7, 50):
        parts = [blocks.block_tiles(tiles, count, i) for i in range(count)]
        assert sorted(i for part in parts for i in part) == list(range(len(tiles)))
        rows = [blocks.kept_rows(tiles, part, 1000) for part in parts]
        covered = [r for r in rows if r[1] > r[0]]
        assert covered[0][0] == 0 and covered[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        for part in parts:
            ys = {tiles[i].y for i in part}
            assert all(tiles[i].y not in ys for i in set(range(len(tiles))) - part)


@pytest.mark.slow
def test_maskrcnn_blocks_assemble_to_the_single_process_outputs(tmp_path, monkeypatch):
    from test_instance_inference import _discs, _maskrcnn_run, fake_predict, reference_paste

    from enki_seg.inference import instance

    monkeypatch.setattr(instance, "model_functions", lambda run, *caps: (fake_predict, reference_paste))
    image, truth = _discs(seed=4, count=120, size=700)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", image[..., 0])
    tifffile.imwrite(tmp_path / "masks" / "a.tif", truth.astype(np.uint16))
    run = _maskrcnn_run(tmp_path / "run")
    common = ["--model", str(run), "--image_folder", str(tmp_path / "images"), "--overlap", "32",
              "--save_overlay", "1", "--mask_folder", str(tmp_path / "masks")]
    assert inference.main([*common, "--output_folder", str(tmp_path / "single")]) == 0
    _blocks_then_assemble(common, tmp_path / "blocks", 3)
    _assert_same_outputs(tmp_path / "single", tmp_path / "blocks")
    assert len(json.loads((tmp_path / "single" / "detections.json").read_text())["annotations"]) > 100


@pytest.mark.slow
def test_boundary_blocks_assemble_to_the_single_process_watershed(semantic_run, images, tmp_path, monkeypatch):
    import shutil

    from enki_seg.inference import watershed

    original = watershed.instances_from_probabilities
    low = watershed.WatershedConfig(seed_threshold=0.232, min_seed_area=4)  # the random model: interior p ~0.23
    monkeypatch.setattr(watershed, "instances_from_probabilities", lambda p, config: original(p, low))

    run = tmp_path / "boundary_run"
    shutil.copytree(semantic_run, run)
    config = json.loads((run / "config.json").read_text())
    config["train"]["instance_target"] = "boundary"  # the test model's 3 classes: background, interior, boundary
    (run / "config.json").write_text(json.dumps(config))
    common = ["--model", str(run), "--image_folder", str(images / "small"), "--tile_size", "128", "--batch_size", "3"]
    assert inference.main([*common, "--output_folder", str(tmp_path / "single")]) == 0
    _blocks_then_assemble(common, tmp_path / "blocks", 2)
    _assert_same_outputs(tmp_path / "single", tmp_path / "blocks")
    assert tifffile.imread(tmp_path / "single" / "a.tif").max() > 0


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_array_blocks_skip_when_resubmitted_and_assemble(slurm_cluster, semantic_run, images, tmp_path):
    """launch/inference_array.sbatch on the private cluster: 3 array tasks, one resubmitted (skips its
    finished block), then the assembly job: the outputs equal a single-process run's."""
    from pathlib import Path

    from slurm_helpers import job_output, submit, wait_for_state

    launch = Path(__file__).resolve().parents[1] / "launch" / "inference_array.sbatch"
    flags = ["--tile_size", "128", "--batch_size", "3", "--save_probabilities", "1",
             "--mask_folder", str(images / "masks")]
    args = [semantic_run, images / "small", tmp_path / "array", *flags]
    env = {"ENKI_SNAPSHOT_GIT": "0"}
    array = submit(slurm_cluster, launch, args, sbatch_args=["--array=0-2", "--cpus-per-task=1"],
                   output=tmp_path / "array-%a.out", env=env)
    for task in range(3):
        info = wait_for_state(slurm_cluster, f"{array}_{task}", timeout=400)
        assert info["JobState"] == "COMPLETED", job_output(info)
    again = submit(slurm_cluster, launch, [*args, "--num_blocks", "3"], sbatch_args=["--array=1"],
                   output=tmp_path / "again.out", env=env)
    info = wait_for_state(slurm_cluster, f"{again}_1", timeout=400)
    assert info["JobState"] == "COMPLETED" and "already done" in job_output(info), job_output(info)
    assembly = submit(slurm_cluster, launch, args, output=tmp_path / "assembly.out", env=env)
    info = wait_for_state(slurm_cluster, assembly, timeout=400)
    assert info["JobState"] == "COMPLETED", job_output(info)
    assert inference.main(["--model", str(semantic_run), "--image_folder", str(images / "small"),
                           "--output_folder", str(tmp_path / "single"), *flags]) == 0
    _assert_same_outputs(tmp_path / "single", tmp_path / "array")
