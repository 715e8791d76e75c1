"""A weighted sum of registered rewards: log R = Σ_k w_k · log R_k.

Options: ``weights`` (name → weight, e.g. {aesthetic: 0.7, hpsv2: 0.3}) and, per component, an option sub-dict
under the component's name (e.g. ``aesthetic: {model: ..., head: ...}``). ``checkpointing`` set on the combo is
the default for every component (a component's own sub-dict wins). ``info`` carries each component's value under
its name plus the components' own extras prefixed with ``<name>/``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastnabla.rewards.base import RewardFn


class ComboReward(RewardFn):
    name = "combo"

    def __init__(self, weights: Optional[dict] = None, device="cpu", checkpointing: bool = False, **component_options):
        super().__init__(checkpointing)
        from fastnabla.rewards import build_reward  # registry lives in the package __init__

        if not weights or not isinstance(weights, dict):
            raise ValueError("reward.weights: combo needs a mapping name → weight, e.g. {aesthetic: 0.7, hpsv2: 0.3}")
        unused = sorted(set(component_options) - set(weights))
        if unused:
            raise ValueError(f"reward: option sub-dicts {unused} have no weight in reward.weights "
                             f"({sorted(weights)}); add a weight or remove them")
        if "combo" in weights:
            raise ValueError("reward.weights: a combo cannot contain another combo")
        self.weights = {k: float(v) for k, v in weights.items()}
        comps = {}
        for comp_name in self.weights:
            opts = dict(component_options.get(comp_name) or {})
            opts.setdefault("checkpointing", checkpointing)
            comps[comp_name] = build_reward(comp_name, opts, device=device)
        self.components = nn.ModuleDict({k.replace(".", "_"): v for k, v in comps.items()})
        self._names = list(comps)
        self.needs_prompts = any(c.needs_prompts for c in comps.values())
        kinds = {c.input_kind for c in comps.values()}
        if len(kinds) > 1:
            raise ValueError(f"reward.weights: cannot combine point rewards with image rewards ({sorted(kinds)})")
        self.input_kind = kinds.pop()

    def _check_inputs(self, images, prompts):
        return images  # each component checks its own inputs

    def score(self, images, prompts, metadata):
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        info = {}
        for comp_name in self._names:
            comp = self.components[comp_name.replace(".", "_")]
            value, comp_info = comp(images, prompts if comp.needs_prompts else None, metadata)
            total = total + self.weights[comp_name] * value
            info[comp_name] = value.detach()
            info.update({f"{comp_name}/{k}": v for k, v in comp_info.items()})
        return total, info
