"""Single image files (PNG, JPEG) for `convtrain predict`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .base import data_error


def load_image_file(path: str | Path) -> np.ndarray:
    """Pixels in [0, 255] as float32: (H, W) for a grayscale image, (3, H, W) for colour.

    Alpha is dropped. Reads with Pillow if installed, else with matplotlib.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise data_error(path, "no such image file")
    try:
        from PIL import Image
    except ImportError:
        return _read_with_matplotlib(path)
    try:
        # Pillow only warns (on stderr) about an image between its pixel limit and twice that,
        # then decodes it anyway: gigabytes for one prediction. Refuse it like a larger one.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pixels = _decode(Image, path)
    # Pillow reports bad files as OSError, ValueError or SyntaxError; huge ones as a bomb.
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise data_error(path, f"image too large ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise data_error(path, f"not a readable image ({exc})") from None
    return pixels if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _decode(Image, path: Path) -> np.ndarray:
    with Image.open(path) as image:
        grayscale = image.mode in ("1", "L", "LA", "I", "I;16", "F") or \
            (image.mode == "P" and _palette_is_gray(image))
        return np.asarray(image.convert("L" if grayscale else "RGB"), dtype=np.float32)


def _palette_is_gray(image) -> bool:
    palette = image.getpalette() or []
    rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    return bool((rgb == rgb[:, :1]).all())


def _read_with_matplotlib(path: Path) -> np.ndarray:
    import matplotlib.image

    try:
        pixels = np.asarray(matplotlib.image.imread(path))
    except (OSError, ValueError, SyntaxError) as exc:
        raise data_error(path, f"not a readable image ({exc})") from None
    # matplotlib gives PNGs as floats in [0, 1] and other formats as uint8.
    pixels = pixels.astype(np.float32) * (255.0 if pixels.dtype.kind == "f" else 1.0)
    if pixels.ndim == 2:
        return pixels
    if pixels.shape[2] <= 2:  # gray, or gray + alpha
        return np.ascontiguousarray(pixels[:, :, 0])
    return np.ascontiguousarray(pixels[:, :, :3].transpose(2, 0, 1))
