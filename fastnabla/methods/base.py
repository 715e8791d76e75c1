"""The seam every finetuning method plugs into (``method.name``), over the shared sampling, engine, checkpoints,
metrics and backbones.

The trainer owns the loop: it samples trajectories with the current policy, hands each sampling batch to
``Method.prepare`` (per-trajectory work that must see the sampling-time models, e.g. ∇-GFlowNet's gradient
returns, stored with the trajectories and therefore checkpointed), plans updates as micro-batches of
(trajectory, step) pairs drawn by ``Method.select``, builds each micro-batch with ``TransitionBatch.gather`` and
asks the method for its per-item loss. A method computes losses; it never steps an optimizer, writes a checkpoint
or talks to DeepSpeed.

Methods whose items are not stored transitions override ``gather``: the reward-backpropagation baselines
(``chain.ChainMethod``) make one item per trajectory and re-run its sampling chain with gradients. Per-trajectory
data a method derives after a whole epoch's sampling (DDPO's advantages) goes into ``Trajectories.extras`` from
``prepare_epoch``; state a method carries across epochs (DDPO's per-prompt reward statistics) goes through
``state_dict``/``load_state_dict`` into the trainer's checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastnabla.sampling import Trajectories, select_transitions
from fastnabla.transitions import TransitionCoefficients

__all__ = ["Method", "TransitionBatch", "acting_steps"]


def acting_steps(timesteps, max_timestep: Optional[int] = None, min_timestep: Optional[int] = None):
    """(first, stop): the sampling steps k with min_timestep ≤ timesteps[k] ≤ max_timestep (None: unbounded) are
    first ≤ k < stop, or None when no step is in range. The one reading of ``gfn.policy_max_timestep`` and
    ``gfn.policy_min_timestep`` (the schedule descends, so the steps in range are contiguous)."""
    ts = [int(t) for t in timesteps]
    hi = ts[0] if max_timestep is None else max_timestep
    lo = 0 if min_timestep is None else min_timestep
    inside = [k for k, t in enumerate(ts) if lo <= t <= hi]
    return (inside[0], inside[-1] + 1) if inside else None


@dataclass
class TransitionBatch:
    """B transitions x_k → x_{k+1} gathered from stored trajectories."""

    x: torch.Tensor  # (B, *S) state at τ_k
    x_next: torch.Tensor  # (B, *S) state after the step
    k: torch.Tensor  # (B,) long: step index, 0..N-1 (k = N-1 is the terminal transition)
    out_old: torch.Tensor  # (B, *S) sampling-time policy output at x
    cond: Optional[torch.Tensor]
    prompts: Optional[list]
    returns: Optional[torch.Tensor] = None  # (B, *S) gradient return G_{k+1} at x_next, when stored
    states: Optional[torch.Tensor] = None  # (B, N+1, *S) each transition's whole trajectory, when asked for
    extras: Optional[dict] = None  # per-item rows of ``Trajectories.extras`` (e.g. DDPO's "advantages": (B,))

    @staticmethod
    def gather(tr: Trajectories, idx: torch.Tensor, device, with_states: bool = False) -> "TransitionBatch":
        """The transitions of ``idx`` (B, 2) = (trajectory, step) pairs (``with_states``: their trajectories too)."""
        i, k = idx[:, 0].to(tr.xs.device), idx[:, 1].to(tr.xs.device)
        return TransitionBatch(
            x=tr.xs[i, k], x_next=tr.xs[i, k + 1], k=k.to(device), out_old=tr.outs[i, k],
            cond=None if tr.cond is None else tr.cond[i],
            prompts=None if tr.prompts is None else [tr.prompts[j] for j in i.tolist()],
            returns=None if tr.returns is None else tr.returns[i, k + 1],
            states=tr.xs[i] if with_states else None,
            extras={name: v[i].to(device) for name, v in tr.extras.items()},
        )


class Method:
    """Base class: one finetuning method's per-batch objective.

    Subclasses set ``name`` and implement ``__call__``; the rest has working defaults.
    """

    #: the ``method.name`` that selects this class
    name: str = ""
    #: the gradient the trainer will send into each item's loss in the current update (1 / its items), set before
    #: each micro-batch: a method may announce it to its loss (``residual_db_loss(expected_grad=…)``), whose fused
    #: kernel then writes final gradients in one pass
    item_grad: Optional[float] = None

    def __init__(self, backbone, reward_fn, coeffs: TransitionCoefficients, cfg):
        self.backbone = backbone
        self.reward_fn = reward_fn
        self.c = coeffs  # (N,) per-step coefficients
        self.N = coeffs.coef_x.numel()
        self.timesteps = backbone.scheduler.timesteps.to(backbone.device)
        self.cfg = cfg

    # --- what the composition root asks before building the engine ------------------------------------------------
    @property
    def trains_flow(self) -> bool:
        """Whether the backbone's flow network is a trained parameter group."""
        return False

    @property
    def reuses_policy_forward(self) -> bool:
        """Whether one policy forward is backpropagated through more than once (ZeRO-3 cannot do that)."""
        return False

    def check_engine(self, engine) -> None:
        """Refuse an engine this method cannot run under, with a one-line ValueError naming the alternative."""

    @property
    def sample_lag(self) -> int:
        """Epochs between sampling a batch and training on it: 0 (on-policy) or 1 (``gfn.sample_lag``)."""
        return self.cfg.gfn.sample_lag

    #: a fixed shift of the policy's output that sampling adds at every step (``sampling.sample_trajectories``'s
    #: ``guide``), or None
    guide = None
    #: the first sampling step at which the policy acts and the one after its last (None: N); the steps outside
    #: sample from the reference and are not trained (``sampling.sample_trajectories``'s ``policy_from``/``policy_to``)
    policy_from: int = 0
    policy_to: Optional[int] = None

    # --- the loop's hooks ----------------------------------------------------------------------------------------
    def prepare(self, tr: Trajectories) -> Trajectories:
        """Per-trajectory work right after sampling (with the sampling-time weights); returns ``tr``."""
        return tr

    def prepare_epoch(self, tr: Trajectories) -> Trajectories:
        """Work on the whole epoch's trajectories of this process (after every batch's ``prepare``); returns ``tr``."""
        return tr

    def gather(self, tr: Trajectories, idx: torch.Tensor, device):
        """The micro-batch handed to ``__call__`` for ``idx`` (B, 2) = (trajectory, ``select`` column value) pairs
        from the trajectories ``tr`` (a ``TransitionBatch`` unless the method's items are something else)."""
        return TransitionBatch.gather(tr, idx, device)

    def state_dict(self) -> dict:
        """What this method carries across epochs (saved in the trainer's checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method.name={self.name} keeps no state, but the checkpoint has {sorted(state)}; "
                             "resume with the method that wrote it")

    def select(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The items of each of n trajectories, (n, K) long: the trained steps (``sampling.select_transitions``), or
        a per-trajectory draw for a method whose item is the trajectory (``chain.ChainMethod``). Drawn from the
        plan's seeded generator, so a resumed run draws the same. Only the policy's steps, ``policy_from`` ≤ k <
        ``policy_to``; the last of them plays the terminal step's part (always trained)."""
        g = self.cfg.gfn
        end = self.N if self.policy_to is None else self.policy_to
        return self.policy_from + select_transitions(n, end - self.policy_from, g.timestep_fraction,
                                                     g.low_var_subsampling, generator)

    def __call__(self, batch) -> tuple[torch.Tensor, dict]:
        """Per-item loss (B,) of a ``gather``ed micro-batch (a ``TransitionBatch`` by default) with a graph to the
        trainables, and a dict of detached (B,) statistics."""
        raise NotImplementedError
