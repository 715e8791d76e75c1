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
                                              head_width=8, hidden_act="gelu", eos_token_id=tok.eos_token_id)
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
    bad = clip_from_openclip_state_dict(sd, head_width=8, hidden_act="gelu", eos_token_id=tok.eos_token_id)
    img_ok, txt_ok = _features(original, pix, ids)
    img_bad, txt_bad = _features(bad, pix, ids)
    assert not torch.allclose(img_ok, img_bad, atol=1e-4)
    torch.testing.assert_close(txt_ok, txt_bad, atol=1e-6, rtol=1e-5)  # text tower untouched


def test_unwrap_and_config_errors(tiny_hps):
    _, original, _ = tiny_hps
    sd = transformers_to_openclip(original)
    assert unwrap_openclip_state_dict({"state_dict": {"module.a": 1}}) == {"a": 1}
    assert unwrap_openclip_state_dict({"b": 2}) == {"b": 2}
    with pytest.raises(ValueError, match="not a multiple of head_width"):
        openclip_config(sd, head_width=64)
    del sd["visual.proj"]
    with pytest.raises(ValueError, match=r"missing visual\.proj"):
        openclip_config(sd)
    sd = transformers_to_openclip(original)
    sd.pop("transformer.resblocks.1.ln_1.weight")
    with pytest.raises(KeyError):
        clip_from_openclip_state_dict(sd, head_width=8)
