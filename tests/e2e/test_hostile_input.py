"""Broken and hostile input through the `convtrain` command: one line, non-zero, nothing written.

Each case of the table builds its bad input in an empty folder, runs the command there (MLflow
tracking on, to its default SQLite file in that folder) and checks that

  - the exit code is not 0,
  - stderr is exactly one line, "error: ..." naming the problem, and stdout is empty,
  - there is no traceback,
  - not one file in the folder was created, changed or removed: no mlflow.db (so no run), no
    runs/ or --out folder, no checkpoint touched, no canary from a pickle.

A full disk while a checkpoint is written, divergence and float32 overflow are tests of their own
below the table (they happen after training has legitimately started).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.support.cli import TINY, free_port, invoke



def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with a digest of its bytes."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        state[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_one_line_error(result, fragment: str) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


# ---- building bad files -------------------------------------------------------------------------

def idx_bytes(magic: int, sizes: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">{1 + len(sizes)}I", magic, *sizes) + payload


def mnist_folder(folder: Path, *, images: bytes | None = None, labels: bytes | None = None,
                 gz: bool = False, count: int = 40, label_count: int | None = None) -> Path:
    """train-images/labels IDX files of `count` 8x8 images, with `images`/`labels` bytes swapped in."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    good_images = idx_bytes(2051, (count, 8, 8), rng.integers(0, 256, count * 64, dtype=np.uint8).tobytes())
    label_count = count if label_count is None else label_count
    good_labels = idx_bytes(2049, (label_count,), (np.arange(label_count) % 10).astype(np.uint8).tobytes())
    for name, data in (("train-images-idx3-ubyte", good_images if images is None else images),
                       ("train-labels-idx1-ubyte", good_labels if labels is None else labels)):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0) if not data.startswith(b"\x1f\x8b")
                                                else data)
        else:
            (folder / name).write_bytes(data)
    return folder


def good_idx_images(count: int = 40) -> bytes:
    return idx_bytes(2051, (count, 8, 8), bytes(count * 64))


def mnist(**kwargs) -> Callable[[Path], list]:
    def setup(tmp: Path) -> list:
        mnist_folder(tmp / "mnist", **kwargs)
        return ["fit", "--data", "mnist", "--data-path", "mnist", *TINY]
    return setup


def npz(**arrays) -> Callable[[Path], list]:
    def setup(tmp: Path) -> list:
        np.savez(tmp / "data.npz", **{k: v() if callable(v) else v for k, v in arrays.items()})
        return ["fit", "--data", "npz", "--data-path", "data.npz", *TINY]
    return setup


def npz_bytes(make: Callable[[Path], bytes]) -> Callable[[Path], list]:
    def setup(tmp: Path) -> list:
        (tmp / "data.npz").write_bytes(make(tmp))
        return ["fit", "--data", "npz", "--data-path", "data.npz", *TINY]
    return setup


def images(n=20, shape=(1, 8, 8)):
    return np.random.default_rng(0).integers(0, 255, (n, *shape)).astype(np.float32)


class RunsACommand:
    """Unpickling this calls os.system(command): what a hostile CIFAR batch would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def cifar(batch: Callable[[Path], bytes]) -> Callable[[Path], list]:
    def setup(tmp: Path) -> list:
        folder = tmp / "cifar-10-batches-py"
        folder.mkdir()
        (folder / "data_batch_1").write_bytes(batch(tmp))
        return ["fit", "--data", "cifar10", "--data-path", folder, *TINY]
    return setup


def cifar_batch(n_images=10, n_labels=10) -> bytes:
    data = np.zeros((n_images, 3 * 32 * 32), dtype=np.uint8)
    return pickle.dumps({b"data": data, b"labels": list(range(n_labels))}, protocol=4)


def numpy_global_pickle(_tmp) -> bytes:
    # protocol-0 opcodes: GLOBAL numpy.load, then call it with a file name
    return b"cnumpy\nload\n(S'/etc/hostname'\ntR."


def stored_tracking(uri: str) -> Callable[[Path], None]:
    """A hand-edited checkpoint whose MLflow run is in the store at `uri`."""
    def damage(folder: Path) -> None:
        import json

        from convtrain.nn.npz_files import json_entry
        from convtrain.training.checkpoint import TrainingCheckpoint

        checkpoint = TrainingCheckpoint.load(folder / "checkpoint.npz")
        callbacks = json.loads(str(checkpoint.arrays["callbacks"][()]))
        callbacks["mlflow"] = {"run_id": "0" * 32, "experiment_id": "1", "tracking_uri": uri}
        checkpoint.arrays["callbacks"] = json_entry(callbacks)
        checkpoint.save(folder / "checkpoint.npz")
    return damage


def with_model(make_args: Callable[[Path], list], damage: Callable[[Path], None] | None = None):
    """Copy the trained fit's folder into the case folder (damaged if asked) before the command."""
    def setup(tmp: Path, trained: Path) -> list:
        shutil.copytree(trained, tmp / "out")
        if damage is not None:
            damage(tmp / "out")
        return make_args(tmp)
    setup.needs_model = True
    return setup


