"""The training checkpoint: one .npz holding everything a fit needs to continue exactly.

TrainingCheckpoint is the one owner of the format: it writes it (`capture(trainer).save(path)`)
and answers every question about a saved one: the config it was written with, a callback's
state, whether a network and batch size can continue it, and restoring a trainer. Nothing else
reads these entries.

Entries (plain arrays and JSON documents, no pickles; see nn/npz_files.py):
    param/<name>, buffer/<name>, architecture, normalization, class_names, meta
                     the network, exactly as a saved model holds it (so Network.load reads a
                     checkpoint, and restoring goes through Network.from_arrays); buffers are
                     batch norm's running statistics
    format           "convtrain-checkpoint-1"
    velocity/<name>  SGD's state_dict() arrays (its velocities)
    adamw/<key>      or AdamW's: "steps", "exp_avg/<name>", "exp_avg_sq/<name>"
    dropout_rng      the dropout generator's state (only for a network with dropout)
    trainer          epoch, step, epochs, batch_size, l2, seed, stop_training, mid_epoch,
                     batches_done
    epoch_order      the sample order of the epoch in progress (empty unless mid_epoch)
    rng              the shuffling generator's state
    schedule         the learning-rate schedule and its plan (a cosine's segments)
    history          the History callback's state
    callbacks        {key: state_dict()} of the other callbacks, and mid-epoch with running
                     training metrics the trainer's sums so far under "running_metrics"
    callback/<key>/<name>  their state arrays (EarlyStopping's best weights)
    config           the resolved FitConfig as TOML (absent for a Trainer built without one)

Each object saves and restores its own state (Trainer.state_dict(), the optimizer's, the
callbacks'); this module only maps those dicts to entries and back. A new kind of state gets its
own entry (or prefix) here, in `capture` and `restore`; a reader of an older file finds it absent
and starts that state fresh, so older checkpoints keep resuming.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convtrain.errors import CheckpointError, ConfigError
from convtrain.nn.npz_files import json_entry, read_json, read_npz, text_entry, write_npz_atomic
from convtrain.training.checkpoint_checks import check_checkpoint_entries
from convtrain.training.run_folder import RunFolder

_SHAPE_CHECKED = ("trainer", "history", "callbacks")  # see checkpoint_checks.py
CHECKPOINT_FORMAT = "convtrain-checkpoint-1"
OPTIMIZER_PREFIX = "velocity/"   # named after SGD's state, the first optimizer's
ADAMW_PREFIX = "adamw/"
CALLBACK_PREFIX = "callback/"
HISTORY_KEY = "history"           # the History callback's key, and its own entry


class TrainingCheckpoint:
    """A training checkpoint's entries, read from `path` or captured from a trainer."""

    def __init__(self, arrays: dict[str, np.ndarray], path: str | Path = "<unsaved checkpoint>"):
        self.arrays = arrays
        self.path = Path(path)

    # ---- writing --------------------------------------------------------------------

    @classmethod
    def capture(cls, trainer) -> "TrainingCheckpoint":
        """The complete training state of `trainer`, at an epoch end or mid-epoch: its network's
        arrays and its state_dict(), each dict in its entry."""
        state = trainer.state_dict()
        arrays = trainer.network.to_arrays()
        arrays["format"] = np.array(CHECKPOINT_FORMAT)
        prefix = _optimizer_prefix(trainer.optimizer)
        for name, value in state["optimizer"].items():
            arrays[prefix + name] = value
        if state["dropout_rng"] is not None:  # so a net without dropout writes the entries it always did
            arrays["dropout_rng"] = json_entry(state["dropout_rng"])
        arrays["trainer"] = json_entry(state["counters"])
        arrays["epoch_order"] = state["epoch_order"]
        arrays["rng"] = json_entry(state["rng"])
        arrays["schedule"] = json_entry(state["schedule"])
        callbacks = dict(state["callbacks"])
        arrays["history"] = json_entry(callbacks.pop(HISTORY_KEY))
        arrays["callbacks"] = json_entry(callbacks)
        for key, values in state["callback_arrays"].items():
            for name, value in values.items():
                arrays[f"{CALLBACK_PREFIX}{key}/{name}"] = value
        if trainer.config is not None:
            arrays["config"] = text_entry(trainer.config.to_toml())
        return cls(arrays)

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader sees the previous file or this one, never half."""
        self.path = write_npz_atomic(path, self.arrays)
        return self.path

    # ---- reading --------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "TrainingCheckpoint":
        """Read a checkpoint file; CheckpointError (one line) for anything else."""
        path = Path(path)
        arrays = read_npz(path, "checkpoint")
        if "trainer" not in arrays:
            raise CheckpointError(f"checkpoint file {str(path)!r} is a saved model, not a training checkpoint")
        return cls(arrays, path)

    def _json(self, key: str):
        value = read_json(self.arrays, key, self.path, "checkpoint")
        if key in _SHAPE_CHECKED:  # hand-edited entries: one line here, not a KeyError in the trainer
            check_checkpoint_entries({key: value}, self.path)
        return value

    def check_entries(self) -> None:
        """Read every shape-checked entry now: a hand-edited one is refused in one line before
        a resume contacts any store or writes anything."""
        for key in _SHAPE_CHECKED:
            if key in self.arrays:
                self._json(key)

    @property
    def name(self) -> str:
        return f"checkpoint file {str(self.path)!r}"

    @property
    def state(self) -> dict:
        """The trainer's counters: epoch, step, batch_size, mid_epoch, batches_done, ..."""
        return self._json("trainer")

    def config(self):
        """The resolved FitConfig the fit was started with."""
        from convtrain.config import FitConfig, parse_toml

        if "config" not in self.arrays:
            raise CheckpointError(f"{self.name} records no config; cannot resume it")
        values = parse_toml(str(self.arrays["config"][()]), f"{self.name}: stored config", CheckpointError)
        return FitConfig.from_dict(values, source=f"config in {self.path}")

    def next_epoch(self, epochs: int) -> int | None:
        """The first epoch a fit of `epochs` epochs resumed from here trains, or None if it trains
        none (it has run them all, or early stopping ended it)."""
        state = self.state
        if state["stop_training"]:
            return None
        epoch = int(state["epoch"])
        return epoch + 1 if state["mid_epoch"] or epoch < epochs else None

    def check_extension(self, epochs: int) -> None:
        """Refuse `epochs` past the length of a fit early stopping ended: resuming it trains no
        further epoch (next_epoch is None), so a longer fit would silently train nothing."""
        state = self.state
        if not state["stop_training"] or epochs <= int(state["epochs"]):
            return
        stopping = self.callback_state("EarlyStopping")
        stopped, best = stopping.get("stopped_epoch") or state["epoch"], stopping.get("best_epoch")
        restored = f"; its model is epoch {best}'s" if best is not None else ""
        config = RunFolder(self.path.parent).config
        raise ConfigError(
            f"epochs: the fit in {self.path.parent} was ended by early stopping at epoch {stopped}{restored}, "
            f"so resuming it with --epochs {epochs} would train nothing; to train longer, start a new fit "
            f"from its config (convtrain fit --config {config} --epochs {epochs} --out <new folder>)")

    def callback_state(self, key: str) -> dict:
        """The state_dict() the callback with this key saved ({} if it saved none)."""
        return (self._json("callbacks") or {}).get(key) or {}

    def check_resumable(self, network, batch_size: int, class_names: list[str] | None = None) -> None:
        """Refuse a network of another architecture, a mid-epoch checkpoint with another batch
        size and, when given, other class names: CheckpointError naming both sides."""
        architecture = self._json("architecture")
        if architecture != network.architecture:
            raise CheckpointError(f"{self.name} was written for a different network "
                                  f"({architecture}) than this one ({network.architecture})")
        for key in _SHAPE_CHECKED:  # a hand-edited entry is refused now, not after the run reopens
            self._json(key)
        state = self.state
        if state.get("mid_epoch") and state.get("batch_size") != batch_size:
            raise CheckpointError(f"{self.name} stopped mid-epoch with batch size {state.get('batch_size')}; "
                                  f"resume with the same batch size (not {batch_size})")
        if class_names is not None:
            saved_classes = self._json("class_names")
            if saved_classes != list(class_names):
                raise CheckpointError(f"checkpoint {self.path} was trained on classes {saved_classes}, "
                                      f"the data has {list(class_names)}")

    # ---- restoring ------------------------------------------------------------------

    def restore(self, trainer) -> None:
        """Put the saved state into `trainer`: the network's arrays into its live network, the
        rest through trainer.load_state_dict(); its next fit() continues from there."""
        self.check_resumable(trainer.network, trainer.batch_size)
        self._restore_network(trainer.network)
        trainer.load_state_dict({
            "counters": self.state, "epoch_order": self.arrays["epoch_order"], "rng": self._json("rng"),
            "dropout_rng": self._json("dropout_rng") if "dropout_rng" in self.arrays else None,
            "schedule": self._json("schedule") if "schedule" in self.arrays else None,
            "optimizer": self._optimizer_state(trainer.optimizer),
            "callbacks": {**self._json("callbacks"), HISTORY_KEY: self._json("history")},
            "callback_arrays": self._callback_arrays(),
        }, source=self.name)

    def _restore_network(self, network) -> None:
        from convtrain.nn.network import Network

        saved = Network.from_arrays(self.arrays, self.path, "checkpoint")
        # into the live arrays: the optimizer holds references to them
        network.set_parameters(saved.parameters(), source=self.name)
        network.normalization = saved.normalization
        network.class_names = saved.class_names
        network.meta = saved.meta
        network.set_buffers(saved.buffers(), source=self.name)

    def _optimizer_state(self, optimizer) -> dict[str, np.ndarray]:
        """The saved optimizer state, refused if another kind of optimizer wrote it."""
        saved_adamw = any(k.startswith(ADAMW_PREFIX) for k in self.arrays)
        prefix = _optimizer_prefix(optimizer)
        if saved_adamw != (prefix == ADAMW_PREFIX):
            raise CheckpointError(
                f"{self.name} was written by a fit with optimizer {'adamw' if saved_adamw else 'sgd'}; "
                f"resume with the same optimizer (not {'adamw' if prefix == ADAMW_PREFIX else 'sgd'})")
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}

    def _callback_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for entry, value in self.arrays.items():
            if entry.startswith(CALLBACK_PREFIX):
                key, name = entry[len(CALLBACK_PREFIX):].rsplit("/", 1)
                grouped.setdefault(key, {})[name] = value
        return grouped


def _optimizer_prefix(optimizer) -> str:
    from convtrain.nn.optim import AdamW

    return ADAMW_PREFIX if isinstance(optimizer, AdamW) else OPTIMIZER_PREFIX
