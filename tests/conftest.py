import os
import signal
from pathlib import Path

import pytest

# A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so
# would every process it starts: the Ctrl-C tests need Python's KeyboardInterrupt instead. A
# handler (unlike "ignored") is reset to the default in a child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def test_data_dir() -> Path:
    """The real data sets (../shared/data in CI), from CONVTRAIN_TEST_DATA; skips when unset."""
    value = os.environ.get("CONVTRAIN_TEST_DATA")
    if not value:
        pytest.skip("CONVTRAIN_TEST_DATA is not set")
    path = Path(value)
    # Set but wrong is a broken setup, not a reason to skip silently.
    assert path.is_dir(), f"CONVTRAIN_TEST_DATA={value} is not a directory"
    return path


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch) -> Path:
    """The test runs in its own empty folder, with no tracking store from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
