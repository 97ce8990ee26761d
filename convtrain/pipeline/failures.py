"""How a fit that stops ends: its MLflow run marked KILLED (an interrupt) or FAILED (an error),
and an interrupt outside the training loop's own handling turned into one line saying what is
on disk and how to continue."""

from __future__ import annotations

import contextlib

from convtrain.errors import TrainingInterrupted


@contextlib.contextmanager
def ends_run_on_failure(plan):
    """Within the block, any exception ends `plan.run` first; KeyboardInterrupt (Ctrl-C, or
    SIGTERM under sigterm_as_keyboard_interrupt) becomes a TrainingInterrupted naming
    `plan.stage`, which would otherwise end the CLI without a word."""
    try:
        yield
    except BaseException as exc:
        if plan.run is not None:
            plan.run.abort(exc, plan.out_dir)
        if isinstance(exc, KeyboardInterrupt):
            raise _interrupted(plan) from None
        raise


def _interrupted(plan) -> TrainingInterrupted:
    """The TrainingInterrupted for a Ctrl-C at `plan.stage`. After the first checkpoint, resuming
    it finishes the fit (a finished training only redoes the steps after the training loop)."""
    checkpoint = plan.trainer.checkpoint_path if plan.trainer is not None else None
    if checkpoint is None:  # nothing to resume
        run = f"; MLflow run {plan.run.run_id} is marked KILLED" if plan.run is not None else ""
        return TrainingInterrupted(f"stopped by an interrupt while {plan.stage}, before the first checkpoint{run}")
    saved = [f"the model is saved in {plan.model_path}"] if plan.model_path is not None else []
    saved.append(f"the last checkpoint is {checkpoint}")
    return TrainingInterrupted(f"stopped by an interrupt while {plan.stage}; " + ", ".join(saved),
                               checkpoint=checkpoint)
