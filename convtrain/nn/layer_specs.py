"""A network as data: the list of layer specs a config file, a flag or Python code writes.

A spec is a plain dict with a `type` and that kind's settings (defaults in KINDS):

    {type = "conv", filters = 16, kernel = 3, stride = 1, padding = "same", bias = false}
    {type = "batch_norm"}   {type = "relu"}   {type = "flatten"}   {type = "global_avg_pool"}
    {type = "max_pool", size = 2}   {type = "avg_pool", size = 2, stride = 1}
    {type = "dense", units = 64}    {type = "dropout", p = 0.3}
    {type = "residual", shortcut = "auto", layers = [ ...specs... ]}

The list ends before the classifier: the network adds dense(num_classes), named "fc", after
the last spec, which must give one value per feature (flatten or global_avg_pool end a conv
stack). A residual block adds its layers' output to its input (the shortcut) and applies a
ReLU to the sum, as ResNet's basic block; the shortcut is "identity", "conv" (a 1x1 conv
with the stride that matches the shapes), "conv_bn" (that conv without bias, then batch
norm), or "auto": identity where the shapes already match, else conv_bn if the block's
layers hold a batch norm, else conv.

`normalize_layers` checks a list (kinds, keys, values; not shapes, which need the input) and
writes it in one canonical form (settings at their default left out), so two ways of writing
the same network give equal lists. `layer_names` names every layer as PyTorch would key its
state dict; `expand_template` turns the template options (filters, hidden, ...) into a list.
The Python classes at the bottom (Conv2D, Residual, ...) write the same dicts.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

from convtrain.errors import ArchitectureError

REQUIRED = object()
# kind -> its settings and their defaults (in the order the canonical form writes them)
KINDS: dict[str, dict[str, Any]] = {
    "conv": {"filters": REQUIRED, "kernel": 3, "stride": 1, "padding": 0, "bias": True},
    "batch_norm": {},
    "relu": {},
    "max_pool": {"size": 2, "stride": None},
    "avg_pool": {"size": 2, "stride": None},
    "global_avg_pool": {},
    "flatten": {},
    "dense": {"units": REQUIRED},
    "dropout": {"p": REQUIRED},
    "residual": {"shortcut": "auto", "layers": REQUIRED},
}
SHORTCUTS = ("auto", "identity", "conv", "conv_bn")
CLASSIFIER = "fc"  # the name of the dense layer the network adds after the list
RESERVED_NAMES = (CLASSIFIER, "shortcut")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---- canonical form ---------------------------------------------------------------------


def normalize_layers(specs: Sequence, where: str = "layers") -> list[dict[str, Any]]:
    """The canonical list for `specs` (dicts or the spec objects below); ArchitectureError,
    one line naming the layer (its position and name) and the problem."""
    if isinstance(specs, (str, bytes, dict)) or not isinstance(specs, Sequence):
        raise ArchitectureError(f"{where}: expected a list of layer specs, got {specs!r:.80}")
    if not specs:
        raise ArchitectureError(f"{where}: expected at least one layer")
    dicts = [_as_dict(spec, f"{where}[{i}]") for i, spec in enumerate(specs)]
    names = _names_of(dicts)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ArchitectureError(f"{where}[{i}]: name {name!r} is taken by {where}[{names.index(name)}]")
    out = []
    for i, (spec, name) in enumerate(zip(dicts, names)):
        out.append(_normalize_one(spec, f"{where}[{i}] ({name})"))
    return out


def _as_dict(spec, where: str) -> dict:
    if hasattr(spec, "to_spec"):
        spec = spec.to_spec()
    if not isinstance(spec, dict):
        raise ArchitectureError(f"{where}: expected a table with a type (e.g. {{type = \"conv\", filters = 16}}), "
                                f"got {spec!r:.80}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise ArchitectureError(f"{where}: unknown layer type {kind!r}, expected one of {', '.join(KINDS)}")
    return spec


def _normalize_one(spec: dict, where: str) -> dict:
    kind = spec["type"]
    settings = KINDS[kind]
    unknown = sorted(set(spec) - set(settings) - {"type", "name"})
    if unknown:
        raise ArchitectureError(f"{where}: unknown setting {unknown[0]!r} for a {kind} layer, expected "
                                f"{', '.join(settings) or 'none'} (or name)")
    out: dict[str, Any] = {"type": kind}
    if "name" in spec:
        name = spec["name"]
        if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED_NAMES:
            raise ArchitectureError(f"{where}: name {name!r} must be letters, digits and _ (not "
                                    f"{' or '.join(map(repr, RESERVED_NAMES))}: the classifier's and a residual "
                                    "block's shortcut's)")
        out["name"] = name
    for key, default in settings.items():
        if key not in spec:
            if default is REQUIRED:
                raise ArchitectureError(f"{where}: a {kind} layer needs {key!r}")
            continue
        value = _checked(kind, key, spec[key], where)
        if key == "stride" and kind.endswith("_pool") and value == out.get("size", settings["size"]):
            continue  # a pool's stride defaults to its size
        if value != default:
            out[key] = value
    return out


def _checked(kind: str, key: str, value, where: str):
    def refuse(expected: str):
        return ArchitectureError(f"{where}: {key} got {value!r:.80}, expected {expected}")

    if key in ("filters", "units"):
        if not _whole(value) or value < 1:
            raise refuse("a whole number >= 1")
        return int(value)
    if key in ("kernel", "size", "stride"):
        if value is None and key == "stride":
            return None
        return _pair_value(value, refuse)
    if key == "padding":
        if value in ("same", "valid"):
            return value
        return _pair_value(value, refuse, minimum=0)
    if key == "bias":
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if key == "p":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise refuse("a probability in [0, 1)")
        return float(value)
    if key == "shortcut":
        if value not in SHORTCUTS:
            raise refuse(f"one of {', '.join(SHORTCUTS)}")
        return value
    if key == "layers":
        return normalize_layers(value, f"{where.split(' ')[0]}.layers")
    raise AssertionError(key)  # pragma: no cover - KINDS and this function list the same keys


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pair_value(value, refuse, minimum: int = 1):
    """An int, or [h, w] (written back as one int when both are equal)."""
    if _whole(value) and value >= minimum:
        return int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_whole(v) and v >= minimum for v in value):
        return int(value[0]) if value[0] == value[1] else [int(value[0]), int(value[1])]
    raise refuse(f"a whole number >= {minimum} or [height, width]")


# ---- names ------------------------------------------------------------------------------


def layer_names(specs: Sequence[dict], prefix: str = "") -> list[str]:
    """The name of each spec of one list (a residual block's layers are named inside it:
    "res1.conv1"). The rule reproduces the template's names, which are the state dict's keys:
    conv1, conv2, ... and fc1, fc2, ... count the conv and dense layers; a batch norm right
    after conv<i> is bn<i>, after fc<j> fc<j>_bn; ReLU and dropout take the last conv or dense
    layer's name (conv1_relu, fc1_dropout); pools are pool<i> after conv<i>; residual blocks
    are res1, res2, ...; flatten and global_avg_pool are flatten and gap. A repeated name gets
    _2, _3; a spec's own `name` wins."""
    return [prefix + name for name in _names_of(specs)]


