"""The same network as a torch.nn.Sequential, for cross-checks and benchmarks.

torch is optional and never a dependency of convtrain: it is imported only when this is
called. The module's children carry the Network's layer names, so its state_dict keys
("conv1.weight", "fc.bias", "bn1.running_mean", ...) are exactly Network.state_dict_torch()'s.
Batch norm, dropout and the pools map to their torch.nn twins (a GlobalAvgPool to
AdaptiveAvgPool2d(1) + Flatten); call .eval() on the module to compare with convtrain's eval mode.
A residual block becomes a module whose children are its inner layers (by their own names) and
`shortcut` (a Sequential of "conv" and "bn", empty for the identity), computing
relu(inner(x) + shortcut(x)): its keys are the block's ("res1.conv1.weight",
"res1.shortcut.bn.running_var").
"""

from __future__ import annotations

from collections import OrderedDict

from convtrain.nn.dropout import Dropout
from convtrain.nn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from convtrain.nn.norm import BatchNorm1D, BatchNorm2D
from convtrain.nn.pooling import AvgPool2D, GlobalAvgPool
from convtrain.nn.residual import Residual


def to_torch_module(network, copy_weights: bool = True):
    import torch
    from torch import nn

    dtype = {"float32": torch.float32, "float64": torch.float64}[str(network.dtype)]
    model = nn.Sequential(_torch_children(network.layers, nn)).to(dtype)
    if copy_weights:
        state = {name: torch.from_numpy(value) for name, value in network.state_dict_torch().items()}
        model.load_state_dict(state)
    return model


def _torch_children(layers, nn) -> OrderedDict:
    """{last part of the layer's name: its torch module} for one list of layers."""
    children = OrderedDict()
    for layer in layers:
        if isinstance(layer, Residual):
            module = _residual_class(nn)(_torch_children(layer.inner, nn), _torch_children(layer.shortcut, nn))
        elif isinstance(layer, Conv2D):
            module = nn.Conv2d(layer.in_channels, layer.filters, layer.kernel_size,
                               stride=layer.stride, padding=layer.padding, bias=layer.has_bias)
        elif isinstance(layer, ReLU):
            module = nn.ReLU()
        elif isinstance(layer, MaxPool2D):
            module = nn.MaxPool2d(layer.size, stride=layer.stride)
        elif isinstance(layer, Flatten):
            module = nn.Flatten()
        elif isinstance(layer, Dense):
            module = nn.Linear(layer.in_features, layer.out_features)
        elif isinstance(layer, (BatchNorm1D, BatchNorm2D)):
            kind = nn.BatchNorm2d if isinstance(layer, BatchNorm2D) else nn.BatchNorm1d
            module = kind(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        elif isinstance(layer, Dropout):
            module = nn.Dropout(layer.p)
        elif isinstance(layer, AvgPool2D):
            module = nn.AvgPool2d(layer.size, stride=layer.stride)
        elif isinstance(layer, GlobalAvgPool):
            module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            raise TypeError(f"no torch equivalent for layer {layer!r}")
        children[layer.name.rsplit(".", 1)[-1]] = module
    return children


_RESIDUAL = {}


def _residual_class(nn):
    """torch.nn's residual block (made once, when torch is first imported here)."""
    if "class" not in _RESIDUAL:
        class ResidualBlock(nn.Module):
            """relu(inner(x) + shortcut(x)); the inner layers are children in order."""

            def __init__(self, inner: OrderedDict, shortcut: OrderedDict):
                super().__init__()
                self.inner_names = list(inner)
                for name, module in inner.items():
                    self.add_module(name, module)
                self.shortcut = nn.Sequential(shortcut)
                # as torchvision's BasicBlock: `out += identity; relu_(out)` in place, where the
                # inner output is fresh and no backward keeps it (after a conv, a norm, a linear)
                self.add_in_place = isinstance(list(inner.values())[-1], (nn.Conv2d, nn.Linear, nn.BatchNorm1d,
                                                                          nn.BatchNorm2d))

            def forward(self, x):
                h = x
                for name in self.inner_names:
                    h = getattr(self, name)(h)
                h = h.add_(self.shortcut(x)) if self.add_in_place else h + self.shortcut(x)
                return nn.functional.relu(h, inplace=True)

        _RESIDUAL["class"] = ResidualBlock
    return _RESIDUAL["class"]


def torch_state_dict(network) -> dict:
    """Copies of the weights in PyTorch's layout and naming: conv (F, C, kh, kw), linear
    (out, in), and flattening in NCHW order as torch.nn.Flatten does. These are the layouts
    convtrain uses inside, so this is a plain copy (with batch norm's buffers)."""
    state = {name: value.copy() for name, value in network.parameters().items()}
    state.update({name: value.copy() for name, value in network.buffers().items()})
    return state


def load_torch_state_dict(network, state: dict) -> None:
    """Copy a state dict in PyTorch's layout (numpy arrays or torch tensors) into `network`."""
    values = {}
    for name, value in state.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        values[name] = value
    buffer_names = set(network.buffers())
    network.set_parameters({k: v for k, v in values.items() if k not in buffer_names}, source="state dict")
    network.set_buffers({k: v for k, v in values.items() if k in buffer_names}, source="state dict")
