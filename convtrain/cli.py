"""The `convtrain` command: fit, evaluate, predict, info, ui (and sweep, registered by convtrain.sweep.cli).

Only typer and the config module are imported at the top: numpy, the engine and MLflow load
inside the commands, so `convtrain --help` answers at once.

Errors a user can fix (ConvtrainError, bad flags, OS errors such as a full disk) print one
line on stderr and exit non-zero; `convtrain --debug ...` (or CONVTRAIN_DEBUG=1) also prints
the traceback, with the same exit code.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from convtrain.config import DEFAULTS, FIELD_TYPES, FitConfig, flag_name, show_value
from convtrain.errors import ConvtrainError, TrainingInterrupted, one_line, out_of_memory

DEBUG_FLAG = "--debug"


class ConvtrainGroup(TyperGroup):
    """Runs the app in non-standalone mode so every failure can be shown as one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        # `convtrain fit --debug` means `convtrain --debug fit`: the option is the app's, given anywhere
        end = argv.index("--") if "--" in argv else len(argv)
        debug = DEBUG_FLAG in argv[:end] or os.environ.get("CONVTRAIN_DEBUG", "") not in ("", "0")
        if DEBUG_FLAG in argv[:end]:
            argv = [DEBUG_FLAG] + [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:]
        try:
            result = super().main(args=argv, prog_name=prog_name or "convtrain", complete_var=complete_var,
                                  standalone_mode=False, obj={"debug": debug}, **extra)
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
        except (ConvtrainError, OSError) as exc:  # OSError: unwritable folder, full disk: the environment
            if debug:
                traceback.print_exc()
            _error_line(one_line(exc))
            code = exc.exit_code if isinstance(exc, ConvtrainError) else 1
        except MemoryError as exc:  # whatever escaped the size checks: one line, not a traceback
            if debug:
                traceback.print_exc()
            _error_line(out_of_memory(exc))
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


def _print_version(value: bool) -> None:
    if value:
        from convtrain import __version__

        typer.echo(f"convtrain {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    debug: bool = typer.Option(False, DEBUG_FLAG, help="Show tracebacks as well as the one-line errors "
                                                        "(also: CONVTRAIN_DEBUG=1).", show_default="off"),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print convtrain's version and exit."),
):
    """Train ConvNets from scratch (Cython kernels, NumPy engine); every fit is tracked in MLflow."""
    # --debug is acted on in ConvtrainGroup.main, before any parsing can fail


def _console(**kwargs):
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, **kwargs)


# ---- fit ----------------------------------------------------------------------------------
# The flags of the config settings are generated from FitConfig's fields (help, section, default):
# adding a field to convtrain/config.py adds its flag.

CONFIG = "Config"
RUN = "Run and tracking"
PANELS = {"data": "Data", "augment": "Augmentation", "model": "Model", "optim": "Optimizer", "run": RUN}
_FLAG_ALIASES = {"log_onnx": ["--onnx/--no-onnx"]}  # a shorter spelling beside the generated flag
_FLAG_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": str}  # a list flag takes 16,32


def _shown_default(f: dataclasses.Field) -> str:
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    value = DEFAULTS[f.name]
    if isinstance(value, bool):
        return flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:]
    return show_value(value)


def _config_option(f: dataclasses.Field) -> inspect.Parameter:
    """The `fit` flag of one FitConfig field; its default is None, so a flag the user did not
    type is told apart from one set to the default value."""
    kind = _FLAG_TYPES[FIELD_TYPES[f.name].split("[")[0].split(" ")[0]]
    decls = [f"{flag_name(f.name)}/--no-{flag_name(f.name)[2:]}" if kind is bool else flag_name(f.name)]
    decls += _FLAG_ALIASES.get(f.name, [])
    option = typer.Option(None, *decls, help=f"{f.metadata['help']} (default: {_shown_default(f)})",
                          rich_help_panel=PANELS[f.metadata["section"]], show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])


