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
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from convtrain.callbacks import Callback
from convtrain.config import FitConfig, read_toml
from convtrain.errors import CheckpointError, ConfigError, DataError, TrainingInterrupted
from convtrain.signals import sigterm_as_keyboard_interrupt

MODEL_FILE = "model.npz"
CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.npz"
PLOTS_DIR = "plots"
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


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


# ---- config resolution (shared with the CLI) -------------------------------------------------

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
        from convtrain.tracking import find_run_checkpoint, resolve_tracking_uri

        found = Path(find_run_checkpoint(spec, resolve_tracking_uri(tracking_uri)))
        if not found.is_file():
            raise CheckpointError(f"--resume {spec}: the run's checkpoint {found} no longer exists")
        return found
    raise CheckpointError(f"--resume {spec}: not a checkpoint file, a folder with {CHECKPOINT_FILE}, "
                          "or an MLflow run id (32 hex digits)")


def checkpoint_config(path: Path) -> FitConfig:
    """The resolved config a checkpoint was written with."""
    import tomllib

    from convtrain.checkpoint import read_npz

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
    from convtrain.checkpoint import read_json, read_npz

    arrays = read_npz(path, "checkpoint")
    return (read_json(arrays, "callbacks", path, "checkpoint") or {}).get(key) or {}


# ---- fit ----------------------------------------------------------------------------------------

