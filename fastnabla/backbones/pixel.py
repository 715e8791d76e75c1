"""A small pixel-space diffusion model (diffusers ``UNet2DModel``) as a fastnabla backbone: the digits benchmark.

State space: the image itself, x of shape (C, S, S) (C = 1 and S = 8 for the digits), pixel values scaled to
[−1, 1]. The pieces:

- policy ε_θ = the pretrained UNet with a peft LoRA adapter (``model.lora_rank``, gaussian init: A ~ N(0, 1/r),
  B = 0, so ε_θ = ε_ref at init), or the whole UNet when ``lora_rank: 0`` (full finetuning);
- reference ε_ref = the same UNet with the adapter switched off; in full-finetuning mode a frozen copy;
- class-conditional variant (``model.class_conditional``): the "prompt" is a digit ("0" … "9", or "digit 3"),
  the label ``num_classes`` is the null class, and classifier-free guidance is
  out = out_u + w·(out_c − out_u) from one UNet call on [null; c];
- flow g_φ = a small unconditional ``UNet2DModel`` (``model.flow_channels``, no attention) with conv_out zeroed,
  so g ≡ 0 at init;
- decode(x) = x/2 + 1/2: images (B, C, S, S) in [0, 1] for in-range states, fp32, differentiable, not clamped (a
  clamp would zero the reward gradient of every saturated pixel).

Everything is fp32: the model is ~0.7 M parameters.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Optional, Sequence

import torch
from torch import nn

from fastnabla.backbones.base import Backbone

__all__ = ["PixelBackbone", "PixelValueEncoder", "SCHEDULER_CONFIG", "build_unet", "build_pixel_flow_net",
           "build_pixel_value_net", "parse_class_prompt"]

#: the DDPM noise schedule the digits UNet is pretrained with (DDPM's linear schedule, T = 1000), and the
#: settings fastnabla's sampler needs (σ > 0 on the last step).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")


def _groups(channels: Sequence[int]) -> int:
    import math

    return min(8, math.gcd(*[int(c) for c in channels]))


def _levels(key: str, channels: Sequence[int], image_size: int) -> list[int]:
    """The widths of a UNet2DModel's resolution levels, checked: positive, and image_size halvable at each level."""
    ch = [int(c) for c in channels]
    if not ch or any(c <= 0 for c in ch):
        raise ValueError(f"{key}={list(channels)}: must be a non-empty list of positive ints")
    if image_size % 2 ** (len(ch) - 1):
        raise ValueError(f"{key}={ch}: image_size {image_size} must be divisible by 2^(len − 1) = "
                         f"{2 ** (len(ch) - 1)}; use fewer levels")
    return ch


def build_unet(image_size: int, channels: Sequence[int], in_channels: int = 1, num_classes: int = 0,
               layers_per_block: int = 1) -> nn.Module:
    """The denoiser: a ``UNet2DModel`` with len(channels) resolution levels, self-attention at the second level.

    ``num_classes`` > 0 adds a label embedding with num_classes + 1 rows (the last is the null label of CFG).
    ``image_size`` must be divisible by 2^(len(channels) − 1).
    """
    from diffusers import UNet2DModel

    ch = _levels("model.unet_channels", channels, image_size)
    down = ["DownBlock2D"] + ["AttnDownBlock2D"] * (len(ch) > 1) + ["DownBlock2D"] * max(len(ch) - 2, 0)
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return UNet2DModel(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=tuple(ch), layers_per_block=layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=_groups(ch),
                       attention_head_dim=8, num_class_embeds=(num_classes + 1) if num_classes else None)


def build_pixel_flow_net(image_size: int, channels: Sequence[int], in_channels: int = 1,
                         key: str = "model.flow_channels") -> nn.Module:
    """g_φ: an unconditional ``UNet2DModel`` without attention, one layer per block, conv_out zeroed (g ≡ 0).
    ``key`` names the config key of ``channels`` in errors (the value net is built the same way)."""
    from diffusers import UNet2DModel

    ch = _levels(key, channels, image_size)
    net = UNet2DModel(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                      block_out_channels=tuple(ch), layers_per_block=1,
                      down_block_types=("DownBlock2D",) * len(ch), up_block_types=("UpBlock2D",) * len(ch),
                      norm_num_groups=_groups(ch))
    nn.init.zeros_(net.conv_out.weight)
    nn.init.zeros_(net.conv_out.bias)
    return net


