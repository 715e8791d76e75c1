"""What the two recipes and the reference structure cost at SD1.5 scale: arithmetic from counted FLOPs.

    python benchmarks/sd15_arithmetic.py

No GPU is needed and nothing is timed. The SD1.5 UNet and VAE, the flow net of configs/sd15_*.yaml and a CLIP
ViT-L/14 image tower with the aesthetic head are built on the ``meta`` device (architectures only, no weights) and
torch's ``FlopCounterMode`` counts the floating-point operations of each building block at 512×512 (64×64 latents):

- ``unet``: one guided UNet call (batch 2: unconditional + conditional);
- ``unet_vjp``: the same call plus its input-VJP with frozen weights (a reverse score, a returns step, or the
  backward of a LoRA policy, whose weight gradients are negligible);
- ``reward_grad``: VAE decode + CLIP-L aesthetic reward forward and backward to the latents (batch 1);
- ``reward``: their forward only (scoring a clean sample);
- ``flow`` / ``flow_grad``: the flow net forward, and forward + backward.

It then adds them up per sampled trajectory and per trained transition, ALGORITHM §5 with N = 50 steps and
6 trained transitions per trajectory (timestep_fraction 0.1 + the terminal one), for the reference
implementation's structure, fastnabla's paper recipe and fastnabla's returns recipe with the forward-looking term
off (the SD configs' default). FLOPs are a proxy for time on a compute-bound GPU; memory traffic, kernel launches
and attention kernels are not in them. Writes ``benchmarks/results/sd15_arithmetic.json``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

N, TRAINED = 50, 6


def count_blocks() -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_memory import CLIPAestheticReward, sd15_unet, sd15_vae
    from fastnabla.backbones.sd import build_flow_net

    with torch.device("meta"):
        unet, vae, reward = sd15_unet(), sd15_vae(), CLIPAestheticReward(False)
        flow = build_flow_net(64, 4, 768, (64, 128, 256, 256))
    for m in (unet, vae, reward):
        m.requires_grad_(False)

    def tflops(fn) -> float:
        mode = FlopCounterMode(display=False)
        with mode:
            fn()
        return mode.get_total_flops() / 1e12

    def latents(b, grad):
        return torch.randn(b, 4, 64, 64, device="meta", requires_grad=grad)

    t2, c2 = torch.tensor([500, 500], device="meta"), torch.randn(2, 77, 768, device="meta")
    t1, c1 = t2[:1], torch.randn(1, 1, 768, device="meta")

    def unet_call(grad):
        x = latents(2, grad)
        out = unet(x, t2, encoder_hidden_states=c2).sample
        if grad:
            out.backward(torch.ones_like(out))

    def reward_call(grad):
        z = latents(1, grad)
        r = reward((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
        if grad:
            r.sum().backward()

    def flow_call(grad):
        out = flow(latents(1, False), t1, encoder_hidden_states=c1).sample
        if grad:
            out.backward(torch.ones_like(out))

    return {"unet": tflops(lambda: unet_call(False)), "unet_vjp": tflops(lambda: unet_call(True)),
            "reward": tflops(lambda: reward_call(False)), "reward_grad": tflops(lambda: reward_call(True)),
            "flow": tflops(lambda: flow_call(False)), "flow_grad": tflops(lambda: flow_call(True))}


def compose(b: dict) -> dict:
    """TFLOPs per trajectory (sampling, returns) and per trained transition, for each structure."""
    sampling = N * b["unet"] + b["reward"]
    per_transition = {
        # separate passes: the loss's policy forward+backward, a second policy forward for the reverse score, the
        # reward gradient at x and at x' each with its own policy forward, decode and reward backward, the
        # reference with an input gradient, the flow at x and x'
        "reference_structure": 5 * b["unet_vjp"] + 2 * b["reward_grad"] + 2 * b["flow_grad"],
        # one policy forward at x serves the loss, the reverse score and r (three backward passes through it)
        "fastnabla_paper": b["unet"] + 3 * (b["unet_vjp"] - b["unet"]) + 2 * b["reward_grad"]
        + b["unet_vjp"] + b["unet_vjp"] + 2 * b["flow_grad"],
        # policy forward+backward, reference forward, the flow at x'; r' only at the clean sample (1 in 6 rows)
        "fastnabla_returns_fl_off": b["unet_vjp"] + b["unet"] + b["flow_grad"] + b["reward_grad"] / TRAINED,
    }
    returns = {"reference_structure": 0.0, "fastnabla_paper": 0.0,
               "fastnabla_returns_fl_off": N * b["unet_vjp"] + b["reward_grad"]}
    out = {}
    for k, per in per_transition.items():
        epoch = sampling + returns[k] + TRAINED * per
        out[k] = {"sampling_tflop_per_traj": round(sampling, 2), "returns_tflop_per_traj": round(returns[k], 2),
                  "tflop_per_transition": round(per, 2), "epoch_tflop_per_traj": round(epoch, 2)}
    ref = out["reference_structure"]
    for k, v in out.items():
        v["transition_speedup_vs_reference"] = round(ref["tflop_per_transition"] / v["tflop_per_transition"], 2)
        v["epoch_speedup_vs_reference"] = round(ref["epoch_tflop_per_traj"] / v["epoch_tflop_per_traj"], 2)
    return out


def main() -> int:
    blocks = count_blocks()
    res = compose(blocks)
    from benchmarks.common import git_sha

    doc = {"what": "arithmetic from FLOPs counted by torch FlopCounterMode on meta-device SD1.5 architectures "
                   "(512×512, CFG pairs); not a timing", "N": N, "trained_transitions_per_traj": TRAINED,
           "blocks_tflop": {k: round(v, 3) for k, v in blocks.items()}, "structures": res,
           "torch": torch.__version__, "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d")}
    path = os.path.join(ROOT, "benchmarks", "results", "sd15_arithmetic.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("blocks (TFLOP):", doc["blocks_tflop"])
    for k, v in res.items():
        print(f"{k:26s}", v)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
