"""HPSv2 / HPSv2.1: an OpenCLIP ViT-H-14 finetuned on human preferences; prompt-conditioned.

log R(x, c) = ⟨normalize(E_img(x)), normalize(E_txt(c))⟩ (the HPSv2 convention: cosine similarity, no logit
scale; ≈0.2–0.35 for typical images).

The released checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are OpenCLIP state dicts. We
do not depend on open_clip: ``openclip_to_transformers`` converts the state dict to a transformers ``CLIPModel``
at load time. The two layouts differ in naming and in three places that need more than a rename:

- attention: OpenCLIP stores q, k, v stacked in ``attn.in_proj_weight`` (3·w, w) / ``in_proj_bias`` (3·w);
  transformers has separate ``q_proj``/``k_proj``/``v_proj`` — split along dim 0 in that order;
- projections: OpenCLIP applies ``x @ proj`` with ``proj`` of shape (w, d); transformers' bias-free
  ``nn.Linear`` stores (d, w) — transpose ``visual.proj`` and ``text_projection``;
- ``visual.class_embedding`` / ``visual.positional_embedding`` / ``positional_embedding`` are bare parameters in
  OpenCLIP and embedding modules in transformers (same values).

Dimensions are read off the tensors; the head counts are not stored anywhere. They come from ``vision_heads`` /
``text_heads`` when given, else from the tower width via the OpenCLIP model configs (ViT-H-14: vision width 1280
with head width 80 → 16 heads; text width 1024 → 16 heads). A wrong head count would load without complaint and
give wrong features, so an unknown width is an error, not a guess. The activation is exact GELU
for the LAION-trained towers (``hidden_act``; "quick_gelu" for OpenAI-trained ones). Pooling matches: OpenCLIP
takes the class token after ``ln_post`` and the text feature at the end-of-text token (the largest id), which is
what ``CLIPModel`` does with ``eos_token_id`` set to the tokenizer's end-of-text id.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from fastnabla.rewards.base import RewardFn, TextEmbeddingCache, missing_weights_error, resolve_checkpoint_file
from fastnabla.rewards.clip_common import ClipPromptSimilarity, image_preprocess_from, load_clip_tokenizer

HUB_REPO = "xswu/HPSv2"
CHECKPOINT_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# Per-block renames (the same for the vision and the text transformer).
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def unwrap_openclip_state_dict(obj) -> dict:
    """Accept a bare state dict or {"state_dict": …} / {"model": …}, with or without DDP's ``module.`` prefix."""
    sd = obj
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state dict, got {type(sd).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _count_blocks(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"resblocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(ids) + 1 if ids else 0


# Tower width → number of heads in the OpenCLIP configs (vision towers: ViT-B/L/H/bigG; text towers of those).
_VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
_TEXT_HEADS = {512: 8, 768: 12, 1024: 16, 1280: 20}


def _heads(width: int, given: Optional[int], table: dict, option: str) -> int:
    heads = given if given is not None else table.get(width)
    if heads is None:
        raise ValueError(f"cannot infer the number of attention heads of a width-{width} tower; set reward.{option}")
    if width % heads:
        raise ValueError(f"reward.{option}={heads} does not divide the tower width {width}")
    return int(heads)


def openclip_config(sd: dict, *, vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
                    hidden_act: str = "gelu", eos_token_id: int = 49407,
                    bos_token_id: int = 49406, pad_token_id: int = 0, layer_norm_eps: float = 1e-5):
    """A ``CLIPConfig`` matching an OpenCLIP (plain ``CLIP`` class) state dict."""
    from transformers import CLIPConfig

    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"not an OpenCLIP CLIP state dict: missing {', '.join(missing)}")
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    n_pos = sd["visual.positional_embedding"].shape[0] - 1
    grid = int(round(n_pos ** 0.5))
    if grid * grid != n_pos:
        raise ValueError(f"visual.positional_embedding has {n_pos + 1} rows, not a square grid + class token")
    t_width = sd["token_embedding.weight"].shape[1]
    proj_dim = sd["visual.proj"].shape[1]
    if sd["text_projection"].shape[1] != proj_dim:
        raise ValueError("visual.proj and text_projection project to different sizes")
    v_heads = _heads(v_width, vision_heads, _VISION_HEADS, "vision_heads")
    t_heads = _heads(t_width, text_heads, _TEXT_HEADS, "text_heads")
    vision = dict(
        hidden_size=v_width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "visual.transformer."), num_attention_heads=v_heads,
        image_size=grid * patch, patch_size=patch, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
        projection_dim=proj_dim,
    )
    text = dict(
        vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=t_width,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "transformer."), num_attention_heads=t_heads,
        max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act=hidden_act,
        layer_norm_eps=layer_norm_eps, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
        pad_token_id=pad_token_id, projection_dim=proj_dim,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj_dim)


