"""digit_class and digit_ink against hand computations."""
import pytest
import torch

from fastnabla.rewards import build_reward
from fastnabla.rewards.digits import DigitClassifier


def _clf():
    torch.manual_seed(0)
    return DigitClassifier(8, width=8, features=16).eval()


def test_digit_class_is_the_log_of_the_summed_class_probability():
    clf = _clf()
    r = build_reward("digit_class", {"classes": [8, 3, 5], "classifier": clf})
    assert r.classes == [3, 5, 8] and not r.needs_prompts
    x = torch.rand(4, 1, 8, 8)
    log_r, info = r(x.bfloat16().float(), None, None)
    with torch.no_grad():
        e = clf(x.bfloat16().float()).double().exp()
    p = e / e.sum(1, keepdim=True)
    torch.testing.assert_close(log_r.double(), (p[:, 3] + p[:, 5] + p[:, 8]).log(), rtol=1e-5, atol=1e-6)
    assert log_r.dtype == torch.float32 and torch.equal(info["pred"], p.argmax(1))
    one = build_reward("digit_class", {"classes": 3, "classifier": clf})
    torch.testing.assert_close(one(x, None, None)[0].double(), p[:, 3].log(), rtol=1e-5, atol=1e-6)


def test_digit_class_gradient_matches_the_hand_formula():
    clf = _clf()
    r = build_reward("digit_class", {"classes": [1, 7], "classifier": clf})
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    log_r, _ = r(x, None, None)
    log_r.sum().backward()
    xh = x.detach().clone().requires_grad_(True)
    e = clf(xh).exp()
    ((e[:, 1] + e[:, 7]) / e.sum(1)).log().sum().backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, xh.grad, rtol=1e-4, atol=1e-6)


def test_digit_ink_value_and_gradient():
    r = build_reward("digit_ink", {"scale": 4.0})
    x = torch.tensor([[0.0, 0.5], [1.0, 1.5]]).view(1, 1, 2, 2).requires_grad_(True)
    log_r, info = r(x, None, None)
    torch.testing.assert_close(log_r, torch.tensor([4.0 * (0 + 0.5 + 1 + 1) / 4]))  # 1.5 clamps to 1
    log_r.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2))  # clamp(1.5): 0


def test_digit_reward_errors():
    clf = _clf()
    with pytest.raises(ValueError, match="classes"):
        build_reward("digit_class", {"classes": [3, 3], "classifier": clf})
    with pytest.raises(ValueError, match="classes"):
        build_reward("digit_class", {"classes": [10], "classifier": clf})
    r = build_reward("digit_class", {"classes": 3, "classifier": clf})
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        r(torch.rand(2, 3, 8, 8), None, None)
    with pytest.raises(ValueError, match="reward.options.image_size=16"):
        r(torch.rand(2, 1, 16, 16), None, None)
    with pytest.raises(ValueError, match="scale"):
        build_reward("digit_ink", {"scale": 0})
    with pytest.raises(ValueError, match="not a digits classifier directory"):
        build_reward("digit_class", {"classes": 3, "model": "/nonexistent/dir"})
