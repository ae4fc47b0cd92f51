"""TF_CONFIG for MultiWorkerMirroredStrategy from the variables SLURM sets inside an srun step.

Stdlib only, so the trainers use it before TensorFlow is imported (``distribution.resolve_cluster``)
and ``python -m launch.tf_config`` prints it for shell scripts. TensorFlow's own
SlurmClusterResolver needs nvidia-smi and guesses GPU counts; this one only maps tasks to addresses:

* one worker per task of the step; the worker index is SLURM_PROCID;
* nodes from SLURM_STEP_NODELIST (SLURM_JOB_NODELIST outside a step), expanded by
  ``scontrol show hostnames`` when it exists, else by :func:`expand_hostlist`;
* tasks per node from SLURM_STEP_TASKS_PER_NODE (``2(x3),1`` = 2, 2, 2, 1), ranks laid out in
  block order (SLURM's default) or round robin when SLURM_DISTRIBUTION is cyclic;
* port = base port + the task's index on its node. The base port comes from ENKI_PORT when set,
  else from SLURM_JOB_ID (:func:`default_base_port`), so two jobs sharing a node do not collide.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping

#: Base ports are 12000 + 10 * (job id mod 2000): below Linux's ephemeral range (32768+) and 10 apart,
#: so jobs with neighbouring ids sharing a node do not collide while each has at most 10 tasks per node.
PORT_FLOOR = 12000
PORT_STRIDE = 10
PORT_SLOTS = 2000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str, hostlist: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'], keeping the zero padding of the lower bound."""
    values = []
    for item in body.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ValueError(f"bad range {item!r} in hostlist {hostlist!r}")
        low, high = match.group(1), match.group(2)
        if high is None:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in hostlist {hostlist!r}")
        width = len(low) if low.startswith("0") else 0
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM hostlist expression into host names, in order.

    'node[01-03,07],gpu5' -> ['node01', 'node02', 'node03', 'node07', 'gpu5'];
    several brackets in one name multiply out: 'r[1-2]n[1-2]' -> r1n1, r1n2, r2n1, r2n2.
    """
    hosts: list[str] = []
    for part in _split_top_level(hostlist):
        names = [""]
        for piece in re.split(r"(\[[^\]]*\])", part):
            if piece.startswith("["):
                choices = _expand_range_list(piece[1:-1], hostlist)
                names = [name + choice for name in names for choice in choices]
            elif piece:
                names = [name + piece for name in names]
        hosts.extend(names)
    return hosts


def scontrol_hostnames(hostlist: str, timeout: float = 10.0) -> list[str] | None:
    """`scontrol show hostnames` when scontrol exists and answers; None otherwise."""
    scontrol = shutil.which("scontrol")
    if not scontrol:
        return None
    try:
        result = subprocess.run([scontrol, "show", "hostnames", hostlist], capture_output=True, text=True,
                                timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = result.stdout.split()
    return hosts if result.returncode == 0 and hosts else None


def hostnames(hostlist: str, use_scontrol: bool = True) -> list[str]:
    """Host names of a hostlist: scontrol's expansion when available, else expand_hostlist's."""
    hosts = scontrol_hostnames(hostlist) if use_scontrol else None
    return hosts if hosts is not None else expand_hostlist(hostlist)


def parse_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE syntax: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"bad tasks-per-node item {item!r} in {text!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def default_base_port(env: Mapping[str, str] = os.environ) -> int:
    """ENKI_PORT when set, else a port derived from SLURM_JOB_ID (PORT_FLOOR when there is none)."""
    if env.get("ENKI_PORT"):
        port = int(env["ENKI_PORT"])
        if not 1024 <= port <= 65535:
            raise ValueError(f"ENKI_PORT={port} is not a usable port")
        return port
    job_id = int(env.get("SLURM_JOB_ID") or 0)
    return PORT_FLOOR + PORT_STRIDE * (job_id % PORT_SLOTS)


def worker_addresses(hosts: list[str], tasks_per_node: list[int], base_port: int,
                     cyclic: bool = False) -> list[str]:
    """'host:port' of every rank, rank order. Block layout: ranks 0..k-1 on the first node, and so on."""
    if len(hosts) != len(tasks_per_node):
        raise ValueError(f"{len(hosts)} nodes but tasks-per-node lists {len(tasks_per_node)}")
    placements: list[tuple[str, int]] = []  # (host, index of the task on that host), rank order
    if cyclic:
        used = [0] * len(hosts)
        while len(placements) < sum(tasks_per_node):
            for node, host in enumerate(hosts):
                if used[node] < tasks_per_node[node]:
                    placements.append((host, used[node]))
                    used[node] += 1
    else:
        for host, count in zip(hosts, tasks_per_node):
            placements.extend((host, local) for local in range(count))
    return [f"{host}:{base_port + local}" for host, local in placements]


def tf_config_from_slurm(env: Mapping[str, str] = os.environ, base_port: int | None = None,
                         use_scontrol: bool = True) -> dict | None:
    """TF_CONFIG dict for this task of a multi-task srun step; None outside one (or with one task).

    Raises ValueError when the variables are inconsistent (e.g. SLURM_PROCID beyond the task count,
    or this task's node/local index disagreeing with the computed layout).
    """
    num_tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 0)
    if "SLURM_PROCID" not in env or num_tasks <= 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    per_node_text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not nodelist or not per_node_text:
        raise ValueError("SLURM_STEP_NUM_TASKS > 1 but SLURM_STEP_NODELIST or SLURM_STEP_TASKS_PER_NODE is missing")
    hosts = hostnames(nodelist, use_scontrol=use_scontrol)
    tasks_per_node = parse_tasks_per_node(per_node_text)
    if sum(tasks_per_node) != num_tasks:
        raise ValueError(f"SLURM_STEP_TASKS_PER_NODE={per_node_text} sums to {sum(tasks_per_node)}, "
                         f"not SLURM_STEP_NUM_TASKS={num_tasks}")
    port = default_base_port(env) if base_port is None else base_port
    cyclic = env.get("SLURM_DISTRIBUTION", "").startswith("cyclic")
    workers = worker_addresses(hosts, tasks_per_node, port, cyclic=cyclic)
    rank = int(env["SLURM_PROCID"])
    if not 0 <= rank < len(workers):
        raise ValueError(f"SLURM_PROCID={rank} outside the {len(workers)} tasks of the step")
    if env.get("SLURM_LOCALID") is not None and env.get("SLURM_NODEID") is not None:
        expected = f"{hosts[int(env['SLURM_NODEID'])]}:{port + int(env['SLURM_LOCALID'])}"
        if workers[rank] != expected:
            raise ValueError(f"task {rank} is {expected} (SLURM_NODEID/SLURM_LOCALID) but the layout puts "
                             f"it at {workers[rank]}; use block or cyclic task distribution")
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}
