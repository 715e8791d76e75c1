"""Fuse a trained LoRA into a full diffusers pipeline directory.

    python -m fastnabla.export --pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --lora runs/sd15_aesthetic/final --output runs/sd15_aesthetic/fused

The result loads with ``StableDiffusionPipeline.from_pretrained(output)`` and needs neither peft nor fastnabla.
Bad input (a missing directory, no LoRA file) → one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

LORA_FILE = "pytorch_lora_weights.safetensors"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser(prog: str = "fastnabla.export") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="fuse a fastnabla LoRA into a full Stable Diffusion pipeline directory")
    p.add_argument("--pretrained", required=True, help="the base pipeline: a local diffusers directory or a hub id")
    p.add_argument("--lora", required=True, help="directory holding pytorch_lora_weights.safetensors (e.g. <run>/final)")
    p.add_argument("--output", required=True, help="where the fused pipeline is written")
    p.add_argument("--revision", default=None, help="hub revision of --pretrained")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    p.add_argument("--lora-scale", type=float, default=1.0, help="scale of the LoRA update when fusing")
    return p


def export(pretrained: str, lora: str, output: str, revision=None, dtype: str = "fp32", lora_scale: float = 1.0):
    """Load ``pretrained``, fuse the LoRA in ``lora``, save the plain pipeline to ``output``; returns ``output``."""
    from fastnabla.backbones.sd import DTYPES, _missing_model_error

    lora_file = os.path.join(lora, LORA_FILE) if os.path.isdir(lora) else lora
    if not os.path.isfile(lora_file):
        raise ValueError(f"--lora {lora}: no {LORA_FILE} there; pass the directory a run saved (<output_dir>/final)")
    looks_local = os.path.isabs(pretrained) or pretrained.startswith(".") or os.path.exists(pretrained)
    if looks_local and not os.path.isdir(pretrained):
        raise _missing_model_error(pretrained, FileNotFoundError("no such directory"))
    from diffusers import StableDiffusionPipeline  # after the cheap checks: importing it is slow and chatty

    try:
        pipe = StableDiffusionPipeline.from_pretrained(pretrained, revision=revision, torch_dtype=DTYPES[dtype],
                                                       safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise _missing_model_error(pretrained, e) from None
    pipe.load_lora_weights(os.path.dirname(lora_file) or ".", weight_name=os.path.basename(lora_file))
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()
    pipe.save_pretrained(output)
    return output


def main(argv=None, prog: str = "fastnabla.export") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        out = export(args.pretrained, args.lora, args.output, args.revision, args.dtype, args.lora_scale)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"fused pipeline written to {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
