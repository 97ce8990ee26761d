"""`--data folder`: a folder of image files, one subfolder per class (torchvision's ImageFolder,
Keras' image_dataset_from_directory).

    DIR/cat/001.png  DIR/dog/x.jpg ...                    one pool; the validation split is drawn
    DIR/train/cat/.. DIR/val/cat/.. DIR/test/cat/..       fixed splits (val/ and test/ optional)

Class names are the folder names, sorted. PNG, JPEG, BMP, GIF (its first frame) and WebP are
decoded by Pillow, in a thread pool (Pillow releases the GIL while it decodes), once: the uint8
array is cached (cache.py) and the next fit on the same files reads only that.

Sizes: with `image_size` (H, W) each image is centre-cropped to the aspect ratio H:W and resized
with Pillow's bilinear filter (which averages over the footprint when it shrinks); without it every
image must have the first image's size. `channels` 1 or 3 converts (luminance, or gray repeated);
without it the first image decides, and a colour image in a grayscale set is refused.

Bad files are refused with one line naming the file; with `skip_bad` they are counted and left
out: unreadable or truncated images, files that are no images, images over MAX_IMAGE_PIXELS
(decompression bombs: checked from the header, before anything is decoded), files larger than
an image of that many pixels could need, FIFOs and devices, symbolic link loops, and class
folders left empty. Hidden files (.DS_Store) and files beside the class folders are not looked at.
Memory: the listing keeps one short record per file; the pixels go straight into one array of
N x C x H x W bytes, checked against the memory a fit may use before it is allocated.
"""

from __future__ import annotations

import errno
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Callable

import numpy as np

from convtrain.errors import ConfigError, DataError

from .base import RawData, data_error, existing_dir
from .images import _palette_is_gray
from .limits import check_data_memory

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
# Larger than any photo a ConvNet trains on (a 50-megapixel camera gives 8,192 x 6,144), far below
# what exhausts memory: 64 M pixels x 4 bytes (RGBA) = 256 MB for one image while it decodes.
MAX_IMAGE_PIXELS = 64_000_000
# No image of MAX_IMAGE_PIXELS needs more bytes than its raw RGBA pixels plus headers: a larger
# file is padding or a trick, and is refused before Pillow reads it.
MAX_FILE_BYTES = MAX_IMAGE_PIXELS * 4 + (1 << 20)
_IMAGES_PER_TASK = 64  # a thread's unit of work: few futures even for 100,000 files
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
Progress = Callable[[int, int], None]  # (images decoded so far, images in all)


@dataclass(frozen=True)
class FolderOptions:
    """How a folder's images become one array: size (H, W) or None, channels 1, 3 or None,
    and whether bad files are skipped (counted) instead of refused."""

    image_size: tuple[int, int] | None = None
    channels: int | None = None
    skip_bad: bool = False
    progress: Progress | None = field(default=None, compare=False)

    @classmethod
    def from_settings(cls, image_size: str | None, channels: int | None, skip_bad: bool,
                      progress: Progress | None = None) -> "FolderOptions":
        return cls(parse_image_size(image_size), check_channels(channels), bool(skip_bad), progress)

    def key(self) -> dict:
        """What the decoded pixels depend on (the cache key's options)."""
        return {"image_size": list(self.image_size) if self.image_size else None, "channels": self.channels,
                "skip_bad": self.skip_bad}


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """'32x24' -> (32, 24) (height x width); '32' -> (32, 32); None -> None."""
    if text is None or text == "":
        return None
    parts = str(text).lower().split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1 or max(sizes) > 4096:
        raise ConfigError(f"image_size: got {text!r}, expected HxW in pixels (1..4096), e.g. 32x32")
    return sizes


def check_channels(channels) -> int | None:
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"channels: got {channels!r}, expected 1 (grayscale) or 3 (RGB)")
    return channels


@dataclass
class Listing:
    """What a folder holds: the image files in order, each with its class and split."""

    root: Path
    class_names: list[str]
    paths: list[str]  # relative to root
    labels: np.ndarray  # (N,) int64
    splits: np.ndarray  # (N,) int8: TRAIN, VAL or TEST
    fixed_splits: bool
    skipped: dict[str, int]  # problem kind -> files (or folders) left out while listing
    stats: list[tuple[int, int]]  # (size, mtime_ns) per file, for the cache key