class PixelValueEncoder(nn.Module):
    """A scalar net of (x, t): the flow net's time embedding, input conv, down blocks and middle block, then
    GroupNorm, SiLU, a spatial mean and a zeroed linear head, output (B, 1) (0 at init, so h = 1/2).

    A value's logit is one number per state, so a UNet's up path (more than half its work at 8×8) is spent on an
    output that is averaged away (``gfn.value_net: encoder``)."""

    def __init__(self, image_size: int, channels: Sequence[int], in_channels: int = 1,
                 key: str = "gfn.value_channels"):
        super().__init__()
        unet = build_pixel_flow_net(image_size, channels, in_channels, key=key)
        self.time_proj, self.time_embedding, self.conv_in = unet.time_proj, unet.time_embedding, unet.conv_in
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        width = int(channels[-1])
        self.norm = nn.GroupNorm(_groups(channels), width)
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        h = self.mid_block(h, emb)
        return self.head(torch.nn.functional.silu(self.norm(h)).mean((2, 3)))


#: ``gfn.value_net``'s choices: the flow net's UNet (its output's mean is the logit) or ``PixelValueEncoder``
VALUE_NETS = ("unet", "encoder")


def build_pixel_value_net(image_size: int, channels: Sequence[int], in_channels: int = 1,
                          kind: str = "unet") -> nn.Module:
    """A fresh value net (``fastnabla.value``) of ``kind`` in ``VALUE_NETS``, its logit 0 at init."""
    if kind == "unet":
        return build_pixel_flow_net(image_size, channels, in_channels, key="gfn.value_channels")
    if kind == "encoder":
        return PixelValueEncoder(image_size, channels, in_channels)
    raise ValueError(f"gfn.value_net={kind!r}: use one of {', '.join(VALUE_NETS)}")


_PROMPT = re.compile(r"^\s*(?:digit\s+)?(\d+)\s*$", re.IGNORECASE)


def parse_class_prompt(prompt: str, num_classes: int) -> int:
    """"3" or "digit 3" → 3; anything else is a one-line error."""
    m = _PROMPT.match(str(prompt))
    if not m or not 0 <= int(m.group(1)) < num_classes:
        raise ValueError(f"pixel backbone: prompt {prompt!r} is not a class label; use '0' … '{num_classes - 1}' "
                         f"(or 'digit 3'), e.g. prompts.train=digits")
    return int(m.group(1))


