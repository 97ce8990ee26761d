"""A local tracking store that cannot be used is one line naming the file and what to do, for
`fit` and `ui` alike, before any work; an absent or empty one is built whole
(tests/e2e/test_store_races.py kills and races the creation)."""

from __future__ import annotations

import sqlite3

import pytest

from tests.support.cli import free_port, invoke


@pytest.fixture(scope="module")
def whole_store(tmp_path_factory) -> bytes:
    """The bytes of a freshly created MLflow store."""
    from convtrain.tracking.store import client_for

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    client_for(f"sqlite:///{path}").search_experiments()
    return path.read_bytes()


def half_made(path, whole: bytes) -> None:
    """What a creation cut short leaves: MLflow's tables with a batch migration's copy still there."""
    path.write_bytes(whole)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE _alembic_tmp_metrics (key VARCHAR(250))")


BROKEN = {
    "half-made": (half_made, "was left half-made by an interrupted creation or upgrade (table "
                             "_alembic_tmp_metrics); it holds no runs: move it away or delete it"),
    "random bytes": (lambda path, whole: path.write_bytes(bytes(range(256)) * 40),
                     "is not an SQLite database (damaged, or another kind of file); move it away"),
    "damaged": (lambda path, whole: path.write_bytes(whole[:100] + b"\xff" * 4000),
                "cannot be opened as an SQLite database"),
    "a folder": (lambda path, whole: path.mkdir(), "is a folder, not an MLflow SQLite file; move it away"),
    "another database": (lambda path, whole: sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit(),
                         "is an SQLite database but not an MLflow store"),
}


@pytest.mark.parametrize("case", list(BROKEN))
@pytest.mark.parametrize("command", ["fit", "ui"])
def test_a_broken_store_is_one_line_naming_it_before_any_work(tmp_path, monkeypatch, whole_store, case, command):
    monkeypatch.chdir(tmp_path)
    make, expected = BROKEN[case]
    store = tmp_path / "mlflow.db"
    make(store, whole_store)
    args = ["fit", "--epochs", "1", "--limit", "200", "--quiet"] if command == "fit" else ["ui", "--port", free_port()]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: tracking store {store} ") and expected in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_an_empty_file_is_replaced_by_a_whole_store(tmp_path):
    from convtrain.tracking.sqlite_store import check_existing_store
    from convtrain.tracking.store import client_for

    store = tmp_path / "mlflow.db"
    store.touch()
    client = client_for(f"sqlite:///{store}")
    assert client.create_experiment("e")
    assert check_existing_store(store) is True
