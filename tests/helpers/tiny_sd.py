"""A tiny random Stable Diffusion pipeline saved as a local diffusers directory (no hub, no network).

UNet (8, 16) channels on 8×8 latents, a VAE with downsampling 4 (32×32 images), the tiny CLIP text encoder and
tokenizer of ``tiny_clip`` (hidden 32, context 16), SD1.5's DDIM scheduler config. Seconds to build on a CPU.
"""
from __future__ import annotations

import os

import torch

from tests.helpers.tiny_clip import make_tiny_clip_tokenizer, tiny_clip_config

CONTEXT = 16  # tokens; SD uses 77


def make_tiny_sd(directory: str, seed: int = 0) -> str:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    clip_cfg = tiny_clip_config(max_positions=CONTEXT)
    text_encoder = CLIPTextModel(clip_cfg.text_config).eval()
    tokenizer = make_tiny_clip_tokenizer(os.path.join(directory, "_tok"), model_max_length=CONTEXT)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=clip_cfg.text_config.hidden_size, norm_num_groups=8, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory
