import pytest
import torch

from fastnabla.rewards import RewardFn, available_rewards, build_reward, register_reward


def test_available_rewards_lists_the_zoo():
    names = available_rewards()
    for n in ["gaussian_bump", "brightness", "contrast", "colorfulness", "aesthetic", "pickscore", "hpsv2",
              "hpsv2.1", "combo", "imagereward"]:
        assert n in names
    assert names == sorted(names)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown reward 'aesthetc'; did you mean 'aesthetic'"):
        build_reward("aesthetc")
    with pytest.raises(ValueError, match=r"did you mean 'pickscore'"):
        build_reward("pick_score")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match=r"reward\.foo: not an option of reward 'brightness'"):
        build_reward("brightness", {"foo": 1})


def test_register_reward_decorator_and_duplicates():
    @register_reward("_test_sum")
    class SumReward(RewardFn):
        def score(self, images, prompts, metadata):
            return images.sum(dim=(1, 2, 3)), {}

    r = build_reward("_test_sum")
    assert r.name == "_test_sum" and r.needs_prompts is False
    assert "_test_sum" in available_rewards()
    out, info = r(torch.ones(2, 3, 4, 4), None, None)
    assert torch.equal(out, torch.full((2,), 48.0))
    with pytest.raises(ValueError, match="already registered"):
        register_reward("_test_sum")(SumReward)
