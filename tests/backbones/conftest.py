"""Session fixtures: the tiny reward models (built once per run; the tiny SD pipeline is in tests/conftest.py)."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.rewards.conftest import aesthetic_head_file, tiny_clip_dir, tiny_hps  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (``one_thread`` in tests/conftest.py)."""
