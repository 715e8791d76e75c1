"""A tiny random ImageReward checkpoint (BLIP ViT + BERT with cross-attention + MLP head) and a BERT tokenizer.

The checkpoint is written in the key layout of the released ``ImageReward.pt`` (``blip.visual_encoder.*`` in
the timm ViT naming, ``blip.text_encoder.*`` in the BLIP BERT naming, ``mlp.layers.{0,2,4,6,7}.*``), built
directly as random tensors, not through the loader's classes, so loading it tests the loader's mapping.
"""
from __future__ import annotations

import os
import string

import torch

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_bert_tokenizer(directory: str):
    """An uncased WordPiece tokenizer with ~80 pieces, saved to ``directory`` (loads with AutoTokenizer)."""
    from transformers import BertTokenizer

    os.makedirs(directory, exist_ok=True)
    pieces = BERT_SPECIALS + list(string.ascii_lowercase + string.digits + ".,!?'-")
    pieces += ["##" + c for c in string.ascii_lowercase] + ["photo", "of", "cat", "the", "dog"]
    tok = BertTokenizer(vocab={p: i for i, p in enumerate(pieces)}, do_lower_case=True)
    tok.save_pretrained(directory)
    return tok


def tiny_imagereward_state_dict(*, vocab: int = 80, vision_width: int = 32, text_width: int = 24, layers: int = 2,
                                image_size: int = 32, patch: int = 8, max_pos: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix, n):
        return {prefix + ".weight": 1 + 0.1 * rnd(n, scale=1.0), prefix + ".bias": 0.1 * rnd(n, scale=1.0)}

    def lin(prefix, n_in, n_out):
        return {prefix + ".weight": rnd(n_out, n_in), prefix + ".bias": 0.1 * rnd(n_out, scale=1.0)}

    sd, v, t = {}, "blip.visual_encoder.", "blip.text_encoder."
    n_tok = (image_size // patch) ** 2 + 1
    sd[v + "cls_token"] = rnd(1, 1, vision_width, scale=0.5)
    sd[v + "pos_embed"] = rnd(1, n_tok, vision_width, scale=0.5)
    sd[v + "patch_embed.proj.weight"] = rnd(vision_width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5)
    sd[v + "patch_embed.proj.bias"] = 0.1 * rnd(vision_width, scale=1.0)
    for i in range(layers):
        b = f"{v}blocks.{i}."
        sd.update(ln(b + "norm1", vision_width))
        sd.update(lin(b + "attn.qkv", vision_width, 3 * vision_width))
        sd.update(lin(b + "attn.proj", vision_width, vision_width))
        sd.update(ln(b + "norm2", vision_width))
        sd.update(lin(b + "mlp.fc1", vision_width, 4 * vision_width))
        sd.update(lin(b + "mlp.fc2", 4 * vision_width, vision_width))
    sd.update(ln(v + "norm", vision_width))

    sd[t + "embeddings.word_embeddings.weight"] = rnd(vocab, text_width, scale=0.5)
    sd[t + "embeddings.position_embeddings.weight"] = rnd(max_pos, text_width, scale=0.5)
    sd[t + "embeddings.position_ids"] = torch.arange(max_pos).unsqueeze(0)  # a persistent buffer in BLIP's code
    sd.update(ln(t + "embeddings.LayerNorm", text_width))
    for i in range(layers):
        b = f"{t}encoder.layer.{i}."
        for name, kv_in in (("attention", text_width), ("crossattention", vision_width)):
            sd.update(lin(b + f"{name}.self.query", text_width, text_width))
            sd.update(lin(b + f"{name}.self.key", kv_in, text_width))
            sd.update(lin(b + f"{name}.self.value", kv_in, text_width))
            sd.update(lin(b + f"{name}.output.dense", text_width, text_width))
            sd.update(ln(b + f"{name}.output.LayerNorm", text_width))
        sd.update(lin(b + "intermediate.dense", text_width, 4 * text_width))
        sd.update(lin(b + "output.dense", 4 * text_width, text_width))
        sd.update(ln(b + "output.LayerNorm", text_width))
    # the released checkpoint also carries BLIP's contrastive projections (unused by the score)
    sd.update(lin("blip.vision_proj", vision_width, 16))
    sd.update(lin("blip.text_proj", text_width, 16))
    dims = [text_width, 1024, 128, 64, 16, 1]
    for idx, (a, b) in zip([0, 2, 4, 6, 7], zip(dims[:-1], dims[1:])):
        sd.update(lin(f"mlp.layers.{idx}", a, b))
    return sd
