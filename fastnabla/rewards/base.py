"""The reward-function contract and what every reward shares (fp32, no autocast, optional checkpointing).

A reward is called as ``reward_fn(images, prompts, metadata) -> (log_reward, info)``:

- ``images``: float tensor in [0, 1], shape (B, 3, H, W) (points (B, 2) for the toy reward), any float dtype;
- ``prompts``: list of B strings, or None for prompt-free rewards;
- ``metadata``: dict or None (passed through; no built-in reward reads it);
- ``log_reward``: (B,) float32, differentiable w.r.t. ``images``;
- ``info``: dict of detached extras (per-sample tensors shaped (B,) or scalars).

Reward models are frozen (``requires_grad=False``, eval mode): gradients reach the images only. The forward always
runs in float32 with autocast switched off, whatever the caller's dtype or autocast state, because bf16 reward
gradients are too noisy to train on (ALGORITHM §5).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

Prompts = Optional[Sequence[str]]


class RewardFn(nn.Module):
    """Base class. Subclasses implement ``score(images_fp32, prompts, metadata) -> (log_reward, info)``."""

    name: str = "reward"
    needs_prompts: bool = False
    #: expected trailing shape of one input: (3, H, W) images by default; the toy reward overrides it.
    input_kind: str = "image"

    def __init__(self, checkpointing: bool = False):
        super().__init__()
        self.checkpointing = bool(checkpointing)

    # --- the public call ----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, prompts: Prompts = None, metadata: Optional[dict] = None):
        images = self._check_inputs(images, prompts)
        with torch.autocast(device_type=images.device.type, enabled=False):
            log_reward, info = self.score(images.float(), prompts, metadata)
        if log_reward.shape != (images.shape[0],):
            raise RuntimeError(f"{self.name}: reward returned shape {tuple(log_reward.shape)}, "
                               f"expected ({images.shape[0]},)")
        info = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in info.items()}
        return log_reward.float(), info

    def score(self, images: torch.Tensor, prompts: Prompts, metadata: Optional[dict]):
        raise NotImplementedError

    # --- helpers for subclasses ---------------------------------------------------------------------------------
    def run_model(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        """``fn(*args)``, wrapped in activation checkpointing when ``checkpointing`` is on (and grads are needed).

        Checkpointing trades one extra forward of the reward model for not keeping its activations alive between
        the forward and the backward; the gradients are the same (tested).
        """
        if self.checkpointing and torch.is_grad_enabled() and any(a.requires_grad for a in args):
            return _checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def freeze(self) -> "RewardFn":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        # A reward model never goes back to train mode (dropout would make log R stochastic).
        return super().train(False)

    def _check_inputs(self, images: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise ValueError(f"{self.name}: images must be a float tensor, got "
                             f"{type(images).__name__ if not torch.is_tensor(images) else images.dtype}")
        if self.input_kind == "image" and (images.ndim != 4 or images.shape[1] != 3):
            raise ValueError(f"{self.name}: images must have shape (B, 3, H, W) with values in [0, 1], "
                             f"got {tuple(images.shape)}")
        if self.needs_prompts:
            if prompts is None:
                raise ValueError(f"{self.name}: this reward is prompt-conditioned; pass one prompt per image")
            if isinstance(prompts, str) or len(prompts) != images.shape[0]:
                raise ValueError(f"{self.name}: got {1 if isinstance(prompts, str) else len(prompts)} prompts "
                                 f"for {images.shape[0]} images; pass a list with one prompt per image")
        return images

    def extra_repr(self) -> str:
        return f"name={self.name!r}, needs_prompts={self.needs_prompts}, checkpointing={self.checkpointing}"


class TextEmbeddingCache:
    """Prompt → text embedding (or any per-prompt tensor, e.g. token ids), computed once, without grad (rewards
    differentiate w.r.t. images only).

    Prompt sets are small and repeat every epoch, so caching saves one text-tower forward per sample. Bounded: the
    oldest entries are dropped past ``max_size``.
    """

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_size: int = 4096):
        self.encode = encode
        self.max_size = max_size
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                emb = self.encode(missing)
            for p, e in zip(missing, emb):
                self._cache[p] = e
            while len(self._cache) > self.max_size:
                self._cache.pop(next(iter(self._cache)))
        return torch.stack([self._cache[p] for p in prompts]).to(device)

    def clear(self) -> None:
        self._cache.clear()


def is_local(path_or_id: str) -> bool:
    return os.path.exists(os.path.expanduser(str(path_or_id)))


def missing_weights_error(option: str, what: str, source: Any, how: str, err: Exception | None = None) -> ValueError:
    """The one-line error every loader raises when weights cannot be found or loaded."""
    reason = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})" if err is not None else ""
    return ValueError(f"reward.{option}: could not load {what} from {source!r}{reason}; {how}")


def resolve_checkpoint_file(path: Optional[str], hub_repo: str, filename: str, what: str) -> str:
    """A reward checkpoint file: ``path`` when given (it must exist), else ``filename`` fetched from ``hub_repo``.
    Either failure is the one-line error that says how to provide the file."""
    how = (f"download {filename} (hub repo {hub_repo}) and set reward.model=/path/to/{filename} "
           f"(without reward.model it is fetched from the hub, which needs network access)")
    if path:
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise ValueError(f"reward.model: {what} not found at {path}; {how}")
        return path
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(hub_repo, filename)
    except Exception as e:  # noqa: BLE001
        raise missing_weights_error("model", f"the {what}", f"{hub_repo}/{filename}", how, e) from None
