"""DRaFT-K and DRaFT-LV (methods/draft.py) against an independent chain: diffusers' ``scheduler.step`` per item with
the regenerated sampling noise, and DRaFT-LV's re-noising written from ᾱ directly (toy2d, float64)."""
import pytest
import torch

from fastnabla.config import ConfigError, load_config
from fastnabla.methods.draft import DRaFT
from tests.helpers.baselines import (assert_grads_close, manual_chain, perturb_policy, policy_grads, resume_equals_uninterrupted,
                                     sampling_noise, toy_setup, two_epochs_sd, two_epochs_toy2d)


@pytest.mark.parametrize("K", [1, 3, 10])
def test_draft_k_matches_an_independent_chain(K):
    cfg, bb, reward, c, tr = toy_setup(f"draft.k={K}", "draft.grad_scale=0.5")
    perturb_policy(bb)
    m = DRaFT(bb, reward, c, cfg)
    b = m.gather(tr, torch.stack([torch.arange(5), torch.zeros(5, dtype=torch.long)], 1), "cpu")
    loss_b, stats = m(b)
    got = policy_grads(bb, loss_b.sum())
    x0, zs = sampling_noise(bb, 5, 3, 10)
    expect = []
    for i in range(5):
        xN, _ = manual_chain(bb, x0[i], [z[i] for z in zs], grad_steps=set(range(10 - K, 10)))
        expect.append(-0.5 * reward(xN[None], None, None)[0][0])
    expect = torch.stack(expect)
    torch.testing.assert_close(loss_b.double(), expect.double(), rtol=1e-5, atol=1e-8)
    assert_grads_close(got, policy_grads(bb, expect.sum()))


def test_draft_lv_matches_renoised_one_step_predictions():
    n = 3
    cfg, bb, reward, c, tr = toy_setup(f"draft.lv_copies={n}")
    perturb_policy(bb)
    m = DRaFT(bb, reward, c, cfg)
    b = m.gather(tr, torch.stack([torch.arange(5), torch.zeros(5, dtype=torch.long)], 1), "cpu")
    torch.manual_seed(11)
    loss_b, _ = m(b)
    got = policy_grads(bb, loss_b.sum())

    sched = bb.scheduler
    t = sched.timesteps[-1]
    a = sched.alphas_cumprod[t].double()
    x0, zs = sampling_noise(bb, 5, 3, 10)
    xN = torch.stack([manual_chain(bb, x0[i], [z[i] for z in zs], grad_steps=set())[0] for i in range(5)]).detach()
    torch.manual_seed(11)
    eps = torch.randn((n, 5, 2), dtype=torch.float64)
    per_copy = []
    for j in range(n):
        x1 = a.sqrt() * xN + (1 - a).sqrt() * eps[j]
        x_hat = (x1 - (1 - a).sqrt() * bb.policy(x1, t.expand(5))) / a.sqrt()
        per_copy.append(-reward(x_hat, None, None)[0])
    expect = torch.stack(per_copy).mean(0)
    torch.testing.assert_close(loss_b.double(), expect.double(), rtol=1e-5, atol=1e-8)
    assert_grads_close(got, policy_grads(bb, expect.sum()))


def test_checkpointing_changes_nothing_but_memory():
    grads = []
    for ck in ("true", "false"):
        cfg, bb, reward, c, tr = toy_setup("draft.k=4", f"draft.checkpointing={ck}")
        perturb_policy(bb)
        m = DRaFT(bb, reward, c, cfg)
        b = m.gather(tr, torch.stack([torch.arange(5), torch.zeros(5, dtype=torch.long)], 1), "cpu")
        grads.append(policy_grads(bb, m(b)[0].sum()))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_lv_needs_k_one():
    with pytest.raises(ConfigError, match="draft.lv_copies: DRaFT-LV differentiates the last step only; set draft.k=1"):
        load_config(None, ["method.name=draft", "draft.k=2", "draft.lv_copies=2"])


def test_two_epochs_toy2d(tmp_path):
    two_epochs_toy2d(tmp_path, "draft", "draft.k=2")


def test_two_epochs_toy2d_lv(tmp_path):
    two_epochs_toy2d(tmp_path, "draft", "draft.lv_copies=2")


def test_two_epochs_tiny_sd(tiny_sd_dir, tmp_path):
    two_epochs_sd(tiny_sd_dir, tmp_path, "draft", "draft.k=2")


@pytest.mark.parametrize("extra", [(), ("draft.lv_copies=2",)])
def test_resume_is_bit_exact(tmp_path, extra):
    """DRaFT-LV's re-noising draws from the global RNG, which the checkpoint carries."""
    resume_equals_uninterrupted(tmp_path, "draft", *extra)
