"""What a sweep leaves behind: the trials table, trials.csv and best.toml."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from convtrain.errors import printable
from convtrain.sweep.spec import SweepSpec
from convtrain.sweep.study import FIXED_PARAMS_ATTR, NOTE_ATTR, RETRY_OF_ATTR, RUN_ID_ATTR, SECONDS_ATTR

# The order states are listed in, after the completed trials (which are sorted by objective).
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}


@dataclass
class TrialRow:
    number: int
    state: str
    value: float | None
    seconds: float | None
    params: dict[str, Any]
    run_id: str = ""
    note: str = ""
    last_report: tuple[int, float] | None = None  # (epoch, value) a pruned trial stopped at


def _last_report(trial) -> tuple[int, float] | None:
    if not trial.intermediate_values:
        return None
    epoch = max(trial.intermediate_values)
    return epoch, trial.intermediate_values[epoch]


def trial_rows(study, spec: SweepSpec) -> list[TrialRow]:
    """Every trial of the study, best first: completed by objective, then the rest by state."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = t.user_attrs.get(SECONDS_ATTR)
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        params = {name: t.params.get(name, t.system_attrs.get(FIXED_PARAMS_ATTR, {}).get(name))
                  for name in spec.space}
        note = t.user_attrs.get(NOTE_ATTR, "")
        retry_of = t.system_attrs.get(RETRY_OF_ATTR)
        if retry_of is not None:
            note = f"retry of trial {retry_of}" + (f"; {note}" if note else "")
        rows.append(TrialRow(t.number, t.state.name, t.value if t.state.name == "COMPLETE" else None,
                             seconds, params, t.user_attrs.get(RUN_ID_ATTR, ""), note,
                             last_report=_last_report(t)))
    sign = -1.0 if spec.direction == "maximize" else 1.0
    return sorted(rows, key=lambda r: (_STATE_ORDER.get(r.state, 9),
                                       sign * r.value if r.value is not None else 0.0, r.number))


def counts(rows: list[TrialRow]) -> dict[str, int]:
    result = {state: 0 for state in _STATE_ORDER}
    for row in rows:
        result[row.state] = result.get(row.state, 0) + 1
    return result


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    return next((r for r in rows if r.state == "COMPLETE"), None)


def trials_table(rows: list[TrialRow], spec: SweepSpec, *, max_rows: int = 40) -> Table:
    table = Table(title=Text(f"sweep {printable(spec.name)}: {len(rows)} trials, best first"), title_justify="left",
                  show_edge=False, pad_edge=False)
    table.add_column("trial", justify="right")
    for name in spec.space:
        table.add_column(name, justify="right")
    table.add_column(spec.objective, justify="right")
    table.add_column("state")
    table.add_column("seconds", justify="right")
    shown = rows if len(rows) <= max_rows else rows[:max_rows]
    for row in shown:
        table.add_row(str(row.number), *(_cell(row.params.get(n)) for n in spec.space),
                      _objective_cell(row), row.state,
                      "" if row.seconds is None else f"{row.seconds:.1f}")
    if len(rows) > max_rows:
        table.caption = f"... and {len(rows) - max_rows} more in trials.csv"
        table.caption_justify = "left"
    return table


def _objective_cell(row: TrialRow) -> str:
    if row.value is not None:
        return f"{row.value:.4f}"
    if row.state == "PRUNED" and row.last_report:
        epoch, value = row.last_report
        return f"({value:.4f} @{epoch})"  # where the pruner stopped it
    return ""


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(rows: list[TrialRow], spec: SweepSpec, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", *spec.space, spec.objective, "state", "seconds", "mlflow_run_id", "note"])
        for row in rows:
            writer.writerow([row.number, *(_csv_value(row.params.get(n)) for n in spec.space),
                             "" if row.value is None else repr(row.value), row.state,
                             "" if row.seconds is None else f"{row.seconds:.3f}", row.run_id, row.note])
    tmp.replace(path)
    return path


def _csv_value(value) -> str:
    return "" if value is None else str(value)


def best_config_text(spec: SweepSpec, best: TrialRow, parent_run_id: str | None = None,
                     tracking_uri: str | None = None) -> str:
    """The base config with the best trial's parameters: a fit TOML for `convtrain fit --config`.

    The retrained run is named after the sweep and, with `parent_run_id`, becomes a child of the
    sweep's parent run (the `parent_run` key, in the store the sweep used), so it sits with the
    trials it came from."""
    overrides = {**spec.decode(best.params), "parent_run": parent_run_id,
                 "tracking_uri": tracking_uri if parent_run_id else None}
    if not spec.base.run_name:
        overrides["run_name"] = f"{spec.name}-best"
    config = spec.base.with_overrides(overrides)
    header = (f"# Best trial of sweep {spec.name!r}: trial {best.number}, {spec.objective} {best.value:.6g}"
              + (f"\n# MLflow run {best.run_id}" if best.run_id else "")
              + "\n# Run it again with: convtrain fit --config <this file>"
              + ("\n# (its MLflow run becomes a child of the sweep's parent run)" if parent_run_id else "") + "\n")
    return header + config.to_toml()


def write_best_config(spec: SweepSpec, best: TrialRow, path: Path, parent_run_id: str | None = None,
                      tracking_uri: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(best_config_text(spec, best, parent_run_id, tracking_uri), encoding="utf-8")
    tmp.replace(path)
    return path
