"""The training state batch norm, dropout and AdamW add to a checkpoint, and reading it back.

Kept apart from the Trainer's own checkpoint code so that it moves as one piece:

* the optimizer's state: SGD's velocities as "velocity/<param>" (as checkpoints always held
  them), AdamW's step count and moments as "adamw/steps", "adamw/exp_avg/<param>", ...;
* batch norm's running statistics: "buffer/<layer>.running_mean", ... (Network.to_arrays
  writes them with the weights, so saved models carry them too);
* the dropout generator's state ("dropout_rng"): the masks a resumed fit draws are the ones
  the uninterrupted fit drew.
"""

from __future__ import annotations

import numpy as np

from convtrain.errors import CheckpointError
from convtrain.nn.network import buffer_entries
from convtrain.nn.npz_files import json_entry, read_json
from convtrain.nn.optim import SGD, AdamW


def optimizer_kind(optimizer) -> str:
    return "adamw" if isinstance(optimizer, AdamW) else "sgd"


def optimizer_arrays(optimizer) -> dict[str, np.ndarray]:
    if isinstance(optimizer, SGD):
        return {f"velocity/{name}": v for name, v in optimizer.velocities.items()}
    return {f"adamw/{key}": value for key, value in optimizer.state_dict().items()}


def load_optimizer_arrays(optimizer, arrays: dict[str, np.ndarray], path) -> None:
    saved_adamw = any(k.startswith("adamw/") for k in arrays)
    kind = optimizer_kind(optimizer)
    if saved_adamw != (kind == "adamw"):
        raise CheckpointError(
            f"checkpoint file {str(path)!r} was written by a fit with optimizer "
            f"{'adamw' if saved_adamw else 'sgd'}; resume with the same optimizer (not {kind})")
    prefix = "adamw/" if saved_adamw else "velocity/"
    optimizer.load_state_dict({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})


def layer_state_arrays(trainer) -> dict[str, np.ndarray]:
    """What save_checkpoint adds for these layers and optimizers (buffers come with the model)."""
    arrays = optimizer_arrays(trainer.optimizer)
    arrays["dropout_rng"] = json_entry(trainer.dropout_rng.bit_generator.state)
    return arrays


def load_layer_state(trainer, arrays: dict[str, np.ndarray], path) -> None:
    """Restore what layer_state_arrays saved (and the network's buffers); CheckpointError on any
    mismatch. Checkpoints from before batch norm and dropout have neither: nothing to restore."""
    trainer.network.set_buffers(buffer_entries(arrays), source=f"checkpoint file {str(path)!r}")
    load_optimizer_arrays(trainer.optimizer, arrays, path)
    if "dropout_rng" in arrays:
        try:
            trainer.dropout_rng.bit_generator.state = read_json(arrays, "dropout_rng", path, "checkpoint")
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint file {str(path)!r}: unusable dropout generator state ({exc})") from None
