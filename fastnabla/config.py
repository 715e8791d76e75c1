"""Run configuration: dataclasses, YAML loading, dotted CLI overrides, aliases, one validation pass.

A config is YAML with the sections ``method model reward prompts sampling gfn train eval logging checkpoint``, one
per baseline method (``refl draft alignprop ddpo``) and a top-level ``seed``. Overrides are ``key=value`` with
dotted keys and YAML values (``reward.center=[1.0,0.5] gfn.reward_scale=2.0 seed=3``). The reference
implementation's option names are accepted as aliases (e.g. ``unet_reg_scale`` → ``gfn.trust_region_scale``), at the
top level or in their section. Every problem raises ``ConfigError`` with one line naming the key and the fix; the
CLI exits 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

__all__ = ["Config", "ConfigError", "load_config", "config_to_dict", "ALIASES"]


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the key and how to fix it."""


@dataclass
class ModelConfig:
    backbone: str = "toy2d"  # toy2d | sd | pixel
    # --- Stable Diffusion -------------------------------------------------------------------------------------
    pretrained: Optional[str] = None  # local diffusers directory or hub id (pixel: unset = the cached digits UNet)
    revision: Optional[str] = None
    dtype: str = "fp32"  # weights of the frozen parts: fp32 | bf16 | fp16 (trainables are always fp32)
    lora_rank: int = 8  # 0 = full finetuning of the UNet
    lora_alpha: Optional[float] = None  # default: = lora_rank
    lora_target_modules: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    attention: str = "sdpa"  # sdpa | xformers
    resolution: int = 512
    flow_channels: list = field(default_factory=lambda: [64, 128, 256, 256])
    flow_text_conditioning: Optional[bool] = None  # None: on iff the reward reads prompts
    # --- toy2d ------------------------------------------------------------------------------------------------
    grid: list = field(default_factory=lambda: [-2.0, 0.0, 2.0])  # mixture means: grid × grid
    component_std: float = 0.25
    weights: Optional[list] = None  # mixture weights (default equal)
    hidden: int = 128  # width of the residual policy MLP and of the flow MLP
    layers: int = 3
    # --- pixel (the digits benchmark; lora_*, flow_channels and pretrained above apply too) ---------------------
    image_size: int = 8  # 8 (the data's own) or 16 (bilinear upsampling)
    unet_channels: list = field(default_factory=lambda: [32, 64, 64])  # UNet2DModel widths; attention at level 2
    class_conditional: bool = False  # class label as the prompt ("0"…"9"), CFG with sampling.guidance_scale
    pretrain_steps: int = 2000  # one-time pretraining when model.pretrained is unset (cached by config hash)
    pretrain_batch_size: int = 128
    pretrain_lr: float = 2e-3
    cache_dir: Optional[str] = None  # pretrained UNet/classifier/ground truth; default $FASTNABLA_CACHE_DIR or
    #                                  ~/.cache/fastnabla/digits


@dataclass
class RewardConfig:
    name: str = "gaussian_bump"
    center: list = field(default_factory=lambda: [1.0, 0.5])  # gaussian_bump
    width: float = 1.0  # gaussian_bump
    model: Optional[str] = None  # CLIP/PickScore/HPS weights: local path or hub id
    head: Optional[str] = None  # aesthetic MLP checkpoint file
    processor: Optional[str] = None
    weights: Optional[dict] = None  # combo: {name: weight}
    options: dict = field(default_factory=dict)  # extra options passed to the reward factory
    checkpointing: bool = False  # activation checkpointing of the reward model
    vae_checkpointing: bool = False  # activation checkpointing of the VAE decode
    micro_batch: int = 0  # reward-gradient micro-batch (0 = whole batch)


@dataclass
class PromptsConfig:
    train: str = "simple_animals"  # built-in set name, or a .txt/.json/.csv file
    eval: Optional[str] = None  # default: the training set
    column: Optional[str] = None  # csv column
    eval_seed: int = 1234


@dataclass
class SamplingConfig:
    scheduler: str = "ddim"  # ddim | ddpm | sde-dpmsolver++
    num_steps: int = 50
    # an explicit descending timestep list of num_steps entries (ddim or ddpm), e.g. denser where the samples' content
    # is decided; None = the scheduler's own uniform spacing. p_ref is this sampler's output (ALGORITHM §5b)
    timesteps: Optional[list] = None
    eta: float = 1.0
    guidance_scale: float = 5.0
    batch_size: int = 256  # trajectories per sampling batch (per device)
    num_batches: int = 1  # sampling batches per epoch (per device)
    # Independent data shards per epoch (0 = one per process). Shard s draws its trajectories and its transition
    # plan from seeds (seed, epoch, s); each process owns data_shards / world_size of them and an update's
    # micro-batch k joins micro-batch k of each owned shard. Same data_shards → same global batch at any world size.
    data_shards: int = 0


