"""aesthetic / pickscore / hpsv2 / hpsv2.1 / combo on tiny random models saved in the real checkpoint formats and
loaded through the real loading code (no network)."""
import pytest
import torch
import torch.nn.functional as F

from fastnabla.rewards import build_reward

PROMPTS = ["a photo of a cat", "the dog"]


def _image_processor(directory):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(directory)


def _normalise_like_processor(images, directory):
    p = _image_processor(directory)
    mean = torch.tensor(p.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(p.image_std).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.fixture(scope="module")
def rewards(tiny_clip_dir, aesthetic_head_file, tiny_hps):
    """Each reward built twice: plain and with activation checkpointing."""
    hps_path, _, hps_dir = tiny_hps
    options = {
        "aesthetic": {"model": tiny_clip_dir, "head": aesthetic_head_file},
        "pickscore": {"model": tiny_clip_dir, "processor": tiny_clip_dir},
        "hpsv2": {"model": hps_path, "tokenizer": hps_dir, "vision_heads": 4, "text_heads": 4},
        "hpsv2.1": {"model": hps_path, "processor": hps_dir, "vision_heads": 4, "text_heads": 4},
        "combo": {"weights": {"aesthetic": 0.7, "hpsv2": 0.3},
                  "aesthetic": {"model": tiny_clip_dir, "head": aesthetic_head_file},
                  "hpsv2": {"model": hps_path, "tokenizer": hps_dir, "vision_heads": 4, "text_heads": 4}},
    }
    built = {}
    for name, opts in options.items():
        built[name] = build_reward(name, opts)
        built[name + "+ckpt"] = build_reward(name, {**opts, "checkpointing": True})
    return built


NAMES = ["aesthetic", "pickscore", "hpsv2", "hpsv2.1", "combo"]


@pytest.mark.parametrize("name", NAMES)
def test_contract(rewards, name):
    r = rewards[name]
    assert r.name == name
    assert r.needs_prompts == (name != "aesthetic")
    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 48, requires_grad=True)  # non-square, larger than the model: resize + crop/pad
    log_r, info = r(images, PROMPTS, None)
    assert log_r.shape == (2,) and log_r.dtype == torch.float32 and torch.isfinite(log_r).all()
    assert all(not v.requires_grad for v in info.values() if torch.is_tensor(v))
    (g,) = torch.autograd.grad(log_r.sum(), images)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert not any(p.requires_grad for p in r.parameters())  # frozen: gradients reach the images only

    # bf16 input (and an outer bf16 autocast) still scores in fp32, close to the fp32 result
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_r16, _ = r(images.detach().bfloat16(), PROMPTS, {"step": 3})
    assert log_r16.dtype == torch.float32
    torch.testing.assert_close(log_r16, log_r.detach(), atol=0.05 * log_r.abs().max().item() + 1e-3, rtol=0.05)

    # checkpointing on/off: same value, same gradient
    images2 = images.detach().clone().requires_grad_(True)
    log_rc, _ = rewards[name + "+ckpt"](images2, PROMPTS, None)
    (gc,) = torch.autograd.grad(log_rc.sum(), images2)
    torch.testing.assert_close(log_rc, log_r.detach())
    torch.testing.assert_close(gc, g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "combo"])
def test_prompt_rewards_need_one_prompt_per_image(rewards, name):
    with pytest.raises(ValueError, match="prompt"):
        rewards[name](torch.rand(2, 3, 32, 32), None, None)
    with pytest.raises(ValueError, match="2 images"):
        rewards[name](torch.rand(2, 3, 32, 32), ["only one"], None)


