"""Write a transformers ``CLIPModel``'s weights in the OpenCLIP state-dict layout (what HPSv2 checkpoints use).

This is the inverse of ``fastnabla.rewards.hpsv2.openclip_to_transformers``, written independently from the
OpenCLIP key names (q/k/v concatenated into ``in_proj``, projections stored as (width, dim) matrices used as
``x @ proj``), so that converting back and comparing features is a round trip that can fail.
"""
from __future__ import annotations

import torch


def _blocks(sd: dict, src: str, dst: str, n: int, out: dict) -> None:
    for i in range(n):
        s, d = f"{src}layers.{i}.", f"{dst}resblocks.{i}."
        out[d + "attn.in_proj_weight"] = torch.cat([sd[s + f"self_attn.{p}_proj.weight"] for p in "qkv"], dim=0)
        out[d + "attn.in_proj_bias"] = torch.cat([sd[s + f"self_attn.{p}_proj.bias"] for p in "qkv"], dim=0)
        for hf, oc in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                       ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[d + f"{oc}.weight"] = sd[s + f"{hf}.weight"]
            out[d + f"{oc}.bias"] = sd[s + f"{hf}.bias"]


def transformers_to_openclip(model) -> dict:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
    }
    _blocks(sd, "vision_model.encoder.", "visual.transformer.", model.config.vision_config.num_hidden_layers, out)
    _blocks(sd, "text_model.encoder.", "transformer.", model.config.text_config.num_hidden_layers, out)
    return out


def save_hps_style_checkpoint(model, path: str, *, wrap: bool = True, ddp_prefix: bool = True) -> str:
    """Save as the HPS releases do: ``{"state_dict": {...}}``, optionally with DDP's ``module.`` prefix."""
    sd = transformers_to_openclip(model)
    if ddp_prefix:
        sd = {"module." + k: v for k, v in sd.items()}
    torch.save({"state_dict": sd} if wrap else sd, path)
    return path
