"""The tiny SD pipeline fixture for the methods' SD runs (built once per session, as in tests/backbones)."""
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.helpers.tiny_sd import make_tiny_sd  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd_methods")))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (``one_thread`` in tests/conftest.py)."""
