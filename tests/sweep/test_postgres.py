"""Two sweep processes -- stand-ins for two machines -- share one study on a real PostgreSQL.

.ci/postgres.sh starts a throw-away cluster and exports CONVTRAIN_TEST_POSTGRES_URL; without
it this test skips.
"""

import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest

from convtrain.sweep.study import with_driver
from tests.support import sweep_fakes
from tests.support.sweep_fakes import calls

URL = os.environ.get("CONVTRAIN_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="CONVTRAIN_TEST_POSTGRES_URL is not set (see .ci/postgres.sh)")


@pytest.fixture
def fresh_database():
    """A new, empty database, so the processes also race to create Optuna's tables."""
    import sqlalchemy

    server = sqlalchemy.create_engine(with_driver(URL), isolation_level="AUTOCOMMIT")
    name = f"sweep_{uuid.uuid4().hex[:8]}"
    with server.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    yield sqlalchemy.engine.make_url(URL).set(database=name).render_as_string(hide_password=False)
    with server.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    server.dispose()


def test_two_processes_on_one_postgresql_study_share_its_trials(tmp_path, fresh_database):
    url = fresh_database
    name = f"shared-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "calls.jsonl"
    root = Path(__file__).parents[2]
    env = {**os.environ, "SWEEP_FAKE_LOG": str(log), "SWEEP_FAKE_BARRIER": "2",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    machines = []
    for machine in ("a", "b"):  # each in its own folder, as on its own disk
        folder = tmp_path / machine
        folder.mkdir()
        (folder / "sweep.toml").write_text(f"""
[fit]
epochs = 2
track = false
[sweep]
name = "{name}"
method = "tpe"
n_trials = 8
[space]
l2 = {{low = 1e-5, high = 1e-1, log = true}}
filters = [[4, 8], [8, 16]]
""")
        machines.append(subprocess.Popen([sys.executable, sweep_fakes.__file__, "sweep.toml", "--storage", url],
                                         cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True))
    outputs = [p.communicate(timeout=240)[0] for p in machines]
    assert [p.returncode for p in machines] == [0, 0], outputs

    study = optuna.load_study(study_name=name, storage=with_driver(url))
    assert Counter(t.state.name for t in study.get_trials()) == {"COMPLETE": 8}
    records = calls(log)
    assert sorted(r["trial"] for r in records) == list(range(8))  # each trial ran once, somewhere
    by_process = Counter(r["pid"] for r in records)
    assert len(by_process) == 2, by_process  # and both machines took part
    assert {r["out"].split("/")[1] for r in records} == {name}
