"""How well a fitted value ranks the samples a class reward scores lowest: the tail a β < 1 target keeps.

    python benchmarks/digits_value_tail.py c3b05 --set gfn.value_trajectories=32768 --tag _traj32k
    python benchmarks/digits_value_tail.py c3b05 --set gfn.value_trajectories=32768 gfn.value_relative_floor=0.001

The value h_φ(x, t) ≈ E_ref[R^β(x_N) | x_t] (``fastnabla.value``, loaded from the cache or fitted as a run would)
is read on a fresh draw of reference trajectories, at every other step. Among the trajectories that end outside the
reward's classes (p(classes | x_N) < 1/2) it reports the rank correlation of log h(x_k) with β·log R(x_N) and the
spread of each: a fit that cannot tell a near-miss from a confident other digit has a narrow log h there, and its
push ∇log h cannot move the one toward the other. Rows go to ``benchmarks/results/digits_value_tail_<task><tag>.csv``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    import torch

    from benchmarks.common import build_digits_task, git_sha, write_rows
    from fastnabla.value import reference_trajectories, value_logit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["c358", "c3b05"], help="a class reward (log R ≤ 0, so the labels are R^β)")
    ap.add_argument("--trajectories", type=int, default=2048, help="fresh reference trajectories to read it on")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides, key=value (the value's gfn.value_*)")
    ap.add_argument("--draw-seed", type=int, default=777, help="the fresh draw's seed (the fits draw from 10,000 on)")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    if a.trajectories < 16:
        ap.error(f"--trajectories {a.trajectories}: read the value on at least 16 trajectories")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tr, cfg = build_digits_task(a.task, ["gfn.value_guidance=1.5", "logging.progress=false", "eval.every=0", *a.set],
                                tempfile.mkdtemp())
    net, beta = tr.method.value_net, cfg.gfn.reward_scale
    xs, ys = reference_trajectories(tr.backbone, tr.coeffs, tr.reward_fn, a.trajectories, beta, seed=a.draw_seed)
    log_y = ys.double().log()  # β·log R up to the draw's constant
    miss = log_y < beta * math.log(0.5)  # p(classes | x_N) < 1/2
    if int(miss.sum()) < 8:
        ap.error(f"only {int(miss.sum())} of {a.trajectories} trajectories end outside the reward's classes; draw more")
    ts = tr.backbone.scheduler.timesteps.cpu()

    def ranks(v):
        return torch.empty_like(v).index_put_((v.argsort(),), torch.arange(len(v), dtype=v.dtype))

    def spearman(u, v):
        return float(torch.corrcoef(torch.stack([ranks(u), ranks(v)]))[0, 1])

    rows, stamp = [], datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    with torch.no_grad():
        for k in range(0, xs.shape[1] - 1, 2):
            log_h = torch.nn.functional.logsigmoid(value_logit(net, xs[:, k], ts[k].expand(len(xs)))).double()
            rows.append(dict(task=a.task, timestep=int(ts[k]), trajectories=a.trajectories, outside=int(miss.sum()),
                             rank_corr_all=round(spearman(log_h, log_y), 4),
                             rank_corr_outside=round(spearman(log_h[miss], log_y[miss]), 4),
                             sd_log_h_outside=round(float(log_h[miss].std()), 3),
                             sd_beta_log_r_outside=round(float(log_y[miss].std()), 3),
                             overrides=" ".join(a.set), git_sha=git_sha(), date=stamp))
            r = rows[-1]
            print(f"t = {r['timestep']:4d}: rank correlation all {r['rank_corr_all']:.3f}, outside "
                  f"{r['rank_corr_outside']:.3f}; sd of log h outside {r['sd_log_h_outside']:.2f} against β·log R's "
                  f"{r['sd_beta_log_r_outside']:.2f}")
    path = write_rows(os.path.join(ROOT, "benchmarks", "results", f"digits_value_tail_{a.task}{a.tag}.csv"), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
