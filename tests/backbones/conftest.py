"""Session fixtures: the tiny SD pipeline and the tiny reward models (built once per run)."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.helpers.tiny_sd import make_tiny_sd  # noqa: E402
from tests.rewards.conftest import aesthetic_head_file, tiny_clip_dir, tiny_hps  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (``one_thread`` in tests/conftest.py)."""
