"""The SD evaluation with image features (eval.features): a tiny run writes diversity and prior preservation, the CLIP
features equal a direct call of the model, reference sampling draws from the adapters-off UNet, and bad keys are
one-line errors."""
import json
import math
import os
import shutil

import pytest
import torch

from fastnabla import metrics
from fastnabla.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

SD = [
    "model.backbone=sd", "model.resolution=32", "model.flow_channels=[8,16]", "model.dtype=fp32",
    "reward.name=brightness", "sampling.num_steps=4", "sampling.batch_size=4", "sampling.num_batches=1",
    "gfn.timestep_fraction=0.5", "train.epochs=2", "train.batch_size=2", "train.gradient_accumulation_steps=1",
    "train.lr=0.01", "train.flow_lr=0.01",
    "eval.every=1", "eval.num_samples=8", "checkpoint.every=0", "logging.progress=false", "logging.plots=false",
    "prompts.train=simple_animals",
]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tests.helpers.tiny_clip import make_tiny_clip

    return make_tiny_clip(str(tmp_path_factory.mktemp("eval_clip")), seed=3)


def _prompt_file(tmp_path):
    path = tmp_path / "eval_prompts.txt"
    path.write_text("a cat\nthe dog\n")
    return str(path)


def sd_cfg(sd_dir, tmp_path, *over):
    return load_config(None, SD + [f"model.pretrained={sd_dir}", *over], output_dir=str(tmp_path / "run"))


# --- the run ----------------------------------------------------------------------------------------------------

KEYS = ("diversity", "diversity_per_prompt", "fid_pretrained", "kid_pretrained", "kid_pretrained_std",
        "fid_pretrained_per_prompt", "kid_pretrained_per_prompt", "prior_preservation_per_prompt", "pretrained")


def test_sd_run_reports_diversity_and_prior_preservation(tiny_sd_dir, clip_dir, tmp_path):
    from fastnabla.trainer import build_trainer

    cfg = sd_cfg(tiny_sd_dir, tmp_path, "eval.features=clip", f"eval.feature_model={clip_dir}",
                 f"prompts.eval={_prompt_file(tmp_path)}")
    tr = build_trainer(cfg)
    draws = {"n": 0}
    real = tr.backbone.reference_sampling

    def counted():
        draws["n"] += 1
        return real()

    tr.backbone.reference_sampling = counted
    summary = tr.run()
    assert draws["n"] == 1  # the pretrained samples are drawn once per run (epoch-0 eval and the final one share them)

    records = [json.loads(line) for line in open(os.path.join(tr.out_dir, "metrics.jsonl"))]
    on_disk = json.load(open(os.path.join(tr.out_dir, "summary.json")))
    for rec in (records[0], on_disk):  # the epoch-0 evaluation (eval.every=1) and the final one
        for k in KEYS:
            assert k in rec, k
        assert set(rec["diversity_per_prompt"]) == {"a cat", "the dog"}
        assert set(rec["prior_preservation_per_prompt"]) == {"a cat", "the dog"}
        assert all(math.isfinite(rec[k]) for k in ("diversity", "fid_pretrained", "kid_pretrained",
                                                   "fid_pretrained_per_prompt", "kid_pretrained_per_prompt"))
        assert rec["diversity"] > 0 and rec["pretrained"]["diversity"] > 0
    assert records[0]["pretrained"] == on_disk["pretrained"]  # the same pretrained samples at every evaluation

    # against an independent recomputation: the final policy's and the reference's samples at the eval seed
    n, seed = cfg.eval.num_samples, cfg.seed + 7919
    samples, prompts = tr.sample_final(n, seed)
    with tr.backbone.adapters_off():
        ref, ref_prompts = tr.sample_final(n, seed)
    assert prompts == ref_prompts and set(prompts) == {"a cat", "the dog"}
    phi = metrics.ClipImageFeatures(clip_dir)
    with torch.no_grad():
        f, f_ref = phi(tr.backbone.decode(samples)), phi(tr.backbone.decode(ref))
    div = metrics.prompt_diversity(f, prompts)
    assert summary["diversity"] == pytest.approx(div["mean"], rel=1e-4)
    assert summary["diversity"] == pytest.approx(sum(div["per_prompt"].values()) / 2, rel=1e-4)
    assert summary["pretrained"]["diversity"] == pytest.approx(metrics.prompt_diversity(f_ref, prompts)["mean"],
                                                               rel=1e-4)
    assert summary["fid_pretrained"] == pytest.approx(metrics.fid(f_ref, f), rel=1e-3, abs=1e-7)
    pp = metrics.prior_preservation(f_ref, f, prompts)
    assert summary["fid_pretrained_per_prompt"] == pytest.approx(pp["fid"], rel=1e-3, abs=1e-7)
    assert summary["prior_preservation_per_prompt"]["a cat"]["kid"] == \
        pytest.approx(pp["per_group"]["a cat"]["kid"], rel=1e-3, abs=1e-8)


# --- the features ----------------------------------------------------------------------------------------------

