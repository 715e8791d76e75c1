"""OpenCLIP state dict → transformers CLIPModel: a round trip through the OpenCLIP layout that can fail."""
import pytest
import torch

from fastnabla.rewards.hpsv2 import clip_from_openclip_state_dict, openclip_config, unwrap_openclip_state_dict
from tests.helpers.openclip_format import transformers_to_openclip


def _features(model, pix, ids):
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return img, txt


@pytest.fixture(scope="module")
def inputs(tiny_hps):
    from transformers import CLIPTokenizer

    _, _, d = tiny_hps
    tok = CLIPTokenizer.from_pretrained(d)
    ids = tok(["a photo of a cat", "the dog, 2 cats!"], padding="max_length", max_length=77,
              return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32), ids, tok


def test_round_trip_features_are_equal(tiny_hps, inputs):
    _, original, _ = tiny_hps
    pix, ids, tok = inputs
    sd = transformers_to_openclip(original)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in sd and sd["visual.proj"].shape == (32, 16)
    converted = clip_from_openclip_state_dict({"state_dict": {"module." + k: v for k, v in sd.items()}},
                                              vision_heads=4, text_heads=4, hidden_act="gelu", eos_token_id=tok.eos_token_id)
    cfg = converted.config
    assert (cfg.vision_config.num_attention_heads, cfg.text_config.num_attention_heads) == (4, 4)
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.projection_dim) == (32, 8, 16)
    assert cfg.text_config.num_hidden_layers == 2 and cfg.text_config.max_position_embeddings == 77
    for a, b in zip(_features(original, pix, ids), _features(converted, pix, ids)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(converted.logit_scale, original.logit_scale)


def test_round_trip_detects_a_wrong_layout(tiny_hps, inputs):
    """Swapping q and k inside in_proj (a plausible conversion bug) must change the features."""
    _, original, _ = tiny_hps
    pix, ids, tok = inputs
    sd = transformers_to_openclip(original)
    w = sd["visual.transformer.resblocks.0.attn.in_proj_weight"]
    q, k, v = w.chunk(3)
    sd["visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.cat([k, q, v])
    bad = clip_from_openclip_state_dict(sd, vision_heads=4, text_heads=4, hidden_act="gelu", eos_token_id=tok.eos_token_id)
    img_ok, txt_ok = _features(original, pix, ids)
    img_bad, txt_bad = _features(bad, pix, ids)
    assert not torch.allclose(img_ok, img_bad, atol=1e-4)
    torch.testing.assert_close(txt_ok, txt_bad, atol=1e-6, rtol=1e-5)  # text tower untouched


def test_unwrap_and_config_errors(tiny_hps):
    _, original, _ = tiny_hps
    sd = transformers_to_openclip(original)
    assert unwrap_openclip_state_dict({"state_dict": {"module.a": 1}}) == {"a": 1}
    assert unwrap_openclip_state_dict({"b": 2}) == {"b": 2}
    with pytest.raises(ValueError, match=r"cannot infer the number of attention heads .*set reward\.vision_heads"):
        openclip_config(sd)  # width 32 is in no OpenCLIP config: no guessing
    with pytest.raises(ValueError, match=r"reward\.text_heads=5 does not divide the tower width 32"):
        openclip_config(sd, vision_heads=4, text_heads=5)
    del sd["visual.proj"]
    with pytest.raises(ValueError, match=r"missing visual\.proj"):
        openclip_config(sd)
    sd = transformers_to_openclip(original)
    sd.pop("transformer.resblocks.1.ln_1.weight")
    with pytest.raises(KeyError):
        clip_from_openclip_state_dict(sd, vision_heads=4, text_heads=4)


def test_vit_h_14_shapes_give_the_openclip_config():
    """The real HPS checkpoint's shapes (meta tensors, no memory): 16 vision heads of width 80, 16 text heads."""
    m = "meta"
    sd = {
        "visual.conv1.weight": torch.empty(1280, 3, 14, 14, device=m),
        "visual.positional_embedding": torch.empty(257, 1280, device=m),
        "visual.proj": torch.empty(1280, 1024, device=m),
        "token_embedding.weight": torch.empty(49408, 1024, device=m),
        "positional_embedding": torch.empty(77, 1024, device=m),
        "text_projection": torch.empty(1024, 1024, device=m),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.empty(5120, 1280, device=m),
        "transformer.resblocks.0.mlp.c_fc.weight": torch.empty(4096, 1024, device=m),
    }
    sd.update({f"visual.transformer.resblocks.{i}.ln_1.weight": None for i in range(32)})
    sd.update({f"transformer.resblocks.{i}.ln_1.weight": None for i in range(24)})
    cfg = openclip_config(sd)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_attention_heads, v.num_hidden_layers, v.image_size, v.patch_size) == (
        1280, 16, 32, 224, 14)
    assert (t.hidden_size, t.num_attention_heads, t.num_hidden_layers, t.vocab_size) == (1024, 16, 24, 49408)
    assert cfg.projection_dim == 1024 and v.hidden_act == t.hidden_act == "gelu"
    assert t.eos_token_id == 49407
