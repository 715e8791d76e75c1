import math

import torch

from fastnabla.backbones.toy2d import Toy2DBackbone, mixture_from_config, tilted_weights, total_variation
from fastnabla.config import load_config


def _bb():
    return Toy2DBackbone.from_config(load_config(None, []))


def test_exact_eps_is_the_score_of_the_noised_mixture():
    bb = _bb().double()
    x = torch.randn(5, 2, dtype=torch.float64) * 2
    for t in (1, 301, 981):
        a = float(bb.alphas_cumprod[t])
        xr = x.clone().requires_grad_(True)
        var = a * 0.25**2 + 1 - a
        comps = [torch.distributions.MultivariateNormal(math.sqrt(a) * m.double(), var * torch.eye(2, dtype=torch.float64))
                 for m in bb.means]
        logp = torch.logsumexp(torch.stack([c.log_prob(xr) for c in comps], 1) + bb.weights.double().log(), 1)
        (score,) = torch.autograd.grad(logp.sum(), xr)
        eps = bb.exact_eps(x, torch.full((5,), t))
        torch.testing.assert_close(eps, -math.sqrt(1 - a) * score, rtol=1e-6, atol=1e-8)


def test_tilted_weights_match_numerical_integration():
    means, stds, w = mixture_from_config([-2.0, 0.0, 2.0], 0.25)
    c, width, beta = [1.0, 0.5], 1.0, 2.0
    exact = tilted_weights(means, stds, w, c, width, beta)
    g = torch.linspace(-5, 5, 801, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    logr = -beta * ((pts - torch.tensor(c, dtype=torch.float64)) ** 2).sum(1) / (2 * width**2)
    mass = []
    for m, s in zip(means, stds):
        logp = -((pts - m) ** 2).sum(1) / (2 * s**2) - math.log(2 * math.pi * s**2)
        mass.append(torch.exp(logp + logr).sum())
    num = torch.stack(mass) * w
    torch.testing.assert_close(exact, num / num.sum(), rtol=1e-6, atol=1e-9)
    # the prior is far from the default target: TV ≈ 0.48
    prior = _bb().sample_prior(20000, torch.Generator().manual_seed(0))
    tv, off = total_variation(prior, means, tilted_weights(means, stds, w, [1.0, 0.5], 1.0, 1.0))
    assert 0.45 < tv < 0.52 and off < 0.02


def test_exact_target_sampler_has_zero_tv():
    bb = _bb()
    s = bb.sample_target(20000, torch.Generator().manual_seed(1), [1.0, 0.5], 1.0, 1.0)
    tv, off = total_variation(s, bb.means, bb.target_weights([1.0, 0.5], 1.0, 1.0))
    assert tv < 0.02 and 0.005 < off < 0.02  # e^-4.5 ≈ 1.1% of exact samples lie beyond 0.75


def test_zero_init_policy_equals_reference_and_flow_is_zero():
    bb = _bb()
    x, t = torch.randn(7, 2), torch.full((7,), 501)
    assert torch.equal(bb.policy(x, t), bb.reference(x, t))
    assert torch.equal(bb.flow(x, t), torch.zeros(7, 2))


def test_sampling_timesteps_list_reaches_the_sampler():
    """``sampling.timesteps`` builds the backbone's scheduler on that list; its steps are DDPM's posterior there."""
    from diffusers import DDPMScheduler

    from fastnabla.sampling import step_coefficients
    from fastnabla.transitions import ListedDDIMScheduler, transition_coefficients

    ts = [961, 700, 420, 300, 90, 1]
    bb = Toy2DBackbone.from_config(load_config(None, ["sampling.num_steps=6", "sampling.timesteps=[961,700,420,300,90,1]",
                                                      "gfn.timestep_fraction=0.5"]))
    assert isinstance(bb.scheduler, ListedDDIMScheduler) and bb.scheduler.timesteps.tolist() == ts
    c = step_coefficients(bb)
    p = DDPMScheduler.from_config({**bb.scheduler.config, "variance_type": "fixed_small"})
    p.set_timesteps(timesteps=ts)
    ref = transition_coefficients(p, ts[:-1])
    for name in ("coef_x", "coef_out", "std"):
        torch.testing.assert_close(getattr(c, name)[:-1], getattr(ref, name), rtol=1e-5, atol=1e-7)
