"""The training loop both trainers share: ``Trainer`` (strategy, readers, distributed steps, test
intervals, early stopping, checkpoints and resume, logs and exports) and ``run_main``, the body of a
trainer's main().

A trainer (``unet.UNetTrainer``, ``maskrcnn.MaskRCNNTrainer``) subclasses ``Trainer`` and supplies the
model, the per-replica loss and the evaluation of one test interval; everything else is here so the
two behave alike: the same flags mean the same thing, SIGTERM/SIGUSR1 write a checkpoint and exit 75,
NaN exits 3, bad input exits 2 (``enki_seg.exit_codes``).

With several workers (``distribution.py``) each reads its own shard of the databases, only the chief
(worker 0) writes logs, curves, metrics and exports, every worker writes checkpoints (the others into
a temporary folder they delete: TF's rule for synchronized variables), and the decisions that end a
loop (preemption, early stopping) are agreed by all-reduce so no worker is left waiting in a collective.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from enki_seg import cli, exit_codes
from enki_seg.data import records
from enki_seg.files import WriteError, atomic_write_text
from enki_seg.run_config import ClassesSection, InputSection, ModelSection, RunConfig
from enki_seg.training.config import RESUME_IGNORED, BaseTrainConfig, check_databases
from enki_seg.training.distribution import (Cluster, clip_summed_gradients, make_strategy, resolve_cluster,
                                            resolve_precision)
from enki_seg.training.errors import TrainError
from enki_seg.training.preemption import PREEMPTION_CHECK_STEPS, PreemptionGuard, ignore_sigusr1_outside_the_loop
from enki_seg.training.run_folder import (MetricsLog, RunFolder, TrainerState, check_resumed_data, export_model,
                                          log_to_file, save_checkpoint, software_versions)
from enki_seg.training.schedules import EarlyStopping, learning_rate_at, make_optimizer
from imagereader import ImageReader, ReaderConfig

logger = logging.getLogger(__name__)


class Trainer:
    """One training run. Subclasses implement the hooks marked "hook"."""

    #: early-stopping direction of each value --monitor may name
    MONITOR_MODES: dict[str, str] = {"loss": "min"}
    #: extra ReaderConfig fields (e.g. max_instances)
    reader_options: dict = {}

    def __init__(self, config: BaseTrainConfig, train_meta, test_meta, resume: bool, cluster: Cluster | None = None):
        self.config = config
        self.train_meta, self.test_meta = train_meta, test_meta
        self.folder = RunFolder(config.output_dir)
        self.resume = resume
        self.cluster = cluster or Cluster()
        self.readers: list[ImageReader] = []
        self._temp_dirs: list[Path] = []
        self._saved_step: int | None = None
        self.crop_shapes: dict[str, tuple[int, int] | None] = {"train": None, "test": None}
        #: tests only: the training step whose loss is replaced by NaN, to exercise the NaN stop on any CPU
        self._test_nan_step = int(os.environ.get("ENKI_TEST_NAN_AT_STEP", "0"))
        #: tests only: the training step after which this process sends itself SIGTERM, to stop a run at an
        #: exact step (mid-interval) without depending on timing
        self._test_stop_step = int(os.environ.get("ENKI_TEST_SIGTERM_AT_STEP", "0"))

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

    def run_config(self) -> RunConfig:
        """config.json: everything inference needs to rebuild and run the model (call after setup())."""
        config, meta = self.config, self.train_meta
        return RunConfig(
            model=ModelSection(name=self.model_name, config=self.model.get_config(), size_multiple=self.size_multiple),
            classes=ClassesSection(number_classes=config.number_classes,
                                   names={str(k): v for k, v in meta.class_names.items()}),
            input=InputSection(channels=meta.channels, dtype=meta.image_dtype, tile_size=meta.tile_size,
                               record_height=self.example_shapes["train"][0],
                               record_width=self.example_shapes["train"][1]),
            normalization=self.normalization.to_dict(),
            train=dataclasses.asdict(config),
            augmentation=(config.augment_config().to_dict() if config.use_augmentation else None),
            data={"train_database": str(Path(config.train_database).resolve()),
                  "test_database": str(Path(config.test_database).resolve()),
                  "train_records": meta.record_count, "test_records": self.test_meta.record_count,
                  "train_build_id": meta.build_id, "test_build_id": self.test_meta.build_id},
            replicas=self.replicas,
            workers=self.cluster.num_workers,
            versions=software_versions(),
            extra={"precision": self.precision},
        )

    # -- setup

    def bfloat16_unsuited(self) -> str | None:
        """Why ``--precision auto`` should keep this model in float32 on hardware with native bfloat16 (None: it gains)."""
        return None

    def setup(self):
        cfg = self.config
        self.precision, why = resolve_precision(cfg.precision, self.bfloat16_unsuited())
        self.tf, self.strategy = make_strategy(self.cluster, cfg.cpu_replicas, cfg.deterministic, cfg.seed,
                                               self.precision)
        logger.info("precision %s (%s)", self.precision, why)
        tf = self.tf
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = cfg.batch_size * self.replicas
        self.normalization = cfg.normalizer(self.train_meta)
        with self.strategy.scope():
            self.model = self.create_model()
            size_multiple = int(getattr(self.model, "size_multiple", 1))
            #: mode -> (height, width) of the examples: the records', or the crop the reader cuts them to
            self.example_shapes = {}
            for mode, meta, name in (("train", self.train_meta, cfg.train_database),
                                     ("test", self.test_meta, cfg.test_database)):
                try:
                    crop = records.crop_shape(meta, cfg.crop_size, size_multiple)
                except ValueError as exc:
                    raise TrainError(f"{name}: {exc} (--crop_size, a multiple of {size_multiple})") from None
                self.crop_shapes[mode] = crop
                if crop is None:
                    problem = records.check_size_multiple(meta.record_height, meta.record_width, size_multiple,
                                                          name)
                    if problem:
                        raise TrainError(f"{problem}; rebuild with --use_tiling 1 and a --tile_size that is a "
                                         f"multiple of {size_multiple}, or give --crop_size")
                    self.example_shapes[mode] = (meta.record_height, meta.record_width)
                else:
                    self.example_shapes[mode] = crop
                    logger.info("%s examples: %dx%d %s crops of its records (%s)", mode, *crop,
                                "random" if mode == "train" else "fixed",
                                f"--crop_size {cfg.crop_size}" if cfg.crop_size else
                                "records differ in size: the smallest record, to a multiple of "
                                f"{size_multiple}; --crop_size sets it")
            self.optimizer = make_optimizer(cfg, self.precision)
            self.optimizer.build(self.model.trainable_variables)
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.size_multiple = size_multiple
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step_var)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self._writable(self.folder.checkpoints)),
                                                  max_to_keep=2)
        self.best_checkpoint = tf.train.Checkpoint(model=self.model)
        self.best_manager = tf.train.CheckpointManager(self.best_checkpoint, str(self._writable(self.folder.best)),
                                                       max_to_keep=1)
        self.state = TrainerState(early_stopping=dataclasses.asdict(self._new_early_stopping()))
        if self.resume:
            self._restore()
        self.state.topology = self._topology()
        self.early = EarlyStopping(**self.state.early_stopping)
        self._build_steps()
        self._build_data()
        if self.cluster.is_chief:
            self.writers = {k: tf.summary.create_file_writer(str(self.folder.tensorboard / k))
                            for k in ("train", "test")}
        else:
            self.writers = {k: tf.summary.create_noop_writer() for k in ("train", "test")}
        self.metrics_log = MetricsLog(self.folder)

    def _writable(self, real: Path) -> Path:
        """Where this worker writes checkpoints: the real folder (chief) or a private one it deletes."""
        if self.cluster.is_chief:
            return real
        temp = self.folder.path / f".worker-{self.cluster.worker_index}-{os.getpid()}" / real.name
        self._temp_dirs.append(temp.parent)
        return temp

    def _restore(self):
        state = TrainerState.load(self.folder.state)
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
        return EarlyStopping(patience=self.config.early_stopping, mode=self.MONITOR_MODES[self.config.monitor])

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
            start_position=start, size_multiple=self.size_multiple, crop_shape=self.crop_shapes[mode],
            **self.reader_options,
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
        optimizer, mixed = self.optimizer, self.precision == "mixed_float16"
        clip_norm = float(getattr(cfg, "gradient_clip_norm", 0) or 0)

        def train_step(batch):
            with tf.GradientTape() as tape:
                loss, terms = self.compute_loss(batch)
                scaled = optimizer.scale_loss(loss) if mixed else loss
            variables = model.trainable_variables
            gradients = tape.gradient(scaled, variables)
            if clip_norm > 0:  # the global norm of the gradient summed over replicas
                gradients = clip_summed_gradients(gradients, clip_norm, optimizer.dynamic_scale if mixed else None)
            optimizer.apply(gradients, variables)
            return loss, terms

        def one_step(iterator, learning_rate):
            optimizer.learning_rate.assign(learning_rate)
            loss, terms = strategy.run(train_step, args=(next(iterator),))
            reduce = lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)  # noqa: E731
            return reduce(loss), {k: reduce(v) for k, v in terms.items()}

        @tf.function(reduce_retracing=True)
        def distributed_train(iterator, learning_rates):
            """len(learning_rates) training steps in one call (--steps_per_execution): (per-step losses,
            the last step's loss terms). The first step is peeled off the loop so the terms' structure is
            known before it."""
            loss, terms = one_step(iterator, learning_rates[0])
            losses = tf.TensorArray(tf.float32, size=tf.shape(learning_rates)[0]).write(0, tf.cast(loss, tf.float32))
            for i in tf.range(1, tf.shape(learning_rates)[0]):
                loss, terms = one_step(iterator, learning_rates[i])
                losses = losses.write(i, tf.cast(loss, tf.float32))
            return losses.stack(), terms

        @tf.function
        def agree(values):
            # every worker's values -> their mean on every worker (one tiny all-reduce; MAX does not exist)
            per_replica = strategy.run(lambda: tf.identity(values))
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

        self.distributed_train = distributed_train
        self._agree = agree

    def steps_in_next_call(self, step: int) -> int:
        """--steps_per_execution, clipped so that every call ends exactly where something happens:
        a log line, a test interval, --max_steps, and (several workers) the stop agreement."""
        cfg = self.config
        k = cfg.steps_per_execution
        periods = [cfg.log_every, cfg.test_every_n_steps]
        if self.cluster.multi_worker:
            periods.append(PREEMPTION_CHECK_STEPS)
        for period in periods:
            k = min(k, period - step % period)
        if cfg.max_steps is not None:
            k = min(k, cfg.max_steps - step)
        return max(1, k)

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
        # state.interval_losses: this interval's training losses so far, checkpointed with the state so that
        # a run stopped mid-interval and resumed writes the same train_loss as an uninterrupted one
        window_start, window_steps = time.perf_counter(), 0
        warmup = cfg.resolved_warmup()
        stop_reason = None
        with PreemptionGuard() as guard:
            while True:
                if cfg.max_steps is not None and state.step >= cfg.max_steps:
                    stop_reason = f"reached --max_steps {cfg.max_steps}"
                    break
                rates = [learning_rate_at(state.step + i, cfg.learning_rate, cfg.lr_schedule, warmup,
                                          cfg.max_steps, cfg.lr_decay_steps, decay_levels=cfg.lr_decay_levels)
                         for i in range(self.steps_in_next_call(state.step))]
                losses, terms = self.distributed_train(self.train_iterator, tf.constant(rates, tf.float32))
                lr = rates[-1]
                for loss in losses.numpy().tolist():  # the one read-back of the call
                    if state.step + 1 == self._test_nan_step:
                        loss = float("nan")  # test-only fault injection (whether data overflows depends on the CPU)
                    if not math.isfinite(loss):
                        logger.error("loss is %s at step %d; stopping. The last good checkpoint is %s (step %d); "
                                     "lower --learning_rate or check the data", loss, state.step + 1,
                                     state.checkpoint, state.step if state.checkpoint else 0)
                        return exit_codes.NAN_LOSS
                    state.step += 1
                    state.interval_losses.append(loss)
                    window_steps += 1
                    if state.step == self._test_stop_step:
                        os.kill(os.getpid(), signal.SIGTERM)  # handled by the guard before the check below
                self.step_var.assign(state.step)
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
                    interval_losses, state.interval_losses = state.interval_losses, []
                    if self._interval(interval_losses, started):
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
                                   "requeued and resumed", state.step, exit_codes.PREEMPTED)
                    return exit_codes.PREEMPTED
        if state.interval_losses and not (cfg.max_steps is not None and state.step % cfg.test_every_n_steps == 0):
            interval_losses, state.interval_losses = state.interval_losses, []
            self._interval(interval_losses, started)  # a final partial interval is tested too
        self._save_checkpoint(started)
        self._finish(stop_reason, started)
        return exit_codes.OK

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
        path = save_checkpoint(self.manager, state.step, state.checkpoint)  # WriteError on a full disk
        self._saved_step = state.step
        if not self.cluster.is_chief:
            return  # the chief's state.json names the real checkpoint
        # test-only: a chief slow to finish its checkpoint while the other workers have already exited
        time.sleep(float(os.environ.get("ENKI_TEST_SLOW_CHECKPOINT_SECONDS", "0")))
        state.checkpoint = path
        state.early_stopping = dataclasses.asdict(self.early)
        state.starvation_events = sum(r.stats()["starvation_events"] for r in self.readers)
        state.elapsed_seconds = time.perf_counter() - started
        state.save(self.folder.state)

    def _finish(self, stop_reason: str | None, started: float) -> None:
        # every worker restores the chief's best checkpoint: the others' private copies are deleted when they
        # exit, so after a resume they would miss a best saved before it. The all-reduce first makes sure
        # the chief has finished writing it (the run folder is on a file system all workers see).
        if self.cluster.multi_worker:
            self.agree_mean(0.0)
        best = self.tf.train.latest_checkpoint(str(self.folder.best))
        if best:
            self.best_checkpoint.restore(best).expect_partial()
        if self.cluster.is_chief:
            export_model(self.model, self.folder)
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
            atomic_write_text(self.folder.summary, json.dumps(summary, indent=1))
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


def test_batches_per_pass(record_count: int, num_input_pipelines: int, per_replica_batch: int,
                          replicas_per_pipeline: int) -> int:
    """Batches each input pipeline's test reader yields per pass so that every pipeline makes the same
    number of distributed steps and every replica gets a full batch at each (the rows past a shard's
    records are padding with ``valid == 0``): an empty or uneven per-replica batch would break
    synchronized batch norm, and a worker with fewer steps would leave the others in a collective."""
    largest_shard = math.ceil(record_count / num_input_pipelines)  # shards are records i::num_input_pipelines
    steps = max(1, math.ceil(largest_shard / (per_replica_batch * replicas_per_pipeline)))
    return steps * replicas_per_pipeline


def weights_fingerprint(model) -> str:
    """sha1 over all weights (in order): the same on every worker when they stayed in sync."""
    import hashlib

    digest = hashlib.sha1()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(weight.numpy(), np.float32)).tobytes())
    return digest.hexdigest()[:16]


#: Settings whose default is decided at run time (this value = "not given"): a resumed run keeps the value
#: it was started with. ``--precision auto`` (the UNet default since bfloat16 was measured) and Mask R-CNN's
#: ``--max_num_instances`` (from the data since the builder counts the objects of every record; runs
#: started before saved 100).
KEPT_ON_RESUME = {"precision": "auto", "max_num_instances": None}


def keep_started_settings(folder: RunFolder, config: BaseTrainConfig) -> None:
    """On a run that has a checkpoint, each ``KEPT_ON_RESUME`` setting left at its run-time default takes the
    value the run was started with: a run started in float32 (or with 100 objects per tile) before those
    defaults existed resumes as it started, and is not refused as a different run."""
    if not folder.has_checkpoint():
        return
    try:
        started = folder.saved_sections().get("train", {})
    except TrainError:
        return  # an unreadable config.json is reported by the folder check
    for name, not_given in KEPT_ON_RESUME.items():
        if hasattr(config, name) and getattr(config, name) == not_given and started.get(name, not_given) != not_given:
            logger.info("--%s %s: %s continues with %s, the value it started with", name,
                        "not given" if not_given is None else not_given, folder.path, started[name])
            setattr(config, name, started[name])


def run_main(trainer_class, config: BaseTrainConfig, resume: bool, name: str) -> int:
    """The body of a trainer's main(): checks, run folder, config.json, run; exit codes as documented."""
    trainer = None
    ignore_sigusr1_outside_the_loop()
    try:
        train_meta, test_meta = trainer_class.check_databases(config)
        cluster = resolve_cluster(config.distribution) or Cluster()
        if cluster.multi_worker:
            _prefix_log_lines(f"[worker {cluster.worker_index}] ")
        folder = RunFolder(config.output_dir)
        keep_started_settings(folder, config)
        if cluster.is_chief:
            resume = folder.prepare(dataclasses.asdict(config), resume, RESUME_IGNORED,
                                    defaults=dataclasses.asdict(type(config)()))
            if resume:
                check_resumed_data(folder, train_meta, test_meta)
            handler = log_to_file(folder)
        else:
            # the chief creates and checks the folder; the others only follow its checkpoint
            resume, handler = folder.has_checkpoint(), None
        trainer = trainer_class(config, train_meta, test_meta, resume, cluster)
        trainer.setup()
        if cluster.is_chief:
            trainer.run_config().save(folder.config)
        code = trainer.run()
        if code == exit_codes.PREEMPTED:
            # SLURM may deliver the signal twice (to the task and through launch/task.py); at interpreter
            # exit Python restores the default action of handled signals, which would turn the 75 into
            # 128 + N. Ignored signals stay ignored.
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        if handler is not None:
            logging.getLogger().removeHandler(handler)
        return code
    except TrainError as exc:
        logging.getLogger(name).error("%s", exc)
        return exit_codes.BAD_INPUT
    except WriteError as exc:  # a full disk under --output_dir: the last good checkpoint is kept
        logging.getLogger(name).error("%s", exc)
        return exit_codes.FAILED
    finally:
        if trainer is not None:
            trainer.close()


def _prefix_log_lines(prefix: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(prefix + cli.LOG_FORMAT))
