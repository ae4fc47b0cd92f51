"""The launch layer: TF_CONFIG from SLURM variables, the local multi-worker launcher, the sbatch scripts.

Tests marked `slurm` submit real jobs to a private single-node cluster that scripts/slurm_cluster.sh
starts once per session (installing slurm-wlm with apt-get when needed). Without one they are skipped,
unless ENKI_REQUIRE_SLURM=1 makes that a failure. Trainers are replaced by a stub script (ENKI_TRAINER),
so no test here imports TensorFlow; every subprocess has a timeout.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from enki_seg import exit_codes
from enki_seg.training import slurm as tfc
from launch import tf_config as tf_config_cli
from slurm_helpers import (Cluster, SlurmError, job_output, queued_job_ids, signal_batch_shell, submit,
                           wait_dead, wait_for_state, wait_for_text)

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

pytestmark = pytest.mark.timeout(300)
slurm = pytest.mark.slurm


@pytest.fixture
def cluster(slurm_cluster):
    """The session's private cluster (conftest.py): one for every module that submits jobs."""
    return slurm_cluster


def _environ_without_slurm() -> dict:
    """This process's environment minus SLURM's variables (the suite itself may run inside a job)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


# ----------------------------------------------------------------------------- TF_CONFIG from SLURM (launch/tf_config.py)


@pytest.mark.parametrize("hostlist, expected", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("localhost", ["localhost"]),
    ("a,b", ["a", "b"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[008-010]", ["node008", "node009", "node010"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("gpu-[1,3]-ib", ["gpu-1-ib", "gpu-3-ib"]),
])
def test_expand_hostlist(hostlist, expected):
    assert tfc.expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("bad", ["node[1-", "node1]", "node[3-1]", "node[a-b]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        tfc.expand_hostlist(bad)


def test_hostnames_falls_back_without_scontrol(monkeypatch):
    monkeypatch.setattr(tfc.shutil, "which", lambda name: None)
    assert tfc.hostnames("n[1-2]") == ["n1", "n2"]


def test_hostnames_agree_with_scontrol(tmp_path):
    """scontrol's expansion (it needs a slurm.conf, not a running controller) matches ours."""
    if not tfc.shutil.which("scontrol"):
        pytest.skip("scontrol is not installed")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost\n")
    os.environ["SLURM_CONF"], saved = str(conf), os.environ.get("SLURM_CONF")
    try:
        for hostlist in ("node[01-03,07],gpu5", "node[8-11]", "r[1-2]n[1-2]"):
            assert tfc.scontrol_hostnames(hostlist) == tfc.expand_hostlist(hostlist), hostlist
    finally:
        if saved is None:
            del os.environ["SLURM_CONF"]
        else:
            os.environ["SLURM_CONF"] = saved


@pytest.mark.parametrize("text, expected", [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1(x2)", [1, 1]),
                                            ("3,2(x2)", [3, 2, 2])])
def test_parse_tasks_per_node(text, expected):
    assert tfc.parse_tasks_per_node(text) == expected


def test_parse_tasks_per_node_rejects_malformed():
    with pytest.raises(ValueError):
        tfc.parse_tasks_per_node("2(3)")