@dataclass
class GFNConfig:
    reward_scale: float = 1.0  # β
    pretrained_strength: float = 1.0  # λ
    timestep_fraction: float = 0.1
    low_var_subsampling: bool = True
    # The objective (ALGORITHM §4/§5b). "returns": the policy's forward residual against the detached target
    # sg(r' + g'), weighted per transition (policy_weighting), and the flow regressed on gradient κ-returns of the
    # frozen reference (L_A); no reverse or terminal-flow term. "paper": §4 exactly as the reference implementation.
    recipe: str = "returns"  # returns | paper
    # w_k on the policy's share of L_F: sigma2 (σ_k², the path KL's own weight) | output (σ_k⁴/coef_out_k²: the same
    # weight on every transition's error in the network output, d = coef_out·Δout/σ²) | none. Unset keys below take
    # the recipe's default
    # (RECIPE_DEFAULTS: paper = reverse 1, terminal 1, FL through the model, no weighting; returns = no reverse or
    # terminal term, FL with the network held constant, σ²-weighting)
    policy_weighting: Optional[str] = None
    reverse_scale: Optional[float] = None
    trust_region_scale: float = 0.0
    terminal_scale: Optional[float] = None
    no_flow: bool = False
    reward_adaptive_mode: str = "squared"  # squared | sqrt | none | off (γ = 0 before the clean sample)
    reward_grad_through_model: Optional[bool] = None
    sample_lag: int = 1
    # gradient κ-returns (recipe "returns", ALGORITHM §5b): G_k = J_ref(x_k)ᵀ[(1−κ)·(g + r)(x_{k+1}) + κ·G_{k+1}],
    # truncated after return_steps steps (0 = carried to the clean sample) and bootstrapped there with (g + r).
    # κ = 1 with no truncation is the Monte-Carlo return, computed once after sampling and stored with the
    # trajectories; anything else is computed at training time with the current flow (return_steps reference
    # VJPs per trained transition).
    return_kappa: float = 1.0
    return_steps: int = 0
    return_micro_batch: int = 0  # trajectories per reference VJP for the stored returns (0 = reward.micro_batch)
    # what the policy's forward residual d regresses on (recipe "returns"): "flow" = sg(r' + g'), the flow's estimate
    # of ∇log h(x'); "return" = the Monte-Carlo gradient return G_{k+1} itself (the flow's own regression target, so
    # the policy's regression does the conditional expectation; no flow is used or trained). Both have the same
    # fixed point; "return" needs the stored Monte-Carlo returns (return_kappa 1, return_steps 0)
    policy_target: str = "flow"  # flow | return
    # the policy's mean carries a fixed, state-specific guess of the tilt (recipe "returns"): μ_θ(x) + σ_k²·s·β·γ_k·
    # ∇_x log R(x̂0_ref(x)), the forward-looking term (γ of reward_adaptive_mode) on the reference's clean-sample
    # prediction, with s = reward_guidance (0 = off). The network learns only what the guess misses: its residual
    # regresses on G_{k+1} − s·β·γ_k·∇log R(x̂0_ref), and the fixed point is the same. Sampling costs one reference
    # input-VJP and one reward gradient per step
    reward_guidance: float = 0.0
    # the policy's mean carries a fixed push from a fitted value (recipe "returns"; fastnabla.value): μ_θ(x) +
    # s·σ_k²·∇log h_φ(μ_ref(x), t_{k+1}), with s = value_guidance (0 = off) and β·∇log R at the last step. h_φ ≈
    # E_ref[R^β(x_N) | x_t] is fitted once by BCE on value_trajectories reference trajectories (value_steps AdamW
    # steps of value_batch states at value_lr; the backbone's value net at value_channels) and cached. The network
    # learns the rest from the returns. Not in ALGORITHM §5b yet (proposed there)
    value_guidance: float = 0.0
    # the push's scale at the policy's last step: from its first step to its last, s goes linearly in the timestep
    # from value_guidance to this (None = value_guidance at every step). Where h_φ is near exact (the last steps),
    # s = 1 is the Gaussian step of the tilt and s > 1 over-tilts
    value_guidance_last: Optional[float] = None
    value_trajectories: int = 8192
    value_steps: int = 2000
    value_batch: int = 256
    value_lr: float = 1e-3
    value_channels: list = field(default_factory=lambda: [32, 64])
    # the value net: "unet" (the flow net's architecture; its output's mean is the logit) or "encoder" (its down
    # and middle blocks, then a pooled linear head: a third of the work per fit step, the same held-out fit to
    # within 0.005 on digits; docs/digits.md, stop 37)
    value_net: str = "unet"
    # the value's reference trajectories: "own" (a draw of its own, seeded by value_seed) or "target" (the first
    # value_trajectories of the importance-sampled target's draw, eval.ground_truth_samples: one draw serves both,
    # so a first run samples them once; value_seed then seeds the fit alone)
    value_draw: str = "own"
    value_seed: int = 0
    # the fit's label of a state x_k (k < N−1): (1 − b)·R^β(x_N) + b·h̄(x_{k+1}), with b = value_bootstrap and h̄ an
    # EMA of the value net (fastnabla.value.fit_value); 0 = the Monte-Carlo label alone
    value_bootstrap: float = 0.0
    # f > 0: each state's BCE in the fit is divided by max(h_φ(x_k), f) (detached), a relative-error fit that weighs
    # states where h is small as much as those where it is near 1 (the same conditional mean); 0 = plain BCE
    value_relative_floor: float = 0.0
    # the policy acts only at sampling steps whose timestep is ≤ this; the steps above it sample from the reference
    # and are neither finetuned nor trained (None = every step). Where the pretrained sampler has not started to
    # choose what it draws, log h is flat and the exact tilt is the reference's own step; a trained policy there
    # only fits the returns' noise (benchmarks/digits_decision.py finds those steps). timestep_fraction then applies
    # to the policy's steps
    policy_max_timestep: Optional[int] = None
    # and only at steps whose timestep is ≥ this (None = down to the last step): the steps below it sample from the
    # reference and are not trained. Where σ_k is tiny, the exact tilt's step differs from the reference's by a KL of
    # σ_k²·|∇log h|²/2 (~1e-4 nats on digits' t 51 → 1), while a shared network's output there drifts with its
    # neighbours' (44–163 nats measured; benchmarks/digits_path_kl.py)
    policy_min_timestep: Optional[int] = None


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 0  # transitions per micro-batch (0 = all trained transitions of the epoch at once)
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3  # policy
    weight_decay: float = 1e-4
    flow_lr: float = 1e-3
    flow_weight_decay: float = 1e-2
    flow_warmup_updates: int = 0  # updates during which the flow net's lr ramps linearly from 0
    policy_warmup_updates: int = 0  # the same for the policy's lr (the flow net fits before the policy moves far)
    lr_schedule: str = "constant"  # constant | cosine (both groups, over the run's epochs, down to lr_min_ratio)
    lr_min_ratio: float = 0.1
    # EMA of the policy's trainables used for evaluation, the final samples and the exported weights (0 = off;
    # training samples with the live policy unless ema_sampling)
    ema_decay: float = 0.0
    # sample the training trajectories with the policy EMA too (two timescales, ALGORITHM §5b): the live policy
    # regresses on returns of the slow average, which moves 1 − ema_decay of the way per update. A policy regressed
    # on its own samples overshoots where the tilt is sharp within one step (benchmarks/gaussian_step_fixed_point.py);
    # the average damps that iteration. Needs ema_decay > 0
    ema_sampling: bool = False
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0  # per parameter group; 0 = off
    optimizer: str = "adamw"  # adamw | adamw8bit | lion8bit
    gradient_checkpointing: bool = False
    # torch.compile the backbone's networks in place (Backbone.compiled_networks: UNet, reference copy, flow net,
    # VAE); parameter names and checkpoints are unchanged. The first steps pay the compilation; measure it with
    # benchmarks/bench_step.py before turning it on
    compile: bool = False
    max_bad_steps: int = 10
    deepspeed: Optional[str] = None  # path of a DeepSpeed JSON config
    collective_timeout_s: float = 1800.0  # a collective waiting longer than this fails (a dead or hung rank)
    backend: str = "auto"  # residual_db_loss backend
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalConfig:
    every: int = 10  # epochs; 0 = only at the end
    num_samples: int = 4096
    ground_truth_samples: int = 50000  # pixel: p_ref samples for the importance-sampled target (0 = none)
    # sd: image features for diversity and prior preservation (FID/KID vs the pretrained model's samples at the
    # same prompts and seeds): none | clip (a local transformers CLIP directory) | dreamsim (`pip install dreamsim`)
    features: str = "none"
    feature_model: Optional[str] = None  # a local path: the CLIP directory, or the directory of DreamSim's weights


