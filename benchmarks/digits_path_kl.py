"""How far each finished digits run moved its sampler from the reference, step by step, against what the target needs.

    python benchmarks/digits_path_kl.py runs/digits_sweep/c3b05_shipped runs/digits_sweep/c3b05_from701 --tag _s23

For the tilted target p* = p_ref·R^β/Z the path measure is P* = P_ref·R(x_N)^β/Z, so the least path KL any exact
sampler of p* spends is KL(P*‖P_ref) = β·E*[log R] − log Z (``metrics.tilt_kl`` on the run's importance-sampling
draw). A run's policy spends KL(P_θ‖P_ref) = Σ_k E_θ‖μ_θ − μ_ref‖²/(2σ_k²) (``metrics.path_kl``: the reference's
output at the policy's own sampled states, no step noise in the estimate). The two meet in the evidence bound

    KL(P_θ‖P*) = log Z − β·E_θ[log R] + KL(P_θ‖P_ref) ≥ 0,

zero only for the exact sampler. It bounds KL(p_θ(x_N)‖p*(x_N)) from above, so it sees what the class histogram
misses (confident wrong digits, over-sharpening) in one number. The pretrained model's own value is
KL(P_ref‖P*) = log Z − β·E_ref[log R].

Writes ``benchmarks/results/digits_path_kl<tag>.csv`` (per run: one row per step, then a ``total`` row) and a
``.png`` of the per-step KL.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@torch.no_grad()
def path_kl_of(tr, n: int, seed: int = 20_000) -> dict:
    """The trainer ``tr``'s policy: n trajectories from its sampler at ``seed`` (the run's method's reference steps
    included); per-step KL to the reference, mean β·log R of the samples, and the target's log Z and KL from the run's
    importance-sampling draw. Returns {"steps": [(timestep, σ, kl)], "kl_path", "beta_log_r", "log_z",
    "kl_target", "elbo_gap", "ref_elbo_gap"}."""
    from fastnabla import metrics
    from fastnabla.sampling import sample_trajectories

    bb, m, beta = tr.backbone, tr.method, float(tr.cfg.gfn.reward_scale)
    target = metrics._digits_state(tr.eval_ctx)["target"]
    if target is None:
        raise ValueError("the run has no importance-sampled target (eval.ground_truth_samples = 0)")
    g = torch.Generator().manual_seed(seed)
    t = sample_trajectories(bb, n, g, tr.coeffs, None, tr.reward_fn, guide=m.guide, policy_from=m.policy_from,
                            policy_to=m.policy_to)
    ts = bb.scheduler.timesteps.to(t.xs.device)
    N = ts.numel()
    outs_ref = torch.stack([bb.reference(t.xs[:, k], ts[k].expand(n), None).to(t.outs.dtype) for k in range(N)], 1)
    kl = metrics.path_kl(tr.coeffs.coef_out, tr.coeffs.std, t.outs, outs_ref).mean(0)
    # the pretrained model's E_ref[β log R] at the same seed, for its own evidence-bound gap
    with bb.reference_sampling():
        ref = sample_trajectories(bb, n, torch.Generator().manual_seed(seed), tr.coeffs, None, tr.reward_fn,
                                  keep_trajectory=False)
    blr, ref_blr = beta * float(t.log_reward.mean()), beta * float(ref.log_reward.mean())
    log_z = target["log_z"]
    return dict(steps=[(int(ts[k]), float(tr.coeffs.std[k]), float(kl[k])) for k in range(N)],
                kl_path=float(kl.sum()), beta_log_r=blr, log_z=log_z, kl_target=target["kl_to_reference"],
                elbo_gap=log_z - blr + float(kl.sum()), ref_elbo_gap=log_z - ref_blr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished digits run directories (config.yaml, checkpoints/)")
    ap.add_argument("--num-samples", type=int, default=512, help="trajectories per run")
    ap.add_argument("--tag", default="", help="results file suffix")
    a = ap.parse_args(argv)
    if a.num_samples < 2:
        ap.error("--num-samples must be ≥ 2")
    sys.path.insert(0, ROOT)
    import tempfile

    from benchmarks.common import git_sha, load_finished_run, write_rows

    rows, curves = [], {}
    sha, date = git_sha(), datetime.date.today().isoformat()
    for run in a.runs:
        t0 = time.time()
        name = os.path.basename(os.path.normpath(run))
        with tempfile.TemporaryDirectory() as scratch:
            tr, cfg, last = load_finished_run(run, ["logging.progress=false", "logging.plots=false"], scratch,
                                              ap.error)
            if tr.backbone.benchmark != "digits":
                ap.error(f"{run}: not a digits run (model.backbone={cfg.model.backbone})")
            try:
                r = path_kl_of(tr, a.num_samples)
            except ValueError as e:
                ap.error(f"{run}: {e}")
        common = dict(run=name, checkpoint=os.path.basename(last), num_samples=a.num_samples, git_sha=sha, date=date)
        for k, (t, std, kl) in enumerate(r["steps"]):
            rows.append(dict(common, step=k, timestep=t, sigma=round(std, 5), kl=round(kl, 4), beta_log_r="",
                             log_z="", kl_target="", elbo_gap="", ref_elbo_gap="", seconds=""))
        rows.append(dict(common, step="total", timestep="", sigma="", kl=round(r["kl_path"], 4),
                         beta_log_r=round(r["beta_log_r"], 4), log_z=round(r["log_z"], 4),
                         kl_target=round(r["kl_target"], 4), elbo_gap=round(r["elbo_gap"], 4),
                         ref_elbo_gap=round(r["ref_elbo_gap"], 4), seconds=round(time.time() - t0, 1)))
        curves[name] = r
        print(f"{name}: path KL to the reference {r['kl_path']:.2f} nats (the target's {r['kl_target']:.2f}); "
              f"β·E[log R] {r['beta_log_r']:+.3f}, log Z {r['log_z']:+.3f}; KL(P_θ‖P*) ≤ {r['elbo_gap']:.2f} "
              f"(pretrained {r['ref_elbo_gap']:.2f})", flush=True)
    path = write_rows(os.path.join(ROOT, "benchmarks", "results", f"digits_path_kl{a.tag}.csv"), rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for name, r in curves.items():
        ax.plot([s[0] for s in r["steps"]], [max(s[2], 1e-4) for s in r["steps"]], marker="o", ms=3,
                label=f"{name}: total {r['kl_path']:.1f} (target {r['kl_target']:.2f}), KL(P_θ‖P*) ≤ "
                      f"{r['elbo_gap']:.1f}")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("timestep of the step's start")
    ax.set_ylabel("KL(p_θ ‖ p_ref) at the step (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path[:-4] + ".png", dpi=110)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
