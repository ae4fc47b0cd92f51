"""Starts N multi-worker training processes on this machine, each with its own TF_CONFIG (no SLURM needed).

    python launch/local.py --num_workers 2 -- python train_unet.py --config run.yaml \\
        --output_dir runs/mw --distribution multi_worker

Each worker gets TF_CONFIG = {"cluster": {"worker": ["127.0.0.1:P0", ...]}, "task": {"type": "worker",
"index": i}} with free loopback ports (or --port_base P: P, P+1, ...), runs in its own process group,
and its output lines are printed with a "[rank i] " prefix (stdout to stdout, stderr to stderr).

A MultiWorkerMirroredStrategy worker whose peers are gone blocks forever, and TensorFlow catches
SIGTERM, so the launcher bounds everything:

* a worker that exits non-zero ends the run: the others get SIGTERM, then SIGKILL after
  --grace_seconds; the launcher exits with that worker's code;
* a worker that exits 75 (checkpoint written after SIGTERM/SIGUSR1) gives the others --grace_seconds
  to do the same; 75 from every worker -> the launcher exits 75 (rerun the command to resume);
* --timeout seconds after the start every worker is stopped the same way and the launcher exits 124;
* SIGINT/SIGTERM to the launcher -> SIGTERM to every worker (they checkpoint and exit 75), SIGKILL to
  what is left after --grace_seconds; SIGUSR1 is forwarded as it is.

Exit codes: 0 all workers succeeded; 75 preempted (all checkpointed); 124 timeout; else the first
failing worker's code (128 + N for a worker killed by signal N); 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/local.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from enki_seg.exit_codes import BAD_INPUT, PREEMPTED  # noqa: E402

logger = logging.getLogger("launch.local")

#: as timeout(1): the run was stopped at --timeout
TIMEOUT_EXIT_CODE = 124
POLL_SECONDS = 0.05


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now (all sockets held open together, so no repeats)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def tf_config(workers: list[str], index: int) -> dict:
    """TF_CONFIG of worker `index` of a cluster of 'host:port' workers."""
    return {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}


def exit_code_of(returncode: int) -> int:
    """A Popen return code as a shell exit status (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class _Prefixer(threading.Thread):
    """Copies one pipe to `out` line by line, each line prefixed."""

    def __init__(self, pipe, out, prefix: bytes, lock: threading.Lock):
        super().__init__(daemon=True)
        self.pipe, self.out, self.prefix, self.lock = pipe, out, prefix, lock

    def run(self):
        with self.pipe:
            for line in iter(self.pipe.readline, b""):
                if not line.endswith(b"\n"):
                    line += b"\n"
                with self.lock:
                    self.out.write(self.prefix + line)
                    self.out.flush()


class LocalCluster:
    """N worker processes, each in its own process group; see the module docstring for the rules."""

    def __init__(self, command: list[str], num_workers: int, port_base: int | None = None,
                 grace_seconds: float = 10.0, timeout: float | None = None, host: str = "127.0.0.1"):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not command:
            raise ValueError("no worker command given")
        self.command = command
        self.num_workers = num_workers
        ports = free_ports(num_workers, host) if port_base is None else \
            [port_base + i for i in range(num_workers)]
        self.workers = [f"{host}:{port}" for port in ports]
        self.grace_seconds = grace_seconds
        self.timeout = timeout
        self.processes: list[subprocess.Popen] = []
        self.threads: list[_Prefixer] = []
        self.lock = threading.Lock()
        self.killed_by_us: set[int] = set()  # ranks this launcher SIGKILLed
        self.signal_received: int | None = None

    # -- process control

    def start(self) -> None:
        stdout = sys.stdout.buffer
        stderr = sys.stderr.buffer
        for rank in range(self.num_workers):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps(tf_config(self.workers, rank))
            env.setdefault("PYTHONUNBUFFERED", "1")  # lines as they are written, not at exit
            process = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            self.processes.append(process)
            prefix = f"[rank {rank}] ".encode()
            for pipe, out in ((process.stdout, stdout), (process.stderr, stderr)):
                thread = _Prefixer(pipe, out, prefix, self.lock)
                thread.start()
                self.threads.append(thread)
        logger.info("started %d worker(s) %s: %s", self.num_workers, self.workers, " ".join(self.command))

    def _signal_group(self, rank: int, sig: int) -> None:
        process = self.processes[rank]
        try:
            os.killpg(process.pid, sig)  # start_new_session: the group id is the worker's pid
        except (ProcessLookupError, PermissionError):
            pass

    def signal_all(self, sig: int) -> None:
        """Send `sig` to the process group of every worker still running."""
        for rank, process in enumerate(self.processes):
            if process.poll() is None:
                self._signal_group(rank, sig)

    def _wait_all(self, deadline: float) -> bool:
        """Wait until every worker has exited or `deadline` passed; True when all exited."""
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self.processes):
                return True
            time.sleep(POLL_SECONDS)
        return all(p.poll() is not None for p in self.processes)

    def stop(self, first_signal: int | None = signal.SIGTERM) -> None:
        """`first_signal` to the running workers, `grace_seconds` for them to exit, then SIGKILL."""
        if first_signal is not None:
            self.signal_all(first_signal)
        if self._wait_all(time.monotonic() + self.grace_seconds):
            return
        for rank, process in enumerate(self.processes):
            if process.poll() is None:
                logger.warning("rank %d (pid %d) still running after %.0f s: killing it", rank, process.pid,
                               self.grace_seconds)
                self.killed_by_us.add(rank)
                self._signal_group(rank, signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def _kill_group_leftovers(self) -> None:
        """A worker's own children may outlive it in its group; nothing of ours may stay behind."""
        for rank in range(len(self.processes)):
            self._signal_group(rank, signal.SIGKILL)

    # -- the run

    def _handle_signal(self, signum, frame):
        if signum == signal.SIGUSR1:
            logger.warning("received SIGUSR1: forwarding it to the workers")
            self.signal_all(signal.SIGUSR1)
            return
        if self.signal_received is None:
            logger.warning("received %s: stopping the workers (SIGTERM, then SIGKILL after %.0f s)",
                           signal.Signals(signum).name, self.grace_seconds)
        self.signal_received = signum

    def run(self) -> int:
        """Start, supervise and stop the workers; returns the launcher's exit code."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
        previous = {sig: signal.signal(sig, self._handle_signal) for sig in handled}
        try:
            self.start()
            return self._supervise()
        finally:
            if self.processes:
                if any(p.poll() is None for p in self.processes):
                    self.stop()
                self._kill_group_leftovers()
            for thread in self.threads:
                thread.join(timeout=5)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _supervise(self) -> int:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            codes = [p.poll() for p in self.processes]
            if self.signal_received is not None:
                self.stop(signal.SIGTERM)
                return self._code_after_signal()
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0, PREEMPTED)]
            if failed:
                rank, code = failed[0]
                logger.error("rank %d exited with code %d: stopping the other workers", rank, exit_code_of(code))
                self.stop(signal.SIGTERM)
                return exit_code_of(code)
            if all(c is not None for c in codes):
                return PREEMPTED if PREEMPTED in codes else 0
            if PREEMPTED in codes:
                # a worker checkpointed after a signal; the others should follow within the grace period
                logger.warning("a worker exited %d (preempted); waiting up to %.0f s for the others",
                               PREEMPTED, self.grace_seconds)
                self.stop(first_signal=None if self._wait_all(time.monotonic() + self.grace_seconds)
                          else signal.SIGTERM)
                codes = [p.returncode for p in self.processes]
                bad = [c for rank, c in enumerate(codes) if c not in (0, PREEMPTED)
                       and rank not in self.killed_by_us]
                return exit_code_of(bad[0]) if bad else PREEMPTED
            if deadline is not None and time.monotonic() >= deadline:
                logger.error("timeout after %.0f s: stopping the workers", self.timeout)
                self.stop(signal.SIGTERM)
                return TIMEOUT_EXIT_CODE
            time.sleep(POLL_SECONDS)

    def _code_after_signal(self) -> int:
        codes = [p.returncode for p in self.processes]
        if all(c == PREEMPTED for c in codes):
            return PREEMPTED
        own = [c for rank, c in enumerate(codes) if rank not in self.killed_by_us
               and c not in (0, PREEMPTED, -signal.SIGTERM, -signal.SIGINT)]
        return exit_code_of(own[0]) if own else 128 + int(self.signal_received)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/local.py", description=__doc__.splitlines()[0],
                                usage="%(prog)s --num_workers N [options] -- COMMAND [ARGS...]")
    p.add_argument("--num_workers", type=int, required=True, help="worker processes to start")
    p.add_argument("--port_base", type=int, help="ports P, P+1, ... (default: free ports picked now)")
    p.add_argument("--grace_seconds", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping workers (default 10)")
    p.add_argument("--timeout", type=float, help="stop everything after this many seconds (exit 124)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the worker command, after --")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("no worker command given (put it after --)")
    if args.num_workers < 1:
        p.error("--num_workers must be >= 1")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[launcher] %(asctime)s %(levelname)s: %(message)s")
    args = parse_args(argv)
    cluster = LocalCluster(args.command, args.num_workers, port_base=args.port_base,
                           grace_seconds=args.grace_seconds, timeout=args.timeout)
    try:
        code = cluster.run()
    except OSError as exc:  # e.g. the command does not exist
        logger.error("cannot start the workers: %s", exc)
        return BAD_INPUT
    logger.info("exit code %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