def _fit_command_options() -> list[inspect.Parameter]:
    def keyword(name, annotation, option):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)

    return [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        keyword("config", Optional[Path], typer.Option(
            None, "--config", "-c", help="A fit config TOML; flags override it.", rich_help_panel=CONFIG,
            show_default="none: the settings' defaults")),
        keyword("print_config", bool, typer.Option(
            False, "--print-config", help="Print the resolved config as TOML (and the length it trains) and exit.",
            rich_help_panel=CONFIG, show_default="off")),
        keyword("resume", Optional[str], typer.Option(
            None, help="Continue a stopped fit: its checkpoint, its --out folder, or its MLflow run id.",
            rich_help_panel=CONFIG, show_default="none: a new fit")),
        *(_config_option(f) for f in dataclasses.fields(FitConfig)),
        keyword("quiet", bool, typer.Option(
            False, "--quiet", "-q", help="Print only the final summary.", rich_help_panel=RUN, show_default="off")),
    ]


def fit(ctx, *, config, print_config, resume, quiet, **settings):
    """Train a ConvNet; with no options: the default small net on the built-in digits."""
    # parameters, types and flags: fit.__signature__ below (settings: one per FitConfig field)
    from convtrain.pipeline.fit import fit as run_fit
    from convtrain.pipeline.resume import resolve_fit_config
    from convtrain.tracking.quiet import quiet_by_default

    # before --resume <run id> asks MLflow for the run: MLflow sets its loggers up on import
    quiet_by_default((ctx.obj or {}).get("debug", False))
    resolved, checkpoint = resolve_fit_config(config_path=config, overrides=settings, resume=resume)
    if print_config:
        typer.echo(f"# length: {_planned_length(resolved)}\n" + resolved.expanded().to_toml(), nl=False)
        return
    console = _console()
    notices = [] if quiet else [_length_notice(resolved, console)]
    try:
        result = run_fit(resolved, resume=checkpoint, progress="quiet" if quiet else "auto", callbacks=notices)
    except TrainingInterrupted as exc:
        folder = Path(exc.checkpoint).parent if exc.checkpoint else None
        hint = f"; continue with: {_resume_command(folder, resolved)}" if folder else "; nothing to resume"
        _error_line(f"interrupted: {one_line(exc)}{hint}")
        raise typer.Exit(exc.exit_code)
    _print_fit_result(console, result)
    if resolved.timings:
        from convtrain.pipeline.timings import timings_lines

        console.print("\n".join(["where the time went (wall clock)", *timings_lines(result.timings)]),
                      markup=False, highlight=False)


fit.__signature__ = inspect.Signature(_fit_command_options())
app.command(no_args_is_help=False)(fit)


def _resume_command(folder: Path, config: FitConfig) -> str:
    """`convtrain fit --resume FOLDER`, with the --tracking-uri a resume must be given again."""
    if not config.track or config.tracking_uri is None:
        return f"convtrain fit --resume {folder}"
    from convtrain.tracking.store import resume_command

    return resume_command(folder, config.tracking_uri)


def _planned_length(config: FitConfig) -> str:
    """What --print-config says the fit will train, counted on the data as configured."""
    from convtrain.data.registry import load_dataset
    from convtrain.pipeline.image_folder import options_from_config

    try:
        splits = load_dataset(config.data, config.data_path, val_fraction=config.val_fraction, seed=config.seed,
                              limit=config.limit, folder=options_from_config(config))
    except (ConvtrainError, OSError) as exc:
        return config.describe_length(None) + f" (the data could not be read: {one_line(exc)})"
    return config.describe_length(_steps_per_epoch(config, splits.y_train))


def _steps_per_epoch(config: FitConfig, y_train) -> int:
    import math

    from convtrain.training.sampling import epoch_size

    return math.ceil(epoch_size(y_train, config.balanced) / config.batch_size)


def _length_notice(config: FitConfig, console):
    """Before the first epoch, when the schedule (not --epochs) sets the length, one line saying
    how many epochs and updates that makes on this data (e.g. a cyclic n_s chosen for the full
    data set, used with --limit). A callback, so the numbers are the Trainer's own."""
    from convtrain.training.callbacks import Callback

    class LengthNotice(Callback):
        key = "length_notice"

        def on_fit_start(self, trainer):
            if config.schedule_sets_length:
                console.print(config.describe_length(trainer.steps_per_epoch), markup=False)

    return LengthNotice()