@dataclass
class LoggingConfig:
    progress: bool = True
    plots: bool = True


@dataclass
class CheckpointConfig:
    every: int = 50  # epochs; 0 = only at the end and on signals
    keep_last: int = 3
    resume_from: Optional[str] = None  # a checkpoint directory, or "latest"


@dataclass
class MethodConfig:
    # the finetuning method (fastnabla/methods/): nabla_gfn (∇-GFlowNet; its hyper-parameters are the gfn section),
    # or one of the baselines of ALGORITHM §5c, each with its own section: refl, draft, alignprop, ddpo. The gfn
    # section is ∇-GFlowNet's alone; the baselines are on-policy (they train on the epoch's fresh samples).
    name: str = "nabla_gfn"


@dataclass
class ReFLConfig:
    """ReFL (Xu et al. 2023, ImageReward; reference code ``train_refl``): no-grad sampling to a random late step, one
    step with gradient to x̂0, loss −log R(x̂0). Defaults: the reference draws the gradient step from 30…39 of 40
    steps (= [0.75, 1.0) of the chain) and multiplies the loss by ``grad_scale`` 1e-3."""

    step_range: list = field(default_factory=lambda: [0.75, 1.0])  # fractions of the N steps: k ∈ [⌊aN⌋, ⌈bN⌉ − 1]
    grad_scale: float = 1e-3
    # the reference's hinge ReLU(margin − score) with margin 2 on ImageReward's standardised score; unset = −log R
    reward_margin: Optional[float] = None
    # weight of a data-free stand-in for ReFL's pretraining loss: mean (out_θ − out_ref)² at the trained state (the
    # reference's regulariser is the denoising loss on its pretraining data, which fastnabla does not have)
    pretrain_scale: float = 0.0


