"""The differentiable torch preprocessing against the transformers CLIP image processor (PIL path)."""
import numpy as np
import pytest
import torch

from fastnabla.rewards.clip_common import ImagePreprocess, image_preprocess_from


@pytest.mark.parametrize("hw", [(40, 56), (64, 48), (32, 32)])
def test_matches_clip_image_processor(tiny_clip_dir, hw):
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    torch.manual_seed(0)
    # smooth content: bicubic overshoot (clamped by PIL, not by us) stays negligible
    base = torch.rand(1, 3, 5, 6)
    img = torch.nn.functional.interpolate(base, size=hw, mode="bilinear", align_corners=False)
    img = (img * 255).round() / 255  # exactly representable in uint8
    pil = Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    expected = torch.as_tensor(np.asarray(proc(images=pil, return_tensors="np")["pixel_values"]))
    ours = image_preprocess_from(tiny_clip_dir, default_size=999)(img)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    # uint8 rounding in PIL's resize: ≤ 1/255 in [0, 1] units ≈ 0.015 after dividing by the CLIP std
    assert (ours - expected).abs().max() < 0.03


def test_pad_mode_fits_the_longest_edge_and_pads_black():
    pre = ImagePreprocess(size=32, crop_size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), mode="pad")
    x = torch.ones(2, 3, 32, 64, requires_grad=True)
    y = pre(x)
    assert y.shape == (2, 3, 32, 32)
    assert torch.all(y[:, :, :8] == 0) and torch.all(y[:, :, -8:] == 0)
    torch.testing.assert_close(y[:, :, 8:24], torch.ones(2, 3, 16, 32))
    y.sum().backward()
    assert x.grad.abs().sum() > 0


def test_defaults_without_a_preprocessor_config(tmp_path):
    pre = image_preprocess_from(str(tmp_path), default_size=224)
    assert (pre.size, pre.crop_size, pre.mode) == (224, (224, 224), "crop")
    assert pre(torch.rand(1, 3, 300, 256)).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        ImagePreprocess(mode="stretch")(torch.rand(1, 3, 8, 8))
