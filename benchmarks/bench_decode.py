"""Decode throughput of an image folder: images/s on the first read (decoding, in the thread pool)
and on the second (the cache), through load_dataset as a fit reads it.

    python benchmarks/bench_decode.py --images 10000                  # a folder made from CIFAR-10
    python benchmarks/bench_decode.py --folder path/to/images         # your own folder

The made folder holds --images 32x32 PNGs and JPEGs (half each) drawn from the CIFAR-10 subset of
$CONVTRAIN_TEST_DATA (repeated as needed), or random pixels without it. The cache goes to a fresh
temporary folder, so the first read always decodes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, count: int) -> Path:
    from PIL import Image

    pixels, labels, names = _source_images()
    for i in range(count):
        folder = root / names[labels[i % len(labels)]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i % len(pixels)].transpose(1, 2, 0)).save(
            folder / f"{i:06d}.{'png' if i % 2 else 'jpg'}")
    return root


def _source_images():
    data = os.environ.get("CONVTRAIN_TEST_DATA")
    if data:
        from convtrain.data.cifar import load_cifar10

        raw = load_cifar10(Path(data) / "cifar10")
        return raw.x, raw.y, raw.class_names
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (1000, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 1000), \
        [f"class{k}" for k in range(10)]


def timed_read(folder: Path, image_size: str | None) -> tuple[float, int, str]:
    from convtrain.data import load_dataset
    from convtrain.data.folder import FolderOptions

    started = time.perf_counter()
    splits = load_dataset("folder", folder, folder=FolderOptions.from_settings(image_size, None, False))
    seconds = time.perf_counter() - started
    count = len(splits.y_train) + len(splits.y_val if splits.y_val is not None else [])
    return seconds, count + len(splits.y_test if splits.y_test is not None else []), splits.source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images in the made folder")
    parser.add_argument("--folder", type=Path, help="read this folder instead of making one")
    parser.add_argument("--image-size", help="resize to HxW as fit --image-size does")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["CONVTRAIN_CACHE_DIR"] = str(Path(scratch) / "cache")
        folder = args.folder or make_folder(Path(scratch) / "images", args.images)
        for label in ("first read (decode)", "second read (cache)"):
            seconds, count, source = timed_read(folder, args.image_size)
            print(f"{label:<22} {count:>7} images  {seconds:7.3f} s  {count / seconds:10.0f} images/s")
        print(source)


if __name__ == "__main__":
    main()
