"""Weight-free rewards: the toy 2-D Gaussian bump and closed-form image statistics for smoke tests.

All are differentiable everywhere (the square roots carry a small epsilon so a constant image has a finite,
zero-ish gradient instead of NaN).
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastnabla.rewards.base import RewardFn

_EPS = 1e-6
# Rec. 601 luma weights.
_LUMA = (0.299, 0.587, 0.114)


class GaussianBump(RewardFn):
    """log R(x) = −‖x − center‖² / (2·width²) on points x of shape (B, D) (D = len(center), 2 for toy2d).

    With a Gaussian-mixture prior this keeps p_ref·R^β a Gaussian mixture in closed form (ALGORITHM §6).
    """

    name = "gaussian_bump"
    input_kind = "points"

    def __init__(self, center: Sequence[float] = (1.0, 0.5), width: float = 1.0, checkpointing: bool = False):
        super().__init__(checkpointing)
        if float(width) <= 0:
            raise ValueError(f"reward.width must be > 0, got {width}")
        self.register_buffer("center", torch.tensor([float(c) for c in center], dtype=torch.float32))
        self.width = float(width)

    def _check_inputs(self, images, prompts):
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise ValueError(f"{self.name}: points must be a float tensor")
        if images.ndim != 2 or images.shape[1] != self.center.numel():
            raise ValueError(f"{self.name}: points must have shape (B, {self.center.numel()}), "
                             f"got {tuple(images.shape)}")
        return images

    def score(self, x, prompts, metadata):
        sq = (x - self.center.to(x.device)).pow(2).sum(dim=1)
        log_r = -sq / (2.0 * self.width ** 2)
        return log_r, {"distance": sq.sqrt()}


def _luma(images: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(dim=1)  # (B, H, W)


class Brightness(RewardFn):
    """log R = mean pixel intensity over channels and pixels, in [0, 1]."""

    name = "brightness"

    def score(self, images, prompts, metadata):
        r = images.mean(dim=(1, 2, 3))
        return r, {"brightness": r}


class Contrast(RewardFn):
    """log R = RMS contrast: the standard deviation of the Rec. 601 luma over the image (in [0, 0.5])."""

    name = "contrast"

    def score(self, images, prompts, metadata):
        y = _luma(images).flatten(1)
        r = (y.var(dim=1, unbiased=False) + _EPS).sqrt()
        return r, {"contrast": r}


class Colorfulness(RewardFn):
    """log R = the Hasler–Süsstrunk colourfulness on [0, 1] images (the paper's number divided by 255).

    With opponent channels rg = R − G and yb = (R + G)/2 − B,
    C = sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²). Grey images score ≈ 0.
    """

    name = "colorfulness"

    def score(self, images, prompts, metadata):
        r, g, b = images[:, 0].flatten(1), images[:, 1].flatten(1), images[:, 2].flatten(1)
        rg = r - g
        yb = 0.5 * (r + g) - b
        std = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + _EPS).sqrt()
        mean = (rg.mean(dim=1).pow(2) + yb.mean(dim=1).pow(2) + _EPS).sqrt()
        c = std + 0.3 * mean
        return c, {"colorfulness": c}