@dataclass
class DRaFTConfig:
    """DRaFT (Clark et al., ICLR 2024): −log R(x_N) backpropagated through the last ``k`` sampler steps; DRaFT-LV
    (``lv_copies`` = n > 0, needs k = 1): the final sample re-noised n times to the last step's noise level and
    denoised in one step with gradient. The paper's recommended settings: DRaFT-1 (k = 1) and DRaFT-LV with n = 2."""

    k: int = 1
    lv_copies: int = 0
    checkpointing: bool = True  # recompute each differentiated policy forward in the backward
    grad_scale: float = 1.0


@dataclass
class AlignPropConfig:
    """AlignProp (Prabhudesai et al. 2023; reference code ``sd_pipeline.py``/``config/align_prop.py``): −log R(x_N)
    backpropagated through the chain from a random step on (outputs of earlier steps detached), with gradient
    checkpointing. The reference's general config draws that step from 35…45 of 50 (= [0.7, 0.9]); its aesthetic
    preset uses 0…50 (the whole chain), lr 1e-3, loss coefficient 0.01, grad-norm clip 5."""

    truncation_range: list = field(default_factory=lambda: [0.7, 0.9])  # fractions of N, both ends inclusive
    checkpointing: bool = True
    grad_scale: float = 1.0


@dataclass
class DDPOConfig:
    """DDPO-clip (Black et al. 2023; defaults of ddpo-pytorch's ``config/base.py``): PPO's clipped surrogate on the
    per-step Gaussian log-probabilities (mean over the state's elements), advantages normalised per prompt."""

    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    timestep_fraction: float = 1.0  # steps trained per trajectory (a random subset below 1)
    per_prompt_stat_tracking: bool = True  # off, or an unconditional backbone: normalise over the epoch's batch
    buffer_size: int = 16  # rewards kept per prompt, across epochs
    min_count: int = 16  # below this many, the batch's mean and std are used


@dataclass
class Config:
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    gfn: GFNConfig = field(default_factory=GFNConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    draft: DRaFTConfig = field(default_factory=DRaFTConfig)
    alignprop: AlignPropConfig = field(default_factory=AlignPropConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    seed: int = 0
    output_dir: str = "runs/default"


SECTIONS = ("method", "model", "reward", "prompts", "sampling", "gfn", "train", "eval", "logging", "checkpoint",
            "refl", "draft", "alignprop", "ddpo")

#: the reference implementation's names → ours (accepted at the top level or inside their section)
ALIASES = {
    "reward_scale": "gfn.reward_scale",
    "timestep_fraction": "gfn.timestep_fraction",
    "low_var_subsampling": "gfn.low_var_subsampling",
    "reverse_loss_scale": "gfn.reverse_scale",
    "pretrained_strength": "gfn.pretrained_strength",
    "unet_reg_scale": "gfn.trust_region_scale",
    "no_flow": "gfn.no_flow",
    "reward_adaptive_mode": "gfn.reward_adaptive_mode",
    "gfn.reverse_loss_scale": "gfn.reverse_scale",
    "gfn.unet_reg_scale": "gfn.trust_region_scale",
}


def _all_keys() -> list[str]:
    keys = ["seed", "output_dir"]
    for s in SECTIONS:
        keys += [f"{s}.{f.name}" for f in dataclasses.fields(getattr(Config, "__dataclass_fields__")[s].default_factory())]
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys() + list(ALIASES), n=1, cutoff=0.5)
    if not close:  # try the last component alone: "gfn.rewrd_scale" → "gfn.reward_scale"
        tail = key.split(".")[-1]
        close = [k for k in _all_keys() if difflib.get_close_matches(tail, [k.split(".")[-1]], cutoff=0.75)][:1]
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid sections: {', '.join(SECTIONS)}, seed"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if prefix == "" and k in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"config section {k!r} must be a mapping, got {type(v).__name__}")
            out.update(_flatten(v, prefix=f"{k}."))
        else:
            out[key] = v
    return out


def _set(cfg: Config, key: str, value: Any) -> None:
    key = ALIASES.get(key, key)
    if key in ("seed", "output_dir"):
        setattr(cfg, key, value)
        return
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise _unknown(key)
    section = getattr(cfg, parts[0])
    if parts[1] not in {f.name for f in dataclasses.fields(section)}:
        raise _unknown(key)
    setattr(section, parts[1], value)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. gfn.reward_scale=2.0)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse {raw!r} as YAML ({str(e).splitlines()[0]})") from None
    return key.strip(), value


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                output_dir: Optional[str] = None) -> Config:
    """Defaults ← YAML file ← overrides, then one validation pass. Raises ``ConfigError``."""
    cfg = Config()
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
        for k, v in _flatten(data).items():
            _set(cfg, k, v)
    for o in overrides or []:
        _set(cfg, *parse_override(o))
    if output_dir is not None:
        cfg.output_dir = output_dir
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# --- validation --------------------------------------------------------------------------------------------------

