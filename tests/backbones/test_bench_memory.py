"""The memory benchmark's optimizer-state accounting (the step measurement is exercised by running it)."""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(ROOT, "benchmarks", "bench_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_optimizer_state_bytes():
    pytest.importorskip("bitsandbytes")
    bench = _bench()
    shapes = [(320, 320), (64, 8), (320,)]
    n = sum(torch.Size(s).numel() for s in shapes)
    assert bench.optimizer_state_bytes(shapes, "adamw") == 2 * 4 * n  # exp_avg + exp_avg_sq in fp32
    b8 = bench.optimizer_state_bytes(shapes, "adamw8bit")
    # bitsandbytes keeps tensors under 4096 elements in 32-bit; the big one costs 1 byte per element and state,
    # plus per-block absmax and the two 256-entry quantisation maps (counted: they are in the state)
    small = 64 * 8 + 320
    big8 = 2 * 320 * 320
    assert big8 + 2 * 4 * small <= b8 <= big8 * 1.05 + 2 * 4 * small + 2 * 256 * 4
    one = [(320, 320)]
    assert bench.optimizer_state_bytes(one, "adamw8bit") / bench.optimizer_state_bytes(one, "adamw") < 0.3
