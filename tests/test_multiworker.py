"""Multi-worker training (MultiWorkerMirroredStrategy, 2 processes on loopback) through launch/local.py:
equal weights on every worker, chief-only outputs, USR1 -> checkpoint -> resume (also with a different
number of workers), a resume from the middle of a test interval equal to an uninterrupted run, and a dead
worker failing the whole run fast with nothing left running.

Every run is a subprocess tree bounded by the launcher's --timeout and the test's own timeout.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, build_blocks_db
from slurm_helpers import wait_dead

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # every test starts trainers

SMALL_UNET = ["--depth", "2", "--base_filters", "8", "--dropout", "0.0"]


@pytest.fixture(scope="module")
def blocks_db(tmp_path_factory):
    # 5 test records: the 2 workers' shards hold 3 and 2, so an unpadded test pass would give them 2 and
    # 1 batches of 2 (one worker an empty batch in the last collective step)
    return build_blocks_db(tmp_path_factory.mktemp("mw"), count=20, seed=1, train_fraction=0.75)


def trainer_args(lmdb: Path, out: Path, max_steps: int = 30) -> list[str]:
    return ["train_unet.py", "--train_database", str(lmdb / "train-b.lmdb"), "--test_database",
            str(lmdb / "test-b.lmdb"), "--output_dir", str(out), "--batch_size", "2", "--number_classes", "2",
            "--test_every_n_steps", "10", "--max_steps", str(max_steps), "--log_every", "2", "--seed", "0",
            *SMALL_UNET]


def launcher(num_workers: int, args: list[str], timeout: float = 240) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "local.py"), "--num_workers", str(num_workers),
            "--grace_seconds", "15", "--timeout", str(timeout), "--", sys.executable, *args,
            "--distribution", "multi_worker"]


ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def fingerprints(output: str) -> dict[str, str]:
    return dict(re.findall(r"\[rank (\d+)\].*model weights fingerprint (\w+)", output))


def children(pid: int) -> list[int]:
    """Direct children of pid (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def launched(command: list[str]):
    """A launcher run whose output is read line by line; its whole process group is SIGKILLed if the
    test leaves before it ended."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=ENV, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_line(proc: subprocess.Popen, pattern: str, deadline: float, lines: list[str]) -> None:
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if regex.search(line):
            return
    raise AssertionError(f"never saw {pattern!r}:\n{''.join(lines)[-3000:]}")


def test_two_workers_train_in_sync_and_only_the_chief_writes(blocks_db, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(launcher(2, trainer_args(blocks_db, out, max_steps=20)), capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=ENV)
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-4000:]
    prints = fingerprints(output)
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], prints
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["replicas"] == 2 and summary["steps"] == 20
    assert summary["weights_fingerprint"] == prints["0"]
    assert (out / "model.keras").is_file() and (out / "saved_model").is_dir()
    # the second worker's checkpoints went to a private folder that is gone now
    assert not list(out.glob(".worker-*")), list(out.iterdir())
    # both workers logged the same test results (decisions are agreed, data split in two shards)
    test_lines = re.findall(r"\[rank (\d)\].*test interval 2 \(step 20\): (.*?)  (?:best|no improvement)", output)
    assert len(test_lines) == 2 and test_lines[0][1] == test_lines[1][1], test_lines


def test_usr1_checkpoints_all_workers_and_resume_continues_with_one(blocks_db, tmp_path):
    out = tmp_path / "run"
    lines: list[str] = []
    with launched(launcher(2, trainer_args(blocks_db, out, max_steps=40))) as proc:
        wait_for_line(proc, r"\[rank 0\].*step 12 ", time.monotonic() + 200, lines)
        os.kill(proc.pid, signal.SIGUSR1)  # the launcher forwards it, as SLURM's --signal does
        rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 75, output[-4000:]
    state = json.loads((out / "checkpoints" / "trainer_state.json").read_text())
    assert 12 <= state["step"] < 40 and state["topology"]["workers"] == 2
    assert not (out / "model.keras").exists()
    # continue on one worker: allowed, with a warning that the data order differs from here on
    single = [sys.executable, *trainer_args(blocks_db, out, max_steps=40)]
    r = subprocess.run(single, capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr and "instead of 2 x 1" in r.stderr, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["workers"] == 1


def test_two_workers_stopped_mid_interval_resume_exactly(blocks_db, tmp_path):
    """Stopped at step 10, between the test intervals at 8 and 16, after the best interval (8; the learning
    rate of 0.05 after warm-up makes the later ones worse): the resumed run writes the same metrics.csv as an
    uninterrupted one and ends, on both workers, with the same best weights."""
    def args(out: Path) -> list[str]:
        return [*trainer_args(blocks_db, out, max_steps=24), "--test_every_n_steps", "8", "--deterministic", "1",
                "--early_stopping", "0", "--learning_rate", "0.05"]

    runs = {}
    for name in ("straight", "interrupted"):
        out = tmp_path / name
        # both workers send themselves SIGTERM after step 10 (a multiple of PREEMPTION_CHECK_STEPS: acted on there)
        env = {**ENV, "ENKI_TEST_SIGTERM_AT_STEP": "10"} if name == "interrupted" else ENV
        r = subprocess.run(launcher(2, args(out)), capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        output = r.stdout + r.stderr
        if name == "interrupted":
            assert r.returncode == 75, output[-4000:]
            state = json.loads((out / "checkpoints" / "trainer_state.json").read_text())
            assert state["step"] == 10 and len(state["interval_losses"]) == 2, state
            r = subprocess.run(launcher(2, args(out)), capture_output=True, text=True, timeout=300, cwd=ROOT,
                               env=ENV)
            output = r.stdout + r.stderr
            assert "resumed from" in output and "at step 10" in output, output[-4000:]
        assert r.returncode == 0, output[-4000:]
        summary = json.loads((out / "summary.json").read_text())
        runs[name] = (fingerprints(output), (out / "metrics.csv").read_text(), summary["best_step"])
    assert runs["straight"][2] == 8, "the best interval must come before the stop for this test to mean anything"
    assert runs["interrupted"][1] == runs["straight"][1], "metrics.csv differs after a mid-interval resume"
    assert runs["interrupted"][0] == runs["straight"][0] and len(set(runs["straight"][0].values())) == 1, runs


def test_a_dead_worker_fails_the_run_fast_and_leaves_nothing_running(blocks_db, tmp_path):
    out = tmp_path / "run"
    lines: list[str] = []
    with launched(launcher(2, trainer_args(blocks_db, out, max_steps=100000))) as proc:
        wait_for_line(proc, r"\[rank 1\].*step 4 ", time.monotonic() + 200, lines)
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        descendants = workers + [c for w in workers for c in children(w)]
        ranks = {json.loads(dict(line.split("=", 1) for line in Path(f"/proc/{w}/environ").read_text().split("\0")
                                 if "=" in line)["TF_CONFIG"])["task"]["index"]: w for w in workers}
        killed_at = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)  # an out-of-memory kill, a node gone
        rest, _ = proc.communicate(timeout=90)
        elapsed = time.monotonic() - killed_at
    output = "".join(lines) + rest
    assert proc.returncode not in (0, 75), output[-3000:]
    assert elapsed < 60, elapsed
    assert all(wait_dead(p, 20) for p in descendants), "worker or reader processes left running"
