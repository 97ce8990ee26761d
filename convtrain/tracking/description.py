"""The Markdown a reviewer reads on a run's Overview (the `mlflow.note.content` tag).

A fit's description says what was trained on what (data set and split sizes, one line per
layer with output shape and parameter count), how (optimizer, schedule, early stopping),
what came out (best epoch, val/test metrics, images/s, wall time) and the commands that
reproduce or continue it. A sweep's parent run gets the search space, the trials by state,
the best trial with a link to its run and the command that retrains it. Everything here
builds text only; the callers set the tags.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Iterable

from convtrain.errors import plural, printable
from convtrain.training.run_folder import RunFolder

NOTE_TAG = "mlflow.note.content"  # shown by the MLflow UI as the run's (or experiment's) description

# The metrics of the results table, in the order a reviewer looks for them.
RESULT_METRICS = ("loss", "accuracy", "balanced_accuracy", "cost")


def architecture_rows(network) -> list[tuple[str, str, str, int]]:
    """(layer name, kind, output shape 'CxHxW', parameter count) for each layer, input first; a
    residual block's layers and shortcut follow its own row (their names start with the block's)."""
    shape = tuple(network.input_shape)
    return [("input", "", _shape(shape), 0), *_layer_rows(network.layers, shape)]


def _layer_rows(layers, shape) -> list[tuple[str, str, str, int]]:
    rows = []
    for layer in layers:
        out = layer.output_shape(shape)
        kind = type(layer).__name__
        inner = getattr(layer, "inner", None)
        if inner is not None:  # a residual block: what it adds up, then its sum (its parameters are theirs)
            shortcut = {"identity": "identity", "conv": "1x1 conv", "conv_bn": "1x1 conv + BN"}.get(
                getattr(layer, "shortcut_kind", ""), "1x1 conv")
            rows += _layer_rows(inner, shape) + _layer_rows(layer.shortcut, shape)
            rows.append((layer.name, f"Residual: ReLU(layers + {shortcut} shortcut)", _shape(out), 0))
            shape = out
            continue
        if kind == "Conv2D":
            kind += f", {layer.filters} filters {_shape(layer.kernel_size)}"
            if tuple(layer.stride) != (1, 1):
                kind += f", stride {_pair(layer.stride)}"
            if any(layer.padding):
                kind += f", pad {_pair(layer.padding)}"
            if not getattr(layer, "has_bias", True):
                kind += ", no bias"
            if getattr(layer, "algo", "im2col") != "im2col":  # what conv_algo (auto) chose for it
                kind += f", {layer.algo}"
        elif kind == "MaxPool2D":
            kind += f" {_shape(layer.size)}"
            if tuple(layer.stride) != tuple(layer.size):
                kind += f", stride {_pair(layer.stride)}"
        elif kind == "Dropout":
            kind += f" {layer.p:g}"
        rows.append((layer.name, kind, _shape(out), sum(int(v.size) for v in layer.params.values())))
        shape = out
    return rows


def optimizer_text(config) -> str:
    # a cyclic schedule's rates are eta_min to eta_max: --lr is not used
    rates = f"lr {config.eta_min:g} to {config.eta_max:g} (cyclic)" if config.schedule == "cyclic" \
        else f"lr {config.lr:g}"
    if config.optimizer == "adamw":
        text = f"AdamW, {rates}, betas ({config.beta1:g}, {config.beta2:g}), weight decay {config.weight_decay:g}, " \
               f"L2 {config.l2:g}, batch {config.batch_size}"
    else:
        text = f"SGD{' (Nesterov)' if config.nesterov else ''}, {rates}, momentum {config.momentum:g}, " \
               f"L2 {config.l2:g}, batch {config.batch_size}"
    if config.label_smoothing:
        text += f", label smoothing {config.label_smoothing:g}"
    if config.balanced:
        text += ", class-balanced batches"
    from convtrain.data.augment import plan_for

    plan = plan_for(config)
    if plan.active:
        text += f", augmented ({plan.describe()})"
    return text


def schedule_text(config) -> str:
    if config.schedule == "step":
        return f"step: lr x{config.gamma:g} every {plural(config.step_epochs, 'epoch')}"
    if config.schedule == "cosine":
        return f"cosine: from lr {config.lr:g} down to {config.eta_min:g} over the fit"
    if config.schedule == "cyclic":
        cycles = f", {plural(config.cycles, 'cycle')}" if config.cycles else ""
        return f"cyclic: {config.eta_min:g} to {config.eta_max:g}, {config.n_s} updates per half cycle{cycles}"
    return f"constant lr {config.lr:g}"


def fit_description(*, config, network, splits, history, metrics: dict, run_id: str | None,
                    out_dir, stopped_epoch: int | None = None,
                    wall_seconds: float | None = None, model_name: str | None = None,
                    registered: str | None = None, model_refused: str | None = None) -> str:
    """The fit run's description; `metrics` are the final model's (FitResult.metrics)."""
    sizes = [("train", splits.x_train), ("validation", splits.x_val), ("test", splits.x_test)]
    split_text = ", ".join(f"{name} {len(x):,}" for name, x in sizes if x is not None and len(x))
    epochs = list(getattr(history, "epochs", []) or [])
    best_epoch = metrics.get("best_epoch", getattr(history, "best_epoch", None))
    # The Overview shows the first lines and folds the rest: the outcome comes first.
    lines = [_headline(config, metrics, best_epoch, stopped_epoch, len(epochs)), ""]
    lines.append(f"**Data**: `{config.data}`" + (f" ({_text(config.data_path)})" if config.data_path else "")
                 + f", {network.num_classes} classes, input {_shape(network.input_shape)}; "
                 f"split {split_text} examples" + (f" (limit {config.limit})" if config.limit else "") + ".")
    lines.append("")
    total = sum(int(v.size) for v in network.parameters().values())
    lines.append(f"**Network** ({total:,} parameters, {network.dtype.name}):")
    lines.append("")
    lines += ["| layer | kind | output | parameters |", "|---|---|---|---:|"]
    lines += [f"| {name} | {kind} | {shape} | {count:,} |" for name, kind, shape, count in architecture_rows(network)]
    lines.append("")
    lines.append(f"**Optimizer**: {optimizer_text(config)}.  ")
    lines.append(f"**Schedule**: {schedule_text(config)}; {_planned(config, splits)} planned, "
                 f"{len(epochs)} run, seed {config.seed}.  ")
    if config.patience:
        stopping = f"**Early stopping** on `{config.monitor}`, patience {config.patience}: "
        if stopped_epoch:
            stopping += f"stopped at epoch {stopped_epoch}; "
        else:
            stopping += "ran every epoch; "
        lines.append(stopping + f"the saved model is epoch {best_epoch}'s (best).  ")
    elif best_epoch is not None:
        lines.append(f"**Best epoch** by `{config.monitor}`: {best_epoch} (the saved model is the last epoch's).  ")
    lines.append("")
    lines += _results_table(metrics)
    lines.append("")
    lines += _speed_lines(epochs, wall_seconds)
    if model_name:
        load = f'mlflow.pyfunc.load_model("runs:/{run_id}/{model_name}")'
        lines.append(f"**Model**: logged as {_code(model_name)}"
                     + (f", registered as {_code(registered)}" if registered else "")
                     + (f"; load it with {_code(load)}" if run_id else "")
                     + ".  ")
    elif model_refused:
        lines.append(f"**Model**: not logged to MLflow (the store refused it: {_text(model_refused)}); "
                     f"the model file is {_code(RunFolder(out_dir).model)}.  ")
    lines += ["", "**Reproduce** (a new run with the same settings):", "",
              *_fenced(f"convtrain fit --config {shlex.quote(str(RunFolder(out_dir).config))} --out "
                       f"{shlex.quote(str(out_dir))}-again")]
    last_epoch = epochs[-1].get("epoch", len(epochs)) if epochs else None
    if run_id and _can_train_on(config, stopped_epoch, best_epoch, last_epoch):
        longer = "more cycles: add `--cycles N`" if config.schedule_sets_length else "more epochs: add `--epochs N`"
        lines += ["", f"**Continue** ({longer}):", "", *_fenced(f"convtrain fit --resume {run_id}")]
    elif run_id:  # `--resume --epochs N` is refused: it would train nothing, or log a step twice
        lines += ["", "**Train longer** (a new run from its config; resuming this one trains no further epoch):",
                  "", *_fenced(f"convtrain fit --config {shlex.quote(str(RunFolder(out_dir).config))} --epochs N "
                               f"--out {shlex.quote(str(out_dir))}-longer")]
    return "\n".join(lines) + "\n"


def _planned(config, splits) -> str:
    """The length the fit was set to train: --epochs, or the schedule's (cyclic with cycles)."""
    if not config.schedule_sets_length:
        return plural(config.epochs, "epoch")
    from convtrain.training.sampling import steps_per_epoch

    epochs, updates = config.trained_length(steps_per_epoch(splits.y_train, config.balanced, config.batch_size))
    return f"{plural(epochs, 'epoch')} ({plural(updates, 'update')})"


