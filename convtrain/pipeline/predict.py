"""`convtrain predict`: a saved model's class and probabilities for files or names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convtrain.errors import DataError


def predict_inputs(model_path: str | Path, inputs: list[str]) -> list[dict]:
    """Class and probabilities for each input: .npz files (array x), image files, folders of image
    files, or names."""
    from convtrain.data.names import encode_names_as_trained, is_names_model
    from convtrain.nn.network import Network
    from convtrain.pipeline.evaluate import resolve_model

    network = Network.load(resolve_model(model_path))
    class_names = [str(c) for c in (network.class_names or range(network.num_classes))]
    labels, batches = [], []
    if is_names_model(network.meta):
        names = []
        for item in inputs:
            path = Path(item)
            names += _read_name_lines(path) if path.is_file() else [item]
        labels, batches = names, [encode_names_as_trained(network.meta, names)]
    else:
        for item in inputs:
            if Path(item).is_dir():  # a folder of images: each file under it, in name order
                from convtrain.data.folder import images_in

                files = images_in(item)
                batches += [_read_images(path, network) for path in files]
                labels += [str(path) for path in files]
                continue
            images = _read_images(Path(item), network)
            batches.append(images)
            labels += [item] if len(images) == 1 and not item.endswith(".npz") else [f"{item}[{i}]" for i in range(len(images))]
    x = np.concatenate(batches) if batches else np.empty((0, *network.input_shape), np.float32)
    probabilities = network.predict_proba(x) if len(x) else np.empty((0, network.num_classes))
    return [{"input": label, "class": class_names[int(p.argmax())],
             "probabilities": {c: float(v) for c, v in zip(class_names, p)}}
            for label, p in zip(labels, probabilities)]

def _read_name_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file of names") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no names in the file")
    return names

def _read_images(path: Path, network) -> np.ndarray:
    """(N, C, H, W) raw images from an .npz (array x, or its only array) or an image file."""
    if path.suffix.lower() == ".npz":
        from convtrain.nn.npz_files import read_npz

        # the sizes its headers declare are checked before reading, with the float32 copy and
        # the concatenated batch predicted on
        arrays = read_npz(path, "input", working_bytes_per_value=2 * np.dtype(np.float32).itemsize)
        key = "x" if "x" in arrays else (next(iter(arrays)) if len(arrays) == 1 else None)
        if key is None:
            raise DataError(f"{path}: no array 'x' (found: {', '.join(arrays) or 'none'})")
        x = arrays[key]
        if x.dtype.kind not in "fiub":
            raise DataError(f"{path}: array {key!r} must hold finite numbers, got {x.dtype}")
        if x.ndim == len(network.input_shape):
            x = x[None]
        if x.ndim == 3 and network.input_shape[0] == 1:
            x = x[:, None]
        if x.dtype.kind == "f":
            from convtrain.data.npz import as_finite_float32

            return as_finite_float32(x, lambda problem: DataError(f"{path}: array {key!r} has {problem}"))
        return x.astype(np.float32)
    if (network.meta or {}).get("data") == "folder":
        return _folder_image(path, network)[None]
    from convtrain.data import load_image_file

    return _fit_image(load_image_file(path), network, path)[None]

def _folder_image(path: Path, network) -> np.ndarray:
    """An image for a model trained on an image folder: decoded as its training images were
    (the same channels; centre crop and bilinear resize to the network's size)."""
    from convtrain.data.base import data_error
    from convtrain.data.folder import BadImage, FolderOptions, decode_image

    channels, height, width = network.input_shape
    try:
        pixels = decode_image(Path(path), FolderOptions(image_size=(height, width), channels=channels), channels)
    except BadImage as error:
        raise data_error(path, str(error)) from None
    return pixels.astype(np.float32)

def _fit_image(pixels: np.ndarray, network, path: Path) -> np.ndarray:
    """Match an image file to the network's (C, H, W): channels by averaging/repeating, size by resizing."""
    channels, height, width = network.input_shape
    image = pixels[None] if pixels.ndim == 2 else pixels
    if image.shape[0] != channels:
        image = image.mean(axis=0, keepdims=True) if channels == 1 else np.repeat(image[:1], channels, axis=0)
    if image.shape[1:] != (height, width):
        from PIL import Image

        image = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize(
            (width, height), Image.BILINEAR)) for c in image])
    return image.astype(np.float32)