def test_aesthetic_value(rewards, tiny_clip_dir, aesthetic_head_file):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    sd = torch.load(aesthetic_head_file)
    images = torch.rand(3, 3, 32, 32)  # the model's size: preprocessing is normalisation only
    with torch.no_grad():
        pix = _normalise_like_processor(images, tiny_clip_dir)
        emb = clip.visual_projection(clip.vision_model(pixel_values=pix).pooler_output)
        h = F.normalize(emb, dim=-1)
        for idx in (0, 2, 4, 6, 7):  # Linear layers only, no activations in between
            h = h @ sd[f"layers.{idx}.weight"].T + sd[f"layers.{idx}.bias"]
    log_r, info = rewards["aesthetic"](images, None, None)
    torch.testing.assert_close(log_r, h.squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(info["aesthetic"], log_r.detach())


def test_pickscore_value(rewards, tiny_clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   pixel_values=_normalise_like_processor(images, tiny_clip_dir))
    expected = out.logits_per_image.diagonal()  # exp(logit_scale)·cos, pairwise image i ↔ prompt i
    log_r, _ = rewards["pickscore"](images, PROMPTS, None)
    torch.testing.assert_close(log_r, expected, atol=1e-4, rtol=1e-5)
    # the text cache must not change anything on a second call (prompts reordered)
    log_r2, _ = rewards["pickscore"](images.flip(0), PROMPTS[::-1], None)
    torch.testing.assert_close(log_r2, log_r.flip(0))


def test_hpsv2_value_matches_the_model_it_was_written_from(rewards, tiny_hps):
    _, clip, d = tiny_hps
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(d)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   pixel_values=_normalise_like_processor(images, d))
        expected = (F.normalize(out.image_embeds, dim=-1) * F.normalize(out.text_embeds, dim=-1)).sum(-1)
    for name in ("hpsv2", "hpsv2.1"):
        log_r, info = rewards[name](images, PROMPTS, None)
        torch.testing.assert_close(log_r, expected, atol=1e-5, rtol=1e-5)
        assert name in info


def test_combo_is_the_weighted_sum(rewards):
    images = torch.rand(2, 3, 36, 32)
    a, _ = rewards["aesthetic"](images, None, None)
    h, _ = rewards["hpsv2"](images, PROMPTS, None)
    total, info = rewards["combo"](images, PROMPTS, None)
    torch.testing.assert_close(total, 0.7 * a + 0.3 * h)
    torch.testing.assert_close(info["aesthetic"], a)
    torch.testing.assert_close(info["hpsv2"], h)


def test_combo_option_errors(tiny_clip_dir, aesthetic_head_file):
    with pytest.raises(ValueError, match="reward.weights"):
        build_reward("combo", {})
    with pytest.raises(ValueError, match=r"\['pickscore'\] have no weight"):
        build_reward("combo", {"weights": {"brightness": 1.0}, "pickscore": {"model": tiny_clip_dir}})
    r = build_reward("combo", {"weights": {"brightness": 2.0, "contrast": -1.0}})
    x = torch.rand(2, 3, 8, 8)
    b, c = build_reward("brightness")(x, None, None)[0], build_reward("contrast")(x, None, None)[0]
    torch.testing.assert_close(r(x, None, None)[0], 2 * b - c)
    assert r.needs_prompts is False


def _raw_clip_weights(directory):
    """The tensors exactly as saved, read without transformers' model classes (the reference for the loaders)."""
    import json
    import os

    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return config, load_file(os.path.join(directory, "model.safetensors"))


