"""The Stable Diffusion backbone on a tiny random pipeline: training, saving/loading/export, precision, memory
switches, errors."""
import os

import pytest
import torch

from fastnabla.config import load_config

BASE = [
    "model.backbone=sd", "model.resolution=32", "model.flow_channels=[8,16]", "model.dtype=fp32",
    "reward.name=brightness", "sampling.num_steps=4", "sampling.batch_size=2", "sampling.num_batches=1",
    "gfn.timestep_fraction=0.5", "gfn.reward_scale=100.0", "gfn.trust_region_scale=1.0",
    "train.epochs=2", "train.batch_size=3", "train.gradient_accumulation_steps=2", "train.lr=0.01",
    "train.flow_lr=0.01", "eval.every=0", "eval.num_samples=2", "checkpoint.every=0", "logging.progress=false",
    "logging.plots=false", "prompts.train=simple_animals",
]


def make_cfg(sd_dir, tmp_path, *overrides):
    return load_config(None, BASE + [f"model.pretrained={sd_dir}", *overrides], output_dir=str(tmp_path / "run"))


def make_backbone(sd_dir, tmp_path, *overrides, seed=0):
    from fastnabla.backbones.sd import SDBackbone

    torch.manual_seed(seed)
    return SDBackbone.from_config(make_cfg(sd_dir, tmp_path, *overrides))


