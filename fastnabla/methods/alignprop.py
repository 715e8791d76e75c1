"""AlignProp (Prabhudesai et al. 2023, "Aligning text-to-image diffusion models with reward backpropagation";
ALGORITHM §5c).

``method.name: alignprop``; hyper-parameters in the ``alignprop`` section (``config.AlignPropConfig``). Per
trajectory a truncation step j is drawn uniformly from ``alignprop.truncation_range`` (both ends included; the
reference's general config: 35…45 of 50 steps); the chain is re-run with the current policy (``ChainMethod``), the
outputs of steps k < j detached and those of steps k ≥ j differentiated (checkpointed with
``alignprop.checkpointing``), and the loss is grad_scale · (−log R(decode(x_N))). With the range [0, 1] a draw of 0
backpropagates through the whole chain.
"""
from __future__ import annotations

import torch

from fastnabla.methods.chain import ChainBatch, ChainMethod, step_range

__all__ = ["AlignProp"]


class AlignProp(ChainMethod):
    name = "alignprop"

    def __init__(self, backbone, reward_fn, coeffs, cfg):
        super().__init__(backbone, reward_fn, coeffs, cfg)
        self.ac = cfg.alignprop
        self.checkpointing = self.ac.checkpointing
        self.lo, self.hi = step_range(self.ac.truncation_range, self.N, inclusive_end=True)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.lo, self.hi + 1, (n,), generator=generator)

    def __call__(self, b: ChainBatch):
        x_n = self.rollout(b, b.draw)
        log_r = self.log_reward(x_n, b.prompts)
        return self.ac.grad_scale * -log_r, {"reward": log_r.detach(), "truncation": b.draw.to(log_r.dtype)}
