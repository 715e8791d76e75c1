"""Which sampling steps carry a finished digits run's tilt?

    python benchmarks/digits_policy_steps.py runs/digits_sweep/c358_shipped --cuts 2000,851,701,601,501,401,301
    python benchmarks/digits_policy_steps.py RUN --cuts 2000 --late-cuts 60,160,260 --num-samples 1024 --tag _quick

The run's final policy (its last checkpoint) samples at the steps with timestep ≤ cut and the reference above it
(``gfn.policy_max_timestep`` at evaluation only), at the run's own evaluation seed. For each cut the run's
evaluation gives the class-histogram TV to the importance-sampled target, the mean log R gap and the smallest
within-class diversity ratio. A cut above the first timestep is the run's own final evaluation. Where the figures
do not move as the cut comes down, the policy's steps above it do nothing for the target: the reference's own step
is as good there, and ``gfn.policy_max_timestep`` can leave them untrained. ``--late-cuts`` does the same from the
other end: the policy acts at t ≥ each late cut and the reference finishes the samples.

Writes ``benchmarks/results/digits_policy_steps_<run name><tag>.csv`` (one row per cut) and a ``.png``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def policy_steps(tr, cuts: list[int], late_cuts: list[int] = ()) -> list[dict]:
    """One row per cut: the trainer ``tr``'s evaluation with its policy acting only at timesteps ≤ cut, then one per
    late cut with the policy acting only at timesteps ≥ it (the reference below); never at steps its own
    ``gfn.policy_max_timestep`` / ``gfn.policy_min_timestep`` leave to the reference. Cuts that leave the policy no
    step are skipped."""
    from fastnabla.methods.base import acting_steps
    from fastnabla.metrics import evaluate

    m = tr.method
    ts = [int(t) for t in tr.backbone.scheduler.timesteps]
    trained_from, trained_to = m.policy_from, m.policy_to
    end = len(ts) if trained_to is None else trained_to
    rows = []

    def row(first: int, stop: int, **where):
        m.policy_from, m.policy_to = first, stop
        ev = evaluate(tr.eval_ctx, final=False)
        ratios = ev.get("diversity_ratio_per_class") or {}
        rows.append(dict(**where, policy_steps=stop - first, class_tv=round(ev["class_tv"], 4),
                         mean_log_r_gap=round(ev["mean_log_r_gap"], 4),
                         min_diversity_ratio=round(min(ratios.values()), 4) if ratios else float("nan")))
        print(f"policy at t in [{ts[stop - 1]}, {ts[first]}] ({rows[-1]['policy_steps']} steps): class TV "
              f"{rows[-1]['class_tv']:.3f}, gap {rows[-1]['mean_log_r_gap']:+.3f}, min diversity ratio "
              f"{rows[-1]['min_diversity_ratio']:.3f}", flush=True)

    try:
        for cut in cuts:
            k = max((acting_steps(ts, max_timestep=cut) or (len(ts),))[0], trained_from)
            if k >= end:
                print(f"cut {cut}: leaves the policy no step, skipped")
                continue
            row(k, end, cut=cut, late_cut=0)
        for low in late_cuts:
            stop = min((acting_steps(ts, min_timestep=low) or (0, 0))[1], end)
            if stop <= trained_from:
                print(f"late cut {low}: leaves the policy no step, skipped")
                continue
            row(trained_from, stop, cut=ts[0], late_cut=low)
    finally:
        m.policy_from, m.policy_to = trained_from, trained_to
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished digits run directory (config.yaml, checkpoints/)")
    ap.add_argument("--cuts", default="2000,851,701,601,501,401,301",
                    help="comma-separated timesteps: the policy acts at t ≤ cut")
    ap.add_argument("--late-cuts", default="",
                    help="comma-separated timesteps: then the policy acts at t ≥ each (the reference below)")
    ap.add_argument("--num-samples", type=int, default=0, help="samples per cut (0 = the run's eval.num_samples)")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    try:
        cuts = [int(c) for c in a.cuts.split(",") if c.strip()]
        late = [int(c) for c in a.late_cuts.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--cuts {a.cuts!r} / --late-cuts {a.late_cuts!r}: must be comma-separated integer timesteps, "
                 "e.g. 2000,701,501")
    if not (cuts or late) or min(cuts + late) < 0:
        ap.error("--cuts and --late-cuts need at least one timestep ≥ 0")
    if a.num_samples < 0:
        ap.error("--num-samples must be ≥ 0")
    sys.path.insert(0, ROOT)
    import tempfile

    from benchmarks.common import git_sha, load_finished_run, write_rows

    over = ["logging.progress=false", "logging.plots=false"]
    if a.num_samples:
        over.append(f"eval.num_samples={a.num_samples}")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        tr, cfg, last = load_finished_run(a.run, over, scratch, ap.error)
        if tr.backbone.benchmark != "digits":
            ap.error(f"{a.run}: not a digits run (model.backbone={cfg.model.backbone})")
        rows = policy_steps(tr, cuts, late)
    if not rows:
        ap.error("no cut left a policy step")
    ts = [int(t) for t in tr.backbone.scheduler.timesteps]
    sha, name = git_sha(), os.path.basename(os.path.normpath(a.run))
    for r in rows:
        r.update(run=name, checkpoint=os.path.basename(last), num_samples=cfg.eval.num_samples,
                 seconds=round(time.time() - t0, 1), git_sha=sha, date=datetime.date.today().isoformat())
    path = write_rows(os.path.join(ROOT, "benchmarks", "results", f"digits_policy_steps_{name}{a.tag}.csv"), rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    early = [r for r in rows if r["late_cut"] == 0]
    late = [r for r in rows if r["late_cut"] > 0]
    for ax, key, label in ((axes[0], "class_tv", "class TV to the target"),
                           (axes[1], "mean_log_r_gap", "mean log R gap (nats)")):
        if early:
            ax.plot([min(r["cut"], ts[0]) for r in early], [r[key] for r in early], "o-",
                    label="policy at t ≤ cut, reference above")
        if late:
            ax.plot([r["late_cut"] for r in late], [r[key] for r in late], "s--",
                    label="policy at t ≥ cut, reference below")
        ax.set_xlabel("cut timestep")
        ax.invert_xaxis()
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{name}: which steps carry the finetuned policy's tilt", fontsize=9)
    fig.tight_layout()
    fig.savefig(path[:-4] + ".png", dpi=120)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