class BadFiles:
    """The bad files of one read: the first one raised at once, or with skip_bad counted by kind."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts: dict[str, int] = {}

    def add(self, path, kind: str, problem: str) -> None:
        if not self.skip:
            raise data_error(path, problem + " (pass --skip-bad-images to leave such files out)")
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def describe(self) -> str:
        return describe_counts(self.counts)


def describe_counts(counts: dict[str, int]) -> str:
    """'2 non-image files, 1 unreadable image': what was skipped, by kind."""
    return ", ".join(f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in sorted(counts.items()))


def load_folder(path: str | Path | None, options: FolderOptions | None = None) -> RawData:
    """The folder's images as RawData (uint8 NCHW), from the cache when its files are unchanged."""
    from .folder_cache import read_cached, write_cache

    options = options or FolderOptions()
    bad = BadFiles(options.skip_bad)
    listing = list_folder(path, bad)
    cached = read_cached(listing, options)
    from_cache = cached is not None
    if from_cache:
        x, keep, decode_counts = cached
    else:
        x, keep = decode_all(listing, options, bad)
        decode_counts = {k: n - listing.skipped.get(k, 0) for k, n in bad.counts.items()
                         if n > listing.skipped.get(k, 0)}
    counts = dict(listing.skipped)
    for kind, n in decode_counts.items():
        counts[kind] = counts.get(kind, 0) + n
    labels, splits = listing.labels[keep], listing.splits[keep]
    class_names, labels, dropped = _drop_empty_classes(listing, labels, splits, options.skip_bad)
    if dropped:
        counts["empty class folder"] = counts.get("empty class folder", 0) + dropped
    if len(class_names) < 2:
        raise data_error(listing.root, f"needs at least 2 classes (one subfolder each), found "
                                       f"{len(class_names)}: {', '.join(class_names) or 'none'}")
    if not from_cache:
        write_cache(listing, options, x, keep, decode_counts)
    return _raw_data(listing, options, x, labels, splits, class_names, counts, from_cache)


def _raw_data(listing, options, x, labels, splits, class_names, counts, from_cache) -> RawData:
    pool = splits != TEST if not listing.fixed_splits else splits == TRAIN
    test = splits == TEST
    val = splits == VAL if listing.fixed_splits else None
    n, c, h, w = x.shape
    skipped = sum(counts.values())
    note = f", skipped {describe_counts(counts)}" if skipped else ""
    source = (f"{listing.root}: {n} images of {c}x{h}x{w}, {len(class_names)} classes"
              f"{', fixed train/val/test folders' if listing.fixed_splits else ''}"
              f"{note}{' (decoded pixels from the cache)' if from_cache else ''}")
    meta = {"image_size": list(options.image_size)} if options.image_size else {}
    if options.channels:
        meta["channels"] = options.channels
    if options.skip_bad:
        meta["skip_bad_images"] = True
    return RawData(x=_rows(x, pool), y=labels[pool], class_names=class_names, source=source,
                   x_test=_rows(x, test) if test.any() else None, y_test=labels[test] if test.any() else None,
                   x_val=_rows(x, val) if val is not None and val.any() else None,
                   y_val=labels[val] if val is not None and val.any() else None,
                   fit_encoder=_encoder(meta))


def _rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x if mask.all() else x[mask]


def _encoder(meta: dict):
    from .base import as_float32

    return lambda _x, _train_idx: (as_float32, dict(meta))


# ---- listing ------------------------------------------------------------------------------


def list_folder(path, bad: BadFiles) -> Listing:
    """The class folders and their image files, sorted; symbolic links followed, loops refused."""
    root = existing_dir(path, "a folder with one subfolder per class")
    top = _subfolders(root)
    fixed = "train" in top and set(top) <= set(SPLIT_FOLDERS)
    split_roots = [(root / name, SPLIT_FOLDERS.index(name)) for name in SPLIT_FOLDERS if name in top] \
        if fixed else [(root, TRAIN)]
    class_sets = {split: _subfolders(folder) for folder, split in split_roots}
    class_names = sorted(class_sets[TRAIN])
    for folder, split in split_roots:
        unknown = sorted(set(class_sets[split]) - set(class_names))
        if unknown:
            raise data_error(folder / unknown[0], "a class folder that train/ does not have")
    paths, labels, splits, stats = [], [], [], []
    for folder, split in split_roots:
        for label, name in enumerate(class_names):
            if name not in class_sets[split]:
                continue
            for relative, stat in _image_files(folder / name, root, bad):
                paths.append(relative)
                labels.append(label)
                splits.append(split)
                stats.append(stat)
    return Listing(root=root, class_names=class_names, paths=paths, labels=np.asarray(labels, dtype=np.int64),
                   splits=np.asarray(splits, dtype=np.int8), fixed_splits=fixed, skipped=dict(bad.counts),
                   stats=stats)


