"""Sweep files: parse and validate `sweep-*.toml` into a SweepSpec.

    base = "fit-digits.toml"          # optional, relative to this file
    [fit]                             # optional overrides on top of base (flat or sectioned)
    epochs = 4
    [sweep]                           # all optional
    name = "digits-filters"           # study name (default: the file's stem)
    method = "grid"                   # grid | random | tpe
    n_trials = 6                      # default: the grid's size, or 20
    objective = "val_accuracy"        # direction follows (val_loss minimizes)
    seed = 0
    pruner = "none"                   # none | median | hyperband
    register_model = "digits-net"     # the best trial's model becomes a new version of this
    [space]                           # any FitConfig field
    filters = [[8, 16], [16, 32]]     # choices
    lr = {low = 0.01, high = 0.1, log = true}   # a range (int if the field is int)
    "layers.res2.filters" = [32, 64]  # a setting of one layer of the list, by the layer's name
                                      # (a residual block's filters: every conv in it)
    layers.head_dropout.p = {low = 0.1, high = 0.5}   # the same, as TOML dotted keys

Bounds (a file, or a flag, must not be able to hang the sweep or fill the memory): at most
MAX_TRIALS trials, a grid of at most MAX_GRID_POINTS points (counted arithmetically before
a single point is listed). The study name may be anything; the folder it names by default
(runs/<name>) is cleaned like a fit's run_name, so `name = "../../x"` stays under runs/.

Everything wrong with a file is a ConfigError with one line naming the file, the key,
the bad value and what was expected. Nothing here imports optuna: parsing stays cheap,
and a trial draws its values where it runs (sweep/worker.py, suggest).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convtrain.config import (FIELD_TYPES, LAYER_SETTING_PREFIX, FitConfig, is_layer_setting, read_toml,
                              setting_type, setting_value)
from convtrain.errors import ConfigError, did_you_mean
from convtrain.tracking.safe_names import safe_name

METHODS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
# objective -> the direction that makes it better
OBJECTIVES = {
    "val_accuracy": "maximize",
    "val_balanced_accuracy": "maximize",
    "val_loss": "minimize",
    "train_accuracy": "maximize",
    "train_loss": "minimize",
    "train_cost": "minimize",
}
DIRECTIONS = ("maximize", "minimize")
DEFAULT_RANDOM_TRIALS = 20
# Each trial is a ticket row in the study, issued up front, and at least one fit: ten thousand
# is beyond any sweep that finishes, and still a study that loads in a second.
MAX_TRIALS = 10_000
# A grid that runs in full is listed in full: a million points is a few hundred MB of dicts.
MAX_GRID_POINTS = 1_000_000
# The sweep sets these per trial (names, places, threads per worker), so they cannot be swept.
NOT_SWEEPABLE = ("experiment", "run_name", "out", "track", "tracking_uri", "threads", "register_model",
                 "parent_run")

_TOP_KEYS = ("base", "fit", "sweep", "space")
_SWEEP_KEYS = ("name", "method", "n_trials", "objective", "direction", "seed", "pruner",
               "warmup_epochs", "startup_trials", "out", "register_model")
_RANGE_KEYS = ("low", "high", "log", "step")


@dataclass(frozen=True)
class Choices:
    """A categorical parameter. Optuna stores only scalars, so list values (filters =
    [[8, 16], [16, 32]]) travel as labels ("8,16") and are decoded by lookup."""

    name: str
    values: tuple
    labels: tuple

    def decode(self, label):
        return self.values[self.labels.index(label)]

    def grid_labels(self) -> list:
        return list(self.labels)

    def grid_count(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        return json.dumps(list(self.labels))


@dataclass(frozen=True)
class Range:
    """An int or float interval, optionally log-scaled or stepped."""

    name: str
    low: float
    high: float
    integer: bool
    log: bool = False
    step: float | None = None

    def decode(self, value):
        return int(value) if self.integer else float(value)

    def grid_labels(self) -> list | None:
        """The finite set of values a grid walks: every step of an int range (step 1 by
        default) or of a stepped float range; None for a continuous range."""
        if self.integer:
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is None:
            return None
        return [round(self.low + i * self.step, 12) for i in range(self.grid_count())]

    def grid_count(self) -> int | None:
        """How many values grid_labels lists, without listing them."""
        if self.integer:
            return (int(self.high) - int(self.low)) // int(self.step or 1) + 1
        if self.step is None:
            return None
        return int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1

    def describe(self) -> str:
        extra = ", log" if self.log else (f", step {self.step}" if self.step else "")
        kind = "int" if self.integer else "float"
        return f"{kind} [{self.low}, {self.high}{extra}]"


Parameter = Choices | Range


@dataclass
class SweepSpec:
    """A parsed sweep: the base fit config, the space over its fields and how to search it."""

    path: Path
    name: str
    base: FitConfig
    space: dict[str, Parameter]
    method: str = "tpe"
    n_trials: int = DEFAULT_RANDOM_TRIALS
    objective: str = "val_accuracy"
    direction: str = "maximize"
    seed: int = 0
    pruner: str = "none"
    warmup_epochs: int = 1
    startup_trials: int = 5
    out: Path = field(default_factory=lambda: Path("runs"))
    register_model: str | None = None  # registry name the best trial's model is registered under

    def grid_size(self) -> int:
        return math.prod(p.grid_count() for p in self.space.values())

    def grid_points(self) -> list[dict[str, Any]]:
        """The grid's points as Optuna parameter dicts, in file order (first key slowest);
        when n_trials is smaller than the grid, a seeded sample of it, still in that order."""
        names = list(self.space)
        labels = [self.space[n].grid_labels() for n in names]
        size = self.grid_size()
        if self.n_trials >= size:
            return [dict(zip(names, combo)) for combo in itertools.product(*labels)]
        # only the sampled points are built: point i is i written in the mixed radix of the
        # parameters' value counts, the last parameter's digit changing fastest
        keep = sorted(random.Random(self.seed).sample(range(size), self.n_trials))
        points = []
        for index in keep:
            combo = []
            for values in reversed(labels):
                index, digit = divmod(index, len(values))
                combo.append(values[digit])
            points.append(dict(zip(names, reversed(combo))))
        return points

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna parameters -> FitConfig overrides."""
        return {name: self.space[name].decode(value) for name, value in params.items()
                if name in self.space}

    def trial_config(self, params: dict[str, Any], **run_fields) -> FitConfig:
        return self.base.with_overrides({**self.decode(params), **run_fields})

    def fingerprint(self) -> str:
        """What must match for a later run (or another machine) to join an existing study."""
        return json.dumps({
            "method": self.method,
            "objective": self.objective,
            "direction": self.direction,
            "space": {name: p.describe() for name, p in self.space.items()},
        }, sort_keys=True)


