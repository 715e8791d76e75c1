"""Where a digits run's mean log R gap comes from, class by class.

    python benchmarks/digits_gap_by_class.py runs/digits_sweep/c3b05_value15_traj32k_lr2e-4 … --name c3b05_value15

The gap to the target, mean log R − the target's, splits exactly into one share per class
(``metrics.log_r_share_per_class``: the class's mass times its own mean log R, the model's minus the target's).
Runs evaluated since the split joined ``summary.json`` report it there; for any finished run this script rebuilds
it from the run's ``config.yaml`` (the target from the cached reference draw, as the run's evaluation found it) and
its ``final_samples.npy``. The .npy holds the samples clamped to [−1, 1] while the run scored them unclamped, so the
recomputed mean log R can differ from the run's own in the last digits. One row per run and class that holds
≥ 0.5 % of either side's mass goes to ``benchmarks/results/digits_gap_by_class_<name>.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_split(run: str, error) -> list[dict]:
    """One row per class of the run: both sides' mass, own mean log R and share, and the share's gap."""
    import tempfile

    from benchmarks.common import run_target
    from fastnabla import metrics
    from fastnabla.config import load_config
    from fastnabla.trainer import build_trainer

    for name in ("config.yaml", "final_samples.npy"):
        if not os.path.isfile(os.path.join(run, name)):
            error(f"{run}: no {name}; pass a finished digits run directory")
    cfg = load_config(os.path.join(run, "config.yaml"), ["logging.progress=false"], output_dir=tempfile.mkdtemp())
    tr = build_trainer(cfg)
    st, tgt = run_target(tr, run, error)
    x = torch.from_numpy(np.load(os.path.join(run, "final_samples.npy"))).float()
    log_r = metrics._scores(tr.eval_ctx, x, None).double().cpu()
    logits, _ = metrics._digits_features(st, tr.backbone, x)
    C = logits.shape[1]
    pred = logits.argmax(1)
    mass = metrics.class_histogram(pred, C)
    share = metrics.log_r_share_per_class(pred, log_r, C)
    rows = []
    for c in range(C):
        tm, mm = tgt["class_histogram"][c], float(mass[c])
        if max(tm, mm) < 0.005:
            continue
        ts, ms = tgt["mean_log_r_share_per_class"][c], float(share[c])
        rows.append(dict(run=os.path.basename(os.path.normpath(run)), cls=c, target_mass=round(tm, 4),
                         model_mass=round(mm, 4), target_mean_log_r=round(ts / tm, 3) if tm else "",
                         model_mean_log_r=round(ms / mm, 3) if mm else "", target_share=round(ts, 4),
                         model_share=round(ms, 4), gap_share=round(ms - ts, 4),
                         run_gap=round(float(log_r.mean()) - tgt["mean_log_r"], 4)))
    return rows


def main(argv=None) -> int:
    from benchmarks.common import write_rows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished digits run directories (config.yaml and final_samples.npy)")
    ap.add_argument("--name", required=True, help="results file suffix")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run in a.runs:
        got = run_split(run, ap.error)
        rows += got
        print(f"{got[0]['run']}: gap {got[0]['run_gap']:+.3f} = " + " ".join(
            f"{r['cls']}:{r['gap_share']:+.3f}" for r in got)
            + "\n  class mean log R, model (target): " + " ".join(
            f"{r['cls']}: {r['model_mean_log_r']} ({r['target_mean_log_r']})" for r in got))
    path = write_rows(os.path.join(ROOT, "benchmarks", "results", f"digits_gap_by_class_{a.name}.csv"), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
