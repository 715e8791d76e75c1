import pytest
import torch
from diffusers import DDIMScheduler

from fastnabla.sampling import select_transitions
from fastnabla.transitions import make_scheduler
from fastnabla.transitions import transition_coefficients


def test_low_variance_one_per_chunk_plus_terminal():
    g = torch.Generator().manual_seed(0)
    sel = select_transitions(500, 50, 0.1, True, g)
    assert sel.shape == (500, 6)
    assert bool((sel[:, -1] == 49).all())
    for j in range(5):
        col = sel[:, j]
        assert bool(((col >= 10 * j) & (col < 10 * (j + 1))).all())
        assert bool((col != 49).all())
    # every non-terminal step of a chunk gets drawn
    assert set(sel[:, 0].tolist()) == set(range(10))
    assert set(sel[:, 4].tolist()) == set(range(40, 49))


def test_uniform_distinct_and_full():
    g = torch.Generator().manual_seed(1)
    sel = select_transitions(200, 50, 0.2, False, g)
    assert sel.shape == (200, 11)
    for row in sel:
        assert len(set(row[:-1].tolist())) == 10 and int(row[:-1].max()) < 49 and int(row[-1]) == 49
    full = select_transitions(3, 50, 1.0, True, g)
    assert torch.equal(full, torch.arange(50).expand(3, 50))


def test_indivisible_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        select_transitions(2, 50, 0.07, True, torch.Generator())


def test_make_scheduler_keeps_model_config_and_matches_step():
    base = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                         clip_sample=True, set_alpha_to_one=False).config
    s = make_scheduler("ddim", base, 50)
    assert not s.config.clip_sample and s.config.beta_schedule == "scaled_linear"
    assert int(s.timesteps[0]) == 981 and int(s.timesteps[-1]) == 1
    assert transition_coefficients(s, s.timesteps).std.min() > 0
    for kind in ("ddpm", "sde-dpmsolver++"):
        s2 = make_scheduler(kind, base, 20)
        assert len(s2.timesteps) == 20
