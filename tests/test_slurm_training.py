"""The real trainers submitted with the real launch/ scripts to a private single-node SLURM cluster:
a one-node job completes and exports; a 2-task multi-worker job completes with equal weights on both
workers; SIGUSR1 mid-run checkpoints, requeues and finishes with the step count of an uninterrupted
run, also when the chief is slow to write its checkpoint; a SIGTERM to the job does the same; a worker
killed mid-run fails the job fast with nothing left running.

(The stub-trainer versions of these, and the cluster itself, are tested in test_launch.py.)
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import ROOT, build_blocks_db
from slurm_helpers import (Cluster, SlurmError, job_output, queued_job_ids, signal_batch_shell, submit,
                           wait_dead, wait_for_state, wait_for_text)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]
LAUNCH = ROOT / "launch"
JOB_ENV = {"ENKI_SNAPSHOT_GIT": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def databases(tmp_path_factory):
    return build_blocks_db(tmp_path_factory.mktemp("slurm-train"), count=16, seed=2)


def write_config(path: Path, lmdb: Path, max_steps: int, test_every: int = 10) -> Path:
    """Hyperparameters in a config file, as the launch scripts expect."""
    path.write_text(
        f"train_database: {lmdb / 'train-b.lmdb'}\ntest_database: {lmdb / 'test-b.lmdb'}\n"
        f"number_classes: 2\nbatch_size: 2\ntest_every_n_steps: {test_every}\nmax_steps: {max_steps}\n"
        "log_every: 2\n"
        "depth: 2\nbase_filters: 8\ndropout: 0.0\nseed: 0\n")
    return path


def fingerprints(text: str) -> list[str]:
    return re.findall(r"model weights fingerprint (\w+)", text)


def _finish(cluster: Cluster, job: str, **kwargs) -> dict:
    try:
        return wait_for_state(cluster, job, **kwargs)
    except SlurmError:
        cluster.run("scancel", job, check=False)
        raise


def test_single_node_training_job_completes_and_exports(slurm_cluster, databases, tmp_path):
    config = write_config(tmp_path / "run.yaml", databases, max_steps=20)
    out = tmp_path / "run"
    job = submit(slurm_cluster, LAUNCH / "train_unet.sbatch", [config, out], sbatch_args=["--cpus-per-task=2"],
                 output=tmp_path / "job.out", env=JOB_ENV)
    info = _finish(slurm_cluster, job, timeout=300)
    assert info["JobState"] == "COMPLETED", job_output(info)[-4000:]
    assert (out / "model.keras").is_file() and (out / "saved_model").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["workers"] == 1
    record = out / "launch" / f"{job}-0"
    assert (record / "command.txt").is_file() and (record / config.name).is_file()


def test_two_task_multi_worker_job_ends_with_equal_weights(slurm_cluster, databases, tmp_path):
    config = write_config(tmp_path / "run.yaml", databases, max_steps=20)
    out = tmp_path / "run"
    job = submit(slurm_cluster, LAUNCH / "train_unet_multinode.sbatch", [config, out],
                 sbatch_args=["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"],
                 output=tmp_path / "job.out", env=JOB_ENV)
    info = _finish(slurm_cluster, job, timeout=300)
    text = job_output(info)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    prints = fingerprints(text)
    assert len(prints) == 2 and prints[0] == prints[1], text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["weights_fingerprint"] == prints[0]
    assert not list(out.glob(".worker-*"))


def test_usr1_checkpoints_requeues_and_finishes_the_planned_steps(slurm_cluster, databases, tmp_path):
    config = write_config(tmp_path / "run.yaml", databases, max_steps=40)
    out, output = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm_cluster, LAUNCH / "train_unet.sbatch", [config, out], sbatch_args=["--cpus-per-task=2"],
                 output=output, env=JOB_ENV)
    try:
        wait_for_text(output, "step 6 ", timeout=240)
        signal_batch_shell(slurm_cluster, job, "USR1")  # what --signal=B:USR1@300 does before the limit
    except SlurmError:
        slurm_cluster.run("scancel", job, check=False)
        raise
    info = _finish(slurm_cluster, job, timeout=300, min_restarts=1)
    text = job_output(info)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "checkpoint written at step" in text and "resumed from" in text
    interrupted_at = int(re.search(r"checkpoint written at step (\d+)", text).group(1))
    assert 6 <= interrupted_at < 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40  # what an uninterrupted run does
    assert sorted(p.name for p in (out / "launch").iterdir()) == [f"{job}-0", f"{job}-1"]


def _assert_resumed_where_it_stopped(info: dict, out: Path, max_steps: int) -> int:
    """The job checkpointed once, was requeued once, resumed from that very checkpoint and finished."""
    text = job_output(info)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    stopped = int(re.search(r"checkpoint written at step (\d+)", text).group(1))
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    assert resumed == stopped and 0 < stopped < max_steps, text[-4000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == max_steps  # as an uninterrupted run
    return stopped


def test_slow_chief_checkpoint_survives_the_other_worker_exiting(slurm_cluster, databases, tmp_path):
    """Both workers agree to stop; worker 1 exits 75 at once while the chief still writes its checkpoint
    for longer than srun's kill-on-bad-exit takes (~5 s, then the cluster's KillWait of 5 s): srun must
    not kill the chief (launch/task.py reports 75 as 0), and the job resumes from that checkpoint."""
    max_steps = 30
    # test intervals beyond max_steps: the slowed checkpoints are the preemption's and the final one
    config = write_config(tmp_path / "run.yaml", databases, max_steps=max_steps, test_every=100)
    out, output = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm_cluster, LAUNCH / "train_unet_multinode.sbatch", [config, out],
                 sbatch_args=["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], output=output,
                 env={**JOB_ENV, "ENKI_TEST_SLOW_CHECKPOINT_SECONDS": "15"})
    try:
        wait_for_text(output, "step 4 ", timeout=240)
        signal_batch_shell(slurm_cluster, job, "USR1")
    except SlurmError:
        slurm_cluster.run("scancel", job, check=False)
        raise
    info = _finish(slurm_cluster, job, timeout=300, min_restarts=1)
    # the chief finished its checkpoint and recorded its own 75 (no file: it was killed)
    codes = out / "launch" / f"{job}-0" / "exit_codes"
    assert sorted(p.name for p in codes.iterdir()) == ["task-0.code", "task-1.code"], job_output(info)[-3000:]
    assert [(codes / f"task-{rank}.code").read_text().strip() for rank in (0, 1)] == ["75", "75"]
    _assert_resumed_where_it_stopped(info, out, max_steps)


def test_sigterm_to_the_job_checkpoints_requeues_and_finishes(slurm_cluster, databases, tmp_path):
    """SIGTERM to the trainer's step (what a preemption with GraceTime sends) and to the batch shell
    (`scancel --batch`): the shell survives, the trainer checkpoints, the job requeues and finishes."""
    max_steps = 30
    config = write_config(tmp_path / "run.yaml", databases, max_steps=max_steps, test_every=100)
    out, output = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm_cluster, LAUNCH / "train_unet.sbatch", [config, out], sbatch_args=["--cpus-per-task=2"],
                 output=output, env=JOB_ENV)
    try:
        wait_for_text(output, "step 6 ", timeout=240)
        signal_batch_shell(slurm_cluster, job, "TERM")
        slurm_cluster.run("scancel", "--signal=TERM", job)  # every step's tasks, not the batch shell
    except SlurmError:
        slurm_cluster.run("scancel", job, check=False)
        raise
    info = _finish(slurm_cluster, job, timeout=300, min_restarts=1)
    _assert_resumed_where_it_stopped(info, out, max_steps)
    assert "received SIGTERM: forwarding SIGUSR1" in job_output(info)


def _trainer_pids(job: str) -> dict[int, int]:
    """rank -> pid of this job's python trainer processes (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text(errors="replace").split("\0")
                           if "=" in item)
        except OSError:
            continue
        # the trainer itself (python train_unet.py ...), not launch/task.py around it nor its readers
        if environ.get("SLURM_JOB_ID") == job and any(p.endswith(b"train_unet.py") for p in cmdline[:3]) \
                and not any(p.endswith(b"task.py") for p in cmdline):
            found[int(environ["SLURM_PROCID"])] = int(entry.name)
    return found


def test_killed_worker_fails_the_job_fast(slurm_cluster, databases, tmp_path):
    config = write_config(tmp_path / "run.yaml", databases, max_steps=100000)
    out, output = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm_cluster, LAUNCH / "train_unet_multinode.sbatch", [config, out],
                 sbatch_args=["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], output=output, env=JOB_ENV)
    try:
        wait_for_text(output, "step 4 ", timeout=240)
        pids = _trainer_pids(job)
        assert set(pids) == {0, 1}, pids
        killed_at = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)  # the OOM killer, a node gone
        info = wait_for_state(slurm_cluster, job, timeout=90)
    except (SlurmError, AssertionError):
        slurm_cluster.run("scancel", job, check=False)
        raise
    assert info["JobState"] == "FAILED", job_output(info)[-3000:]
    assert time.monotonic() - killed_at < 60
    assert info["Restarts"] == "0"  # a crash is not a preemption: no requeue
    deadline = time.monotonic() + 15
    while job in queued_job_ids(slurm_cluster) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert job not in queued_job_ids(slurm_cluster)
    assert wait_dead(pids[0], 15), "the surviving worker outlived its job"
