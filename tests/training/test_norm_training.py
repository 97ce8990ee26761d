"""Training with batch norm, dropout, global average pooling, AdamW, clipping and label
smoothing: eval mode, exact resume, threads, saved models and the PyTorch export."""

import numpy as np
import pytest

import convtrain
from convtrain.data import Standardizer, load_dataset
from convtrain.errors import CheckpointError, TrainingInterrupted
from convtrain.nn.network import Network
from convtrain.nn.optim import SGD, AdamW, make_schedule
from convtrain.training.run_folder import CHECKPOINT_FILE
from convtrain.training.trainer import Trainer
from tests.support.data import standardized
from tests.support.stops import StopAt


@pytest.fixture(scope="module")
def small():
    splits = load_dataset("digits", val_fraction=0.1, seed=0)
    standardizer = Standardizer.fit(splits.x_train)
    x_train, x_val = standardized(standardizer, splits.x_train), standardized(standardizer, splits.x_val)
    return x_train[:300], splits.y_train[:300], x_val[:100], splits.y_val[:100]


def build(dtype="float32", **options):
    options = {"batch_norm": True, "dropout": 0.3, "global_pool": "none", "pool_type": "avg", **options}
    return Network.build(input_shape=(1, 8, 8), num_classes=10, filters=[8, 16], padding=1, pool=[2, 0],
                         hidden=[32], dtype=dtype, seed=0, **options)


def make_trainer(network, checkpoint_dir=None, callbacks=(), optimizer="adamw", epochs=3, lr=0.003,
                 augment=True):
    params = network.parameters()
    if optimizer == "adamw":
        opt = AdamW(params, lr=lr, weight_decay=0.05, decay=network.weight_names())
    else:
        opt = SGD(params, lr=0.05, momentum=0.9)
    return Trainer(network, opt, make_schedule(kind="cosine", lr=lr), epochs=epochs, batch_size=64, l2=1e-4,
                   augment=augment, label_smoothing=0.1, clip_norm=1.0, checkpoint_dir=checkpoint_dir,
                   callbacks=callbacks)



def state(network):
    return {**{k: v.copy() for k, v in network.parameters().items()},
            **{k: v.copy() for k, v in network.buffers().items()}}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def test_layers_are_where_the_options_put_them_and_only_weights_are_regularized():
    network = build(global_pool="avg")
    names = [layer.name for layer in network.layers]
    assert names == ["conv1", "bn1", "conv1_relu", "pool1", "conv2", "bn2", "conv2_relu", "gap",
                     "fc1", "fc1_bn", "fc1_relu", "fc1_dropout", "fc"]
    assert network.weight_names() == ["conv1.weight", "conv2.weight", "fc1.weight", "fc.weight"]
    assert network.layers[4].in_channels == 8 and network.layers[8].in_features == 16
    plain = Network.build(input_shape=(1, 8, 8), num_classes=10, filters=[8, 16], padding=1, pool=[2, 0],
                          hidden=[32], seed=0)
    # the optional layers leave an architecture without them as it was, and draw no weights
    assert [layer["type"] for layer in plain.architecture["layers"]] == \
        ["conv", "relu", "max_pool", "conv", "relu", "flatten", "dense", "relu"]
    assert np.array_equal(plain.parameters()["conv1.weight"], network.parameters()["conv1.weight"])
    l2_before = network.l2_penalty()
    network.layers[1].params["weight"][...] = 5
    assert network.l2_penalty() == l2_before


def test_a_fit_learns_and_evaluate_and_predict_use_running_statistics_without_dropout(small):
    network = build()
    trainer = make_trainer(network, epochs=12, lr=0.01, augment=False)  # flipped digits are other digits
    history = trainer.fit(*small)
    assert history.last["val_accuracy"] > 0.75
    x_val = small[2]
    # eval mode is deterministic and per sample: a batch and its parts give the same scores
    whole = network.forward(x_val[:20], train=False)
    np.testing.assert_allclose(np.concatenate([network.forward(x_val[i:i + 1], train=False) for i in range(20)]),
                               whole, rtol=1e-5, atol=1e-6)
    assert np.array_equal(network.forward(x_val[:20], train=False), whole)
    running = {k: v.copy() for k, v in network.buffers().items()}
    trainer.evaluate(*small[2:])
    network.predict(x_val)
    assert_same(running, network.buffers())  # evaluating does not touch the statistics
    assert not np.allclose(network.forward(x_val[:20], train=True), whole)


