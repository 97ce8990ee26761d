"""Hyperparameter sweeps: an Optuna study whose every trial is one fit, logged as a child run.

spec (the sweep file) -> study (storage, tickets) -> launcher (workers) -> worker (one trial
= one fit) -> runs (MLflow parent/child) -> report and plots (trials.csv, best.toml).
"""