def _typed(key: str, value: Any, kind) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r}: must be an integer")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: must be a number")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}={value!r}: must be finite")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: must be a string")
        return value
    if kind is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: must be a list, e.g. [1.0, 0.5]")
        return list(value)
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: must be a mapping, e.g. {{aesthetic: 0.7, hpsv2: 0.3}}")
        return value
    return value


def validate(cfg: Config) -> None:
    """Coerce types and check every value once; raises ``ConfigError`` naming the first bad key."""
    import typing

    if cfg.gfn.reward_adaptive_mode is False:  # YAML 1.1 reads an unquoted `off` as false
        cfg.gfn.reward_adaptive_mode = "off"
    hints_cache = {}
    for s in SECTIONS:
        section = getattr(cfg, s)
        cls = type(section)
        hints = hints_cache.setdefault(cls, typing.get_type_hints(cls))
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            h = hints[f.name]
            optional = typing.get_origin(h) is typing.Union and type(None) in typing.get_args(h)
            base = next((a for a in typing.get_args(h) if a is not type(None)), h) if optional else h
            if v is None:
                if optional:
                    continue
                raise ConfigError(f"{s}.{f.name}: must be set (got null)")
            setattr(section, f.name, _typed(f"{s}.{f.name}", v, base))
    cfg.seed = _typed("seed", cfg.seed, int)
    cfg.output_dir = _typed("output_dir", cfg.output_dir, str)

    from fastnabla.methods import METHODS

    if cfg.method.name not in METHODS:
        raise ConfigError(f"method.name={cfg.method.name!r} is not a method; valid: {', '.join(sorted(METHODS))}")

    def choice(key, v, options):
        if v not in options:
            close = difflib.get_close_matches(str(v), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={v!r}: must be one of {', '.join(options)}{hint}")

    def check(cond, key, msg):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    m, r, sa, g, t = cfg.model, cfg.reward, cfg.sampling, cfg.gfn, cfg.train
    choice("model.backbone", m.backbone, ["toy2d", "sd", "pixel"])
    choice("model.dtype", m.dtype, ["fp32", "bf16", "fp16"])
    choice("model.attention", m.attention, ["sdpa", "xformers"])
    check(m.lora_rank >= 0, "model.lora_rank", f"{m.lora_rank} must be ≥ 0 (0 = full finetuning)")
    check(m.component_std > 0, "model.component_std", "must be > 0")
    check(m.hidden > 0 and m.layers >= 1, "model.hidden", "hidden must be > 0 and layers ≥ 1")
    check(m.resolution % 8 == 0 and m.resolution > 0, "model.resolution", f"{m.resolution} must be a multiple of 8")
    if m.backbone == "sd":
        check(m.pretrained is not None, "model.pretrained",
              "required for model.backbone=sd: a local diffusers directory or a hub id (e.g. "
              "stable-diffusion-v1-5/stable-diffusion-v1-5)")
    check(m.image_size in (8, 16), "model.image_size", f"{m.image_size} must be 8 (the digits' own) or 16")
    check(len(m.unet_channels) >= 1 and all(isinstance(c, int) and c > 0 for c in m.unet_channels)
          and m.image_size % 2 ** (len(m.unet_channels) - 1) == 0, "model.unet_channels",
          f"{m.unet_channels} must be positive ints, at most log2(image_size) + 1 levels, e.g. [32, 64]")
    check(m.pretrain_steps >= 1 and m.pretrain_batch_size >= 1 and m.pretrain_lr > 0, "model.pretrain_steps",
          "pretrain_steps and pretrain_batch_size must be ≥ 1 and pretrain_lr > 0")
    if m.backbone == "pixel":
        check(all(isinstance(c, int) and c > 0 for c in m.flow_channels)
              and m.image_size % 2 ** (len(m.flow_channels) - 1) == 0, "model.flow_channels",
              f"{m.flow_channels}: the pixel flow net needs positive ints and at most log2(image_size) + 1 levels, "
              "e.g. [16, 32]")
        check(m.dtype == "fp32", "model.dtype", "the pixel backbone runs in fp32; set model.dtype=fp32")
    check(len(r.center) == 2 and all(isinstance(c, (int, float)) for c in r.center), "reward.center",
          f"{r.center!r} must be two numbers, e.g. [1.0, 0.5]")
    check(r.width > 0, "reward.width", "must be > 0")
    check(r.micro_batch >= 0, "reward.micro_batch", "must be ≥ 0 (0 = whole batch)")
    choice("sampling.scheduler", sa.scheduler, ["ddim", "ddpm", "sde-dpmsolver++"])
    check(sa.num_steps >= 1, "sampling.num_steps", "must be ≥ 1")
    if sa.timesteps is not None:
        from fastnabla.transitions import check_timestep_list

        try:
            ts = check_timestep_list(sa.timesteps)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check(len(ts) == sa.num_steps, "sampling.timesteps",
              f"lists {len(ts)} timesteps but sampling.num_steps={sa.num_steps}; set sampling.num_steps={len(ts)}")
        check(sa.scheduler in ("ddim", "ddpm"), "sampling.timesteps",
              f"needs sampling.scheduler=ddim or ddpm, not {sa.scheduler}")
    check(sa.batch_size >= 1 and sa.num_batches >= 1, "sampling.batch_size", "batch_size and num_batches must be ≥ 1")
    check(sa.data_shards >= 0, "sampling.data_shards", f"{sa.data_shards} must be ≥ 0 (0 = one shard per process)")
    check(sa.guidance_scale >= 0, "sampling.guidance_scale", "must be ≥ 0")
    if sa.scheduler == "ddim":
        check(0 < sa.eta <= 1, "sampling.eta",
              f"{sa.eta} must be in (0, 1]: with eta = 0 every transition is deterministic (σ = 0) and cannot be "
              "trained; use eta=1.0")
    check(g.reward_scale > 0, "gfn.reward_scale", "β must be > 0")
    check(0 < g.timestep_fraction <= 1, "gfn.timestep_fraction", f"{g.timestep_fraction} must be in (0, 1]")
    k = int(sa.num_steps * g.timestep_fraction)
    # the transition plan of ∇-GFlowNet only: the baselines pick their own steps (their sections). With
    # gfn.policy_max_timestep or gfn.policy_min_timestep the fraction is of the policy's steps, which the schedule
    # decides: the method checks it
    if g.timestep_fraction < 1 and cfg.method.name == "nabla_gfn" and g.policy_max_timestep is None \
            and g.policy_min_timestep is None:
        check(k >= 1, "gfn.timestep_fraction",
              f"{g.timestep_fraction} × sampling.num_steps={sa.num_steps} trains no transition; raise it")
        if g.low_var_subsampling:
            check(sa.num_steps % k == 0, "gfn.timestep_fraction",
                  f"low-variance subsampling splits num_steps={sa.num_steps} into int(num_steps × fraction)={k} "
                  f"equal chunks, which needs num_steps divisible by {k}; pick a fraction giving a divisor, or set "
                  "gfn.low_var_subsampling=false")
        else:
            check(k <= sa.num_steps - 1, "gfn.timestep_fraction", "draws more transitions than there are")
    choice("gfn.recipe", g.recipe, ["returns", "paper"])
    _resolve_recipe(g, check, choice)
    choice("gfn.policy_weighting", g.policy_weighting, ["sigma2", "output", "none"])
    for key in ("reverse_scale", "trust_region_scale", "terminal_scale"):
        check(getattr(g, key) >= 0, f"gfn.{key}", "must be ≥ 0")
    choice("gfn.reward_adaptive_mode", g.reward_adaptive_mode, ["squared", "sqrt", "none", "off"])
    check(g.sample_lag in (0, 1), "gfn.sample_lag", f"{g.sample_lag} must be 0 (on-policy) or 1 (one epoch behind)")
    check(t.epochs >= 1, "train.epochs", "must be ≥ 1")
    check(t.batch_size >= 0, "train.batch_size", "must be ≥ 0 (0 = all transitions of the epoch in one batch)")
    check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be ≥ 1")
    check(t.lr > 0 and t.flow_lr >= 0, "train.lr", "lr must be > 0 and flow_lr ≥ 0")
    check(t.weight_decay >= 0 and t.flow_weight_decay >= 0, "train.weight_decay", "must be ≥ 0")
    check(t.flow_warmup_updates >= 0, "train.flow_warmup_updates", "must be ≥ 0")
    check(t.policy_warmup_updates >= 0, "train.policy_warmup_updates", "must be ≥ 0")
    choice("train.lr_schedule", t.lr_schedule, ["constant", "cosine"])
    check(0 <= t.lr_min_ratio <= 1, "train.lr_min_ratio", f"{t.lr_min_ratio} must be in [0, 1]")
    check(0 <= t.ema_decay < 1, "train.ema_decay", f"{t.ema_decay} must be in [0, 1) (0 = no policy EMA), e.g. 0.99")
    check(not t.ema_sampling or t.ema_decay > 0, "train.ema_sampling",
          "samples with the policy EMA, but train.ema_decay=0 keeps none; set train.ema_decay (e.g. 0.9)")
    check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", f"{t.betas} must be two values in [0, 1)")
    check(t.max_grad_norm >= 0, "train.max_grad_norm", "must be ≥ 0 (0 = no clipping)")
    choice("train.optimizer", t.optimizer, ["adamw", "adamw8bit", "lion8bit"])
    check(t.max_bad_steps >= 1, "train.max_bad_steps", "must be ≥ 1")
    check(t.collective_timeout_s > 0, "train.collective_timeout_s",
          f"{t.collective_timeout_s} must be > 0 seconds (e.g. 1800)")
    choice("train.backend", t.backend, ["auto", "reference", "triton"])
    choice("train.device", t.device, ["auto", "cpu", "cuda"])
    check(cfg.eval.every >= 0 and cfg.eval.num_samples >= 1, "eval.every", "every ≥ 0 and num_samples ≥ 1")
    check(cfg.eval.ground_truth_samples >= 0, "eval.ground_truth_samples", "must be ≥ 0 (0 = no ground truth)")
    _validate_eval_features(cfg, check, choice)
    check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be ≥ 0")
    check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be ≥ 1")
    _validate_baselines(cfg, check)


def _validate_eval_features(cfg: Config, check, choice) -> None:
    """eval.features / eval.feature_model: a known extractor, for an SD run, with a local path that exists (checked
    here, before training, rather than at the first evaluation)."""
    e = cfg.eval
    choice("eval.features", e.features, ["none", "clip", "dreamsim"])
    if e.features == "none":
        return
    check(cfg.model.backbone == "sd", "eval.features",
          f"{e.features!r} measures SD images; model.backbone={cfg.model.backbone} has its own evaluation, set "
          "eval.features=none")
    what = ("a local transformers CLIP directory (CLIPModel or CLIPVisionModelWithProjection, saved with "
            "save_pretrained)" if e.features == "clip" else "the local directory of DreamSim's weights (its cache_dir)")
    check(e.feature_model is not None, "eval.feature_model", f"must be set for eval.features={e.features}: {what}")
    path = os.path.expanduser(str(e.feature_model))
    check(os.path.isdir(path), "eval.feature_model", f"{e.feature_model!r} is not a directory; set it to {what}")
    if e.features == "clip":
        check(os.path.isfile(os.path.join(path, "config.json")), "eval.feature_model",
              f"{e.feature_model!r} has no config.json; set it to {what}")
    else:
        import importlib.util

        check(importlib.util.find_spec("dreamsim") is not None, "eval.features",
              "dreamsim is not installed: pip install dreamsim, and set eval.feature_model to the local directory "
              "of its weights")


def _fraction_range(key: str, v: list, check) -> None:
    check(len(v) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v)
          and 0 <= v[0] <= v[1] <= 1, key, f"{v!r} must be two fractions 0 ≤ a ≤ b ≤ 1 of the sampling steps, "
          "e.g. [0.75, 1.0]")


