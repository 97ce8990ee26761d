"""The decoded pixels of an image folder, kept so the next fit on the same files skips decoding.

Where: $CONVTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/convtrain/images, else ~/.cache/convtrain/images,
never beside the data (which may be read-only or shared). One .npz per folder and options:

    <sha256(folder, options)[:16]>-<sha256(key)[:24]>.npz   x (K, C, H, W) uint8, keep (K,) int64,
                                                             key, skipped (JSON)

The key is a SHA-256 over the format version, the folder, the options and, per listed file, its
relative path, class, split, size and mtime (ns): a file added, removed, renamed, rewritten or
touched gives another key. Writing a new cache of a folder removes its older ones. Writes are
atomic (temp file + rename). A cache file is data like any other: its headers are checked
before anything is allocated (nn/npz_members.py), and one that is damaged, truncated, of another
key or of the wrong shapes is ignored and rebuilt, never trusted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

CACHE_FORMAT = "convtrain-image-cache-1"
CACHE_DIR_VARIABLE = "CONVTRAIN_CACHE_DIR"


def cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_VARIABLE):
        return Path(os.environ[CACHE_DIR_VARIABLE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convtrain" / "images"


def cache_path(listing, options) -> tuple[Path, str]:
    """The cache file for this listing and these options, and the key it must hold."""
    folder = hashlib.sha256(json.dumps([str(listing.root), options.key()]).encode()).hexdigest()[:16]
    key = _key(listing, options)
    return cache_dir() / f"{folder}-{key[:24]}.npz", key


def _key(listing, options) -> str:
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, str(listing.root), options.key(), listing.class_names,
                                        listing.fixed_splits]).encode())
    for path, label, split, (size, mtime) in zip(listing.paths, listing.labels.tolist(), listing.splits.tolist(),
                                                 listing.stats):
        digest.update(f"\0{path}\0{label}\0{split}\0{size}\0{mtime}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def read_cached(listing, options):
    """(x, keep, skipped counts) from the cache, or None when there is none that can be trusted."""
    from convtrain.nn import npz_members

    path, key = cache_path(listing, options)
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            claims = {k: npz_members.claim(archive, k, size) for k in npz_members.array_keys(archive)}
            if set(claims) != {"x", "keep", "key", "skipped"} or not _plausible(claims, listing, options):
                return None
            text = npz_members.read(archive, claims["key"])
            if str(text) != key:
                return None
            keep = npz_members.read(archive, claims["keep"])
            if not _valid_rows(keep, len(listing.paths)):
                return None
            skipped = json.loads(str(npz_members.read(archive, claims["skipped"])))
            if not isinstance(skipped, dict) or not all(isinstance(v, int) for v in skipped.values()):
                return None
            x = npz_members.read(archive, claims["x"])
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, KeyError):
        # npz_members.MemberRefused is a ValueError; a missing file is an OSError
        return None
    return x, keep, skipped


def _plausible(claims, listing, options) -> bool:
    """The headers' shapes fit this listing, before any array is read."""
    x, keep = claims["x"], claims["keep"]
    if x.dtype != np.uint8 or len(x.shape) != 4 or x.fortran_order:
        return False
    rows, channels, height, width = x.shape
    if keep.dtype != np.int64 or keep.shape != (rows,) or not 0 < rows <= len(listing.paths):
        return False
    if options.channels and channels != options.channels or channels not in (1, 3):
        return False
    if options.image_size and (height, width) != tuple(options.image_size):
        return False
    return claims["key"].dtype.kind == "U" and claims["key"].shape == () \
        and claims["skipped"].dtype.kind == "U" and claims["skipped"].shape == ()


def _valid_rows(keep: np.ndarray, n: int) -> bool:
    return bool(keep.size and keep[0] >= 0 and keep[-1] < n and (np.diff(keep) > 0).all())


def write_cache(listing, options, x: np.ndarray, keep: np.ndarray, skipped: dict) -> Path | None:
    """Write the cache (atomically) and remove this folder's older ones; None if it cannot be
    written (a read-only home, a full disk): the fit goes on, it only decodes again next time."""
    from convtrain.nn.npz_files import write_npz_atomic

    path, key = cache_path(listing, options)
    try:
        write_npz_atomic(path, {"x": x, "keep": np.asarray(keep, dtype=np.int64), "key": np.array(key),
                                "skipped": np.array(json.dumps(skipped))})
    except OSError:
        return None
    prefix = path.name.split("-")[0]
    for older in path.parent.glob(f"{glob.escape(prefix)}-*.npz"):
        if older != path:
            try:
                older.unlink()
            except OSError:
                pass
    return path
