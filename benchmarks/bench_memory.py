"""Memory of the SD reward-gradient step and of the optimizer state, with and without the memory switches.

    python benchmarks/bench_memory.py            # batch 1, 512×512 images (64×64 latents), SD1.5 architectures
    python benchmarks/bench_memory.py --quick    # batch 1, 256×256: the same ratios, ~4× less compute

What is measured
----------------
1. The forward-looking reward-gradient step of the objective (ALGORITHM §3): at a state x' (latents, requires
   grad) the policy UNet with CFG (one UNet call on [uncond; cond], LoRA rank 8 on), x̂0 = a·x' + b·out, the VAE
   decode to images, a CLIP ViT-L/14 image tower + the aesthetic MLP head as the reward (fp32), and the backward to
   x'. Architectures are SD1.5's UNet and VAE and CLIP ViT-L/14's vision config at *random* weights (built from
   configs; nothing is downloaded; memory does not depend on the values). It runs through ``SDBackbone`` so the
   switches are the library's own: ``train.gradient_checkpointing`` (UNet), ``reward.vae_checkpointing``,
   ``reward.checkpointing`` (the reward tower, as ``RewardFn.run_model`` does it).
   Each configuration runs in a fresh subprocess and measures its second step (the first is a warm-up, so
   one-time allocations are not counted). On CUDA the figure is ``torch.cuda.max_memory_allocated`` during the step
   minus the allocation before it. On CPU (the allocator is invisible to tracemalloc) a thread samples the process
   RSS from /proc every millisecond during the step; the figure is the peak minus the RSS just before the step,
   after ``gc.collect()`` and glibc ``malloc_trim(0)``, with glibc's mmap threshold fixed at 128 KiB
   (``MALLOC_MMAP_THRESHOLD_``) so that every large tensor is its own mapping and freed memory leaves the RSS. It is
   the step's peak *extra* memory: activations kept for the backward, gradients, and transient workspace.
2. Optimizer-state bytes of AdamW (torch) vs AdamW8bit (bitsandbytes) for the rank-8 LoRA parameters of the SD1.5
   UNet and for the full UNet: every parameter shape gets its own optimizer, one step on a zero gradient, and
   the bytes of all state tensors are summed (exact, and never more than one parameter in memory at a time).

Writes ``benchmarks/results/memory_<device>.csv`` and ``memory_<device>.png``.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIGS = {  # name → (unet gradient checkpointing, vae checkpointing, reward checkpointing)
    "none": (False, False, False),
    "unet_ckpt": (True, False, False),
    "vae_ckpt": (False, True, False),
    "reward_ckpt": (False, False, True),
    "all_ckpt": (True, True, True),
}


# --- the SD1.5 / CLIP-L architectures at random weights ------------------------------------------------------------

def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8)


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)


class CLIPAestheticReward(torch.nn.Module):
    """CLIP ViT-L/14 image tower + the LAION aesthetic MLP, fp32, the preprocessing of the aesthetic reward."""

    def __init__(self, checkpointing: bool):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from fastnabla.rewards.aesthetic import AestheticHead

        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                               hidden_act="quick_gelu")
        self.clip = CLIPVisionModelWithProjection(cfg).eval().requires_grad_(False)
        self.head = AestheticHead(768).eval().requires_grad_(False)
        self.checkpointing = checkpointing
        self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))

    def _tower(self, px):
        e = self.clip(pixel_values=px).image_embeds
        return self.head(e / e.norm(dim=-1, keepdim=True)).squeeze(-1)

    def forward(self, images):
        px = torch.nn.functional.interpolate(images.float(), size=224, mode="bicubic", align_corners=False)
        px = (px - self.mean) / self.std
        if self.checkpointing:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._tower, px, use_reentrant=False)
        return self._tower(px)


def build_backbone(unet_ckpt: bool, vae_ckpt: bool, resolution: int, dtype: torch.dtype, device):
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastnabla.backbones.sd import SDBackbone
    from fastnabla.transitions import make_scheduler

    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                                        num_attention_heads=12))  # only its width matters: prompts are given
    sched = make_scheduler("ddim", dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                                        prediction_type="epsilon"), 50)
    bb = SDBackbone(sd15_unet(), sd15_vae(), text, None, sched, dtype=dtype, lora_rank=8, resolution=resolution,
                    gradient_checkpointing=unet_ckpt, vae_checkpointing=vae_ckpt)
    return bb.to(device)


# --- one configuration, in its own process ------------------------------------------------------------------------

class RSSPeak:
    """Peak resident set size of this process while active (sampled from /proc/self/statm)."""

    def __init__(self, period: float = 0.001):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __enter__(self):
        self.peak = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def trim_memory():
    """Free what Python and glibc hold, so a phase's RSS starts from live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PhasePeak:
    """Seconds and peak extra memory of a phase (``with PhasePeak(device) as m: …``, then ``m.seconds``,
    ``m.peak`` in bytes, ``m.method``): the CUDA allocator's peak above the allocation before it on a GPU, the
    sampled RSS peak above the RSS before it on a CPU (after ``trim_memory``)."""

    def __init__(self, device):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "rss_peak_delta"

    def __enter__(self):
        trim_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._rss = RSSPeak().__enter__()
            self.base = self._rss.peak
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._rss.__exit__(*exc)
            self.peak = self._rss.peak - self.base


