"""Surnames labelled by language (DD2424's ConvNet assignment), as one-hot "images".

A name becomes a (1, d, n_len) array: one row per letter of the alphabet (d letters, learnt from
the training names), one column per position (n_len, the longest name), a 1 where letter meets
position and zeros after the end of the name. A first conv layer of kernel (d, k) then spans
the whole alphabet, exactly the assignment's full-height filter.

Two layouts are read:
- a directory of <Language>.txt files, one name per line (the PyTorch tutorial data);
- DD2424's own files: ascii_names.txt ("<name> <class>"), category_labels.txt ("<class> <Language>")
  and Validation_Inds.txt, the course's held-out names. Those are returned as the test set, so
  the reported test numbers compare with the course's, while val_fraction carves a validation
  set from the rest exactly as for every other data set (val_fraction=0 trains on all the rest).

The encoding is not standardized (RawData.standardize is False): it already is on a fixed 0/1
scale, and with a single channel, standardizing would turn every empty cell ("no letter here",
including the columns after the end of a name and any zero padding of a conv layer) into
-mean/std, about -0.2, and each letter into about +5. On DD2424's held-out names the raw
one-hot input trained better (the measurements are in experiments/fit-names.toml).
"""

from __future__ import annotations

import re
import unicodedata
from functools import partial
from pathlib import Path

import numpy as np

from .base import RawData, data_error, existing_dir
from .limits import MAX_ALPHABET, MAX_NAME_LENGTH, check_data_memory

DD2424_NAMES = "ascii_names.txt"
DD2424_CLASSES = "category_labels.txt"
DD2424_HELD_OUT = "Validation_Inds.txt"

# Class numbers and indices: ASCII digits only ("²".isdigit() is true, int("²") fails), and
# few enough of them to be an index at all (int() refuses over 4,300 digits, int64 over 18).
_NUMBER = re.compile(r"[0-9]{1,18}")

# Letters that Unicode does not decompose into an ASCII base letter plus accents.
_UNDECOMPOSABLE = str.maketrans({"ß": "ss", "ł": "l", "ø": "o", "æ": "ae", "œ": "oe",
                                 "đ": "d", "ð": "d", "þ": "th", "ı": "i"})


def normalize_name(name: str) -> str:
    """Lowercase ASCII spelling of a name: 'Groß' -> 'gross', 'Ñáñez' -> 'nanez'.

    NFKD rather than NFD so that compatibility characters fold too (a no-break space becomes
    a space). Characters with no ASCII form are kept; the alphabet decides what is used.
    """
    decomposed = unicodedata.normalize("NFKD", name.strip().lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).translate(_UNDECOMPOSABLE)


def encode_names(names: list[str], alphabet: str, max_len: int) -> np.ndarray:
    """(N, 1, len(alphabet), max_len) float32 one-hot of the normalized names.

    Letters outside the alphabet leave their column empty (keeping the positions of the
    others); names longer than max_len are cut to max_len letters.
    """
    row_of = {letter: row for row, letter in enumerate(alphabet)}
    which, rows, columns = [], [], []
    for n, name in enumerate(names):
        for column, letter in enumerate(normalize_name(name)[:max_len]):
            row = row_of.get(letter)
            if row is not None:
                which.append(n)
                rows.append(row)
                columns.append(column)
    encoded = np.zeros((len(names), 1, len(alphabet), max_len), dtype=np.float32)
    encoded[which, 0, rows, columns] = 1.0
    return encoded


# A names model carries its encoding in the network's meta: these keys, written by the
# encoder below and read back only through the functions after it.
ALPHABET_KEY = "alphabet"
MAX_LEN_KEY = "max_len"


def is_names_model(meta: dict | None) -> bool:
    """Whether a network's meta says it reads one-hot names (so predict encodes names)."""
    return ALPHABET_KEY in (meta or {})


def names_meta_problem(meta: dict) -> str | None:
    """What is wrong with a names model's encoding in `meta` (a user may edit it), or None."""
    if not is_names_model(meta):
        return None
    alphabet, max_len = meta.get(ALPHABET_KEY), meta.get(MAX_LEN_KEY)
    if not isinstance(alphabet, str) or (max_len is not None and (
            isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1)):
        return (f"meta 'alphabet' must be a string and 'max_len' a positive whole number, "
                f"got {alphabet!r:.40} and {max_len!r:.20}")
    return None


def encode_names_as_trained(meta: dict | None, names: list[str]) -> np.ndarray:
    """One-hot encode `names` with the alphabet and length a names model was trained on (its meta)."""
    if not is_names_model(meta):
        raise ValueError("this model was not trained on names: pass images as (N, C, H, W) arrays")
    return encode_names(names, meta[ALPHABET_KEY], meta[MAX_LEN_KEY])


def fit_name_encoder(max_len: int, directory: Path | str = "names"):
    """RawData.fit_encoder for names: the alphabet is every letter of the training names.

    The alphabet and the longest name size the one-hot encoding (N x letters x positions), so
    both are bounded, and the encoding must fit in memory, before it is allocated.
    """
    def fit(names: np.ndarray, train_idx: np.ndarray):
        alphabet = "".join(sorted(set("".join(names[train_idx].tolist()))))
        if len(alphabet) > MAX_ALPHABET:
            raise data_error(directory, f"the training names use {len(alphabet)} different letters, more than "
                                        f"the {MAX_ALPHABET} an alphabet may have")
        check_data_memory(directory, f"{len(names)} names of up to {max_len} letters from an alphabet of "
                                     f"{len(alphabet)}", len(names) * len(alphabet) * max_len, 0)
        encode = partial(encode_names, alphabet=alphabet, max_len=max_len)
        return encode, {ALPHABET_KEY: alphabet, MAX_LEN_KEY: max_len}
    return fit


