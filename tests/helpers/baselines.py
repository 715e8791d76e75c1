"""What the baseline methods' tests share: a float64 toy2d set-up, an independent per-item sampling chain (diffusers'
own ``scheduler.step`` with the noise regenerated from the sampling generator), short toy2d/tiny-SD runs and the
bit-exact resume check."""
from __future__ import annotations

import json
import signal

import torch

from fastnabla.backbones.toy2d import Toy2DBackbone
from fastnabla.config import load_config
from fastnabla.rewards import build_reward
from fastnabla.sampling import sample_trajectories
from fastnabla.transitions import transition_coefficients

TOY_FAST = ["sampling.batch_size=32", "sampling.num_steps=10", "eval.num_samples=256", "eval.every=0",
            "logging.progress=false", "logging.plots=false", "checkpoint.every=0", "train.batch_size=8",
            "train.gradient_accumulation_steps=2", "model.hidden=32"]

SD_BASE = [
    "model.backbone=sd", "model.resolution=32", "model.flow_channels=[8,16]", "model.dtype=fp32",
    "reward.name=brightness", "sampling.num_steps=4", "sampling.batch_size=4", "sampling.num_batches=1",
    "train.epochs=2", "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.lr=0.01",
    "eval.every=0", "eval.num_samples=2", "checkpoint.every=0", "logging.progress=false", "logging.plots=false",
    "prompts.train=simple_animals",
]


def toy_setup(*over, n=5, seed=3, steps=10):
    """float64 toy2d with a non-zero residual, its coefficients, a reward, a config and n sampled trajectories."""
    cfg = load_config(None, [f"sampling.num_steps={steps}", *over])
    torch.manual_seed(0)
    bb = Toy2DBackbone.from_config(cfg).double()
    with torch.no_grad():
        for p in bb.residual.head.parameters():
            p.normal_(0, 0.3)
    reward = build_reward("gaussian_bump", {"center": [1.0, 0.5], "width": 0.8})
    c = transition_coefficients(bb.scheduler, bb.scheduler.timesteps, eta=bb.eta, dtype=torch.float64)
    # diffusers' step computes with the scheduler's own ᾱ table: float64 (same values) so that the independent chain
    # is not rounded to fp32
    bb.scheduler.alphas_cumprod = bb.scheduler.alphas_cumprod.double()
    bb.scheduler.final_alpha_cumprod = torch.as_tensor(bb.scheduler.final_alpha_cumprod).double()
    tr = sample_trajectories(bb, n, torch.Generator().manual_seed(seed), c)
    return cfg, bb, reward, c, tr


def sampling_noise(bb, n, seed, steps):
    """x_0 and z_0..z_{N−1} as ``sample_trajectories`` draws them from ``Generator().manual_seed(seed)`` (float32 draws
    cast to float64)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *bb.sample_shape), generator=g).double()
    zs = [torch.randn((n, *bb.sample_shape), generator=g).double() for _ in range(steps)]
    return x0, zs


def perturb_policy(bb, seed=7, scale=0.2):
    """Move the policy away from the one that sampled the trajectories (so re-running the chain matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bb.residual.head.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def manual_chain(bb, x0, zs, grad_steps, stop=None, eta=1.0):
    """One item's chain with diffusers' ``scheduler.step``: the policy's output differentiated at the steps in
    ``grad_steps`` and detached elsewhere. Returns (x_stop, [pred_original_sample of each step])."""
    sched = bb.scheduler
    stop = len(sched.timesteps) if stop is None else stop
    x, preds = x0[None], []
    for k in range(stop):
        t = sched.timesteps[k]
        out = bb.policy(x, t.view(1))
        if k not in grad_steps:
            out = out.detach()
        res = sched.step(out, t, x, eta=eta, variance_noise=zs[k][None])
        x = res.prev_sample
        preds.append(res.pred_original_sample)
    return x[0], [p[0] for p in preds]


def policy_grads(bb, loss):
    params = list(bb.policy_parameters())
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_close(a, b, rtol=1e-5):
    """Parameter gradients equal up to the fp32 rounding of the rewards (tolerance relative to each one's scale)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.abs().max()) + 1e-12)


def toy_cfg(tmp, *extra):
    return load_config(None, TOY_FAST + list(extra), output_dir=str(tmp))


def params(tr):
    return torch.cat([p.detach().flatten() for p in tr.backbone.policy_parameters()])


def two_epochs_toy2d(tmp, method, *extra):
    """A 2-epoch toy2d run: finite losses, no skipped update, the policy moved, the flow untouched, outputs written."""
    from fastnabla.trainer import build_trainer

    tr = build_trainer(toy_cfg(tmp, f"method.name={method}", "train.epochs=2", *extra))
    before = params(tr).clone()
    flow_before = [p.detach().clone() for p in tr.backbone.flow_parameters()]
    res = tr.run()
    assert len(tr.history) == 2 and all(h["skipped"] == 0 for h in tr.history)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in tr.history)
    assert not torch.equal(before, params(tr))
    assert all(torch.equal(a, b) for a, b in zip(flow_before, tr.backbone.flow_parameters()))
    assert "tv" in res and (tmp / "final" / "trainables.pt").exists()
    return tr


def two_epochs_sd(sd_dir, tmp, method, *extra):
    """A 2-epoch run on the tiny random SD pipeline (LoRA, CFG, prompts, VAE decode, brightness reward)."""
    from fastnabla.trainer import build_trainer

    cfg = load_config(None, SD_BASE + [f"model.pretrained={sd_dir}", f"method.name={method}", *extra],
                      output_dir=str(tmp / "run"))
    tr = build_trainer(cfg)
    before = [p.detach().clone() for p in tr.backbone.policy_parameters()]
    tr.run()
    assert len(tr.history) == 2 and all(h["skipped"] == 0 for h in tr.history)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in tr.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.backbone.policy_parameters()))
    return tr


def resume_equals_uninterrupted(tmp, method, *extra):
    """Interrupt a 3-epoch toy2d run in epoch 1 and resume it: parameters and metrics equal the uninterrupted run."""
    from fastnabla.trainer import build_trainer

    args = (f"method.name={method}", "train.epochs=3", *extra)
    a = build_trainer(toy_cfg(tmp / "a", *args))
    a.run()
    per_epoch = a.engine.updates // 3
    c = build_trainer(toy_cfg(tmp / "c", *args))
    real_update, count = c.update, {"n": 0}
    assert per_epoch >= 2

    def update(*a_, **kw):  # the signal arrives during update per_epoch + 1: epoch 1 stops after its first update
        count["n"] += 1
        if count["n"] == per_epoch + 1:
            c._stop_signal = signal.SIGTERM
        return real_update(*a_, **kw)

    c.update = update
    res = c.run()
    assert res["stopped"] and c.epoch == 1 and c.update_in_epoch == 1
    d = build_trainer(toy_cfg(tmp / "c", *args, "checkpoint.resume_from=latest"))
    d.run()
    assert torch.equal(params(a), params(d))
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    ha = [strip(json.loads(line)) for line in open(tmp / "a" / "metrics.jsonl")]
    hd = [strip(json.loads(line)) for line in open(tmp / "c" / "metrics.jsonl")]
    assert ha == hd
    return a
