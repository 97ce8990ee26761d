"""How a fit stops early: the one-line errors for a diverged loss and for an interrupt, each
saying where training stood and what is on disk (the trainer raises them; the CLI prints them)."""

from __future__ import annotations

import numpy as np

from convtrain.errors import TrainingDiverged, TrainingInterrupted


def last_good(trainer) -> str:
    """Where the last checkpoint a resume can trust is, in words."""
    if trainer.checkpoint_path is None:
        return "no checkpoint was written" + ("" if trainer.checkpoint_dir else " (no checkpoint directory)")
    return f"the last good checkpoint is {trainer.checkpoint_path} (epoch {trainer.checkpoint_epoch})"


def diverged(trainer, what: str, epoch: int, batch: int | None, num_batches: int) -> TrainingDiverged:
    where = f"epoch {epoch}" + (f", batch {batch}/{num_batches}" if batch is not None else "")
    return TrainingDiverged(f"{what} at {where} (update {trainer.step + 1}); {last_good(trainer)}; "
                            f"try a lower learning rate", epoch=epoch, batch=batch, checkpoint=trainer.checkpoint_path)


def check_finite_parameters(trainer) -> None:
    """Refuse to checkpoint NaN or infinite weights, so the last good checkpoint is never
    overwritten by them."""
    for name, value in trainer.network.parameters().items():
        if not np.isfinite(value).all():
            raise TrainingDiverged(
                f"parameter {name} is not finite after update {trainer.step} (epoch {trainer.epoch + 1}); "
                f"not writing a checkpoint; {last_good(trainer)}",
                epoch=trainer.epoch + 1, checkpoint=trainer.checkpoint_path)


def interrupted(trainer, epoch: int, num_batches: int) -> TrainingInterrupted:
    """The stop a Ctrl-C or SIGTERM asked for, at a batch boundary: checkpointed where possible."""
    where = (f"epoch {epoch}, batch {trainer.batches_done}/{num_batches}" if trainer.epoch_order is not None
             else f"the end of epoch {epoch}")
    path = trainer.save_checkpoint() if trainer.checkpoint_dir is not None else None
    saved = f"checkpoint written to {path}" if path else "no checkpoint directory, nothing saved"
    return TrainingInterrupted(f"training stopped at {where} (update {trainer.step}); {saved}", checkpoint=path)