def _subfolders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))
    except OSError as exc:
        raise data_error(folder, f"cannot be listed ({exc.strerror or exc})") from None


def _is_dir(entry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _image_files(class_folder: Path, root: Path, bad: BadFiles):
    """(path relative to root, (size, mtime_ns)) of every image under class_folder, in name order.
    Directories are entered once each (by device and inode), so a link back up is a loop."""
    seen: set[tuple[int, int]] = set()
    pending = [class_folder]
    while pending:
        folder = pending.pop()
        try:
            info = folder.stat()
        except OSError as exc:
            bad.add(folder, "unreadable folder", f"cannot be read ({exc.strerror or exc})")
            continue
        if (info.st_dev, info.st_ino) in seen:
            bad.add(folder, "symbolic link loop", "a symbolic link loop (this folder is already being read)")
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(folder) as scan:
                entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as exc:
            bad.add(folder, "unreadable folder", f"cannot be listed ({exc.strerror or exc})")
            continue
        subfolders = []
        prefix = os.path.relpath(folder, root) + os.sep  # once per folder: relpath per file is slow
        for entry in entries:
            try:
                stat = entry.stat(follow_symlinks=True)
            except OSError as exc:
                kind = "symbolic link loop" if exc.errno == errno.ELOOP else "unreadable file"
                bad.add(entry.path, kind, "a symbolic link loop" if kind == "symbolic link loop"
                        else f"cannot be read ({exc.strerror or exc})")
                continue
            if entry.is_dir(follow_symlinks=True):
                subfolders.append(Path(entry.path))
            elif not S_ISREG(stat.st_mode):  # a FIFO would block the read, a device never end
                bad.add(entry.path, "special file", "not a regular file (a FIFO, socket or device)")
            elif not entry.name.lower().endswith(IMAGE_SUFFIXES):
                bad.add(entry.path, "non-image file", f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            else:
                yield prefix + entry.name, (stat.st_size, stat.st_mtime_ns)
        pending.extend(reversed(subfolders))


def _drop_empty_classes(listing: Listing, labels, splits, skip: bool):
    """Class names and relabelled labels without the classes that have no training images."""
    counts = np.bincount(labels[splits == TRAIN], minlength=len(listing.class_names))
    empty = [name for name, n in zip(listing.class_names, counts) if n == 0]
    if not empty:
        return listing.class_names, labels, 0
    folder = listing.root / ("train" if listing.fixed_splits else "") / empty[0]
    if not skip:
        raise data_error(folder, "an empty class folder: no images to train on (pass --skip-bad-images to "
                                 "leave such folders out)")
    kept = [i for i, n in enumerate(counts) if n > 0]
    remap = np.full(len(listing.class_names), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    new_labels = remap[labels]
    if (new_labels < 0).any():  # val/ or test/ images of a class train/ has none of
        raise data_error(folder, "an empty class folder in train/, while val/ or test/ has images of it")
    return [listing.class_names[i] for i in kept], new_labels, len(empty)


# ---- decoding -----------------------------------------------------------------------------


class BadImage(Exception):
    def __init__(self, kind: str, problem: str):
        super().__init__(problem)
        self.kind = kind


def decode_all(listing: Listing, options: FolderOptions, bad: BadFiles) -> tuple[np.ndarray, np.ndarray]:
    """(x (K, C, H, W) uint8, indices of the K listed files kept), decoded in a thread pool."""
    from PIL import Image

    n = len(listing.paths)
    if n == 0:
        raise data_error(listing.root, "no image files in the class folders "
                                       f"({', '.join(IMAGE_SUFFIXES)}){_skipped_note(bad)}")
    with warnings.catch_warnings():
        # the header check in decode_image refuses what is too large; Pillow's own warning
        # (at its higher limit) would only repeat it on stderr
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        first, reference = _reference_image(listing, options, bad)
        channels, height, width = reference.shape
        check_data_memory(listing.root, f"{n} images of {channels}x{height}x{width}", n * reference.size, 1)
        x = np.empty((n, channels, height, width), dtype=np.uint8)
        x[first] = reference
        good = np.zeros(n, dtype=bool)
        good[first] = True
        tasks = [range(start, min(start + _IMAGES_PER_TASK, n)) for start in range(first + 1, n, _IMAGES_PER_TASK)]
        done = first + 1
        if options.progress:
            options.progress(done, n)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            try:
                for results in pool.map(lambda rows: _decode_rows(listing, options, rows, x, reference.shape), tasks):
                    for index, error in results:
                        if isinstance(error, DataError):
                            raise error
                        if error is not None:
                            bad.add(listing.root / listing.paths[index], error.kind, str(error))
                        else:
                            good[index] = True
                    done += len(results)
                    if options.progress:
                        options.progress(done, n)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    keep = np.flatnonzero(good)
    return _compact(x, keep), keep


def _skipped_note(bad: BadFiles) -> str:
    return f"; skipped {bad.describe()}" if bad.counts else ""


def _reference_image(listing: Listing, options: FolderOptions, bad: BadFiles) -> tuple[int, np.ndarray]:
    """The first image that decodes: its index and pixels set the channels and size of the rest."""
    for index, relative in enumerate(listing.paths):
        try:
            return index, decode_image(listing.root / relative, options, None)
        except BadImage as error:
            bad.add(listing.root / relative, error.kind, str(error))
    raise data_error(listing.root, f"no readable images{_skipped_note(bad)}")


def _decode_rows(listing, options, rows, x, shape) -> list[tuple[int, Exception | None]]:
    """Decode files `rows` into x[rows]; per row None, a BadImage, or a DataError (another size)."""
    results = []
    for index in rows:
        path = listing.root / listing.paths[index]
        try:
            pixels = decode_image(path, options, shape[0])
        except BadImage as error:
            results.append((index, error))
            continue
        if pixels.shape != shape:
            c, h, w = pixels.shape
            results.append((index, data_error(
                path, f"is {h}x{w} with {c} channel(s), but the first image {listing.paths[0]} is "
                      f"{shape[1]}x{shape[2]} with {shape[0]}; pass --image-size HxW to resize them all")))
            break
        x[index] = pixels
        results.append((index, None))
    return results


def decode_image(path: Path, options: FolderOptions, channels: int | None) -> np.ndarray:
    """One image file as uint8 (C, H, W), converted and resized as `options` say; BadImage if not
    readable. `channels` (of the data set so far) is what a file without options.channels becomes."""
    from PIL import Image, ImageOps

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage("unreadable file", f"cannot be read ({exc.strerror or exc})") from None
    if size > MAX_FILE_BYTES:
        raise BadImage("oversized file", f"{size} bytes, more than an image of {MAX_IMAGE_PIXELS} pixels needs")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadImage("decompression bomb", f"a decompression bomb: {width}x{height} pixels, more than "
                                                     f"the {MAX_IMAGE_PIXELS} allowed")
            gray = image.mode in _GRAY_MODES or (image.mode == "P" and _palette_is_gray(image))
            want = options.channels or channels or (1 if gray else 3)
            if want == 1 and not gray and not options.channels:
                raise BadImage("grayscale-set colour image",
                               "a colour image, but the first image is grayscale; pass --channels 1 or 3")
            image = image.convert("L" if want == 1 else "RGB")
            if options.image_size:
                h, w = options.image_size
                image = ImageOps.fit(image, (w, h), method=Image.BILINEAR, centering=(0.5, 0.5))
            pixels = np.asarray(image, dtype=np.uint8)
    except BadImage:
        raise
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage("decompression bomb", f"a decompression bomb ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a hostile file makes Pillow raise is a bad file
        raise BadImage("unreadable image", f"not a readable image ({type(exc).__name__}: {exc})") from None
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _compact(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """x[keep] without a second copy of the array: rows moved forward in place."""
    if len(keep) == len(x):
        return x
    for target, source in enumerate(keep):
        if target != source:
            x[target] = x[source]
    return x[:len(keep)]


def images_in(folder: str | Path) -> list[Path]:
    """The image files under `folder` (for `convtrain predict DIR`), in name order; loops refused."""
    bad = BadFiles(skip=True)
    root = existing_dir(folder, "a folder of images")
    files = [root / relative for relative, _ in _image_files(root, root, bad)]
    if not files:
        raise data_error(root, f"no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files
