"""DRaFT (Clark et al., ICLR 2024, "Directly fine-tuning diffusion models on differentiable rewards"; ALGORITHM §5c).

``method.name: draft``; hyper-parameters in the ``draft`` section (``config.DRaFTConfig``).

- DRaFT-K (``draft.lv_copies`` = 0): re-run the chain with the current policy (``ChainMethod``), without gradients
  for the first N − K steps and with gradients through the last K (checkpointed with ``draft.checkpointing``);
  loss = grad_scale · (−log R(decode(x_N))).
- DRaFT-LV (``draft.lv_copies`` = n > 0, K = 1): re-run the whole chain without gradients to x_N, re-noise it n times
  to the last step's level, x̃^(i) = √ᾱ·x_N + √(1−ᾱ)·ε_i (ᾱ at the last sampling timestep, ε_i ~ N(0, I) from the
  global torch RNG, which checkpoints carry), and denoise each in one differentiated step, x̂0^(i) = pred_x0(x̃^(i),
  out_θ(x̃^(i))); loss = grad_scale · mean_i (−log R(decode(x̂0^(i)))). The copies share one policy forward.
"""
from __future__ import annotations

import torch

from fastnabla.methods.chain import ChainBatch, ChainMethod

__all__ = ["DRaFT"]


class DRaFT(ChainMethod):
    name = "draft"

    def __init__(self, backbone, reward_fn, coeffs, cfg):
        super().__init__(backbone, reward_fn, coeffs, cfg)
        self.dc = cfg.draft
        self.checkpointing = self.dc.checkpointing

    def __call__(self, b: ChainBatch):
        B, N, n = b.x0.shape[0], self.N, self.dc.lv_copies
        if n == 0:
            x_n = self.rollout(b, torch.full((B,), N - self.dc.k, device=b.x0.device))
            log_r = self.log_reward(x_n, b.prompts)
            return self.dc.grad_scale * -log_r, {"reward": log_r.detach()}
        x_n = self.rollout(b, torch.full((B,), N, device=b.x0.device))  # no step differentiated
        a = self.c.alpha_prod[N - 1].to(x_n.dtype)
        eps = torch.randn((n, *x_n.shape), dtype=x_n.dtype).to(x_n.device)
        x1 = (a.sqrt() * x_n + (1 - a).sqrt() * eps).flatten(0, 1)  # (n·B, *S), copy-major
        rep = lambda v: None if v is None else v.repeat(n, *[1] * (v.dim() - 1))  # noqa: E731
        k = torch.full((n * B,), N - 1, device=x1.device)
        x0 = self.c[k].pred_x0(x1, self.policy_out(x1, k, rep(b.cond), grad=True))
        prompts = None if b.prompts is None else b.prompts * n
        log_r = self.log_reward(x0, prompts).view(n, B).mean(0)
        return self.dc.grad_scale * -log_r, {"reward": log_r.detach()}
