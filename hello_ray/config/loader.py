"""The whole ``Config``, and how it is made: presets (package data), YAML files, ``key=value``
overrides, typed coercion, validation; what of it enters artifact keys."""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any

import yaml

from hello_ray.config.sections import (
    parse_window,
    ComputeConfig,
    ConfigError,
    DataConfig,
    ImagesConfig,
    PRESET_DIR,
    RecoverConfig,
    RefineConfig,
    SelectConfig,
    TeacherConfig,
    TransferConfig,
    _check,
    _help,
)
from hello_ray.config.evaluate import (
    EvalConfig,
    PROTOCOLS,
    SweepConfig,
)


@dataclass
class Config:
    name: str = _help("run name (prefix of the report folder)", default="imagenet1k")
    store: str = _help("artifact store URI: a local path, file:// or s3://bucket/prefix",
                       default="./artifacts")
    s3_endpoint: str = _help("S3 endpoint for MinIO/Ceph/R2 ('' = AWS_ENDPOINT_URL_S3 / "
                             "AWS_ENDPOINT_URL / AWS)", default="")
    s3_timeout: float = _help("seconds an S3 request may wait for the server (boto3 and the pyarrow "
                              "filesystems handed to Ray alike)", default=60.0)
    s3_max_attempts: int = _help("attempts per S3 request, retries included (boto3 'standard' mode, "
                                 "pyarrow's AwsStandardS3RetryStrategy); Ray Data readers retry a "
                                 "failed read that many times again", default=3)
    store_shared: bool = _help("a local / file:// store is one file system that every Ray node mounts "
                               "(NFS, EFS, Lustre); without it a run on a multi-node cluster refuses a "
                               "local store, since each node's workers would write to their own disk",
                               default=False)
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    teachers: TeacherConfig = field(default_factory=TeacherConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> "Config":
        _check(math.isfinite(self.s3_timeout) and self.s3_timeout > 0, "s3_timeout",
               "must be a finite number of seconds > 0")
        _check(self.s3_max_attempts >= 1, "s3_max_attempts", "must be >= 1")
        _check(not (self.store_shared and self.store.startswith("s3://")), "store_shared",
               f"declares a local store shared between nodes, but store={self.store} is S3, which every "
               "node reaches already; remove store_shared")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v.validate(f.name)
        windows = [("transfer.teacher_window", self.transfer.teacher_window, self.transfer.n_teachers)]
        n_sweep = self.sweep.n_teachers or self.transfer.n_teachers
        windows += [("sweep.windows", w, n_sweep) for w in self.sweep.windows]
        for key, window, n in windows:
            lo, hi = parse_window(window, key)
            _check(hi <= self.teachers.epochs, key,
                   f"window {window} ends after the last teacher epoch ({self.teachers.epochs})")
            _check(hi - lo + 1 >= n, key, f"window {window} spans {hi - lo + 1} epochs, fewer than the "
                   f"{n} distinct teachers asked for (transfer.n_teachers / sweep.n_teachers)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- loading

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp`` (nanoGPT-style: no silent retyping)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, UnionType):  # e.g. a list of names or a mapping key -> name
        options = typing.get_args(tp)
        for option in options:
            if isinstance(value, typing.get_origin(option) or option):
                return _coerce(value, option, key)
        kinds = " or ".join("a list" if typing.get_origin(o) is list else "a mapping"
                            if typing.get_origin(o) is dict else getattr(o, "__name__", str(o)) for o in options)
        raise ConfigError(f"config key '{key}': expected {kinds}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .inf / .nan as floats; no setting means either
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _merge(obj: Any, updates: dict[str, Any], prefix: str, source: str,
           explicit: set[str] | None = None) -> None:
    types = _field_types(type(obj))
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if explicit is not None:
            explicit.add(key)
        if k not in types:
            valid = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key '{key}' (from {source}); valid keys here: {valid}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' (from {source}) is a section; give a mapping")
            _merge(cur, v, f"{key}.", source, explicit)
        elif typing.get_origin(types[k]) is dict and isinstance(v, dict) and isinstance(cur, dict):
            setattr(obj, k, {**cur, **_coerce(v, types[k], key)})  # per-key update of a table
        else:
            setattr(obj, k, _coerce(v, types[k], key))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _target_type(cfg: Any, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj):
            return None
        tp = _field_types(type(obj)).get(part)
        obj = getattr(obj, part, None)
    return tp


def preset_path(preset: str) -> Path:
    """A preset name (``smoke``: ``PRESET_DIR/smoke.yaml``) or a path to a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file {path} not found (relative to {Path.cwd()}); the "
                              f"bundled presets are named without a path: {', '.join(preset_names())}")
        return path
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}; presets in {PRESET_DIR}: {', '.join(preset_names())}")
    return path


def preset_names() -> list[str]:
    """The bundled presets, by the name ``--preset`` takes."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _load_yaml(path: Path, seen: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """A YAML file and the chain of presets it ``extends``, base first."""
    if str(path) in seen:
        raise ConfigError(f"preset cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("extends", None)
    chain = _load_yaml(preset_path(base), seen + (str(path),)) if base else []
    return chain + [(data, str(path))]


def load_config(preset: str | None = "demo", config_file: str | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults <- preset YAML <- user YAML file <- ``key=value`` overrides, then validate.

    Values in overrides are parsed as YAML scalars/lists (``select.ipc=10``,
    ``evaluate.seeds=[0,1]``, ``data.source=s3://bucket/imagenet``).
    """
    cfg = Config()
    explicit: set[str] = set()   # dotted keys some layer set: an evaluation protocol leaves them alone
    layers: list[tuple[dict[str, Any], str]] = []
    if preset:
        layers += _load_yaml(preset_path(preset))
    if config_file:
        layers += _load_yaml(Path(config_file))
    for data, source in layers:
        _merge(cfg, data, "", source, explicit)
    if isinstance(overrides, dict):
        overrides = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. select.ipc=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if value is None or _target_type(cfg, key.strip()) is str:
            value = raw  # a string key keeps exactly what was typed ('1.0', 'null', ...)
        elif isinstance(value, str):
            # '1e-3' parses as a string in YAML 1.1; numbers are numbers.
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        _merge(cfg, _nest(key.strip(), value), "", "command line", explicit)
    apply_protocol(cfg.evaluate, explicit)
    return cfg.validate()


def apply_protocol(ev: "EvalConfig", explicit: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Set the keys ``evaluate.protocol`` decides (``PROTOCOLS``), except those given explicitly."""
    if ev.protocol not in PROTOCOLS:
        raise ConfigError(f"config key 'evaluate.protocol': {ev.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    for k, v in PROTOCOLS[ev.protocol].items():
        if f"evaluate.{k}" not in explicit:
            setattr(ev, k, v)


def section_dict(cfg: Any) -> dict[str, Any]:
    """A stage config as a plain dict (the part of an artifact key that config contributes)."""
    return dataclasses.asdict(cfg)


# How a dataset is read, not what it holds: left out of artifact keys, so changing them reuses work.
# (Where images are decoded changes pixels by a resize kernel's rounding, as a GPU's arithmetic does.)
DATA_RUNTIME_FIELDS = ("cpus_per_task", "decode")
# How the training stages augment it: in the keys of those stages only.
DATA_TRAINING_FIELDS = ("train_crop",)


def data_identity(data: DataConfig, training: bool = False) -> dict[str, Any]:
    """The data section as it enters artifact keys: what is read, not how; ``training``: with the
    fields only the stages that train on the raw images use (teachers, transfer)."""
    drop = DATA_RUNTIME_FIELDS + (() if training else DATA_TRAINING_FIELDS)
    return {k: v for k, v in section_dict(data).items() if k not in drop}


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key, for ``--help-config``."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            rows += describe(type(v), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(v), f.metadata.get("help", "")))
    return rows
