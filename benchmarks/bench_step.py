"""The training step and the epoch per trajectory: fastnabla against the reference implementation's structure.

    python benchmarks/bench_step.py --quick      # tiny SD on the CPU (random weights, 64×64 images): ~10 min
    python benchmarks/bench_step.py --sd15       # on a GPU: SD1.5-shaped UNet/VAE at random weights, 512×512

Two units, as users count them:

- **per update**: transitions/s of one optimizer update (4 transitions, one micro-batch) and its peak extra memory;
- **per trajectory**: seconds of one sampled trajectory (the N-step guided sampler), of its stored gradient returns
  (the returns recipe), and the epoch per trajectory = sampling + returns + its share of training
  (trained transitions per trajectory / transitions per update × seconds per update).

The *reference structure* is ALGORITHM §5 written the way the reference implementation runs it, here in the
benchmark and nowhere in the library: per transition a policy forward at x for the loss, a second policy forward at
x for the reverse score and the reward gradient at x, a separate policy forward at x' for the forward-looking
reward gradient, two separate VAE decodes and fp32 reward backward passes (at x and at x'), the reference forward
with an input gradient for its reverse score, no checkpointing, and the eager PyTorch loss. fastnabla's rows run
the library's own ``Trainer.update`` for the paper's recipe and for the returns recipe (the SD configs' default:
forward-looking term off), with each memory/speed flag alone and combined: ``train.gradient_checkpointing``,
``reward.vae_checkpointing``, ``train.optimizer=adamw8bit`` (when bitsandbytes imports), ``train.compile``
(torch.compile of the UNet, flow net and VAE decoder; ``warmup_s`` holds the first sampling, returns and update,
where the compilation is paid). ``fastnabla_returns_target`` is the returns recipe with ``gfn.policy_target:
return`` (the policy regresses on the stored returns; no flow net runs).
The fused Triton loss runs only on a GPU (on a CPU it would be the interpreter): not measured here rather than
guessed.

Each row runs in its own subprocess. Peak extra memory: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the
RSS sampled every millisecond minus the RSS before the phase (``bench_memory.PhasePeak``, glibc mmap threshold
128 KiB). Writes ``benchmarks/results/step_<device>.csv`` and ``.png`` with device, versions, git sha and date.
CPU figures are CPU figures of a tiny model: never GPU claims.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BASE = [
    "model.backbone=sd", "model.resolution=64", "model.flow_channels=[16,32]", "model.dtype=fp32",
    "reward.name=brightness", "sampling.num_steps=20", "sampling.batch_size=8", "sampling.guidance_scale=5.0",
    "gfn.timestep_fraction=0.1", "gfn.reward_scale=100.0", "train.batch_size=4",
    "train.gradient_accumulation_steps=1", "eval.every=0", "checkpoint.every=0", "logging.progress=false",
    "logging.plots=false",
]
PAPER = ["gfn.recipe=paper", "gfn.trust_region_scale=1000.0"]  # the paper's objective as the SD configs had it
RETURNS = ["gfn.recipe=returns", "gfn.reward_adaptive_mode=off", "gfn.trust_region_scale=0.0"]  # the SD default
RETURNS_TARGET = [*RETURNS, "gfn.policy_target=return"]  # the policy regresses on the stored returns: no flow
FLAGS = {"unet_ckpt": ["train.gradient_checkpointing=true"], "vae_ckpt": ["reward.vae_checkpointing=true"],
         "8bit": ["train.optimizer=adamw8bit"], "compile": ["train.compile=true"]}


def _rows():
    rows = {"reference_structure": ("reference", PAPER)}
    for recipe, over in (("paper", PAPER), ("returns", RETURNS)):
        rows[f"fastnabla_{recipe}"] = ("fastnabla", over)
        for flag, f_over in FLAGS.items():
            rows[f"fastnabla_{recipe}+{flag}"] = ("fastnabla", over + f_over)
        rows[f"fastnabla_{recipe}+all"] = ("fastnabla", over + sum(FLAGS.values(), []))
    rows["fastnabla_returns_target"] = ("fastnabla", RETURNS_TARGET)
    return rows


ROWS = _rows()


#: SD1.5 shapes at random weights (--sd15, for a GPU): 512×512, 50 steps, 4 trajectories per batch
SD15 = ["model.resolution=512", "model.flow_channels=[64,128,256,256]", "model.dtype=bf16", "sampling.num_steps=50",
        "sampling.batch_size=4", "train.gradient_checkpointing=false"]


def make_sd15_shaped(directory: str) -> str:
    """An SD1.5-shaped pipeline at random weights (SD1.5's UNet and VAE configs, a one-layer 768-wide text encoder:
    only its width matters), saved as a local diffusers directory."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.bench_memory import sd15_unet, sd15_vae
    from tests.helpers.tiny_clip import make_tiny_clip_tokenizer

    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                                        num_attention_heads=12, max_position_embeddings=77))
    tok = make_tiny_clip_tokenizer(os.path.join(directory, "_tok"), model_max_length=77)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=sd15_vae(), text_encoder=text, tokenizer=tok, unet=sd15_unet(), scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(directory)
    return directory


