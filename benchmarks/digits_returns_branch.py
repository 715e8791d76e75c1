"""How much of the gradient returns' variance a policy could learn at all, and how much of that it has learned.

    python benchmarks/digits_returns_branch.py runs/digits_sweep/c3b05_late52 [--states 6,9,12,15,18] [--n 64]
        [--branches 8] [--name NAME]

The policy's residual d(x_{k−1}) (``gfn.policy_target: return``) regresses on the Monte-Carlo return G_k at the next
state, whose randomness comes from x_k and the rest of the chain. Its best prediction is the conditional mean
m(x_{k−1}) = E[G_k | x_{k−1}]. For n trajectories of the run's final policy and each chosen state index k, this
runs M branches from x_{k−1} to the end with fresh noise (the run's own sampler and policy steps), computes every
branch's G_k, and splits G_k's variance (summed over pixels) into the part across states, Var(m) (the signal a
regression can learn; unbiased: the spread of the branch means less the noise's share), and the part within a
state, E Var(G_k | x_{k−1}) (noise no network can learn). Reported per k: both (the first with its bootstrap
standard error over the states: at the middle steps it is often larger than the estimate), the learnable fraction
Var(m) / Var(G_k), and how much of Var(m) the policy's d explains, 1 − (E‖m̂ − d‖² − noise/M) / Var(m) (1: d is the
conditional mean; 0: no better than the mean push; below 0: worse), with the norms of the batch means of G_k and d,
and how much of Var(m) the best a·f + b explains, for f = ∇_x log R(x̂0_ref(x_{k−1})), the reward gradient through
the reference's clean-sample prediction (``gfn.reward_guidance``'s direction): noise-free and state-dependent.
Rows go to ``benchmarks/results/digits_returns_branch_<name>.csv``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def variance_split(G, d=None, f=None) -> dict:
    """G (n, M, *S): M draws of G_k for each of n conditioning states; d (n, *S) a predictor at those states, or None;
    f (n, *S) a feature at those states, or None (``explained_by_f``: the share of ``between`` that a·f + b explains
    with the least-squares scalar a and vector b, noise-corrected; ``f_scale``: that a).

    Sums over pixels. ``within``: E_i of the unbiased within-state variance; ``between``: the variance of the
    conditional mean, unbiased (the branch means' spread, less within/M), with ``between_se``, its standard error
    over the states (bootstrap); ``explained_by_d``: 1 − (noise-corrected mean squared error of d against the
    conditional mean) / between."""
    import torch

    n, M = G.shape[:2]
    if n < 2 or M < 2:
        raise ValueError(f"variance_split needs ≥ 2 states and ≥ 2 branches per state, got {n} and {M}")
    g = G.flatten(2).double()
    mean_i = g.mean(1)  # (n, P) branch means: estimates of m(x_i)
    within_i = ((g - mean_i[:, None]) ** 2).sum(2).sum(1).div(M - 1)  # (n,)

    def between_of(rows):
        mi = mean_i[rows]
        return float(((mi - mi.mean(0)) ** 2).sum(1).sum().div(len(rows) - 1) - within_i[rows].mean() / M)

    within = float(within_i.mean())
    between = between_of(torch.arange(n))
    boot = torch.randint(0, n, (200, n), generator=torch.Generator().manual_seed(0))
    between_se = float(torch.tensor([between_of(r) for r in boot]).std())
    out = dict(within=within, between=between, between_se=between_se, learnable=between / (between + within),
               norm_mean_G=float(mean_i.mean(0).norm()))
    if d is not None:
        dd = d.flatten(1).double()
        mse = float(((mean_i - dd) ** 2).sum(1).mean()) - within / M
        out.update(explained_by_d=1.0 - mse / between if between > 0 else float("nan"),
                   norm_mean_d=float(dd.mean(0).norm()),
                   cos_mean=float(torch.nn.functional.cosine_similarity(dd.mean(0), mean_i.mean(0), dim=0)))
    if f is not None:
        fc = f.flatten(1).double()
        fc = fc - fc.mean(0)
        gc = mean_i - mean_i.mean(0)
        a = float((gc * fc).sum() / (fc * fc).sum().clamp_min(1e-30))
        resid = float(((gc - a * fc) ** 2).sum(1).sum().div(n - 2)) - within / M
        out.update(explained_by_f=1.0 - resid / between if between > 0 else float("nan"), f_scale=a)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a finished digits run directory (config.yaml, checkpoints/)")
    p.add_argument("--states", default="6,9,12,15,18", help="comma-separated state indices k (1 … N)")
    p.add_argument("--n", type=int, default=64, help="trajectories (conditioning states per k)")
    p.add_argument("--branches", type=int, default=8, help="continuations M from each x_{k−1} (≥ 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file suffix (default: the run directory's name)")
    a = p.parse_args(argv)
    import torch

    from benchmarks.common import git_sha, load_finished_run, write_rows
    from fastnabla.sampling import sample_trajectories

    if a.n < 2 or a.branches < 2:
        p.error("--n and --branches must be ≥ 2 (the split needs two states and two branches per state)")
    try:
        states = [int(s) for s in a.states.split(",") if s.strip()]
    except ValueError:
        p.error(f"--states {a.states!r}: give comma-separated integers, e.g. 6,9,12")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out_tmp = os.path.join(a.run, "branch_tmp")
    tr, cfg, path = load_finished_run(a.run, ["logging.progress=false", "eval.ground_truth_samples=0"], out_tmp,
                                      p.error)
    obj, bb = tr.method, tr.backbone
    N = obj.N
    bad = [k for k in states if not 1 <= k <= N]
    if bad:
        p.error(f"--states {bad}: state indices run from 1 to N = {N}")
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    with torch.no_grad():
        base = sample_trajectories(bb, a.n, g, tr.coeffs, policy_from=obj.policy_from, policy_to=obj.policy_to)
    rows = []
    for k in states:
        x_prev = base.xs[:, k - 1].repeat_interleave(a.branches, 0)  # (n·M, *S), branch-major per state
        with torch.no_grad():
            br = sample_trajectories(bb, x_prev.shape[0], g, tr.coeffs, policy_from=obj.policy_from,
                                     policy_to=obj.policy_to, start=(x_prev, k - 1))
        full = torch.cat([x_prev.new_zeros(x_prev.shape[0], k - 1, *x_prev.shape[1:]), br.xs], 1)  # (n·M, N+1, *S)
        G = obj._returns(full, None, None, first=k)[0][:, k]
        G = G.view(a.n, a.branches, *G.shape[1:])
        xk = base.xs[:, k - 1]
        ck = obj.c[torch.full((a.n,), k - 1, dtype=torch.long)]
        tk = obj.timesteps[k - 1].expand(a.n)
        with torch.no_grad():
            d = ck.coef_out.view(-1, *[1] * (xk.dim() - 1)) * (bb.policy(xk, tk, None) - bb.reference(
                xk, tk, None)) * ck.inv_var.view(-1, *[1] * (xk.dim() - 1))
        # the reward gradient through the reference's clean-sample prediction, ∇_x log R(x̂0_ref(x)) at x_{k−1}: the
        # direction of gfn.reward_guidance, a noise-free state-dependent guess at the conditional mean
        with torch.enable_grad():
            xx = xk.detach().requires_grad_(True)
            f, _ = obj._reward_grad(xx, ck.pred_x0(xx, bb.reference(xx, tk, None).to(xx.dtype)), None)
        acts = obj.policy_from <= k - 1 < (obj.policy_to or N)
        row = dict(run=os.path.basename(os.path.normpath(a.run)), checkpoint=os.path.basename(path), state=k,
                   timestep=int(obj.timesteps[k - 1]), policy_acts=acts, n=a.n, branches=a.branches,
                   **variance_split(G, d if acts else torch.zeros_like(d), f))
        rows.append(row)
        print(" ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in row.items()),
              flush=True)
    for r in rows:
        r.update(git_sha=git_sha(), date=datetime.date.today().isoformat(), seconds=round(time.time() - t0, 1))
    name = a.name or os.path.basename(os.path.normpath(a.run))
    out = os.path.join(ROOT, "benchmarks", "results", f"digits_returns_branch_{name}.csv")
    write_rows(out, rows)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
