"""Drives the private SLURM cluster of scripts/slurm_cluster.sh from tests: start/stop, submit, wait, read output.

Every call is bounded by a timeout; waiting polls `scontrol show job -o ID` (``sbatch --wait`` polls
too coarsely). A typical test:

    job = submit(cluster, ROOT / "launch" / "build_lmdb.sbatch", ["--image_folder", ...],
                 sbatch_args=["--cpus-per-task=1"], output=tmp_path / "job.out")
    info = wait_for_state(cluster, job, timeout=120)
    assert info["JobState"] == "COMPLETED", job_output(info)
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"

#: States after which a job does not run again (unless requeued by hand).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE"})
_KEY = re.compile(r"^[A-Z][A-Za-z_:/]*=")  # scontrol's keys: JobState=, TRES=, ...


class SlurmError(RuntimeError):
    """A SLURM command failed or a job did not reach the expected state in time."""


@dataclass
class Cluster:
    """A running private cluster: its state folder and the environment its clients need."""

    state_dir: Path
    env: dict = field(default_factory=dict)
    started_here: bool = True

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def start_cluster(state_dir: Path, cpus: int = 4, timeout: float = 300) -> Cluster:
    """scripts/slurm_cluster.sh start in `state_dir`, on free ports; raises SlurmError on failure.

    `cpus` is what the node advertises (it may exceed the cores present), so that tests asking for a few
    CPUs per task schedule on any machine.
    """
    state_dir = Path(state_dir)
    ctld_port, slurmd_port = _free_ports(2)
    env = {**os.environ, "ENKI_SLURMCTLD_PORT": str(ctld_port), "ENKI_SLURMD_PORT": str(slurmd_port),
           "ENKI_SLURM_CPUS": str(cpus)}
    env.pop("SLURM_CONF", None)
    try:
        result = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(state_dir)], env=env,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_cluster(Cluster(state_dir, env))
        raise SlurmError(f"slurm_cluster.sh start did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        raise SlurmError(f"slurm_cluster.sh start failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    conf = state_dir / "slurm.conf"
    assert f"export SLURM_CONF={conf}" in result.stdout, result.stdout
    return Cluster(state_dir, {**env, "SLURM_CONF": str(conf)})


def stop_cluster(cluster: Cluster, timeout: float = 120) -> None:
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(cluster.state_dir)], env=cluster.env,
                   capture_output=True, text=True, timeout=timeout)


def submit(cluster: Cluster, script: Path | str, args=(), *, sbatch_args=(), output: Path | None = None,
           env: dict | None = None, cwd: Path | str = ROOT, timeout: float = 30) -> str:
    """sbatch SCRIPT ARGS; returns the job id. `env` is added to the cluster's environment (sbatch
    exports the submitter's environment to the job); `output` sets --output."""
    command = ["sbatch", "--parsable", *sbatch_args]
    if output is not None:
        command.append(f"--output={output}")
    command += [str(script), *map(str, args)]
    result = subprocess.run(command, env={**cluster.env, **(env or {})}, cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise SlurmError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def job_info(cluster: Cluster, job_id: str) -> dict:
    """`scontrol show job -o` as a dict (values may contain spaces: later words without '=' join the
    previous value); {} when the controller has forgotten the job."""
    result = cluster.run("scontrol", "show", "job", "-o", job_id, check=False, timeout=15)
    if result.returncode != 0:
        return {}
    info: dict = {}
    key = None
    for word in result.stdout.strip().split(" "):
        if _KEY.match(word):
            key, value = word.split("=", 1)
            info[key] = value
        elif key is not None:
            info[key] += " " + word
    return info


def wait_for_state(cluster: Cluster, job_id: str, states=FINAL_STATES, timeout: float = 120,
                   min_restarts: int = 0, poll: float = 0.3) -> dict:
    """Poll until the job's JobState is one of `states` (and it has been restarted `min_restarts`
    times); returns job_info. Raises SlurmError with the job's output on timeout."""
    states = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = job_info(cluster, job_id) or info
        if info.get("JobState") in states and int(info.get("Restarts", 0)) >= min_restarts:
            return info
        time.sleep(poll)
    raise SlurmError(f"job {job_id} not in {sorted(states)} (restarts >= {min_restarts}) after {timeout:.0f} s: "
                     f"JobState={info.get('JobState')} Reason={info.get('Reason')} "
                     f"Restarts={info.get('Restarts')}\n--- output ---\n{job_output(info)}")


def wait_for_text(path: Path, text: str, timeout: float = 60, poll: float = 0.2) -> str:
    """Wait until `path` exists and contains `text`; returns its content."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = Path(path).read_text(errors="replace") if Path(path).exists() else ""
        if text in content:
            return content
        time.sleep(poll)
    raise SlurmError(f"{text!r} did not appear in {path} within {timeout:.0f} s")


def job_output(info: dict) -> str:
    """The job's output file (StdOut), or a note when there is none."""
    path = info.get("StdOut")
    if not path:
        return "(no StdOut in the job info)"
    try:
        return Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def queued_job_ids(cluster: Cluster) -> list[str]:
    """Ids of the jobs squeue lists (pending, running or completing)."""
    return cluster.run("squeue", "-h", "-o", "%i", timeout=15).stdout.split()


def signal_batch_shell(cluster: Cluster, job_id: str, signal_name: str = "USR1") -> None:
    """What `#SBATCH --signal=B:USR1@...` does before the time limit, now."""
    cluster.run("scancel", "--batch", f"--signal={signal_name}", job_id)


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_dead(pid: int, timeout: float = 10) -> bool:
    """Wait until `pid` no longer runs; True when it is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def _daemon_pids(state_dir: Path) -> list[int]:
    pids = []
    for name in ("munged", "slurmctld", "slurmd"):
        try:
            pids.append(int((Path(state_dir) / "run" / f"{name}.pid").read_text()))
        except (OSError, ValueError):
            pass
    return pids


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private single-node SLURM cluster (4 CPUs advertised, partition `debug`) for the session.

    Skipped when it cannot start, unless ENKI_REQUIRE_SLURM=1 makes that a failure. Import it into a
    test module (`from slurm_helpers import slurm_cluster`), or into conftest.py to share one cluster
    between modules. At the end its jobs are cancelled and its daemons stopped.
    """
    state_dir = tmp_path_factory.mktemp("slurm")
    try:
        cluster = start_cluster(state_dir)
    except (SlurmError, OSError, subprocess.TimeoutExpired) as exc:
        if os.environ.get("ENKI_REQUIRE_SLURM") == "1":
            pytest.fail(f"ENKI_REQUIRE_SLURM=1 but the private SLURM cluster did not start: {exc}")
        pytest.skip(f"no private SLURM cluster (scripts/slurm_cluster.sh start failed): {exc}")
    daemons = _daemon_pids(state_dir)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
    alive = [pid for pid in daemons if not wait_dead(pid, 5)]
    assert not alive, f"SLURM daemons {alive} outlived scripts/slurm_cluster.sh stop"