def reference_step(tr, batch) -> torch.Tensor:
    """ALGORITHM §5's step in the reference implementation's structure (separate passes; see the module docstring).

    Returns loss_b; the caller backpropagates and steps the same optimizer as fastnabla's rows."""
    from fastnabla.loss import residual_db_loss_reference, validate_loss_inputs

    bb, reward, c, g = tr.backbone, tr.reward_fn, tr.coeffs, tr.cfg.gfn
    N, ts = c.coef_x.numel(), bb.scheduler.timesteps.to(bb.device)
    k, cond, prompts = batch.k, batch.cond, batch.prompts
    coef = c[k]
    terminal = k == N - 1
    beta = g.reward_scale

    def reward_grad_at(x, j):  # its own policy forward, decode and fp32 reward backward, through the model
        x = x.detach().requires_grad_(True)
        jj = j.clamp(max=N - 1)
        out = bb.policy(x, ts[jj], cond)
        x0 = torch.where((j >= N).view(-1, *[1] * (x.dim() - 1)), x, c[jj].pred_x0(x, out))
        log_r, _ = reward(bb.decode(x0).float(), prompts, None)
        (grad,) = torch.autograd.grad(log_r.sum(), x)
        a = c.alpha_prod[jj]
        gamma = torch.where(j >= N, torch.ones_like(a), a)
        return beta * gamma.view(-1, *[1] * (x.dim() - 1)) * grad

    r_next = reward_grad_at(batch.x_next, k + 1)
    r_cur = reward_grad_at(batch.x, k)
    out = bb.policy(batch.x, ts[k], cond)  # the loss's forward
    x2 = batch.x.detach().requires_grad_(True)  # a second policy forward for the reverse score
    s_rev = coef.reverse_score(x2, coef.mean(x2, bb.policy(x2, ts[k], cond)), batch.x_next)
    x3 = batch.x.detach().requires_grad_(True)
    out_ref_g = bb.reference(x3, ts[k], cond)
    s_rev_ref = coef.reverse_score(x3, coef.mean(x3, out_ref_g), batch.x_next)
    t_next = torch.where(terminal, torch.zeros_like(k), ts[(k + 1).clamp(max=N - 1)])
    flow_next = bb.flow(batch.x_next, t_next, cond)
    flow_cur = bb.flow(batch.x, ts[k], cond)
    p = validate_loss_inputs(out, out_ref_g.detach(), coef_out=coef.coef_out, inv_var=coef.inv_var,
                             reward_grad_next=r_next, flow_next=flow_next, terminal=terminal,
                             out_old=batch.out_old, trust_region_scale=g.trust_region_scale, reverse_scale=1.0,
                             score_rev=s_rev, score_rev_ref=s_rev_ref, flow_cur=flow_cur, reward_grad_cur=r_cur,
                             terminal_scale=1.0)
    return residual_db_loss_reference(p)


