"""ReFL (Xu et al. 2023, "ImageReward"; ALGORITHM §5c): reward feedback on a one-step prediction of the clean sample.

``method.name: refl``; hyper-parameters in the ``refl`` section (``config.ReFLConfig``). Per trajectory:

1. draw a step k uniformly from ``refl.step_range`` (the reference: 30…39 of 40 steps);
2. re-run the chain without gradients to x_k with the current policy (``ChainMethod``);
3. one policy forward at x_k with gradient and the one-step prediction x̂0 = ``pred_x0``(x_k, out_θ(x_k));
4. loss = grad_scale · (−log R(decode(x̂0))), or grad_scale · ReLU(margin − log R) with ``refl.reward_margin``
   (the reference's hinge), plus ``refl.pretrain_scale`` · mean (out_θ(x_k) − out_ref(x_k))², a data-free stand-in
   for the reference's pretraining loss (which needs the pretraining data set).
"""
from __future__ import annotations

import torch

from fastnabla.methods.chain import ChainBatch, ChainMethod, step_range

__all__ = ["ReFL"]


class ReFL(ChainMethod):
    name = "refl"

    def __init__(self, backbone, reward_fn, coeffs, cfg):
        super().__init__(backbone, reward_fn, coeffs, cfg)
        self.rc = cfg.refl
        self.lo, self.hi = step_range(self.rc.step_range, self.N, inclusive_end=False)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.lo, self.hi + 1, (n,), generator=generator)

    def states_at(self, b: ChainBatch, k: torch.Tensor) -> torch.Tensor:
        """x_{k_i} of each re-run chain, without gradients (the chain runs to max k)."""
        x, xk = b.x0, b.x0.clone()
        with torch.no_grad():
            for j in range(int(k.max())):
                x = self.c[j].step(x, self.policy_out(x, j, b.cond, grad=False), b.noise[:, j])
                xk = torch.where((k == j + 1).view(-1, *[1] * (x.dim() - 1)), x, xk)
        return xk

    def __call__(self, b: ChainBatch):
        k = b.draw
        xk = self.states_at(b, k)
        out = self.policy_out(xk, k, b.cond, grad=True)
        x0 = self.c[k].pred_x0(xk, out)
        log_r = self.log_reward(x0, b.prompts)
        rc = self.rc
        if rc.reward_margin is None:
            loss = -log_r
        else:
            loss = torch.relu(rc.reward_margin - log_r)
        loss = rc.grad_scale * loss
        stats = {"reward": log_r.detach(), "step": k.to(log_r.dtype)}
        if rc.pretrain_scale > 0:
            with torch.no_grad():
                out_ref = self.backbone.reference(xk, self.timesteps[k], b.cond).to(xk.dtype)
            reg = (out - out_ref).flatten(1).square().mean(1).to(loss.dtype)
            loss = loss + rc.pretrain_scale * reg
            stats["loss_pretrain"] = reg.detach()
        return loss, stats
