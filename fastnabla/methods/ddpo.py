"""DDPO-clip (Black et al. 2023, "Training diffusion models with reinforcement learning"; ALGORITHM §5c), as the
reference implementation ddpo-pytorch does it.

``method.name: ddpo``; hyper-parameters in the ``ddpo`` section (``config.DDPOConfig``). On the epoch's fresh
trajectories (on-policy, ``sample_lag`` = 0):

- advantages (``prepare_epoch``, stored in ``Trajectories.extras``): with per-prompt tracking, each prompt's rewards
  join a buffer of its last ``buffer_size`` rewards (kept across epochs, checkpointed), and A = (R − mean)/(std + 1e−6)
  over that buffer, or over the whole batch while the buffer holds fewer than ``min_count``; without tracking (or for
  an unconditional backbone) A = (R − mean)/(std + 1e−8) over the batch (std: the population std, as numpy's);
- per transition k of a trajectory: log p(x'|x) = mean over the state's elements of log N(x'; μ_θ(x), σ_k²) (the
  reference's per-step log-probability; μ from ``TransitionCoefficients.mean``), the same with the stored sampling-time
  output for p_old (what the reference stores at sampling time, recomputed from the stored output), ratio
  r = exp(log p − log p_old), A clipped to ±``adv_clip_max``, and
  loss = max(−A·r, −A·clip(r, 1 − ε, 1 + ε)) with ε = ``clip_range``.

Statistics: ``approx_kl`` = ½(log p − log p_old)², ``clipfrac`` = [|r − 1| > ε], ``ratio``, ``advantage``.
"""
from __future__ import annotations

from collections import deque

import torch

from fastnabla.methods.base import Method, TransitionBatch
from fastnabla.sampling import Trajectories

__all__ = ["DDPO"]


class DDPO(Method):
    name = "ddpo"

    def __init__(self, backbone, reward_fn, coeffs, cfg):
        super().__init__(backbone, reward_fn, coeffs, cfg)
        self.dc = cfg.ddpo
        self.stats: dict[str, deque] = {}  # prompt → its last buffer_size rewards

    @property
    def sample_lag(self) -> int:
        return 0

    def select(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Every step of each trajectory, or a random subset of int(N·timestep_fraction) of them (no step forced)."""
        N = self.N
        if self.dc.timestep_fraction >= 1:
            return torch.arange(N).expand(n, N).clone()
        K = int(N * self.dc.timestep_fraction)
        return torch.stack([torch.randperm(N, generator=generator)[:K] for _ in range(n)]).sort(dim=1).values

    # --- advantages -------------------------------------------------------------------------------------------------
    def advantages(self, rewards: torch.Tensor, prompts) -> torch.Tensor:
        r = rewards.detach().double().cpu()
        if prompts is None or not self.dc.per_prompt_stat_tracking:
            return ((r - r.mean()) / (r.std(unbiased=False) + 1e-8)).to(rewards)
        adv = torch.empty_like(r)
        for p in sorted(set(prompts)):
            mask = torch.tensor([q == p for q in prompts])
            buf = self.stats.setdefault(p, deque(maxlen=self.dc.buffer_size))
            buf.extend(r[mask].tolist())
            ref = r if len(buf) < self.dc.min_count else torch.tensor(list(buf), dtype=torch.float64)
            adv[mask] = (r[mask] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
        return adv.to(rewards)

    def prepare_epoch(self, tr: Trajectories) -> Trajectories:
        tr.extras["advantages"] = self.advantages(tr.log_reward, tr.prompts)
        return tr

    def state_dict(self) -> dict:
        return {"stats": {p: list(v) for p, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {p: deque(v, maxlen=self.dc.buffer_size) for p, v in state.get("stats", {}).items()}

    # --- the clipped surrogate ----------------------------------------------------------------------------------
    def log_prob(self, b: TransitionBatch, out: torch.Tensor) -> torch.Tensor:
        coef = self.c[b.k]
        return coef.log_density(b.x_next, coef.mean(b.x, out)).flatten(1).mean(1)

    def __call__(self, b: TransitionBatch):
        if not b.extras or "advantages" not in b.extras:
            raise ValueError("method.name=ddpo needs the advantages that DDPO.prepare_epoch stores with the trajectories")
        out = self.backbone.policy(b.x, self.timesteps[b.k], b.cond).to(b.x.dtype)
        lp = self.log_prob(b, out)
        lp_old = self.log_prob(b, b.out_old)
        adv = b.extras["advantages"].to(lp.dtype).clamp(-self.dc.adv_clip_max, self.dc.adv_clip_max)
        ratio = (lp - lp_old).exp()
        eps = self.dc.clip_range
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
        diff = (lp - lp_old).detach()
        return loss, {"ratio": ratio.detach(), "advantage": adv, "approx_kl": 0.5 * diff.square(),
                      "clipfrac": ((ratio.detach() - 1).abs() > eps).to(lp.dtype)}