def truncate(name: str):
    def damage(out: Path):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[:len(data) // 2])
    return damage


def write(name: str, text: str, *args) -> Callable[[Path], list]:
    def setup(tmp: Path) -> list:
        (tmp / name).write_text(text)
        return list(args)
    return setup


def flags(*args) -> Callable[[Path], list]:
    return lambda tmp: list(args)


# ---- files that claim more than they hold (docs/reliability.md, size limits) -------------------

class Declares:
    """Pickles as numpy's _reconstruct(ndarray, shape, dtype): an array of any declared shape,
    allocated by the unpickler, from a pickle of a few hundred bytes."""

    def __init__(self, shape, dtype="u1"):
        self.shape, self.dtype = shape, dtype

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return _reconstruct, (np.ndarray, self.shape, self.dtype)


class ArrayState:
    """Pickles as numpy does an array: _reconstruct(ndarray, (0,), b'b'), then BUILD with
    (version, shape, dtype, fortran, data), here with any shape, dtype and data."""

    def __init__(self, shape, dtype, data):
        self.state = (1, shape, dtype, False, data)

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return _reconstruct, (np.ndarray, (0,), b"b"), self.state


class Calls:
    """Pickles as callable(*args), whatever the args are (another call, for one)."""

    def __init__(self, callable_, *args):
        self.callable, self.args = callable_, args

    def __reduce__(self):
        return self.callable, self.args


def cifar_of(data, labels=(0,)) -> Callable[[Path], list]:
    return cifar(lambda tmp: pickle.dumps({b"data": data, b"labels": list(labels)}, protocol=3))


def _nested_reconstruct():
    from numpy._core.multiarray import _reconstruct
    return Calls(_reconstruct, np.ndarray, Calls(_reconstruct, np.ndarray, (0,), b"b"), b"b")


def _npz_declaring_terabytes(_tmp) -> bytes:
    """About 300 bytes whose x.npy header declares (1600000, 1, 1000, 1000) float32: 5.8 TiB."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1_600_000, 1, 1000, 1000)})
    labels = io.BytesIO()
    np.save(labels, np.arange(4))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(16))
        archive.writestr("y.npy", labels.getvalue())
    return out.getvalue()


def _gzip_inflating_past_its_header() -> bytes:
    """An IDX header declaring 40 images of 8x8, then 32 MB of zeros, gzipped (about 32 KB)."""
    import io

    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as stream:
        stream.write(good_idx_images()[:16])
        for _ in range(32):
            stream.write(bytes(1 << 20))
    return out.getvalue()


def names_folder(**files: str) -> Callable[[Path], list]:
    def setup(tmp: Path) -> list:
        (tmp / "names").mkdir()
        for name, text in files.items():
            (tmp / "names" / name).write_text(text, encoding="utf-8")
        return ["fit", "--data", "names", "--data-path", "names", "--filters", "4", "--epochs", "1",
                "--batch-size", "2", "--kernel-sizes", "1"]
    return setup


def dd2424(names: str, held_out: str | None = None, classes: str = "1 Arabic\n2 Chinese\n"):
    files = {"ascii_names.txt": names, "category_labels.txt": classes}
    if held_out is not None:
        files["Validation_Inds.txt"] = held_out
    return names_folder(**files)


def nested(depth: int):
    value = [0]
    for _ in range(depth):
        value = [value]
    return value


def tamper_model(key: str, value):
    """Replace the JSON entry `key` of out/model.npz (what a hand-edited model looks like)."""
    import json

    def damage(out: Path):
        with np.load(out / "model.npz") as archive:
            arrays = {name: archive[name] for name in archive.files}
        entry = json.loads(str(arrays[key][()]))
        arrays[key] = np.array(json.dumps(value(entry) if callable(value) else value))
        np.savez(out / "model.npz", **arrays)
    return damage


def evaluate_tampered(key: str, value):
    return with_model(lambda tmp: ["evaluate", "out/model.npz"], tamper_model(key, value))


def set_entry(name: str, key: str, value):
    """Replace entry `key` of out/`name` by `value` (an array, or a str stored as a 0-d text entry,
    the way JSON and TOML entries are)."""
    def damage(out: Path):
        with np.load(out / name) as archive:
            arrays = {entry: archive[entry] for entry in archive.files}
        arrays[key] = np.array(value) if isinstance(value, str) else value
        np.savez(out / name, **arrays)
    return damage


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_toml_array(key: str, depth: int) -> str:
    return f"{key} = " + "[" * depth + "1" + "]" * depth + "\n"


def deep_inline_table(depth: int) -> str:
    return "[optim]\nlr = " + "{a = " * depth + "1" + "}" * depth + "\n"


def float64_beyond_float32():
    x = images().astype(np.float64)
    x[3, 0, 2, 2] = 1e300  # finite in float64, infinite once cast to the float32 a fit trains in
    return x


def _psycopg_missing() -> bool:
    import importlib.util
    return importlib.util.find_spec("psycopg") is None


# ---- the table ------------------------------------------------------------------------------------

@dataclass
class Case:
    setup: Callable
    fragment: str  # in the error line


def _truncated_gzip(_tmp):
    return gzip.compress(good_idx_images(), mtime=0)[:-30]


def _corrupt_gzip(_tmp):
    data = bytearray(gzip.compress(np.random.default_rng(1).integers(0, 255, 4096, dtype=np.uint8).tobytes()
                                   + good_idx_images(), mtime=0))
    for i in range(20, 60):
        data[i] ^= 0xFF
    return bytes(data)


def _truncated_npz(tmp):
    np.savez(tmp / "whole.npz", x=images(), y=np.arange(20) % 10)
    data = (tmp / "whole.npz").read_bytes()
    (tmp / "whole.npz").unlink()
    return data[:len(data) // 2]


def _object_npz(tmp):
    path = tmp / "objects.npz"
    np.savez(path, x=np.array([RunsACommand("touch canary")] * 3, dtype=object), y=np.arange(3))
    data = path.read_bytes()
    path.unlink()
    return data


CASES = {
    # MNIST IDX, raw and gzipped
    "idx truncated gzip": Case(mnist(images=_truncated_gzip(None), gz=True), "truncated gzip"),
    "idx corrupt gzip": Case(mnist(images=_corrupt_gzip(None), gz=True), "gzip data"),
    "idx truncated raw": Case(mnist(images=good_idx_images()[:-100]), "truncated: header declares 40 images"),
    "idx header cut short": Case(mnist(images=good_idx_images()[:10]), "shorter than the 16-byte IDX header"),
    "idx bytes beyond the payload": Case(mnist(images=good_idx_images() + b"\0" * 64), "bytes beyond"),
    "idx wrong magic": Case(mnist(images=idx_bytes(2049, (40, 8, 8), bytes(40 * 64))), "magic number 2049"),
    "idx count mismatch": Case(mnist(label_count=30), "30 labels, but"),
    "idx label out of range": Case(mnist(labels=idx_bytes(2049, (40,), bytes([12] * 40))), "label 12 out of range"),
    "idx empty labels file": Case(mnist(labels=b""), "empty file"),
    "idx empty images file": Case(mnist(images=b""), "empty file"),
    "idx gzip of nothing": Case(mnist(images=b"", gz=True), "shorter than the 16-byte IDX header"),
    # the user's own .npz
    "npz object arrays": Case(npz_bytes(_object_npz), "dtype=object"),
    "npz NaN": Case(npz(x=lambda: np.where(images() > 200, np.nan, images()), y=np.arange(20) % 10), "NaN or infinite"),
    "npz inf": Case(npz(x=lambda: np.where(images() > 200, np.inf, images()), y=np.arange(20) % 10), "NaN or infinite"),
    "npz empty file": Case(npz_bytes(lambda tmp: b""), "not a readable .npz"),
    "npz not a zip": Case(npz_bytes(lambda tmp: b"PK\x03\x04 this is no zip archive at all" * 10),
                          "not a readable .npz"),
    "npz truncated": Case(npz_bytes(_truncated_npz), "not a readable .npz"),
    "npz without labels": Case(npz(x=images()), "no array 'y'"),
    "npz negative label": Case(npz(x=images(), y=np.arange(20) % 10 - 1), "label -1 out of range"),
    "npz fractional labels": Case(npz(x=images(), y=np.arange(20) / 3), "not whole numbers"),
    "npz count mismatch": Case(npz(x=images(), y=np.arange(19) % 10), "expected (20,)"),
    # CIFAR-10 batches are pickles: nothing in them may run
    "cifar pickle calls os.system": Case(cifar(lambda tmp: pickle.dumps(RunsACommand(f"touch {tmp / 'canary'}"))),
                                         "refused to unpickle"),
    "cifar pickle asks for numpy.load": Case(cifar(numpy_global_pickle), "numpy.load"),
    "cifar empty batch": Case(cifar(lambda tmp: b""), "empty file"),
    "cifar truncated batch": Case(cifar(lambda tmp: cifar_batch()[:200]), "not a readable pickle"),
    "cifar labels and images disagree": Case(cifar(lambda tmp: cifar_batch(10, 9)), "9 labels for 10 images"),
    # checkpoints and saved models
    "resume with another architecture": Case(with_model(lambda tmp: ["fit", "--resume", "out", "--filters", "8"]),
                                             "different network"),
    "out holds another fit's checkpoint": Case(with_model(lambda tmp: ["fit", *TINY, "--out", "out"]),
                                               "already holds a checkpoint"),
    "resume a truncated checkpoint": Case(with_model(lambda tmp: ["fit", "--resume", "out"],
                                                     truncate("checkpoint.npz")), "truncated or not an .npz"),
    "resume a saved model": Case(with_model(lambda tmp: ["fit", "--resume", "out/model.npz"]),
                                 "a saved model, not a training checkpoint"),
    "resume a folder without checkpoint": Case(lambda tmp: ((tmp / "empty").mkdir(), ["fit", "--resume", "empty"])[-1],
                                               "holds no checkpoint.npz"),
    "evaluate a truncated model": Case(with_model(lambda tmp: ["evaluate", "out/model.npz"], truncate("model.npz")),
                                       "truncated or not an .npz"),
    "evaluate on images of another shape": Case(
        with_model(lambda tmp: (np.savez(tmp / "big.npz", x=images(shape=(1, 16, 16)), y=np.arange(20) % 10),
                                ["evaluate", "out/model.npz", "--data", "npz", "--data-path", "big.npz"])[-1]),
        "the network expects (1, 8, 8)"),
    "evaluate plain arrays": Case(lambda tmp: (np.savez(tmp / "arrays.npz", a=np.zeros(3)),
                                               ["evaluate", "arrays.npz"])[-1], "no 'architecture' entry"),
    "predict on pickled objects": Case(with_model(lambda tmp: ((tmp / "objects.npz").write_bytes(_object_npz(tmp)),
                                                              ["predict", "out/model.npz", "objects.npz"])[-1]),
                                       "pickled objects, refused"),
    # config files and flags
    "bad TOML": Case(write("fit.toml", "[optim]\nepochs = = 3\n", "fit", "--config", "fit.toml"), "invalid TOML"),
    "unknown config key": Case(write("fit.toml", "[optim]\nbatchsize = 32\n", "fit", "--config", "fit.toml"),
                               "did you mean 'batch_size'"),
    "config value of the wrong type": Case(write("fit.toml", "epochs = \"many\"\n", "fit", "--config", "fit.toml"),
                                           "epochs"),
    "unknown flag": Case(flags("fit", "--epoch", "3"), "--epoch"),
    "negative filters": Case(flags("fit", "--filters=-4"), "filters"),
    "zero batch size": Case(flags("fit", "--batch-size", "0"), "batch_size: got 0"),
    "negative epochs": Case(flags("fit", "--epochs", "-1"), "epochs: got -1"),
    "zero kernel": Case(flags("fit", "--kernel-sizes", "0"), "kernel_sizes"),
    "zero hidden units": Case(flags("fit", "--hidden", "0"), "hidden"),
    "zero stride": Case(flags("fit", "--strides", "0"), "strides"),
    "negative pool": Case(flags("fit", "--pool=-1"), "pool"),
    "negative padding": Case(flags("fit", "--padding=-1"), "padding"),
    "zero limit": Case(flags("fit", "--limit", "0"), "limit"),
    "kernel larger than its input": Case(flags("fit", "--filters", "4", "--kernel-sizes", "9"), "conv1"),
    "a block left too small by pooling": Case(flags("fit", "--filters", "4,4", "--pool", "4"), "conv2"),
    "negative lambda": Case(flags("fit", "--l2", "-0.1"), "l2: got -0.1"),
    "zero learning rate": Case(flags("fit", "--lr", "0"), "lr: got 0.0"),
    "negative learning rate": Case(flags("fit", "--lr", "-0.5"), "lr: got -0.5"),
    "NaN learning rate": Case(flags("fit", "--lr", "nan"), "lr: got nan"),
    "momentum of one": Case(flags("fit", "--momentum", "1"), "momentum"),
    "validation fraction above one": Case(flags("fit", "--val-fraction", "1.5"), "val_fraction"),
    # decided: a batch larger than the training set is an error, not silently clamped
    "batch size larger than the data": Case(flags("fit", "--batch-size", "5000"), "larger than the"),
    # where things go
    "out is a file": Case(write("taken", "x", "fit", *TINY, "--out", "taken"), "is a file"),
    "out below a file": Case(write("taken", "x", "fit", *TINY, "--out", "taken/run"), "is a file"),
    # access(2) says yes (we may be root), creating a file there still fails
    "out where no file can be created": Case(flags("fit", *TINY, "--out", "/sys/convtrain-run"),
                                             "cannot create files in /sys"),
    "tracking server unreachable": Case(lambda tmp: ["fit", *TINY, "--tracking-uri", f"http://127.0.0.1:{free_port()}"],
                                       "cannot be reached"),
    "tracking store in a missing folder": Case(flags("fit", *TINY, "--tracking-uri", "sqlite:///no/such/dir/mlflow.db"),
                                               "does not exist"),
    "resume an unknown run id": Case(flags("fit", "--resume", "0123456789abcdef0123456789abcdef"), "0123456789abcdef"),
    # sizes taken on trust: refused before anything is allocated
    "npz of 300 bytes declaring 5.8 TiB": Case(npz_bytes(_npz_declaring_terabytes), "5.8 TiB"),
    "predict on an npz declaring 5.8 TiB": Case(
        with_model(lambda tmp: ((tmp / "claims.npz").write_bytes(_npz_declaring_terabytes(tmp)),
                                ["predict", "out/model.npz", "claims.npz"])[-1]), "declares array 'x'"),
    "idx gzip inflating past its header": Case(mnist(images=_gzip_inflating_past_its_header(), gz=True),
                                               "decompresses to more than the 2560 bytes"),
    "cifar pickle declaring 700,000 images": Case(
        cifar(lambda tmp: pickle.dumps({b"data": Declares((700_000, 3072)), b"labels": Declares((700_000,), "<i8")},
                                       protocol=4)), "more than a CIFAR batch"),
    "npz label of 10**9": Case(npz(x=images(), y=np.where(np.arange(20) == 3, 10**9, np.arange(20) % 10)),
                               "label 1000000000 would make 1000000001 classes"),
    "npz label of 1e20": Case(npz(x=images(), y=np.where(np.arange(20) == 3, 1e20, np.arange(20) % 10)),
                              "label 1e+20, too large"),
    "a surname of 200,000 characters": Case(names_folder(**{"English.txt": "smith\n" + "a" * 200_000 + "\n",
                                                            "German.txt": "muller\n"}),
                                            "a name of 200000 characters"),
    "an alphabet of 20,000 letters": Case(names_folder(**{
        "Chinese.txt": "\n".join("".join(chr(0x4E00 + i + j) for j in range(10)) for i in range(0, 20_000, 10)),
        "English.txt": "smith\n"}), "different letters, more than the"),
    "a billion filters": Case(flags("fit", "--filters", "1000000000"), "network: needs an estimated"),
    "a billion hidden units": Case(flags("fit", "--hidden", "1000000000"), "network: needs an estimated"),
    "padding of 100,000": Case(flags("fit", "--padding", "100000"), "network: needs an estimated"),
    # data files with numbers and nesting that used to end in a traceback (section 5)
    "dd2424 class written as a superscript": Case(dd2424("Abadi 1\nBai \u00b2\n"), "is not '<name> <class number>'"),
    "dd2424 class number of 5,000 digits": Case(dd2424("Abadi 1\nBai " + "9" * 5000 + "\n"), "line 2:"),
    "dd2424 index of 30 digits": Case(dd2424("Abadi 1\nBai 2\nChen 2\n", "1 " + "9" * 30 + "\n"), "is not an index"),
    "dd2424 holding out every name": Case(dd2424("Abadi 1\nBai 2\n", "1 2\n"), "holds out all 2 names"),
    "cifar labels nested past 64 dimensions": Case(
        cifar(lambda tmp: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": nested(70)}, protocol=4)),
        "nests lists or dicts deeper"),
    # crafted CIFAR batches: numpy is handed only checked uint8 arrays
    "cifar object array declaring 250,000,000 entries": Case(
        cifar_of(ArrayState((250_000_000,), np.dtype(object), [1, 2, 3])), "numpy.dtype('O8')"),
    "cifar uint8 array of a shape larger than its bytes": Case(
        cifar_of(ArrayState((10, 3072), np.dtype(np.uint8), bytes(100))), "needs 30,720 bytes, the file gives 100"),
    "cifar big-endian structured dtype": Case(
        cifar_of(ArrayState((1, 3072), np.dtype([("a", ">i4")]), bytes(4 * 3072))), "uint8 arrays only"),
    "cifar reconstruct nested in a reconstruct": Case(cifar_of(_nested_reconstruct()), "_reconstruct declares shape"),
    "cifar labels list of 100,000 entries": Case(
        cifar_of(np.zeros((1, 3072), np.uint8), [0] * 100_000), "a list of more than 10,000 entries"),
    "cifar batch holding a set": Case(
        cifar(lambda tmp: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": {0}}, protocol=4)),
        "opcode"),
    # a hand-edited model.npz (section 5)
    "model normalization of the wrong length": Case(
        evaluate_tampered("normalization", lambda n: {**n, "mean": n["mean"] * 2}), "normalization mean must be 1"),
    "model normalization of strings": Case(
        evaluate_tampered("normalization", lambda n: {**n, "std": ["x"]}), "normalization std must be 1"),
    "model normalization std of 0": Case(
        evaluate_tampered("normalization", lambda n: {**n, "std": [0.0]}), "std must be positive"),
    "model class_names of 5": Case(evaluate_tampered("class_names", 5), "'class_names' must be null or a list"),
    "model meta of a string": Case(evaluate_tampered("meta", "x"), "'meta' must be an object"),
    # inputs that used to end in a traceback
    "config with filters nested 50,000 deep": Case(
        write("fit.toml", deep_toml_array("filters", 50_000), "fit", "--config", "fit.toml"), "nested too deeply"),
    "config with filters nested 20 deep": Case(
        write("fit.toml", deep_toml_array("filters", 20), "fit", "--config", "fit.toml"), "nested more than 8 deep"),
    "config with inline tables nested 50,000 deep": Case(
        write("fit.toml", deep_inline_table(50_000), "fit", "--config", "fit.toml"), "nested too deeply"),
    "sweep with a [space] nested 50,000 deep": Case(
        write("sweep.toml", "[space]\n" + deep_toml_array("lr", 50_000), "sweep", "sweep.toml"), "nested too deeply"),
    "config of /dev/zero": Case(flags("fit", "--config", "/dev/zero"), "too large for a config file"),
    "sweep based on /dev/zero": Case(write("sweep.toml", 'base = "/dev/zero"\n[space]\nlr = [0.1, 0.2]\n',
                                           "sweep", "sweep.toml"), "too large for a config file"),
    "model architecture JSON nested 100,000 deep": Case(
        with_model(lambda tmp: ["evaluate", "out/model.npz"],
                   set_entry("model.npz", "architecture", deep_json(100_000))),
        "entry 'architecture' nests JSON"),
    "checkpoint callbacks JSON nested 100,000 deep": Case(
        with_model(lambda tmp: ["fit", "--resume", "out"],
                   set_entry("checkpoint.npz", "callbacks", deep_json(100_000))),
        "entry 'callbacks' nests JSON"),
    "checkpoint config TOML nested 50,000 deep": Case(
        with_model(lambda tmp: ["fit", "--resume", "out"],
                   set_entry("checkpoint.npz", "config", deep_toml_array("filters", 50_000))),
        "stored config: arrays or tables nested too deeply"),
    "checkpoint epoch_order of strings": Case(
        with_model(lambda tmp: ["fit", "--resume", "out"],
                   set_entry("checkpoint.npz", "epoch_order", np.array(["a", "b"]))),
        "entry 'epoch_order' is <U1 of shape (2,)"),
    "tracking URI with an unclosed IPv6 host": Case(flags("fit", *TINY, "--tracking-uri", "http://[::1"),
                                                    "not a valid URL (Invalid IPv6 URL)"),
    "postgresql tracking URI without its driver": Case(
        flags("fit", *TINY, "--tracking-uri", "postgresql://user:secret@127.0.0.1:1/db"),
        "postgresql://user:***@127.0.0.1:1/db: its database driver 'psycopg' is not installed"),
    "ui on port -1": Case(flags("ui", "--port", "-1"), "port: got -1, expected a port number from 1 to 65535"),
    "ui on port 99999": Case(flags("ui", "--port", "99999"), "port: got 99999"),
    "sweep experiment name of 5,000 characters": Case(
        write("sweep.toml", f'[fit]\nexperiment = "{"e" * 5000}"\n[space]\nlr = [0.1, 0.2]\n', "sweep", "sweep.toml"),
        "experiment: got 5000 characters, expected at most 500"),
    "npz float64 beyond float32's range": Case(npz(x=float64_beyond_float32, y=np.arange(20) % 10),
                                               "1 value(s) beyond float32's range (largest 1e+300"),
    "predict on float64 beyond float32's range": Case(
        with_model(lambda tmp: (np.savez(tmp / "x.npz", x=float64_beyond_float32()[:, 0]),
                                ["predict", "out/model.npz", "x.npz"])[-1]), "beyond float32's range"),
    # a checkpoint's tracking URI is data: another store than the current one is refused
    "resume a checkpoint naming another sqlite store": Case(
        with_model(lambda tmp: ["fit", "--resume", "out", "--track"], stored_tracking("sqlite:////elsewhere/evil.db")),
        "was logged to tracking store sqlite:////elsewhere/evil.db, not to the current one"),
    "resume a checkpoint naming a server": Case(
        with_model(lambda tmp: ["fit", "--resume", "out", "--track"], stored_tracking("http://127.0.0.1:9")),
        "to continue it in http://127.0.0.1:9 on purpose, pass --tracking-uri http://127.0.0.1:9"),
    "sweep with an empty space": Case(write("sweep.toml", "[sweep]\nmethod = \"grid\"\n[space]\n",
                                            "sweep", "sweep.toml"), "[space] is empty"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_gives_one_line_and_writes_nothing(name, tmp_path, monkeypatch, request):
    case = CASES[name]
    if name == "out where no file can be created" and not Path("/sys/kernel").is_dir():
        pytest.skip("needs Linux's /sys")
    if name == "postgresql tracking URI without its driver" and not _psycopg_missing():
        pytest.skip("psycopg is installed here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if getattr(case.setup, "needs_model", False):
        args = case.setup(tmp_path, request.getfixturevalue("trained"))
    else:
        args = case.setup(tmp_path)
    before = snapshot(tmp_path)

    result = invoke(*args)

    assert_one_line_error(result, case.fragment)
    assert result.stdout == ""
    assert not (tmp_path / "canary").exists()
    assert snapshot(tmp_path) == before, "the failed command wrote to the folder"


def test_the_table_is_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into any folder")
def test_an_unwritable_out_folder_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "locked").mkdir(mode=0o500)
    before = snapshot(tmp_path)
    assert_one_line_error(invoke("fit", *TINY, "--out", "locked/run"), "not writable")
    assert snapshot(tmp_path) == before


def test_a_zip_bomb_npz_is_refused_from_its_headers(tmp_path, monkeypatch):
    """32 MB of zeros deflate to about 32 KB; with 40 MB of memory (a fit may plan on half)
    the archive is refused in one line from its headers, never decompressed."""
    import io
    import zipfile

    from convtrain.nn.footprint import MEMORY_LIMIT_ENV

    monkeypatch.chdir(tmp_path)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as entry:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": "|u1", "fortran_order": False, "shape": (512 * 1024, 1, 8, 8)})
            entry.write(header.getvalue())
            for _ in range(32):
                entry.write(bytes(1 << 20))
        archive.writestr("y.npy", b"")
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(40 << 20))
    before = snapshot(tmp_path)
    line = assert_one_line_error(invoke("fit", "--data", "npz", "--data-path", "bomb.npz", *TINY),
                                 "a fit may use")
    assert "bomb.npz" in line and "32.0 MiB" in line
    assert snapshot(tmp_path) == before


def test_a_memory_error_anywhere_is_one_line(tmp_path, monkeypatch):
    import convtrain.pipeline.prepare as pipeline_prepare

    def runs_out_of_memory(*_args, **_kwargs):
        raise MemoryError("Unable to allocate 5.82 TiB for an array with shape (1600000, 1000, 1000)")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline_prepare, "_build_network", runs_out_of_memory)
    before = snapshot(tmp_path)
    line = assert_one_line_error(invoke("fit", *TINY), "out of memory (Unable to allocate 5.82 TiB")
    assert "smaller" in line
    assert snapshot(tmp_path) == before


ALLOCATION_FAILED = "Unable to allocate 5.82 TiB for an array with shape (1600000, 1000, 1000)"


def runs_out_of_memory(*_args, **_kwargs):
    raise MemoryError(ALLOCATION_FAILED)


@pytest.mark.parametrize("command, where", [
    (["evaluate", "out/model.npz"], "convtrain.pipeline.evaluate.evaluate_model"),
    (["predict", "out/model.npz", "x.npz"], "convtrain.pipeline.predict.predict_inputs"),
    (["info"], "convtrain.pipeline.info.describe_installation"),
    (["ui", "--port", "0"], "convtrain.tracking.ui.serve_ui"),
    (["sweep", "sweep.toml"], "convtrain.sweep.launcher.run_sweep"),
])
def test_a_memory_error_in_any_command_is_one_line(command, where, tmp_path, monkeypatch):
    """Each command imports the code it runs when it runs: a MemoryError from there reaches the
    one handler every command shares."""
    import importlib

    module, name = where.rsplit(".", 1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.import_module(module), name, runs_out_of_memory)
    line = assert_one_line_error(invoke(*command), f"out of memory ({ALLOCATION_FAILED})")
    assert "smaller" in line


def test_a_sweep_worker_process_says_out_of_memory_in_one_line(monkeypatch, capsys):
    """A spawned sweep worker is its own process, outside the CLI's handler."""
    from convtrain.sweep import launcher
    from convtrain.sweep.worker import WorkerPlan

    monkeypatch.setattr(launcher, "run_worker", runs_out_of_memory)
    with pytest.raises(SystemExit) as exited:
        launcher._worker_main(WorkerPlan(sweep_path="sweep.toml", storage_url="sqlite://", label="[w2] "), None)
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f"[w2] error: out of memory ({ALLOCATION_FAILED}); "
                                                    "try a smaller batch, network or --limit"]


