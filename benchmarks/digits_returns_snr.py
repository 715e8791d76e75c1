"""How much of the gradient returns' variance the flow explains, state by state, for a digits run.

    python benchmarks/digits_returns_snr.py runs/digits_sweep/c358_tf1 [--init] [--name NAME] [--set key=value …]

Loads the run's config and its latest checkpoint (``--init``: the untrained policy and flow), draws epochs of
trajectories with the run's sampler, and compares, at each state x_k, the Monte-Carlo gradient return G_k (the flow's
regression target with κ = 1, ALGORITHM §5b; computed here whatever returns the run trained on) with what predicts it: g(x_k) + r(x_k) (flow + forward-looking reward gradient),
and r(x_k) alone. Reported per state: the mean norms of G, r and g, the norm of G's and of the prediction's batch
mean and the cosine between the two means, and the explained fraction 1 − E‖G − pred‖² /
Σ Var(G) (1 = G predicted exactly, 0 = no better than G's mean, < 0 worse). The same figures for the policy's
residual d(x_{k−1}) = coef_out·(out − out_ref)/σ² of the transition into x_k against G_k (``policy_*`` columns):
what ``gfn.policy_target: return`` regresses, and whether the policy has caught up with its target. Rows go to
``benchmarks/results/digits_returns_snr_<name>.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_rows  # noqa: E402


def state_stats(G: torch.Tensor, r: torch.Tensor, g: torch.Tensor) -> dict:
    """Per-state figures from the returns G, the reward term r and the flow g, each (n, *S)."""
    var = float(G.var(0).sum())  # Σ over pixels of the across-sample variance (unbiased)

    def explained(pred):
        return 1.0 - float(((G - pred) ** 2).mean(0).sum()) / var

    def norm(v):
        return float(v.flatten(1).norm(dim=1).mean())

    pred = g + r
    return dict(norm_G=norm(G), norm_mean_G=float(G.mean(0).norm()), norm_r=norm(r), norm_g=norm(g),
                explained_flow_plus_r=explained(pred), explained_r_only=explained(r),
                cos_mean=float(torch.nn.functional.cosine_similarity(pred.mean(0).flatten(), G.mean(0).flatten(),
                                                                     dim=0)),
                norm_mean_pred=float(pred.mean(0).norm()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a digits run directory (config.yaml, checkpoints/)")
    p.add_argument("--init", action="store_true", help="the untrained policy and flow instead of the checkpoint")
    p.add_argument("--name", default=None, help="results file suffix (default: the run directory's name)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. gfn.reward_adaptive_mode=none")
    p.add_argument("--batches", type=int, default=2, help="epochs of trajectories to pool")
    a = p.parse_args(argv)
    from fastnabla import checkpoint as ckpt
    from fastnabla.config import load_config
    from fastnabla.trainer import build_trainer

    torch.set_num_threads(1)
    cfg = load_config(os.path.join(a.run, "config.yaml"), ["logging.progress=false", "eval.ground_truth_samples=0",
                                                           *a.set], output_dir=os.path.join(a.run, "snr_tmp"))
    tr = build_trainer(cfg)
    if not a.init:
        tr.load_state_dict(ckpt.load_checkpoint(ckpt.resolve_resume("latest", os.path.join(a.run, "checkpoints")),
                                                engine=tr.engine))
    obj, bb = tr.method, tr.backbone  # the ∇-GFlowNet method: reward_grad, gradient_returns, timesteps, N
    N = obj.N
    trajs = [tr.sample(10_000 + i) for i in range(a.batches)]
    xs = torch.cat([t.xs for t in trajs])
    # the Monte-Carlo returns (κ = 1, untruncated) whatever the run trained on: the unbiased target
    G_all = torch.cat([obj.gradient_returns(t.xs, t.cond, t.prompts) for t in trajs])
    rows = []
    for j in range(1, N + 1):
        x, G = xs[:, j], G_all[:, j]
        r, _ = obj.reward_grad(x, torch.full((x.shape[0],), j, dtype=torch.long), None, None)
        with torch.no_grad():
            g = bb.flow(x, obj.timesteps[j], None).to(x.dtype) if j < N else torch.zeros_like(x)
        k = j - 1  # the transition x_{k} → x_j: the policy's residual at x_k regresses on G_j
        tk = obj.timesteps[k].expand(x.shape[0])
        with torch.no_grad():
            ck = obj.c[torch.full((x.shape[0],), k, dtype=torch.long)]
            d = ck.coef_out.view(-1, *[1] * (x.dim() - 1)) * (bb.policy(xs[:, k], tk, None) - bb.reference(
                xs[:, k], tk, None)) * ck.inv_var.view(-1, *[1] * (x.dim() - 1))
        pol = state_stats(G, d, torch.zeros_like(d))
        rows.append(dict(state=j, **state_stats(G, r, g), policy_norm_d=pol["norm_r"],
                         policy_norm_mean_d=pol["norm_mean_pred"], policy_explained=pol["explained_flow_plus_r"],
                         policy_cos_mean=pol["cos_mean"]))
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    name = a.name or os.path.basename(os.path.normpath(a.run)) + ("_init" if a.init else "")
    path = os.path.join(ROOT, "benchmarks", "results", f"digits_returns_snr_{name}.csv")
    write_rows(path, rows)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