def load_names(path: str | Path | None) -> RawData:
    directory = existing_dir(path, "<Language>.txt files, or DD2424's ascii_names.txt")
    if (directory / DD2424_NAMES).is_file():
        return _load_dd2424(directory)
    files = sorted((p for p in directory.glob("*.txt") if p.is_file()), key=lambda p: p.stem)
    if not files:
        raise data_error(directory, f"no <Language>.txt files and no {DD2424_NAMES}")
    names, labels = [], []
    for label, file in enumerate(files):
        lines = _read_lines(file)
        if not lines:
            raise data_error(file, "empty file (no names)")
        normalized = [normalize_name(line) for line in lines]
        for number, name in enumerate(normalized, start=1):
            _check_name_length(file, number, name)
        names += normalized
        labels += [label] * len(lines)
    source = (f"{directory}: {len(files)} language files {files[0].name}..{files[-1].name} "
              f"({len(names)} names)")
    return _raw_names(names, labels, [file.stem for file in files], source, directory=directory)


def _load_dd2424(directory: Path) -> RawData:
    class_names = _read_class_names(directory / DD2424_CLASSES)
    names_path = directory / DD2424_NAMES
    names, labels = [], []
    for number, line in enumerate(_read_lines(names_path, keep_blank=True), start=1):
        if not line:
            continue
        # Names may contain spaces ("De La Cruz 17"): the class is after the last one.
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not _NUMBER.fullmatch(parts[1]):
            raise data_error(names_path, f"line {number}: {line[:60]!r} is not '<name> <class number>'")
        names.append(normalize_name(parts[0]))
        _check_name_length(names_path, number, names[-1])
        labels.append(int(parts[1]) - 1)
    if not names:
        raise data_error(names_path, "empty file (no names)")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= len(class_names):
        bad = int(labels.min() if labels.min() < 0 else labels.max()) + 1
        raise data_error(names_path, f"class {bad} out of range, {DD2424_CLASSES} has 1..{len(class_names)}")

    held_out_path = directory / DD2424_HELD_OUT
    if not held_out_path.is_file():
        source = f"{directory}: {DD2424_NAMES} ({len(names)} names); no {DD2424_HELD_OUT}, no test set"
        return _raw_names(names, labels, class_names, source, directory=directory)
    held_out = _read_held_out(held_out_path, len(names))
    if len(held_out) == len(names):
        raise data_error(held_out_path, f"holds out all {len(names)} names of {DD2424_NAMES}, "
                                        "leaving none to train on")
    is_held_out = np.zeros(len(names), dtype=bool)
    is_held_out[held_out] = True
    names = np.asarray(names)
    source = (f"{directory}: {DD2424_NAMES} ({len(names)} names); the {len(held_out)} names of "
              f"{DD2424_HELD_OUT} held out as the test set")
    return _raw_names(names[~is_held_out], labels[~is_held_out], class_names, source,
                      names[is_held_out], labels[is_held_out], directory=directory)


def _raw_names(names, labels, class_names, source, test_names=None, test_labels=None, *,
               directory: Path) -> RawData:
    names = list(names)
    test_names = None if test_names is None else list(test_names)
    longest = max([*names, *(test_names or [])], key=len)
    names = np.asarray(names, dtype=str)
    if test_names is not None:
        test_names = np.asarray(test_names, dtype=str)
    return RawData(x=names, y=np.asarray(labels, dtype=np.int64), class_names=class_names, source=source,
                   x_test=test_names,
                   y_test=None if test_labels is None else np.asarray(test_labels, dtype=np.int64),
                   fit_encoder=fit_name_encoder(len(longest), directory), standardize=False)


def _check_name_length(path: Path, number: int, name: str) -> None:
    """The longest name sizes every row of the one-hot encoding (and of numpy's string arrays
    of the names): refuse an absurd one before any array is made."""
    if len(name) > MAX_NAME_LENGTH:
        raise data_error(path, f"line {number}: a name of {len(name)} characters, more than the "
                               f"{MAX_NAME_LENGTH} a name may have")


def _read_class_names(path: Path) -> list[str]:
    numbered = {}
    for number, line in enumerate(_read_lines(path), start=1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not _NUMBER.fullmatch(parts[0]):
            raise data_error(path, f"line {number}: {line!r} is not '<class number> <language>'")
        numbered[int(parts[0])] = parts[1].strip()
    if not numbered:
        raise data_error(path, "empty file (no classes)")
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise data_error(path, f"class numbers {sorted(numbered)} are not 1..{len(numbered)}")
    return [numbered[number] for number in range(1, len(numbered) + 1)]


def _read_held_out(path: Path, count: int) -> np.ndarray:
    tokens = " ".join(_read_lines(path)).split()
    if not tokens:
        raise data_error(path, "empty file (no indices)")
    if not all(_NUMBER.fullmatch(token) for token in tokens):
        bad = next(token for token in tokens if not _NUMBER.fullmatch(token))
        raise data_error(path, f"{bad!r} is not an index")
    rows = np.asarray([int(token) for token in tokens], dtype=np.int64) - 1  # the indices are 1-based
    if rows.min() < 0 or rows.max() >= count:
        bad = int(rows.min() if rows.min() < 0 else rows.max()) + 1
        raise data_error(path, f"index {bad} out of range, {DD2424_NAMES} has names 1..{count}")
    if len(np.unique(rows)) != len(rows):
        raise data_error(path, "repeats an index")
    return rows


def _read_lines(path: Path, keep_blank: bool = False) -> list[str]:
    """Stripped lines of a UTF-8 text file (blank ones dropped unless keep_blank)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise data_error(path, f"cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise data_error(path, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    lines = [line.strip() for line in text.splitlines()]
    return lines if keep_blank else [line for line in lines if line]