def _validate_baselines(cfg: Config, check) -> None:
    N = cfg.sampling.num_steps
    rf, dr, ap, dp = cfg.refl, cfg.draft, cfg.alignprop, cfg.ddpo
    _fraction_range("refl.step_range", rf.step_range, check)
    check(rf.grad_scale > 0, "refl.grad_scale", "must be > 0")
    check(rf.pretrain_scale >= 0, "refl.pretrain_scale", "must be ≥ 0 (0 = off)")
    check(1 <= dr.k <= N, "draft.k", f"{dr.k} must be in [1, sampling.num_steps={N}]")
    check(dr.lv_copies >= 0, "draft.lv_copies", "must be ≥ 0 (0 = DRaFT-K; n > 0 = DRaFT-LV)")
    check(dr.lv_copies == 0 or dr.k == 1, "draft.lv_copies",
          f"DRaFT-LV differentiates the last step only; set draft.k=1 (got {dr.k}) or draft.lv_copies=0")
    check(dr.grad_scale > 0, "draft.grad_scale", "must be > 0")
    _fraction_range("alignprop.truncation_range", ap.truncation_range, check)
    check(ap.grad_scale > 0, "alignprop.grad_scale", "must be > 0")
    check(dp.clip_range > 0, "ddpo.clip_range", "must be > 0 (ddpo-pytorch: 1e-4)")
    check(dp.adv_clip_max > 0, "ddpo.adv_clip_max", "must be > 0 (ddpo-pytorch: 5)")
    check(0 < dp.timestep_fraction <= 1 and int(N * dp.timestep_fraction) >= 1, "ddpo.timestep_fraction",
          f"{dp.timestep_fraction} must be in (0, 1] and select at least one of the {N} steps")
    check(dp.buffer_size >= 1 and 1 <= dp.min_count, "ddpo.buffer_size", "buffer_size and min_count must be ≥ 1")


