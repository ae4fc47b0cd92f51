"""The exit codes of every CLI, defined once. ``launch/common.sh`` and ``launch/local.py`` read them
from here (``python -m enki_seg.exit_codes`` prints them as shell assignments)."""
from __future__ import annotations

import sys

OK = 0
#: some inputs failed (each reported in one line), the others were processed
FAILED = 1
#: bad input or settings, found before any work: one line names the file or flag and the fix
BAD_INPUT = 2
#: the training loss became NaN/inf; the last good checkpoint is kept
NAN_LOSS = 3
#: SIGTERM/SIGUSR1: a checkpoint was written; requeue and run the same command to resume (EX_TEMPFAIL)
PREEMPTED = 75


def shell_assignments() -> str:
    return "\n".join(f"ENKI_EXIT_{name}={value}" for name, value in
                     (("OK", OK), ("FAILED", FAILED), ("BAD_INPUT", BAD_INPUT), ("NAN_LOSS", NAN_LOSS),
                      ("PREEMPTED", PREEMPTED)))


if __name__ == "__main__":
    print(shell_assignments())
    sys.exit(0)
