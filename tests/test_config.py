import subprocess
import sys

import pytest
import yaml

from fastnabla.config import ConfigError, load_config


def test_defaults_file_overrides_and_aliases(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"gfn": {"reward_scale": 3.0, "unet_reg_scale": 7.0}, "seed": 5,
                                 "train": {"epochs": 4}}))
    cfg = load_config(str(p), ["reward.center=[0.0,-1.5]", "seed=3", "timestep_fraction=0.2", "reverse_loss_scale=0.5",
                               "pretrained_strength=0.9", "no_flow=true", "reward_adaptive_mode=sqrt",
                               "low_var_subsampling=false", "gfn.recipe=paper"], output_dir="o")
    assert cfg.gfn.reward_scale == 3.0 and cfg.gfn.trust_region_scale == 7.0
    assert cfg.seed == 3 and cfg.train.epochs == 4 and cfg.reward.center == [0.0, -1.5]
    assert cfg.gfn.timestep_fraction == 0.2 and cfg.gfn.reverse_scale == 0.5 and cfg.gfn.pretrained_strength == 0.9
    assert cfg.gfn.no_flow and cfg.gfn.reward_adaptive_mode == "sqrt" and not cfg.gfn.low_var_subsampling
    assert cfg.output_dir == "o"


def test_exponent_without_dot_is_a_number():
    cfg = load_config(None, ["train.lr=3e-3", "train.flow_lr=1e-4"])
    assert cfg.train.lr == 3e-3 and cfg.train.flow_lr == 1e-4
    with pytest.raises(ConfigError, match="train.lr='fast': must be a number"):
        load_config(None, ["train.lr=fast"])


@pytest.mark.parametrize("override,msg", [
    ("gfn.rewrd_scale=1", "did you mean 'gfn.reward_scale'"),
    ("rewad.center=[1,2]", "did you mean 'reward.center'"),
    ("sampling.eta=0", "sampling.eta: 0.0 must be in"),
    ("gfn.timestep_fraction=0.07", "divisible by 3"),
    ("train.optimizer=adam", "did you mean 'adamw'"),
    ("reward.center=[1]", "reward.center"),
    ("train.epochs=abc", "train.epochs='abc': must be an integer"),
    ("gfn.sample_lag=2", "gfn.sample_lag"),
    ("model.backbone=sd", "model.pretrained: required"),
    ("gfn.reward_adaptive_mode=cube", "must be one of squared, sqrt, none"),
    ("nokey", "must look like key=value"),
    ("gfn.recipe=adjoint", "gfn.recipe='adjoint': must be one of returns, paper"),
    ("gfn.reverse_scale=100", "gfn.reverse_scale: 100.0 is a term of gfn.recipe=paper"),
    ("gfn.terminal_scale=1", "gfn.terminal_scale: 1.0 is a term of gfn.recipe=paper"),
    ("gfn.return_kappa=1.5", "gfn.return_kappa: 1.5 must lie in"),
    ("gfn.return_steps=-1", "gfn.return_steps: -1 must be ≥ 0"),
    ("gfn.recipe=paper gfn.return_kappa=0.5", "gfn.return_kappa: 0.5 configures the gradient returns"),
    ("gfn.policy_target=flows", "gfn.policy_target='flows': must be one of flow, return"),
    ("gfn.policy_target=return gfn.return_kappa=0.5", "gfn.policy_target: 'return' regresses the policy on the "
                                                        "stored Monte-Carlo returns"),
    ("gfn.recipe=paper gfn.policy_target=return", "gfn.policy_target: return configures the gradient returns"),
    ("method.name=dpo", "method.name='dpo' is not a method; valid: .*nabla_gfn"),
    ("gfn.pretrained_strength=0.5", "gfn.pretrained_strength: 0.5: the gradient returns"),
    ("gfn.policy_weighting=snr", "gfn.policy_weighting='snr': must be one of sigma2, output, none"),
    ("train.lr_schedule=linear", "train.lr_schedule='linear': must be one of constant, cosine"),
    ("train.lr_min_ratio=2", "train.lr_min_ratio: 2.0 must be in"),
    ("sampling.timesteps=[901,1]", "sampling.timesteps: lists 2 timesteps but sampling.num_steps=50; set "
                                   "sampling.num_steps=2"),
    ("sampling.num_steps=2 sampling.timesteps=[1,901]", "sampling.timesteps: .* must be strictly decreasing"),
    ("sampling.num_steps=2 sampling.timesteps=[901,0.5]", "sampling.timesteps: .* must be a non-empty list of ints"),
    ("sampling.num_steps=2 sampling.timesteps=[901,1] sampling.scheduler=sde-dpmsolver++",
     "sampling.timesteps: needs sampling.scheduler=ddim or ddpm"),
    # the policy's fixed parts (gfn.reward_guidance, gfn.value_guidance)
    ("gfn.reward_guidance=-1", "gfn.reward_guidance: -1.0 must be ≥ 0"),
    ("gfn.recipe=paper gfn.reward_guidance=1.0", "gfn.reward_guidance: 1.0 guides the policy of gfn.recipe=returns"),
    ("gfn.reward_guidance=1.0 gfn.reward_adaptive_mode=off", "gfn.reward_guidance: .* the guidance would vanish"),
    ("gfn.value_guidance=-1", "gfn.value_guidance: -1.0 must be ≥ 0"),
    ("train.policy_warmup_updates=-5", "train.policy_warmup_updates: must be ≥ 0"),
    ("gfn.recipe=paper gfn.value_guidance=1.0", "gfn.value_guidance: 1.0 guides the policy of gfn.recipe=returns"),
    ("gfn.value_guidance=1.0 gfn.reward_guidance=1.0", "two fixed parts of the policy; keep one"),
    ("gfn.value_guidance_last=1.0", "gfn.value_guidance_last: 1.0: the push's scale at the policy's last step must be"
     " ≥ 0 with gfn.value_guidance > 0"),
    ("gfn.value_guidance=2.0 gfn.value_guidance_last=-1", "gfn.value_guidance_last: -1.0: .* must be ≥ 0"),
    ("gfn.value_guidance=1.0 gfn.value_trajectories=8", "gfn.value_trajectories: 8: the value needs at least 16"),
    ("gfn.value_guidance=1.0 gfn.value_bootstrap=1", "gfn.value_bootstrap: 1.0 must lie in \\[0, 1\\)"),
    ("gfn.value_guidance=1.0 gfn.value_net=mlp", "gfn.value_net='mlp': must be one of unet, encoder"),
    ("gfn.value_guidance=1.0 gfn.value_draw=new", "gfn.value_draw='new': must be one of own, target"),
    ("gfn.value_guidance=1.0 gfn.value_relative_floor=-0.1",
     "gfn.value_relative_floor: -0.1 must lie in \\[0, 1\\)"),
    ("gfn.value_guidance=1.0 gfn.value_channels=[]", "gfn.value_channels: \\[\\] must be a list of positive ints"),
])
def test_bad_values_one_line_errors(override, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(None, override.split())
    assert "\n" not in str(e.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "none.yaml"))
    p = tmp_path / "bad.yaml"
    p.write_text("gfn: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'gfn' must be a mapping"):
        load_config(str(p))


