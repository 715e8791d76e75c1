"""How close the Gaussian sampler gets to the digits target when the tilt's push comes from a low-noise estimate.

    python benchmarks/digits_value_probe.py c358 --trajectories 8192 --steps 2000 --scales 1
    python benchmarks/digits_value_probe.py c3b05 --scales 1,1.5

The exact tilted sampler moves each step of the reference toward h_{k+1}(x) = E_ref[R^β(x_N) | x_{k+1} = x]:
p*(x_{k+1} | x_k) ∝ p_ref(x_{k+1} | x_k)·h_{k+1}(x_{k+1}). A Gaussian step gets the mean μ_ref(x_k) + σ_k²·∇log
h_{k+1}(μ_ref(x_k)). ∇-GFlowNet's returns recipe learns that push by regressing on Monte-Carlo gradient returns,
whose noise is 20–800× their state-dependent part in the middle of the chain (digits_returns_branch.py). This probe
asks what the same Gaussian family reaches when the push comes instead from a *value* h_φ(x, t) fitted to the scalar
R^β(x_N) ∈ [0, 1] of reference trajectories (binary cross-entropy with soft labels, whose minimiser is the
conditional mean): a bounded regression target rather than a gradient. The sampler is the file's (N, η, timesteps),
pushed at every step by s·σ_k²·∇log h_φ(μ_ref(x_k), t_{k+1}) (at the last step by the reward itself), with no policy
training; each scale s is evaluated as a run's evaluation is (``metrics.evaluate``: class-histogram TV to the
importance-sampled target, mean log R gap, within-class diversity relative to the target's).

The push is ``gfn.value_guidance`` (``fastnabla.value``, which fits and caches the value; ``--trajectories``,
``--steps``, ``--batch``, ``--lr`` and ``--seed`` are its ``gfn.value_*`` keys) applied at every step of an untrained
policy. Each row also reports the value's held-out fit per step: the share of Var(R^β) it explains on trajectories
it did not train on (its BCE-optimal predictions against the constant one).

Rows go to ``benchmarks/results/digits_value_probe_<task><tag>.csv``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    from benchmarks.common import (digits_eval_figures, digits_figures_line, evaluate_untrained, git_sha,
                                   parse_scales, write_rows)
    from benchmarks.digits_sweep import TASKS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--trajectories", type=int, default=8192, help="reference trajectories the value learns from")
    ap.add_argument("--steps", type=int, default=2000, help="value training steps")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scales", default="1", help="comma-separated push scales s (1 = the Gaussian step of the tilt)")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides, key=value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    scales = parse_scales(ap, a.scales)
    if a.trajectories < 16:
        ap.error(f"--trajectories {a.trajectories}: need at least 16 (a tenth is held out)")

    sha = git_sha()
    rows = []
    fit = [f"gfn.value_trajectories={a.trajectories}", f"gfn.value_steps={a.steps}", f"gfn.value_batch={a.batch}",
           f"gfn.value_lr={a.lr}", f"gfn.value_seed={a.seed}"]
    for s in scales:
        with tempfile.TemporaryDirectory() as out:
            # the trainer fits the value (fastnabla.value; cached, so later scales only evaluate) and pushes with it
            # at every step: the policy network is the reference (no training), so the push is the only change
            tr, cfg, ev, _, eval_s = evaluate_untrained(
                a.task, ["logging.progress=true", f"gfn.value_guidance={s}", *fit, *a.set], out, every_step=True)
            meta = tr.method.value_meta
            row = dict(task=a.task, scale=s, trajectories=a.trajectories, value_steps=a.steps, value_batch=a.batch,
                       value_lr=a.lr,
                       **digits_eval_figures(ev),
                       explained_share=" ".join(f"{t}:{v:.3f}" for t, v in meta["explained_share"].items()),
                       samples=cfg.eval.num_samples, draw_s=meta["draw_s"], draw_cached=meta.get("draw_cached", False),
                       fit_s=meta["fit_s"],
                       eval_s=eval_s, overrides=" ".join(a.set), seed=a.seed, git_sha=sha,
                       date=datetime.date.today().isoformat())
        rows.append(row)
        print(f"scale {s}: {digits_figures_line(row)}", flush=True)
    path = os.path.join(ROOT, "benchmarks", "results", f"digits_value_probe_{a.task}{a.tag}.csv")
    write_rows(path, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