def _names_of(specs: Sequence[dict]) -> list[str]:
    taken = {CLASSIFIER} | {s["name"] for s in specs if isinstance(s, dict) and "name" in s}
    counts = {"conv": 0, "dense": 0, "residual": 0}
    owner = previous = None
    names = []
    for spec in specs:
        kind = spec.get("type")
        if kind in counts:
            counts[kind] += 1
        if "name" in spec:
            name = spec["name"]
        else:
            if kind == "conv":
                base = f"conv{counts['conv']}"
            elif kind == "dense":
                base = f"fc{counts['dense']}"
            elif kind == "residual":
                base = f"res{counts['residual']}"
            elif kind == "batch_norm":
                if previous and previous[0] == "conv" and previous[1].startswith("conv"):
                    base = "bn" + previous[1][4:]
                else:
                    base = f"{previous[1]}_bn" if previous else "bn"
            elif kind in ("relu", "dropout"):
                base = f"{owner}_{kind}" if owner else kind
            elif kind in ("max_pool", "avg_pool"):
                base = f"pool{counts['conv']}" if counts["conv"] else "pool"
            elif kind == "global_avg_pool":
                base = "gap"
            else:
                base = str(kind)
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}_{n}"
            taken.add(name)
        if kind in ("conv", "dense", "residual"):
            owner = name
        previous = (kind, name)
        names.append(name)
    return names