def load_sweep(path: str | Path, *, n_trials: int | None = None, study_name: str | None = None) -> SweepSpec:
    """Read and validate a sweep file; command-line n_trials / study_name win over the file."""
    path = Path(path)
    raw = read_toml(path)
    where = str(path)
    _refuse_unknown(raw, _TOP_KEYS, where, "top-level key")
    base = _base_config(raw, path)

    sweep = raw.get("sweep", {})
    _expect_table(sweep, where, "[sweep]")
    _refuse_unknown(sweep, _SWEEP_KEYS, where, "[sweep] key")
    space_table = raw.get("space", {})
    _expect_table(space_table, where, "[space]")
    if not space_table:
        raise ConfigError(f"{where}: [space] is empty; name at least one fit parameter to sweep, e.g. l2 = [1e-4, 1e-3]")
    space = {name: _parameter(name, spec, base, where) for name, spec in _layer_keys(space_table).items()}

    method = _one_of(sweep.get("method", "tpe"), METHODS, where, "method")
    objective = _one_of(sweep.get("objective", "val_accuracy"), tuple(OBJECTIVES), where, "objective")
    direction = _one_of(sweep.get("direction", OBJECTIVES[objective]), DIRECTIONS, where, "direction")
    name = study_name or _text(sweep.get("name", path.stem), where, "name")
    if len(name) > 200:  # a folder name, a run name and a database key
        raise ConfigError(f"{where}: name: {len(name)} characters, expected at most 200")
    spec = SweepSpec(
        path=path,
        name=name,
        base=base,
        space=space,
        method=method,
        objective=objective,
        direction=direction,
        seed=_whole(sweep.get("seed", 0), where, "seed", minimum=0),
        pruner=_one_of(sweep.get("pruner", "none"), PRUNERS, where, "pruner"),
        warmup_epochs=_whole(sweep.get("warmup_epochs", 1), where, "warmup_epochs", minimum=0),
        startup_trials=_whole(sweep.get("startup_trials", 5), where, "startup_trials", minimum=0),
        out=Path(_text(sweep.get("out", f"runs/{safe_name(name, fallback='sweep')}"), where, "out")),
        register_model=_registry_name(sweep.get("register_model"), where),
    )
    if method == "grid":
        continuous = [n for n, p in space.items() if p.grid_count() is None]
        if continuous:
            raise ConfigError(f"{where}: method 'grid' needs a finite set for {continuous[0]!r}: give choices "
                              f"(e.g. {continuous[0]} = [a, b, c]) or a step, or use method 'random' or 'tpe'")
        if spec.grid_size() > MAX_GRID_POINTS:
            raise ConfigError(f"{where}: the grid has {spec.grid_size():,} points, more than the {MAX_GRID_POINTS:,} "
                              "a sweep can list; use fewer values, a coarser step, or method 'random' or 'tpe'")
    given = n_trials if n_trials is not None else sweep.get("n_trials")
    if given is None:
        spec.n_trials = spec.grid_size() if method == "grid" else DEFAULT_RANDOM_TRIALS
    else:
        spec.n_trials = _whole(given, where, "n_trials", minimum=1)
    if spec.n_trials > MAX_TRIALS:
        raise ConfigError(f"{where}: n_trials: {spec.n_trials:,} trials, more than the {MAX_TRIALS:,} a sweep runs; "
                          "ask for fewer" + (" (a grid runs every point unless n_trials says fewer)"
                                             if given is None else ""))
    if given is not None:
        if method == "grid" and spec.n_trials > spec.grid_size():
            raise ConfigError(f"{where}: n_trials {spec.n_trials} exceeds the grid's {spec.grid_size()} points; "
                              "a grid runs each point once")
    return spec


