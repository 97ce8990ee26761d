"""The `convtrain` command: fit, evaluate, predict, info, ui (and sweep, registered by convtrain.sweep.cli).

Only typer and the config module are imported at the top: numpy, the engine and MLflow load
inside the commands, so `convtrain --help` answers at once.

Errors a user can fix (ConvtrainError, bad flags, OS errors such as a full disk) print one
line on stderr and exit non-zero; `--debug` (or CONVTRAIN_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from convtrain.config import FitConfig
from convtrain.errors import ConvtrainError, TrainingInterrupted, one_line


class ConvtrainGroup(TyperGroup):
    """Runs the app in non-standalone mode so every failure can be shown as one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("CONVTRAIN_DEBUG", "") not in ("", "0")
        try:
            result = super().main(args=argv, prog_name=prog_name or "convtrain", complete_var=complete_var,
                                  standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except typer.TyperException as exc:  # typer's bad-flag errors (its vendored click's ClickException)
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `convtrain`: the help was shown
                code = 0
            else:
                _error_line(_usage_message(exc))
                code = exc.exit_code
        except typer.Abort:
            _error_line("aborted")
            code = 130
        except ConvtrainError as exc:
            if debug:
                raise
            _error_line(one_line(exc))
            code = exc.exit_code
        except OSError as exc:  # unwritable folder, full disk, ...: the environment, not a bug
            if debug:
                raise
            _error_line(one_line(exc))
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code)


def _usage_message(exc: typer.TyperException) -> str:
    message = one_line(exc.format_message())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        return f"{message} (see: {ctx.command_path} --help)"
    return message


