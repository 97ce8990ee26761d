"""ONNX export: every layer kind, and every shipped experiment, run in onnxruntime on real images,
gives convtrain's predict_proba within 1e-5."""

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from convtrain.nn.network import Network
from convtrain.nn.onnx_export import INPUT_NAME, to_onnx
from tests.support.cli import invoke

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
TOLERANCE = 1e-5


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: x})[0]


@pytest.fixture(scope="module")
def cifar_images():
    value = os.environ.get("CONVTRAIN_TEST_DATA")
    if not value:
        pytest.skip("CONVTRAIN_TEST_DATA is not set")
    from convtrain.data.cifar import load_cifar10

    return load_cifar10(Path(value) / "cifar10").x[:40]  # uint8 (40, 3, 32, 32)


def trained_like(network: Network, seed: int = 0) -> Network:
    """Batch norm statistics and gammas away from their initial 1 and 0, as after training."""
    rng = np.random.default_rng(seed)
    for name, value in network.buffers().items():
        if name.endswith("running_mean"):
            value[...] = rng.normal(0, 0.5, value.shape)
        elif name.endswith("running_var"):
            value[...] = rng.uniform(0.5, 2.0, value.shape)
    for name, value in network.parameters().items():
        if "bn" in name:
            value[...] = rng.uniform(0.5, 1.5, value.shape) if name.endswith("weight") else rng.normal(0, 0.1, value.shape)
    network.normalization = {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}
    return network


LAYER_KINDS = {
    "conv stride 2, padding, non-square kernel": dict(filters=[6, 8], kernel_sizes=[[5, 3], 3], strides=[2, 1],
                                                      padding=[[2, 1], 0]),
    "conv 'same' with winograd": dict(filters=[8, 8], kernel_sizes=[3], padding=["same"], conv_algo="winograd"),
    "batch norm, max pool, dense hidden, dropout": dict(filters=[8, 12], padding=[1], pool=[2], hidden=[16],
                                                        batch_norm=True, dropout=0.5),
    "avg pool": dict(filters=[6, 6], pool=[2, 3], pool_type="avg"),
    "global avg pool": dict(filters=[8, 16], strides=[1, 2], global_pool="avg", hidden=[10], batch_norm=True),
    "float64 network": dict(filters=[4], pool=[2], dtype="float64"),
}


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_every_layer_kind_matches_predict_proba(kind, fold, cifar_images):
    options = dict(LAYER_KINDS[kind])
    algo = options.pop("conv_algo", None)
    network = trained_like(Network.build(input_shape=(3, 32, 32), num_classes=10, seed=3, **options))
    if algo:
        assert set(network.set_conv_algo(algo).values()) == {"winograd"}
    expected = network.predict_proba(cifar_images)
    float_model = to_onnx(network, fold_batch_norm=fold)
    np.testing.assert_allclose(run_onnx(float_model, cifar_images.astype(np.float32)), expected, rtol=0, atol=TOLERANCE)
    uint8_model = to_onnx(network, input_type="uint8", fold_batch_norm=fold)
    np.testing.assert_allclose(run_onnx(uint8_model, cifar_images), expected, rtol=0, atol=TOLERANCE)


RESIDUAL_NET = [
    {"type": "conv", "filters": 8, "padding": 1, "bias": False}, {"type": "batch_norm"}, {"type": "relu"},
    {"type": "residual", "layers": [  # identity shortcut, dropout inside
        {"type": "conv", "filters": 8, "padding": 1, "bias": False}, {"type": "batch_norm"}, {"type": "relu"},
        {"type": "dropout", "p": 0.2}, {"type": "conv", "filters": 8, "padding": 1, "bias": False},
        {"type": "batch_norm"}]},
    {"type": "residual", "layers": [  # 1x1 conv + batch norm shortcut
        {"type": "conv", "filters": 12, "stride": 2, "padding": 1, "bias": False}, {"type": "batch_norm"},
        {"type": "relu"}, {"type": "conv", "filters": 12, "padding": 1, "bias": False}, {"type": "batch_norm"}]},
    {"type": "residual", "shortcut": "conv", "layers": [  # 1x1 conv shortcut, no batch norm, a nested block
        {"type": "conv", "filters": 10, "padding": 1}, {"type": "relu"},
        {"type": "residual", "layers": [{"type": "conv", "filters": 10, "kernel": [1, 3], "padding": [0, 1]}]}]},
    {"type": "max_pool", "size": 2}, {"type": "global_avg_pool"}, {"type": "dropout", "p": 0.3},
]


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_residual_blocks_match_predict_proba(fold, cifar_images):
    network = trained_like(Network.build(input_shape=(3, 32, 32), num_classes=10, seed=4, layers=RESIDUAL_NET))
    expected = network.predict_proba(cifar_images)
    for input_type, x in (("float32", cifar_images.astype(np.float32)), ("uint8", cifar_images)):
        model = to_onnx(network, input_type=input_type, fold_batch_norm=fold)
        np.testing.assert_allclose(run_onnx(model, x), expected, rtol=0, atol=TOLERANCE)
    ops = [node.op_type for node in to_onnx(network, fold_batch_norm=fold).graph.node]
    assert ops.count("Add") == 4 and ops.count("Conv") == 9  # the stem, 6 in the blocks, 2 shortcuts
    assert ops.count("BatchNormalization") == (0 if fold else 6)


