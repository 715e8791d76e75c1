"""AlignProp (methods/alignprop.py) against an independent chain: diffusers' ``scheduler.step`` per item, outputs
detached before the item's truncation step (toy2d, float64)."""
import torch

from fastnabla.methods.alignprop import AlignProp
from tests.helpers.baselines import (assert_grads_close, manual_chain, perturb_policy, policy_grads, resume_equals_uninterrupted,
                                     sampling_noise, toy_setup, two_epochs_sd, two_epochs_toy2d)


def test_truncated_chain_matches_an_independent_chain():
    cfg, bb, reward, c, tr = toy_setup("alignprop.grad_scale=0.3")
    perturb_policy(bb)
    m = AlignProp(bb, reward, c, cfg)
    j = torch.tensor([0, 4, 9, 7, 2])  # 0: the whole chain; 9: the last step only
    b = m.gather(tr, torch.stack([torch.arange(5), j], 1), "cpu")
    loss_b, stats = m(b)
    got = policy_grads(bb, loss_b.sum())
    x0, zs = sampling_noise(bb, 5, 3, 10)
    expect = []
    for i in range(5):
        xN, _ = manual_chain(bb, x0[i], [z[i] for z in zs], grad_steps=set(range(int(j[i]), 10)))
        expect.append(-0.3 * reward(xN[None], None, None)[0][0])
    expect = torch.stack(expect)
    torch.testing.assert_close(loss_b.double(), expect.double(), rtol=1e-5, atol=1e-8)
    assert_grads_close(got, policy_grads(bb, expect.sum()))
    assert torch.equal(stats["truncation"], j.to(stats["truncation"].dtype))


def test_the_chain_before_an_update_is_the_stored_trajectory():
    cfg, bb, reward, c, tr = toy_setup()
    m = AlignProp(bb, reward, c, cfg)
    b = m.gather(tr, torch.stack([torch.arange(5), torch.full((5,), 3)], 1), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(m.rollout(b, b.draw), tr.xs[:, -1], rtol=0, atol=1e-12)


def test_draws_cover_the_reference_range():
    cfg, bb, reward, c, _ = toy_setup(steps=50)
    d = AlignProp(bb, reward, c, cfg).select(3000, torch.Generator().manual_seed(0))
    assert set(d[:, 0].tolist()) == set(range(35, 46))  # 35…45 of 50, both ends, as the reference's randint


def test_two_epochs_toy2d(tmp_path):
    two_epochs_toy2d(tmp_path, "alignprop", "alignprop.truncation_range=[0.0,1.0]")


def test_two_epochs_tiny_sd(tiny_sd_dir, tmp_path):
    two_epochs_sd(tiny_sd_dir, tmp_path, "alignprop")


def test_resume_is_bit_exact(tmp_path):
    resume_equals_uninterrupted(tmp_path, "alignprop")