def test_whole_clipmodel_directory_with_top_level_projection_size(whole_clip_dir, aesthetic_head_file):
    """aesthetic and pickscore load a CLIP directory whose sub-configs do not repeat projection_dim, and score
    with the saved projections (read here straight from model.safetensors)."""
    from transformers import CLIPModel, CLIPTokenizer

    config, raw = _raw_clip_weights(whole_clip_dir)
    # the directory really has the layout of the bug: 16 at the top, something else in the vision sub-config
    assert config["projection_dim"] == 16 and config["vision_config"].get("projection_dim") != 16
    assert raw["visual_projection.weight"].shape == (16, 32)

    towers = CLIPModel.from_pretrained(whole_clip_dir).eval()  # used for the un-projected tower outputs only
    tok = CLIPTokenizer.from_pretrained(whole_clip_dir)
    head = torch.load(aesthetic_head_file)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        pix = _normalise_like_processor(images, whole_clip_dir)
        img = F.normalize(towers.vision_model(pixel_values=pix).pooler_output @ raw["visual_projection.weight"].T,
                          dim=-1)
        enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled_txt = towers.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        txt = F.normalize(pooled_txt @ raw["text_projection.weight"].T, dim=-1)
        expected_pick = raw["logit_scale"].exp() * (img * txt).sum(-1)
        h = img
        for idx in (0, 2, 4, 6, 7):
            h = h @ head[f"layers.{idx}.weight"].T + head[f"layers.{idx}.bias"]
        expected_aesthetic = h.squeeze(-1)

    aesthetic = build_reward("aesthetic", {"model": whole_clip_dir, "head": aesthetic_head_file})
    torch.testing.assert_close(aesthetic.clip.visual_projection.weight, raw["visual_projection.weight"])
    torch.testing.assert_close(aesthetic(images, None, None)[0], expected_aesthetic, atol=1e-5, rtol=1e-5)
    pickscore = build_reward("pickscore", {"model": whole_clip_dir, "processor": whole_clip_dir})
    torch.testing.assert_close(pickscore(images, PROMPTS, None)[0], expected_pick, atol=1e-4, rtol=1e-5)


def test_aesthetic_rejects_a_clip_directory_without_the_projection(tmp_path, aesthetic_head_file):
    """A vision tower saved without its projection must not load with a random one."""
    from transformers import CLIPVisionModel

    from tests.helpers.tiny_clip import tiny_clip_config

    CLIPVisionModel(tiny_clip_config().vision_config).save_pretrained(tmp_path / "no_proj")
    with pytest.raises(ValueError, match=r"reward\.model: could not load CLIP vision weights .*lacks "
                                         r"visual_projection\.weight") as e:
        build_reward("aesthetic", {"model": str(tmp_path / "no_proj"), "head": aesthetic_head_file})
    assert "\n" not in str(e.value)


def test_missing_files_give_one_line_actionable_errors(tmp_path, tiny_clip_dir, aesthetic_head_file):
    cases = [
        ("aesthetic", {"model": tiny_clip_dir, "head": str(tmp_path / "nope.pth")},
         r"reward\.head: aesthetic MLP checkpoint not found at .*nope\.pth; download "
         r"sac\+logos\+ava1-l14-linearMSE\.pth .*and set reward\.head=/"),
        ("aesthetic", {"model": str(tmp_path / "no_clip"), "head": aesthetic_head_file},
         r"reward\.model: could not load CLIP vision weights from .*no_clip.*local CLIP directory"),
        ("pickscore", {"model": str(tmp_path / "no_clip"), "processor": tiny_clip_dir},
         r"reward\.model: could not load CLIP weights .*hub id with network access"),
        ("pickscore", {"model": tiny_clip_dir, "processor": str(tmp_path / "no_tok")},
         r"reward\.processor: could not load the CLIP tokenizer"),
        ("hpsv2", {"model": str(tmp_path / "HPS_v2_compressed.pt"), "tokenizer": tiny_clip_dir},
         r"reward\.model: hpsv2 checkpoint not found at .*; download HPS_v2_compressed\.pt"),
        ("hpsv2.1", {"tokenizer": tiny_clip_dir},  # no path and no network: says how to provide it
         r"reward\.model: could not load the hpsv2\.1 checkpoint .*HPS_v2\.1_compressed\.pt"),
    ]
    for name, opts, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            build_reward(name, opts)
        assert "\n" not in str(e.value), str(e.value)


def test_wrong_checkpoint_kind_is_reported(tmp_path, tiny_clip_dir):
    bad = tmp_path / "head.pth"
    torch.save({"fc.weight": torch.zeros(1, 16)}, bad)
    with pytest.raises(ValueError, match=r"reward\.head: .*layers\.\{0,2,4,6,7\}"):
        build_reward("aesthetic", {"model": tiny_clip_dir, "head": str(bad)})
    with pytest.raises(ValueError, match=r"reward\.model: .*not an OpenCLIP CLIP state dict"):
        build_reward("hpsv2", {"model": str(bad), "tokenizer": tiny_clip_dir})
