"""LAION aesthetic predictor: CLIP ViT-L/14 image embedding → L2-normalise → linear MLP head → score (≈1..10).

log R(x) = head(normalize(E_img(preprocess(x)))). The head is the "improved aesthetic predictor"
(``sac+logos+ava1-l14-linearMSE.pth``): a stack of Linear layers with no activations (dropout between them at
train time only), so its state dict has exactly the keys

    layers.0.{weight,bias}   768 → 1024      (layers.1: dropout 0.2)
    layers.2.{weight,bias}   1024 → 128      (layers.3: dropout 0.2)
    layers.4.{weight,bias}   128 → 64        (layers.5: dropout 0.1)
    layers.6.{weight,bias}   64 → 16
    layers.7.{weight,bias}   16 → 1

``AestheticHead`` keeps that layout (nn.Sequential indices included) so the released file loads strictly.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from fastnabla.rewards.base import RewardFn, missing_weights_error
from fastnabla.rewards.clip_common import image_preprocess_from, normalize

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class AestheticHead(nn.Module):
    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


def _load_state_dict_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def load_aesthetic_head(path: Optional[str]) -> AestheticHead:
    how = f"download {HEAD_FILE} (LAION improved aesthetic predictor) and set reward.head=/path/to/{HEAD_FILE}"
    if not path:
        raise ValueError(f"reward.head: aesthetic MLP checkpoint not set; {how}")
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise ValueError(f"reward.head: aesthetic MLP checkpoint not found at {path}; {how}")
    try:
        sd = _load_state_dict_file(path)
        sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
        head = AestheticHead(int(sd["layers.0.weight"].shape[1]))
        head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except Exception as e:  # noqa: BLE001
        raise missing_weights_error("head", "the aesthetic MLP head", path,
                                    f"expected a torch state dict with keys layers.{{0,2,4,6,7}}.{{weight,bias}}; "
                                    f"{how}", e) from None
    return head.float().eval().requires_grad_(False)


def load_clip_vision(source: str, option: str = "model"):
    """Vision tower + projection of a CLIP checkpoint: a vision-only directory/id, or a whole ``CLIPModel`` one.

    A whole ``CLIPModel`` keeps the projection size at the top of its config; its vision sub-config need not
    repeat it (transformers 5 writes the 512 default there), so the vision config is built from the top-level
    ``projection_dim``. The text tower's weights are skipped without a report; a missing vision weight is an
    error, not a random initialisation."""
    from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    path = os.path.expanduser(str(source))
    verbosity = hf_logging.get_verbosity()
    try:
        config = AutoConfig.from_pretrained(path)
        if isinstance(config, CLIPConfig):
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            config = vision
        hf_logging.set_verbosity_error()  # the load report lists every text-tower key of a whole CLIPModel
        model, info = CLIPVisionModelWithProjection.from_pretrained(path, config=config, output_loading_info=True)
        missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
        if missing:
            raise ValueError(f"the checkpoint lacks {', '.join(sorted(missing)[:3])}")
    except Exception as e:  # noqa: BLE001
        raise missing_weights_error(
            option, "CLIP vision weights", source,
            f"set reward.{option} to a local CLIP directory (e.g. a saved {DEFAULT_CLIP}) or to a hub id with "
            f"network access", e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.float().eval().requires_grad_(False)


class AestheticReward(RewardFn):
    """Options: ``model`` (CLIP dir or hub id, default openai/clip-vit-large-patch14), ``head`` (path to the MLP
    state dict), ``processor`` (where preprocessor_config.json lives; defaults to ``model``), ``checkpointing``."""

    name = "aesthetic"

    def __init__(self, model: str = DEFAULT_CLIP, head: Optional[str] = None, processor: Optional[str] = None,
                 checkpointing: bool = False):
        super().__init__(checkpointing)
        self.head = load_aesthetic_head(head)  # cheap check first: a missing head fails before CLIP loads
        self.clip = load_clip_vision(model)
        emb_dim = self.clip.config.projection_dim
        if emb_dim != self.head.input_size:
            raise ValueError(f"reward.head expects {self.head.input_size}-d CLIP embeddings but reward.model "
                             f"{model!r} gives {emb_dim}-d ones (the released head needs ViT-L/14)")
        self.preprocess = image_preprocess_from(processor or model, self.clip.config.image_size)

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.clip(pixel_values=pixel_values).image_embeds
        return self.head(normalize(emb)).squeeze(-1)

    def score(self, images, prompts, metadata):
        pix = self.preprocess(images)
        s = self.run_model(self._forward, pix)
        return s, {"aesthetic": s}
