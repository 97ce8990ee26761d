"""`--resume`: which checkpoint a spec names and the config it was written with. What a
checkpoint holds, and whether a fit can continue it, is training.checkpoint.TrainingCheckpoint's
to answer."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from convtrain.config import FLAG, FitConfig, read_toml
from convtrain.errors import CheckpointError
from convtrain.training.checkpoint import TrainingCheckpoint
from convtrain.training.run_folder import CHECKPOINT_FILE

RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def resolve_fit_config(*, config_path: str | Path | None = None, overrides: dict | None = None,
                       resume: str | None = None) -> tuple[FitConfig, Path | None]:
    """The config a fit runs with and, for --resume, the checkpoint it continues from.

    Without --resume: defaults < --config file < flags. With --resume: the config stored in the
    checkpoint < --config file < flags (typically only --epochs changes). A value from a flag or
    the file that another setting would override is refused (FitConfig.check_settings).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    sources = dict.fromkeys(overrides, FLAG)  # what the user chose, and where: checked against conflicts
    checkpoint = resumed = None
    if resume:
        checkpoint = resolve_checkpoint(resume, overrides.get("tracking_uri"))
        config = resumed = _without_foreign_store(checkpoint_config(checkpoint))
    else:
        config = FitConfig()
    if config_path is not None:
        # with --resume a config file changes only the keys it names; otherwise it is the base
        config = config.with_overrides(_file_keys(config_path)) if resume else FitConfig.from_toml(config_path)
        sources = {**dict.fromkeys(_file_keys(config_path), str(config_path)), **sources}
    config = config.with_overrides(overrides)
    config.check_settings(sources, resumed=resumed)
    return config, checkpoint

def _without_foreign_store(config: FitConfig) -> FitConfig:
    """The checkpoint's config, its tracking URI dropped unless it names the store a fit uses
    here anyway (MLFLOW_TRACKING_URI or ./mlflow.db): a stored URI is data, not configuration,
    so the fit logs to the store chosen now (flag, file, environment or default), and prepare
    refuses a checkpoint whose run is in another one."""
    from convtrain.tracking.store import resolve_tracking_uri, same_store

    if config.tracking_uri is None or same_store(config.tracking_uri, resolve_tracking_uri()):
        return config
    return dataclasses.replace(config, tracking_uri=None)

def _file_keys(path) -> dict:
    values = FitConfig.from_toml(path).to_dict()
    named = read_toml(path)
    keys = set(named) | {k for v in named.values() if isinstance(v, dict) for k in v}
    return {k: v for k, v in values.items() if k in keys}

def resolve_checkpoint(spec: str, tracking_uri: str | None = None) -> Path:
    """--resume accepts a checkpoint file, the --out folder holding one, or an MLflow run id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"--resume {spec}: the folder holds no {CHECKPOINT_FILE}")
        return path
    if path.is_file():
        return path
    if RUN_ID_PATTERN.match(spec):
        from convtrain.tracking.runs import find_run_checkpoint
        from convtrain.tracking.store import resolve_tracking_uri

        found = Path(find_run_checkpoint(spec, resolve_tracking_uri(tracking_uri)))
        if not found.is_file():
            raise CheckpointError(f"--resume {spec}: the run's checkpoint {found} no longer exists")
        return found
    raise CheckpointError(f"--resume {spec}: not a checkpoint file, a folder with {CHECKPOINT_FILE}, "
                          "or an MLflow run id (32 hex digits)")

def checkpoint_config(path: Path) -> FitConfig:
    """The resolved config a checkpoint was written with; its arrays checked on the way (the
    first read of a checkpoint being resumed: a hand-edited one is one line here)."""
    from convtrain.training.checkpoint_checks import check_checkpoint_arrays

    checkpoint = TrainingCheckpoint.load(path)
    check_checkpoint_arrays(checkpoint.arrays, path)
    return checkpoint.config()  # parse_toml bounds its nesting