def _error_line(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


app = typer.Typer(
    cls=ConvtrainGroup,
    name="convtrain",
    help="Train ConvNets from scratch (Cython kernels, NumPy engine); every fit is tracked in MLflow.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEBUG_HELP = "Show tracebacks instead of one-line errors."


def _console(**kwargs):
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, **kwargs)


def _default(name: str) -> str:
    """'(default: …)' from FitConfig itself, so the help never drifts from the real defaults."""
    value = getattr(_DEFAULTS, name)
    shown = ",".join(str(v) for v in value) if isinstance(value, list) else value
    return f"(default: {shown})"


_DEFAULTS = FitConfig()

# ---- fit ----------------------------------------------------------------------------------

CONFIG = "Config"
DATA = "Data"
MODEL = "Model"
OPTIM = "Optimizer"
RUN = "Run and tracking"


@app.command(no_args_is_help=False)
def fit(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A fit config TOML; flags override it.", rich_help_panel=CONFIG),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as TOML and exit.", rich_help_panel=CONFIG),
    resume: Optional[str] = typer.Option(None, help="Continue a stopped fit: its checkpoint, its --out folder, or its MLflow run id.", rich_help_panel=CONFIG),
    data: Optional[str] = typer.Option(None, help=f"Data set: digits, mnist, cifar10, npz, names. {_default('data')}", rich_help_panel=DATA),
    data_path: Optional[str] = typer.Option(None, help="Where the data set is: a directory, or the .npz file.", rich_help_panel=DATA),
    val_fraction: Optional[float] = typer.Option(None, help=f"Validation split: a fraction of train, or a count. {_default('val_fraction')}", rich_help_panel=DATA),
    limit: Optional[int] = typer.Option(None, help="Use at most this many training examples.", rich_help_panel=DATA),
    balanced: Optional[bool] = typer.Option(None, "--balanced/--no-balanced", help="Class-balanced mini-batches.", rich_help_panel=DATA),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random flips and shifts of training images.", rich_help_panel=DATA),
    filters: Optional[str] = typer.Option(None, help=f"Filters per conv block, e.g. 16,32. {_default('filters')}", rich_help_panel=MODEL),
    kernel_sizes: Optional[str] = typer.Option(None, help=f"Kernel size per block: 3,3 or 5x3 for height x width. {_default('kernel_sizes')}", rich_help_panel=MODEL),
    strides: Optional[str] = typer.Option(None, help=f"Stride per block, e.g. 1,2. {_default('strides')}", rich_help_panel=MODEL),
    padding: Optional[str] = typer.Option(None, help=f"Padding per block: a number, 'same' or 'valid'. {_default('padding')}", rich_help_panel=MODEL),
    pool: Optional[str] = typer.Option(None, help=f"Max-pool size per block, 0 = none. {_default('pool')}", rich_help_panel=MODEL),
    hidden: Optional[str] = typer.Option(None, help="Hidden dense layer sizes before the output, e.g. 64.", rich_help_panel=MODEL),
    dtype: Optional[str] = typer.Option(None, help=f"float32 or float64. {_default('dtype')}", rich_help_panel=MODEL),
    batch_norm: Optional[bool] = typer.Option(None, "--batch-norm/--no-batch-norm", help="Batch normalization after every conv and hidden dense layer, before its ReLU.", rich_help_panel=MODEL),
    dropout: Optional[str] = typer.Option(None, help=f"Dropout probability after each hidden dense layer, or one per layer, e.g. 0.5,0.3. {_default('dropout')}", rich_help_panel=MODEL),
    global_pool: Optional[str] = typer.Option(None, help=f"avg: global average pooling after the last block (the dense layers see one value per channel), or none. {_default('global_pool')}", rich_help_panel=MODEL),
    pool_type: Optional[str] = typer.Option(None, help=f"Pooling in the blocks: max or avg. {_default('pool_type')}", rich_help_panel=MODEL),
    epochs: Optional[int] = typer.Option(None, help=f"Epochs to train. {_default('epochs')}", rich_help_panel=OPTIM),
    batch_size: Optional[int] = typer.Option(None, help=f"Mini-batch size. {_default('batch_size')}", rich_help_panel=OPTIM),
    optimizer: Optional[str] = typer.Option(None, help=f"sgd (momentum, --l2) or adamw (decoupled --weight-decay). {_default('optimizer')}", rich_help_panel=OPTIM),
    lr: Optional[float] = typer.Option(None, help=f"Learning rate. {_default('lr')}", rich_help_panel=OPTIM),
    momentum: Optional[float] = typer.Option(None, help=f"SGD momentum in [0, 1). {_default('momentum')}", rich_help_panel=OPTIM),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum.", rich_help_panel=OPTIM),
    l2: Optional[float] = typer.Option(None, help=f"L2 penalty lambda on the weights. {_default('l2')}", rich_help_panel=OPTIM),
    beta1: Optional[float] = typer.Option(None, help=f"adamw: decay of the first moment. {_default('beta1')}", rich_help_panel=OPTIM),
    beta2: Optional[float] = typer.Option(None, help=f"adamw: decay of the second moment. {_default('beta2')}", rich_help_panel=OPTIM),
    eps: Optional[float] = typer.Option(None, help=f"adamw: added to the denominator. {_default('eps')}", rich_help_panel=OPTIM),
    weight_decay: Optional[float] = typer.Option(None, help=f"adamw: decoupled weight decay of the conv and dense weights. {_default('weight_decay')}", rich_help_panel=OPTIM),
    label_smoothing: Optional[float] = typer.Option(None, help=f"Label smoothing e of the cross-entropy: targets (1-e)*onehot + e/K. {_default('label_smoothing')}", rich_help_panel=OPTIM),
    clip_norm: Optional[float] = typer.Option(None, help="Clip the gradients to this global L2 norm. (default: no clipping)", rich_help_panel=OPTIM),
    schedule: Optional[str] = typer.Option(None, help=f"LR schedule: constant, step, cosine, cyclic. {_default('schedule')}", rich_help_panel=OPTIM),
    step_epochs: Optional[int] = typer.Option(None, help="step: epochs between LR drops.", rich_help_panel=OPTIM),
    gamma: Optional[float] = typer.Option(None, help="step: LR factor per drop.", rich_help_panel=OPTIM),
    eta_min: Optional[float] = typer.Option(None, help="cosine/cyclic: lowest LR.", rich_help_panel=OPTIM),
    eta_max: Optional[float] = typer.Option(None, help="cyclic: highest LR.", rich_help_panel=OPTIM),
    n_s: Optional[int] = typer.Option(None, help="cyclic: updates per half cycle.", rich_help_panel=OPTIM),
    cycles: Optional[int] = typer.Option(None, help="cyclic: train for this many cycles instead of --epochs.", rich_help_panel=OPTIM),
    seed: Optional[int] = typer.Option(None, help=f"Seed for the split, the weights and the batches. {_default('seed')}", rich_help_panel=RUN),
    threads: Optional[int] = typer.Option(None, help="Kernel threads. (default: all cores)", rich_help_panel=RUN),
    patience: Optional[int] = typer.Option(None, help="Early stopping after this many epochs without improvement.", rich_help_panel=RUN),
    monitor: Optional[str] = typer.Option(None, help=f"Metric for early stopping and the best epoch. {_default('monitor')}", rich_help_panel=RUN),
    experiment: Optional[str] = typer.Option(None, help=f"MLflow experiment. {_default('experiment')}", rich_help_panel=RUN),
    run_name: Optional[str] = typer.Option(None, help="MLflow run name (also names the --out folder).", rich_help_panel=RUN),
    out: Optional[str] = typer.Option(None, help="Folder for checkpoints, model.npz and config.toml. (default: runs/<run name>)", rich_help_panel=RUN),
    track: Optional[bool] = typer.Option(None, "--track/--no-track", help="Log the run to MLflow. (default: track)", rich_help_panel=RUN),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store. (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)", rich_help_panel=RUN),
    log_every: Optional[int] = typer.Option(None, help=f"Log the batch loss every this many updates. {_default('log_every')}", rich_help_panel=RUN),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final summary.", rich_help_panel=RUN),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP, rich_help_panel=RUN),
):
    """Train a ConvNet; with no options: the default small net on the built-in digits."""
    from convtrain.pipeline.fit import fit as run_fit
    from convtrain.pipeline.resume import resolve_fit_config

    overrides = {name: value for name, value in locals().items() if name in _CONFIG_FLAGS}
    resolved, checkpoint = resolve_fit_config(config_path=config, overrides=overrides, resume=resume)
    if print_config:
        typer.echo(resolved.to_toml(), nl=False)
        return
    _quiet_library_logs(debug)
    console = _console()
    try:
        result = run_fit(resolved, resume=checkpoint, progress="quiet" if quiet else "auto")
    except TrainingInterrupted as exc:
        folder = Path(exc.checkpoint).parent if exc.checkpoint else None
        hint = f"; continue with: convtrain fit --resume {folder}" if folder else "; nothing to resume"
        _error_line(f"interrupted: {one_line(exc)}{hint}")
        raise typer.Exit(exc.exit_code)
    _print_fit_result(console, result)