def _tuner_layers(module: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class PixelBackbone(Backbone):
    compiled_networks = ("unet", "ref_unet", "flow_net")
    benchmark = "digits"  # fastnabla.metrics evaluates its runs against the importance-sampled digits target

    def __init__(self, unet, scheduler, *, lora_rank: int = 8, lora_alpha: Optional[float] = None,
                 lora_target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
                 guidance_scale: float = 1.0, eta: float = 1.0, flow_channels: Sequence[int] = (16, 32),
                 ref_unet=None):
        super().__init__()
        self.scheduler = scheduler
        self.eta = float(eta)
        self.guidance_scale = float(guidance_scale)
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else float(lora_rank)
        self.lora_target_modules = list(lora_target_modules)
        c, s = unet.config.in_channels, unet.config.sample_size
        self.sample_shape = (c, s, s)
        ncls = unet.config.num_class_embeds
        self.num_classes = (ncls - 1) if ncls else 0
        self.conditional = self.num_classes > 0
        unet = unet.float()
        if self.lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model

            unet.requires_grad_(False)
            self.lora_config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, init_lora_weights="gaussian",
                                          target_modules=self.lora_target_modules)
            try:
                unet = inject_adapter_in_model(self.lora_config, unet)
            except ValueError as e:
                raise ValueError(f"model.lora_target_modules={self.lora_target_modules}: {str(e).splitlines()[0]}; "
                                 "UNet2DModel has to_q/to_k/to_v/to_out.0 (attention) and conv1/conv2 "
                                 "(resnets)") from None
            self.ref_unet = None
        else:  # full finetuning: trainable UNet + a frozen copy for the reference
            if ref_unet is None:
                import copy

                ref_unet = copy.deepcopy(unet)
            self.ref_unet = ref_unet.float().requires_grad_(False).eval()
            unet.requires_grad_(True)
        self.unet = unet.eval()
        self.flow_net = build_pixel_flow_net(s, flow_channels, c)

    @classmethod
    def from_config(cls, cfg) -> "PixelBackbone":
        """Loads ``model.pretrained`` (a diffusers UNet2DModel directory, or a pipeline directory with unet/), or
        the cached pretrained digits model, pretraining it first when it is not cached (``fastnabla.digits``)."""
        from fastnabla.transitions import make_scheduler

        m = cfg.model
        path = m.pretrained
        if path is None:
            from fastnabla.digits import ensure_pretrained

            path = ensure_pretrained(cfg)
        unet = load_unet(path)
        ref = load_unet(path) if m.lora_rank == 0 else None
        sched = make_scheduler(cfg.sampling.scheduler, SCHEDULER_CONFIG, cfg.sampling.num_steps,
                               cfg.sampling.timesteps)
        return cls(unet, sched, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
                   lora_target_modules=m.lora_target_modules, guidance_scale=cfg.sampling.guidance_scale,
                   eta=cfg.sampling.eta, flow_channels=m.flow_channels, ref_unet=ref)

    # --- conditioning ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Optional[Sequence[str]]) -> Optional[torch.Tensor]:
        """Class labels (B,) long for a class-conditional model; None for an unconditional one."""
        if not self.conditional:
            return None
        if prompts is None:
            raise ValueError("the pixel backbone is class-conditional: encode() needs one class prompt per sample")
        return torch.tensor([parse_class_prompt(p, self.num_classes) for p in prompts], dtype=torch.long,
                            device=self.device)

    # --- networks -------------------------------------------------------------------------------------------------
    def _set_adapters(self, on: bool) -> None:
        for m in _tuner_layers(self.unet):
            m.enable_adapters(on)

    def reference_scope(self):
        return contextlib.nullcontext() if self.ref_unet is not None else self.adapters_off()

    def _call(self, unet, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """ε(x, t) (B, C, S, S), with CFG out_u + w·(out_c − out_u) when the model is class-conditional."""
        B = x.shape[0]
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        if not self.conditional:
            return unet(x.float(), t).sample.float()
        if cond is None:
            raise ValueError("the pixel backbone is class-conditional: pass the labels from encode(prompts)")
        w = self.guidance_scale
        if w == 1.0:
            return unet(x.float(), t, class_labels=cond).sample.float()
        null = torch.full_like(cond, self.num_classes)
        out = unet(torch.cat([x, x]).float(), torch.cat([t, t]), class_labels=torch.cat([null, cond])).sample
        out_u, out_c = out.float().chunk(2)
        return out_u + w * (out_c - out_u)

    def policy(self, x, t, cond=None):
        if self._reference_sampling:  # inside reference_sampling() (Backbone)
            return self.reference(x, t, cond)
        return self._call(self.unet, x, t, cond)

    def reference(self, x, t, cond=None):
        """The pretrained model's output; no parameter gradients, differentiable w.r.t. x when x requires grad."""
        ctx = torch.enable_grad() if (torch.is_grad_enabled() and x.requires_grad) else torch.no_grad()
        with ctx:
            if self.ref_unet is not None:
                return self._call(self.ref_unet, x, t, cond)
            with self.adapters_off():
                return self._call(self.unet, x, t, cond)

    def flow(self, x, t, cond=None):
        B = x.shape[0]
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        return self.flow_net(x.float(), t).sample.float()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """States in [−1, 1] → images x/2 + 1/2 (B, C, S, S), fp32, unclamped."""
        return x.float() / 2 + 0.5

    # --- parameters and saving ------------------------------------------------------------------------------------
    def policy_parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    def flow_parameters(self):
        return list(self.flow_net.parameters())

    def build_value_net(self, channels: Sequence[int], kind: str = "unet") -> nn.Module:
        """A fresh value net h_φ(x, t) (``fastnabla.value``) at ``channels``: ``build_pixel_value_net``."""
        return build_pixel_value_net(self.sample_shape[-1], channels, self.sample_shape[0], kind).to(self.device)

    def save_pretrained(self, directory: str) -> None:
        """LoRA mode: the adapter weights in peft's key format (``adapter_model.safetensors``) and its config
        (``adapter_config.json``); full finetuning: the UNet under ``unet/`` (diffusers). Both: ``flow_net/``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        if self.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            sd = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
            save_file(sd, os.path.join(directory, "adapter_model.safetensors"))
            conf = self.lora_config.to_dict()
            with open(os.path.join(directory, "adapter_config.json"), "w") as f:
                json.dump({k: (sorted(v) if isinstance(v, set) else v) for k, v in conf.items()}, f, indent=2,
                          default=str)
        else:
            self.unet.save_pretrained(os.path.join(directory, "unet"))
        self.flow_net.save_pretrained(os.path.join(directory, "flow_net"))


def load_unet(path: str):
    """A ``UNet2DModel`` from a diffusers model directory, or from a pipeline directory's ``unet/``."""
    from diffusers import UNet2DModel

    path = os.path.expanduser(str(path))
    sub = "unet" if os.path.isdir(os.path.join(path, "unet")) else None
    try:
        return UNet2DModel.from_pretrained(path, subfolder=sub)
    except (OSError, ValueError, EnvironmentError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.pretrained={path!r}: cannot load a UNet2DModel from it ({why[:160]}); pass a "
                         "diffusers UNet2DModel directory, or leave it unset to use (and pretrain once) the cached "
                         "digits model") from None
