"""Files that expand to gigabytes, refused in one line by a real `convtrain` process whose peak
resident memory stays small.

Each case runs the CLI in a child process (its own session, killed on timeout) and reads the
child's peak RSS from wait4(2). The bombs are real: a 4 GiB deflate stream of zeros in about
4 MB, bzip2 and LZMA members far past any real array's compression ratio, a model whose few
bytes of JSON ask for 300,000,000 filters with batch norm, and /dev/zero as a config file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.support.cli import TINY, invoke

ROOT = Path(__file__).resolve().parents[2]
PEAK_LIMIT = 256 * 1024 * 1024  # a refusing process peaks at about 70 MiB (Python, numpy, convtrain)
TIMEOUT = 120


# `python -c CHILD cwd peak_file args...`: a fresh interpreter forks the CLI's process and writes
# that child's peak RSS (kB) to peak_file. The child of the test process itself would not do:
# Linux carries a process's high-water mark across exec, so it would start at pytest's own.
CHILD = """
import os, runpy, sys
os.chdir(sys.argv[1])
peak_file, args = sys.argv[2], sys.argv[3:]
pid = os.fork()
if pid == 0:
    sys.argv = ["convtrain", *args]
    runpy.run_module("convtrain.cli", run_name="__main__")
    sys.exit(0)
_, status, usage = os.wait4(pid, 0)
with open(peak_file, "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_cli(args: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of `convtrain ARGS` run in `cwd` by a
    child process (its own session, killed with all it started if it outlives TIMEOUT)."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CONVTRAIN_DEBUG")}
    child_env.update({"PYTHONPATH": str(ROOT), "COLUMNS": "120", **(env or {})})
    peak_file = cwd.parent / f"{cwd.name}.peak"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(cwd), str(peak_file), *map(str, args)],
                             env=child_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=TIMEOUT)
    finally:
        if child.returncode is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
    peak = int(peak_file.read_text()) * 1024  # ru_maxrss is in kB on Linux
    peak_file.unlink()
    return child.returncode, stdout.decode(), stderr.decode(), peak


def assert_refused_small(result, fragment: str) -> str:
    code, stdout, stderr, peak = result
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code not in (0, None) and code > 0, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr
    assert peak < PEAK_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    return lines[0]


# ---- the bombs --------------------------------------------------------------------------------

def npy_header(shape, descr="|u1") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def deflate_bomb_npz(path: Path, key: str = "x", gib: int = 4) -> Path:
    """An .npz of one member `key`: an .npy of `gib` GiB of uint8 zeros as one deflate stream of
    about a MB per GiB. One full-flushed MiB of zeros deflates to the same bytes every time, so
    the stream is that block repeated; the zip (zip64) is written by hand around it."""
    mib = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    header = npy_header((gib * 1024 * (1 << 20) - 128,))  # header + data: exactly gib GiB
    assert len(header) == 128
    first = compressor.compress(header + mib[:-128]) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert block == compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush(zlib.Z_FINISH)
    crc = zlib.crc32(header + mib[:-128])
    for _ in range(gib * 1024 - 1):
        crc = zlib.crc32(mib, crc)
    size = gib * 1024 * (1 << 20)
    compressed = len(first) + len(block) * (gib * 1024 - 1) + len(end)
    name = f"{key}.npy".encode()
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHHHHIII HH", 0x04034B50, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                              len(name), 20) + name + struct.pack("<HHQQ", 1, 16, size, compressed))
        out.write(first)
        for _ in range(gib * 1024 - 1):
            out.write(block)
        out.write(end)
        directory = out.tell()
        out.write(struct.pack("<IHHHHHHIII HHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF,
                              0xFFFFFFFF, len(name), 28, 0, 0, 0, 0, 0xFFFFFFFF)
                  + name + struct.pack("<HHQQQ", 1, 24, size, compressed, 0))
        end_of_directory = out.tell()
        out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1,
                              end_of_directory - directory, directory))
        out.write(struct.pack("<IIQI", 0x07064B50, 0, end_of_directory, 1))
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, end_of_directory - directory,
                              0xFFFFFFFF, 0))
    return path


def compressed_zeros_npz(path: Path, method: int, images: int) -> Path:
    """x: `images` 8x8 uint8 images of zeros and their labels, x compressed with `method`."""
    with zipfile.ZipFile(path, "w", method) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as entry:
            entry.write(npy_header((images, 1, 8, 8)))
            left = images * 64
            mib = bytes(1 << 20)
            while left:
                entry.write(mib[:min(left, len(mib))])
                left -= min(left, len(mib))
        labels = io.BytesIO()
        np.save(labels, np.zeros(images, np.uint8))
        archive.writestr("y.npy", labels.getvalue())
    return path


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    path = deflate_bomb_npz(tmp_path_factory.mktemp("bomb") / "zipbomb.npz")
    assert path.stat().st_size < 5 * 1024 * 1024
    with zipfile.ZipFile(path) as archive:  # what the zip says, and zipfile believes
        assert archive.getinfo("x.npy").file_size == 4 << 30
    return path