def _step_env(procid, nodelist="node[01-02]", tasks_per_node="1(x2)", num_tasks=2, **extra):
    return {"SLURM_JOB_ID": "1234", "SLURM_PROCID": str(procid), "SLURM_STEP_NUM_TASKS": str(num_tasks),
            "SLURM_STEP_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, **extra}


@pytest.mark.parametrize("procid", [0, 1])
def test_tf_config_two_nodes(procid):
    port = 12000 + 10 * 1234
    env = _step_env(procid, SLURM_NODEID=str(procid), SLURM_LOCALID="0")
    config = tfc.tf_config_from_slurm(env, use_scontrol=False)
    assert config == {"cluster": {"worker": [f"node01:{port}", f"node02:{port}"]},
                      "task": {"type": "worker", "index": procid}}


def test_tf_config_several_tasks_per_node_block_and_cyclic():
    env = _step_env(3, nodelist="n[1-2]", tasks_per_node="2(x2)", num_tasks=4, ENKI_PORT="30000")
    block = tfc.tf_config_from_slurm(env, use_scontrol=False)
    assert block["cluster"]["worker"] == ["n1:30000", "n1:30001", "n2:30000", "n2:30001"]
    assert block["task"]["index"] == 3
    cyclic = tfc.tf_config_from_slurm({**env, "SLURM_DISTRIBUTION": "cyclic"}, use_scontrol=False)
    assert cyclic["cluster"]["worker"] == ["n1:30000", "n2:30000", "n1:30001", "n2:30001"]
    explicit = tfc.tf_config_from_slurm(env, base_port=40000, use_scontrol=False)
    assert explicit["cluster"]["worker"][0] == "n1:40000"


def test_tf_config_ports_of_neighbouring_jobs_do_not_collide():
    ports = [tfc.default_base_port({"SLURM_JOB_ID": str(job)}) for job in range(500, 510)]
    ranges = [set(range(p, p + tfc.PORT_STRIDE)) for p in ports]
    assert all(not (a & b) for i, a in enumerate(ranges) for b in ranges[i + 1:])
    assert all(1024 < p < 32768 - tfc.PORT_STRIDE for p in ports)


@pytest.mark.parametrize("env", [
    {},
    {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"},  # batch shell
    _step_env(0, nodelist="a", tasks_per_node="1", num_tasks=1),
], ids=["no-slurm", "batch-shell", "single-task-step"])
def test_tf_config_none_outside_a_multi_task_step(env):
    assert tfc.tf_config_from_slurm(env, use_scontrol=False) is None


def test_tf_config_rejects_inconsistent_layout():
    with pytest.raises(ValueError, match="sums to"):
        tfc.tf_config_from_slurm(_step_env(0, tasks_per_node="2(x2)"), use_scontrol=False)
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        tfc.tf_config_from_slurm(_step_env(0, SLURM_NODEID="1", SLURM_LOCALID="0"), use_scontrol=False)


def test_tf_config_cli(monkeypatch, capsys):
    assert tf_config_cli.main(["--hostnames", "n[1-2]", "--no_scontrol"]) == 0
    assert capsys.readouterr().out.split() == ["n1", "n2"]
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert tf_config_cli.main([]) == 1
    for key, value in _step_env(1, ENKI_PORT="23000").items():
        monkeypatch.setenv(key, value)
    assert tf_config_cli.main(["--no_scontrol"]) == 0
    assert json.loads(capsys.readouterr().out)["cluster"]["worker"] == ["node01:23000", "node02:23000"]


# ----------------------------------------------------------------------------- launch/local.py

# reads TF_CONFIG like a trainer; behaviour by rank from WORKER_MODE
WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    config = json.loads(os.environ["TF_CONFIG"])
    rank = config["task"]["index"]
    mode = os.environ.get("WORKER_MODE", "ok")
    pid_dir = os.environ.get("PID_DIR")
    if pid_dir:
        open(os.path.join(pid_dir, f"{rank}.pid"), "w").write(str(os.getpid()))
    print(f"hello from {rank} of {len(config['cluster']['worker'])} at {config['cluster']['worker'][rank]}",
          flush=True)
    print(f"err line {rank}", file=sys.stderr, flush=True)
    if mode == "ok":
        sys.exit(0)
    if mode == "one_fails":
        if rank == 1:
            time.sleep(0.3)
            sys.exit(1)
        time.sleep(600)
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if rank == 1:
            time.sleep(0.3)
            sys.exit(5)
        time.sleep(600)
    if mode in ("checkpoint_on_term", "sleep"):
        if mode == "checkpoint_on_term":
            def preempted(signum, frame):
                print(f"rank {rank} checkpointing after signal {signum}", flush=True)
                sys.exit(75)
            signal.signal(signal.SIGTERM, preempted)
            signal.signal(signal.SIGUSR1, preempted)
        print("ready", flush=True)
        time.sleep(600)
""")


def _launch(tmp_path, *launcher_args, mode="ok", timeout=60, **popen):
    env = {**_environ_without_slurm(), "WORKER_MODE": mode, "PID_DIR": str(tmp_path)}
    command = [sys.executable, str(LAUNCH / "local.py"), *launcher_args, "--", sys.executable, "-c", WORKER]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def _worker_pids(tmp_path, count):
    return [int((tmp_path / f"{rank}.pid").read_text()) for rank in range(count)]


def test_local_all_succeed(tmp_path):
    result = _launch(tmp_path, "--num_workers", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(lines) == sorted(line for line in lines if line.startswith("[rank "))
    addresses = set()
    for rank in range(3):
        line = next(line for line in lines if line.startswith(f"[rank {rank}] hello from {rank} of 3"))
        addresses.add(line.rsplit(" at ", 1)[1])
        assert f"[rank {rank}] err line {rank}" in result.stderr
    assert len(addresses) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)


def test_local_port_base(tmp_path):
    result = _launch(tmp_path, "--num_workers", "2", "--port_base", "23456")
    assert result.returncode == 0, result.stderr
    assert "[rank 1] hello from 1 of 2 at 127.0.0.1:23457" in result.stdout


def test_local_failing_worker_stops_the_others(tmp_path):
    started = time.monotonic()
    result = _launch(tmp_path, "--num_workers", "2", "--grace_seconds", "5", mode="one_fails")
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert elapsed < 5, f"took {elapsed:.1f} s: the sleeper was not stopped by SIGTERM"
    sleeper = _worker_pids(tmp_path, 2)[0]
    assert wait_dead(sleeper, 2), f"rank 0 (pid {sleeper}) still runs"
    assert "rank 1 exited with code 1" in result.stderr


def test_local_worker_ignoring_sigterm_is_killed(tmp_path):
    started = time.monotonic()
    result = _launch(tmp_path, "--num_workers", "2", "--grace_seconds", "1.5", mode="ignore_term")
    elapsed = time.monotonic() - started
    assert result.returncode == 5, result.stderr
    assert 1.5 <= elapsed < 8, elapsed
    assert "still running after" in result.stderr
    assert wait_dead(_worker_pids(tmp_path, 2)[0], 2)


def test_local_timeout(tmp_path):
    started = time.monotonic()
    result = _launch(tmp_path, "--num_workers", "2", "--timeout", "1", "--grace_seconds", "2", mode="sleep")
    assert result.returncode == 124, result.stderr
    assert time.monotonic() - started < 6
    assert all(wait_dead(pid, 2) for pid in _worker_pids(tmp_path, 2))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_local_signal_reaches_the_workers(tmp_path, sig):
    """SIGTERM/SIGINT/SIGUSR1 to the launcher: every worker checkpoints and exits 75 -> the launcher exits 75."""
    env = {**_environ_without_slurm(), "WORKER_MODE": "checkpoint_on_term", "PID_DIR": str(tmp_path)}
    command = [sys.executable, str(LAUNCH / "local.py"), "--num_workers", "2", "--grace_seconds", "5", "--",
               sys.executable, "-c", WORKER]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        ready = 0
        deadline = time.monotonic() + 30
        while ready < 2 and time.monotonic() < deadline:
            line = launcher.stdout.readline()
            ready += line.endswith("] ready\n")
        assert ready == 2, "the workers did not start"
        launcher.send_signal(sig)
        out, err = launcher.communicate(timeout=20)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=10)
    assert launcher.returncode == 75, err
    forwarded = signal.SIGUSR1 if sig == signal.SIGUSR1 else signal.SIGTERM
    for rank in range(2):
        assert f"[rank {rank}] rank {rank} checkpointing after signal {int(forwarded)}" in out


def test_local_rejects_missing_command(tmp_path):
    result = subprocess.run([sys.executable, str(LAUNCH / "local.py"), "--num_workers", "2"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "no worker command" in result.stderr


# ----------------------------------------------------------------------------- sbatch scripts, no SLURM

# stands in for train_unet.py / train_maskrcnn.py: records its call, behaves by STUB_MODE
STUB_TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    sys.path.insert(0, os.environ["ENKI_HOME"])
    from enki_seg.training.slurm import tf_config_from_slurm

    argv = sys.argv[1:]
    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    out = flags["--output_dir"]
    os.makedirs(out, exist_ok=True)
    rank = int(os.environ.get("SLURM_PROCID", 0))
    databases = {k: os.path.isdir(v) for k, v in flags.items() if k.endswith("_database")}
    record = {"argv": argv, "rank": rank, "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
              "tf_config": tf_config_from_slurm(), "databases_exist": databases, "pid": os.getpid()}
    with open(os.path.join(out, "calls.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\\n")
    mode = os.environ.get("STUB_MODE", "ok")
    marker = os.path.join(out, f"marker-{rank}")
    if mode.startswith("exit:"):
        sys.exit(int(mode[5:]))
    if mode == "requeue_once":
        if not os.path.exists(marker):
            open(marker, "w").close()
            print(f"stub rank {rank}: preempted", flush=True)
            sys.exit(75)
        print(f"stub rank {rank}: finished", flush=True)
    if mode == "usr1_once" and not os.path.exists(marker):
        def preempted(signum, frame):
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as the trainers: a second copy must not kill us
            open(marker, "w").close()
            print(f"stub rank {rank}: got signal {signum}, checkpoint written", flush=True)
            sys.exit(75)
        signal.signal(signal.SIGUSR1, preempted)
        print(f"stub ready rank {rank}", flush=True)
        time.sleep(120)
        sys.exit(9)
    if mode == "crash":
        if rank == 1:
            time.sleep(1)
            print("stub rank 1: crashing", flush=True)
            sys.exit(1)
        open(os.path.join(out, "sleeper.pid"), "w").write(str(os.getpid()))
        time.sleep(300)
    sys.exit(0)
""")


@pytest.fixture()
def stub_trainer(tmp_path):
    path = tmp_path / "stub_trainer.py"
    path.write_text(STUB_TRAINER)
    return path


def _calls(output_dir: Path) -> list[dict]:
    path = output_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run_script(script, args, env, timeout=60):
    env = {**_environ_without_slurm(), "ENKI_SNAPSHOT_GIT": "0", **env}
    env.pop("ENKI_HOME", None)
    return subprocess.run(["bash", str(LAUNCH / script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_train_script_without_slurm_propagates_exit_codes(tmp_path, stub_trainer):
    config = tmp_path / "run.yaml"
    config.write_text("number_classes: 2\n")
    for code in (0, 2, 3):
        out = tmp_path / f"run{code}"
        result = _run_script("train_unet.sbatch", [config, out, "--max_steps", "5"],
                             {"ENKI_TRAINER": str(stub_trainer), "STUB_MODE": f"exit:{code}"})
        assert result.returncode == code, result.stderr
        [call] = _calls(out)
        assert call["argv"] == ["--config", str(config), "--output_dir", str(out), "--max_steps", "5"]
        assert call["tf_config"] is None
    assert _run_script("train_unet.sbatch", [config], {"ENKI_TRAINER": str(stub_trainer)}).returncode == 2
    assert _run_script("train_unet.sbatch", [tmp_path / "missing.yaml", tmp_path / "x"],
                       {"ENKI_TRAINER": str(stub_trainer)}).returncode == 2


def test_train_script_without_slurm_scratch_copy_and_preemption(tmp_path, stub_trainer):
    """Outside SLURM exit 75 is passed on (rerun to resume); scratch copies replace the databases and go at exit."""
    train, test = tmp_path / "data" / "train-x.lmdb", tmp_path / "data" / "test-x.lmdb"
    for db in (train, test):
        db.mkdir(parents=True)
        (db / "data.mdb").write_bytes(b"x" * 100)
    config = tmp_path / "run.yaml"
    config.write_text(f"train_database: {train}\nreader_count: 2\n")  # the train LMDB comes from the config
    out, scratch = tmp_path / "run", tmp_path / "scratch"
    env = {"ENKI_TRAINER": str(stub_trainer), "STUB_MODE": "requeue_once", "ENKI_COPY_TO_SCRATCH": "1",
           "ENKI_SCRATCH": str(scratch), "SLURM_CPUS_PER_TASK": "4"}
    first = _run_script("train_unet.sbatch", [config, out, f"--test_database={test}"], env)
    assert first.returncode == 75, first.stderr
    assert "rerun the same command to resume" in first.stderr
    second = _run_script("train_unet.sbatch", [config, out, f"--test_database={test}"], env)
    assert second.returncode == 0, second.stderr
    calls = _calls(out)
    assert len(calls) == 2
    for call in calls:
        flags = dict(zip(call["argv"][::2], call["argv"][1::2]))
        assert flags["--train_database"].startswith(str(scratch)) and flags["--train_database"].endswith("train-x.lmdb")
        assert flags["--test_database"].startswith(str(scratch)) and flags["--test_database"].endswith("test-x.lmdb")
        assert call["databases_exist"] == {"--train_database": True, "--test_database": True}
        assert "--reader_count" not in flags  # the config sets it
    assert not any(scratch.iterdir()), "the scratch copies were not removed"
    records = sorted((out / "launch").iterdir())
    assert len(records) == 2
    for record in records:
        assert (record / "run.yaml").read_text() == config.read_text()
        assert (record / "git_describe.txt").read_text().strip() == "unknown"
        assert "stub_trainer.py" in (record / "command.txt").read_text()


def test_train_script_sigterm_to_the_shell_checkpoints(tmp_path, stub_trainer):
    """SIGTERM to the batch shell (a preemption, `scancel --batch --signal=TERM`) is passed on as SIGUSR1
    (srun would turn SIGTERM into SIGKILL of its tasks); the shell waits for the checkpoint: exit 75."""
    config = tmp_path / "run.yaml"
    config.write_text("number_classes: 2\n")
    out = tmp_path / "run"
    env = {**_environ_without_slurm(), "ENKI_SNAPSHOT_GIT": "0", "ENKI_TRAINER": str(stub_trainer),
           "STUB_MODE": "usr1_once"}
    env.pop("ENKI_HOME", None)
    shell = subprocess.Popen(["bash", str(LAUNCH / "train_unet.sbatch"), str(config), str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert shell.stdout.readline().strip() == "stub ready rank 0"
        shell.send_signal(signal.SIGTERM)
        stdout, stderr = shell.communicate(timeout=30)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.communicate(timeout=10)
    assert shell.returncode == 75, stderr
    assert f"got signal {int(signal.SIGUSR1)}, checkpoint written" in stdout
    assert "received SIGTERM: forwarding SIGUSR1" in stderr


def test_build_lmdb_script_without_slurm_sets_workers(tmp_path):
    result = _run_script("build_lmdb.sbatch", ["--help"], {"SLURM_CPUS_PER_TASK": "3"})
    assert result.returncode == 0, result.stderr
    assert "--workers 3" in result.stderr


@pytest.mark.parametrize("codes, srun_code, expected", [
    ({0: 75, 1: 143}, 143, 75),   # one worker checkpointed, the other was terminated by srun: requeue
    ({0: 143, 1: 1}, 143, 1),     # a worker crashed and the other was terminated: the crash's code
    ({0: 3, 1: 75}, 75, 3),       # NaN on one worker beats a checkpoint on another
    ({0: 0, 1: 0}, 0, 0),
    ({0: 75}, 137, 75),           # rank 1 SIGKILLed before it could record anything
    ({0: 75, 1: 75}, 0, 75),      # launch/task.py reports 75 to srun as 0
    ({}, 137, 137),
])
def test_step_code_from_task_records(tmp_path, codes, srun_code, expected):
    exit_dir = tmp_path / "exit_codes"
    exit_dir.mkdir()
    for rank, code in codes.items():
        (exit_dir / f"task-{rank}.code").write_text(f"{code}\n")
    script = f'source "{LAUNCH}/common.sh"; enki_step_code {srun_code} "{exit_dir}"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == str(expected), result.stderr



def test_shell_exit_codes_agree_with_enki_seg():
    """launch/common.sh writes its exit codes as literals (it is sourced before the environment with
    Python is activated): they must stay enki_seg.exit_codes' values."""
    script = f'source "{LAUNCH}/common.sh"; echo "$ENKI_PREEMPTED_EXIT_CODE"; enki_die "bad input"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == str(exit_codes.PREEMPTED), result.stderr
    assert result.returncode == exit_codes.BAD_INPUT and "error: bad input" in result.stderr
    from launch import task
    assert task.PREEMPTED_EXIT_CODE == exit_codes.PREEMPTED

def test_task_wrapper_records_code_and_forwards_signals(tmp_path):
    exit_dir = tmp_path / "codes"
    env = {**_environ_without_slurm(), "SLURM_PROCID": "3"}
    quick = subprocess.run([sys.executable, str(LAUNCH / "task.py"), "--exit_dir", str(exit_dir), "--",
                            sys.executable, "-c", "raise SystemExit(7)"], env=env, timeout=30)
    assert quick.returncode == 7 and (exit_dir / "task-3.code").read_text() == "7\n"
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGUSR1, lambda s, f: sys.exit(75))\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    wrapper = subprocess.Popen([sys.executable, str(LAUNCH / "task.py"), "--exit_dir", str(exit_dir), "--",
                                sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert wrapper.stdout.readline().strip() == "ready"
        wrapper.send_signal(signal.SIGUSR1)
        # 75 is reported to srun as 0, so --kill-on-bad-exit does not kill a chief still checkpointing
        assert wrapper.wait(timeout=20) == 0
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait(timeout=10)
    assert (exit_dir / "task-3.code").read_text() == "75\n"


# ----------------------------------------------------------------------------- real SLURM


@slurm
def test_cluster_start_is_idempotent_and_status_works(cluster: Cluster):
    script = ROOT / "scripts" / "slurm_cluster.sh"
    started = time.monotonic()
    again = subprocess.run(["bash", str(script), "start", str(cluster.state_dir)], env=cluster.env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr and again.stdout.strip() == f"export SLURM_CONF={cluster.env['SLURM_CONF']}"
    assert time.monotonic() - started < 10
    status = subprocess.run(["bash", str(script), "status", str(cluster.state_dir)], env=cluster.env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "debug*" in status.stdout, status.stderr


@slurm
def test_build_lmdb_job(cluster: Cluster, tmp_path):
    data, lmdb = tmp_path / "data", tmp_path / "lmdb"
    subprocess.run([sys.executable, "-m", "enki_seg.data.demo", "--output_folder", str(data), "--count", "5",
                    "--height", "96", "--width", "96", "--coco", "0", "--num_workers", "1"],
                   check=True, capture_output=True, timeout=120, cwd=ROOT)
    job = submit(cluster, LAUNCH / "build_lmdb.sbatch",
                 ["--image_folder", data / "images", "--mask_folder", data / "masks", "--output_folder", lmdb,
                  "--dataset_name", "t", "--image_format", "tif", "--number_classes", "3", "--quiet"],
                 sbatch_args=["--cpus-per-task=2"], output=tmp_path / "job.out")
    info = wait_for_state(cluster, job, timeout=180)
    assert info["JobState"] == "COMPLETED", job_output(info)
    assert (lmdb / "train-t.lmdb").is_dir() and (lmdb / "test-t.lmdb").is_dir()
    assert "--workers 2" in job_output(info)


@slurm
def test_train_job_requeued_once_on_exit_75(cluster: Cluster, tmp_path, stub_trainer):
    """The trainer exits 75 (checkpoint written): the job requeues itself, runs again, completes."""
    config = tmp_path / "run.yaml"
    config.write_text("number_classes: 2\n")
    out = tmp_path / "run"
    train = tmp_path / "train.lmdb"
    train.mkdir()
    job = submit(cluster, LAUNCH / "train_unet.sbatch", [config, out, "--train_database", train],
                 sbatch_args=["--cpus-per-task=2"], output=tmp_path / "job.out",
                 env={"ENKI_TRAINER": str(stub_trainer), "STUB_MODE": "requeue_once", "ENKI_SNAPSHOT_GIT": "0",
                      "ENKI_COPY_TO_SCRATCH": "1", "ENKI_SCRATCH": str(tmp_path / "scratch")})
    info = wait_for_state(cluster, job, timeout=120, min_restarts=1)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job_output(info)
    calls = _calls(out)
    assert [c["restart"] for c in calls] == [0, 1], job_output(info)
    for call in calls:
        flags = dict(zip(call["argv"][::2], call["argv"][1::2]))
        assert flags["--config"] == str(config) and flags["--reader_count"] == "1"
        assert flags["--train_database"] == str(tmp_path / "scratch" / f"enki-{job}" / "train" / "train.lmdb")
        assert "--distribution" not in flags
    assert sorted(p.name for p in (out / "launch").iterdir()) == [f"{job}-0", f"{job}-1"]
    assert "SLURM_JOB_ID=" + job in (out / "launch" / f"{job}-1" / "slurm_env.txt").read_text()
    assert not (tmp_path / "scratch" / f"enki-{job}").exists()
    text = job_output(info)
    assert "requeueing job" in text and "stub rank 0: finished" in text  # --open-mode=append kept both runs


@slurm
def test_multinode_job_usr1_checkpoint_and_requeue(cluster: Cluster, tmp_path, stub_trainer):
    """Two tasks on one node: each gets its own TF_CONFIG; SIGUSR1 to the batch shell (what
    --signal=B:USR1@... does) reaches both, they exit 75, the job requeues and then completes."""
    config = tmp_path / "run.yaml"
    config.write_text("number_classes: 2\n")
    out, output = tmp_path / "run", tmp_path / "job.out"
    job = submit(cluster, LAUNCH / "train_unet_multinode.sbatch", [config, out],
                 sbatch_args=["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], output=output,
                 env={"ENKI_TRAINER": str(stub_trainer), "STUB_MODE": "usr1_once", "ENKI_SNAPSHOT_GIT": "0"})
    try:
        wait_for_text(output, "stub ready rank 0", timeout=60)
        wait_for_text(output, "stub ready rank 1", timeout=30)
        signal_batch_shell(cluster, job, "USR1")
        info = wait_for_state(cluster, job, timeout=120, min_restarts=1)
    except SlurmError:
        cluster.run("scancel", job, check=False)
        raise
    text = job_output(info)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert f"got signal {int(signal.SIGUSR1)}, checkpoint written" in text
    calls = _calls(out)
    assert sorted((c["restart"], c["rank"]) for c in calls) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for call in calls:
        assert call["argv"][-2:] == ["--distribution", "multi_worker"]
        workers = call["tf_config"]["cluster"]["worker"]
        assert len(set(workers)) == 2 and all(w.startswith("localhost:") for w in workers)
        assert call["tf_config"]["task"]["index"] == call["rank"]


@slurm
def test_job_with_crashing_task_fails_fast(cluster: Cluster, tmp_path, stub_trainer):
    """One of two tasks exits 1: srun --kill-on-bad-exit ends the other, the job is FAILED, nothing stays."""
    config = tmp_path / "run.yaml"
    config.write_text("number_classes: 2\n")
    out = tmp_path / "run"
    started = time.monotonic()
    job = submit(cluster, LAUNCH / "train_unet_multinode.sbatch", [config, out],
                 sbatch_args=["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], output=tmp_path / "job.out",
                 env={"ENKI_TRAINER": str(stub_trainer), "STUB_MODE": "crash", "ENKI_SNAPSHOT_GIT": "0"})
    try:
        info = wait_for_state(cluster, job, timeout=60)
    except SlurmError:
        cluster.run("scancel", job, check=False)
        raise
    elapsed = time.monotonic() - started
    # srun alone would say 143 (the terminated sleeper); launch/task.py's records give the crash's own code
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", job_output(info)
    assert elapsed < 30, f"the job took {elapsed:.0f} s to fail"
    deadline = time.monotonic() + 15
    while job in queued_job_ids(cluster) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert job not in queued_job_ids(cluster)
    sleeper = int((out / "sleeper.pid").read_text())
    assert wait_dead(sleeper, 10), f"the sleeping task (pid {sleeper}) outlived its job"
    assert info["Restarts"] == "0"
