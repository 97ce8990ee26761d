"""`convtrain.fit(config)`: one whole training run, the same one `convtrain fit` makes.

    from convtrain import FitConfig, fit
    result = fit(FitConfig(epochs=3))
    result.metrics["test_accuracy"], result.run_id, result.model_path

The pipeline: threads -> data (split, train statistics) -> network -> trainer with callbacks
(progress, MLflow, checkpoints, early stopping) -> test metrics -> model.npz, plots, MLflow
artifacts and pyfunc model. The order is chosen so that bad input fails before anything is
written: the config, the tracking store, the data, the architecture and the output folder are
all checked before the MLflow run and the output folder are created.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from convtrain.config import FitConfig
from convtrain.errors import ConfigError, TrainingInterrupted
from convtrain.pipeline.resume import resolve_checkpoint
from convtrain.training.callbacks import BatchLossRecorder, Callback
from convtrain.training.checkpoint import TrainingCheckpoint
from convtrain.training.metrics import Evaluation, confusion_matrix
from convtrain.training.run_folder import RunFolder, RunFolderLock
from convtrain.training.signals import sigterm_as_keyboard_interrupt, stop_on_signals

@dataclass
class FitResult:
    run_id: str | None
    history: Any  # convtrain.train.History
    metrics: dict[str, float]  # the final model's train/val metrics, test_* and best_epoch
    model_path: Path
    checkpoint_path: Path | None
    out_dir: Path
    network: Any  # convtrain.network.Network
    config: FitConfig
    tracking_uri: str | None = None
    experiment_id: str | None = None
    problems: list[str] = field(default_factory=list)  # e.g. metrics the tracking store did not take
    registered_model: str | None = None  # "NAME version N" with --register-model

def fit(config: FitConfig, *, callbacks: Iterable[Callback] = (), resume: str | Path | None = None,
        parent_run_id: str | None = None, tags: dict | None = None, progress: Any = "auto") -> FitResult:
    """Train as configured; returns a FitResult. See the module docstring for the steps.

    resume: a checkpoint path (or anything `resolve_checkpoint` accepts); the fit continues in
        the checkpoint's folder and MLflow run.
    parent_run_id: make the MLflow run a child of this run (sweeps).
    tags: extra MLflow tags for the run.
    progress: "auto" (bars on a terminal, lines elsewhere), "quiet" (final table only), "none"
        or None (nothing), or a Callback of your own.
    Exceptions propagate after the MLflow run is marked FAILED (or KILLED on interruption).
    """
    # The whole fit holds its output folder (one writer per folder), and SIGTERM ends it like
    # Ctrl-C from the very start, so a signal while the data loads also ends with one line.
    with sigterm_as_keyboard_interrupt(), RunFolderLock() as out_lock:
        try:
            return _fit(config, out_lock, callbacks=callbacks, resume=resume, parent_run_id=parent_run_id,
                        tags=tags, progress=progress)
        except KeyboardInterrupt:  # before the run and the output folder exist
            raise TrainingInterrupted("stopped by an interrupt while setting up the fit, before anything "
                                      "was written") from None


def _fit(config: FitConfig, out_lock: RunFolderLock, *, callbacks, resume, parent_run_id, tags,
         progress) -> FitResult:
    from convtrain.data import load_dataset
    from convtrain.training.trainer import Trainer

    started = time.monotonic()
    config.validate()
    parent_run_id = parent_run_id or config.parent_run
    checkpoint = resolve_checkpoint(str(resume)) if resume is not None else None
    saved = TrainingCheckpoint.load(checkpoint) if checkpoint is not None else None
    tracking_uri = None
    saved_tracking: dict = {}
    if saved is not None:
        saved_tracking = saved.callback_state("mlflow")
    track = config.track and (checkpoint is None or bool(saved_tracking) or config.tracking_uri is not None)
    if track:
        from convtrain.tracking.store import check_reachable, resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(config.tracking_uri or saved_tracking.get("tracking_uri"))
        check_reachable(tracking_uri)  # fail fast, before any work or write

    if config.threads:
        from convtrain.nn.backend import set_num_threads

        set_num_threads(config.threads)

    splits = load_dataset(config.data, config.data_path, val_fraction=config.val_fraction, seed=config.seed,
                          limit=config.limit)
    if config.batch_size > len(splits.y_train):
        raise ConfigError(f"batch_size: got {config.batch_size}, larger than the {len(splits.y_train)} "
                          "training examples")
    check_validation_split(config, splits)
    network = _build_network(config, splits)

    out_dir = _resolve_out(Path(checkpoint.parent if checkpoint is not None else (config.out or _default_out_parent())))
    _check_writable(out_dir)
    if saved is not None:
        # what resuming would refuse, before the MLflow run is reopened and config.toml rewritten
        saved.check_resumable(network, config.batch_size, network.class_names)
    elif config.out is not None:
        _check_no_other_checkpoint(out_dir)
    if saved is not None or config.out is not None:
        out_lock.take(out_dir)  # before the run exists; from here on no other fit writes there
        if saved is None:
            _check_no_other_checkpoint(out_dir)  # another fit may have ended there since the check above

    tracker = None
    if track:
        from convtrain.tracking.callback import MLflowCallback
        from convtrain.tracking.runs import OUT_DIR_TAG

        tracker = MLflowCallback.start(config, tracking_uri=tracking_uri, parent_run_id=parent_run_id, tags=tags,
                                       resume_run_id=saved_tracking.get("run_id"),
                                       next_epoch=saved.next_epoch(config.epochs) if saved is not None else None)
    # what the fit is doing, for the message of a Ctrl-C that lands outside the training loop
    stage, trainer, model_path = "setting up the fit", None, None
    # SIGTERM outside the training loop (set-up, plots, MLflow logging) ends like Ctrl-C: the
    # run marked KILLED and one line saying what is saved, not a silent exit leaving it RUNNING;
    # inside the loop _stop_on_signals takes over
    with sigterm_as_keyboard_interrupt():
        try:
            if checkpoint is None and config.out is None:
                out_dir = _unique_dir(out_dir / _safe_name(config.run_name or (tracker and tracker.run_name)
                                                           or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")))
                out_lock.take(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            config = config.with_overrides({"out": str(out_dir)})
            if checkpoint is None:
                config.save_toml(RunFolder(out_dir).config)

            recorder = BatchLossRecorder(config.log_every)
            progress_callback = _progress_callback(progress)
            # the Trainer adds early stopping (config.patience) and the checkpoint callback itself
            all_callbacks = [*([progress_callback] if progress_callback else []), recorder,
                             *([tracker] if tracker else []), *callbacks]
            trainer = Trainer.from_config(network, config, callbacks=all_callbacks, checkpoint_dir=out_dir)
            if saved is not None:
                trainer.resume(saved)
                config.save_toml(RunFolder(out_dir).config)  # only once the resume is known to work
            else:
                # The epoch-0 checkpoint: initial weights, generator state and (in the MLflow
                # callback's state) the run id, written as soon as the run exists and before the
                # slower logging below, so a fit killed at any later moment -- even before its
                # first epoch ends -- resumes into this run instead of leaving it RUNNING forever.
                trainer.save_checkpoint()
            if tracker is not None:
                tracker.log_config(config, resumed=checkpoint is not None)
                if checkpoint is not None:  # metrics an outage kept back: sent before the model
                    tracker.restore_unlogged(out_dir)
                tracker.set_tags({OUT_DIR_TAG: str(out_dir.resolve())})
                # a fit killed before its datasets were logged logs them when resumed
                if checkpoint is None or not tracker.has_datasets():
                    tracker.log_datasets(splits, config.data_path)

            x_train = network.normalize(splits.x_train)
            x_val = network.normalize(splits.x_val) if splits.x_val is not None and len(splits.x_val) else None
            stage = "training"
            with stop_on_signals(trainer):
                history = trainer.fit(x_train, splits.y_train, x_val, splits.y_val if x_val is not None else None)
            del x_train, x_val

            stage = "saving the model"
            model_path = network.save(RunFolder(out_dir).model)
            metrics = dict(history.best if config.patience else history.last)
            metrics.pop("epoch", None)
            metrics["best_epoch"] = history.best_epoch
            stopped_epoch = _early_stopped_epoch(trainer)
            if stopped_epoch:
                metrics["stopped_epoch"] = stopped_epoch
                _say(progress_callback, _early_stopping_line(config, history, stopped_epoch))
            stage = "evaluating the final model"
            evaluation = _final_evaluation(trainer, network, splits)
            metrics.update(evaluation.metrics)
            stage = "writing the plots"
            plots = _write_plots(RunFolder(out_dir).plots, history, recorder, trainer, network, evaluation)

            stage = "logging the results to MLflow"
            problems = _log_results(tracker, trainer, evaluation, plots, model_path, splits, out_dir,
                                    config=config, network=network, history=history, metrics=metrics,
                                    stopped_epoch=stopped_epoch, started=started) if tracker else []
        except BaseException as exc:
            interrupted = isinstance(exc, (TrainingInterrupted, KeyboardInterrupt))
            if tracker is not None:
                with contextlib.suppress(Exception):
                    tracker.finish("KILLED" if interrupted else "FAILED",
                                   error=None if interrupted else f"{type(exc).__name__}: {exc}",
                                   out_dir=out_dir if out_dir.is_dir() else None)
            if isinstance(exc, KeyboardInterrupt) and trainer is not None and trainer.checkpoint_path is not None:
                # Ctrl-C outside the training loop's own handling (plots, model logging, test
                # evaluation): the default handler raised KeyboardInterrupt, which would end the
                # CLI without a word; say what is on disk and how to finish instead
                raise _interrupted_outside_training(stage, trainer, model_path) from None
            if isinstance(exc, KeyboardInterrupt):  # before the first checkpoint: nothing to resume
                run = f"; MLflow run {tracker.run_id} is marked KILLED" if tracker is not None else ""
                raise TrainingInterrupted(f"stopped by an interrupt while {stage}, before the first "
                                          f"checkpoint{run}") from None
            raise
    return FitResult(run_id=tracker.run_id if tracker else None, history=history, metrics=metrics,
                     model_path=model_path, checkpoint_path=trainer.checkpoint_path, out_dir=out_dir,
                     network=network, config=config, tracking_uri=tracking_uri,
                     experiment_id=tracker.experiment_id if tracker else None, problems=problems,
                     registered_model=tracker.registered if tracker else None)

def _interrupted_outside_training(stage: str, trainer, model_path: Path | None) -> TrainingInterrupted:
    """The TrainingInterrupted for a Ctrl-C at `stage`; resuming the checkpoint finishes the fit
    (a finished training only redoes the steps after the training loop)."""
    saved = [f"the model is saved in {model_path}"] if model_path is not None else []
    saved.append(f"the last checkpoint is {trainer.checkpoint_path}")
    return TrainingInterrupted(f"stopped by an interrupt while {stage}; " + ", ".join(saved),
                               checkpoint=trainer.checkpoint_path)

def _build_network(config: FitConfig, splits):
    """The configured network, carrying the training set's statistics, classes and data recipe."""
    from convtrain.data import Standardizer
    from convtrain.nn.footprint import check_fits
    from convtrain.nn.network import Network

    check_fits(config, splits.input_shape, splits.num_classes)  # before any weight is allocated
    network = Network.from_config(config, splits.input_shape, splits.num_classes)
    network.set_conv_algo(config.conv_algo)  # a run setting: the saved model does not keep it
    if splits.standardize:  # a property of the data set: not for one-hot names (see data/names.py)
        standardizer = Standardizer.fit(splits.x_train)
        network.normalization = {k: v.tolist() for k, v in standardizer.to_dict().items()}
    else:
        network.normalization = None  # the identity: normalize() passes the input through
    network.class_names = list(splits.class_names)
    data_path = str(Path(config.data_path).resolve()) if config.data_path else None  # for `evaluate` anywhere
    network.meta = {**splits.meta, "data": config.data, "data_path": data_path,
                    "val_fraction": config.val_fraction, "seed": config.seed, "limit": config.limit}
    return network

