"""What the tests of the policy's fixed parts (``gfn.reward_guidance``, ``gfn.value_guidance``) share: a trainer's
sampled trajectories and final samples carry the method's guidance, and the reference draw does not."""
from __future__ import annotations

import torch


def assert_guided_sampling(tr, steps, n: int = 64, atol_ref: float = 1e-3) -> None:
    """The trainer's sampled outputs at ``steps`` are policy + guidance (the stored outputs carry the shift), its
    final samples are the guided sampler's at the same seed, and inside ``reference_sampling()`` they differ."""
    from fastnabla.sampling import sample_trajectories

    m, bb = tr.method, tr.backbone
    assert m.guide is not None
    traj = tr.sample(0)
    ts = bb.scheduler.timesteps
    for k in steps:
        x = traj.xs[:, k]
        with torch.no_grad():
            plain = bb.policy(x, ts[k].expand(x.shape[0]))
        torch.testing.assert_close(traj.outs[:, k] - plain, m.guidance(x, k, None, None), rtol=1e-5, atol=1e-6)
    samples, _ = tr.sample_final(n, seed=3)
    by_hand = sample_trajectories(bb, n, torch.Generator().manual_seed(3), tr.coeffs, keep_trajectory=False,
                                  guide=m.guidance).xs[:, -1]
    torch.testing.assert_close(samples, by_hand.cpu(), rtol=0, atol=0)
    with bb.reference_sampling():
        ref, _ = tr.sample_final(n, seed=3)
    assert not torch.allclose(ref, samples, atol=atol_ref)
