"""Devices and distribution: TensorFlow's device setup, the multi-worker cluster this process belongs
to, and the one ``make_strategy``.

``--distribution``: ``mirrored`` = MirroredStrategy over the GPUs of this machine (or
``--cpu_replicas`` logical CPUs); ``multi_worker`` = MultiWorkerMirroredStrategy with one process per
node, the cluster taken from TF_CONFIG or, inside ``srun``, from SLURM's variables (``slurm.py``);
``auto`` (default) picks multi_worker when TF_CONFIG or a multi-task SLURM step is present.

TensorFlow is imported inside the functions that need it: resolving the cluster happens before it.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from enki_seg import cli
from enki_seg.training.errors import TrainError
from enki_seg.training.slurm import tf_config_from_slurm

logger = logging.getLogger(__name__)

DISTRIBUTIONS = ("auto", "mirrored", "multi_worker")


@dataclass
class Cluster:
    """Who this process is in a multi-worker run (one worker, index 0, when not distributed over nodes)."""

    num_workers: int = 1
    worker_index: int = 0

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    @property
    def multi_worker(self) -> bool:
        return self.num_workers > 1


def resolve_cluster(distribution: str, environ=os.environ) -> Cluster | None:
    """The multi-worker cluster this process belongs to, or None for a single-process run.

    Sets TF_CONFIG from SLURM's variables when running inside a multi-task ``srun`` step without one
    (TF's SlurmClusterResolver needs nvidia-smi and fails on CPU-only nodes).
    """
    if distribution == "mirrored":
        return None
    if not environ.get("TF_CONFIG"):
        tf_config = tf_config_from_slurm(environ)
        if tf_config is not None:
            environ["TF_CONFIG"] = json.dumps(tf_config)
    raw = environ.get("TF_CONFIG")
    if not raw:
        if distribution == "multi_worker":
            raise TrainError("--distribution multi_worker needs TF_CONFIG or a multi-task srun step "
                             "(start the workers with launch/local.py or srun)")
        return None
    try:
        tf_config = json.loads(raw)
        workers = tf_config["cluster"]["worker"]
        index = int(tf_config["task"]["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"TF_CONFIG is not valid ({exc!r}); it needs cluster.worker and task.index") from None
    if len(workers) < 2 and distribution == "auto":
        return None
    return Cluster(num_workers=len(workers), worker_index=index)


#: --precision choices; the policy names are Keras's
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")


def native_bfloat16() -> tuple[bool, str]:
    """(True, why) when this machine computes bfloat16 natively: every visible GPU of compute
    capability >= 8.0 (Ampere, Hopper), or, without GPUs, a CPU with AMX-BF16 or AVX512-BF16 (oneDNN
    uses them; elsewhere bfloat16 is emulated and slower than float32). Call before the first op."""
    tf = cli.import_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability") or (0, 0)
                        for g in gpus]
        ok = all(tuple(c) >= (8, 0) for c in capabilities)
        return ok, f"GPU compute capability {', '.join('.'.join(map(str, c)) for c in capabilities)}"
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return False, "CPU features unknown (no /proc/cpuinfo)"
    found = sorted(flags & {"amx_bf16", "avx512_bf16"})
    return bool(found), f"CPU {'has ' + ', '.join(found) if found else 'has neither amx_bf16 nor avx512_bf16'}"


def resolve_precision(precision: str, unsuited: str | None = None) -> tuple[str, str]:
    """--precision -> (Keras policy name, why); "auto" picks mixed_bfloat16 only where it is native and the
    model gains from it (``unsuited``: why this model would not, e.g. too small: casts dominate)."""
    if precision != "auto":
        return precision, "asked for"
    native, why = native_bfloat16()
    if not native:
        return "float32", f"auto: {why}, so bfloat16 would be emulated"
    if unsuited:
        return "float32", f"auto: {why}, but {unsuited}"
    return "mixed_bfloat16", f"auto: {why}"


def configure_devices(cpu_replicas: int = 0, deterministic: bool = False, seed: int = 0,
                      precision: str = "float32"):
    """Set up TensorFlow before its first op; returns the tensorflow module.

    cpu_replicas > 1 splits the CPU into that many logical devices (real MirroredStrategy without a
    GPU: tests and laptops). deterministic turns on TF op determinism and seeds Keras. precision is a
    Keras dtype policy name (``resolve_precision``): layers compute in it, variables, batch-norm
    statistics and the models' logits stay float32.
    """
    tf = cli.import_tensorflow()

    if cpu_replicas > 1:
        cpus = tf.config.list_physical_devices("CPU")
        current = tf.config.get_logical_device_configuration(cpus[0])
        if current is None or len(current) < cpu_replicas:  # set once per process, before the first op
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
    import keras

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(precision)
    return tf


def make_strategy(cluster: Cluster | None = None, cpu_replicas: int = 0, deterministic: bool = False,
                  seed: int = 0, precision: str = "float32"):
    """Configure TensorFlow and create the strategy, before any other TF op (MultiWorkerMirroredStrategy's
    rule); returns ``(tf, strategy)``.

    Several workers: MultiWorkerMirroredStrategy (each worker mirrors over its GPUs, or uses one CPU).
    One process: MirroredStrategy over the visible GPUs, else over ``cpu_replicas`` > 1 logical CPUs,
    else TensorFlow's default strategy.
    """
    if cluster is not None and cluster.multi_worker:
        if cpu_replicas > 1:
            logger.warning("--cpu_replicas is ignored with several workers: each worker uses its GPUs or one CPU")
        tf = configure_devices(0, deterministic, seed, precision)
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        logger.info("worker %d of %d: MultiWorkerMirroredStrategy with %d replica(s) in sync",
                    cluster.worker_index, cluster.num_workers, strategy.num_replicas_in_sync)
        return tf, strategy
    tf = configure_devices(cpu_replicas, deterministic, seed, precision)
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf, tf.distribute.MirroredStrategy([g.name for g in gpus])
    if cpu_replicas > 1:
        cpus = tf.config.list_logical_devices("CPU")[:cpu_replicas]
        return tf, tf.distribute.MirroredStrategy([c.name for c in cpus])
    return tf, tf.distribute.get_strategy()


def clip_summed_gradients(gradients: list, clip_norm: float, loss_scale=None) -> list:
    """Scale this replica's gradients so that their sum over replicas has global norm <= ``clip_norm``.

    Call in replica context, before ``optimizer.apply``: the optimizer sums the replicas' gradients, so
    every replica multiplies its own by the same factor ``min(1, clip_norm / ||sum||)``, computed from
    one extra all-reduce. (Keras' ``global_clipnorm`` clips each replica's partial gradient before the
    sum, so its threshold grew with the number of replicas; on a LossScaleOptimizer it did not clip at
    all.) ``loss_scale``: the factor the gradients are still multiplied by (mixed_float16), so the
    threshold applies to the true gradient. Non-finite gradients stay non-finite (the loss-scale
    optimizer then skips the step).
    """
    import tensorflow as tf

    present = [g for g in gradients if g is not None]
    if not present:
        return gradients
    context = tf.distribute.get_replica_context()
    summed = present
    if context is not None and context.num_replicas_in_sync > 1:
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, present)
    norm = tf.linalg.global_norm([tf.cast(g, tf.float32) for g in summed])
    if loss_scale is not None:
        norm = norm / tf.cast(loss_scale, tf.float32)
    factor = tf.where(norm > clip_norm, clip_norm / norm, tf.ones_like(norm))
    return [None if g is None else g * tf.cast(factor, g.dtype) for g in gradients]
