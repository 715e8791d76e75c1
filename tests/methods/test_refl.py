"""ReFL (methods/refl.py) against an independent chain: diffusers' ``scheduler.step`` on each item, with the noise
regenerated from the sampling generator (toy2d, float64)."""
import pytest
import torch

from fastnabla.methods.refl import ReFL
from tests.helpers.baselines import (assert_grads_close, manual_chain, perturb_policy, policy_grads, resume_equals_uninterrupted,
                                     sampling_noise, toy_setup, two_epochs_sd, two_epochs_toy2d)


@pytest.mark.parametrize("over", [(), ("refl.reward_margin=-1.0", "refl.pretrain_scale=0.5", "refl.grad_scale=2.0")])
def test_loss_and_gradient_match_an_independent_chain(over):
    cfg, bb, reward, c, tr = toy_setup(*over)
    perturb_policy(bb)  # the re-run chain uses the current policy, not the stored states
    m = ReFL(bb, reward, c, cfg)
    k = torch.tensor([0, 3, 5, 9, 9])
    b = m.gather(tr, torch.stack([torch.arange(5), k], 1), "cpu")
    loss_b, stats = m(b)
    got = policy_grads(bb, loss_b.sum())

    rc, sched = cfg.refl, bb.scheduler
    x0, zs = sampling_noise(bb, 5, 3, 10)
    losses = []
    for i in range(5):
        zi = [z[i] for z in zs]
        xk, _ = manual_chain(bb, x0[i], zi, grad_steps=set(), stop=int(k[i]))
        xk = xk.detach()
        t = sched.timesteps[int(k[i])]
        out = bb.policy(xk[None], t.view(1))
        x_hat = sched.step(out, t, xk[None], eta=1.0, variance_noise=zi[int(k[i])][None]).pred_original_sample
        log_r = reward(x_hat, None, None)[0][0]
        li = -log_r if rc.reward_margin is None else torch.relu(rc.reward_margin - log_r)
        li = rc.grad_scale * li
        if rc.pretrain_scale:
            li = li + rc.pretrain_scale * (out - bb.reference(xk[None], t.view(1))).square().mean()
        losses.append(li)
    expect = torch.stack(losses)
    torch.testing.assert_close(loss_b.double(), expect.double(), rtol=1e-5, atol=1e-8)  # rewards are fp32
    assert_grads_close(got, policy_grads(bb, expect.sum()))
    assert torch.equal(stats["step"], k.double())


def test_rechained_states_reproduce_the_stored_trajectory_before_an_update():
    cfg, bb, reward, c, tr = toy_setup()
    m = ReFL(bb, reward, c, cfg)
    k = torch.tensor([1, 4, 6, 9, 0])
    b = m.gather(tr, torch.stack([torch.arange(5), k], 1), "cpu")
    torch.testing.assert_close(m.states_at(b, k), tr.xs[torch.arange(5), k], rtol=0, atol=1e-12)


def test_draws_cover_the_reference_range():
    cfg, bb, reward, c, _ = toy_setup(steps=40)
    m = ReFL(bb, reward, c, cfg)
    d = m.select(2000, torch.Generator().manual_seed(0))
    assert d.shape == (2000, 1) and set(d[:, 0].tolist()) == set(range(30, 40))  # 30…39 of 40, as train_refl


def test_two_epochs_toy2d(tmp_path):
    two_epochs_toy2d(tmp_path, "refl", "refl.pretrain_scale=0.1")


def test_two_epochs_tiny_sd(tiny_sd_dir, tmp_path):
    two_epochs_sd(tiny_sd_dir, tmp_path, "refl", "refl.step_range=[0.5,1.0]")


def test_resume_is_bit_exact(tmp_path):
    resume_equals_uninterrupted(tmp_path, "refl")
