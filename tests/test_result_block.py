"""The result block `convtrain fit` prints last: which epoch the saved model is."""

from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from convtrain.cli import _print_fit_result
from convtrain.config import FitConfig


def result_block(patience, best_epoch=5, epochs_run=12) -> str:
    history = SimpleNamespace(best_epoch=best_epoch, epochs=[{"epoch": e} for e in range(1, epochs_run + 1)])
    result = SimpleNamespace(metrics={"val_accuracy": 0.9}, history=history, config=FitConfig(patience=patience),
                             model_path="out/model.npz", checkpoint_path="out/checkpoint.npz", run_id=None,
                             problems=[], registered_model=None)
    console = Console(width=120, record=True)
    _print_fit_result(console, result)
    return console.export_text()


def test_without_patience_the_saved_model_is_the_last_epoch():
    text = result_block(patience=None)
    assert "epoch 12, the last (the best val_loss was epoch 5's)" in text
    assert "best epoch" not in text


def test_with_patience_the_saved_model_is_the_best_epoch():
    text = result_block(patience=3, epochs_run=8)
    assert "best epoch  5 (the saved model)" in text


def test_a_last_epoch_that_is_the_best_is_said_once():
    assert "best epoch  12 (the saved model)" in result_block(patience=None, best_epoch=12)