def _log_results(tracker, trainer, evaluation, plots, model_path, splits, out_dir, *, config, network, history,
                 metrics, stopped_epoch, started) -> list[str]:
    """Test metrics, the saved model's metrics as the run's latest, artifacts, the pyfunc model
    (with its metrics, registered if asked), the run description, then FINISHED; returns what
    did not get through."""
    from convtrain.tracking.description import fit_description

    tracker.log_final_metrics(evaluation.metrics, step=trainer.epoch)
    tracker.log_restored_metrics(metrics, last_epoch=trainer.epoch, best_epoch=metrics.get("best_epoch"),
                                 restored=bool(config.patience), stopped_epoch=stopped_epoch)
    artifacts = [(RunFolder(out_dir).config, None), *[(p, "plots") for p in plots]]
    if trainer.checkpoint_path is not None:
        artifacts.append((trainer.checkpoint_path, "checkpoint"))
    problems = tracker.log_artifacts(artifacts)
    model_problem = tracker.log_model(model_path, _input_example(splits))
    if model_problem:
        problems.append(model_problem)
    link_problem = tracker.link_model_metrics([*metrics, *evaluation.metrics])
    if link_problem:
        problems.append(link_problem)
    registered = None
    if config.register_model:
        registered, register_problem = tracker.register_model(config.register_model)
        if register_problem:
            problems.append(register_problem)
    tracker.set_description(fit_description(
        config=config, network=network, splits=splits, history=history, metrics=metrics, run_id=tracker.run_id,
        out_dir=out_dir, stopped_epoch=stopped_epoch,
        wall_seconds=time.monotonic() - started, model_name=tracker.model_name, registered=registered))
    return problems + tracker.finish("FINISHED", out_dir=out_dir)