def test_cli_exit_code_2_and_one_line():
    r = subprocess.run([sys.executable, "-m", "fastnabla.train", "gfn.rewrd_scale=2"], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "did you mean 'gfn.reward_scale'" in lines[0]


def test_cli_bad_argument_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "fastnabla.train", "--no-such-flag"], capture_output=True, text=True)
    assert r.returncode == 2
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1 and "--no-such-flag" in r.stderr


def test_recipe_fills_its_defaults_and_keeps_explicit_values(tmp_path):
    r = load_config(None, []).gfn
    assert (r.recipe, r.reverse_scale, r.terminal_scale, r.reward_grad_through_model, r.policy_weighting) == \
        ("returns", 0.0, 0.0, False, "sigma2")
    p = load_config(None, ["gfn.recipe=paper"]).gfn
    assert (p.reverse_scale, p.terminal_scale, p.reward_grad_through_model, p.policy_weighting) == \
        (1.0, 1.0, True, "none")
    p = load_config(None, ["gfn.recipe=paper", "gfn.reverse_scale=3", "gfn.reward_grad_through_model=false"]).gfn
    assert p.reverse_scale == 3.0 and p.reward_grad_through_model is False
    with pytest.raises(ConfigError, match="gfn.policy_weighting: 'sigma2' weights the policy's share"):
        load_config(None, ["gfn.recipe=paper", "gfn.policy_weighting=sigma2"])
    # YAML 1.1 reads an unquoted `off` as false: the FL mode still means "off"
    f = tmp_path / "c.yaml"
    f.write_text("gfn:\n  reward_adaptive_mode: off\n")
    assert load_config(str(f)).gfn.reward_adaptive_mode == "off"


def test_lr_schedule_cosine_and_warmups():
    import math

    from fastnabla.engine import set_group_lrs

    t = load_config(None, ["train.lr=1e-3", "train.flow_lr=2e-3", "train.lr_schedule=cosine", "train.lr_min_ratio=0.1",
                           "train.flow_warmup_updates=4"]).train
    groups = [{"name": "policy"}, {"name": "flow"}]
    for progress, updates in ((0.0, 0), (0.5, 10), (1.0, 10), (0.25, 1)):
        set_group_lrs(groups, t, updates, progress)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert math.isclose(groups[0]["lr"], 1e-3 * decay, rel_tol=1e-12)
        assert math.isclose(groups[1]["lr"], 2e-3 * decay * min(1.0, (updates + 1) / 4), rel_tol=1e-12)
    # the policy's own warm-up leaves the flow's schedule alone
    t = load_config(None, ["train.lr=1e-3", "train.flow_lr=2e-3", "train.policy_warmup_updates=10"]).train
    for updates, policy_lr in ((0, 1e-4), (4, 5e-4), (9, 1e-3), (30, 1e-3)):
        set_group_lrs(groups, t, updates, 0.3)
        assert math.isclose(groups[0]["lr"], policy_lr, rel_tol=1e-12) and groups[1]["lr"] == 2e-3
    const = load_config(None, []).train
    set_group_lrs(groups, const, 0, 0.7)
    assert groups[0]["lr"] == const.lr and groups[1]["lr"] == const.flow_lr
