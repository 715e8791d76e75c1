"""PickScore: a CLIP-H model finetuned on Pick-a-Pic preferences; prompt-conditioned.

log R(x, c) = exp(logit_scale) · ⟨normalize(E_img(x)), normalize(E_txt(c))⟩, i.e. the model's own CLIP logit
(the stored ``logit_scale`` parameter is a log, as in every CLIP; ≈100 after training, so scores are ≈ 15–25).
"""
from __future__ import annotations


from fastnabla.rewards.base import RewardFn, TextEmbeddingCache
from fastnabla.rewards.clip_common import (ClipPromptSimilarity, image_preprocess_from, load_clip_model,
                                           load_clip_tokenizer)

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(ClipPromptSimilarity, RewardFn):
    """Options: ``model`` (CLIP weights, dir or hub id), ``processor`` (tokenizer + preprocessor config, dir or hub
    id), ``checkpointing``."""

    name = "pickscore"
    needs_prompts = True

    def __init__(self, model: str = DEFAULT_MODEL, processor: str = DEFAULT_PROCESSOR, checkpointing: bool = False):
        super().__init__(checkpointing)
        self.clip = load_clip_model(model)
        self.tokenizer = load_clip_tokenizer(processor)
        self.preprocess = image_preprocess_from(processor, self.clip.config.vision_config.image_size)
        self.max_length = self.clip.config.text_config.max_position_embeddings
        self.text_cache = TextEmbeddingCache(self._encode_text)

    def score(self, images, prompts, metadata):
        s = self.clip.logit_scale.exp() * self.cosine(images, prompts)
        return s, {"pickscore": s}
