"""FitConfig: every knob of one fit, with validation and TOML round-tripping.

A config is flat (one namespace, so a flag, a TOML key, an MLflow param and a sweep
parameter all use the same name) but is written to TOML in sections for reading:

    [data]   data, data_path, val_fraction, limit, balanced, augment
    [model]  filters, kernel_sizes, strides, padding, pool, hidden, dtype
    [optim]  epochs, batch_size, lr, momentum, nesterov, l2, schedule and its parameters
    [run]    seed, threads, patience, monitor, experiment, run_name, out, track, ...

A TOML file may use the sections or plain top-level keys; both load the same.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convtrain.errors import ConfigError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SCHEDULES = ("constant", "step", "cosine", "cyclic")
MONITORS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "train_loss")
DTYPES = ("float32", "float64")
PADDING_WORDS = ("same", "valid")


def _section(name, default, **kwargs):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"section": name}, **kwargs)
    return field(default=default, metadata={"section": name}, **kwargs)


@dataclass
class FitConfig:
    # [data]
    data: str = _section("data", "digits")
    data_path: str | None = _section("data", None)
    val_fraction: float = _section("data", 0.1)
    limit: int | None = _section("data", None)
    balanced: bool = _section("data", False)
    augment: bool = _section("data", False)
    # [model]: one entry per conv block; a single entry applies to every block
    filters: list[int] = _section("model", [16, 32])
    kernel_sizes: list[Any] = _section("model", [3])
    strides: list[int] = _section("model", [1])
    padding: list[Any] = _section("model", [0])
    pool: list[int] = _section("model", [0])
    hidden: list[int] = _section("model", [])
    dtype: str = _section("model", "float32")
    # [optim]
    epochs: int = _section("optim", 12)
    batch_size: int = _section("optim", 64)
    lr: float = _section("optim", 0.05)
    momentum: float = _section("optim", 0.9)
    nesterov: bool = _section("optim", False)
    l2: float = _section("optim", 1e-4)
    schedule: str = _section("optim", "constant")
    step_epochs: int = _section("optim", 10)
    gamma: float = _section("optim", 0.1)
    eta_min: float = _section("optim", 1e-5)
    eta_max: float = _section("optim", 1e-1)
    n_s: int = _section("optim", 500)
    cycles: int | None = _section("optim", None)
    # [run]
    seed: int = _section("run", 0)
    threads: int | None = _section("run", None)
    patience: int | None = _section("run", None)
    monitor: str = _section("run", "val_loss")
    experiment: str = _section("run", "convtrain")
    run_name: str | None = _section("run", None)
    out: str | None = _section("run", None)
    track: bool = _section("run", True)
    tracking_uri: str | None = _section("run", None)
    log_every: int = _section("run", 10)
    # a name in the MLflow model registry: the fit's model becomes its next version
    register_model: str | None = _section("run", None)
    # an MLflow run id this fit's run becomes a child of (a sweep's best.toml sets its parent)
    parent_run: str | None = _section("run", None)

    # ---- construction -------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "FitConfig":
        """Build from flat or sectioned keys; unknown keys are refused with a suggestion."""
        flat = _flatten_sections(values, source)
        _check_known_keys(flat, source)
        try:
            config = cls(**{k: _coerce(k, v) for k, v in flat.items()})
            config.validate()
        except ConfigError as exc:
            if source == "config":
                raise
            raise ConfigError(f"{source}: {exc}") from None
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> "FitConfig":
        return cls.from_dict(read_toml(path), source=str(path))

    def with_overrides(self, overrides: dict[str, Any]) -> "FitConfig":
        """A copy with the non-None entries of `overrides` applied (flags over file)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        _check_known_keys(given, "overrides")
        merged = {**self.to_dict(), **{k: _coerce(k, v) for k, v in given.items()}}
        config = FitConfig(**merged)
        config.validate()
        return config

    # ---- views --------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.filters)

    def per_block(self, name: str) -> list[Any]:
        """The per-block list `name` broadcast to one entry per conv block."""
        values = getattr(self, name)
        return list(values) * self.num_blocks if len(values) == 1 else list(values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_sections(self) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            sections.setdefault(f.metadata["section"], {})[f.name] = getattr(self, f.name)
        return sections

    def to_toml(self) -> str:
        return dump_toml(self.to_sections())

    def save_toml(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_toml(), encoding="utf-8")
        return path

    def flat_params(self) -> dict[str, str]:
        """Every field as a string, for MLflow params (lists comma-joined, None as '')."""
        params = {}
        for name, value in self.to_dict().items():
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            params[name] = "" if value is None else str(value)
        return params

    # ---- validation ---------------------------------------------------------------

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field, its value and what was expected."""
        from convtrain.data.registry import DATASETS, needs_path  # the registry owns the names

        _expect(self.data in DATASETS, "data", self.data, f"one of {', '.join(DATASETS)}")
        if needs_path(self.data) and not self.data_path:
            raise ConfigError(f"data_path: data set {self.data!r} needs --data-path (a directory, or the .npz file)")
        vf = self.val_fraction
        _expect(vf >= 0 and (vf < 1 or float(vf).is_integer()), "val_fraction", vf,
                "a fraction in [0, 1) or a whole count >= 1")
        _expect(self.limit is None or self.limit > 0, "limit", self.limit, "a positive count")

        _expect(len(self.filters) >= 1, "filters", self.filters, "at least one conv block")
        for name in ("filters", "hidden"):
            for v in getattr(self, name):
                _expect(isinstance(v, int) and v > 0, name, getattr(self, name), "positive whole numbers")
        for name in ("kernel_sizes", "strides", "padding", "pool"):
            values = getattr(self, name)
            _expect(len(values) in (1, self.num_blocks), name, values,
                    f"1 or {self.num_blocks} entries (one per conv block)")
        for k in self.kernel_sizes:
            pair = k if isinstance(k, list) else [k]
            _expect(all(isinstance(v, int) and v > 0 for v in pair) and len(pair) in (1, 2),
                    "kernel_sizes", self.kernel_sizes, "positive sizes (an int or [height, width])")
        for s in self.strides:
            _expect(isinstance(s, int) and s > 0, "strides", self.strides, "positive whole numbers")
        for p in self.padding:
            _expect(p in PADDING_WORDS or (isinstance(p, int) and p >= 0), "padding", self.padding,
                    "whole numbers >= 0, 'same' or 'valid'")
        for p in self.pool:
            _expect(isinstance(p, int) and p >= 0, "pool", self.pool, "pool sizes >= 0 (0 = no pooling)")
        _expect(self.dtype in DTYPES, "dtype", self.dtype, " or ".join(DTYPES))

        _expect(self.epochs > 0, "epochs", self.epochs, "a positive count")
        _expect(self.batch_size > 0, "batch_size", self.batch_size, "a positive count")
        _expect(_finite(self.lr) and self.lr > 0, "lr", self.lr, "a learning rate > 0")
        _expect(_finite(self.momentum) and 0 <= self.momentum < 1, "momentum", self.momentum, "a value in [0, 1)")
        _expect(_finite(self.l2) and self.l2 >= 0, "l2", self.l2, "lambda >= 0")
        _expect(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        _expect(self.step_epochs > 0, "step_epochs", self.step_epochs, "a positive count")
        _expect(_finite(self.gamma) and 0 < self.gamma <= 1, "gamma", self.gamma, "a factor in (0, 1]")
        _expect(_finite(self.eta_min) and self.eta_min >= 0, "eta_min", self.eta_min, "a learning rate >= 0")
        _expect(_finite(self.eta_max) and self.eta_max > self.eta_min, "eta_max", self.eta_max,
                f"a learning rate > eta_min ({self.eta_min})")
        _expect(self.n_s > 0, "n_s", self.n_s, "a positive number of updates")
        _expect(self.cycles is None or self.cycles > 0, "cycles", self.cycles, "a positive count")

        _expect(self.threads is None or self.threads > 0, "threads", self.threads, "a positive count")
        _expect(self.patience is None or self.patience > 0, "patience", self.patience, "a positive count")
        _expect(self.monitor in MONITORS, "monitor", self.monitor, f"one of {', '.join(MONITORS)}")
        _expect(bool(self.experiment), "experiment", self.experiment, "a non-empty name")
        _expect(self.log_every > 0, "log_every", self.log_every, "a positive number of steps")
        _expect(self.register_model is None or (bool(str(self.register_model).strip())
                                                and not set(str(self.register_model)) & set("/:%")),
                "register_model", self.register_model, "a model registry name without '/', ':' or '%'")
        _expect(self.parent_run is None or str(self.parent_run).isalnum(), "parent_run", self.parent_run,
                "an MLflow run id")


# ---- helpers ----------------------------------------------------------------------

FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(FitConfig)}
_SECTIONS = {f.metadata["section"] for f in dataclasses.fields(FitConfig)}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _expect(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: got {value!r}, expected {expected}")


def _copy(value):
    return list(value) if isinstance(value, list) else value


def _flatten_sections(values: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SECTIONS and isinstance(value, dict):
            for inner, v in value.items():
                if inner in flat:
                    raise ConfigError(f"{source}: key {inner!r} is given twice")
                flat[inner] = v
        else:
            if key in flat:
                raise ConfigError(f"{source}: key {key!r} is given twice")
            flat[key] = value
    return flat


def _check_known_keys(values: dict[str, Any], source: str) -> None:
    for key in values:
        if key not in FIELD_TYPES:
            raise ConfigError(f"{source}: unknown key {key!r}{did_you_mean(key, FIELD_TYPES)}")


_LIST_EXPECTATIONS = {
    "filters": "whole numbers, e.g. 16,32",
    "hidden": "whole numbers, e.g. 128 (or nothing)",
    "kernel_sizes": "kernel sizes, e.g. 3,3 or 5x3 (height x width)",
    "strides": "whole numbers, e.g. 1,2",
    "padding": "whole numbers >= 0, 'same' or 'valid'",
    "pool": "pool sizes, e.g. 2,0 (0 = no pooling)",
}


def _coerce(name: str, value: Any) -> Any:
    """Accept the spellings a TOML file or a flag naturally gives: '16,32' or 16 for a list."""
    kind = FIELD_TYPES[name]
    try:
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [_list_item(name, v) for v in value]
        if value is None:
            return None
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("str"):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        expected = _LIST_EXPECTATIONS.get(name, f"a value of type {kind}")
        raise ConfigError(f"{name}: got {value!r}, expected {expected}") from None
    return value


def _list_item(name: str, v: Any) -> Any:
    if name == "padding" and isinstance(v, str) and v in PADDING_WORDS:
        return v
    if name == "kernel_sizes":
        if isinstance(v, str) and "x" in v:  # "5x3" on the command line means [5, 3]
            return [int(p) for p in v.split("x")]
        if isinstance(v, (list, tuple)):
            return [int(p) for p in v]
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, float) and not v.is_integer():
        raise ValueError
    return int(v)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Write {section: {key: value}} as TOML; None values are left out (TOML has no null)."""
    lines: list[str] = []
    for section, values in sections.items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
