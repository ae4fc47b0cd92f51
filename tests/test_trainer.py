"""The training package's pieces that need no TensorFlow: cluster resolution, config checks, TAO step levels,
the resumed-data check."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import train_unet
from enki_seg.training import distribution, run_folder, schedules
from enki_seg.training.errors import TrainError


def test_resolve_cluster_from_tf_config_slurm_and_nothing():
    env = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker",
                                                                                          "index": 2}})}
    cluster = distribution.resolve_cluster("auto", env)
    assert (cluster.num_workers, cluster.worker_index, cluster.is_chief) == (3, 2, False)
    assert distribution.resolve_cluster("mirrored", env) is None  # an explicit choice wins over the environment
    assert distribution.resolve_cluster("auto", {}) is None
    with pytest.raises(TrainError, match="needs TF_CONFIG or a multi-task srun step"):
        distribution.resolve_cluster("multi_worker", {})
    with pytest.raises(TrainError, match="TF_CONFIG is not valid"):
        distribution.resolve_cluster("auto", {"TF_CONFIG": "{not json"})
    # inside a 2-task srun step without TF_CONFIG: built from SLURM's variables and exported for TF
    slurm = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]",
             "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_ID": "77", "SLURM_NODEID": "1", "SLURM_LOCALID": "0"}
    cluster = distribution.resolve_cluster("auto", slurm)
    assert (cluster.num_workers, cluster.worker_index) == (2, 1)
    assert json.loads(slurm["TF_CONFIG"])["task"] == {"type": "worker", "index": 1}
    # a one-worker TF_CONFIG is not a multi-worker run unless asked for
    one = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})}
    assert distribution.resolve_cluster("auto", one) is None


def test_step_levels_and_their_checks():
    lr = schedules.learning_rate_at
    levels = dict(decay_steps=[100, 200], decay_levels=[0.5, 0.05])
    assert lr(50, 1.0, "step", 0, None, **levels) == 1.0
    assert lr(150, 1.0, "step", 0, None, **levels) == 0.5
    assert lr(250, 1.0, "step", 0, None, **levels) == pytest.approx(0.05)
    assert lr(5, 1.0, "step", 10, None, **levels) == pytest.approx(0.1)  # warm-up first
    base = ["--train_database", "a", "--test_database", "b", "--output_dir", "c"]
    with pytest.raises(TrainError, match="--lr_decay_levels has 1 values but --lr_decay_steps has 2"):
        train_unet.build_config(train_unet.parse_args(base + ["--lr_schedule", "step", "--lr_decay_steps", "5", "9",
                                                              "--lr_decay_levels", "0.1"]))
    config = train_unet.build_config(train_unet.parse_args(base + ["--lr_schedule", "step", "--lr_decay_steps", "5"]))
    assert config.max_steps is None  # explicit decay steps need no --max_steps


def test_resumed_run_must_use_databases_with_the_same_records(tmp_path):
    folder = run_folder.RunFolder(tmp_path)
    folder.config.write_text(json.dumps({"data": {"train_records": 10, "test_records": 4,
                                                  "train_database": "/old/train.lmdb"}}))
    same = SimpleNamespace(record_count=10), SimpleNamespace(record_count=4)
    run_folder.check_resumed_data(folder, *same)  # a copy at another path (scratch) is fine
    with pytest.raises(TrainError, match="has 11 records but the run .* was trained on 10 .*/old/train.lmdb"):
        run_folder.check_resumed_data(folder, SimpleNamespace(record_count=11), same[1])


def test_trainer_state_keeps_the_interval_losses_and_reads_older_states(tmp_path):
    path = tmp_path / "trainer_state.json"
    losses = [0.1 + 0.2, 1 / 3]  # exact floats survive JSON, so a resumed interval's mean is the same
    run_folder.TrainerState(step=12, interval_losses=losses).save(path)
    assert run_folder.TrainerState.load(path).interval_losses == losses
    # a state written before reader_position was dropped (it is implied by step and topology) still loads
    path.write_text(json.dumps({"step": 10, "reader_position": 160, "history": []}))
    state = run_folder.TrainerState.load(path)
    assert state.step == 10 and state.interval_losses == [] and not hasattr(state, "reader_position")


def test_settings_added_since_a_run_started_do_not_block_its_resume():
    """A run checkpointed by an older version has no entry for settings added since; at their default
    they are not a difference (a requeued job resumes after an upgrade), at another value they are."""
    old = {"learning_rate": 0.001, "batch_size": 8}
    defaults = {"learning_rate": 0.0001, "batch_size": 8, "crop_size": 0}
    new = {"learning_rate": 0.001, "batch_size": 8, "crop_size": 0}
    assert run_folder.config_differences(old, new, defaults=defaults) == []
    assert run_folder.config_differences(old, {**new, "crop_size": 64}, defaults=defaults) == ["crop_size: None -> 64"]
    assert run_folder.config_differences(old, new) == ["crop_size: None -> 0"]  # without defaults: a difference
    assert run_folder.config_differences({**old, "crop_size": 32}, new, defaults=defaults) == ["crop_size: 32 -> 0"]


def test_auto_precision_keeps_small_and_unmeasured_models_in_float32(monkeypatch):
    """--precision auto (train_unet.py's default): bfloat16 only where native and the model gains
    (measured: 64 base filters 1.99x, 16: 1.42x, 8: 0.70x); train_maskrcnn.py defaults to float32."""
    from enki_seg.training.maskrcnn import MaskRCNNTrainConfig
    from enki_seg.training.unet import TrainConfig, UNetTrainer

    assert TrainConfig().precision == "auto" and MaskRCNNTrainConfig().precision == "float32"

    def unsuited(**settings):
        return UNetTrainer.bfloat16_unsuited(SimpleNamespace(config=TrainConfig(**settings),
                                                             MIN_BFLOAT16_FILTERS=UNetTrainer.MIN_BFLOAT16_FILTERS))

    assert unsuited(base_filters=64) is None and unsuited(base_filters=16) is None
    assert "too small" in unsuited(base_filters=8)
    assert "not measured for fc-densenet" in unsuited(model="fc-densenet")
    monkeypatch.setattr(distribution, "native_bfloat16", lambda: (True, "CPU has amx_bf16"))
    assert distribution.resolve_precision("auto") == ("mixed_bfloat16", "auto: CPU has amx_bf16")
    policy, why = distribution.resolve_precision("auto", unsuited(base_filters=8))
    assert policy == "float32" and "amx_bf16" in why and "too small" in why
    assert distribution.resolve_precision("float32", None) == ("float32", "asked for")
    monkeypatch.setattr(distribution, "native_bfloat16", lambda: (False, "CPU has neither"))
    assert distribution.resolve_precision("auto")[0] == "float32"


@pytest.mark.parametrize("started, requested, expected", [
    ("float32", "auto", "float32"),                # started before auto was the default: resumes as it was
    ("mixed_bfloat16", "auto", "mixed_bfloat16"),
    ("auto", "auto", "auto"),                      # resolved again on this machine
    ("float32", "mixed_bfloat16", "mixed_bfloat16"),  # asked for explicitly: a change the resume check reports
])
def test_resumed_run_keeps_its_precision_under_auto(started, requested, expected):
    from enki_seg.training.loop import keep_started_settings

    config = SimpleNamespace(precision=requested)
    folder = SimpleNamespace(path="run", has_checkpoint=lambda: True,
                             saved_sections=lambda: {"train": {"precision": started}})
    keep_started_settings(folder, config)
    assert config.precision == expected
    fresh = SimpleNamespace(precision="auto")
    keep_started_settings(SimpleNamespace(path="run", has_checkpoint=lambda: False, saved_sections=dict), fresh)
    assert fresh.precision == "auto"


def test_resumed_maskrcnn_run_keeps_its_max_num_instances():
    """A Mask R-CNN run started when --max_num_instances defaulted to 100 resumes with 100 (not refused as a
    different run); one started with the data-derived default (None saved) keeps deriving it; a value
    given now is compared as before."""
    from enki_seg.training.loop import keep_started_settings

    def folder(saved):
        return SimpleNamespace(path="run", has_checkpoint=lambda: True,
                               saved_sections=lambda: {"train": {"max_num_instances": saved, "precision": "float32"}})

    for saved, given, expected in ((100, None, 100), (None, None, None), (100, 300, 300)):
        config = SimpleNamespace(max_num_instances=given, precision="float32")
        keep_started_settings(folder(saved), config)
        assert config.max_num_instances == expected, (saved, given)
