"""The MLflow pyfunc model: a saved convtrain network (.npz) behind `model.predict(x)`.

The network file carries its input normalization, so the model takes RAW inputs, exactly
like `convtrain predict`, and returns the class probabilities as a pandas DataFrame with
one column per class, named by the class names (`.to_numpy()` gives the (N, num_classes) array):

    mlflow.pyfunc.load_model("runs:/<run id>/<run name>").predict(x)   # x: (N, C, H, W) uint8, int, float

Each logged model is named after its run (`model_name`), so the experiment's Models list says
which fit it came from; `register` files one as a new version of a registered model.

A names model also accepts the names themselves (a list / 1-D array of strings, or a
DataFrame with one text column); they are encoded the way the training data was.
mlflow is imported only by the functions that log a model; loading needs only this class.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from pathlib import Path

import numpy as np

from convtrain.tracking.safe_names import safe_name

try:  # the base class only matters to MLflow; without it the wrapper still works on its own
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object

NETWORK_ARTIFACT = "network"
WEIGHTS_TAG = "convtrain.weights_sha256"  # on each logged model: which weights it holds


class ConvtrainModel(PythonModel):
    """Wraps `convtrain.network.Network` for MLflow; the weights travel as the artifact `network`."""

    def __init__(self):
        self.network = None

    def load_context(self, context):
        from convtrain.nn.network import Network

        self.network = Network.load(context.artifacts[NETWORK_ARTIFACT])

    # The np.ndarray hint tells MLflow to take the signature logged with the model, not to
    # derive one from type hints (it also accepts DataFrames and lists; see to_network_input).
    def predict(self, context, model_input: np.ndarray, params=None):
        if self.network is None:
            self.load_context(context)
        return probabilities_frame(self.network, self.network.predict_proba(to_network_input(self.network, model_input)))


def class_columns(network) -> list[str]:
    """The output column names: the class names, made unique, or "0".."K-1" without names."""
    names = [str(c) for c in (network.class_names or range(network.num_classes))]
    if len(names) != network.num_classes or len(set(names)) != len(names):
        names = [str(i) for i in range(network.num_classes)]
    return names


def probabilities_frame(network, probabilities: np.ndarray):
    """(N, K) probabilities as a DataFrame whose columns are the class names."""
    import pandas as pd

    return pd.DataFrame(np.asarray(probabilities), columns=class_columns(network))


def to_network_input(network, model_input) -> np.ndarray:
    """Accept what a pyfunc caller or `mlflow models serve` hands over and give (N, C, H, W)."""
    if hasattr(model_input, "to_numpy"):  # pandas DataFrame / Series from a served request
        model_input = model_input.to_numpy()
    if isinstance(model_input, dict):  # {"inputs": ...} style tensor dict with one entry
        if len(model_input) != 1:
            raise ValueError(f"expected one input tensor, got {sorted(model_input)}")
        model_input = next(iter(model_input.values()))
    array = np.asarray(model_input)
    if array.dtype.kind in "UO" and array.size and isinstance(array.reshape(-1)[0], str):
        return encode_names_for(network, [str(v) for v in array.reshape(-1)])
    shape = tuple(getattr(network, "input_shape", ()) or ())
    if shape and array.ndim == 2 and array.shape[1] == int(np.prod(shape)):
        array = array.reshape((-1, *shape))  # a flat table row per image
    elif shape and array.ndim == len(shape):
        array = array[None]  # one image without its batch axis
    return np.ascontiguousarray(array, dtype=np.float32)


def encode_names_for(network, names: list[str]) -> np.ndarray:
    """One-hot encode surnames with the alphabet and length the network was trained on."""
    from convtrain.data.names import encode_names_as_trained

    return encode_names_as_trained(getattr(network, "meta", None), names)


def model_name(run_name: str | None) -> str:
    """The logged model's name: the run's, in the characters both a `runs:/<run id>/<name>` URI
    and MLflow's model names accept (MLflow refuses '/', ':', '.', '%' and quotes): a decimal
    point becomes '_' (`lr0.05` -> `lr0_05`), any other run of characters '-'."""
    return safe_name(str(run_name or "").replace(".", "_"), fallback="model")


def log_model(client, run_id: str, experiment_id: str, network_path: str | Path, input_example: np.ndarray, *,
              name: str = "model"):
    """Log the network at `network_path` as a pyfunc model of run `run_id`, with signature.

    The signature and example are computed from the network's own predictions on
    `input_example` (a few raw inputs), so they describe exactly what predict accepts.
    Uses the current global MLflow tracking URI (MLflow's Model.log reads it).

    A run keeps one model of each name: `runs:/<run id>/<name>` resolves to whichever model
    of that name and run the store lists first, so a resumed fit (killed while or after
    logging its model, or resumed to train longer) must not leave an earlier one behind. If
    a READY model with these very weights and name is there already, it is kept and nothing is
    logged again; every other model of this run (stale weights, a write cut short, or one an
    earlier version of convtrain named "model") is deleted, only after the new one is complete.
    Returns the id of the run's model.
    """
    from mlflow.entities import LoggedModelStatus

    from convtrain.nn.network import Network

    network = Network.load(network_path)
    digest = weights_digest(network)
    earlier = run_models(client, experiment_id, run_id)
    current = next((m for m in earlier if m.status == LoggedModelStatus.READY and m.name == name
                    and m.tags.get(WEIGHTS_TAG) == digest), None)
    if current is None:
        keep = _log_new_model(client, run_id, experiment_id, network, network_path, input_example, name,
                              digest).model_id
    else:
        keep = current.model_id
    for model in earlier:
        if model.model_id != keep:
            client.delete_logged_model(model.model_id)
    return keep


def link_metrics(client, run_id: str, model_id: str, rows) -> None:
    """Attach metric rows the run already holds (mlflow Metric entities) to logged model
    `model_id`, so MLflow 3 lists them with the model; see RunModel.link_metrics."""
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id)
                                      for m in rows])


def register(client, model_id: str, name: str, *, run_id: str, description: str | None = None):
    """Put logged model `model_id` in the model registry as a new version of `name` (created if
    new); returns the ModelVersion."""
    from convtrain.tracking.quiet import quiet_mlflow_info

    with quiet_mlflow_info():  # "Waiting up to 300 seconds for model version to finish creation"
        return _register(client, model_id, name, run_id=run_id, description=description)


def _register(client, model_id: str, name: str, *, run_id: str, description: str | None):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    registered = registered_version(client, model_id, name, run_id=run_id)
    if registered is not None:  # a resume of a finished run: its model is registered once
        return registered
    try:
        client.create_registered_model(name, description="convtrain ConvNet classifiers (pyfunc: raw "
                                       "images in, one probability column per class out)")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                          description=description)
    # The logged model lists its registered versions in this tag, which the experiment's
    # Models table shows. A tracking server writes it itself; a SQLite store does not.
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    entries = json.loads(listed) if listed else []
    if not any(e.get("name") == version.name and str(e.get("version")) == str(version.version) for e in entries):
        entries.append({"name": version.name, "version": str(version.version)})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(entries)})
    return version


def registered_version(client, model_id: str, name: str, *, run_id: str):
    """The version of `name` that holds logged model `model_id` already, or None.

    A run's model is registered once per logged model: resuming a finished run keeps its
    model (log_model finds the same weights), so it is not registered again; a resume that
    trains on logs new weights, a new model, which may become a new version."""
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if version.name == name and (getattr(version, "model_id", None) == model_id
                                     or version.source == f"models:/{model_id}"):
            return version
    return None


def weights_digest(network) -> str:
    """SHA-256 of the parameters (names, dtypes, shapes, bytes): equal for bit-identical weights,
    unlike the .npz file, whose zip entries carry the time they were written."""
    digest = hashlib.sha256()
    for key, value in sorted(network.parameters().items()):
        value = np.ascontiguousarray(value)
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def run_models(client, experiment_id: str, run_id: str) -> list:
    """The live logged models whose source is run `run_id` (deleted ones excluded)."""
    models, token = [], None
    while True:
        page = client.search_logged_models(experiment_ids=[experiment_id],
                                           filter_string=f"source_run_id = '{run_id}'", page_token=token)
        models += [m for m in page if m.source_run_id == run_id]
        token = page.token
        if not token:
            return models


def _log_new_model(client, run_id, experiment_id, network, network_path, input_example, name, digest):
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model

    example = np.ascontiguousarray(input_example)
    if example.dtype.kind not in "iuf":
        example = example.astype(np.float32)
    signature = model_signature(network, example)
    with tempfile.TemporaryDirectory() as folder:
        # "Models from code": the logged model is this short script plus the weights file, so
        # loading it unpickles nothing (MLflow would otherwise cloudpickle the wrapper).
        code = Path(folder) / "convtrain_model.py"
        code.write_text(MODEL_CODE, encoding="utf-8")
        # Created here because Model.log would file it under the *active* experiment (often
        # "Default"), where `runs:/<run id>/model` does not look for it.
        logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                            tags={WEIGHTS_TAG: digest}, model_type="convtrain")
        with _requirements_taken_as_installed():
            return Model.log(
                artifact_path=None,  # positional in Model.log's signature; `name` replaces it
                name=name,
                model_id=logged.model_id,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=str(code),
                artifacts={NETWORK_ARTIFACT: str(network_path)},
                signature=signature,
                input_example=example,
                metadata=input_metadata(network),
                pip_requirements=_requirements(),
            )


@contextlib.contextmanager
def _requirements_taken_as_installed():
    """MLflow checks a model's pip requirements against the installed packages
    (warn_dependency_requirement_mismatches), mapping every installed distribution to its
    modules first, a fifth of a second each time: when it saves the model, and again when it
    loads the saved model back to check that the input example serves (the check itself is
    kept). convtrain's requirements are read from the installed versions (_requirements), so
    the requirement check is skipped, in both modules that call it, while this model is logged."""
    import mlflow.pyfunc
    from mlflow.utils import environment

    callers = [module for module in (environment, mlflow.pyfunc)
               if hasattr(module, "warn_dependency_requirement_mismatches")]
    checks = [module.warn_dependency_requirement_mismatches for module in callers]
    for module in callers:
        module.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        for module, check in zip(callers, checks):
            module.warn_dependency_requirement_mismatches = check


def model_signature(network, example: np.ndarray):
    """The outputs (one probability column per class), and no input schema: an MLflow tensor spec
    holds one dtype and refuses every other, while the model takes raw images of any integer
    or float type, as `convtrain predict` does. What it takes is written in the model's metadata
    (INPUT_METADATA) and shown by its input example."""
    from mlflow.models import ModelSignature, infer_signature

    inferred = infer_signature(example, probabilities_frame(network, network.predict_proba(example)))
    return ModelSignature(inputs=None, outputs=inferred.outputs)


INPUT_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
                "float16", "float32", "float64")


def input_metadata(network) -> dict:
    """The input the pyfunc model accepts, for the logged model's metadata."""
    return {"convtrain_input": {"shape": [-1, *[int(v) for v in network.input_shape]], "dtypes": list(INPUT_DTYPES),
                                "values": "raw pixels as the training images were stored (e.g. 0..255)"}}


ONNX_FILE = "model.onnx"
ONNX_ARTIFACT_DIR = "onnx"


def log_onnx(tracker, network_path: str | Path, out_dir: str | Path) -> list[str]:
    """Export the network to out_dir/model.onnx and log it as the run's artifact onnx/model.onnx,
    beside the pyfunc model; returns one line per problem (nothing when it got through)."""
    from convtrain.errors import one_line
    from convtrain.nn.network import Network
    from convtrain.nn.onnx_export import export_onnx

    try:
        path = export_onnx(Network.load(network_path), Path(out_dir) / ONNX_FILE)
    except Exception as exc:  # an export problem must not cost the run its other results
        return [f"ONNX model not written ({one_line(exc)})"]
    return tracker.log_artifacts([(path, ONNX_ARTIFACT_DIR)])


MODEL_CODE = """\
# The MLflow model code of a convtrain network; the weights are the artifact "network".
from mlflow.models import set_model

from convtrain.tracking.model import ConvtrainModel

set_model(ConvtrainModel())
"""


def _requirements() -> list[str]:
    """Pinned to what trained the model; explicit, so MLflow does not have to infer them.

    convtrain itself is listed unpinned: it is not on a public index, so serve with
    `--env-manager local` from an environment where convtrain is installed.
    """
    from importlib.metadata import PackageNotFoundError, version

    requirements = ["convtrain"]
    for package in ("numpy", "scipy", "mlflow"):
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements
