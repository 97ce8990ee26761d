"""The training loop: trainer, callbacks, checkpoints, progress, metrics and plots.

Never imports mlflow, optuna or typer (tests/test_layering.py holds it to that).
"""
