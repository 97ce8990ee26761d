"""The first step of a fit: everything checked and set up before the first update.

The order is chosen so that bad input fails before anything is written: the config, the
checkpoint to resume, the tracking store, the data, the architecture and the output folder are
all checked before the MLflow run and the run folder are created. The result is a FitPlan,
which `train` and `finish` (pipeline/train.py, pipeline/finish.py) carry on from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from convtrain.config import FitConfig
from convtrain.errors import ConfigError
from convtrain.pipeline.failures import ends_run_on_failure
from convtrain.pipeline.out_folder import claim_out_folder, new_run_folder, writable_out_folder
from convtrain.pipeline.resume import resolve_checkpoint
from convtrain.pipeline.timings import FitTimings
from convtrain.training.callbacks import Callback
from convtrain.training.checkpoint import TrainingCheckpoint
from convtrain.training.run_folder import RunFolder, RunFolderLock


@dataclass
class FitPlan:
    """A fit ready to train: its config (with its run folder), data, network, run and callbacks."""
    config: FitConfig
    splits: Any                           # convtrain.data.Splits
    network: Any                          # convtrain.nn.network.Network
    out_dir: Path                         # the run folder (its parent, until the folder is made)
    resume_from: TrainingCheckpoint | None
    run: Any                              # convtrain.tracking.tracked_run.TrackedRun, None untracked
    tracking_uri: str | None
    callbacks: list = field(default_factory=list)   # the caller's
    progress: Callback | None = None
    started: float = field(default_factory=time.monotonic)
    # what the fit has got to, for the message of an interrupt outside the training loop
    stage: str = "setting up the fit"
    timings: FitTimings = field(default_factory=FitTimings)  # seconds per phase, for --timings
    trainer: Any = None
    model_path: Path | None = None
    plot_workers: Any = None  # convtrain.training.plot_worker.PlotWorkers, started by fit()


def prepare(config: FitConfig, lock: RunFolderLock, *, resume: str | Path | None = None,
            parent_run_id: str | None = None, tags: dict | None = None, callbacks: Iterable[Callback] = (),
            progress: Any = "auto") -> FitPlan:
    """Check everything, load the data, build the network, open the MLflow run and the run
    folder (locked by `lock`); see the module docstring for the order."""
    from convtrain.data import load_dataset
    from convtrain.data.augment import plan_for
    from convtrain.pipeline.image_folder import decode_progress, options_from_config

    timings = FitTimings()
    started = time.monotonic()
    config.validate()
    progress_callback = _progress_callback(progress)
    checkpoint = resolve_checkpoint(str(resume)) if resume is not None else None
    saved = TrainingCheckpoint.load(checkpoint) if checkpoint is not None else None
    if saved is not None:  # before the store is contacted
        saved.check_entries()
        saved.check_extension(config.epochs)
    saved_tracking = saved.callback_state("mlflow") if saved is not None else {}
    with timings.phase("store"):
        tracking_uri = _reachable_store(config, resumed=saved is not None, saved_tracking=saved_tracking)
    if config.threads:
        from convtrain.nn.backend import set_num_threads

        set_num_threads(config.threads)

    data_started = time.monotonic()
    with decode_progress(progress == "auto") as decoding:  # an image folder's first read decodes it
        splits = load_dataset(config.data, config.data_path, val_fraction=config.val_fraction, seed=config.seed,
                              limit=config.limit, folder=options_from_config(config, decoding))
    if config.batch_size > len(splits.y_train):
        raise ConfigError(f"batch_size: got {config.batch_size}, larger than the {len(splits.y_train)} "
                          "training examples")
    check_validation_split(config, splits)
    plan_for(config).check(splits.input_shape)  # a crop or cutout larger than the images
    network = _build_network(config, splits)
    out_dir = writable_out_folder(config, checkpoint)
    if saved is not None:
        # what resuming would refuse, before the MLflow run is reopened and config.toml rewritten
        saved.check_resumable(network, config.batch_size, network.class_names)
    claim_out_folder(out_dir, config, resumed=saved is not None, lock=lock)
    timings.add("data", time.monotonic() - data_started)

    run = None
    if tracking_uri is not None:
        store_started = time.monotonic()
        from convtrain.tracking.tracked_run import TrackedRun

        run = TrackedRun.start(config, tracking_uri=tracking_uri, parent_run_id=parent_run_id, tags=tags,
                               resume_run_id=saved_tracking.get("run_id"),
                               next_epoch=saved.next_epoch(config.epochs) if saved is not None else None)
        timings.add("store", time.monotonic() - store_started)
    plan = FitPlan(config, splits, network, out_dir, saved, run, tracking_uri, callbacks=list(callbacks),
                   progress=progress_callback, started=started, timings=timings)
    with ends_run_on_failure(plan), timings.phase("data"):
        _open_run_folder(plan, lock)
    return plan


def _reachable_store(config: FitConfig, *, resumed: bool, saved_tracking: dict) -> str | None:
    """The tracking URI a fit logs to, checked now, before any work or write; None untracked (a
    resumed fit that was untracked stays so unless given a --tracking-uri). A resumed fit logs
    to its checkpoint's store only if that is the current one (store.check_stored_uri)."""
    if not config.track or (resumed and not saved_tracking and config.tracking_uri is None):
        return None
    from convtrain.tracking.store import check_reachable, check_stored_uri, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    if resumed and saved_tracking:
        check_stored_uri(saved_tracking.get("tracking_uri"), tracking_uri,
                         f"--resume: the checkpoint's MLflow run {saved_tracking.get('run_id')}")
    check_reachable(tracking_uri)
    return tracking_uri


def _open_run_folder(plan: FitPlan, lock: RunFolderLock) -> None:
    """A new fit without --out gets a new folder named after its run; the config it runs with
    names the folder and, for a new fit, is saved there (a resumed one saves it once resuming
    works)."""
    if plan.resume_from is None and plan.config.out is None:
        plan.out_dir = new_run_folder(plan.out_dir, plan.config.run_name or (plan.run and plan.run.run_name), lock)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    plan.config = plan.config.with_overrides({"out": str(plan.out_dir)})
    if plan.resume_from is None:
        plan.config.save_toml(RunFolder(plan.out_dir).config)


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


def check_validation_split(config: FitConfig, splits) -> None:
    """Early stopping on a val_* metric needs validation data: refused before any run or file exists."""
    if config.patience and config.monitor.startswith("val_") and (splits.x_val is None or not len(splits.x_val)):
        raise ConfigError(f"monitor: {config.monitor!r} needs a validation set for --patience; use a validation "
                          "split (--val-fraction) or monitor 'train_loss'")


def _progress_callback(progress) -> Callback | None:
    if progress is None or progress is False or progress == "none":
        return None
    if isinstance(progress, Callback):
        return progress
    from convtrain.training.progress import ProgressCallback

    if progress not in ("auto", "quiet"):
        raise ConfigError(f"progress: got {progress!r}, expected 'auto', 'quiet', 'none' or a Callback")
    return ProgressCallback(quiet=progress == "quiet")  # epochs and steps per epoch: from the trainer
