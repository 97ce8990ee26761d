"""convtrain: from-scratch ConvNet training with Cython kernels and MLflow tracking.

The top-level names are resolved lazily so that `import convtrain` (and with it
`convtrain --help`) stays fast: numpy-heavy engine modules and MLflow load only
when first used.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "build_info": "convtrain.nn.backend",
    "set_num_threads": "convtrain.nn.backend",
    "get_num_threads": "convtrain.nn.backend",
    "Network": "convtrain.nn.network",
    "SGD": "convtrain.nn.optim",
    "AdamW": "convtrain.nn.optim",
    "Trainer": "convtrain.training.trainer",
    "History": "convtrain.training.callbacks",
    "make_schedule": "convtrain.nn.optim",
    "Callback": "convtrain.training.callbacks",
    "Checkpoint": "convtrain.training.callbacks",
    "EarlyStopping": "convtrain.training.callbacks",
    "FitConfig": "convtrain.config",
    "fit": "convtrain.pipeline.fit",
    "FitResult": "convtrain.pipeline.fit",
    "load_dataset": "convtrain.data",
    # the layer list in Python (specs, not the engine's layer objects): Network([...], ...)
    **{name: "convtrain.nn.layer_specs" for name in (
        "Conv2D", "BatchNorm", "ReLU", "MaxPool2D", "AvgPool2D", "GlobalAvgPool", "Flatten", "Dense", "Dropout",
        "Residual")},
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'convtrain' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
