"""The training loop both trainers share: config and flags, strategy (one node or many), readers,
distributed steps, test intervals, early stopping, checkpoints and resume, logs and exports.

A trainer (``train_unet.py``, ``train_maskrcnn.py``) subclasses ``Trainer`` and supplies the model,
the per-replica loss, the evaluation of one test interval and its ``config.json``; everything else is
here so the two behave alike: the same flags mean the same thing, SIGTERM/SIGUSR1 write a checkpoint
and exit 75, NaN exits 3, bad input exits 2.

Distribution (``--distribution``): ``mirrored`` = MirroredStrategy over the GPUs of this machine (or
``--cpu_replicas`` logical CPUs); ``multi_worker`` = MultiWorkerMirroredStrategy with one process per
node, the cluster taken from TF_CONFIG or, inside ``srun``, from SLURM's variables; ``auto`` (default)
picks multi_worker when TF_CONFIG or a multi-task SLURM step is present. With several workers each
reads its own shard of the databases, only the chief (worker 0) writes logs, curves, metrics and
exports, every worker writes checkpoints (the others into a temporary folder they delete: TF's rule for
synchronized variables), and the decisions that end a loop (preemption, early stopping) are agreed by
all-reduce so no worker is left waiting in a collective.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import augment
from enki_seg.data import records
from enki_seg.training import common
from imagereader import ImageReader, ReaderConfig
from enki_seg.data.normalization import METHODS as NORMALIZATIONS
from enki_seg.data.normalization import Normalization
from enki_seg.training.common import TrainError

logger = logging.getLogger("trainer")

DISTRIBUTIONS = ("auto", "mirrored", "multi_worker")
#: With several workers, SIGTERM/SIGUSR1 are acted on at steps that are multiples of this.
PREEMPTION_CHECK_STEPS = 10


@dataclass
class BaseTrainConfig:
    """Settings every trainer has; a trainer's config dataclass adds its model's fields."""

    train_database: str = ""
    test_database: str = ""
    output_dir: str = ""
    batch_size: int = 8                  # per replica
    number_classes: int = 2              # including background
    learning_rate: float = 1e-4
    test_every_n_steps: int = 1000
    balance_classes: bool = False
    use_augmentation: bool = True
    early_stopping: int = 10             # test intervals without improvement; 0 = never stop early
    reader_count: int = 1                # reader processes per replica
    augmentation_config: str | None = None
    augmentation: dict = field(default_factory=dict)  # overrides of AugmentConfig fields
    normalization: str = "zscore"
    seed: int = 0
    mixed_precision: bool = False
    max_steps: int | None = None
    optimizer: str = "adam"
    momentum: float = 0.9                # sgd (and rmsprop)
    lr_schedule: str = "constant"
    lr_decay_steps: list[int] | None = None    # TAO's learning_rate_steps
    lr_decay_levels: list[float] | None = None  # TAO's learning_rate_decay_levels (multipliers of the base rate)
    warmup_steps: int | None = None      # None: NIST's, the first test interval (at most 1000 steps)
    weight_decay: float = 0.0
    monitor: str = "loss"
    deterministic: bool = False
    cpu_replicas: int = 0                # >1: MirroredStrategy over that many logical CPUs (no GPU)
    distribution: str = "auto"           # auto | mirrored | multi_worker
    log_every: int = 10
    test_images: int = 3                 # test images shown in TensorBoard each interval

    def resolved_warmup(self) -> int:
        return min(self.test_every_n_steps, 1000) if self.warmup_steps is None else self.warmup_steps

    def augment_config(self) -> augment.AugmentConfig | None:
        if not self.use_augmentation:
            return None
        base = augment.AugmentConfig.from_file(self.augmentation_config) if self.augmentation_config \
            else augment.AugmentConfig()
        return augment.AugmentConfig.from_dict({**base.to_dict(), **self.augmentation})


# Settings that may differ between a run and its continuation without making it "a different run".
# The database paths may change too (launch/ copies them to node-local scratch, a new path per job):
# check_resumed_data() compares their contents' record counts with the run's instead.
RESUME_IGNORED = ("max_steps", "log_every", "cpu_replicas", "reader_count", "test_images", "distribution",
                  "train_database", "test_database")


def check_resumed_data(folder: common.RunFolder, train_meta, test_meta) -> None:
    """TrainError when a resumed run's databases are not the ones it started with (by record counts)."""
    if not folder.config.exists():
        return
    data = json.loads(folder.config.read_text()).get("data", {})
    for name, meta in (("train", train_meta), ("test", test_meta)):
        before = data.get(f"{name}_records")
        if before is not None and before != meta.record_count:
            raise TrainError(
                f"--{name}_database has {meta.record_count} records but the run in {folder.path} was trained on "
                f"{before} ({data.get(f'{name}_database')}); resume with the same databases or choose another "
                "--output_dir")


