"""FitConfig: defaults, flag/TOML spellings, round trips, one-line validation errors, and the keys
of the optional layers and AdamW turned into what they name."""

import os

import numpy as np
import pytest

from convtrain.config import FitConfig, dump_toml, tomllib
from convtrain.errors import ConfigError
from convtrain.nn.dropout import Dropout
from convtrain.nn.network import Network
from convtrain.nn.norm import BatchNorm1D, BatchNorm2D
from convtrain.nn.npz_files import write_npz_atomic
from convtrain.nn.optim import SGD, AdamW
from convtrain.nn.pooling import AvgPool2D, GlobalAvgPool
from convtrain.training.trainer import Trainer


def test_defaults_are_valid_and_round_trip_through_toml():
    config = FitConfig()
    config.validate()
    assert FitConfig.from_dict(tomllib.loads(config.to_toml())) == config


def test_sections_and_flat_keys_load_the_same():
    sectioned = {"model": {"filters": [8, 16]}, "optim": {"lr": 0.1}}
    flat = {"filters": [8, 16], "lr": 0.1}
    assert FitConfig.from_dict(sectioned) == FitConfig.from_dict(flat)


def test_flag_spellings_are_coerced():
    config = FitConfig().with_overrides(
        {"filters": "8,16", "kernel_sizes": "5x3,3", "padding": "same,1", "epochs": "3", "nesterov": "yes"}
    )
    assert config.filters == [8, 16]
    assert config.kernel_sizes == [[5, 3], 3]
    assert config.padding == ["same", 1]
    assert config.epochs == 3 and config.nesterov is True


def test_none_overrides_leave_the_file_value():
    config = FitConfig(lr=0.2).with_overrides({"lr": None, "epochs": 4})
    assert config.lr == 0.2 and config.epochs == 4


def test_per_block_broadcasts_single_entries():
    config = FitConfig(filters=[4, 8, 16], kernel_sizes=[5], pool=[2, 0, 2])
    assert config.per_block("kernel_sizes") == [5, 5, 5]
    assert config.per_block("pool") == [2, 0, 2]


def test_flat_params_are_strings_for_mlflow():
    params = FitConfig(filters=[8, 16], run_name=None).flat_params()
    assert params["filters"] == "8,16"
    assert params["run_name"] == ""
    assert all(isinstance(v, str) for v in params.values())


def test_unknown_key_suggests_the_close_name():
    with pytest.raises(ConfigError, match=r"unknown key 'filtres' \(did you mean 'filters'\?\)"):
        FitConfig.from_dict({"filtres": [8]})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": 0}, r"^lr: got 0.0, expected a learning rate > 0$"),
        ({"l2": -1e-3}, r"^l2: got -0.001, expected lambda >= 0$"),
        ({"filters": [8, 0]}, r"^filters: .*positive"),
        ({"kernel_sizes": [3, 3, 3]}, r"^kernel_sizes: .*1 or 2 entries"),
        ({"padding": ["full"]}, r"^padding: .*'same' or 'valid'"),
        ({"batch_size": 0}, r"^batch_size: got 0"),
        ({"momentum": 1.0}, r"^momentum: got 1.0"),
        ({"schedule": "linear"}, r"^schedule: got 'linear'"),
        ({"eta_min": 0.1, "eta_max": 0.01}, r"^eta_max: got 0.01, expected a learning rate > eta_min"),
        ({"data": "imagenet"}, r"^data: got 'imagenet'"),
        ({"data": "mnist"}, r"^data_path: data set 'mnist' needs --data-path"),
        ({"val_fraction": 1.5}, r"^val_fraction: got 1.5"),
        ({"epochs": "many"}, r"^epochs: got 'many', expected a value of type int$"),
        ({"lr": float("nan")}, r"^lr: got nan"),
    ],
)
def test_bad_values_name_the_field_and_what_was_expected(values, message):
    with pytest.raises(ConfigError, match=message):
        FitConfig.from_dict(values)


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "fit.toml"
    path.write_text('[optim]\nepochs = "many"\n')
    with pytest.raises(ConfigError, match=r"fit.toml: epochs: got 'many'"):
        FitConfig.from_toml(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("filters = [8", "invalid TOML"),
        ("lr = 0.1\nlr = 0.2\n", "invalid TOML"),
        ('[model]\nfilters = [8]\n[optim]\nfilters = [4]\n', "given twice"),
    ],
)
def test_broken_toml_files_give_one_line(tmp_path, text, message):
    path = tmp_path / "fit.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        FitConfig.from_toml(path)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        FitConfig.from_toml(tmp_path / "nope.toml")


