"""What convtrain records on an MLflow run besides metrics: its tags, its process, and the
closing of runs whose process died without closing them."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import socket
from pathlib import Path

from convtrain.errors import TrackingError, one_line
from convtrain.tracking.processes import alive, on_this_machine
from convtrain.tracking.store import check_reachable, client_for

CHECKPOINT_TAG = "convtrain.checkpoint"
OUT_DIR_TAG = "convtrain.out_dir"
ERROR_TAG = "convtrain.error"
# the process that has the run open (convtrain/tracking/processes.py): a fit started later on the same
# machine closes the runs whose process died without closing them (kill -9, the OOM killer)
PROCESS_TAG = "convtrain.process"
ORPHAN_NOTE_TAG = "convtrain.note"


def find_run_checkpoint(run_id: str, tracking_uri: str) -> str:
    """The checkpoint path recorded on run `run_id` (for `--resume RUN_ID`)."""
    check_reachable(tracking_uri)
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).expanduser().is_file():
        # opening it would create an empty store just to say the run is not there
        raise TrackingError(f"--resume {run_id}: no such run; the tracking store {tracking_uri} does not exist")
    from mlflow.exceptions import MlflowException

    try:
        run = client_for(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"--resume {run_id}: no such run in {tracking_uri} ({one_line(exc)})") from None
    path = run.data.tags.get(CHECKPOINT_TAG)
    if not path:
        raise TrackingError(f"--resume {run_id}: the run records no checkpoint (tag {CHECKPOINT_TAG})")
    return path

def close_orphaned_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose fit ran on this machine and has
    died without closing them; returns their ids. (A run whose process cannot be checked, on
    another machine or from before this tag existed, is left as it is.)"""
    from mlflow.exceptions import MlflowException

    closed = []
    try:
        runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000)
    except MlflowException:
        return closed
    for run in runs:
        try:
            owner = json.loads(run.data.tags.get(PROCESS_TAG, ""))
        except ValueError:
            continue
        if not isinstance(owner, dict) or not on_this_machine(owner) or alive(owner):
            continue
        try:
            client.set_tag(run.info.run_id, ORPHAN_NOTE_TAG,
                           "its process ended without closing the run (killed); continue it with "
                           f"convtrain fit --resume {run.info.run_id}")
            with contextlib.redirect_stdout(io.StringIO()):
                client.set_terminated(run.info.run_id, "KILLED")
        except MlflowException:
            continue
        closed.append(run.info.run_id)
    return closed

def context_tags(extra: dict | None = None) -> dict[str, str]:
    """Version, build, host and git tags for a new run."""
    import convtrain
    from convtrain.nn.backend import blas_summary

    tags = {"convtrain.version": convtrain.__version__, "convtrain.host": socket.gethostname()}
    try:
        for key, value in convtrain.build_info().items():
            if key == "blas":
                value = blas_summary(value)
            tags[f"convtrain.build.{key}"] = value if isinstance(value, str) else json.dumps(value)
    except Exception as exc:  # a missing or broken extension must not stop tracking
        tags["convtrain.build.error"] = one_line(exc)
    tags.update(source_tags())
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return {k: str(v)[:5000] for k, v in tags.items()}


def source_tags() -> dict[str, str]:
    """MLflow's tags for where a run's code is: convtrain, run locally, by this user, at the git
    commit of the working folder (if it is in a repository)."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    tags = {MLFLOW_SOURCE_NAME: "convtrain", MLFLOW_SOURCE_TYPE: "LOCAL"}
    commit = _git_commit(str(Path.cwd()))
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    user = os.environ.get("USER") or os.environ.get("USERNAME")
    if user:
        tags[MLFLOW_USER] = user
    return tags


@functools.lru_cache(maxsize=8)  # asked for each new run and each run's data sets; one process, one answer
def _git_commit(folder: str) -> str | None:
    import subprocess

    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=3)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None

def run_tags(tags: dict):
    from mlflow.entities import RunTag

    return [RunTag(str(k), str(v)[:5000]) for k, v in tags.items()]

def max_step(client, run_id: str, key: str, default: int) -> int:
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=default)
