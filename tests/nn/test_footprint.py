"""The memory estimate of a network, worked out from its shapes before it is built."""

import pytest

from convtrain.config import FitConfig
from convtrain.errors import ArchitectureError
from convtrain.nn.footprint import (
    MEMORY_LIMIT_ENV,
    available_memory,
    check_fits,
    estimate,
    estimate_for_config,
    format_bytes,
)
from convtrain.nn.network import Network

GiB = 1024 ** 3

ARCHITECTURES = [
    dict(input_shape=(1, 8, 8), num_classes=10, filters=[16, 32], kernel_sizes=3, strides=1, padding=0, pool=0,
         hidden=[]),
    dict(input_shape=(3, 32, 32), num_classes=10, filters=[8, 16], kernel_sizes=[[5, 3], 3], strides=[1, 2],
         padding=["same", 1], pool=[2, 0], hidden=[64, 32]),
    dict(input_shape=(1, 28, 19), num_classes=18, filters=[20], kernel_sizes=[[28, 5]], strides=1, padding="valid",
         pool=0, hidden=[]),
]


def per_block(value, n):
    if isinstance(value, (int, str)):
        return [value] * n
    return list(value) if len(value) == n else list(value) * n


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_parameter_count_is_the_built_networks(arch):
    n = len(arch["filters"])
    footprint = estimate(**{**arch, **{k: per_block(arch[k], n) for k in ("kernel_sizes", "strides", "padding",
                                                                           "pool")}})
    assert footprint.parameters == sum(p.size for p in Network.build(**arch).parameters().values())


def test_activations_grow_with_the_batch_and_the_dtype():
    config = FitConfig(filters=[16], batch_size=1000)
    small = estimate_for_config(config, (1, 8, 8), 10)
    larger = estimate_for_config(config.with_overrides({"batch_size": 2000}), (1, 8, 8), 10)
    double = estimate_for_config(config.with_overrides({"dtype": "float64"}), (1, 8, 8), 10)
    assert larger.activation_bytes > 1.9 * small.activation_bytes
    assert larger.parameter_bytes == small.parameter_bytes
    assert double.total_bytes == 2 * small.total_bytes
    # a small batch still needs room for the evaluation batches
    tiny = estimate_for_config(config.with_overrides({"batch_size": 1}), (1, 8, 8), 10)
    assert tiny.activation_bytes > small.activation_bytes / 4


def test_the_filter_gradient_accumulators_are_counted():
    """The filter gradient's partial sums (FILTER_GRAD_CHUNKS of F x (C*taps + 1), 16 taps for
    Winograd's 3x3) are as large as the weights times the chunks: a wide layer's dominate."""
    from convtrain.nn.kernels import FILTER_GRAD_CHUNKS

    wide = dict(input_shape=(512, 4, 4), num_classes=10, filters=[512], kernel_sizes=[3], strides=[1],
                padding=[1], pool=[0], hidden=[], batch_size=1, threads=1)
    footprint = estimate(**wide)
    assert footprint.activation_bytes >= FILTER_GRAD_CHUNKS * 512 * (512 * 16 + 1) * 4
    five = estimate(**{**wide, "kernel_sizes": [5], "padding": [2]})
    assert five.activation_bytes >= FILTER_GRAD_CHUNKS * 512 * (512 * 25 + 1) * 4


@pytest.mark.parametrize("overrides, fragment", [
    ({"filters": [1_000_000_000]}, "parameters"),
    ({"hidden": [1_000_000_000]}, "parameters"),
    ({"padding": [100_000]}, "activations for a batch of 32"),
    ({"filters": [16, 10**12], "hidden": [10**12]}, "PiB"),
])
def test_terabyte_networks_are_refused_in_one_line_with_the_estimate(overrides, fragment):
    config = FitConfig(**{"batch_size": 32, **overrides})
    with pytest.raises(ArchitectureError) as caught:
        check_fits(config, (1, 8, 8), 10, available=16 * GiB)
    message = str(caught.value)
    assert "\n" not in message and fragment in message, message
    assert message.startswith("network: needs an estimated") and "16.0 GiB of memory available" in message


def test_the_default_network_fits_easily():
    footprint = check_fits(FitConfig(), (3, 32, 32), 10, available=1 * GiB)
    assert 0 < footprint.total_bytes < 256 * 1024 ** 2


def test_available_memory_reads_the_system_or_the_override(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    found = available_memory()
    assert found is None or found > 0
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "12345")
    assert available_memory() == 12345
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ArchitectureError, match=MEMORY_LIMIT_ENV):
        available_memory()


def test_format_bytes():
    assert format_bytes(100) == "100 bytes"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(6.4e12) == "5.8 TiB"


def test_a_layer_list_with_residual_blocks_counts_the_built_networks_parameters():
    from convtrain.nn.footprint import estimate_layers
    from convtrain.nn.layer_specs import BatchNorm, Conv2D, Dense, Dropout, GlobalAvgPool, ReLU, Residual

    layers = [Conv2D(8, 3, padding=1, bias=False), BatchNorm(), ReLU(),
              Residual([Conv2D(8, 3, padding=1, bias=False), BatchNorm(), ReLU(), Conv2D(8, 3, padding=1)]),
              Residual([Conv2D(16, 3, stride=2, padding=1, bias=False), BatchNorm(), ReLU(), Dropout(0.1),
                        Conv2D(16, 3, padding=1, bias=False), BatchNorm()]),
              Residual([Conv2D(12, 1), ReLU()], shortcut="conv"), GlobalAvgPool(), Dropout(0.2), Dense(20)]
    network = Network(layers, input_shape=(3, 16, 16), num_classes=10)
    footprint = estimate_layers(network.architecture["layers"], input_shape=(3, 16, 16), num_classes=10,
                                batch_size=32)
    assert footprint.parameters == sum(p.size for p in network.parameters().values())
    assert footprint.activation_bytes > 32 * 2 * 4 * (8 + 8 + 8 + 16) * 16 * 16 // 4
