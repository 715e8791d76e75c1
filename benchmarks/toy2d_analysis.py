"""What limits toy2d, measured with the closed-form tilt h_t(x) = E_{p_ref}[R(x0)^β | x_t = x].

    python benchmarks/toy2d_analysis.py                                  # floor, where the tilt matters, FL error
    python benchmarks/toy2d_analysis.py --trainables runs/toy2d/final/trainables.pt   # + a trained model, step by step

For the Gaussian mixture prior and the Gaussian-bump reward, h_t is a mixture of Gaussian integrals, so the exact
residual flow score ∇log h_t — what ∇log F̃ should be — is known at every state. The script reports:
1. TV of the exact tilted sampler (ε_ref − √(1−ᾱ)·∇log h_t) over the configured DDIM steps: the floor;
2. TV when the exact tilt is applied only from step K0 on: which noise levels decide the mode weights;
3. the relative error of the forward-looking term β·γ·∇log R(x̂0) against ∇log h_t, per γ mode;
4. with --trainables: per step, the error of the learned g + r and of the policy's tilt d = coef_out·(out −
   out_ref)/σ² against the exact values.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "toy2d.yaml"))
    p.add_argument("--trainables", default=None, help="final/trainables.pt of a toy2d run")
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    from fastnabla.backbones.toy2d import Toy2DBackbone, total_variation
    from fastnabla.config import load_config
    from fastnabla.methods.nabla_gfn import NablaGFN
    from fastnabla.rewards import build_reward
    from fastnabla.sampling import sample_trajectories, step_coefficients

    torch.set_default_dtype(torch.float64)
    cfg = load_config(a.config, a.overrides)
    center, width, beta = torch.tensor(cfg.reward.center), cfg.reward.width, cfg.gfn.reward_scale
    bb = Toy2DBackbone.from_config(cfg).double()
    c = step_coefficients(bb).to(torch.float64)
    ts = bb.scheduler.timesteps
    s2 = float(bb.stds[0]) ** 2
    target = bb.target_weights(cfg.reward.center, width, beta)

    def log_h(x, t):
        """log E[R(x0)^β | x_t = x] for the mixture (all components share the std)."""
        al = bb.alphas_cumprod[t].double().view(-1, 1)
        var_t = al * s2 + 1 - al
        diff = x[:, None, :] - al.sqrt()[:, None] * bb.means.double()[None]
        log_pi = torch.log_softmax(-(diff**2).sum(-1) / (2 * var_t) + bb.weights.double().log(), 1)
        v = s2 * (1 - al) / var_t  # posterior variance of x0 given x_t and the component
        m = bb.means.double()[None] + (s2 * al.sqrt() / var_t)[:, None] * diff
        vv = v + width**2 / beta
        log_e = (math.log(width**2 / beta) - torch.log(vv)) - ((m - center) ** 2).sum(-1) / (2 * vv)
        return torch.logsumexp(log_pi + log_e, 1)

    def grad_log_h(x, t):
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(log_h(xr, t).sum(), xr)
        return g

    class Tilt(torch.nn.Module):
        def __init__(self, from_step=0):
            super().__init__()
            self.t_max = int(ts[from_step]) if from_step < len(ts) else -1

        def forward(self, x, t):
            al = bb.alphas_cumprod[t].double().view(-1, 1)
            on = (t <= self.t_max).double().view(-1, 1)
            return on * -(1 - al).sqrt() * grad_log_h(x, t)

    trained = bb.residual
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    print(f"reward center {cfg.reward.center}, width {width}, β {beta}; {len(ts)} steps")
    for k0 in [0, 10, 15, 20, 25, 30, 35, 40, 45]:
        bb.residual = Tilt(k0)
        tr = sample_trajectories(bb, a.samples, gen(), c)
        tv, off = total_variation(tr.xs[:, -1], bb.means, target)
        label = "exact tilted sampler (the floor)" if k0 == 0 else f"exact tilt only for t ≤ {int(ts[k0])}"
        print(f"  {label:40s} TV {tv:.3f}  off-manifold {off:.3f}")
    bb.residual = trained
    if a.trainables:
        bb.load_trainable_state_dict({k: v.double() for k, v in torch.load(a.trainables).items()})
    reward = build_reward("gaussian_bump", {"center": cfg.reward.center, "width": width})
    obj = NablaGFN(bb, reward, c, cfg)
    tr = sample_trajectories(bb, 2048, gen(), c)
    print("step    t  |∇log h|   FL error: squared  sqrt  none" + ("   learned g+r  policy tilt d" if a.trainables else ""))
    for k in [48, 45, 40, 35, 30, 25, 20, 15, 10]:
        x, t = tr.xs[:, k], ts[k].expand(2048)
        gh = grad_log_h(x, t)
        n = gh.norm(dim=1).mean()
        with torch.enable_grad():
            xr = x.clone().requires_grad_(True)
            x0 = c.x0_coef_x[k] * xr + c.x0_coef_out[k] * bb.policy(xr, t)
            (gfl,) = torch.autograd.grad(beta * reward(x0, None, None)[0].sum(), xr)
        al = float(c.alpha_prod[k])
        errs = [float(((gam * gfl - gh).norm(dim=1).mean()) / n) for gam in (al, al**0.5, 1.0)]
        line = f"{k:4d} {int(t[0]):4d}  {float(n):7.3f}   {errs[0]:14.3f} {errs[1]:5.3f} {errs[2]:5.3f}"
        if a.trainables:
            r, _ = obj.reward_grad(x, torch.full((2048,), k), None, None)
            g = bb.flow(x, t).detach()
            with torch.no_grad():
                d = c.coef_out[k] * (bb.policy(x, t) - bb.reference(x, t)) * c.inv_var[k]
                mu = c.coef_x[k] * x + c.coef_out[k] * bb.policy(x, t)
            ghn = grad_log_h(mu, ts[k + 1].expand(2048))
            e_g = float((g + r - gh).norm(dim=1).mean() / n)
            e_d = float((d - ghn).norm(dim=1).mean() / ghn.norm(dim=1).mean())
            line += f"   {e_g:11.3f}  {e_d:13.3f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