def worker(name: str, sd_dir: str, repeats: int, sd15: bool = False) -> dict:
    kind, over = ROWS[name]
    return measure(name, kind, over, sd_dir, repeats, sd15)


def measure(name: str, kind: str, over: list, sd_dir: str, repeats: int, sd15: bool = False,
            base: list = BASE) -> dict:
    """One row: ``kind`` "fastnabla" (the library's update) or "reference" (``reference_step``), config ``base``
    plus ``over``. Sampling, stored returns and updates timed, with their peak extra memory."""
    from benchmarks.bench_memory import PhasePeak
    from fastnabla.config import load_config
    from fastnabla.sampling import sample_trajectories
    from fastnabla.trainer import build_trainer

    if "train.optimizer=adamw8bit" in over:
        try:
            import bitsandbytes  # noqa: F401
        except Exception:
            return {"row": name, "skipped": "bitsandbytes does not import here"}
    out_dir = tempfile.mkdtemp(prefix="bench_step_")
    cfg = load_config(None, base + (SD15 if sd15 else []) + [f"model.pretrained={sd_dir}"] + over,
                      output_dir=out_dir)
    tr = build_trainer(cfg)
    dev = tr.device
    n = cfg.sampling.batch_size

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return sample_trajectories(tr.backbone, n, g, tr.coeffs, tr.prompts.sample(n, g), tr.reward_fn)

    t0 = time.perf_counter()
    traj = tr.method.prepare(draw(0))  # warm-up (with train.compile: the compilation)
    t_s = t_r = 0.0
    m_s = m_r = 0
    for r in range(repeats):
        with PhasePeak(dev) as m:
            traj = draw(r + 1)
        t_s, m_s = t_s + m.seconds, max(m_s, m.peak)
        if kind == "fastnabla":
            with PhasePeak(dev) as m:
                traj = tr.method.prepare(traj)
            t_r, m_r = t_r + m.seconds, max(m_r, m.peak)
    updates = tr.plan(1, len(traj))
    micro_per_update = updates[1]
    per_update = int(sum(i.shape[0] for i in micro_per_update))

    def one_update(micro):
        if kind == "fastnabla":
            info = tr.update(traj, micro)
            assert not info["skipped"]
            return
        tr.engine.begin_update(len(micro))
        total = sum(int(i.shape[0]) for i in micro)
        for idx in micro:
            loss_b = reference_step(tr, tr.method.gather(traj, idx, dev))
            tr.engine.backward(loss_b.sum() / total)
        tr.engine.step()

    one_update(updates[0])  # warm-up
    warmup_s = time.perf_counter() - t0
    t_u, m_u, count = 0.0, 0, 0
    for micro in (updates[1:] * repeats)[: max(2 * repeats, 2)]:
        with PhasePeak(dev) as m:
            one_update(micro)
        t_u, m_u, count = t_u + m.seconds, max(m_u, m.peak), count + 1
    per_traj_transitions = sum(int(i.shape[0]) for u in updates for i in u) / len(traj)
    sample_s, returns_s, update_s = t_s / (repeats * n), t_r / (repeats * n), t_u / count
    return {"row": name, "kind": kind, "overrides": " ".join(over), "transitions_per_update": per_update,
            "update_s": round(update_s, 4), "transitions_per_s": round(per_update / update_s, 3),
            "update_peak_mib": round(m_u / 2**20, 1), "sample_s_per_traj": round(sample_s, 4),
            "returns_s_per_traj": round(returns_s, 4), "returns_peak_mib": round(m_r / 2**20, 1),
            "sample_peak_mib": round(m_s / 2**20, 1), "warmup_s": round(warmup_s, 2),
            "epoch_s_per_traj": round(sample_s + returns_s + per_traj_transitions / per_update * update_s, 4)}


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "skipped" not in r]
    names = [r["row"] for r in rows]
    colors = ["tab:red" if r["kind"] == "reference" else ("tab:gray" if "paper" in r["row"] else "tab:blue")
              for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(17, 0.45 * len(rows) + 2))
    y = list(range(len(rows)))
    for a, key, t in ((ax[0], "transitions_per_s", "training: transitions/s (higher is better)"),
                      (ax[1], "update_peak_mib", "training: peak extra memory per update, MiB"),
                      (ax[2], "epoch_s_per_traj", "epoch per trajectory, s (sampling + returns + training)")):
        a.barh(y, [r[key] for r in rows], color=colors)
        a.set_title(t, fontsize=10)
        a.set_yticks(y, names if a is ax[0] else [""] * len(rows))
        a.invert_yaxis()
    fig.suptitle(title + "   (red: reference structure, grey: fastnabla paper recipe, blue: fastnabla returns)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat")
    ap.add_argument("--sd15", action="store_true", help="SD1.5-shaped random weights at 512×512 (a GPU's job)")
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--tag", default="", help="results file suffix (e.g. for a --rows subset)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sd-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.worker:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        print("RESULT " + json.dumps(worker(args.worker, args.sd_dir, repeats, args.sd15)))
        return 0
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        print(f"bench_step: unknown row {bad[0]!r}; valid: {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if "reference_structure" not in args.rows:
        print("bench_step: --rows must include reference_structure (every ratio is taken against it)", file=sys.stderr)
        return 2
    if args.sd15:
        sd_dir = make_sd15_shaped(tempfile.mkdtemp(prefix="sd15_shaped_"))
    else:
        from tests.helpers.tiny_sd import make_tiny_sd

        sd_dir = make_tiny_sd(tempfile.mkdtemp(prefix="tiny_sd_"))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=os.environ.get("BENCH_THREADS", "1"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    from tqdm.auto import tqdm

    rows = []
    for name in tqdm(args.rows, desc="rows"):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, "--sd-dir", sd_dir,
                            "--repeats", str(repeats)] + (["--sd15"] if args.sd15 else []),
                           env=env, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode or line is None:  # reported in the results (and here), the other rows still run
            print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
            last = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
            rows.append({"row": name, "skipped": f"failed (exit {p.returncode}): {last}"})
            continue
        rows.append(json.loads(line[7:]))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    from benchmarks.common import git_sha
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else
            f"cpu ({platform.machine()}, {os.cpu_count()} cores, {env['OMP_NUM_THREADS']} thread)",
            "torch": torch.__version__, "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d"), "repeats": repeats,
            "model": "SD1.5-shaped, random weights, 512×512, 50 steps, CFG 5, bf16" if args.sd15 else
            "tiny SD (tests/helpers/tiny_sd.py), 64×64, 20 steps, CFG 5"}
    ref = next(r for r in rows if r["row"] == "reference_structure")
    if "skipped" in ref:
        raise SystemExit(f"bench_step: the reference_structure row failed, so no ratio can be taken: {ref['skipped']}")
    for r in rows:
        if "skipped" not in r:
            r["speedup_vs_reference"] = round(r["transitions_per_s"] / ref["transitions_per_s"], 3)
            r["memory_vs_reference"] = round(r["update_peak_mib"] / max(ref["update_peak_mib"], 1e-9), 3)
            r["epoch_speedup_vs_reference"] = round(ref["epoch_s_per_traj"] / r["epoch_s_per_traj"], 3)
        r.update(meta)
    os.makedirs(args.out, exist_ok=True)
    tag = dev + ("_sd15" if args.sd15 else "") + args.tag
    path = os.path.join(args.out, f"step_{tag}.csv")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(args.out, f"step_{tag}.png"), f"{meta['model']} on {meta['device']}")
    for r in rows:
        print(r["row"], {k: r.get(k) for k in ("transitions_per_s", "update_peak_mib", "epoch_s_per_traj",
                                                 "speedup_vs_reference", "memory_vs_reference", "skipped")})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
