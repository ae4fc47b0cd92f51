"""The settings every trainer shares: ``BaseTrainConfig``, its command-line flags (NIST's names), the
mapping of a ``--config`` file plus flags onto a trainer's config dataclass, and the checks of those
settings against the databases before any work.

A trainer's config dataclass (``unet.TrainConfig``, ``maskrcnn.MaskRCNNTrainConfig``) subclasses
``BaseTrainConfig`` with its model's fields; ``config.json``'s ``train`` section is that dataclass.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import augment
from enki_seg.cli import parse_key_values
from enki_seg.data import records
from enki_seg.data.normalization import DEFAULT_PERCENTILES, SCOPES as NORMALIZATION_SCOPES
from enki_seg.data.normalization import METHODS as NORMALIZATIONS
from enki_seg.data.normalization import Normalization
from enki_seg.training.distribution import DISTRIBUTIONS, PRECISIONS
from enki_seg.training.errors import TrainError

logger = logging.getLogger(__name__)


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
    crop_size: int = 0                   # >0: train on random crops of this side (0: records whole, or the
                                         # smallest record size when records differ: untiled, several sizes)
    normalization: str = "zscore"
    normalization_scope: str = "tile"    # tile (NIST) | image: the source image's statistics for all its tiles
    normalization_percentiles: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    seed: int = 0
    mixed_precision: bool = False        # NIST's flag: 1 means precision mixed_float16
    precision: str = "float32"           # float32 | mixed_float16 | mixed_bfloat16 | auto (see distribution.py)
    steps_per_execution: int = 1         # training steps per tf.function call (clipped to logs/intervals)
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
    allow_foreign_test_database: bool = False  # a test database of another build, deliberately (no shared sources)

    def resolved_warmup(self) -> int:
        return min(self.test_every_n_steps, 1000) if self.warmup_steps is None else self.warmup_steps

    def augment_config(self) -> augment.AugmentConfig | None:
        if not self.use_augmentation:
            return None
        base = augment.AugmentConfig.from_file(self.augmentation_config) if self.augmentation_config \
            else augment.AugmentConfig()
        return augment.AugmentConfig.from_dict({**base.to_dict(), **self.augmentation})

    def normalizer(self, train_meta) -> Normalization:
        """The run's normalization (``dataset`` takes its statistics from ``train_meta``); ValueError on
        bad settings."""
        if self.normalization == "dataset" and train_meta is None:
            return Normalization("zscore", scope=self.normalization_scope,
                                 percentiles=self.normalization_percentiles)  # settings check only
        return Normalization.from_metadata(self.normalization, train_meta, self.normalization_scope,
                                           self.normalization_percentiles)


# Settings that may differ between a run and its continuation without making it "a different run".
# The database paths may change too (launch/ copies them to node-local scratch, a new path per job):
# run_folder.check_resumed_data() compares their contents' record counts with the run's instead.
RESUME_IGNORED = ("max_steps", "log_every", "steps_per_execution", "cpu_replicas", "reader_count", "test_images", "distribution",
                  "train_database", "test_database", "allow_foreign_test_database")


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
    p.add_argument("--crop_size", type=int,
                   help="train on random square crops of this side (a multiple of the model's size multiple); "
                        "default: records whole, or, when they differ in size (untiled images of several "
                        "sizes), crops of the smallest record's size")
    p.add_argument("--normalization", choices=NORMALIZATIONS,
                   help="zscore (NIST, default), percentile (low/high -> 0/1), minmax, dataset, none")
    p.add_argument("--normalization_scope", choices=NORMALIZATION_SCOPES,
                   help="tile (default, NIST): statistics of each tile; image: of its whole source image, "
                        "so tiles of one image agree")
    p.add_argument("--normalization_percentiles", type=_float_list, metavar="LOW,HIGH",
                   help="for --normalization percentile (default 1,99.8)")
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed_precision", type=int, choices=(0, 1), help="NIST's flag: 1 = --precision mixed_float16")
    p.add_argument("--steps_per_execution", type=int,
                   help="training steps run inside one tf.function call (1); logging, test intervals, "
                        "checkpoints and stops still happen exactly where they would")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="float32, mixed_float16 (loss-scaled; GPUs), mixed_bfloat16 (GPUs of compute "
                        "capability >= 8.0, CPUs with AMX/AVX512-BF16), or auto: mixed_bfloat16 where the hardware "
                        "computes it natively and the model gains from it, float32 elsewhere (logged; a resumed run "
                        "keeps its precision). Default: auto for train_unet.py, float32 for train_maskrcnn.py")
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
    p.add_argument("--allow_foreign_test_database", type=int, choices=(0, 1),
                   help="accept a test database from another build_lmdb.py run than the train database "
                        "(refused otherwise); no source image may be in both")
    p.add_argument("--resume", type=int, choices=(0, 1), default=0,
                   help="continue the run in --output_dir (also automatic when the settings match)")
    p.add_argument("--verbose", type=int, choices=(0, 1), default=0,
                   help="also show TensorFlow's start-up lines and INFO logs (not a setting of the run)")


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
    overrides = parse_key_values(getattr(args, "augment", None), "--augment", TrainError)
    if overrides:
        values["augmentation"] = {**values.get("augmentation", {}),
                                  **{key: yaml.safe_load(value) for key, value in overrides.items()}}
    config = config_class(**values)
    for name in ("train_database", "test_database", "output_dir"):
        if not getattr(config, name):
            raise TrainError(f"--{name} is required")
    try:
        config.augment_config()
    except (ValueError, OSError) as exc:
        raise TrainError(f"augmentation settings: {exc}") from None
    if config.mixed_precision:
        if config.precision not in ("float32", "mixed_float16", "auto"):
            raise TrainError(f"--mixed_precision 1 means --precision mixed_float16, but --precision is "
                             f"{config.precision}; give one of the two")
        config.precision = "mixed_float16"
    try:
        config.normalizer(None)
    except ValueError as exc:
        raise TrainError(f"--normalization: {exc}") from None
    if config.crop_size < 0:
        raise TrainError(f"--crop_size must be >= 0, got {config.crop_size}")
    if config.steps_per_execution < 1:
        raise TrainError(f"--steps_per_execution must be >= 1, got {config.steps_per_execution}")
    if config.precision not in PRECISIONS:
        raise TrainError(f"--precision {config.precision!r} must be one of {', '.join(PRECISIONS)}")
    if config.distribution not in DISTRIBUTIONS:
        raise TrainError(f"--distribution {config.distribution!r} must be one of {', '.join(DISTRIBUTIONS)}")
    if config.lr_schedule != "constant" and config.max_steps is None and not (
            config.lr_schedule == "step" and config.lr_decay_steps):
        raise TrainError(f"--lr_schedule {config.lr_schedule} needs --max_steps")
    if config.lr_decay_levels is not None and len(config.lr_decay_levels) != len(config.lr_decay_steps or []):
        raise TrainError(f"--lr_decay_levels has {len(config.lr_decay_levels)} values but --lr_decay_steps has "
                         f"{len(config.lr_decay_steps or [])}; give one level per step")
    return config


def check_databases(config: BaseTrainConfig, check_class_ids: bool = True):
    """(train, test) DatasetMetadata; TrainError before any work for missing databases, a pair that is
    not the train and test database of one build (see :func:`check_pair`), mismatched channels/dtype
    or (``check_class_ids``) class ids beyond --number_classes."""
    metas = {}
    for name in ("train_database", "test_database"):
        path = getattr(config, name)
        if not Path(path).is_dir():
            if any(Path(path).parent.glob(".replace-*.json")):
                raise TrainError(f"--{name} {path} does not exist: a build_lmdb.py run replacing it was killed; run "
                                 "build_lmdb.py again with the same --output_folder and --dataset_name to finish it")
            raise TrainError(f"--{name} {path} does not exist (build it with build_lmdb.py)")
        try:
            metas[name] = records.read_metadata(path)
        except records.RecordError as exc:
            raise TrainError(f"--{name}: {exc}") from None
    train, test = metas["train_database"], metas["test_database"]
    check_pair(config, train, test)
    check_normalization(config, metas)
    if (train.channels, train.image_dtype) != (test.channels, test.image_dtype):
        raise TrainError(
            f"train database {config.train_database} has {train.channels} channel(s) of {train.image_dtype} but "
            f"test database {config.test_database} has {test.channels} of {test.image_dtype}; build both "
            "from the same kind of images"
        )
    found = sorted(set(train.class_ids) | set(test.class_ids))
    if check_class_ids and found and max(found) >= config.number_classes:
        if found[-1] == 255 and len(found) <= 3:  # {0, 255} or {255} (or with 1): a 0/255 binary export
            raise TrainError(
                f"the databases hold class ids {found} but --number_classes is {config.number_classes}: the "
                "masks look like a 0/255 binary export; rebuild the databases with build_lmdb.py "
                "--label_map 255=1"
            )
        raise TrainError(
            f"the databases hold class ids {found} but --number_classes is {config.number_classes}; "
            f"use --number_classes {max(found) + 1}"
        )
    return train, test


def check_normalization(config: BaseTrainConfig, metas: dict) -> None:
    """TrainError unless every record of both databases has the statistics ``--normalization_scope
    image`` needs (stored per source image by build_lmdb.py)."""
    normalization = config.normalizer(metas["train_database"])
    if not normalization.per_image:
        return
    for name, meta in metas.items():
        path = getattr(config, name)
        if not meta.source_stats:
            raise TrainError(f"--{name} {path} has no per-image statistics (built before they existed); rebuild "
                             "it with build_lmdb.py or use --normalization_scope tile")
        first = meta.sources[0].image if meta.sources else None
        if first is not None:
            try:
                normalization.affine_from_source_stats(meta.source_stats[first], f"--{name} {path}")
            except (KeyError, ValueError) as exc:
                raise TrainError(str(exc) if isinstance(exc, ValueError) else
                                 f"--{name} {path}: no statistics for source image {first}; rebuild it") from None


def check_pair(config: BaseTrainConfig, train: records.DatasetMetadata, test: records.DatasetMetadata) -> None:
    """TrainError unless the databases are the train and test split of one build_lmdb.py run, or of two
    runs with ``allow_foreign_test_database`` and no source image in both. A database without a build id
    (built before build ids existed) only gets a warning."""
    train_path, test_path = config.train_database, config.test_database
    same_build = train.build_id is not None and train.build_id == test.build_id
    if Path(train_path).resolve() == Path(test_path).resolve() or (same_build and train.split == test.split):
        suggestion = Path(test_path).with_name("test-" + Path(test_path).name[len("train-"):])
        hint = f", e.g. {suggestion}" if Path(test_path).name.startswith("train-") and suggestion.is_dir() else ""
        raise TrainError(f"--test_database {test_path} is the same database as --train_database {train_path} "
                         f"({test.split} split of build {test.build_id or 'unknown'}); give that build's test "
                         f"database{hint}")
    if same_build:
        return
    if train.build_id is not None and test.build_id is not None and not config.allow_foreign_test_database:
        raise TrainError(f"--train_database {train_path} is from build {train.build_id} but --test_database "
                         f"{test_path} is from build {test.build_id}; use the pair of one build_lmdb.py run, or "
                         "pass --allow_foreign_test_database 1 if the pairing is deliberate")
    if config.allow_foreign_test_database:
        shared = sorted(_source_images(train) & _source_images(test))
        if shared:
            raise TrainError(f"--allow_foreign_test_database: {len(shared)} source image(s) of --test_database "
                             f"{test_path} are also in --train_database {train_path}, e.g. {shared[0]}; a test "
                             "database must not hold training images")
        logger.info("test database %s (build %s) is paired deliberately with train database %s (build %s); "
                    "they share no source image", test_path, test.build_id or "unknown", train_path,
                    train.build_id or "unknown")
        return
    unknown = [path for path, meta in ((train_path, train), (test_path, test)) if meta.build_id is None]
    logger.warning("%s: no build id (built before build ids existed), so nothing checks that the train and test "
                   "databases come from one build; rebuild with build_lmdb.py to get that check", ", ".join(unknown))


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _source_images(meta: records.DatasetMetadata) -> set[str]:
    """The source image files of a database's records, as absolute paths where the build recorded its folder."""
    folder = (meta.build_args or {}).get("image_folder")
    return {str(Path(folder) / src.image) if folder else src.image for src in meta.sources}