def add_common_arguments(p: argparse.ArgumentParser, monitors: tuple[str, ...], defaults: BaseTrainConfig) -> None:
    """The flags every trainer accepts (NIST's names); defaults come from the trainer's config class."""
    p.add_argument("--config", help="JSON/YAML file of config fields; flags override it")
    p.add_argument("--train_database", help="train LMDB (required)")
    p.add_argument("--test_database", help="test LMDB (required)")
    p.add_argument("--output_dir", help="run folder (required)")
    p.add_argument("--batch_size", type=int, help=f"per-replica batch size (default {defaults.batch_size})")
    p.add_argument("--number_classes", type=int, help=f"classes including background ({defaults.number_classes})")
    p.add_argument("--learning_rate", type=float, help=f"default {defaults.learning_rate:g}")
    p.add_argument("--test_every_n_steps", type=int, help=f"steps between test intervals ({defaults.test_every_n_steps})")
    p.add_argument("--balance_classes", type=int, choices=(0, 1), help="class-balanced sampling")
    p.add_argument("--use_augmentation", type=int, choices=(0, 1), help="default 1")
    p.add_argument("--early_stopping", type=int, help="intervals without improvement before stopping (10)")
    p.add_argument("--reader_count", type=int, help="reader processes per replica (default 1)")
    p.add_argument("--augmentation_config", help="JSON/YAML file of augmentation settings")
    p.add_argument("--augment", action="append", metavar="KEY=VALUE",
                   help="override one augmentation setting, e.g. --augment rotation=false --augment jitter=0.2")
    p.add_argument("--normalization", choices=NORMALIZATIONS)
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed_precision", type=int, choices=(0, 1))
    p.add_argument("--max_steps", type=int)
    p.add_argument("--optimizer", choices=("adam", "sgd", "rmsprop"))
    p.add_argument("--momentum", type=float)
    p.add_argument("--lr_schedule", choices=("constant", "cosine", "step", "polynomial"))
    p.add_argument("--lr_decay_steps", type=int, nargs="+", help="steps of the 'step' schedule")
    p.add_argument("--lr_decay_levels", type=float, nargs="+",
                   help="'step' schedule: multiplier of the learning rate from each decay step on (default 0.1, 0.01, ...)")
    p.add_argument("--warmup_steps", type=int, help="steps at a tenth of the learning rate")
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--monitor", choices=monitors, help=f"early-stopping value ({defaults.monitor})")
    p.add_argument("--deterministic", type=int, choices=(0, 1), help="TF op determinism + seeded reader")
    p.add_argument("--cpu_replicas", type=int, help="MirroredStrategy over N logical CPUs (no GPU)")
    p.add_argument("--distribution", choices=DISTRIBUTIONS,
                   help="auto (default): multi_worker when TF_CONFIG or a multi-task srun step is present")
    p.add_argument("--log_every", type=int)
    p.add_argument("--test_images", type=int)
    p.add_argument("--resume", type=int, choices=(0, 1), default=0,
                   help="continue the run in --output_dir (also automatic when the settings match)")