class BatchLossRecorder(Callback):
    """Keeps (step, loss) every `every` updates for the learning-curve plot; survives resume."""

    key = "batch_losses"

    def __init__(self, every: int):
        self.every = every
        self.points: list[tuple[int, float]] = []

    def on_batch_end(self, trainer, step, logs):
        if step % self.every == 0:
            self.points.append((int(step), float(logs["loss"])))

    def state_dict(self):
        return {"points": self.points}

    def load_state_dict(self, state):
        self.points = [(int(s), float(v)) for s, v in state.get("points", [])]


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
    from convtrain.data import load_dataset
    from convtrain.train import Trainer

    config.validate()
    checkpoint = resolve_checkpoint(str(resume)) if resume is not None else None
    tracking_uri = None
    saved_tracking: dict = {}
    if checkpoint is not None:
        saved_tracking = checkpoint_callback_state(checkpoint, "mlflow")
    track = config.track and (checkpoint is None or bool(saved_tracking) or config.tracking_uri is not None)
    if track:
        from convtrain.tracking import check_reachable, resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(config.tracking_uri or saved_tracking.get("tracking_uri"))
        check_reachable(tracking_uri)  # fail fast, before any work or write

    if config.threads:
        from convtrain import set_num_threads

        set_num_threads(config.threads)

    splits = load_dataset(config.data, config.data_path, val_fraction=config.val_fraction, seed=config.seed,
                          limit=config.limit)
    if config.batch_size > len(splits.y_train):
        raise ConfigError(f"batch_size: got {config.batch_size}, larger than the {len(splits.y_train)} "
                          "training examples")
    network = _build_network(config, splits)

    out_dir = Path(checkpoint.parent if checkpoint is not None else (config.out or _default_out_parent())).resolve()
    _check_writable(out_dir)
    if checkpoint is not None:
        _check_resumable(checkpoint, network, config)
    elif config.out is not None and (out_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(f"out: {out_dir} already holds a checkpoint of another fit; continue it with "
                          f"--resume {out_dir}, or choose another --out")

    tracker = None
    if track:
        from convtrain.tracking import MLflowCallback

        tracker = MLflowCallback.start(config, tracking_uri=tracking_uri, parent_run_id=parent_run_id, tags=tags,
                                       resume_run_id=saved_tracking.get("run_id"))
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
            out_dir.mkdir(parents=True, exist_ok=True)
            config = config.with_overrides({"out": str(out_dir)})
            config.save_toml(out_dir / CONFIG_FILE)

            recorder = BatchLossRecorder(config.log_every)
            progress_callback = _progress_callback(progress, config, splits)
            # the Trainer adds early stopping (config.patience) and the checkpoint callback itself
            all_callbacks = [*([progress_callback] if progress_callback else []), recorder,
                             *([tracker] if tracker else []), *callbacks]
            trainer = Trainer.from_config(network, config, callbacks=all_callbacks, checkpoint_dir=out_dir)
            if checkpoint is not None:
                trainer.resume(checkpoint)
                _restore_meta(network, splits, checkpoint)
            else:
                # The epoch-0 checkpoint: initial weights, generator state and (in the MLflow
                # callback's state) the run id, written as soon as the run exists and before the
                # slower logging below, so a fit killed at any later moment -- even before its
                # first epoch ends -- resumes into this run instead of leaving it RUNNING forever.
                trainer.save_checkpoint()
            if tracker is not None:
                tracker.log_config(config, resumed=checkpoint is not None)
                tracker.set_tags({"convtrain.out_dir": str(out_dir.resolve())})
                # a fit killed before its datasets were logged logs them when resumed
                if checkpoint is None or not tracker.has_datasets():
                    tracker.log_datasets(splits, config.data_path)

            x_train = network.normalize(splits.x_train)
            x_val = network.normalize(splits.x_val) if splits.x_val is not None and len(splits.x_val) else None
            stage = "training"
            with _stop_on_signals(trainer):
                history = trainer.fit(x_train, splits.y_train, x_val, splits.y_val if x_val is not None else None)
            del x_train, x_val

            stage = "saving the model"
            model_path = network.save(out_dir / MODEL_FILE)
            metrics = dict(history.best if config.patience else history.last)
            metrics.pop("epoch", None)
            metrics["best_epoch"] = history.best_epoch
            stage = "evaluating the final model"
            evaluation = _final_evaluation(trainer, network, splits)
            metrics.update(evaluation.metrics)
            stage = "writing the plots"
            plots = _write_plots(out_dir / PLOTS_DIR, history, recorder, trainer, network, evaluation)

            stage = "logging the results to MLflow"
            problems = _log_results(tracker, trainer, evaluation, plots, model_path, splits, out_dir) if tracker else []
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
            raise
    return FitResult(run_id=tracker.run_id if tracker else None, history=history, metrics=metrics,
                     model_path=model_path, checkpoint_path=trainer.checkpoint_path, out_dir=out_dir,
                     network=network, config=config, tracking_uri=tracking_uri,
                     experiment_id=tracker.experiment_id if tracker else None, problems=problems)


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
    from convtrain.network import Network

    network = Network.from_config(config, splits.input_shape, splits.num_classes)
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


def _log_results(tracker, trainer, evaluation, plots, model_path, splits, out_dir) -> list[str]:
    """Test metrics, artifacts and the pyfunc model, then FINISHED; returns what did not get through."""
    tracker.log_final_metrics(evaluation.metrics, step=trainer.epoch)
    artifacts = [(out_dir / CONFIG_FILE, None), *[(p, "plots") for p in plots]]
    if trainer.checkpoint_path is not None:
        artifacts.append((trainer.checkpoint_path, "checkpoint"))
    problems = tracker.log_artifacts(artifacts)
    model_problem = tracker.log_model(model_path, _input_example(splits))
    if model_problem:
        problems.append(model_problem)
    return problems + tracker.finish("FINISHED", out_dir=out_dir)


def _default_out_parent() -> Path:
    return Path.cwd() / "runs"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.") or "run"


def _unique_dir(path: Path) -> Path:
    candidate, n = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.name}-{n}")
        n += 1
    return candidate


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


