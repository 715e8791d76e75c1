import os

# The Triton interpreter must be switched on before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# the repository root on sys.path, so test modules import tests.helpers however pytest is started
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture
def one_thread():
    """Tiny models: thread start-up costs more than it saves (8× slower with 2 threads on a busy 2-core box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny random SD pipeline (tests/helpers/tiny_sd.py), built once per run for every folder that needs it."""
    from tests.helpers.tiny_sd import make_tiny_sd

    return make_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))

