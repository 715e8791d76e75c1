"""Differentiable rewards: a registry name → factory.

    reward_fn = build_reward("aesthetic", {"head": "/path/sac+logos+ava1-l14-linearMSE.pth"}, device="cuda")
    log_reward, info = reward_fn(images, prompts, metadata)   # images (B, 3, H, W) in [0, 1]; log_reward (B,) fp32

Every reward follows the contract in ``fastnabla.rewards.base`` (fp32, autocast off, frozen weights, gradients
w.r.t. the images, optional ``checkpointing``). Registered names:

==============  =======================================================================  =========
name            log R                                                                    prompts
==============  =======================================================================  =========
gaussian_bump   −‖x − center‖²/(2·width²) on points (B, D) (toy2d)                        no
brightness      mean intensity                                                            no
contrast        RMS contrast of the luma                                                  no
colorfulness    Hasler–Süsstrunk colourfulness on [0, 1] images                           no
aesthetic       LAION aesthetic MLP on normalised CLIP ViT-L/14 image features            no
pickscore       exp(logit_scale)·cos(image, prompt) with the PickScore CLIP               yes
hpsv2, hpsv2.1  cos(image, prompt) with the HPS OpenCLIP ViT-H-14 (converted on load)     yes
combo           Σ_k w_k·log R_k over other registered rewards                             if any is
imagereward     ImageReward's standardised score (BLIP ViT + cross-attending BERT + MLP)   yes
digit_class     log Σ_{c∈classes} p(y = c | x), a small CNN on digit images (B, 1, S, S)   no
digit_ink       scale · mean ink of digit images (B, 1, S, S)                             no
==============  =======================================================================  =========
"""
from __future__ import annotations

import difflib
from typing import Callable, Optional

import torch

from fastnabla.rewards.base import RewardFn

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str):
    """Decorator: register ``factory(**options) -> RewardFn`` under ``name`` (a class works as the factory)."""

    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def build_reward(name: str, options: Optional[dict] = None, device="cpu") -> RewardFn:
    """Build the reward ``name`` with ``options`` (the factory's keyword arguments) on ``device``.

    Unknown names and unknown options raise a ValueError naming the closest valid choice.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.0)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reward {name!r}{hint} (available: {', '.join(available_rewards())})")
    options = dict(options or {})
    factory = _REGISTRY[name]
    if factory is _build_combo:
        options["device"] = device
    try:
        reward = factory(**options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            bad = str(e).split("'")[1] if "'" in str(e) else str(e)
            raise ValueError(f"reward.{bad}: not an option of reward {name!r} ({e})") from None
        raise
    reward.name = name
    reward.needs_prompts = bool(getattr(reward, "needs_prompts", False))
    if isinstance(reward, torch.nn.Module):
        reward = reward.to(device).freeze()
    return reward


# --- built-in rewards ---------------------------------------------------------------------------------------------
from fastnabla.rewards.simple import Brightness, Colorfulness, Contrast, GaussianBump  # noqa: E402

register_reward("gaussian_bump")(GaussianBump)
register_reward("brightness")(Brightness)
register_reward("contrast")(Contrast)
register_reward("colorfulness")(Colorfulness)


def _register_lazy(name: str, module: str, cls: str, **fixed):
    """Register ``name`` as ``module.cls(**fixed, **options)``, importing the module (and its heavy dependencies)
    only when the reward is built."""

    def build(**options):
        import importlib

        return getattr(importlib.import_module(module), cls)(**fixed, **options)

    build.__name__ = f"_build_{name}"
    register_reward(name)(build)
    return build


_register_lazy("aesthetic", "fastnabla.rewards.aesthetic", "AestheticReward")
_register_lazy("pickscore", "fastnabla.rewards.pickscore", "PickScoreReward")
_register_lazy("hpsv2", "fastnabla.rewards.hpsv2", "HPSv2Reward", variant="hpsv2")
_register_lazy("hpsv2.1", "fastnabla.rewards.hpsv2", "HPSv2Reward", variant="hpsv2.1")
_build_combo = _register_lazy("combo", "fastnabla.rewards.combo", "ComboReward")  # build_reward passes it the device
_register_lazy("imagereward", "fastnabla.rewards.imagereward", "ImageRewardReward")
_register_lazy("digit_class", "fastnabla.rewards.digits", "DigitClassReward")
_register_lazy("digit_ink", "fastnabla.rewards.digits", "DigitInkReward")


def reward_options(cfg) -> dict:
    """The factory options of ``cfg.reward``: ``reward.options`` plus the reward section's named keys (model, head,
    processor, weights, checkpointing) and, for rewards that read them, the keys their config sections carry
    (gaussian_bump: reward.center/width; digit_class: model.image_size/cache_dir unless set in reward.options)."""
    r = cfg.reward
    opts = dict(r.options)
    for key in ("model", "head", "processor", "weights"):
        v = getattr(r, key)
        if v is not None:
            opts[key] = v
    if r.checkpointing:
        opts["checkpointing"] = True
    if r.name == "gaussian_bump":
        opts.update(center=r.center, width=r.width)
    if r.name == "digit_class":
        opts.setdefault("image_size", cfg.model.image_size)
        opts.setdefault("cache_dir", cfg.model.cache_dir)
    return opts


def reward_from_config(cfg, device="cpu") -> RewardFn:
    """``build_reward`` of ``cfg.reward.name`` with ``reward_options(cfg)``."""
    return build_reward(cfg.reward.name, reward_options(cfg), device=device)


__all__ = ["RewardFn", "build_reward", "register_reward", "available_rewards", "reward_options",
           "reward_from_config"]
