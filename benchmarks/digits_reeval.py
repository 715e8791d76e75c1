"""A finished digits run's final policy evaluated again, at more noise seeds, with its mean log R split by band.

    python benchmarks/digits_reeval.py runs/digits_sweep/c3b05_value15_traj32k_lr2e-4 … --seeds 7919,7920,101,202 \
        --name c3b05_value15

A run's final evaluation draws ``eval.num_samples`` samples at one noise seed (the config's seed + 7919), so two runs
with the same training seed share that draw, and on class 3 at β = 0.5 one draw of 2,048 puts the mean log R gap
within about ±0.05 nat (``summary.json`` ``mean_log_r_gap_se``) of the policy's own. This script loads the run's
last checkpoint (``benchmarks.common.load_finished_run``) and draws ``--samples`` more at each of ``--seeds``, with
the sampler that the run's evaluation uses (``Trainer.sample_final``). One row per run and seed, and one pooled
row per run over its seeds:
- class-histogram TV to the importance-sampled target;
- the mean log R gap and its standard error (``metrics.mean_se``);
- the within-class diversity ratios (``metrics.diversity_ratio_per_class``) and their standard errors
  (``metrics.diversity_ratio_se_per_class``): a class at 2 % of 2,048 samples has about 40 of them, so one draw's
  ratio is noisy too;
- the mass and the share of the mean log R in each log R band (``BANDS``). The target gets the same bands from its
  importance weights (one row, run = "target"), so the bands show where a gap sits: a model short of near-target
  samples, or carrying confident samples far below them.

Rows go to ``benchmarks/results/digits_reeval_<name>.csv``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: upper edges of the log R bands, high to low; the last band is everything below the last edge
BANDS = (0.0, -0.1, -1.0, -3.0, -5.0, -10.0)


def band_labels(log_r: torch.Tensor, edges: tuple = BANDS) -> tuple[torch.Tensor, list[str]]:
    """(each sample's band index (n,), the bands' names) over ``edges`` (upper edges, high to low): band i holds
    lo < log R ≤ hi; the top one everything above the second edge, the last everything at or below the last."""
    v = log_r.double().flatten().cpu()
    band = (torch.tensor(edges[1:], dtype=v.dtype) >= v[:, None]).sum(1)  # edges at or above log R
    ends = list(edges) + [-math.inf]
    return band, [band_name(hi, lo) for hi, lo in zip(ends[:-1], ends[1:])]


def band_split(log_r: torch.Tensor, weights: torch.Tensor | None = None) -> dict:
    """{band name: (mass, share of the mean log R)} over ``BANDS``; w normalised to sum 1 (uniform when None). The
    bands are labels for ``metrics.class_histogram`` and ``metrics.log_r_share_per_class``, so the masses sum to 1
    and the shares to the (weighted) mean log R. A band holds lo < log R ≤ hi; the top one all above −0.1."""
    from fastnabla import metrics

    band, names = band_labels(log_r)
    mass = metrics.class_histogram(band, len(names), weights)
    share = metrics.log_r_share_per_class(band, log_r.double().flatten().cpu(), len(names), weights)
    return {name: (float(m), float(sh)) for name, m, sh in zip(names, mass, share)}


def band_name(hi: float, lo: float) -> str:
    return f"le{-hi:g}" if lo == -math.inf else f"{abs(hi):g}to{-lo:g}"


def _row(run: str, seed, log_r: torch.Tensor, weights, tgt: dict, tv, ratios: tuple | None = None) -> dict:
    from benchmarks.common import ratios_text
    from fastnabla import metrics

    se = metrics.mean_se(log_r, weights)
    ratios, ratio_se = ratios if ratios else ({}, {})
    mean = float((weights * log_r.double()).sum() / weights.sum()) if weights is not None else float(log_r.mean())
    row = dict(run=run, seed=seed, n=log_r.numel(), class_tv="" if tv is None else round(tv, 4),
               mean_log_r=round(mean, 4), mean_log_r_gap=round(mean - tgt["mean_log_r"], 4),
               gap_se=round(math.hypot(se, tgt.get("mean_log_r_se", 0.0)), 4) if weights is None else "",
               min_diversity_ratio=round(min(ratios.values()), 4) if ratios else "",
               diversity_ratios=ratios_text(ratios), diversity_ratio_ses=ratios_text(ratio_se))
    for name, (mass, share) in band_split(log_r, weights).items():
        row[f"mass_{name}"] = round(mass, 4)
        row[f"share_{name}"] = round(share, 4)
    return row


def _ratios(feats: torch.Tensor, pred: torch.Tensor, tgt: dict) -> tuple[dict, dict]:
    """Within-class diversity over the target's, and its standard error, as the run's evaluation computes them."""
    from fastnabla import metrics

    div = metrics.diversity(feats, pred)
    return (metrics.diversity_ratio_per_class(div["per_group"], tgt),
            metrics.diversity_ratio_se_per_class(div["per_group"], div["per_group_se"], tgt))


def reevaluate(runs: list[str], seeds: list[int], samples: int, error) -> list[dict]:
    """The rows of ``runs`` (finished run directories): the target's first, then per run one row per seed and a
    pooled one (``seed`` = "pooled"). ``error(message)`` reports a directory that is not a finished run."""
    from benchmarks.common import load_finished_run, run_target, target_draw
    from fastnabla import metrics

    rows, target_row = [], None
    for run in runs:
        name = os.path.basename(os.path.normpath(run))
        with tempfile.TemporaryDirectory() as out:
            tr, cfg, path = load_finished_run(run, ["logging.progress=false"], out, error)
            st, tgt = run_target(tr, run, error)
            if target_row is None:
                ref, ref_lr, w = target_draw(tr, cfg, st)
                target_row = _row("target", "", ref_lr, w, tgt, None)
            pooled, hists, feats_all, preds = [], [], [], []
            for seed in seeds:
                t0 = time.time()
                x, _ = tr.eval_ctx.sample_final(samples, seed)
                log_r = metrics._scores(tr.eval_ctx, x, None)
                logits, feats = metrics._digits_features(st, tr.backbone, x)
                pred = logits.argmax(1)
                hist = metrics.class_histogram(pred, logits.shape[1])
                pooled.append(log_r)
                hists.append(hist)
                feats_all.append(feats)
                preds.append(pred)
                rows.append(_row(name, seed, log_r, None, tgt, metrics.histogram_tv(hist, tgt["class_histogram"]),
                                 _ratios(feats, pred, tgt)))
                r = rows[-1]
                print(f"{name} seed {seed}: class TV {r['class_tv']}, gap {r['mean_log_r_gap']:+.3f} ± "
                      f"{r['gap_se']:.3f}, mass below log R −10 {r[f'mass_le{-BANDS[-1]:g}']}, "
                      f"within-class diversity ratios {r['diversity_ratios']} "
                      f"(± {r['diversity_ratio_ses']}; {time.time() - t0:.0f} s)", flush=True)
            hist = torch.stack(hists).mean(0)
            rows.append(_row(name, "pooled", torch.cat(pooled), None, tgt,
                             metrics.histogram_tv(hist, tgt["class_histogram"]),
                             _ratios(torch.cat(feats_all), torch.cat(preds), tgt)))
            r = rows[-1]
            print(f"{name} pooled ({len(seeds)} seeds, checkpoint {os.path.basename(path)}): class TV {r['class_tv']},"
                  f" gap {r['mean_log_r_gap']:+.3f} ± {r['gap_se']:.3f}, within-class diversity ratios "
                  f"{r['diversity_ratios']} (± {r['diversity_ratio_ses']})", flush=True)
    return [target_row] + rows


def write(rows: list[dict], name: str) -> str:
    """``benchmarks/results/digits_reeval_<name>.csv`` with the commit and the date on every row."""
    from benchmarks.common import git_sha, write_rows

    sha, today = git_sha(), datetime.date.today().isoformat()
    return write_rows(os.path.join(ROOT, "benchmarks", "results", f"digits_reeval_{name}.csv"),
                      [dict(r, git_sha=sha, date=today) for r in rows])


def parse_seeds(text: str) -> list[int]:
    """Comma-separated evaluation noise seeds; ValueError names the bad input."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise ValueError(f"{text!r} must be comma-separated integers, e.g. 7919,7920,101")
    return seeds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="finished digits run directories (config.yaml and checkpoints/)")
    ap.add_argument("--seeds", default="7919,7920,101,202", help="comma-separated evaluation noise seeds")
    ap.add_argument("--samples", type=int, default=2048, help="samples per seed")
    ap.add_argument("--name", required=True, help="results file suffix")
    a = ap.parse_args(argv)
    try:
        seeds = parse_seeds(a.seeds)
    except ValueError as e:
        ap.error(f"--seeds {e}")
    if a.samples < 2:
        ap.error(f"--samples {a.samples}: need at least 2")
    out_path = write(reevaluate(a.runs, seeds, a.samples, ap.error), a.name)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
