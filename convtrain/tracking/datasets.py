"""A fit's train / validation / test arrays as MLflow dataset inputs of its run."""

from __future__ import annotations

import time
import warnings
from pathlib import Path


def log_datasets(client, run_id: str, splits, source_path: str | None = None) -> None:
    """Each non-empty split as a dataset input (name, digest, shape) with its context tag."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if source_path:
        source = str(Path(source_path).resolve())
    else:  # built-in data: the code is the source. MLflow would ask every context provider (a
        # git lookup among them) for the tags, 0.07 s a fit; the run's own source tags say it.
        from mlflow.data.code_dataset_source import CodeDatasetSource

        from convtrain.tracking.runs import source_tags

        source = CodeDatasetSource(tags=source_tags())
    inputs = []
    for context, x, y in (("training", splits.x_train, splits.y_train),
                          ("validation", splits.x_val, splits.y_val),
                          ("test", splits.x_test, splits.y_test)):
        if x is None or len(x) == 0:
            continue
        with warnings.catch_warnings():
            # a local path matches MLflow's file-source class twice; either reading is right
            warnings.filterwarnings("ignore", message=".*interpreted in multiple ways")
            dataset = mlflow.data.from_numpy(x, targets=y, source=source, name=f"{splits.name}-{context}")
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    if not inputs:
        return
    from mlflow.exceptions import MlflowException

    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException:
        # Parallel sweep workers logging the same data set race to insert its row
        # (UNIQUE constraint on SQLite); the second attempt finds the row and links it.
        time.sleep(0.2)
        client.log_inputs(run_id, datasets=inputs)


def has_datasets(client, run_id: str) -> bool:
    """Whether the run already links dataset inputs (a resumed run may not, if its fit was
    killed right after its epoch-0 checkpoint)."""
    inputs = client.get_run(run_id).inputs
    return bool(inputs and inputs.dataset_inputs)
