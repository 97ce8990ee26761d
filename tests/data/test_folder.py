"""`--data folder`: real PNGs and JPEGs made from the CIFAR-10 subset, through the CLI; fixed
splits; the decode cache; and hostile folders, each refused in one line naming the file or, with
--skip-bad-images, counted."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convtrain.data import load_dataset
from convtrain.data.folder import MAX_IMAGE_PIXELS, FolderOptions
from tests.support.cli import error_line, invoke

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FIT = ("fit", "--data", "folder", "--epochs", "1", "--no-track", "--filters", "4", "--batch-size", "50", "-q")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test decodes into its own cache folder, not the user's ~/.cache."""
    monkeypatch.setenv("CONVTRAIN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def cifar(request):
    value = os.environ.get("CONVTRAIN_TEST_DATA")
    if not value:
        pytest.skip("CONVTRAIN_TEST_DATA is not set")
    from convtrain.data.cifar import load_cifar10

    return load_cifar10(Path(value) / "cifar10")


def write_images(root: Path, raw, rows, *, layout=lambda i: "") -> list[Path]:
    """Rows of the CIFAR subset as files root/<layout(i)>/<class>/<i>.png|.jpg (every third a JPEG)."""
    written = []
    for i in rows:
        folder = root / layout(i) / raw.class_names[raw.y[i]]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.{'jpg' if i % 3 == 0 else 'png'}"
        Image.fromarray(raw.x[i].transpose(1, 2, 0)).save(path, quality=95)
        written.append(path)
    return written


@pytest.fixture
def cifar_folder(tmp_path, cifar) -> Path:
    root = tmp_path / "images"
    write_images(root, cifar, range(500))
    return root


def tiny_folder(root: Path, classes=("a", "b"), per_class=3, size=(8, 8)) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# ---- a real folder -------------------------------------------------------------------------


def test_a_folder_of_pngs_and_jpegs_trains_evaluates_and_predicts(cifar_folder, cifar, in_tmp_cwd):
    out = in_tmp_cwd / "run"
    result = invoke(*FIT, "--data-path", cifar_folder, "--out", out)
    assert result.exit_code == 0, result.output
    splits = load_dataset("folder", cifar_folder, val_fraction=0.1)
    assert splits.class_names == CLASSES
    assert len(splits.y_train) + len(splits.y_val) == 500 and splits.input_shape == (3, 32, 32)
    # PNGs are lossless: their pixels are CIFAR's own
    x = np.concatenate([splits.x_train, splits.x_val])
    y = np.concatenate([splits.y_train, splits.y_val])
    for png in (1, 2, 4):
        (row,) = np.flatnonzero((x == cifar.x[png]).all(axis=(1, 2, 3)))
        assert y[row] == cifar.y[png]

    evaluated = invoke("evaluate", out, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["count"] == 50
    predicted = invoke("predict", out, cifar_folder / "cat", "--json")
    assert predicted.exit_code == 0, predicted.output
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(lines) == len(list((cifar_folder / "cat").iterdir())) and lines[0]["class"] in CLASSES


def test_image_size_and_channels_resize_and_convert(cifar_folder, in_tmp_cwd):
    result = invoke(*FIT, "--data-path", cifar_folder, "--image-size", "20x24", "--channels", "1",
                    "--out", in_tmp_cwd / "run")
    assert result.exit_code == 0, result.output
    from convtrain.nn.network import Network

    network = Network.load(in_tmp_cwd / "run" / "model.npz")
    assert network.input_shape == (1, 20, 24)
    assert network.meta["image_size"] == [20, 24] and network.meta["channels"] == 1
    predicted = invoke("predict", in_tmp_cwd / "run", next((cifar_folder / "dog").iterdir()))
    assert predicted.exit_code == 0, predicted.output


def test_fixed_train_val_test_folders_are_the_splits(tmp_path, cifar, in_tmp_cwd):
    root = tmp_path / "split"
    write_images(root, cifar, range(300), layout=lambda i: ("train", "train", "train", "val", "test")[i % 5])
    result = invoke(*FIT, "--data-path", root, "--out", in_tmp_cwd / "run", "--val-fraction", "0.3")
    assert result.exit_code == 0, result.output
    splits = load_dataset("folder", root, val_fraction=0.3)
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (180, 60, 60)
    assert "test" in result.stdout  # the fit reports test metrics
    limited = load_dataset("folder", root, limit=50)
    assert (len(limited.y_train), len(limited.y_val)) == (50, 60)


def test_a_val_class_missing_from_train_is_named(tmp_path):
    root = tmp_path / "split"
    tiny_folder(root / "train")
    tiny_folder(root / "val", classes=("a", "zebra"))
    result = invoke(*FIT, "--data-path", root)
    assert "zebra" in error_line(result) and "train/" in error_line(result)


def test_images_of_another_size_name_the_first_one_and_its_size(tmp_path):
    root = tiny_folder(tmp_path / "images")
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(root / "b" / "2.png")
    line = error_line(invoke(*FIT, "--data-path", root))
    assert "b/2.png" in line and "9x7" in line and "--image-size" in line


# ---- the cache -----------------------------------------------------------------------------


def test_the_second_read_comes_from_the_cache_in_under_a_second(tmp_path, cifar, in_tmp_cwd):
    root = tmp_path / "many"
    files = write_images(root, cifar, range(4000))
    for i in range(6000):  # 10,000 files in all: the rest are byte copies under new names
        source = files[i % len(files)]
        (source.parent / f"copy{i:05d}{source.suffix}").write_bytes(source.read_bytes())
    first = invoke(*FIT, "--data-path", root, "--limit", "100", "--out", in_tmp_cwd / "run")
    assert first.exit_code == 0, first.output
    started = time.perf_counter()
    splits = load_dataset("folder", root, limit=100)
    assert time.perf_counter() - started < 1.0
    assert "from the cache" in splits.source and "10000 images" in splits.source
    second = invoke(*FIT, "--data-path", root, "--limit", "100", "--out", in_tmp_cwd / "run2")
    assert second.exit_code == 0, second.output


def test_a_changed_file_invalidates_the_cache(tmp_path):
    root = tiny_folder(tmp_path / "images")
    assert "from the cache" not in load_dataset("folder", root).source
    assert "from the cache" in load_dataset("folder", root).source
    changed = root / "a" / "0.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    splits = load_dataset("folder", root, val_fraction=0)
    assert "from the cache" not in splits.source
    assert (splits.x_train == 7).all(axis=(1, 2, 3)).sum() == 1
    (root / "b" / "9.png").write_bytes((root / "b" / "1.png").read_bytes())
    assert len(load_dataset("folder", root, val_fraction=0).y_train) == 7


def test_a_corrupt_cache_file_is_rebuilt_not_trusted(tmp_path):
    root = tiny_folder(tmp_path / "images")
    expected = load_dataset("folder", root, val_fraction=0).x_train
    (cached,) = (tmp_path / "cache").glob("*.npz")
    for damage in (b"not a zip at all", cached.read_bytes()[:200], _claims_huge(cached)):
        cached.write_bytes(damage)
        splits = load_dataset("folder", root, val_fraction=0)
        assert "from the cache" not in splits.source and (splits.x_train == expected).all()


def _claims_huge(path: Path) -> bytes:
    """The cache with its x header claiming 10**6 rows."""
    data = path.read_bytes()
    header = data.find(b"'shape': (6, 3, 8, 8)")
    assert header > 0
    return data[:header] + b"'shape': (999999, 3, 8, 8)"[:22] + data[header + 22:]


def test_a_read_only_data_folder_still_caches(tmp_path):
    root = tiny_folder(tmp_path / "images")
    for folder in (root, root / "a", root / "b"):
        folder.chmod(0o555)
    try:
        load_dataset("folder", root)
        assert "from the cache" in load_dataset("folder", root).source
    finally:
        for folder in (root, root / "a", root / "b"):
            folder.chmod(0o755)


# ---- hostile folders -----------------------------------------------------------------------


def hostile(tmp_path, name: str) -> tuple[Path, str]:
    """A 2-class folder plus one bad thing; returns the folder and what the error must name."""
    root = tiny_folder(tmp_path / "images")
    if name == "truncated":
        data = (root / "a" / "0.png").read_bytes()
        (root / "a" / "bad.png").write_bytes(data[: len(data) // 2])
        return root, "bad.png"
    if name == "garbage":
        (root / "a" / "bad.jpg").write_bytes(b"\xff\xd8 this is no JPEG" * 10)
        return root, "bad.jpg"
    if name == "non-image":
        (root / "b" / "notes.txt").write_text("hello")
        return root, "notes.txt"
    if name == "bomb":
        # a PNG header that declares 20000 x 20000 pixels: refused before anything is decoded
        Image.new("1", (20000, 20000)).save(root / "b" / "bomb.png")
        return root, "bomb.png"
    if name == "symlink-loop":
        (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)
        return root, "loop"
    if name == "self-link":
        (root / "b" / "self.png").symlink_to(root / "b" / "self.png")
        return root, "self.png"
    if name == "fifo":
        os.mkfifo(root / "a" / "pipe.png")
        return root, "pipe.png"
    if name == "empty-class":
        (root / "c").mkdir()
        return root, "c"
    raise ValueError(name)


HOSTILE = ["truncated", "garbage", "non-image", "bomb", "symlink-loop", "self-link", "fifo", "empty-class"]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_bad_file_is_named_in_one_line(tmp_path, name, in_tmp_cwd):
    root, culprit = hostile(tmp_path, name)
    line = error_line(invoke(*FIT, "--data-path", root, "--batch-size", "2"))
    assert culprit in line and "--skip-bad-images" in line


@pytest.mark.parametrize("name", HOSTILE)
def test_skip_bad_images_counts_what_it_left_out(tmp_path, name, in_tmp_cwd):
    root, _ = hostile(tmp_path, name)
    splits = load_dataset("folder", root, folder=FolderOptions(skip_bad=True), val_fraction=0)
    assert "skipped 1 " in splits.source and len(splits.y_train) == 6
    assert splits.class_names == ["a", "b"]
    result = invoke(*FIT, "--data-path", root, "--skip-bad-images", "--batch-size", "2", "--val-fraction", "2",
                    "--out", in_tmp_cwd / "run")
    assert result.exit_code == 0, result.output


def test_the_bomb_limit_is_pillows_or_lower():
    assert MAX_IMAGE_PIXELS <= Image.MAX_IMAGE_PIXELS


def test_a_single_class_is_refused(tmp_path):
    root = tiny_folder(tmp_path / "images", classes=("only",))
    line = error_line(invoke(*FIT, "--data-path", root, "--batch-size", "2"))
    assert "at least 2 classes" in line and "only" in line


def test_a_folder_of_nothing_but_bad_files_says_so(tmp_path):
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"")
    line = error_line(invoke(*FIT, "--data-path", root, "--skip-bad-images"))
    assert "no readable images" in line and "2 unreadable images" in line


def test_a_hundred_thousand_tiny_files_fail_fast_or_are_counted(tmp_path):
    root = tiny_folder(tmp_path / "images")
    junk = root / "b" / "junk"
    junk.mkdir()
    for i in range(100_000):
        (junk / f"{i:06d}.png").write_bytes(b"")
    started = time.perf_counter()
    line = error_line(invoke(*FIT, "--data-path", root))
    assert "000000.png" in line
    assert time.perf_counter() - started < 30
    splits = load_dataset("folder", root, folder=FolderOptions(skip_bad=True), val_fraction=0)
    assert "skipped 100000 unreadable images" in splits.source and len(splits.y_train) == 6


def test_options_of_the_folder_are_refused_for_other_data(in_tmp_cwd):
    line = error_line(invoke("fit", "--data", "digits", "--image-size", "8x8", "--no-track", "--epochs", "1"))
    assert "--data folder" in line
    line = error_line(invoke(*FIT, "--data-path", in_tmp_cwd, "--image-size", "big"))
    assert "image_size" in line and "'big'" in line


def test_a_tracked_fit_logs_the_folder_as_datasets_with_digests(tmp_path, in_tmp_cwd):
    import mlflow

    root = tiny_folder(tmp_path / "images", per_class=6)
    uri = f"sqlite:///{in_tmp_cwd / 'mlflow.db'}"
    result = invoke("fit", "--data", "folder", "--data-path", root, "--epochs", "1", "--filters", "2",
                    "--batch-size", "4", "--val-fraction", "4", "--tracking-uri", uri, "-q")
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("convtrain").experiment_id])
    datasets = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert set(datasets) == {"folder-training", "folder-validation"}
    assert all(d.digest for d in datasets.values()) and str(root) in datasets["folder-training"].source


def test_bmp_gif_webp_and_palette_images_are_read(tmp_path):
    root = tmp_path / "formats"
    rng = np.random.default_rng(1)
    first, second = (rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(2))
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(first).save(root / "a" / "1.bmp")
    Image.fromarray(first).save(root / "a" / "2.webp", lossless=True)
    frames = [Image.fromarray(np.full((6, 5, 3), v, np.uint8)) for v in (40, 200)]
    frames[0].save(root / "b" / "1.gif", save_all=True, append_images=frames[1:])  # the first frame counts
    Image.fromarray(second).convert("P").save(root / "b" / "2.png")
    splits = load_dataset("folder", root, val_fraction=0)
    x = splits.x_train
    assert x.shape == (4, 3, 6, 5)
    assert (x[0] == first.transpose(2, 0, 1)).all() and (x[1] == first.transpose(2, 0, 1)).all()
    assert (x[2] == 40).all()
    gray = load_dataset("folder", root, val_fraction=0, folder=FolderOptions(channels=1)).x_train
    assert gray.shape == (4, 1, 6, 5)


def test_decoding_reports_progress_and_draws_a_bar_only_on_a_terminal(tmp_path):
    from convtrain.pipeline.image_folder import decode_progress

    root = tiny_folder(tmp_path / "images", per_class=100)
    calls = []
    load_dataset("folder", root, folder=FolderOptions(progress=lambda done, total: calls.append((done, total))))
    assert calls[-1] == (200, 200) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    with decode_progress() as progress:  # pytest's captured stderr is no terminal
        assert progress is None
