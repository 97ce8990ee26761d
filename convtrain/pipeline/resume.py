"""`--resume`: which checkpoint a spec names, the config it was written with, and whether this
fit can continue it (checked before anything is written)."""

from __future__ import annotations

import re
from pathlib import Path

from convtrain.config import FitConfig, read_toml
from convtrain.errors import CheckpointError
from convtrain.training.checkpoint_checks import check_checkpoint_entries

CHECKPOINT_FILE = "checkpoint.npz"
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def resolve_fit_config(*, config_path: str | Path | None = None, overrides: dict | None = None,
                       resume: str | None = None) -> tuple[FitConfig, Path | None]:
    """The config a fit runs with and, for --resume, the checkpoint it continues from.

    Without --resume: defaults < --config file < flags. With --resume: the config stored in the
    checkpoint < --config file < flags (typically only --epochs changes).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    checkpoint = None
    if resume:
        checkpoint = resolve_checkpoint(resume, overrides.get("tracking_uri"))
        config = checkpoint_config(checkpoint)
    else:
        config = FitConfig()
    if config_path is not None:
        # with --resume a config file changes only the keys it names; otherwise it is the base
        config = config.with_overrides(_file_keys(config_path)) if resume else FitConfig.from_toml(config_path)
    return config.with_overrides(overrides), checkpoint

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
    """The resolved config a checkpoint was written with."""
    import tomllib

    from convtrain.nn.npz_files import read_npz

    arrays = read_npz(path, "checkpoint")
    if "trainer" not in arrays:
        raise CheckpointError(f"checkpoint file {str(path)!r} is a saved model, not a training checkpoint")
    if "config" not in arrays:
        raise CheckpointError(f"checkpoint file {str(path)!r} records no config; cannot resume it")
    try:
        values = tomllib.loads(str(arrays["config"][()]))
    except tomllib.TOMLDecodeError as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r}: stored config is not valid TOML ({exc})") from None
    return FitConfig.from_dict(values, source=f"config in {path}")

def checkpoint_callback_state(path: Path, key: str) -> dict:
    from convtrain.nn.npz_files import read_json, read_npz

    arrays = read_npz(path, "checkpoint")
    states = read_json(arrays, "callbacks", path, "checkpoint")
    check_checkpoint_entries({"callbacks": states}, path)
    return states.get(key) or {}

def check_resumable(checkpoint: Path, network, config: FitConfig) -> None:
    """What Trainer.resume refuses, checked before the MLflow run is reopened and config.toml
    rewritten, so a resume that cannot work changes nothing."""
    from convtrain.nn.npz_files import read_json, read_npz

    arrays = read_npz(checkpoint, "checkpoint")
    architecture = read_json(arrays, "architecture", checkpoint, "checkpoint")
    if architecture != network.architecture:
        raise CheckpointError(f"checkpoint file {str(checkpoint)!r} was written for a different network "
                              f"({architecture}) than this one ({network.architecture})")
    state = read_json(arrays, "trainer", checkpoint, "checkpoint")
    check_checkpoint_entries({key: read_json(arrays, key, checkpoint, "checkpoint")
                              for key in ("trainer", "history", "callbacks")}, checkpoint)
    if state.get("mid_epoch") and state.get("batch_size") != config.batch_size:
        raise CheckpointError(f"checkpoint file {str(checkpoint)!r} stopped mid-epoch with batch size "
                              f"{state.get('batch_size')}; resume with the same batch size (not {config.batch_size})")
    saved_classes = read_json(arrays, "class_names", checkpoint, "checkpoint")
    if saved_classes != network.class_names:
        raise CheckpointError(f"checkpoint {checkpoint} was trained on classes {saved_classes}, "
                              f"the data has {network.class_names}")

def check_same_classes(network, splits, checkpoint: Path) -> None:
    if network.class_names != list(splits.class_names):
        raise CheckpointError(f"checkpoint {checkpoint} was trained on classes {network.class_names}, "
                              f"the data has {list(splits.class_names)}")