def test_dump_toml_leaves_out_none_and_quotes_strings():
    text = dump_toml({"run": {"run_name": None, "experiment": 'a "b"', "track": False}})
    assert tomllib.loads(text) == {"run": {"experiment": 'a "b"', "track": False}}


def test_control_characters_in_strings_round_trip():
    config = FitConfig(run_name='tab\there "quoted" \\ bell\x07 newline\n', experiment="\x1b[31mred")
    text = config.to_toml()
    assert FitConfig.from_dict(tomllib.loads(text)) == config
    assert "\x07" not in text and "\x1b" not in text


def test_lists_are_written_on_one_line():
    assert "filters = [8, 16]\n" in FitConfig(filters=[8, 16]).to_toml()


def test_atomic_npz_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_npz_atomic(tmp_path / "weights.npz", {"w": np.zeros(3)})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


# ---- the keys of batch norm, dropout, pooling, AdamW, label smoothing and clipping: parsed,
# validated, written back, and turned into the network and trainer they name

LAYER_KEYS = {"batch_norm": True, "dropout": [0.5, 0.25], "global_pool": "avg", "pool_type": "avg",
              "optimizer": "adamw", "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05,
              "label_smoothing": 0.1, "clip_norm": 2.0}


def test_the_keys_load_from_sections_and_round_trip_through_toml(tmp_path):
    config = FitConfig.from_dict({"model": {"hidden": [32, 16], "pool": [2], "batch_norm": True,
                                            "dropout": [0.5, 0.25], "global_pool": "avg", "pool_type": "avg"},
                                  "optim": {k: v for k, v in LAYER_KEYS.items()
                                            if k not in ("batch_norm", "dropout", "global_pool", "pool_type")}})
    for key, value in LAYER_KEYS.items():
        assert getattr(config, key) == value
    path = config.save_toml(tmp_path / "config.toml")
    assert FitConfig.from_toml(path) == config
    sections = config.to_sections()
    assert {"batch_norm", "dropout", "global_pool", "pool_type"} <= set(sections["model"])
    assert {"optimizer", "beta1", "beta2", "eps", "weight_decay", "label_smoothing", "clip_norm"} <= set(sections["optim"])


def test_layer_and_optimizer_flag_spellings_are_coerced():
    config = FitConfig(hidden=[8, 8]).with_overrides({"dropout": "0.5,0.3", "batch_norm": "true", "clip_norm": "1"})
    assert config.dropout == [0.5, 0.3] and config.batch_norm is True and config.clip_norm == 1.0
    assert FitConfig(hidden=[8]).with_overrides({"dropout": 0.2}).dropout == [0.2]


@pytest.mark.parametrize("overrides,field", [
    ({"dropout": [1.0]}, "dropout"), ({"dropout": [0.1, 0.2, 0.3]}, "dropout"),
    ({"dropout": [0.3], "hidden": []}, "dropout"), ({"global_pool": "max"}, "global_pool"),
    ({"pool_type": "min"}, "pool_type"), ({"optimizer": "adam"}, "optimizer"), ({"beta1": 1.0}, "beta1"),
    ({"beta2": -0.1}, "beta2"), ({"eps": 0.0}, "eps"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"label_smoothing": 1.0}, "label_smoothing"), ({"clip_norm": 0.0}, "clip_norm"),
])
def test_bad_layer_and_optimizer_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}: got"):
        FitConfig(hidden=[8, 8]).with_overrides(overrides)