#: what ``gfn.recipe`` fills in for the keys left unset (None)
RECIPE_DEFAULTS = {
    "paper": {"reverse_scale": 1.0, "terminal_scale": 1.0, "reward_grad_through_model": True,
              "policy_weighting": "none"},
    "returns": {"reverse_scale": 0.0, "terminal_scale": 0.0, "reward_grad_through_model": False,
                "policy_weighting": "sigma2"},
}


def _resolve_recipe(g: GFNConfig, check, choice) -> None:
    """Fill the recipe's defaults into the unset keys and refuse the combinations a recipe does not define."""
    for key, v in RECIPE_DEFAULTS[g.recipe].items():
        if getattr(g, key) is None:
            setattr(g, key, v)
    if g.recipe == "returns":
        for key in ("reverse_scale", "terminal_scale"):
            check(getattr(g, key) == 0, f"gfn.{key}",
                  f"{getattr(g, key)} is a term of gfn.recipe=paper; gfn.recipe=returns trains the flow on gradient "
                  "returns instead (drop the key, or set gfn.recipe=paper)")
        check(0.0 <= g.return_kappa <= 1.0, "gfn.return_kappa", f"{g.return_kappa} must lie in [0, 1] (1 = Monte Carlo)")
        check(g.return_steps >= 0, "gfn.return_steps", f"{g.return_steps} must be ≥ 0 (0 = no truncation)")
        check(g.return_micro_batch >= 0, "gfn.return_micro_batch", f"{g.return_micro_batch} must be ≥ 0")
        choice("gfn.policy_target", g.policy_target, ["flow", "return"])
        check(g.policy_target == "flow" or (g.return_kappa == 1.0 and g.return_steps == 0), "gfn.policy_target",
              f"'return' regresses the policy on the stored Monte-Carlo returns, but gfn.return_kappa={g.return_kappa}"
              f" and gfn.return_steps={g.return_steps} ask for returns bootstrapped with a flow; set return_kappa=1.0 "
              "and return_steps=0, or gfn.policy_target=flow")
        check(g.reward_guidance >= 0, "gfn.reward_guidance", f"{g.reward_guidance} must be ≥ 0 (0 = off), e.g. 1.0")
        check(g.value_guidance >= 0, "gfn.value_guidance", f"{g.value_guidance} must be ≥ 0 (0 = off), e.g. 2.0")
        check(g.value_guidance == 0 or g.reward_guidance == 0, "gfn.value_guidance",
              f"{g.value_guidance} and gfn.reward_guidance={g.reward_guidance} are two fixed parts of the policy; "
              "keep one (set the other to 0)")
        check(g.value_guidance_last is None or (g.value_guidance > 0 and g.value_guidance_last >= 0),
              "gfn.value_guidance_last", f"{g.value_guidance_last!r}: the push's scale at the policy's last step must "
              f"be ≥ 0 with gfn.value_guidance > 0 (it is {g.value_guidance}), e.g. 1.0; or null for value_guidance at "
              "every step")
        if g.value_guidance > 0:
            check(g.value_trajectories >= 16, "gfn.value_trajectories",
                  f"{g.value_trajectories}: the value needs at least 16 reference trajectories (a tenth is held out)")
            for key in ("value_steps", "value_batch"):
                check(getattr(g, key) >= 1, f"gfn.{key}", f"{getattr(g, key)} must be ≥ 1")
            check(g.value_lr > 0, "gfn.value_lr", f"{g.value_lr} must be > 0, e.g. 1e-3")
            check(bool(g.value_channels) and all(isinstance(c, int) and c > 0 for c in g.value_channels),
                  "gfn.value_channels", f"{g.value_channels} must be a list of positive ints, e.g. [32, 64]")
            from fastnabla.backbones.pixel import VALUE_NETS

            choice("gfn.value_net", g.value_net, list(VALUE_NETS))
            choice("gfn.value_draw", g.value_draw, ["own", "target"])
            check(0 <= g.value_bootstrap < 1, "gfn.value_bootstrap",
                  f"{g.value_bootstrap} must lie in [0, 1) (0 = Monte-Carlo labels), e.g. 0.5")
            check(0 <= g.value_relative_floor < 1, "gfn.value_relative_floor",
                  f"{g.value_relative_floor} must lie in [0, 1) (0 = plain BCE), e.g. 0.001")
        for key, acts in (("policy_max_timestep", "≤"), ("policy_min_timestep", "≥")):
            v = getattr(g, key)
            check(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), f"gfn.{key}",
                  f"{v!r} must be an integer timestep ≥ 0 (the policy acts at timesteps {acts} it), or null for "
                  "every step")
        check(g.reward_guidance == 0 or g.reward_adaptive_mode != "off", "gfn.reward_guidance",
              f"{g.reward_guidance} is attenuated by γ of gfn.reward_adaptive_mode, which is 'off' (γ = 0): the "
              "guidance would vanish; set gfn.reward_adaptive_mode=squared, or gfn.reward_guidance=0")
        check(g.pretrained_strength == 1.0, "gfn.pretrained_strength",
              f"{g.pretrained_strength}: the gradient returns of gfn.recipe=returns carry the pretrained model's "
              "flow, which needs λ = 1; set gfn.pretrained_strength=1.0 or gfn.recipe=paper")
    else:
        for key, default in (("return_kappa", 1.0), ("return_steps", 0), ("return_micro_batch", 0),
                             ("policy_target", "flow")):
            check(getattr(g, key) == default, f"gfn.{key}",
                  f"{getattr(g, key)} configures the gradient returns of gfn.recipe=returns; drop it or set "
                  "gfn.recipe=returns")
        for key in ("reward_guidance", "value_guidance"):
            check(getattr(g, key) == 0, f"gfn.{key}",
                  f"{getattr(g, key)} guides the policy of gfn.recipe=returns; drop it or set gfn.recipe=returns")
        for key in ("policy_max_timestep", "policy_min_timestep"):
            check(getattr(g, key) is None, f"gfn.{key}",
                  f"{getattr(g, key)} restricts the policy of gfn.recipe=returns; drop it or set gfn.recipe=returns")
        check(g.policy_weighting == "none", "gfn.policy_weighting",
              f"{g.policy_weighting!r} weights the policy's share of L_F, which the paper's L_F shares with the flow; "
              "use gfn.recipe=returns, or gfn.policy_weighting=none")