def _check_resumable(checkpoint: Path, network, config: FitConfig) -> None:
    """What Trainer.resume refuses, checked before the MLflow run is reopened and config.toml
    rewritten, so a resume that cannot work changes nothing."""
    from convtrain.checkpoint import read_json, read_npz

    arrays = read_npz(checkpoint, "checkpoint")
    architecture = read_json(arrays, "architecture", checkpoint, "checkpoint")
    if architecture != network.architecture:
        raise CheckpointError(f"checkpoint file {str(checkpoint)!r} was written for a different network "
                              f"({architecture}) than this one ({network.architecture})")
    state = read_json(arrays, "trainer", checkpoint, "checkpoint")
    if state.get("mid_epoch") and state.get("batch_size") != config.batch_size:
        raise CheckpointError(f"checkpoint file {str(checkpoint)!r} stopped mid-epoch with batch size "
                              f"{state.get('batch_size')}; resume with the same batch size (not {config.batch_size})")
    saved_classes = read_json(arrays, "class_names", checkpoint, "checkpoint")
    if saved_classes != network.class_names:
        raise CheckpointError(f"checkpoint {checkpoint} was trained on classes {saved_classes}, "
                              f"the data has {network.class_names}")


def _restore_meta(network, splits, checkpoint: Path) -> None:
    if network.class_names != list(splits.class_names):
        raise CheckpointError(f"checkpoint {checkpoint} was trained on classes {network.class_names}, "
                              f"the data has {list(splits.class_names)}")


def _progress_callback(progress, config: FitConfig, splits):
    if progress is None or progress is False or progress == "none":
        return None
    if isinstance(progress, Callback):
        return progress
    import math

    from convtrain.progress import ProgressCallback

    if progress not in ("auto", "quiet"):
        raise ConfigError(f"progress: got {progress!r}, expected 'auto', 'quiet', 'none' or a Callback")
    n_train = len(splits.y_train)
    if config.balanced:
        counts = np.bincount(splits.y_train)
        n_train = int((counts > 0).sum() * counts[counts > 0].min())
    return ProgressCallback(epochs=config.epochs, steps_per_epoch=math.ceil(n_train / config.batch_size),
                            quiet=progress == "quiet")


