"""method.name and the baselines' config sections: one-line errors naming the valid choices."""
import pytest

from fastnabla.config import ConfigError, load_config
from fastnabla.methods import METHODS, build_method, method_class


def test_every_method_is_registered_and_importable():
    assert sorted(METHODS) == ["alignprop", "ddpo", "draft", "nabla_gfn", "refl"]
    for name in METHODS:
        assert method_class(name).name == name


def test_bad_method_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.name=dpo"])
    msg = str(e.value)
    assert "\n" not in msg and "method.name='dpo' is not a method; valid: alignprop, ddpo, draft, nabla_gfn, refl" in msg
    with pytest.raises(ValueError, match="valid: alignprop, ddpo, draft, nabla_gfn, refl"):
        build_method(type("C", (), {"method": type("M", (), {"name": "x"})()})(), None, None, None)


@pytest.mark.parametrize("override, match", [
    ("refl.stp_range=[0.5,1.0]", "unknown config key 'refl.stp_range'; did you mean 'refl.step_range'?"),
    ("draft.kk=2", "unknown config key 'draft.kk'; did you mean 'draft.k'?"),
    ("alignprop.truncation_range=[0.9,0.1]", "alignprop.truncation_range: [0.9, 0.1] must be two fractions"),
    ("ddpo.clip_range=0", "ddpo.clip_range: must be > 0"),
])
def test_section_keys_and_values(override, match):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert match in str(e.value) and "\n" not in str(e.value)


def test_gfn_transition_plan_is_not_checked_for_the_baselines():
    load_config(None, ["method.name=draft", "sampling.num_steps=4", "gfn.timestep_fraction=0.1"])
    with pytest.raises(ConfigError, match="gfn.timestep_fraction"):
        load_config(None, ["sampling.num_steps=4", "gfn.timestep_fraction=0.1"])


@pytest.mark.parametrize("backbone", ["toy2d", "digits", "sd15_aesthetic"])
@pytest.mark.parametrize("method", ["refl", "draft", "alignprop", "ddpo"])
def test_presets_load(backbone, method):
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "configs", f"{backbone}_{method}.yaml"))
    assert cfg.method.name == method
    base = load_config(os.path.join(root, "configs", f"{backbone}.yaml"))
    assert (cfg.model, cfg.reward, cfg.sampling) == (base.model, base.reward, base.sampling)  # same footing


def test_digits_presets_make_as_many_updates_per_epoch_as_the_file(one_thread):
    """Every digits baseline preset splits an epoch's items into as many optimizer updates as configs/digits.yaml
    (docs/comparison.md compares them at equal updates): the methods' own selections on the presets' sampler."""
    import math
    import os

    import torch

    from fastnabla.backbones.pixel import SCHEDULER_CONFIG, PixelBackbone, build_unet
    from fastnabla.sampling import step_coefficients
    from fastnabla.transitions import make_scheduler

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    updates = {}
    for name in ["digits", "digits_refl", "digits_draft", "digits_alignprop", "digits_ddpo"]:
        cfg = load_config(os.path.join(root, "configs", f"{name}.yaml"))
        sc = cfg.sampling
        bb = PixelBackbone(build_unet(8, [8, 16]), make_scheduler(sc.scheduler, SCHEDULER_CONFIG, sc.num_steps,
                                                                  sc.timesteps), lora_rank=0, flow_channels=[8, 16])
        method = build_method(cfg, bb, None, step_coefficients(bb))
        n = sc.batch_size * sc.num_batches
        items = n * method.select(n, torch.Generator().manual_seed(0)).shape[1]
        updates[name] = math.ceil(items / (cfg.train.batch_size * cfg.train.gradient_accumulation_steps))
    assert set(updates.values()) == {updates["digits"]}, updates
