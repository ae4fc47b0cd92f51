"""Runs one task of an srun step: passes SIGTERM/SIGUSR1/SIGINT on to the command and records its exit code.

    srun --kill-on-bad-exit=1 python launch/task.py --exit_dir RUN/launch/JOB-0/exit_codes -- \\
        python train_unet.py ...

srun reports only the highest exit code of a step's tasks, and with --kill-on-bad-exit the first task
to exit non-zero gets the others terminated (SIGTERM, then SIGKILL after KillWait): when one worker fails
with code 1 the step says 143. So each task writes its command's own exit code to
EXIT_DIR/task-<SLURM_PROCID>.code (no file: the task was killed), and launch/common.sh decides from those.

Exit 75 (checkpoint written, requeue me) is reported to srun as 0: the workers agree to stop together, but
the first one to exit must not get the others killed while the chief is still writing its checkpoint.
Every other code is passed on (128 + N when the command was killed by signal N). Stdlib only.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: enki_seg/exit_codes.py's PREEMPTED, written out: this file is stdlib only (tests/test_launch.py checks it)
PREEMPTED_EXIT_CODE = 75


def record_exit_code(exit_dir: Path, rank: str, code: int) -> None:
    exit_dir.mkdir(parents=True, exist_ok=True)
    tmp = exit_dir / f".task-{rank}.code.tmp"
    tmp.write_text(f"{code}\n")
    os.replace(tmp, exit_dir / f"task-{rank}.code")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/task.py", description=__doc__.splitlines()[0],
                                usage="%(prog)s --exit_dir DIR -- COMMAND [ARGS...]")
    p.add_argument("--exit_dir", required=True, help="folder for task-<SLURM_PROCID>.code")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("no command given (put it after --)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = os.environ.get("SLURM_PROCID", "0")
    child = None

    def forward(signum, frame):
        # slurmstepd may signal every process of the task, so the command can get a signal twice; the
        # trainers' handlers only set a flag, which makes that harmless
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(args.command)
    except OSError as exc:
        print(f"launch/task.py: cannot start {args.command[0]}: {exc}", file=sys.stderr)
        record_exit_code(Path(args.exit_dir), rank, 127)
        return 127
    returncode = child.wait()
    # the command is done: a late copy of the signal (slurmstepd signals every process of the task, and
    # the command may exit 75 before the second copy lands) must not kill this process with 128 + N
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_IGN)
    code = 128 - returncode if returncode < 0 else returncode
    record_exit_code(Path(args.exit_dir), rank, code)
    return 0 if code == PREEMPTED_EXIT_CODE else code


if __name__ == "__main__":
    sys.exit(main())