# ---- the cases -----------------------------------------------------------------------------------

def test_predict_on_a_4_gib_zip_bomb(tmp_path, trained, zip_bomb):
    line = assert_refused_small(run_cli(["predict", trained / "model.npz", zip_bomb], tmp_path),
                                "no real array compresses to")
    assert "zipbomb.npz" in line and "4.0 GiB" in line


def test_resume_from_a_checkpoint_that_is_a_zip_bomb(tmp_path, trained, zip_bomb):
    shutil.copytree(trained, tmp_path / "out")
    shutil.copy(zip_bomb, tmp_path / "out" / "checkpoint.npz")
    line = assert_refused_small(run_cli(["fit", "--resume", "out", "--no-track"], tmp_path),
                                "no real array compresses to")
    assert "checkpoint.npz" in line


@pytest.mark.parametrize("method, images, name", [
    (zipfile.ZIP_BZIP2, 2_000_000, "bzip2"),  # 128 MB of images in a few hundred bytes
    (zipfile.ZIP_LZMA, 1_500_000, "LZMA"),
])
def test_bzip2_and_lzma_members_are_refused_unopened(tmp_path, method, images, name):
    path = compressed_zeros_npz(tmp_path / "data.npz", method, images)
    assert path.stat().st_size < 100_000
    line = assert_refused_small(run_cli(["fit", "--data", "npz", "--data-path", "data.npz", "--no-track", *TINY[2:]],
                                        tmp_path), f"the {name} compression method")
    assert "'x'" in line


def test_evaluate_a_small_model_claiming_300_million_filters_with_batch_norm(tmp_path, trained):
    shutil.copytree(trained, tmp_path / "out")
    with np.load(tmp_path / "out" / "model.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    architecture = json.loads(str(arrays["architecture"][()]))
    layers = architecture["layers"]
    first_conv = next(i for i, layer in enumerate(layers) if layer["type"] == "conv")
    layers[first_conv]["filters"] = 300_000_000
    layers.insert(first_conv + 1, {"type": "batch_norm"})
    arrays["architecture"] = np.array(json.dumps(architecture))
    np.savez(tmp_path / "out" / "model.npz", **arrays)
    assert (tmp_path / "out" / "model.npz").stat().st_size < 100_000
    line = assert_refused_small(run_cli(["evaluate", "out/model.npz"], tmp_path), "parameters, but the file stores")
    assert "model.npz" in line


def test_config_of_dev_zero(tmp_path):
    assert_refused_small(run_cli(["fit", "--config", "/dev/zero", "--no-track"], tmp_path),
                         "too large for a config file")


def test_sweep_based_on_dev_zero(tmp_path):
    (tmp_path / "sweep.toml").write_text('base = "/dev/zero"\n[space]\nlr = [0.01, 0.1]\n')
    assert_refused_small(run_cli(["sweep", "sweep.toml"], tmp_path), "too large for a config file")


def test_x_and_x_test_are_held_to_the_budget_together(tmp_path, monkeypatch):
    """Each of x and x_test alone fits in half of a 40 MiB budget; both together do not."""
    from convtrain.nn.footprint import MEMORY_LIMIT_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(40 << 20))
    n = 22_000  # 22,000 8x8 uint8 images cost a fit about 12 MiB; the budget is 20 MiB
    x = np.zeros((n, 1, 8, 8), np.uint8)
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(n) % 10)
    np.savez(tmp_path / "half.npz", x=x[:n // 2], y=np.arange(n // 2) % 10, x_test=x[n // 2:],
             y_test=np.arange(n // 2) % 10)
    np.savez(tmp_path / "both.npz", x=x, y=np.arange(n) % 10, x_test=x, y_test=np.arange(n) % 10)
    result = invoke("fit", "--data", "npz", "--data-path", "both.npz", "--no-track", *TINY)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert "a fit may use" in lines[0] and "'x'" in lines[0] and "'x_test'" in lines[0], lines[0]
    # the same images as one array, or split between x and x_test, are within the budget
    from convtrain.data.npz import load_npz
    assert len(load_npz(tmp_path / "data.npz").x) == n
    assert len(load_npz(tmp_path / "half.npz").x_test) == n // 2
