"""The MLflow side of a sweep: one parent run per study, its summary, the children's tags.

The parent run's id is stored in the Optuna study, so a re-run of the sweep, another
`--workers` process or another machine (sharing the tracking server) adds its trials under
the same parent instead of starting a second one. Params are write-once in MLflow, so what
changes as trials finish (best params, counts) goes into tags and metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

from convtrain.sweep.spec import SweepSpec
from convtrain.tracking.runs import context_tags
from convtrain.tracking.store import client_for, ensure_described_experiment, resolve_tracking_uri

ROLE_TAG = "convtrain.sweep.role"
SWEEP_TAG = "convtrain.sweep"
TRIAL_TAG = "convtrain.sweep.trial"
STATE_TAG = "convtrain.sweep.state"
OBJECTIVE_TAG = "convtrain.sweep.objective"


def create_parent(spec: SweepSpec, *, tracking_uri: str, storage_url: str) -> str:
    """Open the sweep's parent run with what defines the sweep; returns its run id."""
    from mlflow.entities import Param

    from convtrain.sweep.study import redact

    client = client_for(tracking_uri)
    experiment_id = ensure_described_experiment(client, spec.base.experiment)
    tags = context_tags({SWEEP_TAG: spec.name, ROLE_TAG: "parent"})
    run = client.create_run(experiment_id, tags=tags, run_name=spec.name)
    params = {
        "sweep.method": spec.method, "sweep.objective": spec.objective, "sweep.direction": spec.direction,
        "sweep.n_trials": spec.n_trials, "sweep.seed": spec.seed, "sweep.pruner": spec.pruner,
        "sweep.study": spec.name, "sweep.storage": redact(storage_url), "sweep.file": str(spec.path),
        **{f"space.{name}": p.describe() for name, p in spec.space.items()},
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, spec.path.read_text(encoding="utf-8"), "sweep/" + spec.path.name)
    client.log_text(run.info.run_id, spec.base.to_toml(), "sweep/base-config.toml")
    return run.info.run_id


def reopen_parent(run_id: str, *, tracking_uri: str) -> bool:
    """Mark an existing parent RUNNING again; False if this tracking store does not have it."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    client.update_run(run_id, status="RUNNING")
    return True


def finish_parent(run_id: str, *, tracking_uri: str, status: str) -> None:
    client_for(tracking_uri).set_terminated(run_id, status)


def find_child(tracking_uri: str | None, parent_run_id: str, spec: SweepSpec, number: int) -> str | None:
    """The child run of trial `number` (for trials whose fit raised instead of returning)."""
    runs = _children(tracking_uri, parent_run_id, spec, f" AND tags.`{TRIAL_TAG}` = '{number}'")
    return runs[0].info.run_id if runs else None


def tag_child(tracking_uri: str | None, run_id: str, state: str, value: float | None) -> None:
    tags = {STATE_TAG: state}
    if value is not None:
        tags[OBJECTIVE_TAG] = repr(value)
    client = client_for(resolve_tracking_uri(tracking_uri))
    for key, text in tags.items():
        client.set_tag(run_id, key, text)
    if state == "PRUNED":  # the fit saw an exception and said FAILED; it was stopped on purpose
        client.set_terminated(run_id, "KILLED")


def close_killed_children(tracking_uri: str | None, parent_run_id: str, spec: SweepSpec,
                          numbers: list[int]) -> None:
    """Runs of trials whose worker died stay RUNNING in MLflow forever unless someone says so."""
    client = client_for(resolve_tracking_uri(tracking_uri))
    for number in numbers:
        for run in _children(tracking_uri, parent_run_id, spec, f" AND tags.`{TRIAL_TAG}` = '{number}'"):
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, STATE_TAG, "KILLED")
                client.set_terminated(run.info.run_id, "KILLED")


def _children(tracking_uri: str | None, parent_run_id: str, spec: SweepSpec, extra_filter: str) -> list:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = client_for(resolve_tracking_uri(tracking_uri))
    experiment = client.get_experiment_by_name(spec.base.experiment)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'{extra_filter}",
        order_by=["attributes.start_time DESC"], max_results=5000)


def log_summary(parent_run_id: str, *, tracking_uri: str, spec: SweepSpec, summary: dict,
                files: list[Path], rows: list | None = None, best=None, best_config: Path | None = None) -> str | None:
    """Best params (tags), best objective and trial counts (metrics), the description, the CSV,
    TOML and plots; registers the best trial's model if the sweep asks. Returns the registered
    version ("name version N") when this call registered one."""
    import time

    from mlflow.entities import Metric, RunTag

    from convtrain.tracking.description import NOTE_TAG, run_link, sweep_description

    client = client_for(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    now = int(time.time() * 1000)
    step = summary["finished"]
    metrics = [Metric(f"trials_{state.lower()}", count, now, step) for state, count in summary["counts"].items()]
    tags = [RunTag("sweep.counts", json.dumps(summary["counts"]))]
    best_summary = summary.get("best")
    if best_summary is not None:
        metrics.append(Metric(f"best_{spec.objective}", best_summary["value"], now, step))
        tags += [RunTag("best.trial", str(best_summary["number"])), RunTag("best.run_id", best_summary.get("run_id") or ""),
                 RunTag(f"best.{spec.objective}", repr(best_summary["value"]))]
        tags += [RunTag(f"best.{name}", str(value)) for name, value in best_summary["params"].items()]
    link = run_link(tracking_uri, experiment_id, best.run_id) if best is not None and best.run_id else None
    description = sweep_description(spec=spec, rows=rows or [], counts=summary["counts"], best=best, best_link=link,
                                    best_config=best_config, parent_run_id=parent_run_id)
    tags.append(RunTag(NOTE_TAG, description[:5000]))
    client.log_batch(parent_run_id, metrics=metrics, tags=tags)
    for path in files:
        if Path(path).exists():
            client.log_artifact(parent_run_id, str(path), "sweep")
    if spec.register_model and best is not None and best.run_id:
        try:
            return register_best(client, spec.register_model, best.run_id, experiment_id,
                                 description=f"sweep {spec.name}, best trial {best.number}: "
                                             f"{spec.objective} {best.value:.6g}")
        except Exception as exc:  # the sweep's results stand without the registry entry
            from convtrain.errors import one_line

            return f"not done: {one_line(exc)}"
    return None


def register_best(client, name: str, run_id: str, experiment_id: str, *, description: str) -> str | None:
    """Register run `run_id`'s logged model as a new version of `name`, unless a version from
    that run is there already (the summary is written again each time the sweep command runs)."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    from convtrain.tracking.model import register, run_models

    try:
        if client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return None
    except MlflowException:
        pass  # no such registered model yet
    model = next((m for m in run_models(client, experiment_id, run_id) if m.status == LoggedModelStatus.READY), None)
    if model is None:
        return None
    version = register(client, model.model_id, name, run_id=run_id, description=description)
    return f"{version.name} version {version.version}"
