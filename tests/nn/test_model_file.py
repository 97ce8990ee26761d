"""The model file (convtrain.nn.model_file): a round trip, and the files it refuses in one line.

A saved model whose .npy headers claim more than the file holds is refused unread. A model
.npz is a zip of .npy members, and numpy allocates whatever a member's header declares before
reading it. Each hostile file here is a real saved model with one member
rewritten; loading it (Network.load, `convtrain evaluate`, `convtrain predict`) must end in one
line naming the file, and tracemalloc (which sees numpy's allocations) shows that nothing the
size of the claim was allocated.
"""

import io
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from convtrain.errors import CheckpointError
from convtrain.nn.footprint import MEMORY_LIMIT_ENV
from convtrain.nn.network import Network
from tests.support.cli import error_line, invoke

MB = 1024 * 1024
WEIGHTS = "param/conv1.weight"


def saved_model(folder) -> tuple:
    net = Network.build(input_shape=(1, 6, 6), num_classes=2, filters=[2], seed=1)
    path = net.save(folder / "model.npz")
    with np.load(path, allow_pickle=False) as archive:
        return path, {name: archive[name] for name in archive.files}


def npy_bytes(shape, descr="<f4", payload=b"") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + payload


def rewrite(path, arrays, replaced: dict, compression=zipfile.ZIP_STORED):
    """The model at `path` again, with the members in `replaced` (name -> raw .npy bytes)."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, value in arrays.items():
            if name in replaced:
                archive.writestr(f"{name}.npy", replaced[name])
            else:
                buffer = io.BytesIO()
                np.save(buffer, value)
                archive.writestr(f"{name}.npy", buffer.getvalue())
    return path


def forge_uncompressed_size(path, member: str, size: int) -> None:
    """Set a member's uncompressed size, in its local header and the central directory."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(member).header_offset
    data[local + 22:local + 26] = struct.pack("<I", size)
    central = data.index(b"PK\x01\x02")
    while data[central + 46:central + 46 + len(member)] != member.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 24:central + 28] = struct.pack("<I", size)
    path.write_bytes(bytes(data))


def loading_is_refused(path, fragment) -> tuple[str, int]:
    """(the CheckpointError's line, the peak bytes allocated while loading)."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as caught:
            Network.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and fragment in message, message
    return message, peak


# ---- hostile model files ---------------------------------------------------------------------

def declaring_terabytes(folder):
    """The first conv weights' header declares (1600000, 1, 1000, 1000) float32: 5.8 TiB."""
    path, arrays = saved_model(folder)
    return rewrite(path, arrays, {WEIGHTS: npy_bytes((1_600_000, 1, 1000, 1000), payload=bytes(16))})


def declaring_400_megabytes(folder):
    """Small enough that numpy's allocation succeeds (untouched pages cost nothing), so only the
    allocation itself shows the header was trusted."""
    path, arrays = saved_model(folder)
    return rewrite(path, arrays, {WEIGHTS: npy_bytes((100, 1, 1000, 1000), payload=bytes(16))})


def forged_entry_size(folder):
    """Header and zip entry agree on 400 MB, but the entry's 200 compressed bytes cannot expand
    that far."""
    path, arrays = saved_model(folder)
    header = npy_bytes((100, 1, 1000, 1000))
    rewrite(path, arrays, {WEIGHTS: header + bytes(64)}, zipfile.ZIP_DEFLATED)
    forge_uncompressed_size(path, f"{WEIGHTS}.npy", len(header) + 400_000_000)
    return path


def zip_bomb(folder):
    """40 MB of zeros that really deflate to about 40 KB, under a header declaring them."""
    path, arrays = saved_model(folder)
    return rewrite(path, arrays, {WEIGHTS: npy_bytes((10 * MB, 1, 1, 1), payload=bytes(40 * MB))},
                   zipfile.ZIP_DEFLATED)


HOSTILE = {
    "header declaring 5.8 TiB": (declaring_terabytes, "5.8 TiB"),
    "header declaring 381 MiB": (declaring_400_megabytes, "but its entry holds 16 bytes"),
    "entry size past what deflate can expand": (forged_entry_size, "compressed data can hold"),
    "zip bomb past the memory a model may use": (zip_bomb, "a model may use"),
}