def worker(name: str, resolution: int, batch: int, dtype_name: str) -> dict:
    from fastnabla.backbones.sd import DTYPES
    from fastnabla.sampling import step_coefficients

    unet_ckpt, vae_ckpt, reward_ckpt = CONFIGS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    bb = build_backbone(unet_ckpt, vae_ckpt, resolution, DTYPES[dtype_name], device)
    reward = CLIPAestheticReward(reward_ckpt).to(device)
    c = step_coefficients(bb)
    k = 10  # a mid-trajectory state
    lat = resolution // 8
    x = torch.randn(batch, 4, lat, lat, device=device)
    t = bb.scheduler.timesteps[k].to(device).expand(batch)
    cond = torch.randn(batch, 77, 768, device=device)
    bb._uncond[bb.device] = torch.randn(1, 77, 768, device=device)

    def step():
        xr = x.clone().requires_grad_(True)
        out = bb.policy(xr, t, cond)
        x0 = c.x0_coef_x[k] * xr + c.x0_coef_out[k] * out
        with torch.autocast(device_type=device.type, enabled=False):
            log_r = reward(bb.decode(x0))
        (g,) = torch.autograd.grad(log_r.sum(), xr)
        return g

    step()  # warm-up: one-time allocations (kernel caches, thread pools, lazy buffers) are not the step's memory
    with PhasePeak(device) as m:
        g = step()
    peak, method, seconds = m.peak, m.method, m.seconds
    assert torch.isfinite(g).all()
    return {"config": name, "unet_ckpt": unet_ckpt, "vae_ckpt": vae_ckpt, "reward_ckpt": reward_ckpt,
            "peak_step_mib": round(peak / 2**20, 1), "seconds": round(seconds, 2), "method": method,
            "grad_norm": float(g.norm())}


# --- optimizer state ------------------------------------------------------------------------------------------------

def optimizer_state_bytes(shapes, name: str) -> int:
    """Σ bytes of the optimizer state after one step, one parameter (shape) at a time."""
    from fastnabla.engine import build_optimizer

    total, cache = 0, {}
    for shape in shapes:
        key = tuple(shape)
        if key not in cache:
            p = torch.nn.Parameter(torch.zeros(key))
            p.grad = torch.zeros_like(p)
            opt = build_optimizer(name, [dict(params=[p], lr=1e-3, weight_decay=0.0)])
            opt.step()
            cache[key] = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                             if torch.is_tensor(v) and v.numel() > 1)
            del opt, p
        total += cache[key]
    return total


def optimizer_rows() -> list[dict]:
    from peft import LoraConfig

    unet = sd15_unet()
    full = [tuple(p.shape) for p in unet.parameters()]
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = [tuple(p.shape) for p in unet.parameters() if p.requires_grad]
    del unet
    rows = []
    try:
        import bitsandbytes  # noqa: F401
        opts = ("adamw", "adamw8bit")
    except Exception:  # the 8-bit rows need it (the GPU image has none): AdamW's alone, said so
        print("bench_memory: bitsandbytes does not import here; the adamw8bit rows are left out", file=sys.stderr)
        opts = ("adamw",)
    for what, shapes in (("lora_r8", lora), ("full_unet", full)):
        n = sum(torch.Size(s).numel() for s in shapes)
        for opt in opts:
            b = optimizer_state_bytes(shapes, opt)
            rows.append({"params": what, "num_params": n, "optimizer": opt, "state_mib": round(b / 2**20, 2),
                         "bytes_per_param": round(b / n, 3)})
    return rows


