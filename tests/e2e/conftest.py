import os
from pathlib import Path

import pytest

from tests.support.cli import TINY, invoke


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny digits fit (untracked): out/ with model.npz, checkpoint.npz, config.toml."""
    folder = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = invoke("fit", *TINY, "--no-track", "--out", "out", "--quiet")
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return folder / "out"
