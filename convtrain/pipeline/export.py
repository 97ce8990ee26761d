"""`convtrain export`: a saved model (a model file, a fit's --out folder, or an MLflow run id) as ONNX."""

from __future__ import annotations

from pathlib import Path

from convtrain.errors import CheckpointError, ConfigError

FORMATS = ("onnx",)


def resolve_model_spec(spec: str, tracking_uri: str | None = None) -> Path:
    """A model.npz (or checkpoint.npz) path, a fit's --out folder, or a run id (32 hex digits),
    whose recorded checkpoint's folder holds the model."""
    from convtrain.pipeline.evaluate import resolve_model
    from convtrain.pipeline.resume import RUN_ID_PATTERN, resolve_checkpoint

    path = Path(spec).expanduser()
    if path.exists():
        return resolve_model(path)
    if RUN_ID_PATTERN.match(spec):
        return resolve_model(resolve_checkpoint(spec, tracking_uri).parent)
    raise CheckpointError(f"{spec}: not a model file, a fit's --out folder, or an MLflow run id (32 hex digits)")


def export_model(spec: str, *, format: str = "onnx", output: str | Path | None = None,
                 input_type: str = "float32", fold_batch_norm: bool = True,
                 tracking_uri: str | None = None) -> Path:
    """Write the model `spec` names as `format`; returns the file (default: <model>.onnx beside it)."""
    from convtrain.nn.network import Network
    from convtrain.nn.onnx_export import INPUT_TYPES, export_onnx

    if format not in FORMATS:
        raise ConfigError(f"format: got {format!r}, expected {' or '.join(FORMATS)}")
    if input_type not in INPUT_TYPES:
        raise ConfigError(f"input_type: got {input_type!r}, expected {' or '.join(INPUT_TYPES)}")
    model_path = resolve_model_spec(spec, tracking_uri)
    network = Network.load(model_path)
    target = Path(output).expanduser() if output else model_path.with_suffix(".onnx")
    return export_onnx(network, target, input_type=input_type, fold_batch_norm=fold_batch_norm)