def walk_specs(specs: Sequence[dict], prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(name, spec) for every spec, a residual block before its layers."""
    for name, spec in zip(layer_names(specs, prefix), specs):
        yield name, spec
        if spec["type"] == "residual":
            yield from walk_specs(spec["layers"], name + ".")


def set_layer_setting(specs: list[dict], name: str, key: str, value) -> list[dict]:
    """A copy of `specs` with `key` of the layer called `name` set to `value` (a sweep's
    "layers.res2.filters"). A residual block's filters set every conv inside it (its width)."""
    import copy

    specs = copy.deepcopy(specs)
    found = dict(walk_specs(specs))
    if name not in found:
        raise ArchitectureError(f"layers.{name}.{key}: no layer is named {name!r}; the layers are "
                                f"{', '.join(found)}")
    spec = found[name]
    if spec["type"] == "residual" and key not in KINDS["residual"]:
        convs = [s for _, s in walk_specs(spec["layers"]) if s["type"] == "conv"]
        if key not in KINDS["conv"] or not convs:
            raise ArchitectureError(f"layers.{name}.{key}: a residual block sets the {key!r} of its conv "
                                    "layers; it has none with that setting")
        for conv in convs:
            conv[key] = value
    else:
        spec[key] = value
    return specs


# ---- the template, as a list -------------------------------------------------------------


def expand_template(*, filters: Sequence[int], kernel_sizes: Sequence, strides: Sequence, padding: Sequence,
                    pool: Sequence[int], hidden: Sequence[int], batch_norm: bool = False,
                    dropout: Sequence[float] = (), global_pool: str = "none",
                    pool_type: str = "max") -> list[dict]:
    """The layer list the template options describe (one entry per conv block in each
    per-block option, one dropout rate per hidden layer):

        [conv -> (batch_norm) -> relu -> (pool)] x blocks -> flatten | global_avg_pool
            -> [dense -> (batch_norm) -> relu -> (dropout)] x hidden
    """
    specs: list[dict] = []
    for f, k, s, p, q in zip(filters, kernel_sizes, strides, padding, pool):
        specs.append({"type": "conv", "filters": f, "kernel": k, "stride": s, "padding": p})
        specs += [{"type": "batch_norm"}] * bool(batch_norm) + [{"type": "relu"}]
        if q:
            specs.append({"type": f"{pool_type}_pool", "size": q})
    specs.append({"type": "global_avg_pool" if global_pool == "avg" else "flatten"})
    rates = list(dropout) or [0.0] * len(hidden)
    for units, p in zip(hidden, rates):
        specs.append({"type": "dense", "units": units})
        specs += [{"type": "batch_norm"}] * bool(batch_norm) + [{"type": "relu"}]
        if p:
            specs.append({"type": "dropout", "p": p})
    return normalize_layers(specs)


# ---- Python form ----------------------------------------------------------------------------


class _Spec:
    """A layer spec written in Python; `to_spec()` gives the dict a config file holds."""

    kind = ""

    def __init__(self, **settings):
        self.settings = {k: v for k, v in settings.items() if v is not None}

    def to_spec(self) -> dict:
        spec = {"type": self.kind, **self.settings}
        return _normalize_one(_as_dict(spec, self.kind), self.kind)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({args})"


class Conv2D(_Spec):
    kind = "conv"

    def __init__(self, filters: int, kernel=3, stride=1, padding=0, bias: bool = True, name: str | None = None):
        super().__init__(filters=filters, kernel=kernel, stride=stride, padding=padding, bias=bias, name=name)


class BatchNorm(_Spec):
    kind = "batch_norm"

    def __init__(self, name: str | None = None):
        super().__init__(name=name)


class ReLU(_Spec):
    kind = "relu"

    def __init__(self, name: str | None = None):
        super().__init__(name=name)


class MaxPool2D(_Spec):
    kind = "max_pool"

    def __init__(self, size=2, stride=None, name: str | None = None):
        super().__init__(size=size, stride=stride, name=name)


class AvgPool2D(_Spec):
    kind = "avg_pool"

    def __init__(self, size=2, stride=None, name: str | None = None):
        super().__init__(size=size, stride=stride, name=name)


class GlobalAvgPool(_Spec):
    kind = "global_avg_pool"

    def __init__(self, name: str | None = None):
        super().__init__(name=name)


class Flatten(_Spec):
    kind = "flatten"

    def __init__(self, name: str | None = None):
        super().__init__(name=name)


class Dense(_Spec):
    kind = "dense"

    def __init__(self, units: int, name: str | None = None):
        super().__init__(units=units, name=name)


class Dropout(_Spec):
    kind = "dropout"

    def __init__(self, p: float, name: str | None = None):
        super().__init__(p=p, name=name)


class Residual(_Spec):
    """layers(x) + shortcut(x), then ReLU; see the module docstring for the shortcuts."""

    kind = "residual"

    def __init__(self, layers: Sequence, shortcut: str = "auto", name: str | None = None):
        super().__init__(shortcut=shortcut, layers=list(layers), name=name)


SPEC_CLASSES = (Conv2D, BatchNorm, ReLU, MaxPool2D, AvgPool2D, GlobalAvgPool, Flatten, Dense, Dropout, Residual)