def test_predict_on_an_image_past_pillows_pixel_limit(tmp_path, monkeypatch, trained):
    """Between Pillow's pixel limit and twice it, Pillow only warns on stderr and decodes anyway."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert_one_line_error(invoke("predict", trained / "model.npz", "big.png"), "image too large")


# ---- a full disk under the tracking store when the fit starts ------------------------------------

DISK_FULL_FROM_THE_START = """
import sqlite3, sys
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

real_execute = SQLiteDialect_pysqlite.do_execute

def do_execute(self, cursor, statement, parameters, context=None):
    # what SQLite answers when the disk under the store has no room left for a page
    if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
        raise sqlite3.OperationalError("database or disk is full")
    return real_execute(self, cursor, statement, parameters, context)

SQLiteDialect_pysqlite.do_execute = do_execute
from convtrain.cli import main
sys.argv = ["convtrain", *sys.argv[1:]]
main()
"""


def test_a_store_whose_disk_is_full_when_the_fit_starts_is_one_line(tmp_path):
    """SQLite's own error, through SQLAlchemy and MLflow as it really arrives, when the run is
    created: one line saying the disk is full, not MLflow's logged tracebacks."""
    import subprocess
    import sys

    from convtrain.tracking.sqlite_store import ensure_sqlite_store

    ensure_sqlite_store(tmp_path / "mlflow.db")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "COLUMNS": "120"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-c", DISK_FULL_FROM_THE_START, "fit", *TINY, "--out", "out"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: tracking store ") and "database or disk is full" in lines[0], lines[0]


