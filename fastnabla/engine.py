"""The trainer's one door to optimisation: parameter groups, optimizer, clipping, accumulation, skipping.

Two parameter groups with their own learning rate and weight decay (ALGORITHM §5): the policy trainables and the
flow network. Gradients are clipped per group (``max_grad_norm``); an update whose loss or gradients are not
finite is skipped (gradients dropped) and reported, so the trainer can count bad steps.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["Engine", "build_optimizer"]


def build_optimizer(name: str, groups: list[dict], betas=(0.9, 0.999)):
    """adamw (torch) | adamw8bit | lion8bit (bitsandbytes, which also steps CPU tensors)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(betas), eps=1e-8)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RuntimeError(f"train.optimizer={name} needs bitsandbytes: pip install 'fastnabla[8bit]'") from None
    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(groups, betas=tuple(betas), eps=1e-8)
    if name == "lion8bit":
        return bnb.optim.Lion8bit(groups, betas=tuple(betas))
    raise ValueError(f"train.optimizer={name!r}: must be adamw, adamw8bit or lion8bit")


class Engine:
    """Plain PyTorch on one process."""

    world_size = 1
    rank = 0

    def __init__(self, policy_params: Iterable[torch.nn.Parameter], flow_params: Iterable[torch.nn.Parameter],
                 train_cfg):
        self.cfg = train_cfg
        self.policy_params = [p for p in policy_params if p.requires_grad]
        self.flow_params = [p for p in flow_params if p.requires_grad]
        groups = [dict(params=self.policy_params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, name="policy")]
        if self.flow_params:
            groups.append(dict(params=self.flow_params, lr=train_cfg.flow_lr, weight_decay=train_cfg.flow_weight_decay,
                               name="flow"))
        self.optimizer = build_optimizer(train_cfg.optimizer, groups, train_cfg.betas)
        self.updates = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _set_lr(self) -> None:
        w = self.cfg.flow_warmup_updates
        for g in self.optimizer.param_groups:
            if g.get("name") == "flow":
                g["lr"] = self.cfg.flow_lr * (min(1.0, (self.updates + 1) / w) if w > 0 else 1.0)

    def step(self) -> dict:
        """Clip per group, step unless something is non-finite, zero the gradients. Returns diagnostics."""
        norms = {}
        for name, params in (("policy", self.policy_params), ("flow", self.flow_params)):
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                norms[name] = 0.0
                continue
            max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = all(math.isfinite(v) for v in norms.values())
        if finite:
            self._set_lr()
            self.optimizer.step()
            self.updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm_policy": norms["policy"], "grad_norm_flow": norms["flow"], "skipped": not finite}

    def skip(self) -> None:
        """Drop accumulated gradients without stepping (a non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]
