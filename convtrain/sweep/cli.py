"""The `convtrain sweep` command. Only typer is imported here: Optuna and MLflow load when
the command runs, so `convtrain --help` stays instant."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def sweep(
    ctx: typer.Context,
    sweep_file: Path = typer.Argument(..., help="A sweep TOML (see experiments/sweep-*.toml).",
                                      show_default=False),
    workers: int = typer.Option(1, "--workers", "-w", min=1,
                                help="Worker processes on this machine; each gets cores/N kernel threads."),
    force_workers: bool = typer.Option(False, "--force-workers",
                                       help="Allow more --workers than cores (up to 64).", show_default="off"),
    storage: Optional[str] = typer.Option(
        None, help="Optuna storage URL; postgresql://... lets several machines share the study. "
                   "(default: sqlite:///optuna.db beside the MLflow store)"),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", "-n", min=1,
                                           help="Trials in the whole study (default: the sweep file's)."),
    tracking_uri: Optional[str] = typer.Option(
        None, help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."),
    study_name: Optional[str] = typer.Option(None, help="Optuna study name (default: the sweep file's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final table.", show_default="off"),
):
    """Search fit parameters with Optuna; every trial is a child run of one MLflow parent run.

    Re-running the same command resumes an interrupted sweep; running it on several machines
    with one --storage postgresql://... URL shares the trials between them.
    """
    from convtrain.sweep.launcher import run_sweep
    from convtrain.tracking.quiet import quiet_by_default

    quiet_by_default((ctx.obj or {}).get("debug", False))  # no MLflow INFO between the trial lines
    outcome = run_sweep(sweep_file, workers=workers, storage=storage, n_trials=n_trials,
                        tracking_uri=tracking_uri, study_name=study_name, quiet=quiet,
                        force_workers=force_workers)
    if outcome.parent_run_id and not quiet:
        from convtrain.tracking.store import resolve_tracking_uri

        ui = "convtrain ui" + ("" if outcome.tracking_uri == resolve_tracking_uri(None)
                               else f" --tracking-uri {outcome.tracking_uri}")
        typer.echo(f"dashboard: {ui}  (the sweep is parent run {outcome.parent_run_id})")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
