"""What an SD update and an SD trajectory cost under the paper's recipe and under the returns recipe, flag by flag.

    python benchmarks/bench_recipes.py            # tiny SD on the CPU (the only device here): ~10 min on 2 cores
    python benchmarks/bench_recipes.py --quick    # fewer repeats

Every variant runs in its own subprocess through the library's own trainer (``build_trainer``) on a tiny random
Stable Diffusion pipeline (``tests/helpers/tiny_sd.py``, 64×64 images, 16×16 latents, CFG 5, DDIM η = 1, 20 steps,
a weight-free reward) and measures, after a warm-up:

- per sampled trajectory: seconds of the sampler (N guided policy calls) and of the method's ``prepare`` (the
  stored gradient returns: N guided reference input-VJPs), each with its peak extra memory;
- per update (4 transitions, 1 micro-batch): seconds and peak extra memory of ``Trainer.update``.

Peak extra memory on a CPU is the process RSS sampled every millisecond minus the RSS just before the phase, with
glibc's mmap threshold at 128 KiB so freed tensors leave the RSS (``bench_memory.PhasePeak``). Writes
``benchmarks/results/recipes_cpu.csv`` and ``recipes_cpu.png``; the numbers are CPU measurements of a tiny model,
never GPU claims.
"""
from __future__ import annotations

import argparse
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

#: bench_step's tiny-SD config, with the paper's trust region in every variant (as these results were recorded)
TRUST = ["gfn.trust_region_scale=1000.0"]

#: variant → (recipe family, overrides): each flag alone against its recipe's default
VARIANTS = {
    "paper": ("paper", ["gfn.recipe=paper"]),
    "paper_no_reverse": ("paper", ["gfn.recipe=paper", "gfn.reverse_scale=0"]),
    "paper_fl_not_through_model": ("paper", ["gfn.recipe=paper", "gfn.reward_grad_through_model=false"]),
    "paper_fl_off": ("paper", ["gfn.recipe=paper", "gfn.reward_adaptive_mode=off"]),
    "returns": ("returns", []),
    "returns_fl_off": ("returns", ["gfn.reward_adaptive_mode=off"]),
    "returns_fl_through_model": ("returns", ["gfn.reward_grad_through_model=true"]),
    "returns_kappa0.5_n5": ("returns", ["gfn.return_kappa=0.5", "gfn.return_steps=5"]),
}


def worker(name: str, sd_dir: str, repeats: int) -> dict:
    """bench_step's measurement of the library's update for one variant."""
    from benchmarks.bench_step import BASE, measure

    torch.set_num_threads(1)
    family, over = VARIANTS[name]
    r = measure(name, "fastnabla", over, sd_dir, repeats, base=BASE + TRUST)
    return {"variant": name, "recipe": family, "overrides": " ".join(over) or "(defaults)",
            "sample_s_per_traj": r["sample_s_per_traj"], "returns_s_per_traj": r["returns_s_per_traj"],
            "traj_s_total": round(r["sample_s_per_traj"] + r["returns_s_per_traj"], 4),
            "sample_peak_mib": r["sample_peak_mib"], "returns_peak_mib": r["returns_peak_mib"],
            "update_s": r["update_s"], "update_peak_mib": r["update_peak_mib"],
            "transitions_per_update": r["transitions_per_update"]}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    colors = ["tab:gray" if r["recipe"] == "paper" else "tab:blue" for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    y = range(len(rows))
    ax[0].barh(y, [r["sample_s_per_traj"] for r in rows], color="0.8", label="sampling")
    ax[0].barh(y, [r["returns_s_per_traj"] for r in rows], left=[r["sample_s_per_traj"] for r in rows],
               color=colors, label="stored returns")
    ax[0].set_title("seconds per sampled trajectory")
    ax[0].legend(fontsize=8)
    ax[1].barh(y, [r["update_s"] for r in rows], color=colors)
    ax[1].set_title(f"seconds per update ({rows[0]['transitions_per_update']} transitions)")
    ax[2].barh(y, [r["update_peak_mib"] for r in rows], color=colors, label="update")
    ax[2].plot([r["returns_peak_mib"] for r in rows], list(y), "k|", ms=14, label="returns (per batch)")
    ax[2].set_title("peak extra memory, MiB (RSS)")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_yticks(list(y), names if a is ax[0] else [""] * len(rows))
        a.invert_yaxis()
    fig.suptitle("tiny SD on CPU, CFG 5, 20 steps, 8 trajectories per batch (grey: paper recipe, blue: returns)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sd-dir", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.sd_dir, repeats)))
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        print(f"bench_recipes: unknown variant {unknown[0]!r}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    from benchmarks.common import git_sha, write_rows
    from tests.helpers.tiny_sd import make_tiny_sd

    sd_dir = make_tiny_sd(tempfile.mkdtemp(prefix="tiny_sd_"))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    it = tqdm(args.variants, desc="variants") if tqdm else args.variants
    for name in it:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, "--sd-dir", sd_dir,
                            "--repeats", str(repeats)], env=env, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode or line is None:
            print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"bench_recipes: variant {name} failed (exit {p.returncode})")
        rows.append(json.loads(line[7:]))
    meta = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread)",
            "torch": torch.__version__, "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d"),
            "repeats": repeats}
    for r in rows:
        r.update(meta)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "recipes_cpu.csv")
    write_rows(path, rows)
    plot(rows, os.path.join(args.out, "recipes_cpu.png"))
    cols = ("variant", "sample_s_per_traj", "returns_s_per_traj", "update_s", "returns_peak_mib", "update_peak_mib")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
