"""What the guided policy's fixed part alone reaches: the pretrained model sampled with ``gfn.reward_guidance`` = s and
no training, against the importance-sampled digits target.

    python benchmarks/digits_guidance.py c3b05 --scales 1,2,4,8
    python benchmarks/digits_guidance.py c358 --scales 1,2,4,8 --set gfn.reward_adaptive_mode=none

At initialisation the policy network equals the reference, so a run with ``gfn.reward_guidance`` = s starts from
the sampler whose mean is the reference's plus σ_k²·s·β·γ_k·∇_x log R(x̂0_ref(x)): reward guidance on the
pretrained model's clean-sample prediction. Each scale is that sampler evaluated as a run's evaluation does it
(``metrics.evaluate``: ``eval.num_samples`` samples at the evaluation seed; class-histogram TV to the target, mean log
R gap, within-class diversity relative to the target's). Rows go to ``benchmarks/results/digits_guidance_<task><tag>
.csv``. The tasks are ``benchmarks/digits_sweep.py``'s.
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
    ap.add_argument("--scales", default="1,2,4,8", help="comma-separated gfn.reward_guidance values")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides, key=value")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    a = ap.parse_args(argv)
    scales = parse_scales(ap, a.scales)

    sha = git_sha()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for s in scales:
            _, cfg, ev, build_s, eval_s = evaluate_untrained(
                a.task, [f"gfn.reward_guidance={s}", "logging.progress=false", *a.set], out)
            row = dict(task=a.task, scale=s, reward_adaptive_mode=cfg.gfn.reward_adaptive_mode,
                       **digits_eval_figures(ev),
                       pretrained_class_tv=round(ev["pretrained"]["class_tv"], 4), samples=cfg.eval.num_samples,
                       seconds=round(build_s + eval_s, 1), overrides=" ".join(a.set), git_sha=sha,
                       date=datetime.date.today().isoformat())
            rows.append(row)
            print(f"scale {s}: {digits_figures_line(row)}", flush=True)
    path = os.path.join(ROOT, "benchmarks", "results", f"digits_guidance_{a.task}{a.tag}.csv")
    write_rows(path, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