# ---- pieces ----------------------------------------------------------------------------------


def _registry_name(value, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: [sweep] register_model: got {value!r}, expected a model registry name")
    try:
        FitConfig(register_model=value).validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: [sweep] {exc}") from None
    return value


def _base_config(raw: dict, path: Path) -> FitConfig:
    base_name = raw.get("base")
    if base_name is not None:
        if not isinstance(base_name, str) or not base_name:
            raise ConfigError(f"{path}: base: got {base_name!r}, expected the path of a fit TOML")
        base_path = Path(base_name) if Path(base_name).is_absolute() else path.parent / base_name
        config = FitConfig.from_toml(base_path)
    else:
        config = FitConfig()
    overrides = raw.get("fit", {})
    _expect_table(overrides, str(path), "[fit]")
    flat: dict[str, Any] = {}
    for key, value in overrides.items():  # [fit] may be flat or use [fit.optim]-style sections
        flat.update(value if isinstance(value, dict) else {key: value})
    _refuse_unknown(flat, tuple(FIELD_TYPES), str(path), "[fit] key")
    if flat.get("register_model") is not None or config.register_model:
        # every trial would add a version; the sweep registers its best trial's model instead
        raise ConfigError(f"{path}: register_model belongs in [sweep] (the best trial's model is registered), "
                          "not in the fit config every trial uses")
    try:
        return config.with_overrides(flat)
    except ConfigError as exc:
        raise ConfigError(f"{path} [fit]: {exc}") from None


def _layer_keys(space: dict) -> dict:
    """[space] with the TOML dotted keys under `layers` (layers.res2.filters = ...) flattened
    to the names a quoted key gives ("layers.res2.filters")."""
    table = space.get("layers")
    if not isinstance(table, dict) or "choices" in table or "low" in table:
        return space
    flat = {}
    for key, value in space.items():
        if key != "layers":
            flat[key] = value
            continue
        stack = [(LAYER_SETTING_PREFIX.rstrip("."), value)]
        while stack:
            prefix, node = stack.pop(0)
            for inner, spec in node.items():
                leaf = not isinstance(spec, dict) or "choices" in spec or "low" in spec or "high" in spec
                if leaf:
                    flat[f"{prefix}.{inner}"] = spec
                else:
                    stack.append((f"{prefix}.{inner}", spec))
    return flat


def _parameter(name: str, spec: Any, base: FitConfig, where: str) -> Parameter:
    if is_layer_setting(name):
        try:
            setting_value(base, name)
        except (KeyError, StopIteration):
            from convtrain.nn.layer_specs import walk_specs

            names = ", ".join(n for n, _ in walk_specs(base.network_layers()))
            raise ConfigError(f"{where}: [space] {name}: the base network has no such layer setting (its layers: "
                              f"{names})") from None
    elif name not in FIELD_TYPES:
        raise ConfigError(f"{where}: [space] unknown fit parameter {name!r}{did_you_mean(name, FIELD_TYPES)}")
    if name in NOT_SWEEPABLE:
        raise ConfigError(f"{where}: [space] {name!r} cannot be swept: the sweep sets it for each trial")
    if isinstance(spec, dict) and "choices" in spec:
        _refuse_unknown(spec, ("choices",), where, f"[space] {name} key")
        spec = spec["choices"]
    if isinstance(spec, list):
        return _choices(name, spec, base, where)
    if isinstance(spec, dict):
        return _range(name, spec, base, where)
    raise ConfigError(f"{where}: [space] {name}: got {spec!r}, expected a list of choices "
                      "or a range {low = ..., high = ...}")


def _choices(name: str, values: list, base: FitConfig, where: str) -> Choices:
    if not values:
        raise ConfigError(f"{where}: [space] {name}: the list of choices is empty")
    checked = []
    for value in values:
        config = _try_value(name, value, base, where)
        checked.append(setting_value(config, name))
    labels = tuple(_label(v) for v in checked)
    if len(set(labels)) != len(labels):
        repeated = next(label for label in labels if labels.count(label) > 1)
        raise ConfigError(f"{where}: [space] {name}: choice {repeated!r} is given twice")
    return Choices(name, tuple(checked), labels)


def _label(value: Any):
    """A scalar Optuna can store: scalars as they are, a flat list as '16,32', deeper as JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if all(isinstance(v, (int, float, str)) for v in value):
        return ",".join(str(v) for v in value)
    return json.dumps(value, separators=(",", ":"))


def _range(name: str, spec: dict, base: FitConfig, where: str) -> Range:
    _refuse_unknown(spec, _RANGE_KEYS, where, f"[space] {name} key")
    kind = setting_type(name)
    integer = kind.startswith("int")
    if not (integer or kind.startswith("float")):
        raise ConfigError(f"{where}: [space] {name}: a range needs a number parameter; {name} is "
                          f"{'a list' if kind.startswith('list') else kind}, give a list of choices instead")
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"{where}: [space] {name}: a range needs both low and high (missing {key})")
        if not _number(spec[key]) or (integer and not float(spec[key]).is_integer()):
            expected = "a whole number" if integer else "a number"
            raise ConfigError(f"{where}: [space] {name}.{key}: got {spec[key]!r}, expected {expected}")
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise ConfigError(f"{where}: [space] {name}: empty range: low {low!r} must be below high {high!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: [space] {name}.log: got {log!r}, expected true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: [space] {name}: a log range needs low > 0, got {low!r}")
    step = spec.get("step")
    if step is not None:
        if log:
            raise ConfigError(f"{where}: [space] {name}: give log or step, not both")
        if not _number(step) or step <= 0 or (integer and not float(step).is_integer()):
            raise ConfigError(f"{where}: [space] {name}.step: got {step!r}, expected a positive "
                              f"{'whole number' if integer else 'number'}")
    for bound in (low, high):
        _try_value(name, bound, base, where)
    if integer:
        return Range(name, int(low), int(high), True, log, int(step) if step is not None else None)
    return Range(name, float(low), float(high), False, log, float(step) if step is not None else None)


def _try_value(name: str, value: Any, base: FitConfig, where: str) -> FitConfig:
    """Apply one value to the base config, so a bad choice is caught now and not in trial 17."""
    try:
        return base.with_overrides({name: value})
    except ConfigError as exc:
        raise ConfigError(f"{where}: [space] {name} = {value!r} is not a valid fit value: {exc}") from None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _refuse_unknown(table: dict, known: tuple, where: str, what: str) -> None:
    for key in table:
        if key not in known:
            hint = did_you_mean(key, known) or f" (expected one of {', '.join(known)})"
            raise ConfigError(f"{where}: unknown {what} {key!r}{hint}")


def _expect_table(value: Any, where: str, what: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {what} must be a table, got {value!r}")


def _one_of(value: Any, allowed: tuple, where: str, key: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: {key}: got {value!r}, expected one of {', '.join(allowed)}"
                          f"{did_you_mean(value, allowed)}")
    return value


def _whole(value: Any, where: str, key: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {key}: got {value!r}, expected a whole number >= {minimum}")
    return value


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key}: got {value!r}, expected a non-empty string")
    return value
