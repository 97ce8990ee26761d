"""The logged pyfunc model takes raw images of every integer and float type, as `convtrain predict`
does (loaded back through mlflow.pyfunc.load_model), and `fit --onnx` logs model.onnx beside it."""

import numpy as np
import pytest

from convtrain.nn.network import Network
from tests.support.cli import invoke

DTYPES = [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One digits fit with --onnx into its own SQLite store: (store uri, run id, run folder)."""
    import mlflow

    folder = tmp_path_factory.mktemp("fit")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = invoke("fit", "--epochs", "1", "--filters", "4", "--onnx", "--run-name", "ints", "--out", folder / "run",
                    "--tracking-uri", uri, "-q")
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("convtrain").experiment_id])
    return uri, run.info.run_id, folder / "run"


def test_the_pyfunc_takes_integer_and_float_images(fitted):
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri, run_id, folder = fitted
    with _use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/ints")
    network = Network.load(folder / "model.npz")
    pixels = np.random.default_rng(0).integers(0, 17, (4, *network.input_shape))  # digits are 0..16
    expected = network.predict_proba(pixels.astype(np.float32))
    for dtype in DTYPES:
        predicted = model.predict(pixels.astype(dtype)).to_numpy()
        np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-6, err_msg=str(dtype))
    # the signature names the outputs and leaves the input type open; the metadata says what it takes
    assert model.metadata.signature.inputs is None
    assert [c.name for c in model.metadata.signature.outputs.inputs] == [str(c) for c in network.class_names]
    accepted = model.metadata.metadata["convtrain_input"]
    assert "uint8" in accepted["dtypes"] and accepted["shape"] == [-1, *network.input_shape]


def test_fit_onnx_logs_the_onnx_model_beside_the_pyfunc(fitted):
    import mlflow
    import onnxruntime

    uri, run_id, folder = fitted
    client = mlflow.MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run_id, "onnx")] == ["onnx/model.onnx"]
    local = client.download_artifacts(run_id, "onnx/model.onnx", str(folder))
    network = Network.load(folder / "model.npz")
    x = np.random.default_rng(1).integers(0, 17, (5, *network.input_shape)).astype(np.float32)
    session = onnxruntime.InferenceSession(local)
    np.testing.assert_allclose(session.run(None, {"images": x})[0], network.predict_proba(x), rtol=0, atol=1e-5)
    from convtrain.config import FitConfig

    assert FitConfig.from_toml(folder / "config.toml").log_onnx is True


def test_export_takes_a_run_id(fitted, tmp_path):
    uri, run_id, _ = fitted
    result = invoke("export", run_id, "--tracking-uri", uri, "-o", tmp_path / "by-id.onnx", "--input-type", "uint8")
    assert result.exit_code == 0, result.output
    import onnx

    model = onnx.load(tmp_path / "by-id.onnx")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_logging_the_model_skips_the_requirement_check_and_puts_it_back(tmp_path, monkeypatch):
    """MLflow maps every installed package to its modules to check a model's requirements, when it
    saves the model and when it loads it back to try the input example: convtrain's requirements
    are the installed versions, so the fit skips both; a later load checks again."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.utils import requirements_utils

    checked = []
    check = requirements_utils._check_requirement_satisfied
    monkeypatch.setattr(requirements_utils, "_check_requirement_satisfied",
                        lambda requirement: checked.append(requirement) or check(requirement))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = invoke("fit", "--epochs", "1", "--filters", "4", "--limit", "200", "--run-name", "m",
                    "--out", tmp_path / "run", "--tracking-uri", uri, "-q")
    assert result.exit_code == 0, result.output
    assert checked == []
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("convtrain").experiment_id])
    with _use_tracking_uri(uri):
        mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/m")
    assert checked, "loading the model outside the fit checks its requirements again"
