"""Which samples of a class the target keeps, and how varied they are: each class split by the sample's log R.

    python benchmarks/digits_class_bands.py runs/digits_sweep/c3b05_value2_traj32k_lr2e-4 … --name c3b05_value2

A class that the reward does not ask for can still hold a few per cent of the target p_ref·R^β (class 3 at β = 0.5
keeps 8s and 9s at 2–3 %), and the evaluation's diversity bar covers it. Which of its samples the target keeps is
set by R^β: within the class the weights span orders of magnitude. This script splits each kept class (≥ 2 % of the
target's mass, ``metrics.diversity_ratio_per_class``'s rule) by log R band and reports, per band:
- the pretrained model's samples (the importance-sampling draw, unweighted): count, share of the class, within-band
  diversity ± its standard error (``metrics.diversity``);
- the target: its weight share of the class, and its importance-weighted within-band diversity;
- each run's final samples (``final_samples.npy``, the run's own evaluation draw, clamped to [−1, 1] as it is
  saved): share of the class and within-band diversity.
A run whose class is less varied than the target's either holds the wrong part of the class (its samples sit in
bands that the target weighs little) or holds too narrow a part of the right band.

Rows go to ``benchmarks/results/digits_class_bands_<name>.csv``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: upper edges of the bands, high to low (log R; ``digits_reeval.band_labels``): the last band is everything at or
#: below the last edge
EDGES = (0.0, -3.0, -6.0, -10.0, -15.0)


def class_band_rows(source: str, c: int, log_r: torch.Tensor, pred: torch.Tensor, feats: torch.Tensor,
                    weights: torch.Tensor | None = None) -> list[dict]:
    """One row per band (``EDGES``) of class c: samples, share of the class (weighted when ``weights``), within-band
    diversity and its standard error."""
    from benchmarks.digits_reeval import band_labels
    from fastnabla import metrics

    in_c = pred.cpu() == c
    w = torch.ones(log_r.numel(), dtype=torch.float64) if weights is None else weights.double().cpu()
    total = float(w[in_c].sum())
    band, names = band_labels(log_r, EDGES)
    rows = []
    for i, name in enumerate(names):
        idx = (in_c & (band == i)).nonzero().flatten()
        div = metrics.diversity(feats[idx], weights=None if weights is None else weights[idx]) \
            if idx.numel() >= 2 else {"overall": math.nan, "overall_se": math.nan}
        rows.append(dict(source=source, cls=c, band=name, n=idx.numel(),
                         share=round(float(w[idx].sum()) / total, 4) if total > 0 else "",
                         diversity=round(div["overall"], 3), diversity_se=round(div["overall_se"], 3)))
    return rows


def main(argv=None) -> int:
    from benchmarks.common import git_sha, load_finished_run, run_target, target_draw, write_rows
    from fastnabla import metrics

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="finished digits run directories (config.yaml, checkpoints/, "
                                            "final_samples.npy)")
    ap.add_argument("--name", required=True, help="results file suffix")
    a = ap.parse_args(argv)
    rows, sha, today = [], git_sha(), datetime.date.today().isoformat()
    done_targets = set()
    for run in a.runs:
        name = os.path.basename(os.path.normpath(run))
        final = os.path.join(run, "final_samples.npy")
        if not os.path.isfile(final):
            ap.error(f"{run}: no final_samples.npy (a finished digits run writes it at the end)")
        with tempfile.TemporaryDirectory() as out:
            tr, cfg, _ = load_finished_run(run, ["logging.progress=false"], out, ap.error)
            st, tgt = run_target(tr, run, ap.error)
            kept = [c for c, m in enumerate(tgt["class_histogram"]) if m >= 0.02]
            key = (cfg.reward.name, str(cfg.reward.options), cfg.gfn.reward_scale)
            if key not in done_targets:  # the pretrained draw and the target, once per reward and β
                done_targets.add(key)
                ref, ref_lr, w = target_draw(tr, cfg, st)
                pred = ref["logits"].argmax(1)
                for c in kept:
                    rows += [dict(r, run=f"reward {key[1]} β {key[2]}") for r in
                             class_band_rows("pretrained", c, ref_lr, pred, ref["features"])
                             + class_band_rows("target", c, ref_lr, pred, ref["features"], w)]
            x = torch.from_numpy(np.load(final)).float()
            log_r = metrics._scores(tr.eval_ctx, x, None)
            logits, feats = metrics._digits_features(st, tr.backbone, x)
            for c in kept:
                rows += [dict(r, run=name) for r in class_band_rows("run", c, log_r, logits.argmax(1), feats)]
            print(f"{name}: classes {kept} split into {len(EDGES)} bands", flush=True)
    rows = [dict(r, git_sha=sha, date=today) for r in rows]
    path = write_rows(os.path.join(ROOT, "benchmarks", "results", f"digits_class_bands_{a.name}.csv"),
                      [{k: r[k] for k in ("run", "source", "cls", "band", "n", "share", "diversity", "diversity_se",
                                          "git_sha", "date")} for r in rows])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