def _early_stopped_epoch(trainer) -> int | None:
    """The epoch at which early stopping ended the fit, or None if it ran every epoch."""
    from convtrain.training.callbacks import EarlyStopping

    stopper = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    return stopper.stopped_epoch if stopper is not None and stopper.stopped_epoch else None


def _early_stopping_line(config, history, stopped_epoch: int) -> str:
    return (f"stopped at epoch {stopped_epoch}: {config.monitor} has not improved for {config.patience} epochs; "
            f"restored epoch {history.best_epoch}")


def _say(progress_callback, line: str) -> None:
    """A line in the fit's own output (nothing when the caller asked for no progress output)."""
    console = getattr(progress_callback, "console", None)
    if console is not None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

def _default_out_parent() -> Path:
    return Path.cwd() / "runs"

def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.") or "run"

def _unique_dir(path: Path) -> Path:
    """A new folder named like `path` (path-2, path-3, ... if taken), created here so that two
    fits starting at once with the same run name cannot both pick it."""
    candidate, n = path, 2
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            candidate = path.with_name(f"{path.name}-{n}")
            n += 1

def check_validation_split(config: FitConfig, splits) -> None:
    """Early stopping on a val_* metric needs validation data: refused before any run or file exists."""
    if config.patience and config.monitor.startswith("val_") and (splits.x_val is None or not len(splits.x_val)):
        raise ConfigError(f"monitor: {config.monitor!r} needs a validation set for --patience; use a validation "
                          "split (--val-fraction) or monitor 'train_loss'")