@pytest.mark.parametrize("stop_step", [7, 10])  # mid-epoch 2, end of epoch 2
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_with_batch_norm_dropout_and_adamw_is_bit_exact(small, tmp_path, stop_step, optimizer):
    reference = make_trainer(build(), tmp_path / "reference", optimizer=optimizer)
    reference.fit(*small)
    interrupted = make_trainer(build(), tmp_path / "run", callbacks=[StopAt(stop_step)], optimizer=optimizer)
    with pytest.raises(TrainingInterrupted):
        interrupted.fit(*small)
    resumed = make_trainer(build(), tmp_path / "run", optimizer=optimizer)  # as a new process would
    resumed.resume(tmp_path / "run" / CHECKPOINT_FILE)
    resumed.fit(*small)
    assert resumed.step == reference.step == 15
    assert_same(state(resumed.network), state(reference.network))
    assert_same(resumed.optimizer.state_dict(), reference.optimizer.state_dict())
    other = make_trainer(build(), tmp_path / "other", optimizer="sgd" if optimizer == "adamw" else "adamw")
    with pytest.raises(CheckpointError, match="same optimizer"):
        other.resume(tmp_path / "run" / CHECKPOINT_FILE)


def test_training_gives_the_same_bits_for_1_and_2_threads(small):
    before = convtrain.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            convtrain.set_num_threads(n)
            trainer = make_trainer(build())
            trainer.epochs = 1
            trainer.fit(*small)
            results.append(state(trainer.network))
    finally:
        convtrain.set_num_threads(before)
    assert_same(*results)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_saved_model_loads_with_its_statistics_and_exports_to_torch(small, tmp_path, dtype):
    network = build(dtype, global_pool="avg")
    trainer = make_trainer(network)
    trainer.epochs = 1
    trainer.fit(*small)
    path = network.save(tmp_path / "model.npz")
    loaded = Network.load(path)
    assert_same(state(loaded), state(network))
    x = small[2][:30].astype(dtype)
    assert np.array_equal(loaded.forward(x), network.forward(x))
    torch = pytest.importorskip("torch")
    from convtrain.nn.torch_compat import to_torch_module

    module = to_torch_module(loaded).eval()
    with torch.no_grad():
        torch_scores = module(torch.from_numpy(x)).numpy()
    tol = 1e-10 if dtype == "float64" else 1e-5
    assert np.linalg.norm(torch_scores - loaded.forward(x)) / np.linalg.norm(torch_scores) < tol
    assert set(module.state_dict()) == set(loaded.state_dict_torch())
    # and back: torch's state dict (buffers included) loads into a fresh network
    fresh = build(dtype, global_pool="avg")
    fresh.load_state_dict_torch(module.state_dict())
    assert_same(state(fresh), state(loaded))


def test_a_model_file_missing_its_statistics_is_refused(small, tmp_path):
    network = build()
    arrays = {k: v for k, v in network.to_arrays().items() if not k.startswith("buffer/bn1.")}
    np.savez(tmp_path / "model.npz", **arrays)
    with pytest.raises(CheckpointError, match="buffer names do not match"):
        Network.load(tmp_path / "model.npz")


def test_the_pyfunc_model_predicts_in_eval_mode(small, tmp_path):
    from convtrain.tracking.model import NETWORK_ARTIFACT, ConvtrainModel

    network = build()
    trainer = make_trainer(network)
    trainer.epochs = 1
    trainer.fit(*small)
    path = network.save(tmp_path / "model.npz")

    class Context:
        artifacts = {NETWORK_ARTIFACT: str(path)}

    model = ConvtrainModel()
    model.load_context(Context())
    x = small[2][:10]
    np.testing.assert_array_equal(model.predict(Context(), x), network.predict_proba(x))
    np.testing.assert_array_equal(model.predict(Context(), x), model.predict(Context(), x))
