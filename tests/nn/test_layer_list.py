"""The layer list: its canonical form, its names, the template it generalizes, its errors."""

import numpy as np
import pytest

import convtrain
from convtrain.errors import ArchitectureError
from convtrain.nn.architecture import layer_architecture
from convtrain.nn.layer_specs import (AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool,
                                      MaxPool2D, ReLU, Residual, layer_names, normalize_layers, set_layer_setting)
from convtrain.nn.network import Network


def test_the_canonical_form_leaves_defaults_out_and_writes_square_pairs_as_one_number():
    specs = normalize_layers([
        {"type": "conv", "filters": 8, "kernel": [3, 3], "stride": [1, 1], "padding": [1, 2], "bias": True},
        {"type": "max_pool", "size": [2, 2], "stride": 2}, {"type": "avg_pool", "size": 3, "stride": 1},
        {"type": "residual", "shortcut": "auto", "layers": [{"type": "relu"}]}, {"type": "flatten"}])
    assert specs == [{"type": "conv", "filters": 8, "padding": [1, 2]}, {"type": "max_pool"},
                     {"type": "avg_pool", "size": 3, "stride": 1},
                     {"type": "residual", "layers": [{"type": "relu"}]}, {"type": "flatten"}]


def test_the_python_classes_write_the_dicts_a_config_file_holds():
    python = [Conv2D(8, (3, 5), stride=2, padding="same", bias=False, name="stem"), BatchNorm(), ReLU(),
              MaxPool2D(2), AvgPool2D(3, 1), Residual([Conv2D(8), ReLU()], shortcut="conv"), GlobalAvgPool(),
              Dropout(0.5), Flatten(), Dense(10)]
    assert normalize_layers(python) == [
        {"type": "conv", "name": "stem", "filters": 8, "kernel": [3, 5], "stride": 2, "padding": "same",
         "bias": False},
        {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool"}, {"type": "avg_pool", "size": 3, "stride": 1},
        {"type": "residual", "shortcut": "conv", "layers": [{"type": "conv", "filters": 8}, {"type": "relu"}]},
        {"type": "global_avg_pool"}, {"type": "dropout", "p": 0.5}, {"type": "flatten"}, {"type": "dense", "units": 10}]
    assert convtrain.Residual is Residual and convtrain.Conv2D is Conv2D


def test_names_follow_the_template_and_residual_blocks_name_their_layers():
    specs = normalize_layers([Conv2D(8), BatchNorm(), ReLU(), MaxPool2D(), Residual([Conv2D(8, padding=1), BatchNorm(),
                              ReLU(), Dropout(0.1)]), Residual([Conv2D(8, padding=1)]), GlobalAvgPool(), Dropout(0.2),
                              Dense(16), BatchNorm(), ReLU(), Dropout(0.3), Dense(8, name="head")])
    assert layer_names(specs) == ["conv1", "bn1", "conv1_relu", "pool1", "res1", "res2", "gap", "res2_dropout",
                                  "fc1", "fc1_bn", "fc1_relu", "fc1_dropout", "head"]
    net = Network(specs, input_shape=(3, 10, 10), num_classes=4)
    assert [layer.name for layer in net.layers[4].inner] == ["res1.conv1", "res1.bn1", "res1.conv1_relu",
                                                             "res1.conv1_dropout"]
    assert list(net.parameters())[-4:] == ["head.weight", "head.bias", "fc.weight", "fc.bias"]


def test_the_template_is_the_list_it_expands_to_bit_for_bit():
    template = Network.build(input_shape=(3, 12, 12), num_classes=5, filters=[4, 8], kernel_sizes=[3, 5],
                             padding=[1, "same"], pool=[2, 0], hidden=[16], batch_norm=True, dropout=0.2,
                             global_pool="avg", pool_type="avg", seed=4)
    written = Network([Conv2D(4, 3, padding=1), BatchNorm(), ReLU(), AvgPool2D(2), Conv2D(8, 5, padding="same"),
                       BatchNorm(), ReLU(), GlobalAvgPool(), Dense(16), BatchNorm(), ReLU(), Dropout(0.2)],
                      input_shape=(3, 12, 12), num_classes=5, seed=4)
    assert template.architecture == written.architecture
    assert list(template.parameters()) == list(written.parameters())
    for name, value in template.parameters().items():
        assert np.array_equal(value, written.parameters()[name]), name


def test_a_template_description_from_an_older_file_reads_as_its_layer_list():
    old = {"input_shape": [1, 8, 8], "num_classes": 10, "dtype": "float32", "hidden": [32], "batch_norm": True,
           "dropout": [0.5], "blocks": [{"filters": 4, "kernel_size": [3, 3], "stride": [1, 1], "padding": 0,
                                         "pool": 2}]}
    new = layer_architecture(old)
    assert new["layers"] == normalize_layers([Conv2D(4), BatchNorm(), ReLU(), MaxPool2D(2), Flatten(), Dense(32),
                                              BatchNorm(), ReLU(), Dropout(0.5)])
    assert new == old and not new != old  # the same network, however described
    assert list(Network(old).parameters()) == list(Network(new).parameters())


def test_a_blocks_width_or_a_dropout_rate_is_set_by_the_layers_name():
    specs = normalize_layers([Conv2D(8), ReLU(), Residual([Conv2D(8, padding=1), ReLU(), Conv2D(8, padding=1)]),
                              GlobalAvgPool(), Dropout(0.1, name="head_dropout")])
    wider = set_layer_setting(specs, "res1", "filters", 32)
    assert [s["filters"] for s in wider[2]["layers"] if s["type"] == "conv"] == [32, 32]
    assert set_layer_setting(specs, "head_dropout", "p", 0.4)[-1]["p"] == 0.4
    assert specs[-1]["p"] == 0.1  # a copy
    with pytest.raises(ArchitectureError, match="no layer is named 'res9'.*res1.conv1"):
        set_layer_setting(specs, "res9", "filters", 8)


@pytest.mark.parametrize("specs, message", [
    ([{"type": "pool"}], r"layers\[0\]: unknown layer type 'pool'"),
    ([{"type": "conv"}], r"layers\[0\] \(conv1\): a conv layer needs 'filters'"),
    ([{"type": "conv", "filters": 0}], r"conv1\): filters got 0, expected a whole number >= 1"),
    ([{"type": "conv", "filters": 4, "kernel": [3, 3, 3]}], r"kernel got \[3, 3, 3\]"),
    ([{"type": "flatten"}, {"type": "dropout", "p": 1}], r"layers\[1\] \(dropout\): p got 1"),
    ([{"type": "residual", "layers": []}], r"layers\[0\].layers: expected at least one layer"),
    ([{"type": "residual", "layers": [{"type": "nope"}]}], r"layers\[0\].layers\[0\]: unknown layer type 'nope'"),
    ([{"type": "residual", "shortcut": "projection", "layers": [{"type": "relu"}]}], r"shortcut got 'projection'"),
    ([{"type": "dense", "units": 4, "name": "fc"}], r"name 'fc'"),
    ([{"type": "flatten", "name": "x"}, {"type": "dense", "units": 4, "name": "x"}],
     r"layers\[1\]: name 'x' is taken by layers\[0\]"),
    ([{"type": "flatten"}, {"type": "batch_norm", "momentum": 0.1}], r"unknown setting 'momentum'"),
])
def test_a_bad_spec_is_one_line_naming_the_layer(specs, message):
    with pytest.raises(ArchitectureError, match=message):
        normalize_layers(specs)


@pytest.mark.parametrize("specs, message", [
    ([Conv2D(4), Dense(3)], r"fc1: a dense layer needs one value per feature, got a 4x6x6 input"),
    ([Residual([Conv2D(4, padding=1)], shortcut="identity"), Flatten()],
     r"res1: its layers give 4x8x8 from its 3x8x8 input and the identity shortcut gives 3x8x8"),
    ([Residual([Flatten()], shortcut="conv")], r"res1: a conv shortcut needs CxHxW input and output"),
    ([Residual([Conv2D(4, 5, stride=2, padding=3)]), Flatten()], r"res1: .* the shapes can't be added"),
    ([Flatten(), MaxPool2D()], r"pool: a max_pool layer needs a CxHxW input, got 192"),
])
def test_a_shape_that_does_not_fit_names_the_layer(specs, message):
    with pytest.raises(ArchitectureError, match=message):
        Network(specs, input_shape=(3, 8, 8), num_classes=2)
