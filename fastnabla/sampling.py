"""Trajectory collection and transition sub-sampling (ALGORITHM §5, steps 1–2).

A trajectory is x_0 (noise) … x_N (clean) with the sampling-time policy outputs ``out_old`` of each step. The
sampler is the transition of ``transition_coefficients``: x' = coef_x·x + coef_out·out + std·z, which equals
diffusers' ``scheduler.step`` (tested), so training and sampling read the same coefficients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastnabla.transitions import TransitionCoefficients, schedule_coefficients

__all__ = ["Trajectories", "sample_trajectories", "select_transitions", "step_coefficients", "terminal_log_reward"]


def step_coefficients(backbone) -> TransitionCoefficients:
    """Coefficients of every sampling step of ``backbone`` (its scheduler and η), (N,) float32 on its device."""
    return schedule_coefficients(backbone.scheduler, backbone.eta, backbone.device)


@dataclass
class Trajectories:
    """A batch of n trajectories of N steps."""

    xs: torch.Tensor  # (n, N+1, *S) states x_0..x_N, float32
    outs: torch.Tensor  # (n, N, *S) sampling-time policy outputs at x_0..x_{N-1}
    log_reward: torch.Tensor  # (n,) log R(x_N) (float32)
    prompts: Optional[list]  # n prompts, or None for an unconditional backbone
    cond: Optional[torch.Tensor]  # (n, ...) conditioning, or None
    returns: Optional[torch.Tensor] = None  # (n, N+1, *S) gradient returns G_0..G_N (recipe "returns"), or None
    # per-trajectory tensors (n, ...) a method stores with the trajectories (e.g. DDPO's advantages): concatenated,
    # checkpointed and moved with them
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.xs.shape[0]

    @staticmethod
    def cat(items: list["Trajectories"]) -> "Trajectories":
        def c(name):
            vals = [getattr(i, name) for i in items]
            return None if vals[0] is None else torch.cat(vals)

        prompts = None if items[0].prompts is None else [p for i in items for p in i.prompts]
        extras = {k: torch.cat([i.extras[k] for i in items]) for k in items[0].extras}
        return Trajectories(c("xs"), c("outs"), c("log_reward"), prompts, c("cond"), c("returns"), extras)

    def state_dict(self) -> dict:
        def cpu(t):
            return None if t is None else t.cpu()

        return {"xs": self.xs.cpu(), "outs": self.outs.cpu(), "log_reward": self.log_reward.cpu(),
                "prompts": self.prompts, "cond": cpu(self.cond), "returns": cpu(self.returns),
                "extras": {k: v.cpu() for k, v in self.extras.items()}}

    @staticmethod
    def from_state_dict(d: dict, device) -> "Trajectories":
        def dev(t):
            return None if t is None else t.to(device)

        return Trajectories(d["xs"].to(device), d["outs"].to(device), d["log_reward"].to(device), d["prompts"],
                            dev(d["cond"]), dev(d.get("returns")),
                            {k: v.to(device) for k, v in d.get("extras", {}).items()})


@torch.no_grad()
def sample_trajectories(backbone, n: int, generator: torch.Generator, coeffs: TransitionCoefficients,
                        prompts: Optional[list] = None, reward_fn=None, keep_trajectory: bool = True,
                        progress=None, guide: Optional[Callable] = None, policy_from: int = 0,
                        policy_to: Optional[int] = None, start: Optional[tuple] = None) -> Trajectories:
    """Run the N-step sampler with the current policy (CFG inside ``backbone.policy``) from fresh noise, or from
    ``start`` = (x, k0): the n states x before step k0, run on from there (the returned trajectories then hold the
    states x_k0 … x_N and the outputs of steps k0 … N−1; a branch of a trajectory, e.g. for conditional means).

    All randomness comes from ``generator`` (CPU), so a run is reproducible across devices. ``reward_fn`` scores
    the decoded clean samples (log R); without it ``log_reward`` is NaN. ``guide(x, k, cond, prompts)``, when given,
    returns a detached shift of the policy's output at step k (a method's fixed part of its policy, e.g.
    ``gfn.reward_guidance``); it is not applied inside ``backbone.reference_sampling()``, which draws from p_ref.
    The stored outputs ``outs`` include it. Steps k < ``policy_from`` and k ≥ ``policy_to`` (None: N) take the
    reference's output, without the guide (a method's ``policy_from`` and ``policy_to``: ``gfn.policy_max_timestep``
    and ``gfn.policy_min_timestep``).
    """
    dev = backbone.device
    timesteps = backbone.scheduler.timesteps.to(dev)
    N = timesteps.numel()
    cond = backbone.encode(prompts) if backbone.conditional else None
    dt = coeffs.coef_x.dtype  # the state dtype (float32 in training; float64 in tests)
    k0 = 0 if start is None else int(start[1])
    if not 0 <= k0 < N:
        raise ValueError(f"sample_trajectories: start step {k0} is outside the sampler's 0 … {N - 1}")
    x = backbone.sample_noise(n, generator).to(dt) if start is None else start[0].to(dev, dt)
    xs = [x] if keep_trajectory else None
    outs = [] if keep_trajectory else None
    policy_to = N if policy_to is None else policy_to
    for k in range(k0, N):
        t = timesteps[k].expand(n)
        acts = policy_from <= k < policy_to
        if acts:
            out = backbone.policy(x, t, cond).to(dt)
        else:
            out = backbone.reference(x, t, cond).to(dt)
        if guide is not None and acts and not backbone._reference_sampling:
            out = out + guide(x, k, cond, prompts).to(dt)
        z = torch.randn(x.shape, generator=generator, device="cpu").to(dev, dt)
        x = coeffs[k].step(x, out, z)
        if keep_trajectory:
            xs.append(x)
            outs.append(out)
        if progress is not None:
            progress.update(1)
    if reward_fn is not None:
        log_reward = terminal_log_reward(backbone, reward_fn, x, prompts)
    else:
        log_reward = torch.full((n,), float("nan"), device=dev)
    if not keep_trajectory:
        return Trajectories(x[:, None], x.new_zeros((n, 0, *x.shape[1:])), log_reward, prompts, cond)
    return Trajectories(torch.stack(xs, 1), torch.stack(outs, 1), log_reward, prompts, cond)


def terminal_log_reward(backbone, reward_fn, x: torch.Tensor, prompts: Optional[list] = None) -> torch.Tensor:
    """log R of the decoded clean states ``x`` (n,), float32 and detached, as ``sample_trajectories`` scores them."""
    with torch.enable_grad():  # some rewards checkpoint internally; no graph is kept
        lr, _ = reward_fn(backbone.decode(x).detach(), prompts, None)
    return lr.detach().float()


def select_transitions(n: int, num_steps: int, fraction: float, low_var: bool,
                       generator: torch.Generator) -> torch.Tensor:
    """Indices k of the trained transitions of each of n trajectories, (n, K+1) long, the last column N−1.

    K = int(N·f). Low-variance: the N steps split into K equal chunks, one uniform draw per chunk (a draw never
    lands on the terminal step, which is always added). Uniform: K distinct draws among the first N−1.
    f = 1 trains all N transitions.
    """
    N = num_steps
    if fraction >= 1.0:
        return torch.arange(N).expand(n, N).clone()
    K = int(N * fraction)
    if K < 1:
        raise ValueError(f"timestep_fraction={fraction} with {N} steps selects no transition")
    if low_var:
        if N % K:
            raise ValueError(f"low-variance subsampling needs num_steps={N} divisible by K={K}")
        m = N // K  # ≥ 2: K < N (f < 1) and K divides N
        width = torch.full((K,), m)
        width[-1] = m - 1  # the last chunk excludes the terminal step
        u = torch.rand(n, K, generator=generator)
        picks = torch.arange(K) * m + (u * width).long().clamp(max=m - 1)
    else:
        if K > N - 1:
            raise ValueError(f"cannot draw K={K} distinct transitions among the first {N - 1}")
        picks = torch.stack([torch.randperm(N - 1, generator=generator)[:K] for _ in range(n)]).sort(dim=1).values
    term = torch.full((n, 1), N - 1, dtype=torch.long)
    return torch.cat([picks.long(), term], dim=1)