def _convert_blocks(sd: dict, src: str, dst: str, n: int, out: dict) -> None:
    for i in range(n):
        s, d = f"{src}resblocks.{i}.", f"{dst}layers.{i}."
        w, b = sd[s + "attn.in_proj_weight"], sd[s + "attn.in_proj_bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[d + f"self_attn.{name}.weight"] = w.chunk(3, dim=0)[j]
            out[d + f"self_attn.{name}.bias"] = b.chunk(3, dim=0)[j]
        for a, c in _BLOCK_RENAMES.items():
            for p in ("weight", "bias"):
                out[d + f"{c}.{p}"] = sd[s + f"{a}.{p}"]


def openclip_to_transformers(sd: dict, config) -> dict:
    """Rename/split/transpose an OpenCLIP state dict into ``CLIPModel``'s layout (see the module docstring)."""
    out = {
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_projection.weight": sd["text_projection"].t(),
        "logit_scale": sd["logit_scale"] if "logit_scale" in sd else torch.tensor(config.logit_scale_init_value),
    }
    for a, c in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
        for p in ("weight", "bias"):
            out[f"{c}.{p}"] = sd[f"{a}.{p}"]
    _convert_blocks(sd, "visual.transformer.", "vision_model.encoder.", config.vision_config.num_hidden_layers, out)
    _convert_blocks(sd, "transformer.", "text_model.encoder.", config.text_config.num_hidden_layers, out)
    return {k: v.float().contiguous() for k, v in out.items()}


def clip_from_openclip_state_dict(sd: dict, **config_kwargs):
    """OpenCLIP state dict → frozen float32 transformers ``CLIPModel``; strict about unconverted keys."""
    from transformers import CLIPModel

    sd = unwrap_openclip_state_dict(sd)
    config = openclip_config(sd, **config_kwargs)
    model = CLIPModel(config)
    converted = openclip_to_transformers(sd, config)
    result = model.load_state_dict(converted, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(f"OpenCLIP → transformers conversion mismatch: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")
    return model.float().eval().requires_grad_(False)


class HPSv2Reward(ClipPromptSimilarity, RewardFn):
    """Options: ``model`` (path to the HPS checkpoint; default: fetched from the hub), ``tokenizer`` (alias
    ``processor``: dir or hub id of a CLIP tokenizer, default laion/CLIP-ViT-H-14-laion2B-s32B-b79K),
    ``vision_heads`` / ``text_heads`` (inferred from the widths: 16 / 16 for ViT-H-14), ``hidden_act`` ("gelu"),
    ``checkpointing``."""

    name = "hpsv2"
    needs_prompts = True

    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None, processor: Optional[str] = None,
                 vision_heads: Optional[int] = None, text_heads: Optional[int] = None, hidden_act: str = "gelu",
                 checkpointing: bool = False,
                 variant: str = "hpsv2"):
        super().__init__(checkpointing)
        self.name = variant
        if tokenizer and processor and tokenizer != processor:
            raise ValueError("reward.tokenizer and reward.processor are aliases; set one of them")
        tok_src = tokenizer or processor or DEFAULT_TOKENIZER
        self.tokenizer = load_clip_tokenizer(tok_src, option="tokenizer")
        path = resolve_checkpoint_file(model, HUB_REPO, CHECKPOINT_FILES[variant], f"{variant} checkpoint")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            self.clip = clip_from_openclip_state_dict(
                sd, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act, eos_token_id=self.tokenizer.eos_token_id,
                bos_token_id=self.tokenizer.bos_token_id, pad_token_id=self.tokenizer.pad_token_id or 0)
        except Exception as e:  # noqa: BLE001
            raise missing_weights_error("model", f"the {variant} checkpoint", path,
                                        f"expected an OpenCLIP ViT-H-14 state dict ({CHECKPOINT_FILES[variant]})",
                                        e) from None
        # HPSv2's inference transform: fit the longest side, zero-pad to a square, CLIP mean/std.
        self.preprocess = image_preprocess_from(None, self.clip.config.vision_config.image_size, mode="pad")
        self.max_length = self.clip.config.text_config.max_position_embeddings
        self.text_cache = TextEmbeddingCache(self._encode_text)

    def score(self, images, prompts, metadata):
        s = self.cosine(images, prompts)
        return s, {self.name: s}
