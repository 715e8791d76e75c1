"""Rewards on digit images (B, 1, S, S) in [0, 1] (what the pixel backbone decodes to).

- ``digit_class``: log R(x) = log Σ_{c∈C} p(y = c | x), with p the softmax of a small CNN classifier trained on
  scikit-learn's digits (``fastnabla.digits.ensure_classifier``: trained once, cached). One class c gives
  log p(y = c | x).
- ``digit_ink``: log R(x) = scale · mean_pixels clamp(x, 0, 1), the amount of ink (a smooth objective).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from fastnabla.rewards.base import RewardFn

__all__ = ["DigitClassifier", "DigitClassReward", "DigitInkReward"]


class DigitClassifier(nn.Module):
    """A small CNN on images (B, 1, S, S) in [0, 1] (S divisible by 4).

    conv3×3(1→c) → SiLU → conv3×3/2(c→2c) → SiLU → conv3×3/2(2c→2c) → SiLU → flatten → linear(→ features) → SiLU
    gives the features φ(x) (B, features) used for diversity/FID/KID; a linear head gives the logits (B, 10).
    """

    def __init__(self, image_size: int = 8, width: int = 32, features: int = 128, num_classes: int = 10):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"DigitClassifier: image_size={image_size} must be divisible by 4")
        self.config = dict(image_size=image_size, width=width, features=features, num_classes=num_classes)
        self.num_features = features
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, features), nn.SiLU(),
        )
        self.head = nn.Linear(features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)  # the network sees [−1, 1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class _DigitReward(RewardFn):
    input_kind = "digit"

    def _check_inputs(self, images, prompts):
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise ValueError(f"{self.name}: images must be a float tensor")
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"{self.name}: images must have shape (B, 1, H, W) with values in [0, 1] (the pixel "
                             f"backbone's decode), got {tuple(images.shape)}")
        return images


class DigitClassReward(_DigitReward):
    """log R(x) = log Σ_{c∈classes} softmax(f(x))_c, fp32, differentiable w.r.t. the images.

    ``model``: a classifier directory written by ``fastnabla.digits`` (None: the cached default classifier,
    trained on first use); ``classifier``: an ``nn.Module`` to use directly (tests).
    """

    name = "digit_class"

    def __init__(self, classes: Union[int, Sequence[int]] = 3, model: Optional[str] = None, image_size: int = 8,
                 cache_dir: Optional[str] = None, classifier: Optional[nn.Module] = None,
                 checkpointing: bool = False):
        super().__init__(checkpointing)
        cls = [classes] if isinstance(classes, int) else list(classes)
        if not cls or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 9 for c in cls) \
                or len(set(cls)) != len(cls):
            raise ValueError(f"reward.options.classes={classes!r}: must be a digit 0…9 or a list of distinct "
                             "digits, e.g. [3, 5, 8]")
        self.classes = sorted(cls)
        self.meta: dict = {}
        if classifier is None:
            from fastnabla.digits import ensure_classifier, load_classifier

            classifier, self.meta = load_classifier(model) if model else ensure_classifier(image_size, cache_dir)
        self.classifier = classifier
        self.register_buffer("_idx", torch.tensor(self.classes, dtype=torch.long), persistent=False)

    def score(self, images, prompts, metadata):
        size = getattr(self.classifier, "config", {}).get("image_size")
        if size is not None and images.shape[-1] != size:
            raise ValueError(f"{self.name}: the classifier reads {size}×{size} images, got {images.shape[-1]}×"
                             f"{images.shape[-2]}; set reward.options.image_size={images.shape[-1]} (= model.image_size)")
        logp = torch.log_softmax(self.run_model(self.classifier, images), dim=1)
        log_r = torch.logsumexp(logp.index_select(1, self._idx.to(images.device)), dim=1)
        return log_r, {"pred": logp.argmax(1)}


class DigitInkReward(_DigitReward):
    """log R(x) = scale · mean over pixels of clamp(x, 0, 1): the fraction of ink, in [0, scale]."""

    name = "digit_ink"

    def __init__(self, scale: float = 10.0, checkpointing: bool = False):
        super().__init__(checkpointing)
        if not float(scale) > 0:
            raise ValueError(f"reward.options.scale={scale!r}: must be > 0")
        self.scale = float(scale)

    def score(self, images, prompts, metadata):
        ink = images.clamp(0, 1).mean(dim=(1, 2, 3))
        return self.scale * ink, {"ink": ink}
