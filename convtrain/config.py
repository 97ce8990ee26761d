"""FitConfig: every knob of one fit (the class declares them), and the functions that validate
a config, refuse settings that contradict each other, and read and write it as TOML.

A config is flat (one namespace, so a flag, a TOML key, an MLflow param and a sweep
parameter all use the same name) but is written to TOML in sections for reading:

    [data]   data, data_path, val_fraction, limit, balanced
    [augment] augment (the data set's default pipeline), crop, crop_padding, flip, rotate, cutout,
              mixup, cutmix
    [model]  layers (the network as a layer list), or its shorthand: filters, kernel_sizes,
             strides, padding, pool, hidden, batch_norm, dropout, global_pool, pool_type; dtype
    [optim]  epochs, batch_size, optimizer, lr, momentum, nesterov, l2, AdamW's beta1, beta2,
             eps, weight_decay, label_smoothing, clip_norm, schedule and its parameters
    [run]    seed, threads, conv_algo, patience, monitor, experiment, run_name, out, track, ...

A TOML file may use the sections or plain top-level keys; both load the same.

The network is `layers`, a list of layer specs (convtrain.nn.layer_specs), written as
`[[model.layers]]` tables (a residual block holds its own `layers = [...]` of inline tables).
Left empty, the template options expand into that list (`network_layers`); with a list, they
must stay at their defaults. `--print-config` shows the expanded list (`expanded`).

Each field is declared with `option(section, default, help)`, and `convtrain fit`'s flags are
generated from these (convtrain.cli): a new setting is one line here, e.g.

    dropout: float = option("model", 0.0, "Dropout rate before each dense layer.")

gives `--dropout` (a bool gives `--name/--no-name`, a list takes `16,32`), its help with the
default, its panel, its TOML section and MLflow param. A setting used only by some values of
another (like `n_s` by the cyclic schedule) is declared in SCHEDULE_SETTINGS or checked in
`check_chosen_settings`, so a flag the user gives is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convtrain.errors import ConfigError, did_you_mean, plural
from convtrain.nn.choices import CONV_ALGOS as ENGINE_CONV_ALGOS, GLOBAL_POOLS, POOL_TYPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SCHEDULES = ("constant", "step", "cosine", "cyclic")
MONITORS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "train_loss")
DTYPES = ("float32", "float64")
MAX_RUN_NAME = 250  # MLflow's limit on run names
MAX_EXPERIMENT_NAME = 500
OPTIMIZERS = ("sgd", "adamw")
TRAIN_METRICS = ("running", "full")
CONV_ALGOS = ("auto", *ENGINE_CONV_ALGOS)  # auto: the engine chooses per conv block
PADDING_WORDS = ("same", "valid")


def option(section: str, default: Any, help: str, *, shown: str | None = None) -> Any:
    """A FitConfig field with everything its flag is made of: the TOML section it is written
    under (also its panel in `convtrain fit --help`), its default and its help. `shown` is the
    default as the help prints it when the value alone would not say it ("all cores" for None).

    The flag is generated from this (see convtrain.cli): `n_s` becomes `--n-s`, a bool becomes
    `--name/--no-name`, a list takes `16,32`; so a new setting is one line here."""
    metadata = {"section": section, "help": help, "shown": shown}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class FitConfig:
    # [data]
    data: str = option("data", "digits", "Data set: digits, mnist, cifar10, npz, names, folder.")
    data_path: str | None = option("data", None, "Where the data set is: a directory, or the .npz file.",
                                   shown="none, for the built-in digits")
    val_fraction: float = option("data", 0.1, "Validation split: a fraction of train, or a count.")
    limit: int | None = option("data", None, "Use at most this many training examples.", shown="all")
    balanced: bool = option("data", False, "Class-balanced mini-batches.")
    # [augment]: transforms of the training images, in this order (convtrain.data.augment)
    augment: bool = option("augment", False, "The data set's default augmentation: 2-pixel translations (1 for "
                           "digits), plus flips for cifar10 and folder; the settings below replace its parts.")
    crop: int | None = option("augment", None, "Random crop after padding each side by this many pixels (a "
                              "translation by up to that many).", shown="0, or the --augment default")
    crop_padding: str = option("augment", "zero", "What --crop pads with: zero (the channel mean) or reflect.")
    flip: bool | None = option("augment", None, "Mirror half the training images left-right.",
                               shown="off, or with --augment on for cifar10 and folder")
    rotate: float = option("augment", 0.0, "Rotate each image by a random angle up to this many degrees either "
                           "way (nearest pixel), 0 = none.")
    cutout: int = option("augment", 0, "Erase one random square of this side per image (to the channel mean), "
                         "0 = none.")
    mixup: float = option("augment", 0.0, "Mixup: blend each batch with a shuffled copy by lam ~ Beta(a, a) and "
                          "mix the labels alike; a = this value, 0 = none.")
    cutmix: float = option("augment", 0.0, "CutMix: paste a random box of a shuffled copy into each batch (area "
                           "1 - lam, lam ~ Beta(a, a)) and mix the labels by area; a = this value, 0 = none.")
    # [model]: one entry per conv block; a single entry applies to every block
    filters: list[int] = option("model", [16, 32], "Filters per conv block, e.g. 16,32.")
    kernel_sizes: list[Any] = option("model", [3], "Kernel size per block: 3,3 or 5x3 for height x width.")
    strides: list[int] = option("model", [1], "Stride per block, e.g. 1,2.")
    padding: list[Any] = option("model", [0], "Padding per block: a number, 'same' or 'valid'.")
    pool: list[int] = option("model", [0], "Max-pool size per block, 0 = none.")
    hidden: list[int] = option("model", [], "Hidden dense layer sizes before the output, e.g. 64.")
    dtype: str = option("model", "float32", "float32 or float64.")
    batch_norm: bool = option("model", False, "Batch normalization after every conv and hidden dense layer, "
                              "before its ReLU.")
    dropout: list[float] = option("model", [0.0], "Dropout probability after each hidden dense layer, or one "
                                  "per layer, e.g. 0.5,0.3.")
    global_pool: str = option("model", "none", "avg: global average pooling after the last block (the dense "
                              "layers see one value per channel), or none.")
    pool_type: str = option("model", "max", "Pooling in the blocks that pool: max or avg.")
    layers: list[dict] = option("model", [], "The network as a layer list (replaces the template options "
                                "above), as a TOML array: '[{type=\"conv\", filters=16}, {type=\"relu\"}, "
                                "{type=\"flatten\"}]'; the classifier follows it.", shown="none: the template")
    # [optim]
    epochs: int = option("optim", 12, "Epochs to train.")
    batch_size: int = option("optim", 64, "Mini-batch size.")
    optimizer: str = option("optim", "sgd", "sgd (--momentum, --nesterov) or adamw (--beta1, --beta2, --eps, "
                            "decoupled --weight-decay).")
    lr: float = option("optim", 0.05, "Learning rate (constant, step, cosine).")
    momentum: float = option("optim", 0.9, "SGD momentum in [0, 1).")
    nesterov: bool = option("optim", False, "Nesterov momentum.")
    l2: float = option("optim", 1e-4, "L2 penalty lambda on the weights.")
    beta1: float = option("optim", 0.9, "adamw: decay of the first moment.")
    beta2: float = option("optim", 0.999, "adamw: decay of the second moment.")
    eps: float = option("optim", 1e-8, "adamw: added to the denominator.")
    weight_decay: float = option("optim", 0.01, "adamw: decoupled weight decay of the conv and dense weights.")
    label_smoothing: float = option("optim", 0.0, "Label smoothing e of the cross-entropy: targets "
                                    "(1-e)*onehot + e/K.")
    clip_norm: float | None = option("optim", None, "Clip the gradients to this global L2 norm.",
                                     shown="no clipping")
    schedule: str = option("optim", "constant", "LR schedule: constant, step, cosine, cyclic.")
    step_epochs: int = option("optim", 10, "step: epochs between LR drops.")
    gamma: float = option("optim", 0.1, "step: LR factor per drop.")
    eta_min: float = option("optim", 1e-5, "cosine/cyclic: lowest LR.")
    eta_max: float = option("optim", 1e-1, "cyclic: highest LR.")
    n_s: int = option("optim", 500, "cyclic: updates per half cycle.")
    cycles: int | None = option("optim", None, "cyclic: train for this many cycles instead of --epochs.",
                                shown="none, --epochs sets the length")
    # [run]
    seed: int = option("run", 0, "Seed for the split, the weights and the batches.")
    threads: int | None = option("run", None, "Kernel threads.", shown="all cores")
    conv_algo: str = option("run", "auto", "Convolution algorithm: im2col, winograd (Winograd F(2x2,3x3) on "
                            "the 3x3 stride-1 conv blocks, im2col on the others) or auto (per block, by a "
                            "measured rule; see docs/kernels.md, Winograd).")
    patience: int | None = option("run", None, "Early stopping after this many epochs without improvement.",
                                  shown="no early stopping")
    monitor: str = option("run", "val_loss", "Metric for early stopping and the best epoch.")
    train_metrics: str = option("run", "running", "Training metrics per epoch: running (the mean over the "
                                "epoch's own batches, as they trained: free) or full (the training set "
                                "re-scored in eval mode after the epoch, the lecture's cost curves).")
    experiment: str = option("run", "convtrain", "MLflow experiment.")
    run_name: str | None = option("run", None, "MLflow run name (also names the --out folder).",
                                  shown="MLflow's generated name")
    out: str | None = option("run", None, "Folder for checkpoints, model.npz and config.toml.",
                             shown="runs/<run name>")
    track: bool = option("run", True, "Log the run to MLflow.")
    tracking_uri: str | None = option("run", None, "MLflow store.",
                                      shown="$MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    log_every: int = option("run", 10, "Log the batch loss every this many updates.")
    timings: bool = option("run", False, "At the end, print where the fit's wall time went: start-up, data, "
                           "store, training, evaluation, plots, model logging.")
    register_model: str | None = option("run", None, "Add the fit's model to the MLflow model registry as the next "
                                        "version of this name.", shown="not registered")
    parent_run: str | None = option("run", None, "An MLflow run id this fit's run becomes a child of (a sweep's "
                                    "best.toml sets its parent run).", shown="none")
    # image folders (--data folder) and the ONNX export
    image_size: str | None = option("data", None, "folder: resize every image to HxW (centre crop to that aspect "
                                    "ratio, then bilinear), e.g. 32x32.", shown="none: all images one size")
    channels: int | None = option("data", None, "folder: convert images to 1 (grayscale) or 3 (RGB) channels.",
                                  shown="the first image's")
    skip_bad_images: bool = option("data", False, "folder: leave out unreadable, non-image and oversized files "
                                   "and empty class folders (counted), instead of stopping at the first.")
    log_onnx: bool = option("run", False, "Also log the model as ONNX (model.onnx) to the MLflow run.")

    # ---- construction -------------------------------------------------------------

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
        layer_settings = {k: given.pop(k) for k in list(given) if is_layer_setting(k)}
        _check_known_keys(given, "overrides")
        merged = {**self.to_dict(), **{k: _coerce(k, v) for k, v in given.items()}}
        config = FitConfig(**merged)
        if layer_settings:  # "layers.res2.filters" (a sweep's): on the layer list, the shorthand expanded
            from convtrain.nn.layer_specs import set_layer_setting

            specs = config.network_layers()
            for setting, value in layer_settings.items():
                name, key = setting[len(LAYER_SETTING_PREFIX):].rsplit(".", 1)
                specs = set_layer_setting(specs, name, key, value)
            config = FitConfig(**{**config.to_dict(), **{t: _copy(DEFAULTS[t]) for t in TEMPLATE_OPTIONS},
                                  "layers": specs})
        config.validate()
        return config

    # ---- views --------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.filters)

    def network_layers(self) -> list[dict]:
        """The network's layer list: `layers`, or the template options expanded into one."""
        from convtrain.nn.architecture import template_layers
        from convtrain.nn.layer_specs import normalize_layers

        try:
            if self.layers:
                return normalize_layers(self.layers)
            return template_layers(filters=self.filters, kernel_sizes=self.per_block("kernel_sizes"),
                                    strides=self.per_block("strides"), padding=self.per_block("padding"),
                                    pool=self.per_block("pool"), hidden=self.hidden, batch_norm=self.batch_norm,
                                    dropout=self.dropout, global_pool=self.global_pool, pool_type=self.pool_type)
        except ConfigError as exc:
            raise ConfigError(str(exc) if str(exc).startswith("layers") else f"layers: {exc}") from None

    def expanded(self) -> "FitConfig":
        """This config with the template options written out as the layer list they make."""
        values = {**self.to_dict(), **{name: _copy(DEFAULTS[name]) for name in TEMPLATE_OPTIONS}}
        values["layers"] = self.network_layers()
        return FitConfig(**values)

    def per_block(self, name: str) -> list[Any]:
        """The per-block list `name` broadcast to one entry per conv block."""
        values = getattr(self, name)
        return list(values) * self.num_blocks if len(values) == 1 else list(values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_sections(self) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            if self.layers and f.name in TEMPLATE_OPTIONS or f.name == "layers" and not self.layers:
                continue  # one way of writing the network: the list, or its shorthand
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
            if name == "layers":
                value = json.dumps(value, separators=(",", ":")) if value else ""
            elif isinstance(value, list):
                value = ",".join(str(v) for v in value)
            params[name] = "" if value is None else str(value)
        return params

    # ---- length -------------------------------------------------------------------

    def trained_length(self, steps_per_epoch: int) -> tuple[int, int]:
        """(epochs, updates) this config trains at `steps_per_epoch` batches an epoch."""
        from convtrain.nn.optim import make_schedule, training_length

        return training_length(make_schedule(self), self.epochs, steps_per_epoch)

    @property
    def schedule_sets_length(self) -> bool:
        """A cyclic schedule with `cycles` runs 2 x n_s x cycles updates; `epochs` is then unused."""
        return self.schedule == "cyclic" and self.cycles is not None

    def describe_length(self, steps_per_epoch: int | None) -> str:
        """The length this config trains, in epochs and updates, at `steps_per_epoch` batches an
        epoch (None: not known yet). Counted by the function the Trainer runs."""
        from convtrain.nn.optim import make_schedule, training_length

        schedule = make_schedule(self)
        cyclic = None
        if self.schedule_sets_length:
            cyclic = (f"cyclic schedule: {plural(self.cycles, 'cycle')} x 2 x {self.n_s} = "
                      f"{schedule.planned_steps()} updates")
        if steps_per_epoch is None:
            return cyclic or plural(self.epochs, "epoch")
        epochs, updates = training_length(schedule, self.epochs, steps_per_epoch)
        if cyclic:
            return f"{cyclic} = {plural(epochs, 'epoch')} of {plural(steps_per_epoch, 'batch', 'batches')}"
        batches = plural(steps_per_epoch, "batch", "batches")
        return f"{plural(epochs, 'epoch')} x {batches} = {plural(updates, 'update')}"

    # ---- checks (the rules live in the functions below the class) ----------------------

    def check_settings(self, sources: dict[str, str], *, resumed: "FitConfig | None" = None) -> None:
        """Refuse a setting the user chose that another would silently override; see check_chosen_settings."""
        check_chosen_settings(self, sources, resumed=resumed)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field, its value and what was expected."""
        validate_config(self)


# ---- settings that decide the same thing ------------------------------------------------

def check_chosen_settings(config: FitConfig, sources: dict[str, str], *,
                          resumed: FitConfig | None = None) -> None:
    """Refuse a setting the user chose that another setting would silently override.

    `sources` says where each chosen value came from: FLAG, or the config file's path; every
    other value is a default (or, with `resumed`, the checkpoint's), which the other setting
    may override. A file value equal to the default (the checkpoint's) counts as that, so a
    written config.toml or best.toml (every key spelled out) can be passed back. Raises
    ConfigError naming both settings and how to say what is meant."""
    base = resumed.to_dict() if resumed is not None else DEFAULTS
    chosen = {name: where for name, where in sources.items()
              if where == FLAG or getattr(config, name) != base.get(name)}

    def said(name: str) -> str:
        value = getattr(config, name)
        if chosen.get(name) == FLAG:
            if isinstance(value, bool):
                return flag_name(name) if value else "--no-" + flag_name(name)[2:]
            return f"{flag_name(name)} {show_value(value)}"
        where = chosen.get(name) or ("the checkpoint" if resumed is not None else "default")
        return f"{name} = {show_value(value)} ({where})"

    for name in FIXED_ON_RESUME if resumed is not None else ():
        if name in chosen and not _same_setting(name, getattr(config, name), getattr(resumed, name)):
            raise ConfigError(f"{said(name)} conflicts with --resume: the checkpoint was trained with "
                              f"{name} = {show_value(getattr(resumed, name))}; leave {flag_name(name)} out to "
                              "continue it, or start a new fit without --resume")
    if config.schedule_sets_length and "epochs" in chosen:
        length = "--n-s (updates per half cycle) or --cycles" if config.cycles == 1 else "--cycles or --n-s"
        raise ConfigError(f"{said('epochs')} conflicts with {said('cycles')} ({config.describe_length(None)}, "
                          f"whatever the epochs); pass {length} for the length, or --schedule constant "
                          "(or step, cosine) for --epochs")
    for name, users in SCHEDULE_SETTINGS.items():
        # flags only: a written config spells out every schedule's settings
        if chosen.get(name) == FLAG and config.schedule not in users:
            raise ConfigError(f"{said(name)} is not used by {said('schedule')} (it is a setting of the "
                              f"{' and '.join(users)} schedule{'s' if len(users) > 1 else ''}); "
                              f"pass --schedule {users[0]}, or leave {flag_name(name)} out")
    for name, users in OPTIMIZER_SETTINGS.items():
        if chosen.get(name) == FLAG and config.optimizer not in users:
            raise ConfigError(f"{said(name)} is not used by {said('optimizer')} (it is a setting of "
                              f"{users[0]}); pass --optimizer {users[0]}, or leave {flag_name(name)} out")
    if chosen.get("crop_padding") == FLAG and config.crop_padding != "zero":
        from convtrain.data.augment import plan_for

        if not plan_for(config).crop:
            raise ConfigError(f"{said('crop_padding')} is not used without a crop (it is what --crop pads "
                              "with); pass --crop 4 (pixels), or leave --crop-padding out")
    if (config.schedule == "step" and config.step_epochs >= config.epochs
            and {"schedule", "step_epochs", "epochs"} & set(chosen)):
        raise ConfigError(f"{said('step_epochs')} with {said('epochs')}: the step schedule never lowers the "
                          f"learning rate (it drops after every step_epochs epochs); pass --step-epochs "
                          f"below {config.epochs}, or more --epochs")
    if config.val_fraction == 0 and config.monitor.startswith("val_"):
        for name in ("patience", "monitor"):
            if name in chosen and getattr(config, name) is not None:
                raise ConfigError(f"{said(name)} needs a validation split ({config.monitor}), and "
                                  f"{said('val_fraction')} makes none; pass --val-fraction 0.1 (or a count), "
                                  "or --monitor train_loss")


# ---- validation -----------------------------------------------------------------------

def validate_config(config: FitConfig) -> None:
    """Raise ConfigError naming the first bad field, its value and what was expected."""
    from convtrain.data.registry import DATASETS, needs_path  # the registry owns the names

    _expect(config.data in DATASETS, "data", config.data, f"one of {', '.join(DATASETS)}")
    if needs_path(config.data) and not config.data_path:
        raise ConfigError(f"data_path: data set {config.data!r} needs --data-path (a directory, or the .npz file)")
    vf = config.val_fraction
    _expect(vf >= 0 and (vf < 1 or float(vf).is_integer()), "val_fraction", vf,
            "a fraction in [0, 1) or a whole count >= 1")
    _expect(config.limit is None or config.limit > 0, "limit", config.limit, "a positive count")

    _expect(len(config.filters) >= 1, "filters", config.filters, "at least one conv block")
    for name in ("filters", "hidden"):
        for v in getattr(config, name):
            _expect(isinstance(v, int) and v > 0, name, getattr(config, name), "positive whole numbers")
    for name in ("kernel_sizes", "strides", "padding", "pool"):
        values = getattr(config, name)
        _expect(len(values) in (1, config.num_blocks), name, values,
                f"1 or {config.num_blocks} entries (one per conv block)")
    for k in config.kernel_sizes:
        pair = k if isinstance(k, list) else [k]
        _expect(all(isinstance(v, int) and v > 0 for v in pair) and len(pair) in (1, 2),
                "kernel_sizes", config.kernel_sizes, "positive sizes (an int or [height, width])")
    for s in config.strides:
        _expect(isinstance(s, int) and s > 0, "strides", config.strides, "positive whole numbers")
    for p in config.padding:
        _expect(p in PADDING_WORDS or (isinstance(p, int) and p >= 0), "padding", config.padding,
                "whole numbers >= 0, 'same' or 'valid'")
    for p in config.pool:
        _expect(isinstance(p, int) and p >= 0, "pool", config.pool, "pool sizes >= 0 (0 = no pooling)")
    _expect(config.dtype in DTYPES, "dtype", config.dtype, " or ".join(DTYPES))
    _validate_augment_options(config)
    _validate_layer_options(config)
    if config.layers:
        for name in TEMPLATE_OPTIONS:
            if getattr(config, name) != DEFAULTS[name]:
                raise ConfigError(f"{name}: got {show_value(getattr(config, name))}, but the network is the "
                                  f"layer list (layers); {name} is a template option, leave it out or drop layers")
    config.network_layers()  # kinds, keys and values of every layer (shapes: when the data is known)

    _expect(config.epochs > 0, "epochs", config.epochs, "a positive count")
    _expect(config.batch_size > 0, "batch_size", config.batch_size, "a positive count")
    _expect(_finite(config.lr) and config.lr > 0, "lr", config.lr, "a learning rate > 0")
    _expect(_finite(config.momentum) and 0 <= config.momentum < 1, "momentum", config.momentum, "a value in [0, 1)")
    _expect(_finite(config.l2) and config.l2 >= 0, "l2", config.l2, "lambda >= 0")
    _expect(config.schedule in SCHEDULES, "schedule", config.schedule, f"one of {', '.join(SCHEDULES)}")
    _expect(config.step_epochs > 0, "step_epochs", config.step_epochs, "a positive count")
    _expect(_finite(config.gamma) and 0 < config.gamma <= 1, "gamma", config.gamma, "a factor in (0, 1]")
    _expect(_finite(config.eta_min) and config.eta_min >= 0, "eta_min", config.eta_min, "a learning rate >= 0")
    _expect(_finite(config.eta_max) and config.eta_max > config.eta_min, "eta_max", config.eta_max,
            f"a learning rate > eta_min ({config.eta_min})")
    _expect(config.n_s > 0, "n_s", config.n_s, "a positive number of updates")
    _expect(config.cycles is None or config.cycles > 0, "cycles", config.cycles, "a positive count")
    _validate_optimizer_options(config)

    _expect(config.threads is None or config.threads > 0, "threads", config.threads, "a positive count")
    _validate_conv_algo(config)
    _expect(config.patience is None or config.patience > 0, "patience", config.patience, "a positive count")
    _expect(config.monitor in MONITORS, "monitor", config.monitor, f"one of {', '.join(MONITORS)}")
    _expect(config.train_metrics in TRAIN_METRICS, "train_metrics", config.train_metrics,
            " or ".join(TRAIN_METRICS))
    _expect(bool(config.experiment), "experiment", config.experiment, "a non-empty name")
    if len(config.experiment) > MAX_EXPERIMENT_NAME:
        raise ConfigError(f"experiment: got {len(config.experiment)} characters, expected at most "
                          f"{MAX_EXPERIMENT_NAME} (MLflow's limit)")
    if config.run_name is not None and len(config.run_name) > MAX_RUN_NAME:
        raise ConfigError(f"run_name: got {len(config.run_name)} characters, expected at most {MAX_RUN_NAME} "
                          "(MLflow's limit)")
    _expect(config.log_every > 0, "log_every", config.log_every, "a positive number of steps")
    _expect(config.register_model is None or (bool(str(config.register_model).strip())
                                            and not set(str(config.register_model)) & set("/:%")),
            "register_model", config.register_model, "a model registry name without '/', ':' or '%'")
    _expect(config.parent_run is None or str(config.parent_run).isalnum(), "parent_run", config.parent_run,
            "an MLflow run id")


def _validate_conv_algo(config: FitConfig) -> None:
    _expect(config.conv_algo in CONV_ALGOS, "conv_algo", config.conv_algo, " or ".join(CONV_ALGOS))
    if config.conv_algo == "winograd":
        from convtrain.nn.layer_specs import walk_specs

        convs = [spec for _, spec in walk_specs(config.network_layers()) if spec["type"] == "conv"]
        if not any(_as_pair(spec.get("kernel", 3)) == [3, 3] and _as_pair(spec.get("stride", 1)) == [1, 1]
                   for spec in convs):
            raise ConfigError("conv_algo: got 'winograd', but no conv layer has a 3x3 kernel with "
                              "stride 1 (Winograd F(2x2,3x3) computes those only); use auto or im2col")

def _validate_augment_options(config: FitConfig) -> None:
    from convtrain.data.augment import PADDINGS, plan_for

    _expect(config.crop is None or config.crop >= 0, "crop", config.crop, "pixels >= 0")
    _expect(config.crop_padding in PADDINGS, "crop_padding", config.crop_padding, " or ".join(PADDINGS))
    _expect(config.cutout >= 0, "cutout", config.cutout, "pixels >= 0")
    _expect(_finite(config.rotate) and 0 <= config.rotate <= 180, "rotate", config.rotate, "degrees in [0, 180]")
    _expect(_finite(config.mixup) and config.mixup >= 0, "mixup", config.mixup, "a Beta parameter >= 0 (0 = none)")
    _expect(_finite(config.cutmix) and config.cutmix >= 0, "cutmix", config.cutmix,
            "a Beta parameter >= 0 (0 = none)")
    _expect(not (config.mixup and config.cutmix), "cutmix", config.cutmix,
            f"0 with mixup = {config.mixup:g} (a batch is mixed one way: choose mixup or cutmix)")
    plan_for(config)  # image transforms on data that is not images


def _validate_layer_options(config: FitConfig) -> None:
    for p in config.dropout:
        _expect(_finite(p) and 0 <= p < 1, "dropout", config.dropout, "probabilities in [0, 1)")
    _expect(len(config.dropout) == 1 or len(config.dropout) == len(config.hidden), "dropout", config.dropout,
            f"1 or {len(config.hidden)} entries (one per hidden dense layer)")
    _expect(config.hidden or not any(config.dropout), "dropout", config.dropout,
            "0 without hidden dense layers (dropout follows each hidden layer; see --hidden)")
    _expect(config.global_pool in GLOBAL_POOLS, "global_pool", config.global_pool, " or ".join(GLOBAL_POOLS))
    _expect(config.pool_type in POOL_TYPES, "pool_type", config.pool_type, " or ".join(POOL_TYPES))

def _validate_optimizer_options(config: FitConfig) -> None:
    _expect(config.optimizer in OPTIMIZERS, "optimizer", config.optimizer, " or ".join(OPTIMIZERS))
    for name in ("beta1", "beta2"):
        value = getattr(config, name)
        _expect(_finite(value) and 0 <= value < 1, name, value, "a value in [0, 1)")
    _expect(_finite(config.eps) and config.eps > 0, "eps", config.eps, "a value > 0")
    _expect(_finite(config.weight_decay) and config.weight_decay >= 0, "weight_decay", config.weight_decay,
            "a value >= 0")
    _expect(_finite(config.label_smoothing) and 0 <= config.label_smoothing < 1, "label_smoothing",
            config.label_smoothing, "a value in [0, 1)")
    _expect(config.clip_norm is None or (_finite(config.clip_norm) and config.clip_norm > 0), "clip_norm",
            config.clip_norm, "a norm > 0 (or nothing: no clipping)")


# ---- helpers ----------------------------------------------------------------------

FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(FitConfig)}
_SECTIONS = {f.metadata["section"] for f in dataclasses.fields(FitConfig)}


FLAG = "flag"  # where a setting typed on the command line came from (else: a config file's path)
DEFAULTS = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(FitConfig)}

# the options of the template network (conv blocks, hidden dense layers): a shorthand for `layers`
TEMPLATE_OPTIONS = ("filters", "kernel_sizes", "strides", "padding", "pool", "hidden", "batch_norm", "dropout",
                    "global_pool", "pool_type")
# the schedules that use each schedule setting: a flag for another schedule would be ignored
SCHEDULE_SETTINGS = {"lr": ("constant", "step", "cosine"), "step_epochs": ("step",), "gamma": ("step",),
                     "eta_min": ("cosine", "cyclic"), "eta_max": ("cyclic",), "n_s": ("cyclic",),
                     "cycles": ("cyclic",)}
# the optimizers that use each optimizer setting: a flag for the other one would be ignored
OPTIMIZER_SETTINGS = {"momentum": ("sgd",), "nesterov": ("sgd",), "beta1": ("adamw",), "beta2": ("adamw",),
                      "eps": ("adamw",), "weight_decay": ("adamw",)}
# what --resume continues unchanged, else silently ignored or mixed: the data and its split, the
# run and its folder (a different network is refused when the checkpoint is read)
FIXED_ON_RESUME = ("data", "val_fraction", "limit", "seed", "balanced", "experiment", "run_name", "out",
                   "optimizer")


# A setting of one layer of the list, named "layers.<layer name>.<setting>" (a sweep's space):
# "layers.res2.filters" (a residual block's: every conv in it), "layers.fc1_dropout.p".
LAYER_SETTING_PREFIX = "layers."
LAYER_SETTING_TYPES = {"filters": "int", "units": "int", "kernel": "int", "stride": "int", "size": "int",
                       "padding": "int", "p": "float", "bias": "bool", "shortcut": "str"}


def is_layer_setting(name: str) -> bool:
    return name.startswith(LAYER_SETTING_PREFIX) and name.count(".") >= 2


def setting_type(name: str) -> str:
    """The type of a FitConfig field, or of a layer setting ("layers.res2.filters": int)."""
    if is_layer_setting(name):
        return LAYER_SETTING_TYPES.get(name.rsplit(".", 1)[1], "str")
    return FIELD_TYPES[name]


def setting_value(config: FitConfig, name: str) -> Any:
    """A field's value, or a layer setting's (a residual block's filters: its first conv's)."""
    if not is_layer_setting(name):
        return getattr(config, name)
    from convtrain.nn.layer_specs import KINDS, walk_specs

    layer, key = name[len(LAYER_SETTING_PREFIX):].rsplit(".", 1)
    spec = dict(walk_specs(config.network_layers()))[layer]
    if spec["type"] == "residual" and key not in KINDS["residual"]:
        spec = next(s for _, s in walk_specs(spec["layers"]) if s["type"] == "conv")
    return spec.get(key, KINDS[spec["type"]].get(key))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def show_value(value: Any) -> str:
    """A setting as a flag takes it: lists comma-joined (5x3 for a kernel pair), None as none."""
    if isinstance(value, list):
        return ",".join("x".join(map(str, v)) if isinstance(v, list) else str(v) for v in value) or "none"
    return "none" if value is None else str(value)


def _same_setting(name: str, a: Any, b: Any) -> bool:
    if name == "out" and a is not None and b is not None:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def _as_pair(kernel) -> list:
    """A kernel_sizes entry (an int or [kh, kw]) as [kh, kw]."""
    return list(kernel) * (2 // len(kernel)) if isinstance(kernel, list) else [kernel, kernel]


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
    "dropout": "probabilities, e.g. 0.3 or 0.5,0.3 (one per hidden layer)",
}


def _coerce(name: str, value: Any) -> Any:
    """Accept the spellings a TOML file or a flag naturally gives: '16,32' or 16 for a list."""
    kind = FIELD_TYPES[name]
    if name == "layers":
        return _layer_list(value)
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


def _layer_list(value: Any) -> list:
    """`layers` from TOML (a list of tables) or a flag (the same list as TOML text)."""
    if isinstance(value, str):
        value = parse_toml(f"layers = {value}", "layers").get("layers") if value.strip() else []
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise ConfigError(f"layers: got {value!r:.80}, expected a list of layer tables, e.g. "
                          "[{type = \"conv\", filters = 16}, {type = \"relu\"}, {type = \"flatten\"}]")
    return [v.to_spec() if hasattr(v, "to_spec") else v for v in value]


def _list_item(name: str, v: Any) -> Any:
    if name == "dropout":
        if isinstance(v, bool):
            raise ValueError
        return float(v)
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


# A config or sweep file is a few dozen lines; reading stops past this (a config of /dev/zero or
# a multi-gigabyte file is refused before it fills memory).
MAX_CONFIG_BYTES = 1024 * 1024
# tables > keys > lists > [kh, kw] pairs: deeper nesting is no config (and tomllib's recursive
# parser raises RecursionError for arrays nested thousands deep)
MAX_CONFIG_NESTING = 8


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file's tables; ConfigError (one line) for a file that is missing, larger
    than MAX_CONFIG_BYTES, not UTF-8, not TOML or nested deeper than any config."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, too large for a config file")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_toml(text, str(path))


def parse_toml(text: str, source: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """The TOML `text` as a dict; `error` (ConfigError, or the caller's own kind, e.g. a
    checkpoint's) names `source` and the parser's complaint, or a nesting deeper than any config."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:
        raise error(f"{source}: arrays or tables nested too deeply to be a config") from None
    if _nesting(raw) > MAX_CONFIG_NESTING:
        raise error(f"{source}: arrays or tables nested more than {MAX_CONFIG_NESTING} deep, "
                    "deeper than any config")
    return raw


def _nesting(value) -> int:
    """How deep lists and tables nest in `value` (walked without recursion)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            if depth + 1 > MAX_CONFIG_NESTING:
                break
            todo += [(child, depth + 1) for child in item]
    return deepest


def dump_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Write {section: {key: value}} as TOML; None values are left out (TOML has no null).
    tomli-w writes every value (escapes, number formats); only the layout is ours: arrays stay
    on one line (`filters = [16, 32]`), where tomli-w puts each item on a line of its own."""
    lines: list[str] = []
    for section, values in sections.items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        tables = {key: value for key, value in values.items() if _is_table_list(value)}
        lines += [f"{key} = {_toml_literal(value)}" for key, value in values.items()
                  if value is not None and key not in tables]
        for key, rows in tables.items():  # a layer list: one [[section.key]] table per layer
            for row in rows:
                lines += ["", f"[[{section}.{key}]]"]
                lines += [f"{k} = {_toml_literal(v, nested=True)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_literal(value: Any, nested: bool = False) -> str:
    """One value on one line; in a table of a layer list, a list of tables (a residual block's
    layers) is an array of inline tables, one per line."""
    import tomli_w

    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_literal(v)}" for k, v in value.items()) + "}"
    if nested and _is_table_list(value):
        return "[\n" + "".join(f"    {_toml_literal(v)},\n" for v in value) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").removesuffix("\n")