def build_config(args: argparse.Namespace, config_class):
    """Config dataclass from --config file values overridden by flags; TrainError on bad settings."""
    import yaml

    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.exists():
            raise TrainError(f"--config {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise TrainError(f"--config {path} must hold a mapping of settings")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TrainError(f"--config {args.config}: unknown setting(s) {unknown}; valid: {sorted(fields)}")
    for key, value in vars(args).items():
        if key in fields:
            values[key] = bool(value) if fields[key].type == "bool" else value
    for item in getattr(args, "augment", None) or []:
        if "=" not in item:
            raise TrainError(f"--augment {item!r} must be KEY=VALUE")
        key, value = item.split("=", 1)
        values["augmentation"] = {**values.get("augmentation", {}), key.strip(): yaml.safe_load(value)}
    config = config_class(**values)
    for name in ("train_database", "test_database", "output_dir"):
        if not getattr(config, name):
            raise TrainError(f"--{name} is required")
    try:
        config.augment_config()
    except (ValueError, OSError) as exc:
        raise TrainError(f"augmentation settings: {exc}") from None
    if config.distribution not in DISTRIBUTIONS:
        raise TrainError(f"--distribution {config.distribution!r} must be one of {', '.join(DISTRIBUTIONS)}")
    if config.lr_schedule != "constant" and config.max_steps is None and not (
            config.lr_schedule == "step" and config.lr_decay_steps):
        raise TrainError(f"--lr_schedule {config.lr_schedule} needs --max_steps")
    if config.lr_decay_levels is not None and len(config.lr_decay_levels) != len(config.lr_decay_steps or []):
        raise TrainError(f"--lr_decay_levels has {len(config.lr_decay_levels)} values but --lr_decay_steps has "
                         f"{len(config.lr_decay_steps or [])}; give one level per step")
    return config


def check_databases(config: BaseTrainConfig):
    """Errors before any work: missing databases, mismatched channels/dtype, too few classes."""
    metas = {}
    for name in ("train_database", "test_database"):
        path = getattr(config, name)
        if not Path(path).is_dir():
            raise TrainError(f"--{name} {path} does not exist (build it with build_lmdb.py)")
        try:
            metas[name] = records.read_metadata(path)
        except records.RecordError as exc:
            raise TrainError(f"--{name}: {exc}") from None
    train, test = metas["train_database"], metas["test_database"]
    if (train.channels, train.image_dtype) != (test.channels, test.image_dtype):
        raise TrainError(
            f"train database {config.train_database} has {train.channels} channel(s) of {train.image_dtype} but "
            f"test database {config.test_database} has {test.channels} of {test.image_dtype}; build both "
            "from the same kind of images"
        )
    found = sorted(set(train.class_ids) | set(test.class_ids))
    if found and max(found) >= config.number_classes:
        raise TrainError(
            f"the databases hold class ids {found} but --number_classes is {config.number_classes}; "
            f"use --number_classes {max(found) + 1}"
        )
    return train, test


def make_optimizer(config: BaseTrainConfig):
    import keras

    kwargs = dict(learning_rate=config.learning_rate)
    if config.weight_decay:
        kwargs["weight_decay"] = config.weight_decay
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(**kwargs)
    elif config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(momentum=config.momentum, **kwargs)
    else:
        optimizer = keras.optimizers.RMSprop(momentum=config.momentum, **kwargs)
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# ----------------------------------------------------------------------------- cluster


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
        from launch.tf_config import tf_config_from_slurm

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


def make_strategy(config: BaseTrainConfig, cluster: Cluster | None):
    """Configure TF and create the strategy before any other TF op (MultiWorkerMirroredStrategy's rule)."""
    if cluster is not None:
        if config.cpu_replicas > 1:
            logger.warning("--cpu_replicas is ignored with several workers: each worker uses its GPUs or one CPU")
        tf = common.configure_devices(0, config.deterministic, config.seed, config.mixed_precision)
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        logger.info("worker %d of %d: MultiWorkerMirroredStrategy with %d replica(s) in sync",
                    cluster.worker_index, cluster.num_workers, strategy.num_replicas_in_sync)
        return tf, strategy
    tf = common.configure_devices(config.cpu_replicas, config.deterministic, config.seed, config.mixed_precision)
    return tf, common.make_strategy(config.cpu_replicas)


# ----------------------------------------------------------------------------- the loop


class Trainer:
    """One training run. Subclasses implement the hooks marked "hook"."""

    #: early-stopping direction of each value --monitor may name
    MONITOR_MODES: dict[str, str] = {"loss": "min"}
    #: extra ReaderConfig fields (e.g. max_instances)
    reader_options: dict = {}

    def __init__(self, config: BaseTrainConfig, train_meta, test_meta, resume: bool, cluster: Cluster | None = None):
        self.config = config
        self.train_meta, self.test_meta = train_meta, test_meta
        self.folder = common.RunFolder(config.output_dir)
        self.resume = resume
        self.cluster = cluster or Cluster()
        self.readers: list[ImageReader] = []
        self._temp_dirs: list[Path] = []
        self._saved_step: int | None = None
        #: tests only: the training step whose loss is replaced by NaN, to exercise the NaN stop on any CPU
        self._test_nan_step = int(os.environ.get("ENKI_TEST_NAN_AT_STEP", "0"))

    # -- hooks

    @staticmethod
    def check_databases(config: BaseTrainConfig):
        """hook: (train, test) metadata; TrainError when the databases do not suit this trainer."""
        return check_databases(config)

    def create_model(self):
        """hook: the Keras model (called inside the strategy scope)."""
        raise NotImplementedError

    def compute_loss(self, batch: dict):
        """hook, per replica: (loss averaged over the GLOBAL batch, {term name: scalar}) for training."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """hook: one pass over the test database -> {"loss": float|None, "monitor": {name: value},
        "row": {column: float} (metrics.csv / TensorBoard, "test_" prefixed), "overlays": [HxWx3 uint8]}."""
        raise NotImplementedError

    @property
    def model_name(self) -> str:
        """hook: the model's name in config.json (inference dispatches on it)."""
        raise NotImplementedError

    def run_config_json(self) -> dict:
        """config.json: everything inference needs to rebuild and run the model."""
        config, meta = self.config, self.train_meta
        return {
            "train": dataclasses.asdict(config),
            "model": {"name": self.model_name, "config": self.model.get_config(), "size_multiple": self.size_multiple},
            "classes": {"number_classes": config.number_classes,
                        "names": {str(k): v for k, v in meta.class_names.items()}},
            "input": {"channels": meta.channels, "dtype": meta.image_dtype, "tile_size": meta.tile_size,
                      "record_height": meta.record_height, "record_width": meta.record_width},
            "normalization": self.normalization.to_dict(),
            "augmentation": (config.augment_config().to_dict() if config.use_augmentation else None),
            "data": {"train_database": str(Path(config.train_database).resolve()),
                     "test_database": str(Path(config.test_database).resolve()),
                     "train_records": meta.record_count, "test_records": self.test_meta.record_count},
            "replicas": self.replicas,
            "workers": self.cluster.num_workers,
            "versions": common.versions(),
        }

    # -- setup

    def setup(self):
        cfg = self.config
        self.tf, self.strategy = make_strategy(cfg, self.cluster if self.cluster.multi_worker else None)
        tf = self.tf
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = cfg.batch_size * self.replicas
        self.normalization = Normalization.from_metadata(cfg.normalization, self.train_meta)
        with self.strategy.scope():
            self.model = self.create_model()
            size_multiple = int(getattr(self.model, "size_multiple", 1))
            for meta, name in ((self.train_meta, cfg.train_database), (self.test_meta, cfg.test_database)):
                if meta.record_height is None or meta.record_height % size_multiple or \
                        meta.record_width % size_multiple:
                    raise TrainError(
                        f"{name}: records are {meta.record_height}x{meta.record_width}, not a multiple of the "
                        f"model's size multiple {size_multiple}; rebuild with --use_tiling 1 and a "
                        f"--tile_size that is a multiple of {size_multiple}")
            self.optimizer = make_optimizer(cfg)
            self.optimizer.build(self.model.trainable_variables)
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.size_multiple = size_multiple
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step_var)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self._writable(self.folder.checkpoints)),
                                                  max_to_keep=2)
        self.best_checkpoint = tf.train.Checkpoint(model=self.model)
        self.best_manager = tf.train.CheckpointManager(self.best_checkpoint, str(self._writable(self.folder.best)),
                                                       max_to_keep=1)
        self.state = common.TrainerState(early_stopping=dataclasses.asdict(self._new_early_stopping()))
        if self.resume:
            self._restore()
        self.state.topology = self._topology()
        self.early = common.EarlyStopping(**self.state.early_stopping)
        self._build_steps()
        self._build_data()
        if self.cluster.is_chief:
            self.writers = {k: tf.summary.create_file_writer(str(self.folder.tensorboard / k))
                            for k in ("train", "test")}
        else:
            self.writers = {k: tf.summary.create_noop_writer() for k in ("train", "test")}
        self.metrics_log = common.MetricsLog(self.folder)

    def _writable(self, real: Path) -> Path:
        """Where this worker writes checkpoints: the real folder (chief) or a private one it deletes."""
        if self.cluster.is_chief:
            return real
        temp = self.folder.path / f".worker-{self.cluster.worker_index}-{os.getpid()}" / real.name
        self._temp_dirs.append(temp.parent)
        return temp

    def _restore(self):
        state = common.TrainerState.load(self.folder.state)
        self.checkpoint.restore(state.checkpoint).assert_existing_objects_matched()
        if int(self.step_var.numpy()) != state.step:
            raise TrainError(f"checkpoint {state.checkpoint} is at step {int(self.step_var.numpy())} "
                             f"but {self.folder.state} says {state.step}")
        before = state.topology or {}
        now = self._topology()
        if before and before != now:
            logger.warning(
                "resuming with %d worker(s) x %d replica(s) each (global batch %d) instead of %d x %d (global batch %d): "
                "model, optimizer and step continue exactly, but each worker reads a different shard from here on, "
                "so the examples seen differ from an uninterrupted run", now["workers"], now["replicas"],
                now["global_batch_size"], before.get("workers", 1), before.get("replicas", 1),
                before.get("global_batch_size", 0))
        logger.info("resumed from %s at step %d (interval %d)", state.checkpoint, state.step, state.interval)
        self.state = state
        self._saved_step = state.step

    def _topology(self) -> dict:
        return {"workers": self.cluster.num_workers, "replicas": self.replicas // self.cluster.num_workers,
                "global_batch_size": self.global_batch}

    def _new_early_stopping(self):
        return common.EarlyStopping(patience=self.config.early_stopping, mode=self.MONITOR_MODES[self.config.monitor])

    def reader_config(self, mode: str, input_pipeline_id: int = 0, num_input_pipelines: int = 1,
                      per_replica_batch: int | None = None, replicas_here: int = 1) -> ReaderConfig:
        cfg = self.config
        per_replica = per_replica_batch or cfg.batch_size
        # this pipeline's position after state.step steps (a changed topology reads a new stream: warned)
        start = self.state.step * per_replica * replicas_here if mode == "train" else 0
        return ReaderConfig(
            cfg.train_database if mode == "train" else cfg.test_database, batch_size=per_replica,
            num_workers=max(1, cfg.reader_count * replicas_here), mode=mode,
            augment=cfg.augment_config() if mode == "train" else None,
            normalization=self.normalization, balance_classes=cfg.balance_classes and mode == "train",
            seed=cfg.seed, shard_index=input_pipeline_id, num_shards=num_input_pipelines,
            start_position=start, size_multiple=self.size_multiple, **self.reader_options,
        )

    def reader_dataset_fn(self, mode: str):
        """For distribute_datasets_from_function: one started reader per input pipeline, as a tf.data dataset."""
        def fn(ctx):
            per_replica = ctx.get_per_replica_batch_size(self.global_batch)
            replicas_here = max(1, self.replicas // ctx.num_input_pipelines)
            config = self.reader_config(mode, ctx.input_pipeline_id, ctx.num_input_pipelines, per_replica,
                                        replicas_here)
            if mode == "test":
                config = dataclasses.replace(config, batches_per_pass=test_batches_per_pass(
                    self.test_meta.record_count, ctx.num_input_pipelines, per_replica, replicas_here))
            reader = ImageReader(config).start()
            self.readers.append(reader)
            return reader.as_tf_dataset()
        return fn

    def _build_data(self):
        self.train_dataset = self.strategy.distribute_datasets_from_function(self.reader_dataset_fn("train"))
        self.train_iterator = iter(self.train_dataset)
        self.test_dataset = self.strategy.distribute_datasets_from_function(self.reader_dataset_fn("test"))

    def _build_steps(self):
        tf, strategy, model, cfg = self.tf, self.strategy, self.model, self.config
        optimizer, mixed = self.optimizer, cfg.mixed_precision

        def train_step(batch):
            with tf.GradientTape() as tape:
                loss, terms = self.compute_loss(batch)
                scaled = optimizer.scale_loss(loss) if mixed else loss
            variables = model.trainable_variables
            gradients = tape.gradient(scaled, variables)
            optimizer.apply(gradients, variables)
            return loss, terms

        @tf.function
        def distributed_train(iterator):
            loss, terms = strategy.run(train_step, args=(next(iterator),))
            reduce = lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)  # noqa: E731
            return reduce(loss), {k: reduce(v) for k, v in terms.items()}

        @tf.function
        def agree(values):
            # every worker's values -> their mean on every worker (one tiny all-reduce; MAX does not exist)
            per_replica = strategy.run(lambda: tf.identity(values))
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

        self.distributed_train = distributed_train
        self._agree = agree

    def agree_mean(self, *values: float) -> list[float]:
        """The mean of each value over all workers, the same on every worker (identity with one worker)."""
        if not self.cluster.multi_worker:
            return [float(v) for v in values]
        return [float(v) for v in self._agree(self.tf.constant(values, self.tf.float32)).numpy()]

    # -- loop

    def run(self) -> int:
        cfg, tf = self.config, self.tf
        state = self.state
        started = time.perf_counter() - state.elapsed_seconds
        interval_losses: list[float] = []
        window_start, window_steps = time.perf_counter(), 0
        warmup = cfg.resolved_warmup()
        stop_reason = None
        with common.PreemptionGuard() as guard:
            while True:
                if cfg.max_steps is not None and state.step >= cfg.max_steps:
                    stop_reason = f"reached --max_steps {cfg.max_steps}"
                    break
                lr = common.learning_rate_at(state.step, cfg.learning_rate, cfg.lr_schedule, warmup,
                                             cfg.max_steps, cfg.lr_decay_steps, decay_levels=cfg.lr_decay_levels)
                self.optimizer.learning_rate.assign(lr)
                loss, terms = self.distributed_train(self.train_iterator)
                loss = float(loss)
                if state.step + 1 == self._test_nan_step:
                    loss = float("nan")  # test-only fault injection (whether data overflows depends on the CPU)
                if not math.isfinite(loss):
                    logger.error("loss is %s at step %d; stopping. The last good checkpoint is %s (step %d); "
                                 "lower --learning_rate or check the data", loss, state.step + 1,
                                 state.checkpoint, state.step if state.checkpoint else 0)
                    return common.NAN_EXIT_CODE
                state.step += 1
                self.step_var.assign(state.step)
                interval_losses.append(loss)
                window_steps += 1
                if state.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    rate = window_steps * self.global_batch / max(now - window_start, 1e-9)
                    reader = self.readers[0].stats() if self.readers else {}
                    extra = "".join(f"  {k} {float(v):.4f}" for k, v in terms.items())
                    logger.info("step %d  loss %.4f%s  lr %.3g  %.1f img/s  reader wait %.0f%%", state.step, loss,
                                extra, lr, rate, 100 * reader.get("wait_fraction", 0.0))
                    with self.writers["train"].as_default(step=state.step):
                        tf.summary.scalar("loss", loss)
                        for key, value in terms.items():
                            tf.summary.scalar(f"loss/{key}", float(value))
                        tf.summary.scalar("learning_rate", lr)
                        tf.summary.scalar("examples_per_second", rate)
                        if reader:
                            tf.summary.scalar("reader/queue_depth", reader["queue_depth"])
                            tf.summary.scalar("reader/wait_seconds", reader["wait_seconds"])
                    window_start, window_steps = now, 0
                if state.step % cfg.test_every_n_steps == 0:
                    stop = self._interval(interval_losses, started)
                    interval_losses = []
                    if stop:
                        stop_reason = (f"early stopping: no improvement of test {cfg.monitor} for "
                                       f"{cfg.early_stopping} intervals")
                        break
                # a signal may reach only some workers: all stop together or none does. The agreement is a
                # collective (~5 ms on loopback, bench/multiworker_bench.py), so several workers hold it
                # every PREEMPTION_CHECK_STEPS steps; SLURM's warning comes minutes ahead.
                check = not self.cluster.multi_worker or state.step % PREEMPTION_CHECK_STEPS == 0
                if check and self.agree_mean(float(guard.triggered))[0] > 0:
                    self._save_checkpoint(started)
                    logger.warning("checkpoint written at step %d; exiting with code %d so the job can be "
                                   "requeued and resumed", state.step, common.PREEMPTED_EXIT_CODE)
                    return common.PREEMPTED_EXIT_CODE
        if interval_losses and not (cfg.max_steps is not None and state.step % cfg.test_every_n_steps == 0):
            self._interval(interval_losses, started)  # a final partial interval is tested too
        self._save_checkpoint(started)
        self._finish(stop_reason, started)
        return 0

    def _interval(self, train_losses: list[float], started: float) -> bool:
        """Test, log, checkpoint; returns True when early stopping says stop."""
        cfg, tf, state = self.config, self.tf, self.state
        result = self.evaluate()
        state.interval += 1
        value = result["monitor"][cfg.monitor]
        # every worker must take the same decisions; the values are equal up to float noise
        if self.cluster.multi_worker:
            value = self.agree_mean(float(value))[0]  # NaN anywhere -> NaN everywhere: not an improvement
        improved = self.early.update(float(value), state.step)
        row = {"step": state.step, "interval": state.interval,
               "train_loss": float(np.mean(train_losses)) if train_losses else float("nan"),
               **({"test_loss": result["loss"]} if result.get("loss") is not None else {}),
               **result["row"], "learning_rate": float(self.optimizer.learning_rate.numpy())}
        state.history.append(row)
        shown = "  ".join(f"{k[5:]} {v:.4f}" for k, v in row.items()
                          if k.startswith("test_") and "class" not in k and isinstance(v, float))
        logger.info("test interval %d (step %d): %s  %s", state.interval, state.step, shown,
                    "best so far" if improved else f"no improvement for {self.early.bad_intervals}")
        with self.writers["test"].as_default(step=state.step):
            for key, val in row.items():
                if key.startswith("test_") and val is not None and math.isfinite(val):
                    tf.summary.scalar(key[5:], val)
            if result.get("overlays"):
                tf.summary.image("prediction | truth", np.stack(result["overlays"]),
                                 max_outputs=len(result["overlays"]))
        if self.cluster.is_chief:
            self.metrics_log.write(state.history)
        if improved:
            self.best_manager.save(checkpoint_number=state.step)
        self._save_checkpoint(started)
        return self.early.should_stop

    def _save_checkpoint(self, started: float) -> None:
        state = self.state
        if self._saved_step == state.step:
            return  # already saved at this step (on every worker alike: saves are collective)
        path = self.manager.save(checkpoint_number=state.step)
        self._saved_step = state.step
        if not self.cluster.is_chief:
            return  # the chief's state.json names the real checkpoint
        state.checkpoint = path
        state.early_stopping = dataclasses.asdict(self.early)
        state.reader_position = state.step * self.global_batch
        state.starvation_events = sum(r.stats()["starvation_events"] for r in self.readers)
        state.elapsed_seconds = time.perf_counter() - started
        state.save(self.folder.state)

    def _finish(self, stop_reason: str | None, started: float) -> None:
        if self.best_manager.latest_checkpoint:
            self.best_checkpoint.restore(self.best_manager.latest_checkpoint).expect_partial()
        if self.cluster.is_chief:
            common.export_model(self.model, self.folder)
        fingerprint = weights_fingerprint(self.model)
        logger.info("model weights fingerprint %s (equal on every worker of a run)", fingerprint)
        seconds = time.perf_counter() - started
        best_row = next((r for r in self.state.history if r["step"] == self.early.best_step), None)
        summary = {"stop_reason": stop_reason, "steps": self.state.step, "intervals": self.state.interval,
                   "best_step": self.early.best_step, f"best_test_{self.config.monitor}": self.early.best,
                   "best_interval": best_row, "seconds": round(seconds, 1),
                   "starvation_events": self.state.starvation_events, "workers": self.cluster.num_workers,
                   "replicas": self.replicas, "weights_fingerprint": fingerprint,
                   "exports": {"keras": str(self.folder.keras_model), "saved_model": str(self.folder.saved_model)}}
        if self.cluster.is_chief:
            common.atomic_write_text(self.folder.summary, json.dumps(summary, indent=1))
        logger.info("done (%s) after %d steps in %.0f s; best test %s %.4f at step %s%s", stop_reason,
                    self.state.step, seconds, self.config.monitor, self.early.best or float("nan"),
                    self.early.best_step,
                    f"; exported {self.folder.keras_model} and {self.folder.saved_model}" if self.cluster.is_chief
                    else "")

    def close(self) -> None:
        # drop TF's iterators over the readers before the readers, and before interpreter shutdown
        # (a generator dataset finalized after it logs "Python interpreter state is not initialized")
        for name in ("train_iterator", "train_dataset", "test_dataset"):
            self.__dict__.pop(name, None)
        gc.collect()
        for reader in self.readers:
            reader.close()
        self.readers = []
        for temp in self._temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def test_batches_per_pass(records: int, num_input_pipelines: int, per_replica_batch: int,
                          replicas_per_pipeline: int) -> int:
    """Batches each input pipeline's test reader yields per pass so that every pipeline makes the same
    number of distributed steps and every replica gets a full batch at each (the rows past a shard's
    records are padding with ``valid == 0``): an empty or uneven per-replica batch would break
    synchronized batch norm, and a worker with fewer steps would leave the others in a collective."""
    largest_shard = math.ceil(records / num_input_pipelines)  # shards are records i::num_input_pipelines
    steps = max(1, math.ceil(largest_shard / (per_replica_batch * replicas_per_pipeline)))
    return steps * replicas_per_pipeline


