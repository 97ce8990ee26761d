"""The .npy members of an .npz, read without taking their headers on trust.

An .npz is a zip of .npy files. numpy allocates the whole array an .npy header declares and only
then reads into it, so a header of a hundred bytes can ask for terabytes. Here a member's claim is
checked first (`claim`): the member must be stored or deflated (as numpy writes them), the
declared bytes what its zip entry holds, the entry no more than its compressed bytes can (or
plausibly do) expand to, and those no more than the file itself. `read` then
decompresses exactly the declared bytes, never past the end of the entry, so a member that
inflates further costs no more than its header said (and fails its checksum).

The one reader of .npz members for saved models, checkpoints (nn/npz_files.py) and data sets
(data/npz.py). A refusal is a MemberRefused naming the array and the sizes; each caller puts
its file's name and its own error type around it, and checks memory against its own budget.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from convtrain.nn.footprint import format_bytes

# Deflate cannot shrink data by more than about 1032:1, so a zip entry declaring more is lying.
DEFLATE_MAX_RATIO = 1032
# Up to that bound, a few MB of deflate stream still inflate to gigabytes of zeros. Arrays worth
# keeping do not compress like that (images about 2-10:1, weights hardly at all): a deflated
# member may expand past PLAIN_ALLOWANCE only up to PLAUSIBLE_RATIO, a larger one is refused from
# its headers with the advice to store it uncompressed.
PLAUSIBLE_RATIO = 100
PLAIN_ALLOWANCE = 64 * 1024 * 1024
# numpy writes stored (np.savez) and deflated (np.savez_compressed) members only. bzip2 and LZMA
# members are refused before they are opened: their ratio has no useful bound (a few hundred
# bytes of bzip2 make gigabytes), and zipfile decompresses each chunk of them without a cap.
NUMPY_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
OTHER_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}
_CHUNK = 1 << 20  # bytes decompressed per read


class MemberRefused(ValueError):
    """A member that claims more than it holds, or cannot be read; the message is one line."""


@dataclass(frozen=True)
class Claim:
    """What a member's .npy header declares, checked against its zip entry."""

    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    header_size: int

    @property
    def values(self) -> int:
        return math.prod(int(size) for size in self.shape)

    @property
    def nbytes(self) -> int:
        return self.values * self.dtype.itemsize

    def describe(self) -> str:
        return f"array {self.key!r} of shape {tuple(self.shape)} {self.dtype} ({format_bytes(self.nbytes)})"


def array_keys(archive: zipfile.ZipFile) -> list[str]:
    """The arrays of an .npz: its .npy members' names without the suffix, as numpy names them."""
    return [name[:-len(".npy")] for name in archive.namelist() if name.endswith(".npy")]


def claim(archive: zipfile.ZipFile, key: str, file_size: int) -> Claim:
    """Read only the .npy header of member `key` and check it; `file_size` is the whole .npz's
    size on disk. Object arrays are refused here: only unpickling reads them."""
    try:
        info = archive.getinfo(f"{key}.npy")
    except KeyError as exc:
        raise MemberRefused(f"array {key!r} is unreadable ({exc})") from None
    if info.compress_type not in NUMPY_METHODS:
        method = OTHER_METHODS.get(info.compress_type, f"unknown ({info.compress_type})")
        raise MemberRefused(f"array {key!r} uses the {method} compression method ({format_bytes(info.compress_size)} "
                            f"declaring {format_bytes(info.file_size)}), which numpy never writes; "
                            "save it with np.savez or np.savez_compressed")
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(member)
            header_size = member.tell()
    except (ValueError, KeyError, OSError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as exc:
        raise MemberRefused(f"array {key!r} is unreadable ({exc})") from None
    if dtype.hasobject:
        raise MemberRefused(f"array {key!r} holds pickled objects, refused (dtype=object: only unpickling, "
                            "which can run code, reads it; store plain numeric or string arrays)")
    found = Claim(key, info, tuple(shape), dtype, bool(fortran_order), header_size)
    held = info.file_size - header_size
    if found.nbytes != held:
        raise MemberRefused(f"declares {found.describe()}, but its entry holds {format_bytes(max(held, 0))}")
    if info.compress_size > file_size:
        raise MemberRefused(f"declares {found.describe()} in {format_bytes(info.compress_size)} of compressed "
                            f"data, more than the whole file ({format_bytes(file_size)})")
    expands_to = info.compress_size if info.compress_type == zipfile.ZIP_STORED \
        else info.compress_size * DEFLATE_MAX_RATIO if info.compress_type == zipfile.ZIP_DEFLATED else None
    if expands_to is not None and info.file_size > expands_to:
        raise MemberRefused(f"declares {found.describe()}, more than its {format_bytes(info.compress_size)} of "
                            "compressed data can hold")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > PLAIN_ALLOWANCE \
            and info.file_size > info.compress_size * PLAUSIBLE_RATIO:
        raise MemberRefused(f"declares {found.describe()} in {format_bytes(info.compress_size)} of deflate data, "
                            f"more than {PLAUSIBLE_RATIO}:1, which no real array compresses to (a zip bomb?); "
                            "store large arrays uncompressed (np.savez)")
    return found


def read(archive: zipfile.ZipFile, found: Claim) -> np.ndarray:
    """The array of a checked member: exactly its declared bytes, decompressed a chunk at a time
    into the array itself, and proof that the entry ends there (zipfile checks its CRC)."""
    buffer = np.empty(found.nbytes, np.uint8)
    view = memoryview(buffer)
    try:
        with archive.open(found.info) as member:
            member.read(found.header_size)
            done = 0
            while done < found.nbytes:
                chunk = member.read(min(_CHUNK, found.nbytes - done))
                if not chunk:
                    break
                view[done:done + len(chunk)] = chunk
                done += len(chunk)
            more = member.read(1)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise MemberRefused(f"array {found.key!r} is truncated or corrupt ({exc})") from None
    if done < found.nbytes or more:
        raise MemberRefused(f"array {found.key!r} decompresses to {'fewer' if done < found.nbytes else 'more'} "
                            f"than the {format_bytes(found.nbytes)} its header declares")
    if found.dtype.itemsize == 0:
        return np.empty(found.shape, found.dtype)
    return buffer.view(found.dtype).reshape(found.shape, order="F" if found.fortran_order else "C")
