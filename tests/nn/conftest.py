"""Fixtures shared by the engine's tests."""

import pytest

import convtrain


@pytest.fixture
def threads():
    """Restore the kernels' thread count after a test changes it."""
    before = convtrain.get_num_threads()
    yield
    convtrain.set_num_threads(before)