def _default_store() -> str:
    from convtrain.tracking.store import resolve_tracking_uri

    return resolve_tracking_uri()


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
        epochs = getattr(result.history, "epochs", None) or []
        last = epochs[-1].get("epoch", len(epochs)) if epochs else None
        if result.config.patience or last in (None, best):
            table.add_row("best epoch", f"{best} (the saved model)")
        else:  # without early stopping the saved model is the last epoch's, not the best one
            table.add_row("saved model",
                          f"epoch {last}, the last (the best {result.config.monitor} was epoch {best}'s)")
    table.add_row("model", str(result.model_path))
    if getattr(result, "registered_model", None):
        table.add_row("registered", result.registered_model)
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
    model: Path = typer.Argument(..., help="A model.npz or checkpoint.npz written by convtrain fit, or the "
                                           "fit's --out folder (runs/<name>)."),
    data: Optional[str] = typer.Option(None, help="Data set to evaluate on. (default: the one the model was trained on)"),
    data_path: Optional[str] = typer.Option(None, help="Where the data set is (a directory, or the .npz file).",
                                            show_default="where the model's data set was read from"),
    split: str = typer.Option("auto", help="test, val, train, or auto (test if the data set has one, else val)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate at most this many examples.", show_default="all"),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON.", show_default="off: tables"),
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
    model: Path = typer.Argument(..., help="A model.npz or checkpoint.npz written by convtrain fit, or the "
                                           "fit's --out folder (runs/<name>)."),
    inputs: List[str] = typer.Argument(..., help="An .npz of images (array x), image files, folders of images, or for a names "
                                                  "model a text file of names or the names themselves."),
    top: int = typer.Option(3, min=1, help="Show the most probable classes, this many."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per input with all probabilities.",
                                  show_default="off: one line per input"),
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


@app.command()
def export(
    model: str = typer.Argument(..., help="A model.npz or checkpoint.npz, a fit's --out folder, or an MLflow run id."),
    format: str = typer.Option("onnx", "--format", "-f", help="Export format: onnx."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The file to write.",
                                          show_default="the model's file name with .onnx, beside it"),
    input_type: str = typer.Option("float32", help="The model input's type: float32 or uint8 (raw pixels "
                                                    "either way; the normalization is inside the graph)."),
    fold_batch_norm: bool = typer.Option(True, "--fold-batch-norm/--no-fold-batch-norm",
                                         help="Fold batch norm into the conv or dense layer before it.",
                                         show_default="--fold-batch-norm"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store of a run id. (default: "
                                                          "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"),
):
    """A saved model as ONNX: raw images in, class probabilities out (runs in onnxruntime)."""
    from convtrain.pipeline.export import export_model

    written = export_model(model, format=format, output=output, input_type=input_type,
                           fold_batch_norm=fold_batch_norm, tracking_uri=tracking_uri)
    typer.echo(str(written))


# ---- info / ui ------------------------------------------------------------------------------------

@app.command()
def info():
    """Version and build: OpenMP, kernel threads, BLAS, and the default tracking store."""
    from convtrain.pipeline.info import describe_installation

    console = _console()
    for key, value in describe_installation().items():
        console.print(f"{key:<16} {value}", markup=False)


@app.command()
def ui(
    port: int = typer.Option(5000, help="Port of the MLflow UI.", show_default=True),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default).", show_default=True),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store. (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"),
    experiment: Optional[str] = typer.Option(
        None, help="Experiment whose runs table the printed URL opens. (default: convtrain if the store has it, "
                   "else the list of experiments)"),
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
    try:
        app()
    finally:
        # Python's own teardown runs garbage collections over every object the command left
        # behind (some 300,000 after a tracked fit: MLflow, SQLAlchemy, matplotlib), 0.6 s after
        # the last line was printed. Frozen objects are left out of those collections; files,
        # connections and atexit handlers are closed and run as before.
        gc.freeze()


if __name__ == "__main__":
    main()