# --- driver ---------------------------------------------------------------------------------------------------------

def device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "_")
    return "cpu"


def plot(step_rows, opt_rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6))
    names = [r["config"] for r in step_rows]
    bars = ax[0].bar(names, [r["peak_step_mib"] for r in step_rows], color="tab:blue")
    ax[0].bar_label(bars, fmt="%.0f")
    ax[0].set_ylabel("peak extra memory of the step (MiB)")
    ax[0].set_title("reward-gradient step (UNet+CFG → VAE → CLIP-L)")
    ax[0].tick_params(axis="x", rotation=20)
    labels = [f"{r['params']}\n{r['optimizer']}" for r in opt_rows]
    bars = ax[1].bar(labels, [r["state_mib"] for r in opt_rows],
                     color=["tab:green" if r["optimizer"] == "adamw8bit" else "tab:orange" for r in opt_rows])
    ax[1].bar_label(bars, fmt="%.1f")
    ax[1].set_yscale("log")
    ax[1].set_ylabel("optimizer state (MiB, log)")
    ax[1].set_title("AdamW vs AdamW8bit state")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256×256 images instead of 512×512")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="frozen weights (default: bf16 on CUDA, fp32 on CPU where bf16 convolutions are slow)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    res = args.resolution or (256 if args.quick else 512)
    dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    if args.worker:
        print(json.dumps(worker(args.worker, res, args.batch, dtype)))
        return 0

    dev = device_label()
    step_rows = []
    for name in args.configs.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--resolution", str(res),
               "--batch", str(args.batch), "--dtype", dtype]
        # a fixed mmap threshold: every large tensor is its own mapping, returned to the OS when freed, so the
        # RSS follows the live tensors (glibc's adaptive threshold would keep freed blocks in the heap)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name:12s} peak {row['peak_step_mib']:10.1f} MiB  {row['seconds']:7.1f} s", flush=True)
        step_rows.append(row)
    opt_rows = optimizer_rows()
    for r in opt_rows:
        print(f"{r['params']:10s} {r['optimizer']:10s} {r['state_mib']:12.2f} MiB  {r['bytes_per_param']} B/param")

    import bitsandbytes
    import diffusers

    meta = {"device": dev, "resolution": res, "batch": args.batch, "dtype": dtype, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "bitsandbytes": bitsandbytes.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"memory_{dev}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "name", "unet_ckpt", "vae_ckpt", "reward_ckpt", "value_mib", "seconds_or_bytes_per_param",
                    "method", "device", "resolution", "batch", "dtype", "torch", "diffusers", "bitsandbytes", "git_sha",
                    "date"])
        from benchmarks.common import git_sha

        sha = git_sha()
        tail = [meta["device"], res, args.batch, dtype, meta["torch"], meta["diffusers"], meta["bitsandbytes"], sha,
                time.strftime("%Y-%m-%d")]
        for r in step_rows:
            w.writerow(["step_peak", r["config"], r["unet_ckpt"], r["vae_ckpt"], r["reward_ckpt"], r["peak_step_mib"],
                        r["seconds"], r["method"], *tail])
        for r in opt_rows:
            w.writerow(["optimizer_state", f"{r['params']}/{r['optimizer']}", "", "", "", r["state_mib"],
                        r["bytes_per_param"], f"one step, {r['num_params']} params", *tail])
    none = next((r for r in step_rows if r["config"] == "none"), None)
    allc = next((r for r in step_rows if r["config"] == "all_ckpt"), None)
    summary = []
    if none and allc and allc["peak_step_mib"] > 0:
        summary.append(f"checkpointing cuts the step's peak {none['peak_step_mib'] / allc['peak_step_mib']:.2f}×")
    for what in ("lora_r8", "full_unet"):
        a = next(r for r in opt_rows if r["params"] == what and r["optimizer"] == "adamw")
        b = next((r for r in opt_rows if r["params"] == what and r["optimizer"] == "adamw8bit"), None)
        if b is not None:
            summary.append(f"{what}: 8-bit state = {100 * b['state_mib'] / a['state_mib']:.1f}% of AdamW's")
    plot(step_rows, opt_rows, stem + ".png", f"{dev}, {res}×{res}, batch {args.batch}, {dtype} weights\n"
         + "; ".join(summary))
    print("\n".join(summary))
    print(f"wrote {stem}.csv and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
