"""The run-config schema: what a training run writes to ``RUN/config.json`` and what inference and
resume read back. One dataclass, versioned; this module is its only reader and writer.

Schema versions:

* 0 — written before the schema existed (no ``schema_version`` key): the same sections as version 1.
  Still loads; files of early tests and hand-made runs may lack ``train``, ``data``, ``versions``.
* 1 — ``schema_version`` added; the sections below.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from enki_seg.files import atomic_write_text

SCHEMA_VERSION = 1


class RunConfigError(ValueError):
    """config.json is missing, unreadable, from a newer version, or lacks a required section."""


@dataclass
class ModelSection:
    name: str                  # "unet", "fc-densenet", "maskrcnn": inference dispatches on it
    config: dict               # the model's get_config(): rebuilds it
    size_multiple: int = 1     # input sides must be multiples of it


@dataclass
class ClassesSection:
    number_classes: int        # with background (class 0)
    names: dict[str, str] = field(default_factory=dict)  # class id (as a string) -> name

    def name_list(self) -> list[str]:
        return [str(self.names.get(str(k), f"class_{k}")) for k in range(self.number_classes)]


@dataclass
class InputSection:
    channels: int
    dtype: str | None = None          # the training images' dtype (uint16, ...)
    tile_size: int | None = None      # the build's tile size (None: untiled records)
    record_height: int | None = None
    record_width: int | None = None
    #: default inference tile overlap in pixels (Mask R-CNN: at least the largest training object); None: a quarter tile
    inference_overlap: int | None = None

    def default_tile(self) -> int | None:
        """The inference tile: the training tile, or the smaller side of untiled records."""
        if self.tile_size is not None:
            return int(self.tile_size)
        if self.record_height is not None and self.record_width is not None:
            return min(int(self.record_height), int(self.record_width))
        return None


@dataclass
class RunConfig:
    """config.json of one training run."""

    model: ModelSection
    classes: ClassesSection
    input: InputSection
    normalization: dict                  # normalization.Normalization.to_dict()
    train: dict = field(default_factory=dict)        # the trainer's config dataclass, field by field
    augmentation: dict | None = None     # augment.AugmentConfig.to_dict(), None when off
    data: dict = field(default_factory=dict)         # database paths and record counts
    replicas: int = 1
    workers: int = 1
    versions: dict = field(default_factory=dict)     # python, tensorflow, keras, numpy, ...
    extra: dict = field(default_factory=dict)        # sections a trainer adds (kept as written)
    schema_version: int = SCHEMA_VERSION

    # -- writing

    def to_dict(self) -> dict:
        out = {"schema_version": self.schema_version}
        for f in dataclasses.fields(self):
            if f.name not in ("schema_version", "extra"):
                value = getattr(self, f.name)
                out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        out.update(self.extra)
        return out

    def save(self, path: str | Path) -> None:
        """Write atomically (a reader never sees half a file)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=str))

    # -- reading

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "RunConfig":
        if not isinstance(data, dict):
            raise RunConfigError(f"{source} is not a JSON object")
        version = int(data.get("schema_version", 0))
        if version > SCHEMA_VERSION:
            raise RunConfigError(f"{source} has schema version {version}, newer than this code's "
                                 f"{SCHEMA_VERSION}; update the code (git pull) to read it")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            model, classes, inputs = data["model"], data["classes"], data["input"]
            return cls(
                model=ModelSection(name=str(model.get("name", "?")), config=dict(model.get("config") or {}),
                                   size_multiple=int(model.get("size_multiple", 1))),
                classes=ClassesSection(number_classes=int(classes["number_classes"]),
                                       names={str(k): str(v) for k, v in (classes.get("names") or {}).items()}),
                input=InputSection(channels=int(inputs["channels"]), dtype=inputs.get("dtype"),
                                   tile_size=_optional_int(inputs.get("tile_size")),
                                   record_height=_optional_int(inputs.get("record_height")),
                                   record_width=_optional_int(inputs.get("record_width")),
                                   inference_overlap=_optional_int(inputs.get("inference_overlap"))),
                normalization=dict(data["normalization"]),
                train=dict(data.get("train") or {}),
                augmentation=data.get("augmentation"),
                data=dict(data.get("data") or {}),
                replicas=int(data.get("replicas", 1)),
                workers=int(data.get("workers", 1)),
                versions=dict(data.get("versions") or {}),
                extra={k: v for k, v in data.items() if k not in known},
                schema_version=SCHEMA_VERSION,  # read as, and written back as, the current version
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RunConfigError(f"{source} is not a run config of train_unet.py or train_maskrcnn.py "
                                 f"({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise RunConfigError(f"{path} is missing; pass a run folder written by train_unet.py or "
                                 "train_maskrcnn.py") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise RunConfigError(f"{path} cannot be read ({exc}); the run folder is damaged") from None
        return cls.from_dict(data, str(path))


def load_sections(path: str | Path) -> dict:
    """config.json's sections as written, without requiring a complete run config; {} when the file is
    absent. Resuming a run compares only its ``train`` settings and ``data`` record counts."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunConfigError(f"{path} cannot be read ({exc}); the run folder is damaged") from None
    if not isinstance(data, dict):
        raise RunConfigError(f"{path} is not a JSON object")
    if int(data.get("schema_version", 0)) > SCHEMA_VERSION:
        raise RunConfigError(f"{path} has schema version {data['schema_version']}, newer than this code's "
                             f"{SCHEMA_VERSION}; update the code (git pull) to read it")
    return data


def _optional_int(value) -> int | None:
    return None if value is None else int(value)
