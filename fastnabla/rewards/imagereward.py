"""ImageReward: BLIP (ViT + BERT with cross-attention to the image) + an MLP head; prompt-conditioned.

log R(x, c) = (head(h_CLS) − μ) / σ, where h_CLS is the [CLS] output of the BERT text encoder run on the prompt
with cross-attention to every token of the BLIP ViT's output for image x, head is the same Linear stack as the
LAION aesthetic head (keys ``mlp.layers.{0,2,4,6,7}``), and μ = 0.16717362830052426, σ = 1.0333394966054072 are
the constants the released model standardises with. Prompts are tokenised with BERT's uncased tokenizer, padded
/ truncated to 35 tokens, [CLS] first (no [ENC] substitution).

The released ``ImageReward.pt`` is a plain state dict of the original BLIP code. We run it on transformers'
``BlipVisionModel`` and ``BlipTextModel`` (no dependency on the ``image-reward`` package, which does not work
with transformers 5). ``imagereward_to_transformers`` renames the keys:

- vision (timm-style ViT, ``blip.visual_encoder.*``): ``cls_token`` → ``embeddings.class_embedding``,
  ``pos_embed`` → ``embeddings.position_embedding``, ``patch_embed.proj`` → ``embeddings.patch_embedding``,
  ``blocks.N.{norm1,norm2,attn.qkv,attn.proj,mlp.fc1,mlp.fc2}`` → ``encoder.layers.N.{layer_norm1,layer_norm2,
  self_attn.qkv,self_attn.projection,mlp.fc1,mlp.fc2}``, ``norm`` → ``post_layernorm``; the fused qkv matrix has
  the same (3, heads, head_dim) row layout in both, so it is copied as is;
- text (``blip.text_encoder.*``): the BLIP BERT keys are transformers' ``BlipTextModel`` keys already.

Sizes are read off the tensors; head counts assume BLIP's 64-wide heads (ViT-L: 16, BERT-base: 12) unless
``vision_heads`` / ``text_heads`` are given. The ViT's LayerNorm eps is 1e-6, BERT's 1e-12.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

from fastnabla.rewards.aesthetic import AestheticHead
from fastnabla.rewards.base import RewardFn, TextEmbeddingCache, missing_weights_error, resolve_checkpoint_file
from fastnabla.rewards.clip_common import ImagePreprocess

HUB_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
DEFAULT_TOKENIZER = "bert-base-uncased"
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_TOKENS = 35

_VIT_RENAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _count(sd: dict, pattern: str) -> int:
    pat = re.compile(pattern)
    ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(ids) + 1 if ids else 0


def imagereward_configs(sd: dict, vision_heads: Optional[int] = None, text_heads: Optional[int] = None):
    """(BlipVisionConfig, BlipTextConfig, head input size) for an ImageReward state dict."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    required = [v + "cls_token", v + "pos_embed", v + "patch_embed.proj.weight", v + "blocks.0.mlp.fc1.weight",
                t + "embeddings.word_embeddings.weight", t + "embeddings.position_embeddings.weight",
                t + "encoder.layer.0.intermediate.dense.weight",
                t + "encoder.layer.0.crossattention.self.key.weight", "mlp.layers.0.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"not an ImageReward state dict: missing {', '.join(missing[:3])}")
    width, patch = sd[v + "patch_embed.proj.weight"].shape[0], sd[v + "patch_embed.proj.weight"].shape[-1]
    n_pos = sd[v + "pos_embed"].shape[1] - 1
    grid = int(round(n_pos ** 0.5))
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed has {n_pos + 1} rows, not a square grid + class token")
    hidden = sd[t + "embeddings.word_embeddings.weight"].shape[1]
    vision_heads, text_heads = vision_heads or width // 64, text_heads or hidden // 64
    for w, h, opt in ((width, vision_heads, "vision_heads"), (hidden, text_heads, "text_heads")):
        if h < 1 or w % h:
            raise ValueError(f"cannot split width {w} into {h} heads of BLIP's width 64; set reward.{opt}")
    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=sd[v + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(sd, re.escape(v) + r"blocks\.(\d+)\."), num_attention_heads=vision_heads,
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6,
    )
    text = BlipTextConfig(
        vocab_size=sd[t + "embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden,
        encoder_hidden_size=sd[t + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=sd[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count(sd, re.escape(t) + r"encoder\.layer\.(\d+)\."), num_attention_heads=text_heads,
        max_position_embeddings=sd[t + "embeddings.position_embeddings.weight"].shape[0], hidden_act="gelu",
        layer_norm_eps=1e-12, is_decoder=True,  # is_decoder=True is what makes BlipTextLayer build cross-attention
        pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None,  # unused: we never generate
    )
    return vision, text, sd["mlp.layers.0.weight"].shape[1]


def imagereward_to_transformers(sd: dict, n_vision_layers: int) -> tuple[dict, dict, dict]:
    """Split + rename an ImageReward state dict into (vision, text, head) state dicts (see the module docstring)."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    vision = {
        "embeddings.class_embedding": sd[v + "cls_token"],
        "embeddings.position_embedding": sd[v + "pos_embed"],
        "embeddings.patch_embedding.weight": sd[v + "patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": sd[v + "patch_embed.proj.bias"],
        "post_layernorm.weight": sd[v + "norm.weight"],
        "post_layernorm.bias": sd[v + "norm.bias"],
    }
    for i in range(n_vision_layers):
        for a, b in _VIT_RENAMES.items():
            for p in ("weight", "bias"):
                vision[f"encoder.layers.{i}.{b}.{p}"] = sd[f"{v}blocks.{i}.{a}.{p}"]
    text = {k[len(t):]: w for k, w in sd.items() if k.startswith(t) and not k.endswith("position_ids")}
    head = {k[len("mlp."):]: w for k, w in sd.items() if k.startswith("mlp.")}
    f = lambda d: {k: w.float().contiguous() for k, w in d.items()}  # noqa: E731
    return f(vision), f(text), f(head)


def load_imagereward_modules(sd: dict, vision_heads: Optional[int] = None, text_heads: Optional[int] = None):
    """ImageReward state dict → frozen float32 (BlipVisionModel, BlipTextModel, AestheticHead-shaped MLP)."""
    from transformers import BlipTextModel, BlipVisionModel

    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {(k[len("module."):] if k.startswith("module.") else k): w for k, w in sd.items()}
    vcfg, tcfg, head_in = imagereward_configs(sd, vision_heads, text_heads)
    vision_sd, text_sd, head_sd = imagereward_to_transformers(sd, vcfg.num_hidden_layers)
    vision, text, head = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False), AestheticHead(head_in)
    for name, module, state in (("vision", vision, vision_sd), ("text", text, text_sd), ("head", head, head_sd)):
        res = module.load_state_dict(state, strict=False)
        missing = [k for k in res.missing_keys if not k.endswith("position_ids")]
        if missing or res.unexpected_keys:
            raise ValueError(f"ImageReward {name} weights do not match: missing {missing[:3]}, "
                             f"unexpected {list(res.unexpected_keys)[:3]}")
    return tuple(m.float().eval().requires_grad_(False) for m in (vision, text, head))


class ImageRewardReward(RewardFn):
    """Options: ``model`` (path to ImageReward.pt; default: fetched from the hub), ``tokenizer`` (dir or hub id of
    BERT's uncased tokenizer, default bert-base-uncased), ``vision_heads`` / ``text_heads``, ``checkpointing``.

    The prompt's token ids are cached, not its features: the text encoder cross-attends to the image, so it runs
    (with gradients) for every image."""

    name = "imagereward"
    needs_prompts = True

    def __init__(self, model: Optional[str] = None, tokenizer: str = DEFAULT_TOKENIZER,
                 vision_heads: Optional[int] = None, text_heads: Optional[int] = None, checkpointing: bool = False):
        super().__init__(checkpointing)
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(str(tokenizer)))
        except Exception as e:  # noqa: BLE001
            raise missing_weights_error("tokenizer", "the BERT tokenizer", tokenizer,
                                        "set reward.tokenizer to a local directory with vocab.txt (BERT uncased) "
                                        "or to a hub id with network access", e) from None
        path = resolve_checkpoint_file(model, HUB_REPO, CHECKPOINT_FILE, "ImageReward checkpoint")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            self.vision, self.text, self.head = load_imagereward_modules(sd, vision_heads, text_heads)
        except Exception as e:  # noqa: BLE001
            raise missing_weights_error("model", "the ImageReward checkpoint", path,
                                        f"expected the state dict of {CHECKPOINT_FILE}", e) from None
        # ImageReward's transform: resize shortest edge (bicubic), center crop, CLIP mean/std.
        size = self.vision.config.image_size
        self.preprocess = ImagePreprocess(size=size, crop_size=(size, size))
        self.token_cache = TextEmbeddingCache(self._tokenize)

    def _tokenize(self, prompts):
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt")
        # stack ids and mask in one tensor so the cache stores one row per prompt
        return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)

    def _forward(self, pixel_values, input_ids, attention_mask):
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                      encoder_attention_mask=image_mask).last_hidden_state[:, 0]
        return (self.head(h).squeeze(-1) - SCORE_MEAN) / SCORE_STD

    def score(self, images, prompts, metadata):
        tok = self.token_cache(prompts, images.device)
        ids, mask = tok[:, 0], tok[:, 1]
        pix = self.preprocess(images)
        fn = lambda p: self._forward(p, ids, mask)  # noqa: E731
        s = self.run_model(fn, pix)
        return s, {"imagereward": s}
