"""The same network as a torch.nn.Sequential, for cross-checks and benchmarks.

torch is optional and never a dependency of convtrain: it is imported only when this is
called. The module's children carry the Network's layer names, so its state_dict keys
("conv1.weight", "fc.bias", ...) are exactly Network.state_dict_torch()'s.
"""

from __future__ import annotations

from collections import OrderedDict

from convtrain.nn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU


def to_torch_module(network, copy_weights: bool = True):
    import torch
    from torch import nn

    dtype = {"float32": torch.float32, "float64": torch.float64}[str(network.dtype)]
    children = OrderedDict()
    for layer in network.layers:
        if isinstance(layer, Conv2D):
            module = nn.Conv2d(layer.in_channels, layer.filters, layer.kernel_size,
                               stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, ReLU):
            module = nn.ReLU()
        elif isinstance(layer, MaxPool2D):
            module = nn.MaxPool2d(layer.size, stride=layer.stride)
        elif isinstance(layer, Flatten):
            module = nn.Flatten()
        elif isinstance(layer, Dense):
            module = nn.Linear(layer.in_features, layer.out_features)
        else:
            raise TypeError(f"no torch equivalent for layer {layer!r}")
        children[layer.name] = module
    model = nn.Sequential(children).to(dtype)
    if copy_weights:
        state = {name: torch.from_numpy(value) for name, value in network.state_dict_torch().items()}
        model.load_state_dict(state)
    return model