def test_the_graph_says_what_it_is(cifar_images):
    network = trained_like(Network.build(input_shape=(3, 32, 32), num_classes=10, filters=[4], batch_norm=True,
                                         hidden=[8], dropout=0.2))
    network.class_names = [f"c{i}" for i in range(10)]
    folded = to_onnx(network)
    unfolded = to_onnx(network, fold_batch_norm=False)
    ops = [node.op_type for node in folded.graph.node]
    assert ops[:2] == ["Sub", "Div"] and ops[-1] == "Softmax" and "Dropout" not in ops
    assert "BatchNormalization" not in ops
    assert [n.op_type for n in unfolded.graph.node].count("BatchNormalization") == 2
    props = {p.key: p.value for p in folded.metadata_props}
    assert '"c3"' in props["convtrain.class_names"]
    assert folded.graph.output[0].name == "probabilities"
    onnx.checker.check_model(folded, full_check=True)


# ---- the shipped experiments, trained for one short epoch -------------------------------------

def experiment_data(name: str, data_dir: Path) -> tuple[list[str], str]:
    data = {"fit-cifar10.toml": "cifar10", "fit-cifar10-bn.toml": "cifar10", "fit-cifar10-resnet.toml": "cifar10",
            "fit-mnist.toml": "mnist",
            "fit-names.toml": "names/dd2424", "fit-digits.toml": None}[name]
    return (["--data-path", str(data_dir / data)] if data else []), data


@pytest.mark.parametrize("config", sorted(p.name for p in EXPERIMENTS.glob("fit-*.toml")))
def test_each_shipped_experiment_exports_and_matches(config, test_data_dir, in_tmp_cwd):
    flags, data = experiment_data(config, test_data_dir)
    out = in_tmp_cwd / "run"
    # the names net's first kernel spans the whole alphabet, learnt from the training names: all of them
    limit = [] if data == "names/dd2424" else ["--limit", "200"]
    result = invoke("fit", "--config", EXPERIMENTS / config, *flags, "--schedule", "constant", "--epochs", "1",
                    *limit, "--no-track", "--out", out, "-q", "--batch-size", "32")
    assert result.exit_code == 0, result.output
    exported = invoke("export", out, "--format", "onnx", "-o", in_tmp_cwd / "model.onnx")
    assert exported.exit_code == 0, exported.output
    network = Network.load(out / "model.npz")
    from convtrain.data import load_dataset

    meta = network.meta
    splits = load_dataset(meta["data"], meta["data_path"], val_fraction=meta["val_fraction"], seed=meta["seed"],
                          limit=meta["limit"])
    x = (splits.x_val if splits.x_val is not None else splits.x_train)[:50]
    model = onnx.load(in_tmp_cwd / "model.onnx")
    np.testing.assert_allclose(run_onnx(model, np.ascontiguousarray(x, dtype=np.float32)), network.predict_proba(x),
                               rtol=0, atol=TOLERANCE)
    if "alphabet" in meta:  # the names model: its encoding travels in the metadata
        props = {p.key: p.value for p in model.metadata_props}
        assert props["convtrain.alphabet"] == meta["alphabet"]


def test_the_readme_onnxruntime_example_runs(cifar_images, tmp_path):
    network = trained_like(Network.build(input_shape=(3, 32, 32), num_classes=10, filters=[4], pool=[2]))
    model_path = network.save(tmp_path / "model.npz")
    assert invoke("export", model_path, "-o", tmp_path / "model.onnx").exit_code == 0
    images = cifar_images[:5]
    # the README's example, as written there
    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    probabilities = session.run(None, {"images": images.astype("float32")})[0]
    np.testing.assert_allclose(probabilities, network.predict_proba(images), rtol=0, atol=TOLERANCE)


def test_export_names_what_it_cannot_read(tmp_path):
    from tests.support.cli import error_line

    line = error_line(invoke("export", tmp_path / "nothing.npz"))
    assert "nothing.npz" in line
    line = error_line(invoke("export", "0" * 32, "--tracking-uri", f"sqlite:///{tmp_path}/none.db"))
    assert "0" * 32 in line