def weights_fingerprint(model) -> str:
    """sha1 over all weights (in order): the same on every worker when they stayed in sync."""
    import hashlib

    digest = hashlib.sha1()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight.numpy(), np.float32)).tobytes())
    return digest.hexdigest()[:16]


def run_main(trainer_class, config, args, name: str) -> int:
    """The body of a trainer's main(): checks, run folder, config.json, run; exit codes as documented."""
    trainer = None
    # SIGUSR1's default action kills the process: one arriving outside the training loop (while the model
    # is built, tested or exported) must not lose a run. PreemptionGuard takes it over inside the loop.
    signal.signal(signal.SIGUSR1, lambda signum, frame: logger.warning(
        "SIGUSR1 outside the training loop: ignored (the run is starting or finishing)"))
    try:
        train_meta, test_meta = trainer_class.check_databases(config)
        cluster = resolve_cluster(config.distribution) or Cluster()
        if cluster.multi_worker:
            _prefix_log_lines(f"[worker {cluster.worker_index}] ")
        folder = common.RunFolder(config.output_dir)
        if cluster.is_chief:
            resume = folder.prepare(dataclasses.asdict(config), bool(args.resume), RESUME_IGNORED)
            if resume:
                check_resumed_data(folder, train_meta, test_meta)
            handler = common.log_to_file(folder)
        else:
            # the chief creates and checks the folder; the others only follow its checkpoint
            resume, handler = folder.has_checkpoint(), None
        trainer = trainer_class(config, train_meta, test_meta, resume, cluster)
        trainer.setup()
        if cluster.is_chief:
            payload = trainer.run_config_json()
            common.atomic_write_text(folder.config, json.dumps(payload, indent=1, default=str))
        code = trainer.run()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
        return code
    except TrainError as exc:
        logging.getLogger(name).error("%s", exc)
        return 2
    finally:
        if trainer is not None:
            trainer.close()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for noisy in ("absl", "tensorflow"):  # per-step INFO chatter of tf.distribute and checkpointing
        logging.getLogger(noisy).setLevel(logging.WARNING)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _prefix_log_lines(prefix: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(prefix + LOG_FORMAT))
