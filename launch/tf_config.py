"""Prints TF_CONFIG for MultiWorkerMirroredStrategy from the variables SLURM sets inside an srun step.

    srun --ntasks-per-node=1 python -m launch.tf_config          # prints this task's TF_CONFIG JSON
    python -m launch.tf_config --hostnames 'node[01-03,07],gpu5'  # node01 node02 node03 node07 gpu5

The layout rules (worker index = SLURM_PROCID, block or cyclic placement, ports from ENKI_PORT or
SLURM_JOB_ID) live in ``enki_seg.training.slurm``, which the trainers use directly.
"""
from __future__ import annotations

import argparse
import json
import sys

from enki_seg.training.slurm import hostnames, tf_config_from_slurm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch.tf_config", description=__doc__.splitlines()[0])
    p.add_argument("--hostnames", metavar="HOSTLIST", help="only expand this hostlist, one name per line")
    p.add_argument("--base_port", type=int, help="default: ENKI_PORT, else derived from SLURM_JOB_ID")
    p.add_argument("--no_scontrol", action="store_true", help="expand hostlists without scontrol")
    p.add_argument("--export", action="store_true", help="print `export TF_CONFIG='...'` for a shell")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.hostnames is not None:
            print("\n".join(hostnames(args.hostnames, use_scontrol=not args.no_scontrol)))
            return 0
        config = tf_config_from_slurm(base_port=args.base_port, use_scontrol=not args.no_scontrol)
    except ValueError as exc:
        print(f"launch.tf_config: {exc}", file=sys.stderr)
        return 2
    if config is None:
        print("launch.tf_config: not inside a multi-task srun step (SLURM_PROCID / SLURM_STEP_NUM_TASKS > 1)",
              file=sys.stderr)
        return 1
    text = json.dumps(config, separators=(",", ":"))
    print(f"export TF_CONFIG='{text}'" if args.export else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
