"""The engine: the compiled kernels' wrappers, layers, network, loss, optimizers.

Never imports mlflow, optuna, typer or rich: it can be read, tested and reused without the
service around it (tests/test_layering.py holds it to that).
"""