def test_the_config_builds_the_layers_optimizer_and_loss_it_names():
    config = FitConfig(filters=[4, 6], padding=[1], pool=[2], hidden=[8, 8], **LAYER_KEYS)
    network = Network.from_config(config, (1, 8, 8), 10)
    kinds = [type(layer) for layer in network.layers]
    assert kinds.count(BatchNorm2D) == 2 and kinds.count(BatchNorm1D) == 2
    assert kinds.count(AvgPool2D) == 2 and GlobalAvgPool in kinds
    assert [layer.p for layer in network.layers if isinstance(layer, Dropout)] == [0.5, 0.25]
    trainer = Trainer.from_config(network, config)
    assert isinstance(trainer.optimizer, AdamW)
    assert (trainer.optimizer.beta1, trainer.optimizer.beta2, trainer.optimizer.eps,
            trainer.optimizer.weight_decay) == (0.8, 0.99, 1e-6, 0.05)
    assert trainer.optimizer.decay == set(network.weight_names())
    assert trainer.label_smoothing == 0.1 and trainer.clip_norm == 2.0
    default = FitConfig()
    plain = Network.from_config(default, (1, 8, 8), 10)
    assert isinstance(Trainer.from_config(plain, default).optimizer, SGD)
    assert "batch_norm" not in plain.architecture and "dropout" not in plain.architecture


def test_every_key_has_a_flag_in_fit_help():
    from typer.testing import CliRunner

    from convtrain.cli import app

    result = CliRunner().invoke(app, ["fit", "--help"], env={"COLUMNS": "200"})
    for flag in ("--batch-norm", "--dropout", "--global-pool", "--pool-type", "--optimizer", "--beta1",
                 "--beta2", "--eps", "--weight-decay", "--label-smoothing", "--clip-norm"):
        assert flag in result.output, flag


def test_a_sweep_can_search_every_key(tmp_path):
    from convtrain.sweep.spec import load_sweep

    (tmp_path / "sweep.toml").write_text('''
[fit]
hidden = [32]
[sweep]
name = "layers"
method = "tpe"
[space]
batch_norm = [true, false]
dropout = [0.0, 0.3]
global_pool = ["none", "avg"]
pool_type = ["max", "avg"]
optimizer = ["sgd", "adamw"]
beta1 = {low = 0.8, high = 0.95}
beta2 = {low = 0.99, high = 0.9999, log = true}
eps = {low = 1e-9, high = 1e-6, log = true}
weight_decay = {low = 1e-3, high = 0.1, log = true}
label_smoothing = {low = 0.0, high = 0.2}
clip_norm = {low = 0.5, high = 5.0}
''')
    spec = load_sweep(tmp_path / "sweep.toml", n_trials=2)
    assert set(LAYER_KEYS) <= set(spec.space)
    config = spec.trial_config({"batch_norm": True, "dropout": "0.3", "global_pool": "avg", "pool_type": "avg",
                                "optimizer": "adamw", "beta1": 0.85, "beta2": 0.995, "eps": 1e-8,
                                "weight_decay": 0.01, "label_smoothing": 0.1, "clip_norm": 1.0})
    assert (config.batch_norm, config.dropout, config.optimizer, config.clip_norm) == (True, [0.3], "adamw", 1.0)


def test_a_flag_the_chosen_optimizer_does_not_use_is_refused():
    from convtrain.config import FLAG

    with pytest.raises(ConfigError, match="--beta1 0.8 is not used by optimizer = sgd"):
        FitConfig(beta1=0.8).check_settings({"beta1": FLAG})
    with pytest.raises(ConfigError, match="--momentum 0.5 is not used by --optimizer adamw"):
        FitConfig(optimizer="adamw", momentum=0.5).check_settings({"momentum": FLAG, "optimizer": FLAG})
    FitConfig(optimizer="adamw", beta1=0.8).check_settings({"beta1": FLAG, "optimizer": FLAG})


