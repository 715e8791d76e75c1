"""A tiny random CLIP (model + tokenizer + image-processor config) written to a local directory.

``make_tiny_clip(directory)`` saves everything ``CLIPModel.from_pretrained(directory)``,
``CLIPTokenizer.from_pretrained(directory)`` and ``CLIPImageProcessor.from_pretrained(directory)`` need, from
local files only (no hub, no network). The tokenizer is a real byte-level BPE with a hand-made vocabulary: the
26 lower-case letters, the 10 digits and a few punctuation marks (each alone and as an end-of-word piece), a
handful of merges so that multi-character tokens exist, and the two CLIP special tokens. Characters outside that
alphabet map to the unknown token (``<|endoftext|>``, as in CLIP).
"""
from __future__ import annotations

import json
import os
import string

import torch

# Bare pieces; each also exists with the end-of-word suffix "</w>".
_ALPHABET = list(string.ascii_lowercase) + list(string.digits) + [".", ",", "!", "?", "-", "'"]
# A few merges (pairs of existing pieces) so the BPE really merges something: "cat", "dog", "the", "a photo".
_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>"), ("o", "f</w>")]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """The vocabulary (token → id) and the merges (``"a b"`` lines) of the tiny tokenizer."""
    tokens = list(_ALPHABET) + [c + "</w>" for c in _ALPHABET]
    tokens += ["".join(pair) for pair in _MERGES]
    tokens += [BOS, EOS]  # CLIP puts the two special tokens last: EOS has the highest id
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [f"{a} {b}" for a, b in _MERGES]
    return vocab, merges


def make_tiny_clip_tokenizer(directory: str, model_max_length: int = 77):
    """Write vocab.json / merges.txt (+ the tokenizer's own files) and return the loaded ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=model_max_length,
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )
    tok.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)


def tiny_clip_config(
    *, hidden: int = 32, layers: int = 2, heads: int = 4, image_size: int = 32, patch: int = 8,
    projection_dim: int = 16, max_positions: int = 77, hidden_act: str = "quick_gelu",
    projection_in_subconfigs: bool = True,
):
    """``projection_in_subconfigs=False`` gives the projection size at the top level only, as
    ``CLIPModel(CLIPConfig(..., projection_dim=d)).save_pretrained`` writes it with transformers 5 (the text and
    vision sub-configs then carry the 512 default)."""
    from transformers import CLIPConfig

    vocab, _ = tiny_clip_vocab()
    text = dict(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_positions, hidden_act=hidden_act,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )
    vision = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch, hidden_act=hidden_act,
    )
    if projection_in_subconfigs:
        text["projection_dim"] = vision["projection_dim"] = projection_dim
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def make_tiny_clip(directory: str, *, seed: int = 0, image_mean=None, image_std=None, **config_kwargs) -> str:
    """Save a tiny random ``CLIPModel`` + tokenizer + image-processor config into ``directory``; return it.

    Defaults: hidden 32, 2 layers, 4 heads, image 32×32, patch 8, projection 16, QuickGELU, context 77; the
    keyword arguments go to ``tiny_clip_config``.
    Weights are random (seeded) but the logit scale keeps CLIP's init (log 1/0.07).
    """
    from transformers import CLIPImageProcessor, CLIPModel

    os.makedirs(directory, exist_ok=True)
    config = tiny_clip_config(**config_kwargs)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    make_tiny_clip_tokenizer(directory, model_max_length=config.text_config.max_position_embeddings)
    size = config.vision_config.image_size
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=image_mean or [0.48145466, 0.4578275, 0.40821073],
        image_std=image_std or [0.26862954, 0.26130258, 0.27577711],
    )
    processor.save_pretrained(directory)
    return directory