_CONFIG_FLAGS = {
    "data", "data_path", "val_fraction", "limit", "balanced", "augment", "filters", "kernel_sizes",
    "strides", "padding", "pool", "hidden", "dtype", "batch_norm", "dropout", "global_pool", "pool_type",
    "epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "l2", "beta1", "beta2", "eps",
    "weight_decay", "label_smoothing", "clip_norm", "schedule", "step_epochs", "gamma", "eta_min", "eta_max", "n_s", "cycles", "seed", "threads",
    "patience", "monitor", "experiment", "run_name", "out", "track", "tracking_uri", "log_every",
}


def _default_store() -> str:
    from convtrain.tracking.store import resolve_tracking_uri

    return resolve_tracking_uri()


def _quiet_library_logs(debug: bool) -> None:
    """MLflow logs INFO chatter (table creation, example validation) into the progress output;
    the CLI shows its warnings and errors only, unless --debug. MLflow sets its loggers up
    from MLFLOW_LOGGING_LEVEL when imported, so the variable (not the logger) is set here."""
    if not debug:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _print_fit_result(console, result) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    test = {k: v for k, v in result.metrics.items() if k.startswith("test_")}
    best = result.history.best_epoch if result.history is not None else None
    if test:
        table.add_row("test", "  ".join(f"{k[5:]} {v:.4f}" for k, v in sorted(test.items())))
    val = {k: result.metrics[k] for k in ("val_accuracy", "val_balanced_accuracy", "val_loss") if k in result.metrics}
    if val:
        table.add_row("val", "  ".join(f"{k[4:]} {v:.4f}" for k, v in val.items()))
    if best is not None:
        table.add_row("best epoch", str(best))
    table.add_row("model", str(result.model_path))
    table.add_row("checkpoint", str(result.checkpoint_path))
    if result.run_id:
        table.add_row("mlflow run", f"{result.run_id}  ({result.tracking_uri})")
        if result.tracking_uri.startswith(("http://", "https://")):
            base = result.tracking_uri.rstrip("/")
            table.add_row("dashboard", f"{base}/#/experiments/{result.experiment_id}/runs/{result.run_id}")
        else:
            table.add_row("dashboard", "convtrain ui" + ("" if result.tracking_uri == _default_store()
                                                         else f" --tracking-uri {result.tracking_uri}"))
    for problem in result.problems:
        table.add_row("warning", problem)
    console.print(table)


