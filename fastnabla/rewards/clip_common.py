"""CLIP plumbing shared by the CLIP-based rewards: differentiable preprocessing in torch, and loaders.

Preprocessing mirrors what CLIP's image processors do to a PIL image, on a float tensor and differentiably:

- ``"crop"`` (CLIP / PickScore / aesthetic): resize so the shortest edge is ``size`` (bicubic, antialiased),
  center-crop ``crop_size``, then normalise with the CLIP mean/std;
- ``"pad"`` (HPSv2's inference transform): resize so the longest edge is ``size``, zero-pad to a square
  (the padding is black, i.e. 0 before normalisation), then normalise.

No clamping after the bicubic resize: it would zero the gradient wherever the overshoot is clipped, and the
input is already in [0, 1]. Against the PIL pipeline the only differences are uint8 quantisation and the
overshoot clamp (a few 1e-3 in [0, 1] units; tested).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastnabla.rewards.base import is_local, missing_weights_error

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImagePreprocess:
    """Differentiable (B, 3, H, W) in [0, 1] → normalised CLIP pixel values (B, 3, crop_h, crop_w)."""

    size: int = 224
    crop_size: tuple = (224, 224)
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD
    mode: str = "crop"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "crop":
            x = resize_shortest_edge(images, self.size)
            x = center_crop(x, self.crop_size)
        elif self.mode == "pad":
            x = resize_longest_edge_and_pad(images, self.size)
        else:
            raise ValueError(f"unknown preprocessing mode {self.mode!r} (use 'crop' or 'pad')")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _resize(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False, antialias=True)


def resize_shortest_edge(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    # Same rounding as the image processors: the short side becomes `size`, the long side int(size * long / short).
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    return _resize(images, new_h, new_w)


def center_crop(images: torch.Tensor, crop_size: Sequence[int]) -> torch.Tensor:
    ch, cw = crop_size
    h, w = images.shape[-2:]
    if ch > h or cw > w:
        # Pad symmetrically with zeros first (what the processors do for too-small inputs).
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = images.shape[-2:]
    # torchvision's offsets (what CLIP, OpenCLIP and ImageReward preprocess with); transformers' PIL path floors
    # instead, which differs by one pixel only when the surplus is odd.
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return images[..., top:top + ch, left:left + cw]


def resize_longest_edge_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    x = _resize(images, new_h, new_w)
    ph, pw = size - new_h, size - new_w
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)


# --- loading ------------------------------------------------------------------------------------------------------

def _read_json_from(source: str, filename: str) -> Optional[dict]:
    """``filename`` from a local directory or a hub repository; None when it is not there / not reachable."""
    path = os.path.expanduser(str(source))
    if os.path.isdir(path):
        f = os.path.join(path, filename)
        if not os.path.isfile(f):
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            f = hf_hub_download(str(source), filename)
        except Exception:
            return None
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def image_preprocess_from(source: Optional[str], default_size: int, mode: str = "crop") -> ImagePreprocess:
    """Read size/crop/mean/std from ``preprocessor_config.json`` in ``source`` (dir or hub id) when present;
    otherwise CLIP's defaults at ``default_size`` (the vision tower's image size)."""
    cfg = _read_json_from(source, "preprocessor_config.json") if source else None
    size, crop = default_size, (default_size, default_size)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if cfg:
        s = cfg.get("size", default_size)
        size = int(s.get("shortest_edge", s.get("height", default_size)) if isinstance(s, dict) else s)
        c = cfg.get("crop_size", size)
        crop = (int(c["height"]), int(c["width"])) if isinstance(c, dict) else (int(c), int(c))
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
    if mode == "pad":
        size = crop[0]
    return ImagePreprocess(size=size, crop_size=crop, mean=mean, std=std, mode=mode)


def load_clip_model(source: str, option: str = "model", how: Optional[str] = None):
    """A transformers ``CLIPModel`` in float32, frozen, from a local directory or a hub id."""
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(os.path.expanduser(str(source)))
    except Exception as e:  # noqa: BLE001 - any loading failure gets the same actionable message
        raise missing_weights_error(
            option, "CLIP weights", source,
            how or f"set reward.{option} to a local directory saved with CLIPModel.save_pretrained (config.json + "
                   f"weights), or to a hub id with network access", e) from None
    return model.float().eval().requires_grad_(False)


def load_clip_tokenizer(source: str, option: str = "processor"):
    """A CLIP tokenizer (fast or slow) from a local directory or a hub id."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.expanduser(str(source)))
    except Exception as e:  # noqa: BLE001
        raise missing_weights_error(
            option, "the CLIP tokenizer", source,
            f"set reward.{option} to a local directory with the tokenizer files (vocab.json + merges.txt or "
            f"tokenizer.json), or to a hub id with network access", e) from None


def clip_tokenize(tokenizer, prompts: Sequence[str], max_length: int, device) -> dict:
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def clip_image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features (not normalised). Written against the towers, not ``get_image_features``, whose
    return type changed between transformers 4 (tensor) and 5 (a ModelOutput)."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def clip_text_embeds(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


__all__ = [
    "ImagePreprocess", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "image_preprocess_from", "load_clip_model",
    "load_clip_tokenizer", "clip_tokenize", "clip_image_embeds", "clip_text_embeds", "normalize", "is_local",
    "resize_shortest_edge", "center_crop", "resize_longest_edge_and_pad",
]


class ClipPromptSimilarity:
    """Cosine similarity of normalised CLIP image and prompt embeddings, shared by the prompt-conditioned CLIP
    rewards (pickscore, hpsv2). The reward sets ``clip``, ``tokenizer``, ``max_length``, ``preprocess`` and
    ``text_cache = TextEmbeddingCache(self._encode_text)``."""

    def _encode_text(self, prompts):
        tok = clip_tokenize(self.tokenizer, prompts, self.max_length, self.clip.logit_scale.device)
        return normalize(clip_text_embeds(self.clip, **tok))

    def _forward(self, pixel_values):
        return normalize(clip_image_embeds(self.clip, pixel_values))

    def cosine(self, images, prompts):
        txt = self.text_cache(prompts, images.device)
        img = self.run_model(self._forward, self.preprocess(images))
        return (img * txt).sum(-1)
