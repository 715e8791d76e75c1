"""The pixel backbone on a tiny on-the-fly UNet: LoRA policy vs adapter-off reference, full finetuning, the flow
net, class-conditional CFG, decode, saving, config errors."""
import pytest
import torch

from fastnabla.backbones.pixel import PixelBackbone, SCHEDULER_CONFIG, build_unet, parse_class_prompt
from fastnabla.config import ConfigError, load_config
from fastnabla.transitions import make_scheduler


def _bb(lora_rank=2, num_classes=0, guidance=1.0):
    torch.manual_seed(0)
    unet = build_unet(8, [8, 16], num_classes=num_classes)
    sched = make_scheduler("ddim", SCHEDULER_CONFIG, 4)
    return PixelBackbone(unet, sched, lora_rank=lora_rank, flow_channels=[8, 16], guidance_scale=guidance,
                         lora_target_modules=["to_q", "to_v", "conv1", "conv2"])


def _perturb_lora(bb):
    with torch.no_grad():
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


def test_lora_policy_starts_at_the_reference_and_only_the_adapter_trains():
    bb = _bb()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([981, 501, 1])
    assert bb.sample_shape == (1, 8, 8) and not bb.conditional
    torch.testing.assert_close(bb.policy(x, t), bb.reference(x, t), rtol=0, atol=0)
    names = {n for n, p in bb.unet.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert {id(p) for p in bb.policy_parameters()} == {id(p) for n, p in bb.unet.named_parameters() if "lora_" in n}
    _perturb_lora(bb)
    ref = bb.reference(x, t)
    assert not torch.allclose(bb.policy(x, t), ref)
    # the reference is the base network: the same output as a fresh UNet with the same (seeded) weights
    torch.manual_seed(0)
    base = build_unet(8, [8, 16])
    torch.testing.assert_close(ref, base(x, t).sample, rtol=1e-5, atol=1e-6)
    # adapters are back on after a reference call, and the policy is differentiable in x and the adapter
    xr = x.clone().requires_grad_(True)
    bb.policy(xr, t).pow(2).sum().backward()
    assert xr.grad is not None and all(p.grad is not None for p in bb.policy_parameters())
    with bb.reference_sampling():
        torch.testing.assert_close(bb.policy(x, t), ref)
    assert not torch.allclose(bb.policy(x, t), ref)


def test_reference_has_input_gradients_but_no_parameter_gradients():
    bb = _bb()
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    bb.reference(x, torch.tensor([500, 20])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.unet.parameters())
    with torch.no_grad():
        assert not bb.reference(torch.randn(2, 1, 8, 8), torch.tensor([500, 20])).requires_grad


def test_full_finetuning_uses_a_frozen_copy():
    bb = _bb(lora_rank=0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([700, 3])
    torch.testing.assert_close(bb.policy(x, t), bb.reference(x, t), rtol=0, atol=0)
    assert all(p.requires_grad for p in bb.unet.parameters())
    assert not any(p.requires_grad for p in bb.ref_unet.parameters())
    with torch.no_grad():
        next(bb.unet.parameters()).add_(0.1)
    assert not torch.allclose(bb.policy(x, t), bb.reference(x, t))


def test_flow_is_zero_at_init_and_trainable():
    bb = _bb()
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 300)
    assert torch.equal(bb.flow(x, t), torch.zeros_like(x))
    bb.flow(x, t).sum().backward()
    conv_out = bb.flow_net.conv_out.weight
    assert conv_out.grad is not None and conv_out.grad.abs().sum() > 0
    assert {id(p) for p in bb.flow_parameters()} == {id(p) for p in bb.flow_net.parameters()}


def test_class_conditional_cfg_is_the_guided_combination():
    w = 3.0
    bb = _bb(num_classes=10, guidance=w)
    assert bb.conditional and bb.num_classes == 10
    cond = bb.encode(["3", "digit 7"])
    assert cond.tolist() == [3, 7]
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([400, 400])
    u = bb.unet(x, t, class_labels=torch.tensor([10, 10])).sample
    c = bb.unet(x, t, class_labels=cond).sample
    torch.testing.assert_close(bb.policy(x, t, cond), u + w * (c - u), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a class label"):
        bb.encode(["cat"])
    with pytest.raises(ValueError, match="class-conditional"):
        bb.policy(x, t, None)
    assert parse_class_prompt(" Digit 0 ", 10) == 0


def test_decode_is_the_affine_map_and_save_pretrained(tmp_path):
    bb = _bb()
    x = torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 2, 2)
    torch.testing.assert_close(bb.decode(x), torch.tensor([0.0, 0.5, 1.0, 1.25]).view(1, 1, 2, 2))
    _perturb_lora(bb)
    bb.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "flow_net" / "config.json").exists()
    # the state dict round-trips through the checkpoint helpers
    state = bb.trainable_state_dict()
    bb2 = _bb()
    bb2.load_trainable_state_dict(state)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 900])
    torch.testing.assert_close(bb2.policy(x, t), bb.policy(x, t))


def test_config_validation_of_the_pixel_keys():
    cfg = load_config(None, ["model.backbone=pixel", "model.flow_channels=[16,32]"])
    assert cfg.model.image_size == 8
    with pytest.raises(ConfigError, match="model.image_size"):
        load_config(None, ["model.backbone=pixel", "model.image_size=12"])
    with pytest.raises(ConfigError, match="model.unet_channels"):
        load_config(None, ["model.backbone=pixel", "model.unet_channels=[8,16,32,64,64]"])
    with pytest.raises(ConfigError, match="model.flow_channels"):
        load_config(None, ["model.backbone=pixel", "model.flow_channels=[8,8,8,8,8]"])  # 5 levels need 16×16
    with pytest.raises(ConfigError, match="eval.ground_truth_samples"):
        load_config(None, ["eval.ground_truth_samples=-1"])