@contextlib.contextmanager
def _stop_on_signals(trainer):
    """SIGINT/SIGTERM ask the trainer to stop at the next batch (checkpoint, TrainingInterrupted);
    a second SIGINT interrupts at once. Only the main thread can own signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        trainer.request_stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        if not received:
            raise
        # the second Ctrl-C: no checkpoint of its own (it may have cut one short), but the last
        # complete one can still be resumed, and the user should be told so
        last = trainer.checkpoint_path
        raise TrainingInterrupted(
            f"training stopped at once by a second interrupt in epoch {trainer.epoch + 1} (update {trainer.step}); "
            + (f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"),
            checkpoint=last) from None
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _input_example(splits) -> np.ndarray:
    return np.ascontiguousarray(splits.x_train[:2])


# ---- evaluation -------------------------------------------------------------------------------

@dataclass
class Evaluation:
    split: str
    metrics: dict[str, float]  # test_loss, test_accuracy, ... (prefixed by the split)
    confusion: np.ndarray
    class_names: list[str]


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts; rows are true classes, columns predictions."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def _final_evaluation(trainer, network, splits) -> Evaluation:
    """Test metrics of the final model (validation if the data set has no test split)."""
    if splits.x_test is not None and len(splits.x_test):
        split, x, y = "test", splits.x_test, splits.y_test
    elif splits.x_val is not None and len(splits.x_val):
        split, x, y = "val", splits.x_val, splits.y_val
    else:
        split, x, y = "train", splits.x_train, splits.y_train
    x_norm = network.normalize(x)
    values = trainer.evaluate(x_norm, y)
    predictions = network.predict(x)
    metrics = {f"test_{k}": float(v) for k, v in values.items()} if split == "test" else {}
    return Evaluation(split, metrics, confusion_counts(np.asarray(y), predictions, network.num_classes),
                      list(network.class_names or range(network.num_classes)))


def _write_plots(folder: Path, history, recorder, trainer, network, evaluation) -> list[Path]:
    from convtrain import plots

    steps_per_epoch = max(trainer.step / max(trainer.epoch, 1), 1)
    batch = [(step / steps_per_epoch, loss) for step, loss in recorder.points]
    paths = [plots.learning_curves(history.epochs, folder / "learning_curves.png", batch_losses=batch)]
    paths.append(plots.confusion_matrix(evaluation.confusion, evaluation.class_names,
                                        folder / "confusion_matrix.png",
                                        title=f"confusion matrix ({evaluation.split} split)"))
    first = next((v for k, v in network.parameters().items() if k.endswith(".weight") and v.ndim == 4), None)
    if first is not None:
        paths.append(plots.filter_montage(first, folder / "filters_conv1.png"))
    return paths


@dataclass
class EvaluationReport:
    model: str
    data: str
    split: str
    count: int
    loss: float
    accuracy: float
    balanced_accuracy: float
    class_names: list[str]
    confusion: list[list[int]]
    per_class: list[dict]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate_model(model_path: str | Path, *, data: str | None = None, data_path: str | None = None,
                   split: str = "auto", limit: int | None = None) -> EvaluationReport:
    """Metrics of a saved model on a data set (by default the one it was trained on)."""
    from convtrain.data import balanced_accuracy, load_dataset
    from convtrain.losses import cross_entropy_sum
    from convtrain.network import Network

    network = Network.load(model_path)
    meta = network.meta or {}
    if split not in ("auto", "test", "val", "train"):
        raise ConfigError(f"split: got {split!r}, expected test, val, train or auto")
    name = data or meta.get("data")
    if name is None:
        raise ConfigError("data: the model does not record its data set; pass --data")
    if data_path is None and data is None:
        data_path = meta.get("data_path")
    same_data = name == meta.get("data")
    splits = load_dataset(name, data_path,
                          val_fraction=meta.get("val_fraction", 0.1) if same_data else 0.1,
                          seed=meta.get("seed", 0) if same_data else 0,
                          limit=meta.get("limit") if same_data else None)
    if split == "auto":
        split = "test" if splits.x_test is not None and len(splits.x_test) else "val"
    x, y = {"test": (splits.x_test, splits.y_test), "val": (splits.x_val, splits.y_val),
            "train": (splits.x_train, splits.y_train)}[split]
    if x is None or not len(x):
        raise DataError(f"data set {name!r} has no {split} split")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if splits.num_classes != network.num_classes:
        raise DataError(f"data set {name!r} has {splits.num_classes} classes, the model {network.num_classes}")
    # The loss from the scores (log-sum-exp): a float32 probability of a confidently wrong
    # prediction underflows to 0, and its log would make the loss infinite.
    loss_sum, predictions = 0.0, np.empty(len(y), dtype=np.int64)
    for start in range(0, len(y), 500):
        scores = network.forward(network.normalize(x[start:start + 500]), train=False)
        loss_sum += cross_entropy_sum(scores, y[start:start + 500])
        predictions[start:start + len(scores)] = scores.argmax(axis=1)
    loss = loss_sum / len(y)
    confusion = confusion_counts(np.asarray(y), predictions, network.num_classes)
    class_names = [str(c) for c in (network.class_names or splits.class_names)]
    per_class = []
    for k, class_name in enumerate(class_names):
        tp = int(confusion[k, k])
        count, predicted = int(confusion[k].sum()), int(confusion[:, k].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / count if count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": class_name, "count": count, "precision": precision, "recall": recall, "f1": f1})
    return EvaluationReport(
        model=str(model_path), data=name, split=split, count=int(len(y)), loss=float(loss),
        accuracy=float(np.mean(predictions == y)),
        balanced_accuracy=float(balanced_accuracy(np.asarray(y), predictions, network.num_classes)),
        class_names=class_names, confusion=confusion.tolist(), per_class=per_class)


# ---- predict ------------------------------------------------------------------------------------

def predict_inputs(model_path: str | Path, inputs: list[str]) -> list[dict]:
    """Class and probabilities for each input: .npz files (array x), image files, or names."""
    from convtrain.network import Network

    network = Network.load(model_path)
    class_names = [str(c) for c in (network.class_names or range(network.num_classes))]
    labels, batches = [], []
    if "alphabet" in (network.meta or {}):
        from convtrain.pyfunc import encode_names_for

        names = []
        for item in inputs:
            path = Path(item)
            names += _read_name_lines(path) if path.is_file() else [item]
        labels, batches = names, [encode_names_for(network, names)]
    else:
        for item in inputs:
            images = _read_images(Path(item), network)
            batches.append(images)
            labels += [item] if len(images) == 1 and not item.endswith(".npz") else [f"{item}[{i}]" for i in range(len(images))]
    x = np.concatenate(batches) if batches else np.empty((0, *network.input_shape), np.float32)
    probabilities = network.predict_proba(x) if len(x) else np.empty((0, network.num_classes))
    return [{"input": label, "class": class_names[int(p.argmax())],
             "probabilities": {c: float(v) for c, v in zip(class_names, p)}}
            for label, p in zip(labels, probabilities)]


def _read_name_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file of names") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no names in the file")
    return names


def _read_images(path: Path, network) -> np.ndarray:
    """(N, C, H, W) raw images from an .npz (array x, or its only array) or an image file."""
    if path.suffix.lower() == ".npz":
        from convtrain.checkpoint import read_npz

        arrays = read_npz(path, "input")
        key = "x" if "x" in arrays else (next(iter(arrays)) if len(arrays) == 1 else None)
        if key is None:
            raise DataError(f"{path}: no array 'x' (found: {', '.join(arrays) or 'none'})")
        x = arrays[key]
        if x.dtype.kind not in "fiub" or (x.dtype.kind == "f" and not np.isfinite(x).all()):
            raise DataError(f"{path}: array {key!r} must hold finite numbers, got {x.dtype}")
        if x.ndim == len(network.input_shape):
            x = x[None]
        if x.ndim == 3 and network.input_shape[0] == 1:
            x = x[:, None]
        return x.astype(np.float32)
    from convtrain.data import load_image_file

    return _fit_image(load_image_file(path), network, path)[None]


def _fit_image(pixels: np.ndarray, network, path: Path) -> np.ndarray:
    """Match an image file to the network's (C, H, W): channels by averaging/repeating, size by resizing."""
    channels, height, width = network.input_shape
    image = pixels[None] if pixels.ndim == 2 else pixels
    if image.shape[0] != channels:
        image = image.mean(axis=0, keepdims=True) if channels == 1 else np.repeat(image[:1], channels, axis=0)
    if image.shape[1:] != (height, width):
        from PIL import Image

        image = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize(
            (width, height), Image.BILINEAR)) for c in image])
    return image.astype(np.float32)


# ---- info -----------------------------------------------------------------------------------------

def describe_installation() -> dict[str, str]:
    """What `convtrain info` prints."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import convtrain
    from convtrain.tracking import blas_summary, resolve_tracking_uri

    info = {"convtrain": convtrain.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    for package in ("numpy", "scipy", "mlflow", "optuna"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    try:
        build = convtrain.build_info()
    except Exception as exc:  # e.g. the Cython extension was never compiled
        info["kernels"] = f"not available ({' '.join(str(exc).split())})"
    else:
        for key, value in build.items():
            if key == "blas":
                value = blas_summary(value)
            elif isinstance(value, list):
                value = ", ".join(map(str, value))
            info[key.replace("_", " ")] = str(value)
    info["tracking store"] = resolve_tracking_uri()
    return info


__all__ = ["FitResult", "fit", "evaluate_model", "predict_inputs", "resolve_fit_config", "describe_installation"]
