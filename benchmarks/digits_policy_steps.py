"""Which sampling steps carry a finished digits run's tilt?

    python benchmarks/digits_policy_steps.py runs/digits_sweep/c358_shipped --cuts 2000,851,701,601,501,401,301
    python benchmarks/digits_policy_steps.py RUN --num-samples 1024 --tag _quick

The run's final policy (its last checkpoint) samples at the steps with timestep ≤ cut and the reference above it
(``gfn.policy_max_timestep`` at evaluation only), at the run's own evaluation seed. For each cut the run's
evaluation gives the class-histogram TV to the importance-sampled target, the mean log R gap and the smallest
within-class diversity ratio. A cut above the first timestep is the run's own final evaluation. Where the figures
do not move as the cut comes down, the policy's steps above it do nothing for the target: the reference's own step
is as good there, and ``gfn.policy_max_timestep`` can leave them untrained.

Writes ``benchmarks/results/digits_policy_steps_<run name><tag>.csv`` (one row per cut) and a ``.png``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def policy_steps(tr, cuts: list[int]) -> list[dict]:
    """One row per cut: the trainer ``tr``'s evaluation with its policy acting only at timesteps ≤ cut (never at steps
    its own ``gfn.policy_max_timestep`` leaves to the reference); cuts below every timestep are skipped."""
    from fastnabla.metrics import evaluate

    ts = [int(t) for t in tr.backbone.scheduler.timesteps]
    trained_from = tr.method.policy_from
    rows = []
    try:
        for cut in cuts:
            k = next((i for i, t in enumerate(ts) if t <= cut), len(ts))
            if k == len(ts):
                print(f"cut {cut}: below every timestep (last {ts[-1]}), skipped")
                continue
            tr.method.policy_from = max(k, trained_from)
            m = evaluate(tr.eval_ctx, final=False)
            ratios = m.get("diversity_ratio_per_class") or {}
            rows.append(dict(cut=cut, policy_steps=len(ts) - tr.method.policy_from, class_tv=round(m["class_tv"], 4),
                             mean_log_r_gap=round(m["mean_log_r_gap"], 4),
                             min_diversity_ratio=round(min(ratios.values()), 4) if ratios else float("nan")))
            print(f"policy at t ≤ {cut} ({rows[-1]['policy_steps']} steps): class TV {rows[-1]['class_tv']:.3f}, "
                  f"gap {rows[-1]['mean_log_r_gap']:+.3f}, min diversity ratio {rows[-1]['min_diversity_ratio']:.3f}",
                  flush=True)
    finally:
        tr.method.policy_from = trained_from
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished digits run directory (config.yaml, checkpoints/)")
    ap.add_argument("--cuts", default="2000,851,701,601,501,401,301",
                    help="comma-separated timesteps: the policy acts at t ≤ cut")
    ap.add_argument("--num-samples", type=int, default=0, help="samples per cut (0 = the run's eval.num_samples)")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    try:
        cuts = [int(c) for c in a.cuts.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--cuts {a.cuts!r}: must be comma-separated integer timesteps, e.g. 2000,701,501")
    if not cuts or min(cuts) < 0:
        ap.error("--cuts needs at least one timestep ≥ 0")
    if a.num_samples < 0:
        ap.error("--num-samples must be ≥ 0")
    cfg_path = os.path.join(a.run, "config.yaml")
    if not os.path.isfile(cfg_path):
        ap.error(f"{a.run}: no config.yaml; pass a finished run directory")
    sys.path.insert(0, ROOT)
    import tempfile

    from benchmarks.common import git_sha, write_rows
    from fastnabla import checkpoint as ckpt
    from fastnabla.config import load_config
    from fastnabla.trainer import build_trainer

    found = ckpt.list_checkpoints(os.path.join(a.run, "checkpoints"))
    if not found:
        ap.error(f"{a.run}: no checkpoint under checkpoints/ (a finished run writes one at the end)")
    over = ["logging.progress=false", "logging.plots=false"]
    if a.num_samples:
        over.append(f"eval.num_samples={a.num_samples}")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(cfg_path, over, output_dir=scratch)
        tr = build_trainer(cfg)
        if tr.backbone.benchmark != "digits":
            ap.error(f"{a.run}: not a digits run (model.backbone={cfg.model.backbone})")
        tr.load_state_dict(ckpt.load_checkpoint(found[-1]))
        rows = policy_steps(tr, cuts)
    if not rows:
        ap.error("no cut left a policy step")
    ts = [int(t) for t in tr.backbone.scheduler.timesteps]
    sha, name = git_sha(), os.path.basename(os.path.normpath(a.run))
    for r in rows:
        r.update(run=name, checkpoint=os.path.basename(found[-1]), num_samples=cfg.eval.num_samples,
                 seconds=round(time.time() - t0, 1), git_sha=sha, date=datetime.date.today().isoformat())
    path = write_rows(os.path.join(ROOT, "benchmarks", "results", f"digits_policy_steps_{name}{a.tag}.csv"), rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [min(r["cut"], ts[0]) for r in rows]
    ax.plot(x, [r["class_tv"] for r in rows], "o-", label="class TV to the target")
    ax2 = ax.twinx()
    ax2.plot(x, [r["mean_log_r_gap"] for r in rows], "s--", color="C1", label="mean log R gap (nats)")
    ax.set_xlabel("the policy acts at t ≤ this (reference above); left = every step")
    ax.invert_xaxis()
    ax.set_ylabel("class TV")
    ax2.set_ylabel("gap")
    ax.set_title(f"{name}: where the finetuned policy's tilt acts", fontsize=9)
    fig.legend(loc="lower left", fontsize=8, bbox_to_anchor=(0.12, 0.15))
    fig.tight_layout()
    fig.savefig(path[:-4] + ".png", dpi=120)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