@pytest.fixture
def small_memory(monkeypatch):
    # a 40 MB member is then past the limit; an honest tiny model is far below it
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(32 * MB))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_the_loader_refuses_a_model_claiming_too_much_unread(name, tmp_path, small_memory):
    make, fragment = HOSTILE[name]
    path = make(tmp_path)
    assert path.stat().st_size < MB
    message, peak = loading_is_refused(path, fragment)
    assert WEIGHTS in message
    assert peak < 4 * MB, f"{peak / MB:.0f} MB allocated while refusing {name}"


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_evaluate_and_predict_refuse_it_in_one_line(name, command, tmp_path, monkeypatch):
    make, fragment = HOSTILE[name]
    path = make(tmp_path)
    np.savez(tmp_path / "inputs.npz", x=np.zeros((2, 1, 6, 6), np.float32))
    args = [command, path] + ([tmp_path / "inputs.npz"] if command == "predict" else [])
    # once untraced first: the modules the command imports the first time it runs in this
    # process are not the refusal's allocation, and where the test falls in the run decides that
    invoke(*args, env={MEMORY_LIMIT_ENV: str(32 * MB)})
    tracemalloc.start()
    try:
        result = invoke(*args, env={MEMORY_LIMIT_ENV: str(32 * MB)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    line = error_line(result)
    assert str(path) in line and fragment in line, line
    assert peak < 8 * MB, f"{peak / MB:.0f} MB allocated while refusing {name}"


def test_a_member_inflating_past_its_entry_is_refused_by_its_checksum(tmp_path):
    """A member whose deflate stream holds more than its entry declares is read only as far as
    the entry says; the checksum of what was read then does not match."""
    path, arrays = saved_model(tmp_path)
    header = npy_bytes((4,))
    rewrite(path, arrays, {WEIGHTS: header + bytes(16) + bytes(8 * MB)}, zipfile.ZIP_DEFLATED)
    forge_uncompressed_size(path, f"{WEIGHTS}.npy", len(header) + 16)
    _, peak = loading_is_refused(path, "Bad CRC-32")
    assert peak < 4 * MB


def test_a_member_in_a_compression_zipfile_cannot_read_is_one_line(tmp_path):
    path, _ = saved_model(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(f"{WEIGHTS}.npy").header_offset
    data[local + 8:local + 10] = struct.pack("<H", 99)  # the method, in the local header
    central = data.index(b"PK\x01\x02")
    while data[central + 46:central + 46 + len(WEIGHTS) + 4] != f"{WEIGHTS}.npy".encode():
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 10:central + 12] = struct.pack("<H", 99)  # and in the central directory
    path.write_bytes(bytes(data))
    loading_is_refused(path, "compression method")


def test_an_honest_model_still_loads_with_its_arrays_writable(tmp_path, small_memory):
    path, arrays = saved_model(tmp_path)
    loaded = Network.load(path)
    weights = loaded.parameters()["conv1.weight"]
    np.testing.assert_array_equal(weights, arrays[WEIGHTS])
    weights += 1  # training continues from loaded weights in place


def test_save_load_round_trip(tmp_path):
    net = Network.build(input_shape=(3, 10, 10), num_classes=5, filters=[4, 6], kernel_sizes=[3, [3, 1]],
                        padding=["same", 0], pool=[2, 0], hidden=[7], seed=4)
    net.normalization = {"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]}
    net.class_names = ["a", "b", "c", "d", "e"]
    net.meta = {"alphabet": "abc"}
    path = net.save(tmp_path / "model.npz")
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    with np.load(path, allow_pickle=False) as archive:
        assert "architecture" in archive.files
    loaded = Network.load(path)
    assert loaded.architecture == net.architecture
    assert loaded.normalization == net.normalization
    assert loaded.class_names == net.class_names and loaded.meta == net.meta
    for name, value in net.parameters().items():
        assert np.array_equal(loaded.parameters()[name], value)
    raw = np.random.default_rng(0).random((4, 3, 10, 10))
    np.testing.assert_array_equal(loaded.predict_proba(raw), net.predict_proba(raw))


def test_load_refuses_missing_truncated_and_foreign_files(tmp_path):
    net = Network.build(input_shape=(1, 6, 6), num_classes=2, filters=[2])
    path = net.save(tmp_path / "model.npz")
    data = path.read_bytes()

    with pytest.raises(CheckpointError, match="not found"):
        Network.load(tmp_path / "missing.npz")

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Network.load(truncated)

    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="no 'architecture' entry"):
        Network.load(foreign)

    other = Network.build(input_shape=(1, 6, 6), num_classes=3, filters=[2])
    arrays = other.to_arrays()
    arrays["architecture"] = net.to_arrays()["architecture"]  # weights of another shape
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, **arrays)
    with pytest.raises(CheckpointError, match="fc.weight has shape"):
        Network.load(mismatched)

    pickled = tmp_path / "pickled.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(pickled, "w") as dst:
        for item in src.namelist():
            dst.writestr(item, src.read(item))
        np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        dst.write(tmp_path / "obj.npy", "obj.npy")
    with pytest.raises(CheckpointError, match="pickled"):
        Network.load(pickled)
