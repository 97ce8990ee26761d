"""`convtrain evaluate`: a saved model's metrics on a data set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convtrain.errors import CheckpointError, ConfigError, DataError
from convtrain.training.metrics import confusion_matrix, evaluate_network, per_class_metrics


@dataclass
class EvaluationReport:
    model: str
    data: str
    split: str
    count: int
    loss: float
    accuracy: float
    balanced_accuracy: float
    class_names: list[str]
    confusion: list[list[int]]
    per_class: list[dict]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

def resolve_model(spec: str | Path) -> Path:
    """A model file, or a run's --out folder (what `fit --resume` takes): its model.npz, or
    its checkpoint.npz when the fit has not finished."""
    from convtrain.training.run_folder import CHECKPOINT_FILE, MODEL_FILE

    path = Path(spec).expanduser()
    if not path.is_dir():
        return path
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{spec}: the folder holds neither {MODEL_FILE} nor {CHECKPOINT_FILE}; "
                          "pass a model file or a fit's --out folder")

def evaluate_model(model_path: str | Path, *, data: str | None = None, data_path: str | None = None,
                   split: str = "auto", limit: int | None = None) -> EvaluationReport:
    """Metrics of a saved model on a data set (by default the one it was trained on)."""
    from convtrain.data import load_dataset
    from convtrain.nn.network import Network
    from convtrain.pipeline.image_folder import options_from_meta

    model_path = resolve_model(model_path)
    network = Network.load(model_path)
    meta = network.meta or {}
    if split not in ("auto", "test", "val", "train"):
        raise ConfigError(f"split: got {split!r}, expected test, val, train or auto")
    if limit is not None and limit < 1:  # x[:0] has nothing to score, x[:-3] would drop the last 3
        raise ConfigError(f"limit: got {limit}, expected a positive number of examples")
    name = data or meta.get("data")
    if name is None:
        raise ConfigError("data: the model does not record its data set; pass --data")
    if data_path is None and data is None:
        data_path = meta.get("data_path")
    same_data = name == meta.get("data")
    splits = load_dataset(name, data_path,
                          val_fraction=meta.get("val_fraction", 0.1) if same_data else 0.1,
                          seed=meta.get("seed", 0) if same_data else 0,
                          limit=meta.get("limit") if same_data else None,
                          folder=options_from_meta(meta) if name == "folder" else None)
    if split == "auto":
        split = "test" if splits.x_test is not None and len(splits.x_test) else "val"
    x, y = {"test": (splits.x_test, splits.y_test), "val": (splits.x_val, splits.y_val),
            "train": (splits.x_train, splits.y_train)}[split]
    if x is None or not len(x):
        raise DataError(f"data set {name!r} has no {split} split")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if splits.num_classes != network.num_classes:
        raise DataError(f"data set {name!r} has {splits.num_classes} classes, the model {network.num_classes}")
    # the raw images normalized a batch at a time, by the loop the trainer evaluates with
    values, predictions = evaluate_network(network, x, y, normalize=True, return_predictions=True)
    class_names = [str(c) for c in (network.class_names or splits.class_names)]
    return EvaluationReport(
        model=str(model_path), data=name, split=split, count=int(len(y)), loss=float(values["loss"]),
        accuracy=values["accuracy"], balanced_accuracy=float(values["balanced_accuracy"]),
        class_names=class_names, confusion=confusion_matrix(y, predictions, network.num_classes).tolist(),
        per_class=per_class_metrics(y, predictions, class_names))