# ---- the network as a layer list ------------------------------------------------------------------

def test_a_toml_layer_list_reads_as_the_python_one(tmp_path):
    from convtrain.nn.layer_specs import BatchNorm, Conv2D, GlobalAvgPool, ReLU, Residual

    (tmp_path / "net.toml").write_text(
        '[model]\n[[model.layers]]\ntype = "conv"\nfilters = 8\nkernel = [3, 3]\npadding = "same"\n'
        '[[model.layers]]\ntype = "relu"\n'
        '[[model.layers]]\ntype = "residual"\nlayers = [\n  {type = "conv", filters = 16, stride = 2, padding = 1},\n'
        '  {type = "batch_norm"},\n]\n[[model.layers]]\ntype = "global_avg_pool"\n')
    config = FitConfig.from_toml(tmp_path / "net.toml")
    python = [Conv2D(8, 3, padding="same"), ReLU(), Residual([Conv2D(16, 3, stride=2, padding=1), BatchNorm()]),
              GlobalAvgPool()]
    assert config.network_layers() == FitConfig(layers=python).network_layers()
    assert config.network_layers()[0] == {"type": "conv", "filters": 8, "padding": "same"}


def test_the_shorthand_and_its_expanded_list_are_the_same_network():
    shorthand = FitConfig(filters=[4, 8], kernel_sizes=[[3, 5], 3], padding=["same", 1], pool=[2, 0], hidden=[16],
                          batch_norm=True, dropout=[0.3], global_pool="none", seed=3)
    expanded = shorthand.expanded()
    assert expanded.layers and expanded.filters == FitConfig().filters
    assert FitConfig.from_dict(tomllib.loads(expanded.to_toml())) == expanded  # the printed config reads back
    a = Network.from_config(shorthand, (1, 12, 12), 5)
    b = Network.from_config(expanded, (1, 12, 12), 5)
    assert a.architecture == b.architecture
    assert list(a.parameters()) == list(b.parameters()) and "fc1_bn.weight" in a.parameters()
    for name, value in a.parameters().items():
        assert np.array_equal(value, b.parameters()[name])


def test_the_layers_flag_takes_a_toml_array_and_refuses_template_options_beside_it():
    config = FitConfig().with_overrides({"layers": '[{type = "flatten"}, {type = "dense", units = 32}]'})
    assert config.layers == [{"type": "flatten"}, {"type": "dense", "units": 32}]
    assert "filters" not in config.to_toml() and "[[model.layers]]" in config.to_toml()
    with pytest.raises(ConfigError, match=r"hidden: got 32, but the network is the layer list"):
        config.with_overrides({"hidden": [32]})
    with pytest.raises(ConfigError, match=r"layers: invalid TOML"):
        FitConfig().with_overrides({"layers": "[{type = conv}]"})
    with pytest.raises(ConfigError, match=r"layers\[1\] \(dropout\): p got 1.5"):
        FitConfig(layers=[{"type": "flatten"}, {"type": "dropout", "p": 1.5}]).validate()


def test_winograd_needs_a_3x3_stride_1_conv_somewhere_in_the_list():
    inner = {"type": "residual", "layers": [{"type": "conv", "filters": 4, "padding": 1}]}
    FitConfig(conv_algo="winograd", layers=[{"type": "conv", "filters": 4, "kernel": 5}, inner,
                                            {"type": "flatten"}]).validate()
    with pytest.raises(ConfigError, match="conv_algo"):
        FitConfig(conv_algo="winograd", layers=[{"type": "conv", "filters": 4, "kernel": 5},
                                                {"type": "flatten"}]).validate()