def test_a_store_on_a_disk_with_no_room_left_is_refused_before_any_work(tmp_path, monkeypatch):
    from convtrain.tracking import store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(store, "free_bytes", lambda folder: 4096)
    before = snapshot(tmp_path)
    line = assert_one_line_error(invoke("fit", *TINY), "the disk is full (4,096 bytes free")
    assert "free some space" in line
    assert snapshot(tmp_path) == before


# ---- names shown on the terminal and in run descriptions -----------------------------------------

def test_control_characters_in_a_sweep_name_are_shown_escaped():
    from rich.console import Console

    from convtrain.errors import printable
    from convtrain.sweep.report import trials_table

    name = "clear\x1b[2J\rbell\x07\u202eright-to-left"
    assert printable(name) == "clear\\x1b[2J\\rbell\\x07\\u202eright-to-left"
    assert printable("digits, 32 filters [v1.2]") == "digits, 32 filters [v1.2]"

    class Spec:  # what trials_table reads of a SweepSpec
        space, objective = {}, "val_accuracy"

    Spec.name = name
    console = Console(width=120, record=True, force_terminal=False)
    console.print(trials_table([], Spec))
    shown = console.export_text()
    assert "\x1b" not in shown and "\r" not in shown and "\\x1b[2J" in shown


def test_backticks_and_control_characters_in_names_keep_the_markdown_intact():
    from convtrain.tracking.description import _code, _fenced, _text, experiment_description

    assert _code("plain") == "`plain`"
    assert _code("lr`0.05") == "``lr`0.05``"  # the span outlasts the backtick inside
    assert _code("`edge`") == "`` `edge` ``"
    assert _code("a\nb") == "`a\\nb`"  # a line break cannot end the paragraph
    assert _fenced("convtrain fit --out 'a```b'") == ["````", "convtrain fit --out 'a```b'", "````"]
    assert _text("my_data [v1].npz") == "my\\_data \\[v1\\]\\.npz"
    line = experiment_description("team`s runs")
    assert line.startswith("convtrain experiment ``team`s runs``: one run per `convtrain fit`")
