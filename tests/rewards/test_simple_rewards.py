import pytest
import torch

from fastnabla.rewards import build_reward


def test_gaussian_bump_value_and_gradient():
    r = build_reward("gaussian_bump", {"center": [1.0, 0.5], "width": 0.5})
    x = torch.tensor([[1.0, 0.5], [0.0, 0.0], [2.0, -1.0]], requires_grad=True)
    log_r, info = r(x, None, None)
    c = torch.tensor([1.0, 0.5])
    expected = -((x.detach() - c) ** 2).sum(1) / (2 * 0.25)
    torch.testing.assert_close(log_r, expected)
    log_r.sum().backward()
    torch.testing.assert_close(x.grad, -(x.detach() - c) / 0.25)  # ∇ log R = −(x − c)/width²
    assert log_r.dtype == torch.float32 and not info["distance"].requires_grad


def test_gaussian_bump_defaults_and_errors():
    r = build_reward("gaussian_bump")
    log_r, _ = r(torch.tensor([[1.0, 0.5]], dtype=torch.bfloat16), None, None)
    assert log_r.dtype == torch.float32 and log_r.item() == 0.0
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        r(torch.zeros(3, 3), None, None)
    with pytest.raises(ValueError, match="width must be > 0"):
        build_reward("gaussian_bump", {"width": 0})


@pytest.mark.parametrize("name", ["brightness", "contrast", "colorfulness"])
def test_image_statistics_are_differentiable_fp32(name):
    r = build_reward(name)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 12, 10)
    for x in (images.clone(), images.bfloat16(), torch.full((2, 3, 8, 8), 0.5)):  # incl. a constant image
        x.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast must not leak in
            log_r, info = r(x, None, None)
        assert log_r.dtype == torch.float32 and log_r.shape == (x.shape[0],)
        log_r.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert name in info and not info[name].requires_grad


def test_image_statistics_values():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 5)
    torch.testing.assert_close(build_reward("brightness")(x, None, None)[0], x.mean(dim=(1, 2, 3)))
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(build_reward("contrast")(x, None, None)[0], luma.flatten(1).std(1, unbiased=False),
                               atol=1e-5, rtol=1e-4)
    grey = x[:, :1].expand(-1, 3, -1, -1)
    assert build_reward("colorfulness")(grey, None, None)[0].abs().max() < 1e-2
    vivid = torch.zeros(1, 3, 4, 4)
    vivid[:, 0, :2] = 1.0
    vivid[:, 2, 2:] = 1.0
    assert build_reward("colorfulness")(vivid, None, None)[0].item() > 0.5


def test_image_rewards_check_shapes():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_reward("brightness")(torch.rand(2, 4, 4), None, None)