def _can_train_on(config, stopped_epoch, best_epoch, last_epoch) -> bool:
    """Whether `--resume --epochs N` trains this run on: not after early stopping ended it, nor
    after its end put an earlier epoch's weights back (run_opening._check_step_free)."""
    if stopped_epoch:
        return False
    return not (config.patience and best_epoch is not None and last_epoch is not None and best_epoch != last_epoch)


def _headline(config, metrics: dict, best_epoch, stopped_epoch, epochs_run: int) -> str:
    shown = [(f"{split}_{name}", f"{split} {name.replace('_', ' ')}") for split in ("test", "val")
             for name in ("accuracy", "balanced_accuracy", "loss")]
    values = ", ".join(f"{label} **{metrics[key]:.4f}**" for key, label in shown if metrics.get(key) is not None)
    if config.patience and best_epoch is not None:
        how = (f"early stopping on `{config.monitor}` stopped at epoch {stopped_epoch}" if stopped_epoch
               else f"best `{config.monitor}` of {plural(epochs_run, 'epoch')}")
        where = f"the saved model is epoch {best_epoch}'s ({how})"
    else:
        where = f"the saved model is the last epoch's ({epochs_run})"
    return f"**Result**: {values or 'no validation or test split'}; {where}."


def _results_table(metrics: dict) -> list[str]:
    splits = [s for s in ("train", "val", "test") if any(f"{s}_{m}" in metrics for m in RESULT_METRICS)]
    names = [m for m in RESULT_METRICS if any(f"{s}_{m}" in metrics for s in splits)]
    if not splits:
        return []
    lines = ["| metric | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for name in names:
        cells = [_number(metrics.get(f"{s}_{name}")) for s in splits]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


def _speed_lines(epochs: list[dict], wall_seconds: float | None) -> list[str]:
    seconds = [e.get("epoch_seconds") for e in epochs if e.get("epoch_seconds") is not None]
    images = [e["images_per_second"] * e["epoch_seconds"] for e in epochs
              if e.get("images_per_second") is not None and e.get("epoch_seconds") is not None]
    parts = []
    if seconds and sum(seconds) > 0:
        parts.append(f"**Training**: {_duration(sum(seconds))} over {plural(len(seconds), 'epoch')}"
                     + (f", {sum(images) / sum(seconds):,.0f} images/s" if images else ""))
    if wall_seconds is not None:
        parts.append(f"**wall time** of this invocation {_duration(wall_seconds)}")
    return ["; ".join(parts) + ".  "] if parts else []


def sweep_description(*, spec, rows: list, counts: dict, best, best_link: str | None,
                      best_config, parent_run_id: str | None = None) -> str:
    """The sweep parent run's description, from the trials as they are now."""
    lines = []
    if best is not None:
        trial = f"trial {best.number}"
        if best_link:
            trial = f"[{trial}]({best_link})"
        params = ", ".join(f"{name} = {_plain(value)}" for name, value in best.params.items())
        lines += [f"**Best**: {trial}, `{spec.objective}` **{best.value:.6g}** ({params}).", ""]
    lines += [f"**Search**: {spec.method}, {spec.direction} `{spec.objective}`, {spec.n_trials} trials, "
              f"pruner {spec.pruner}, seed {spec.seed}; base config `{spec.base.data}` data, "
              f"{plural(spec.base.epochs, 'epoch')}.", "",
              "| parameter | searched over |", "|---|---|"]
    lines += [f"| {name} | {_escape(p.describe())} |" for name, p in spec.space.items()]
    lines += ["", "**Trials**: " + ", ".join(f"{count} {state.lower()}" for state, count in counts.items() if count)
              + ".", ""]
    top = [r for r in rows if r.state == "COMPLETE"][:5]
    if len(top) > 1:
        lines += ["Best trials:", "", "| trial | " + " | ".join(spec.space) + f" | {spec.objective} |",
                  "|---:|" + "---:|" * (len(spec.space) + 1)]
        lines += [f"| {r.number} | " + " | ".join(_plain(r.params.get(n)) for n in spec.space)
                  + f" | {r.value:.6g} |" for r in top]
        lines.append("")
    if best_config is not None:
        lines += ["**Retrain the best** (the run becomes a child of this sweep):", "",
                  *_fenced(f"convtrain fit --config {shlex.quote(str(Path(best_config).resolve()))}"), ""]
    lines += ["**Continue or extend** the sweep (finished trials are kept):", "",
              *_fenced(f"convtrain sweep {shlex.quote(str(Path(spec.path).resolve()))}")]
    return "\n".join(lines) + "\n"


def experiment_description(name: str) -> str:
    return (f"convtrain experiment {_code(name)}: one run per `convtrain fit` (its description says what was trained "
            "and how to reproduce it), and one parent run per `convtrain sweep` with its trials as children. "
            "Sort the runs by a metric column to compare them; a run's Artifacts hold its learning curves, "
            "confusion matrix, config and checkpoint, and its Models tab the pyfunc model.\n")


def run_link(tracking_uri: str | None, experiment_id: str, run_id: str) -> str:
    """A link to a run's page: absolute for a tracking server, else relative to the UI's root."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{path}"
    return path


def _shape(shape: Iterable[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def _pair(values) -> str:
    values = list(values)
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else _escape(str(value))


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: Any) -> str:
    """`text` as one Markdown code span whatever it holds: delimited by one backtick more than
    its longest run of backticks (padded with a space where it starts or ends with one), control
    characters and line breaks shown as escapes. Not for table cells (a '|' would end the cell)."""
    text = printable(str(text))
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fenced(command: str) -> list[str]:
    """A one-line command as a fenced code block that nothing in it can close."""
    command = printable(command)
    fence = "`" * max(3, max((len(run) for run in re.findall("`+", command)), default=0) + 1)
    return [fence, command, fence]


def _text(text: Any) -> str:
    """Free text (a path, a name) with Markdown's punctuation backslash-escaped."""
    return re.sub(r"([\\`*_{}\[\]<>()#+\-.!|~])", r"\\\1", printable(str(text)))
