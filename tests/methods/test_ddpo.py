"""DDPO-clip (methods/ddpo.py): the clipped surrogate against torch.distributions and diffusers' own step mean and
variance, the advantages against a hand computation of ddpo-pytorch's per-prompt tracker (toy2d, float64)."""
import numpy as np
import pytest
import torch

from fastnabla.methods import TransitionBatch
from fastnabla.methods.ddpo import DDPO
from fastnabla.methods.nabla_gfn import NablaGFN
from tests.helpers.baselines import (assert_grads_close, perturb_policy, policy_grads, resume_equals_uninterrupted,
                                     toy_setup, two_epochs_sd, two_epochs_toy2d)


def test_clipped_surrogate_matches_an_independent_computation():
    eps = 0.05  # wide enough that some ratios are clipped and some are not
    cfg, bb, reward, c, tr = toy_setup(f"ddpo.clip_range={eps}", "ddpo.adv_clip_max=1.5")
    perturb_policy(bb, scale=0.05)
    m = DDPO(bb, reward, c, cfg)
    i = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    k = torch.tensor([0, 2, 5, 8, 9, 9, 3])
    adv = torch.tensor([0.7, -1.2, 3.0, -4.0, 0.1], dtype=torch.float64)  # ±3, ±4 are clipped to ±1.5
    tr.extras["advantages"] = adv
    b = TransitionBatch.gather(tr, torch.stack([i, k], 1), "cpu")
    loss_b, stats = m(b)
    got = policy_grads(bb, loss_b.sum())

    sched = bb.scheduler
    step = sched.config.num_train_timesteps // sched.num_inference_steps
    losses, ratios = [], []
    for j in range(len(i)):
        t = sched.timesteps[int(k[j])]
        x, x_next = tr.xs[i[j], k[j]][None], tr.xs[i[j], k[j] + 1][None]
        std = (sched._get_variance(t, t - step).double()).sqrt()

        def logp(out):
            mu = sched.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
            return torch.distributions.Normal(mu, std).log_prob(x_next).mean()

        r = (logp(bb.policy(x, t.view(1))) - logp(tr.outs[i[j], k[j]][None])).exp()
        a = adv[i[j]].clamp(-1.5, 1.5)
        losses.append(torch.maximum(-a * r, -a * r.clamp(1 - eps, 1 + eps)))
        ratios.append(r.detach())
    expect = torch.stack(losses)
    torch.testing.assert_close(loss_b, expect, rtol=1e-10, atol=1e-12)
    assert_grads_close(got, policy_grads(bb, expect.sum()), rtol=1e-9)
    torch.testing.assert_close(stats["ratio"], torch.stack(ratios), rtol=1e-10, atol=0)
    clipped = (torch.stack(ratios) - 1).abs() > eps
    assert 0 < int(clipped.sum()) < len(i) and torch.equal(stats["clipfrac"].bool(), clipped)


def test_ratio_is_one_before_an_update():
    cfg, bb, reward, c, tr = toy_setup()
    tr.extras["advantages"] = torch.ones(5, dtype=torch.float64)
    b = TransitionBatch.gather(tr, torch.stack([torch.arange(5), torch.tensor([0, 3, 6, 8, 9])], 1), "cpu")
    _, stats = DDPO(bb, reward, c, cfg)(b)
    torch.testing.assert_close(stats["ratio"], torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_advantages_per_prompt_tracker_as_ddpo_pytorch():
    cfg, bb, reward, c, _ = toy_setup("ddpo.buffer_size=3", "ddpo.min_count=3")
    m = DDPO(bb, reward, c, cfg)
    r1 = torch.tensor([1.0, 2.0, 4.0, 0.5, 3.0])
    p1 = ["a", "a", "b", "a", "b"]
    a1 = m.advantages(r1, p1)
    # epoch 1: "a" has 3 rewards (= min_count): its own statistics; "b" has 2: the whole batch's
    ra, rb = np.array([1.0, 2.0, 0.5]), r1.numpy().astype(np.float64)
    want = np.empty(5)
    want[[0, 1, 3]] = (ra - ra.mean()) / (ra.std() + 1e-6)
    want[[2, 4]] = (np.array([4.0, 3.0]) - rb.mean()) / (rb.std() + 1e-6)
    np.testing.assert_allclose(a1.numpy(), want, rtol=1e-6)
    # epoch 2: the buffers keep the last 3 rewards per prompt, across epochs
    r2 = torch.tensor([5.0, 1.5])
    a2 = m.advantages(r2, ["a", "b"])
    buf_a, buf_b = np.array([2.0, 0.5, 5.0]), np.array([4.0, 3.0, 1.5])
    np.testing.assert_allclose(a2.numpy(), [(5.0 - buf_a.mean()) / (buf_a.std() + 1e-6),
                                            (1.5 - buf_b.mean()) / (buf_b.std() + 1e-6)], rtol=1e-6)
    # the buffers travel through a checkpoint
    m2 = DDPO(bb, reward, c, cfg)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.advantages(r2, ["a", "b"]), m.advantages(r2, ["a", "b"]))


def test_advantages_without_prompts_normalise_over_the_batch():
    cfg, bb, reward, c, _ = toy_setup()
    r = torch.tensor([0.3, -1.0, 2.0, 0.0])
    a = DDPO(bb, reward, c, cfg).advantages(r, None)
    np.testing.assert_allclose(a.numpy(), (r.numpy() - r.numpy().mean()) / (r.numpy().std() + 1e-8), rtol=1e-6)


def test_select_and_stateless_methods_refuse_foreign_state():
    cfg, bb, reward, c, _ = toy_setup("ddpo.timestep_fraction=0.5")
    s = DDPO(bb, reward, c, cfg).select(4, torch.Generator().manual_seed(0))
    assert s.shape == (4, 5) and all(len(set(row.tolist())) == 5 for row in s) and int(s.max()) <= 9
    cfg1, *_ = toy_setup()
    assert torch.equal(DDPO(bb, reward, c, cfg1).select(2, torch.Generator()), torch.arange(10).expand(2, 10))
    with pytest.raises(ValueError, match="method.name=nabla_gfn keeps no state"):
        NablaGFN(bb, reward, c, cfg1).load_state_dict({"stats": {}})


def test_two_epochs_toy2d(tmp_path):
    tr = two_epochs_toy2d(tmp_path, "ddpo", "ddpo.clip_range=0.2", "train.lr=1e-3")
    assert {"ratio", "approx_kl", "clipfrac", "advantage"} <= set(tr.history[0])


def test_two_epochs_tiny_sd(tiny_sd_dir, tmp_path):
    """Prompts: the per-prompt tracker's buffers are filled and stored in the trainer's checkpoint."""
    tr = two_epochs_sd(tiny_sd_dir, tmp_path, "ddpo", "ddpo.timestep_fraction=0.5", "ddpo.clip_range=0.2")
    assert sum(len(v) for v in tr.method.stats.values()) == 2 * 4
    state = torch.load(tmp_path / "run" / "checkpoints" / sorted((tmp_path / "run" / "checkpoints").iterdir())[-1].name
                       / "state.pt", weights_only=False)
    assert state["method"] == tr.method.state_dict()


def test_resume_is_bit_exact(tmp_path):
    resume_equals_uninterrupted(tmp_path, "ddpo", "train.batch_size=64")