def randomize_lora(bb, seed=1, scale=0.3):
    """Gaussian init leaves lora_B = 0 (the adapter starts as the identity); give it a visible effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def lora_params(bb):
    return {n: p.detach().clone() for n, p in bb.unet.named_parameters() if "lora_" in n}


def inputs(bb, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *bb.sample_shape), generator=g)
    t = bb.scheduler.timesteps[:n].clone()
    cond = bb.encode(["a cat", "the dog"][:n] + ["owl"] * max(0, n - 2))
    return x, t, cond


# --- training ---------------------------------------------------------------------------------------------------

def _train(cfg, reward_options=None):
    from fastnabla.trainer import build_trainer

    tr = build_trainer(cfg)
    before_policy = [p.detach().clone() for p in tr.backbone.policy_parameters()]
    before_flow = [p.detach().clone() for p in tr.backbone.flow_parameters()]
    result = tr.run()
    changed_p = any(not torch.equal(a, b) for a, b in zip(before_policy, tr.backbone.policy_parameters()))
    changed_f = any(not torch.equal(a, b) for a, b in zip(before_flow, tr.backbone.flow_parameters()))
    return tr, result, changed_p, changed_f


def test_two_epochs_weight_free_reward(tiny_sd_dir, tmp_path):
    tr, result, changed_p, changed_f = _train(make_cfg(tiny_sd_dir, tmp_path))
    assert len(tr.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in tr.history)
    assert all(h["skipped"] == 0 for h in tr.history)
    assert changed_p and changed_f
    assert torch.isfinite(torch.tensor(result["eval_reward_mean"]))
    final = os.path.join(tr.out_dir, "final")
    assert os.path.isfile(os.path.join(final, "pytorch_lora_weights.safetensors"))
    assert os.path.isfile(os.path.join(final, "flow_net", "config.json"))


def test_returns_recipe_two_epochs_and_exact_resume_with_stored_returns(tiny_sd_dir, tmp_path):
    """The new default on tiny SD with CFG: 2 epochs; a run resumed from epoch 1's checkpoint (buffer and its stored
    gradient returns included) ends bit for bit where the uninterrupted run ends."""
    from fastnabla import checkpoint as ckpt
    from fastnabla.trainer import build_trainer

    over = ["sampling.guidance_scale=3.0", "checkpoint.every=1", "checkpoint.keep_last=5"]
    a = build_trainer(make_cfg(tiny_sd_dir, tmp_path / "a", *over))
    assert a.cfg.gfn.recipe == "returns" and a.method.stores_returns
    a.run()
    assert a.buffer.returns is not None and a.buffer.returns.shape == a.buffer.xs.shape
    first = ckpt.list_checkpoints(a.ckpt_root)[0]
    b = build_trainer(make_cfg(tiny_sd_dir, tmp_path / "b", *over, f"checkpoint.resume_from={first}"))
    b.run()
    for x, y in zip(list(a.backbone.policy_parameters()) + list(a.backbone.flow_parameters()),
                    list(b.backbone.policy_parameters()) + list(b.backbone.flow_parameters())):
        assert torch.equal(x, y)
    strip = lambda h: {k: v for k, v in h.items() if k != "seconds"}  # noqa: E731
    assert [strip(h) for h in a.history] == [strip(h) for h in b.history] and a.history[-1]["loss_returns"] > 0


def test_cfg_gradient_returns_equal_a_hand_unrolled_chain(tiny_sd_dir, tmp_path):
    """float64 tiny SD, guidance 3: the stored returns equal G_N = β∇log R(decode(x_N)) carried back by per-sample VJPs
    G ← coef_x·G + coef_out·[(1−w)·J_uᵀG + w·J_cᵀG] through the pretrained UNet's unconditional and conditional
    outputs, called directly (not through the backbone's guidance code)."""
    from fastnabla.methods.nabla_gfn import NablaGFN
    from fastnabla.sampling import sample_trajectories, step_coefficients

    cfg = make_cfg(tiny_sd_dir, tmp_path, "sampling.guidance_scale=3.0", "gfn.reward_scale=7.0")
    bb = make_backbone(tiny_sd_dir, tmp_path, "sampling.guidance_scale=3.0").double()
    randomize_lora(bb)  # the policy differs from the reference, so using the wrong network would show

    def reward(images, prompts, meta):  # float64 all the way
        return (images * torch.linspace(-1, 1, images.shape[-1], dtype=images.dtype)).mean(dim=(1, 2, 3)), {}

    c = step_coefficients(bb).to(torch.float64)
    prompts = ["a cat", "the dog"]
    tr = sample_trajectories(bb, 2, torch.Generator().manual_seed(0), c, prompts)
    assert tr.xs.dtype == torch.float64
    cfg.reward.micro_batch = 1  # one trajectory per VJP batch: batching must not mix samples either
    G = NablaGFN(bb, reward, c, cfg).gradient_returns(tr.xs, tr.cond, prompts)
    N, w, ts = c.coef_x.numel(), 3.0, bb.scheduler.timesteps
    unc = bb.uncond_embedding().double()
    for i in range(2):
        x = tr.xs[i, N].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(reward(bb.decode(x[None]), None, None)[0].sum(), x)
        want = 7.0 * g
        torch.testing.assert_close(G[i, N], want, rtol=1e-9, atol=1e-12)
        for k in range(N - 1, -1, -1):
            x = tr.xs[i, k].clone().requires_grad_(True)
            with bb.adapters_off():
                e_u = bb.unet(x[None], ts[k : k + 1], encoder_hidden_states=unc).sample[0]
                e_c = bb.unet(x[None], ts[k : k + 1], encoder_hidden_states=tr.cond[i : i + 1].double()).sample[0]
            (v_u,) = torch.autograd.grad(e_u, x, grad_outputs=want, retain_graph=True)
            (v_c,) = torch.autograd.grad(e_c, x, grad_outputs=want)
            want = c.coef_x[k] * want + c.coef_out[k] * ((1 - w) * v_u + w * v_c)
            torch.testing.assert_close(G[i, k], want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("reward", ["aesthetic", "pickscore", "hpsv2"])
def test_two_epochs_model_rewards(reward, tiny_sd_dir, tmp_path, tiny_clip_dir, aesthetic_head_file, tiny_hps):
    hps_path, _, hps_dir = tiny_hps
    opts = {
        "aesthetic": [f"reward.model={tiny_clip_dir}", f"reward.head={aesthetic_head_file}"],
        "pickscore": [f"reward.model={tiny_clip_dir}", f"reward.processor={tiny_clip_dir}"],
        "hpsv2": [f"reward.model={hps_path}",
                  f"reward.options={{tokenizer: {hps_dir}, vision_heads: 4, text_heads: 4}}"],
    }[reward]
    cfg = make_cfg(tiny_sd_dir, tmp_path, f"reward.name={reward}", *opts)
    tr, _, changed_p, changed_f = _train(cfg)
    assert len(tr.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in tr.history)
    assert changed_p and changed_f
    # prompt rewards condition the flow net on the prompt; aesthetic reads no prompt
    assert tr.backbone.flow_text_conditioning == (reward != "aesthetic")


def test_adamw8bit_trains(tiny_sd_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(tiny_sd_dir, tmp_path, "train.optimizer=adamw8bit", "train.epochs=1")
    tr, _, changed_p, changed_f = _train(cfg)
    assert type(tr.engine.optimizer).__name__ == "AdamW8bit"
    assert changed_p and changed_f and torch.isfinite(torch.tensor(tr.history[0]["loss"]))


def test_full_finetuning_trains_one_epoch(tiny_sd_dir, tmp_path):
    cfg = make_cfg(tiny_sd_dir, tmp_path, "model.lora_rank=0", "train.epochs=1")
    from fastnabla.trainer import build_trainer

    tr = build_trainer(cfg)
    bb = tr.backbone
    assert bb.ref_unet is not None and not any(p.requires_grad for p in bb.ref_unet.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in bb.unet.parameters())
    assert len(list(bb.policy_parameters())) == len(list(bb.unet.parameters()))
    ref_before = [p.detach().clone() for p in bb.ref_unet.parameters()]
    pol_before = [p.detach().clone() for p in bb.unet.parameters()]
    tr.run()
    assert all(torch.equal(a, b) for a, b in zip(ref_before, bb.ref_unet.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(pol_before, bb.unet.parameters()))
    assert os.path.isfile(os.path.join(tr.out_dir, "final", "unet", "config.json"))


# --- policy / reference / flow ---------------------------------------------------------------------------------

def test_reference_is_the_pretrained_unet_and_policy_starts_there(tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    bb = make_backbone(tiny_sd_dir, tmp_path)
    assert bb.ref_unet is None  # LoRA mode: the reference is the same UNet with the adapter off, not a copy
    x, t, cond = inputs(bb)
    with torch.no_grad():
        pol0, ref0 = bb.policy(x, t, cond), bb.reference(x, t, cond)
    torch.testing.assert_close(pol0, ref0)  # gaussian init: lora_B = 0, the adapter starts as the identity
    randomize_lora(bb)
    fresh = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    unc = bb.uncond_embedding().expand(2, -1, -1)
    with torch.no_grad():
        pol, ref = bb.policy(x, t, cond), bb.reference(x, t, cond)
        ou = fresh(x, t, encoder_hidden_states=unc).sample
        oc = fresh(x, t, encoder_hidden_states=cond).sample
    w = bb.guidance_scale
    assert w == 5.0
    torch.testing.assert_close(ref, ou + w * (oc - ou), rtol=1e-4, atol=1e-5)  # CFG of the base UNet
    assert (pol - ref).abs().max() > 1e-3  # the adapter is on in the policy ...
    with torch.no_grad():
        torch.testing.assert_close(bb.policy(x, t, cond), pol)  # ... and back on after a reference call
    # the reference builds no parameter gradients but is differentiable w.r.t. x
    xr = x.clone().requires_grad_(True)
    ref_g = bb.reference(xr, t, cond)
    (gx,) = torch.autograd.grad(ref_g.square().sum(), xr)
    assert gx.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_flow_starts_at_zero_and_ignores_prompts_for_prompt_free_rewards(tiny_sd_dir, tmp_path):
    bb = make_backbone(tiny_sd_dir, tmp_path)
    assert not bb.flow_text_conditioning
    x, t, cond = inputs(bb)
    assert bb.flow(x, t, cond).abs().max() == 0  # zero-initialised conv_out
    with torch.no_grad():
        torch.nn.init.normal_(bb.flow_net.conv_out.weight, std=0.1)
    a, b = bb.flow(x, t, cond), bb.flow(x, t, torch.randn_like(cond))
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b)
    bb2 = make_backbone(tiny_sd_dir, tmp_path, "model.flow_text_conditioning=true")
    with torch.no_grad():
        torch.nn.init.normal_(bb2.flow_net.conv_out.weight, std=0.1)
    assert (bb2.flow(x, t, cond) - bb2.flow(x, t, torch.randn_like(cond))).abs().max() > 1e-6


def test_shapes_scheduler_and_decode(tiny_sd_dir, tmp_path):
    bb = make_backbone(tiny_sd_dir, tmp_path)
    assert bb.sample_shape == (4, 8, 8)  # 32 px / VAE factor 4
    assert bb.scheduler.config.set_alpha_to_one is False and list(bb.scheduler.timesteps) == [751, 501, 251, 1]
    x, t, cond = inputs(bb)
    assert cond.shape == (2, 16, 32) and cond.dtype == torch.float32
    img = bb.decode(x)
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1


# --- precision ------------------------------------------------------------------------------------------------

def _reward_grad(bb, reward, x, t, cond, prompts=None):
    """∇_x log R(decode(x̂0(x))) through the policy, as the objective computes it."""
    from fastnabla.sampling import step_coefficients

    c = step_coefficients(bb)
    x = x.clone().requires_grad_(True)
    out = bb.policy(x, t, cond)
    x0 = c.x0_coef_x[0] * x + c.x0_coef_out[0] * out
    img = bb.decode(x0)
    log_r, _ = reward(img, prompts, None)
    (g,) = torch.autograd.grad(log_r.sum(), x)
    return g, img, log_r


def test_bf16_weights_keep_fp32_trainables_and_fp32_reward(tiny_sd_dir, tmp_path):
    from fastnabla.rewards import build_reward

    bb = make_backbone(tiny_sd_dir, tmp_path, "model.dtype=bf16")
    assert bb.vae.dtype == bb.text_encoder.dtype == torch.bfloat16
    base = [p for n, p in bb.unet.named_parameters() if "lora_" not in n]
    assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert all(p.dtype == torch.float32 for p in bb.policy_parameters())
    assert all(p.dtype == torch.float32 for p in bb.flow_parameters())
    randomize_lora(bb)
    x, t, cond = inputs(bb)
    seen = {}
    reward = build_reward("brightness")

    def spy(images, prompts, meta):
        seen["dtype"] = images.dtype
        return reward(images, prompts, meta)

    g, img, log_r = _reward_grad(bb, spy, x, t, cond)
    assert seen["dtype"] == torch.float32 and img.dtype == torch.float32 and log_r.dtype == torch.float32
    assert torch.isfinite(g).all() and g.abs().sum() > 0 and g.dtype == torch.float32
    # and the policy gradient reaches the fp32 LoRA weights through the bf16 base
    out = bb.policy(x, t, cond)
    assert out.dtype == torch.float32
    out.square().mean().backward()
    grads = [p.grad for p in bb.policy_parameters()]
    assert all(gr is not None and gr.dtype == torch.float32 for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0
    # bf16 gradient ≈ fp32 gradient (same weights): the casts lose precision, not the signal
    bb32 = make_backbone(tiny_sd_dir, tmp_path)
    randomize_lora(bb32)
    g32, _, _ = _reward_grad(bb32, reward, x, t, cond)
    cos = torch.nn.functional.cosine_similarity(g.flatten(), g32.flatten(), dim=0)
    assert cos > 0.9, float(cos)


# --- memory switches ---------------------------------------------------------------------------------------------

class _CountCalls:
    """Counts calls of ``module.forward`` (forward hooks do not fire in a checkpoint's recomputation)."""

    def __init__(self, module):
        self.module, self.calls, self._fwd = module, [], module.forward

        def counted(*a, **k):
            self.calls.append(1)
            return self._fwd(*a, **k)

        module.forward = counted

    def remove(self):
        del self.module.forward


def _count_calls(module):
    c = _CountCalls(module)
    return c.calls, c


def test_checkpointing_flags_give_the_same_gradients(tiny_sd_dir, tmp_path, tiny_clip_dir, aesthetic_head_file):
    from fastnabla.rewards import build_reward

    opts = {"model": tiny_clip_dir, "head": aesthetic_head_file}
    grads = {}
    for name, flags in {"none": [], "unet": ["train.gradient_checkpointing=true"],
                        "vae": ["reward.vae_checkpointing=true", "reward.micro_batch=1"],
                        "reward": [], "all": ["train.gradient_checkpointing=true", "reward.vae_checkpointing=true"]
                        }.items():
        bb = make_backbone(tiny_sd_dir, tmp_path, *flags)
        randomize_lora(bb)
        reward = build_reward("aesthetic", {**opts, "checkpointing": name in ("reward", "all")})
        x, t, cond = inputs(bb)
        # each switch really recomputes: its module runs again during the backward
        unet_calls, h1 = _count_calls(bb.unet.down_blocks[0].resnets[0])
        vae_calls, h2 = _count_calls(bb.vae.decoder.up_blocks[-1].resnets[0].conv1)
        clip_calls, h3 = _count_calls(reward.clip)
        grads[name], _, _ = _reward_grad(bb, reward, x, t, cond)
        for h in (h1, h2, h3):
            h.remove()
        assert len(unet_calls) == (2 if name in ("unet", "all") else 1), name
        assert len(vae_calls) == {"vae": 4, "all": 2}.get(name, 1), name  # "vae" decodes in 2 micro-batches
        assert len(clip_calls) == (2 if name in ("reward", "all") else 1), name
    assert grads["none"].abs().sum() > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, grads["none"], rtol=1e-4, atol=1e-6, msg=name)


def test_reference_vjps_under_unet_checkpointing(tiny_sd_dir, tmp_path):
    """Input-VJPs through the LoRA-off reference (the stored returns, the bootstrapped returns, the paper's reverse
    score) under train.gradient_checkpointing: the recomputation in the backward must see the adapters off too.
    Same numbers as without checkpointing, and the checkpointed UNet really recomputes."""
    from fastnabla.methods import TransitionBatch
    from fastnabla.methods.nabla_gfn import NablaGFN
    from fastnabla.rewards import build_reward
    from fastnabla.sampling import sample_trajectories, step_coefficients

    got = {}
    for ckpt in (False, True):
        flags = [f"train.gradient_checkpointing={str(ckpt).lower()}"]
        bb = make_backbone(tiny_sd_dir, tmp_path, *flags)
        randomize_lora(bb)
        c = step_coefficients(bb)
        tr = sample_trajectories(bb, 2, torch.Generator().manual_seed(0), c, ["a cat", "the dog"])
        reward = build_reward("brightness")
        calls, h = _count_calls(bb.unet.down_blocks[0].resnets[0])
        G = NablaGFN(bb, reward, c, make_cfg(tiny_sd_dir, tmp_path, *flags)).gradient_returns(tr.xs, tr.cond,
                                                                                               tr.prompts)
        h.remove()
        assert len(calls) == 4 * (2 if ckpt else 1)  # 4 steps, recomputed under checkpointing
        paper = NablaGFN(bb, reward, c, make_cfg(tiny_sd_dir, tmp_path, *flags, "gfn.recipe=paper"))
        idx = torch.tensor([[0, 1], [1, 2]])
        loss_b, stats = paper(TransitionBatch.gather(tr, idx, "cpu"))
        boot = NablaGFN(bb, reward, c, make_cfg(tiny_sd_dir, tmp_path, *flags, "gfn.return_kappa=0.5"))
        R = boot.bootstrapped_returns(boot.gather(tr, idx, "cpu"))
        got[ckpt] = (G, loss_b.detach(), R)
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- saving, loading, export ----------------------------------------------------------------------------------

def _pipe_unet_out(unet, x, t, cond):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


def test_saved_lora_loads_into_a_fresh_pipeline_and_export_fuses_it(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from fastnabla.export import export

    bb = make_backbone(tiny_sd_dir, tmp_path)
    randomize_lora(bb)
    x, t, cond = inputs(bb)
    want = _pipe_unet_out(bb.unet, x, t, cond)  # the LoRA'd UNet (no CFG)
    save = tmp_path / "final"
    bb.save_pretrained(str(save))
    assert (save / "pytorch_lora_weights.safetensors").is_file() and (save / "flow_net").is_dir()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    base = _pipe_unet_out(pipe.unet, x, t, cond)
    assert (base - want).abs().max() > 1e-3
    pipe.load_lora_weights(str(save))
    torch.testing.assert_close(_pipe_unet_out(pipe.unet, x, t, cond), want, rtol=1e-4, atol=1e-5)

    out_dir = tmp_path / "fused"
    export(tiny_sd_dir, str(save), str(out_dir))
    fused = StableDiffusionPipeline.from_pretrained(str(out_dir), safety_checker=None, requires_safety_checker=False)
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())
    torch.testing.assert_close(_pipe_unet_out(fused.unet, x, t, cond), want, rtol=1e-4, atol=1e-5)


def test_lora_alpha_other_than_rank_survives_saving(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    bb = make_backbone(tiny_sd_dir, tmp_path, "model.lora_rank=4", "model.lora_alpha=16")
    randomize_lora(bb, scale=0.1)
    x, t, cond = inputs(bb)
    want = _pipe_unet_out(bb.unet, x, t, cond)
    bb.save_pretrained(str(tmp_path / "a"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "a"))
    torch.testing.assert_close(_pipe_unet_out(pipe.unet, x, t, cond), want, rtol=1e-4, atol=1e-5)


def test_trainable_state_round_trip(tiny_sd_dir, tmp_path):
    bb = make_backbone(tiny_sd_dir, tmp_path)
    randomize_lora(bb)
    state = bb.trainable_state_dict()
    assert state and all("lora_" in k or k.startswith("flow_net.") for k in state)
    bb2 = make_backbone(tiny_sd_dir, tmp_path, seed=5)
    bb2.load_trainable_state_dict(state)
    x, t, cond = inputs(bb)
    with torch.no_grad():
        torch.testing.assert_close(bb2.policy(x, t, cond), bb.policy(x, t, cond))


# --- errors --------------------------------------------------------------------------------------------------

def test_missing_model_is_one_actionable_line(tmp_path):
    from fastnabla.backbones.sd import SDBackbone

    for spec in (str(tmp_path / "nope"), "nobody-here/no-such-model"):
        cfg = load_config(None, BASE + [f"model.pretrained={spec}"], output_dir=str(tmp_path / "r"))
        with pytest.raises(ValueError) as e:
            SDBackbone.from_config(cfg)
        msg = str(e.value)
        assert "\n" not in msg and "local diffusers directory" in msg and "hub id" in msg and spec in msg


def test_xformers_on_cpu_is_refused(tiny_sd_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ValueError, match=r"xformers needs a CUDA GPU and `pip install fastnabla\[xformers\]`; "
                                         r"use model.attention=sdpa"):
        make_backbone(tiny_sd_dir, tmp_path, "model.attention=xformers")


def test_unknown_reward_is_reported(tiny_sd_dir, tmp_path):
    from fastnabla.trainer import build_trainer

    with pytest.raises(ValueError, match="unknown reward 'brightnes'; did you mean 'brightness'"):
        build_trainer(make_cfg(tiny_sd_dir, tmp_path, "reward.name=brightnes"))


@pytest.mark.parametrize("name", ["sd15_aesthetic", "sd15_hpsv2", "sd15_pickscore", "sd15_fast"])
def test_sd_configs_load_with_the_papers_sampler_and_the_returns_recipe(name):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "configs", f"{name}.yaml"))
    m, s, g, t = cfg.model, cfg.sampling, cfg.gfn, cfg.train
    assert m.backbone == "sd" and m.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (m.lora_rank, m.dtype, m.lora_target_modules) == (8, "bf16", ["to_q", "to_k", "to_v", "to_out.0"])
    assert (s.scheduler, s.eta, s.num_steps, s.guidance_scale) == ("ddim", 1.0, 50, 5.0)
    assert 1e3 <= g.reward_scale <= 1e4
    # the returns recipe with the forward-looking term off (the paper's objective: gfn.recipe=paper)
    assert (g.recipe, g.reverse_scale, g.terminal_scale, g.trust_region_scale, g.reward_adaptive_mode) == \
        ("returns", 0.0, 0.0, 0.0, "off")
    assert (g.return_kappa, g.return_steps, g.policy_weighting) == (1.0, 0, "sigma2")
    assert g.timestep_fraction == 0.1 and cfg.prompts.train == "simple_animals"
    assert (t.lr, t.flow_lr, t.flow_weight_decay, t.batch_size) == (1e-3, 1e-3, 1e-2, 4)
    if name == "sd15_fast":
        assert (s.batch_size, s.num_batches, t.epochs) == (4, 1, 400)
    else:
        assert (s.batch_size, s.num_batches, t.gradient_accumulation_steps) == (16, 4, 8)
        assert cfg.reward.name == name.split("_")[1]
