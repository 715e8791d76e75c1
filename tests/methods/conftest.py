"""The methods' tests run single-threaded; the tiny SD pipeline fixture is tests/conftest.py's."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (``one_thread`` in tests/conftest.py)."""