def _check_no_other_checkpoint(out_dir: Path) -> None:
    if RunFolder(out_dir).checkpoint.exists():
        raise ConfigError(f"out: {out_dir} already holds a checkpoint of another fit; continue it with "
                          f"--resume {out_dir}, or choose another --out")

def _resolve_out(folder: Path) -> Path:
    try:
        return folder.resolve()
    except RuntimeError:  # Python 3.11's way of saying ELOOP
        raise ConfigError(f"out: {folder} goes through a symbolic link loop; choose another --out") from None
    except OSError as exc:
        raise ConfigError(f"out: {folder} cannot be resolved ({exc.strerror or exc}); choose another --out") from None

def _check_writable(folder: Path) -> None:
    """Refuse an output folder that cannot be created or written, before anything is written."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"out: {existing} is a file, expected a folder for checkpoints and the model")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out: {existing} is not writable; choose another --out")
    # access() says yes to root, and on some file systems (sysfs, NFS with root squashing, FUSE)
    # where creating a file then fails; an unnamed temp file is the real test and leaves nothing
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"out: cannot create files in {existing} ({exc.strerror or exc}); "
                          "choose another --out") from None

def _progress_callback(progress):
    if progress is None or progress is False or progress == "none":
        return None
    if isinstance(progress, Callback):
        return progress
    from convtrain.training.progress import ProgressCallback

    if progress not in ("auto", "quiet"):
        raise ConfigError(f"progress: got {progress!r}, expected 'auto', 'quiet', 'none' or a Callback")
    return ProgressCallback(quiet=progress == "quiet")  # epochs and steps per epoch: from the trainer

def _input_example(splits) -> np.ndarray:
    return np.ascontiguousarray(splits.x_train[:2])

def _final_evaluation(trainer, network, splits) -> Evaluation:
    """Test metrics of the final model (validation if the data set has no test split)."""
    if splits.x_test is not None and len(splits.x_test):
        split, x, y = "test", splits.x_test, splits.y_test
    elif splits.x_val is not None and len(splits.x_val):
        split, x, y = "val", splits.x_val, splits.y_val
    else:
        split, x, y = "train", splits.x_train, splits.y_train
    values, predictions = trainer.evaluate(x, y, normalize=True, return_predictions=True)  # a batch at a time
    metrics = {f"test_{k}": float(v) for k, v in values.items()} if split == "test" else {}
    return Evaluation(split, metrics, confusion_matrix(y, predictions, network.num_classes),
                      list(network.class_names or range(network.num_classes)))

def _write_plots(folder: Path, history, recorder, trainer, network, evaluation) -> list[Path]:
    from convtrain.training import plots

    paths = [plots.learning_curves(history.epochs, folder / "learning_curves.png",
                                   batch_losses=recorder.curve(trainer.steps_per_epoch),
                                   best_epoch=history.best_epoch, monitor=history.monitor)]
    paths.append(plots.confusion_matrix(evaluation.confusion, evaluation.class_names,
                                        folder / "confusion_matrix.png",
                                        title=f"confusion matrix ({evaluation.split} split)"))
    first = next((v for k, v in network.parameters().items() if k.endswith(".weight") and v.ndim == 4), None)
    if first is not None:
        paths.append(plots.filter_montage(first, folder / "filters_conv1.png"))
    return paths