# ---- evaluate / predict -----------------------------------------------------------------------

@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="A model.npz (or checkpoint.npz) written by convtrain fit."),
    data: Optional[str] = typer.Option(None, help="Data set to evaluate on. (default: the one the model was trained on)"),
    data_path: Optional[str] = typer.Option(None, help="Where the data set is (a directory, or the .npz file)."),
    split: str = typer.Option("auto", help="test, val, train, or auto (test if the data set has one, else val)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate at most this many examples."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
):
    """Accuracy, balanced accuracy, a per-class table and the confusion matrix of a saved model."""
    from convtrain.pipeline.evaluate import evaluate_model

    report = evaluate_model(model, data=data, data_path=data_path, split=split, limit=limit)
    if json_out:
        import json

        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print_evaluation(_console(), report)


def _print_evaluation(console, report) -> None:
    from rich.table import Table

    console.print(f"{report.model}: {report.data} {report.split} split, {report.count} examples", markup=False)
    console.print(f"accuracy {report.accuracy:.4f}   balanced accuracy {report.balanced_accuracy:.4f}   "
                  f"loss {report.loss:.4f}", markup=False)
    per_class = Table(title="per class", title_justify="left", show_edge=False)
    for title in ("class", "count", "precision", "recall", "f1"):
        per_class.add_column(title, justify="left" if title == "class" else "right")
    for row in report.per_class:
        per_class.add_row(row["class"], str(row["count"]), f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                          f"{row['f1']:.3f}")
    console.print(per_class)
    cm = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left", show_edge=False)
    cm.add_column("")
    short = [name[:6] for name in report.class_names]
    for name in short:
        cm.add_column(name, justify="right")
    for name, row in zip(short, report.confusion):
        cm.add_row(name, *[str(v) for v in row])
    console.print(cm)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A model.npz (or checkpoint.npz) written by convtrain fit."),
    inputs: List[str] = typer.Argument(..., help="An .npz of images (array x), image files, or for a names "
                                                  "model a text file of names or the names themselves."),
    top: int = typer.Option(3, min=1, help="Show the most probable classes, this many."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per input with all probabilities."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
):
    """The predicted class and probabilities for each input."""
    import json

    from convtrain.pipeline.predict import predict_inputs

    predictions = predict_inputs(model, inputs)
    if json_out:
        for item in predictions:
            typer.echo(json.dumps(item))
        return
    console = _console()
    for item in predictions:
        ranked = sorted(item["probabilities"].items(), key=lambda kv: -kv[1])[:top]
        console.print(f"{item['input']}: {item['class']}   " + "  ".join(f"{c} {p:.3f}" for c, p in ranked),
                      markup=False)


# ---- info / ui ------------------------------------------------------------------------------------

@app.command()
def info(debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP)):
    """Version and build: OpenMP, kernel threads, BLAS, and the default tracking store."""
    from convtrain.pipeline.info import describe_installation

    console = _console()
    for key, value in describe_installation().items():
        console.print(f"{key:<16} {value}", markup=False)


@app.command()
def ui(
    port: int = typer.Option(5000, help="Port of the MLflow UI."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store. (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"),
    experiment: str = typer.Option("convtrain", help="Experiment whose runs table the printed URL opens."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
):
    """Start the MLflow UI on the store your fits use and print the runs-table URL."""
    from convtrain.tracking.ui import serve_ui

    raise typer.Exit(serve_ui(tracking_uri=tracking_uri, host=host, port=port, experiment=experiment,
                              echo=lambda line: typer.echo(line)))


# ---- sweep ----------------------------------------------------------------------------------
# `convtrain sweep` lives in convtrain/sweep/cli.py (it imports only typer; Optuna loads when the
# command runs, so `convtrain --help` stays instant).
from convtrain.sweep.cli import register as _register_sweep  # noqa: E402

_register_sweep(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
