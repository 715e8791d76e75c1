"""What the reward-backpropagation baselines share (ReFL, DRaFT, AlignProp; ALGORITHM §5c): one item per trajectory,
whose sampling chain is re-run with the current policy and differentiated where the method says.

An item is a stored trajectory's initial noise x_0 and its per-step noises z_0..z_{N−1}, recovered from the stored
states as z_k = (x_{k+1} − μ_old(x_k))/σ_k (``TransitionCoefficients.mean`` with the sampling-time outputs). Re-running
the chain from (x_0, z) with the current policy is a fresh sample of that policy (the noise was drawn this epoch and
no other update uses it) and a reparameterisation: x_N is a differentiable function of θ. Before the first update of
an epoch the re-run reproduces the stored trajectory, which the tests check. The loop's ``select`` supplies one draw
per trajectory (ReFL's gradient step, AlignProp's truncation point) from the plan's seeded generator, so draws are
reproducible and survive a resume.

The baselines are on-policy (``sample_lag`` = 0: the epoch trains on its own fresh samples) and train no flow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from fastnabla.methods.base import Method
from fastnabla.sampling import Trajectories

__all__ = ["ChainBatch", "ChainMethod", "step_range"]


@dataclass
class ChainBatch:
    """B trajectories to re-run: their noise, conditioning and the method's per-trajectory draw."""

    x0: torch.Tensor  # (B, *S) initial noise
    noise: torch.Tensor  # (B, N, *S) step noises z_0..z_{N−1}
    draw: torch.Tensor  # (B,) long: the column ``select`` produced (a step index)
    cond: Optional[torch.Tensor]
    prompts: Optional[list]


def step_range(frac: list, N: int, inclusive_end: bool) -> tuple[int, int]:
    """Step indices [lo, hi] (both included, within 0..N−1) of a fraction range [a, b] of the N steps: lo = ⌊aN⌋,
    hi = ⌊bN⌋ (``inclusive_end``, as AlignProp's randint) or ⌈bN⌉ − 1 (ReFL's "30…39 of 40" for [0.75, 1.0])."""
    lo = min(int(math.floor(frac[0] * N)), N - 1)
    hi = int(math.floor(frac[1] * N)) if inclusive_end else int(math.ceil(frac[1] * N)) - 1
    return lo, max(lo, min(hi, N - 1))


class ChainMethod(Method):
    """Base of the baselines that backpropagate the reward through re-run sampling chains."""

    #: recompute differentiated policy forwards in the backward (torch.utils.checkpoint)
    checkpointing: bool = False

    @property
    def sample_lag(self) -> int:
        return 0

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The method's per-trajectory draw, (n,) long (default: none, zeros)."""
        return torch.zeros(n, dtype=torch.long)

    def select(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.draw(n, generator)[:, None]

    def gather(self, tr: Trajectories, idx: torch.Tensor, device) -> ChainBatch:
        i = idx[:, 0].to(tr.xs.device)
        xs, outs = tr.xs[i], tr.outs[i]
        noise = torch.stack([(xs[:, k + 1] - self.c[k].mean(xs[:, k], outs[:, k])) / self.c.std[k].to(xs.dtype)
                             for k in range(self.N)], 1)
        return ChainBatch(x0=xs[:, 0].to(device), noise=noise.to(device), draw=idx[:, 1].to(device),
                          cond=None if tr.cond is None else tr.cond[i].to(device),
                          prompts=None if tr.prompts is None else [tr.prompts[j] for j in i.tolist()])

    # --- the chain ------------------------------------------------------------------------------------------------
    def policy_out(self, x: torch.Tensor, k, cond, grad: bool) -> torch.Tensor:
        """The policy's output at states x and step indices k ((B,) tensor or int); with ``grad`` differentiable (and
        checkpointed when ``checkpointing``), without it computed under no_grad."""
        t = self.timesteps[k] if isinstance(k, torch.Tensor) else self.timesteps[k].expand(x.shape[0])
        if not grad:
            with torch.no_grad():
                return self.backbone.policy(x, t, cond).to(x.dtype)
        if self.checkpointing:
            return checkpoint(self.backbone.policy, x, t, cond, use_reentrant=False).to(x.dtype)
        return self.backbone.policy(x, t, cond).to(x.dtype)

    def rollout(self, b: ChainBatch, grad_from: torch.Tensor, stop: Optional[int] = None) -> torch.Tensor:
        """x_stop (default x_N) of the re-run chains; step k is differentiated for the items with k ≥ grad_from (B,).

        Outputs of the other items' steps are detached (AlignProp's truncation), so gradients reach θ only through
        the differentiated steps, and through x along the chain between them."""
        stop = self.N if stop is None else stop
        x = b.x0
        for k in range(stop):
            on = k >= grad_from
            if bool(on.all()):
                out = self.policy_out(x, k, b.cond, grad=True)
            elif bool(on.any()):
                out = self.policy_out(x, k, b.cond, grad=True)
                out = torch.where(on.view(-1, *[1] * (x.dim() - 1)), out, out.detach())
            else:
                out = self.policy_out(x, k, b.cond, grad=False)
            x = self.c[k].step(x, out, b.noise[:, k])
        return x

    def log_reward(self, x_clean: torch.Tensor, prompts) -> torch.Tensor:
        """log R(decode(x)), (B,), differentiable w.r.t. x."""
        log_r, _ = self.reward_fn(self.backbone.decode(x_clean), prompts, None)
        return log_r