def test_clip_features_equal_a_direct_call_of_the_model(clip_dir, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from fastnabla.rewards.clip_common import image_preprocess_from

    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 48, 40, generator=g)  # not CLIP's size, not square: resize and crop both act
    phi = metrics.ClipImageFeatures(clip_dir)
    with torch.no_grad():
        got = phi(images)
    direct = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    pixel_values = image_preprocess_from(clip_dir, 32)(images)
    assert pixel_values.shape == (3, 3, 32, 32)
    with torch.no_grad():
        want = direct(pixel_values=pixel_values).image_embeds
    assert got.shape == (3, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a CLIPVisionModelWithProjection directory gives the same features
    vision_dir = tmp_path / "vision"
    direct.save_pretrained(vision_dir)
    shutil.copy(os.path.join(clip_dir, "preprocessor_config.json"), vision_dir)
    with torch.no_grad():
        torch.testing.assert_close(metrics.ClipImageFeatures(str(vision_dir))(images), got, rtol=1e-5, atol=1e-6)


def test_prompt_diversity_by_hand():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0], [10.0, 10.0], [10.0, 12.0], [7.0, 7.0]])
    d = metrics.prompt_diversity(f, ["b", "b", "b", "a", "a", "c"])
    assert d["per_prompt"] == {"a": pytest.approx(2.0), "b": pytest.approx(4.0)}  # "c" has one sample: left out
    assert d["mean"] == pytest.approx(3.0)
    assert math.isnan(metrics.prompt_diversity(f[:2], ["a", "b"])["mean"])


# --- reference sampling ----------------------------------------------------------------------------------------

def test_reference_sampling_draws_from_the_adapters_off_unet(tiny_sd_dir, tmp_path):
    from fastnabla.backbones.sd import SDBackbone
    from fastnabla.sampling import sample_trajectories
    from fastnabla.transitions import transition_coefficients

    torch.manual_seed(0)
    bb = SDBackbone.from_config(sd_cfg(tiny_sd_dir, tmp_path))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in bb.unet.named_parameters():
            if "lora_B" in name:  # gaussian init leaves lora_B = 0: give the adapter a visible effect
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    c = transition_coefficients(bb.scheduler, bb.scheduler.timesteps, eta=bb.eta)
    prompts = ["a cat", "the dog"]

    def draw():
        with torch.no_grad():
            return sample_trajectories(bb, 2, torch.Generator().manual_seed(5), c, prompts, None,
                                       keep_trajectory=False).xs[:, -1]

    with bb.adapters_off():
        want = draw()
    with bb.reference_sampling():
        got = draw()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    policy = draw()  # after the context the policy is the LoRA-perturbed UNet again
    assert (policy - want).abs().max() > 1e-3
    x = torch.randn(2, *bb.sample_shape, generator=g)
    t, cond = bb.scheduler.timesteps[:2].clone(), bb.encode(prompts)
    with torch.no_grad():
        assert (bb.policy(x, t, cond) - bb.reference(x, t, cond)).abs().max() > 1e-3
        with bb.reference_sampling():
            torch.testing.assert_close(bb.policy(x, t, cond), bb.reference(x, t, cond), rtol=0, atol=0)


def test_toy2d_honours_reference_sampling():
    from fastnabla.backbones.toy2d import Toy2DBackbone

    torch.manual_seed(0)
    bb = Toy2DBackbone.from_config(load_config(None, ["model.hidden=16"]))
    with torch.no_grad():
        for p in bb.residual.head.parameters():
            p.normal_(0, 0.3)
    x, t = torch.randn(4, 2), bb.scheduler.timesteps[:4].clone()
    assert not torch.allclose(bb.policy(x, t), bb.reference(x, t))
    with bb.reference_sampling():
        torch.testing.assert_close(bb.policy(x, t), bb.reference(x, t))
    assert not torch.allclose(bb.policy(x, t), bb.reference(x, t))


# --- errors ----------------------------------------------------------------------------------------------------

def _one_line_error(exc, *words):
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("over, words", [
    (["eval.features=inception"], ["eval.features", "none, clip, dreamsim"]),
    (["eval.features=clip"], ["eval.feature_model", "must be set", "CLIP directory"]),
    (["eval.features=clip", "eval.feature_model=/no/such/dir"], ["eval.feature_model", "not a directory"]),
])
def test_bad_feature_keys_are_one_line_errors(over, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.backbone=sd", "model.pretrained=x", *over])
    _one_line_error(e, *words)


def test_feature_keys_errors_beyond_the_choice(clip_dir, tmp_path):
    with pytest.raises(ConfigError) as e:  # a directory without config.json
        load_config(None, ["model.backbone=sd", "model.pretrained=x", "eval.features=clip",
                           f"eval.feature_model={tmp_path}"])
    _one_line_error(e, "eval.feature_model", "config.json")
    with pytest.raises(ConfigError) as e:  # another backbone has its own evaluation
        load_config(None, ["eval.features=clip", f"eval.feature_model={clip_dir}"])
    _one_line_error(e, "eval.features", "eval.features=none")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError) as e:  # passes the config's checks, fails to load: still one line
        metrics.ClipImageFeatures(str(bad))
    _one_line_error(e, "eval.feature_model", "model_type='bert'", "CLIPModel")
    try:
        import dreamsim  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError) as e:
            load_config(None, ["model.backbone=sd", "model.pretrained=x", "eval.features=dreamsim",
                               f"eval.feature_model={tmp_path}"])
        _one_line_error(e, "pip install dreamsim", "eval.feature_model")
        with pytest.raises(ImportError) as e:
            metrics.DreamSimFeatures(str(tmp_path))
        _one_line_error(e, "pip install dreamsim", "eval.feature_model")
