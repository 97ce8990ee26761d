"""FitConfig: defaults, flag/TOML spellings, round trips and one-line validation errors."""

import os

import numpy as np
import pytest

from convtrain.config import FitConfig, dump_toml, tomllib
from convtrain.errors import ConfigError
from convtrain.nn.npz_files import write_npz_atomic


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
