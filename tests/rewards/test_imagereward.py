"""ImageReward on a tiny random checkpoint in the released key layout, checked against an independent plain-torch
forward of the original BLIP architecture (timm ViT + BERT with cross-attention + linear head)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastnabla.rewards import build_reward
from fastnabla.rewards.clip_common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from fastnabla.rewards.imagereward import SCORE_MEAN, SCORE_STD
from tests.helpers.tiny_blip import make_tiny_bert_tokenizer, tiny_imagereward_state_dict

HEADS = 4
PROMPTS = ["a photo of a cat", "the dog"]


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_imagereward")
    tok = make_tiny_bert_tokenizer(str(d))
    sd = tiny_imagereward_state_dict(vocab=len(tok), seed=0)
    path = str(d / "ImageReward.pt")
    torch.save(sd, path)
    opts = {"model": path, "tokenizer": str(d), "vision_heads": HEADS, "text_heads": HEADS}
    return sd, tok, opts, build_reward("imagereward", opts), build_reward("imagereward", {**opts, "checkpointing": True})


def _attention(q, k, v, heads, bias=None):
    B, Lq, C = q.shape
    D = C // heads
    split = lambda x: x.view(B, x.shape[1], heads, D).transpose(1, 2)  # noqa: E731
    att = split(q) @ split(k).transpose(-1, -2) / math.sqrt(D)
    if bias is not None:
        att = att + bias
    return (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, Lq, C)


def reference_score(sd, pix, ids, mask, heads=HEADS):
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    ln = lambda x, p, eps: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)  # noqa: E731
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    # ViT: patches + cls + pos, pre-norm blocks with a fused qkv laid out (3, heads, head_dim), final norm
    w = sd[v + "patch_embed.proj.weight"]
    x = F.conv2d(pix, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[v + "pos_embed"]
    n_blocks = len({k.split(".")[3] for k in sd if k.startswith(v + "blocks.")})
    assert n_blocks == 2
    for i in range(n_blocks):
        b = f"{v}blocks.{i}."
        h = ln(x, b + "norm1", 1e-6)
        B, N, C = h.shape
        qkv = lin(h, b + "attn.qkv").view(B, N, 3, C)
        x = x + lin(_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], heads), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    img = ln(x, v + "norm", 1e-6)
    # BERT: word + absolute position embeddings, post-norm layers: self-attn, cross-attn to all image tokens, FFN
    L = ids.shape[1]
    hdn = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    hdn = ln(hdn, t + "embeddings.LayerNorm", 1e-12)
    pad_bias = ((1.0 - mask.float()) * -10000.0)[:, None, None, :]
    n_layers = len({k.split(".")[4] for k in sd if k.startswith(t + "encoder.layer.")})
    assert n_layers == 2
    for i in range(n_layers):
        b = f"{t}encoder.layer.{i}."
        for name, kv, bias in (("attention", None, pad_bias), ("crossattention", img, None)):
            src = hdn if kv is None else kv
            ctx = _attention(lin(hdn, b + f"{name}.self.query"), lin(src, b + f"{name}.self.key"),
                             lin(src, b + f"{name}.self.value"), heads, bias)
            hdn = ln(lin(ctx, b + f"{name}.output.dense") + hdn, b + f"{name}.output.LayerNorm", 1e-12)
        ffn = lin(F.gelu(lin(hdn, b + "intermediate.dense")), b + "output.dense")
        hdn = ln(ffn + hdn, b + "output.LayerNorm", 1e-12)
    s = hdn[:, 0]
    for idx in (0, 2, 4, 6, 7):
        s = lin(s, f"mlp.layers.{idx}")
    return (s.squeeze(-1) - SCORE_MEAN) / SCORE_STD


def test_matches_the_original_architecture(tiny_ir):
    sd, tok, _, reward, _ = tiny_ir
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = reference_score(sd, (images - mean) / std, enc["input_ids"], enc["attention_mask"])
    log_r, info = reward(images, PROMPTS, None)
    assert expected.abs().max() > 1e-3  # not a degenerate comparison
    torch.testing.assert_close(log_r, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(info["imagereward"], log_r.detach())


def test_contract(tiny_ir):
    _, _, _, reward, reward_ckpt = tiny_ir
    assert reward.name == "imagereward" and reward.needs_prompts
    torch.manual_seed(1)
    images = torch.rand(2, 3, 40, 36, requires_grad=True)
    log_r, _ = reward(images, PROMPTS, None)
    assert log_r.shape == (2,) and log_r.dtype == torch.float32 and torch.isfinite(log_r).all()
    (g,) = torch.autograd.grad(log_r.sum(), images)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_r16, _ = reward(images.detach().bfloat16(), PROMPTS, None)
    assert log_r16.dtype == torch.float32
    torch.testing.assert_close(log_r16, log_r.detach(), atol=0.05 * log_r.abs().max().item() + 1e-3, rtol=0.05)
    images2 = images.detach().clone().requires_grad_(True)
    log_rc, _ = reward_ckpt(images2, PROMPTS, None)
    (gc,) = torch.autograd.grad(log_rc.sum(), images2)
    torch.testing.assert_close(log_rc, log_r.detach())
    torch.testing.assert_close(gc, g, atol=1e-6, rtol=1e-4)


def test_errors(tmp_path, tiny_ir):
    _, _, opts, _, _ = tiny_ir
    with pytest.raises(ValueError, match=r"reward\.model: ImageReward checkpoint not found at .*; download "
                                         r"ImageReward\.pt"):
        build_reward("imagereward", {**opts, "model": str(tmp_path / "ImageReward.pt")})
    with pytest.raises(ValueError, match=r"set reward\.vision_heads"):
        build_reward("imagereward", {**opts, "vision_heads": None})  # width 32 has no 64-wide heads
    bad = tmp_path / "bad.pt"
    torch.save({"layers.0.weight": torch.zeros(1, 2)}, bad)
    with pytest.raises(ValueError, match=r"reward\.model: .*not an ImageReward state dict"):
        build_reward("imagereward", {**opts, "model": str(bad)})
