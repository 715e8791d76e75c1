"""Stable Diffusion 1.x/2.x (diffusers) as a fastnabla backbone: UNet + LoRA (peft), frozen VAE and text encoder.

State space: the VAE latents, x of shape (4, res/8, res/8) for SD at ``model.resolution``. The pieces:

- policy  ε_θ = the UNet with a LoRA adapter on the attention projections (``model.lora_rank``, gaussian init), or
  the whole UNet in fp32 when ``lora_rank: 0`` (full finetuning);
- reference ε_ref = the same UNet with the adapter switched off (no second copy); in full-finetuning mode a frozen
  copy of the pretrained UNet in ``model.dtype``;
- both apply classifier-free guidance: one UNet call on [uncond; cond], out = out_u + w·(out_c − out_u);
- flow g_φ = a small ``UNet2DConditionModel`` (``model.flow_channels``, one layer per block, conv_out zeroed, so
  g ≡ 0 at init); its text conditioning is zeros when the reward reads no prompts;
- decode = VAE decode of x / scaling_factor → images in [0, 1], fp32, differentiable w.r.t. x.

Precision: frozen weights live in ``model.dtype`` (bf16 halves their memory); trainable parameters (LoRA, the full
UNet, the flow net) are always fp32. Inputs arrive fp32 and are cast to the weights' dtype at the network's door;
outputs go back to fp32, so gradients w.r.t. x flow through the low-precision weights and the reward always sees
fp32 images. Memory switches: ``train.gradient_checkpointing`` (UNet and flow net), ``reward.vae_checkpointing``
(each VAE decoder layer recomputed in the backward), ``reward.checkpointing`` (the reward model; handled by the
reward), ``reward.micro_batch`` (decode chunk size).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Sequence

import torch
from torch import nn

from fastnabla.backbones.base import Backbone

__all__ = ["SDBackbone", "DTYPES", "build_flow_net", "load_sd_components"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

XFORMERS_ERROR = ("model.attention=xformers: xformers needs a CUDA GPU and `pip install fastnabla[xformers]`; "
                  "use model.attention=sdpa")


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """Outputs are float32 (the trainer's dtype) whatever the weights' dtype; float64 inputs get float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _missing_model_error(pretrained: str, err: Exception) -> ValueError:
    why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(
        f"model.pretrained={pretrained!r}: cannot load a Stable Diffusion pipeline from it ({why[:160]}); pass a "
        "local diffusers directory (with unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id such as "
        "stable-diffusion-v1-5/stable-diffusion-v1-5 with network access")


def load_sd_components(pretrained: str, revision: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """(unet, vae, text_encoder, tokenizer, scheduler_config) of a diffusers SD pipeline; a missing or broken model
    raises a one-line ValueError that says how to provide one."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError("model.pretrained must be set for model.backbone=sd: a local diffusers directory or a hub id")
    looks_local = os.path.isabs(pretrained) or pretrained.startswith(".") or os.path.exists(pretrained)
    if looks_local and not os.path.isdir(pretrained):
        raise _missing_model_error(pretrained, FileNotFoundError("no such directory"))
    kw = dict(revision=revision)
    try:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=dtype, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
        sched_cfg = DDIMScheduler.load_config(pretrained, subfolder="scheduler", **kw)
    except (OSError, ValueError, EnvironmentError) as e:  # includes the hub's "offline"/"not found" errors
        raise _missing_model_error(pretrained, e) from None
    return unet, vae, text_encoder, tokenizer, sched_cfg


def build_flow_net(sample_size: int, channels: int, cross_attention_dim: int, block_out_channels: Sequence[int]):
    """g_φ: a UNet2DConditionModel with one layer per block and a zero-initialised conv_out (g ≡ 0 at init)."""
    from diffusers import UNet2DConditionModel

    ch = [int(c) for c in block_out_channels]
    if not ch or any(c <= 0 for c in ch):
        raise ValueError(f"model.flow_channels={list(block_out_channels)}: must be a non-empty list of positive ints")
    n = len(ch)
    groups = min(32, math.gcd(*ch))  # GroupNorm needs every width divisible by the group count
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"] if n > 1 else ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1) if n > 1 else ["UpBlock2D"]
    net = UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=tuple(ch),
        layers_per_block=1, down_block_types=tuple(down), up_block_types=tuple(up),
        cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
        attention_head_dim=max(1, min(8, ch[0] // 8)),
    )
    nn.init.zeros_(net.conv_out.weight)
    nn.init.zeros_(net.conv_out.bias)
    return net


def _checkpoint_decoder_layers(decoder) -> None:
    """Layer-level activation checkpointing of a VAE decoder: each resnet, attention and upsampler of the mid and
    up blocks keeps only its input and is recomputed on its own in the backward.

    diffusers' block-level switch recomputes a whole up-block at once; at 512×512 the last block's three fp32
    resnets re-materialise ~1 GB each together, which is most of what is left of the step's peak.
    """
    from torch.utils.checkpoint import checkpoint

    layers = [m for m in list(decoder.mid_block.resnets) + list(decoder.mid_block.attentions or []) if m is not None]
    for block in decoder.up_blocks:
        layers += list(block.resnets) + list(block.upsamplers or [])

    for layer in layers:
        plain = layer.forward

        def forward(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        layer.forward = forward


class SDBackbone(Backbone):
    compiled_networks = ("unet", "ref_unet", "flow_net", "vae.decoder")
    conditional = True

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, dtype: torch.dtype = torch.float32,
                 lora_rank: int = 8, lora_alpha: Optional[float] = None,
                 lora_target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
                 guidance_scale: float = 5.0, eta: float = 1.0, resolution: int = 512,
                 flow_channels: Sequence[int] = (64, 128, 256, 256), flow_text_conditioning: bool = False,
                 gradient_checkpointing: bool = False, vae_checkpointing: bool = False, decode_micro_batch: int = 0,
                 attention: str = "sdpa", ref_unet=None):
        super().__init__()
        self.dtype = dtype
        self.scheduler = scheduler
        self.eta = float(eta)
        self.guidance_scale = float(guidance_scale)
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else float(lora_rank)
        self.lora_target_modules = list(lora_target_modules)
        self.vae_checkpointing = bool(vae_checkpointing)
        self.decode_micro_batch = int(decode_micro_batch)
        self.flow_text_conditioning = bool(flow_text_conditioning)
        self.tokenizer = tokenizer

        self.vae = _cast(vae, dtype).requires_grad_(False).eval()
        self.text_encoder = _cast(text_encoder, dtype).requires_grad_(False).eval()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % self.vae_scale_factor:
            raise ValueError(f"model.resolution={resolution} must be a multiple of the VAE's downsampling factor "
                             f"{self.vae_scale_factor}")
        latent = resolution // self.vae_scale_factor
        self.sample_shape = (unet.config.in_channels, latent, latent)

        if self.lora_rank > 0:
            from peft import LoraConfig

            unet = _cast(unet, dtype).requires_grad_(False)
            unet.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, init_lora_weights="gaussian",
                                        target_modules=self.lora_target_modules))
            for p in unet.parameters():  # the adapter is created in the base dtype: trainables are fp32
                if p.requires_grad:
                    p.data = p.data.float()
            self.ref_unet = None
        else:  # full finetuning: trainable fp32 UNet + a frozen copy (model.dtype) for the reference
            if ref_unet is None:
                import copy

                ref_unet = copy.deepcopy(unet)
            self.ref_unet = _cast(ref_unet, dtype).requires_grad_(False).eval()
            unet = _cast(unet, torch.float32).requires_grad_(True)
        self.unet = unet.eval()  # no dropout in SD's UNet; eval keeps it that way for custom configs too

        self.flow_net = build_flow_net(latent, unet.config.in_channels, text_encoder.config.hidden_size, flow_channels)

        if attention == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ValueError(XFORMERS_ERROR) from None
            if not torch.cuda.is_available():
                raise ValueError(XFORMERS_ERROR)
            for m in (self.unet, self.ref_unet, self.vae, self.flow_net):
                if m is not None:
                    m.enable_xformers_memory_efficient_attention()
        elif attention != "sdpa":
            raise ValueError(f"model.attention={attention!r}: must be sdpa or xformers")
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.flow_net.enable_gradient_checkpointing()
        if self.vae_checkpointing:
            _checkpoint_decoder_layers(self.vae.decoder)
        self._uncond: dict = {}

    @classmethod
    def from_config(cls, cfg, reward=None) -> "SDBackbone":
        """Build from ``cfg``; with ``model.flow_text_conditioning`` unset, the flow net sees the prompt embedding
        iff ``reward.needs_prompts`` (a prompt-reading reward such as PickScore makes the residual flow depend on
        the prompt)."""
        from fastnabla.transitions import make_scheduler

        m = cfg.model
        dtype = DTYPES[m.dtype]
        if m.attention == "xformers" and not torch.cuda.is_available():
            raise ValueError(XFORMERS_ERROR)  # before loading gigabytes
        unet, vae, text_encoder, tokenizer, sched_cfg = load_sd_components(m.pretrained, m.revision, dtype)
        ref_unet = None
        if m.lora_rank == 0:  # full finetuning: the loaded UNet (model.dtype) is the frozen reference; the
            ref_unet = unet  # trainable one is loaded again in fp32 (not up-cast from bf16, which would round it)
            unet = _load_unet(m.pretrained, m.revision, torch.float32)
        base = dict(sched_cfg)
        # σ > 0 on every step: the last step must not jump to ᾱ = 1 (SD's own config already says so)
        base["set_alpha_to_one"] = False
        base.setdefault("steps_offset", 1)
        scheduler = make_scheduler(cfg.sampling.scheduler, base, cfg.sampling.num_steps, cfg.sampling.timesteps)
        text_cond = m.flow_text_conditioning
        if text_cond is None:
            text_cond = bool(getattr(reward, "needs_prompts", False))
        return cls(unet, vae, text_encoder, tokenizer, scheduler, dtype=dtype, lora_rank=m.lora_rank,
                   lora_alpha=m.lora_alpha, lora_target_modules=m.lora_target_modules,
                   guidance_scale=cfg.sampling.guidance_scale, eta=cfg.sampling.eta, resolution=m.resolution,
                   flow_channels=m.flow_channels, flow_text_conditioning=text_cond,
                   gradient_checkpointing=cfg.train.gradient_checkpointing,
                   vae_checkpointing=cfg.reward.vae_checkpointing, decode_micro_batch=cfg.reward.micro_batch,
                   attention=m.attention, ref_unet=ref_unet)

    # --- conditioning ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings (B, L, D), float32 (the text encoder's last hidden state, as SD conditions on)."""
        if prompts is None:
            raise ValueError("the SD backbone is conditional: encode() needs a list of prompts")
        return self._embed(prompts)

    def uncond_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding (1, L, D), computed once per device."""
        dev = self.device
        if dev not in self._uncond:
            self._uncond[dev] = self._embed([""])
        return self._uncond[dev]

    # --- networks -------------------------------------------------------------------------------------------------
    def _set_adapters(self, on: bool) -> None:
        self.unet.enable_adapters() if on else self.unet.disable_adapters()

    def reference_scope(self):
        return contextlib.nullcontext() if self.ref_unet is not None else self.adapters_off()

    def _cfg_call(self, unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """out_u + w·(out_c − out_u) from one UNet call on [uncond; cond]; fp32 in, fp32 out (fp64 for fp64 x, for
        float64 tests of a float64 model)."""
        if cond is None:
            raise ValueError("the SD backbone is conditional: pass the embeddings from encode(prompts)")
        B = x.shape[0]
        wdt, odt = unet.dtype, _out_dtype(x)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        w = self.guidance_scale
        if w == 1.0:  # guidance off: the conditional output alone
            return unet(x.to(wdt), t, encoder_hidden_states=cond.to(wdt)).sample.to(odt)
        unc = self.uncond_embedding().to(wdt).expand(B, -1, -1)
        out = unet(torch.cat([x, x]).to(wdt), torch.cat([t, t]), encoder_hidden_states=torch.cat([unc, cond.to(wdt)]))
        out_u, out_c = out.sample.to(odt).chunk(2)
        return out_u + w * (out_c - out_u)

    def policy(self, x, t, cond):
        if self._reference_sampling:  # inside reference_sampling() (Backbone)
            return self.reference(x, t, cond)
        return self._cfg_call(self.unet, x, t, cond)

    def reference(self, x, t, cond):
        """The pretrained model's CFG output. Never builds parameter gradients; differentiable w.r.t. x when x
        requires grad (the reverse score needs ∂μ_ref/∂x)."""
        ctx = torch.enable_grad() if (torch.is_grad_enabled() and x.requires_grad) else torch.no_grad()
        with ctx:
            if self.ref_unet is not None:
                return self._cfg_call(self.ref_unet, x, t, cond)
            with self.adapters_off():
                return self._cfg_call(self.unet, x, t, cond)

    def flow(self, x, t, cond):
        B = x.shape[0]
        D = self.text_encoder.config.hidden_size
        if self.flow_text_conditioning and cond is not None:
            ehs = cond.float()
        else:  # prompt-free reward: the flow must not depend on the prompt
            ehs = x.new_zeros((B, 1, D))
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        odt = _out_dtype(x)
        wdt = next(self.flow_net.parameters()).dtype
        return self.flow_net(x.to(wdt), t, encoder_hidden_states=ehs.to(wdt)).sample.to(odt)

    def _decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (img.to(_out_dtype(z)) / 2 + 0.5).clamp(0, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) → images (B, 3, H, W) in [0, 1], float32, in micro-batches of ``reward.micro_batch``
        (with ``reward.vae_checkpointing`` each decoder layer is recomputed in the backward)."""
        mb = self.decode_micro_batch or x.shape[0]
        return torch.cat([self._decode_chunk(x[s:s + mb]) for s in range(0, x.shape[0], mb)])

    # --- parameters and saving ------------------------------------------------------------------------------------
    def policy_parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    def flow_parameters(self):
        return list(self.flow_net.parameters())

    def lora_state_dict(self) -> dict:
        """The policy LoRA in diffusers' key format (what ``load_lora_weights`` reads)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))

    def save_pretrained(self, directory: str) -> None:
        """LoRA mode: ``pytorch_lora_weights.safetensors`` (diffusers format; ``pipe.load_lora_weights(directory)``).
        Full finetuning: the UNet under ``unet/``. Both: the flow net under ``flow_net/``."""
        from diffusers import StableDiffusionPipeline

        os.makedirs(directory, exist_ok=True)
        if self.lora_rank > 0:
            layers = {k: v.detach().float().cpu().contiguous() for k, v in self.lora_state_dict().items()}
            # the adapter config rides along as safetensors metadata, so lora_alpha ≠ rank survives the load
            meta = next(iter(self.unet.peft_config.values())).to_dict()
            StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True,
                                                      unet_lora_adapter_metadata=meta)
        else:
            self.unet.save_pretrained(os.path.join(directory, "unet"))
        self.flow_net.save_pretrained(os.path.join(directory, "flow_net"))


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` unless it is already there (diffusers warns on every ``.to(dtype)`` of a model)."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    return module.to(dtype)


def _load_unet(pretrained: str, revision: Optional[str], dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=dtype, revision=revision)
