"""Record a digits run (``make digits``) under benchmarks/results: the pretrained model's report, the run's summary
and its per-epoch curve, with the machine, library versions, git commit and date.

    python benchmarks/digits_record.py --run runs/digits --name classes358_beta1 [--wall-clock-s 1234]

writes benchmarks/results/digits_<name>.json (everything) and digits_<name>.csv (one row per epoch).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastnabla.digits import environment  # noqa: E402

CURVE = ("epoch", "updates_total", "reward_mean", "reward_std", "loss", "class_tv_batch", "diversity_batch",
         "class_tv", "diversity", "mean_log_r", "fid_pretrained", "kid_pretrained", "seconds")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the run's output directory")
    p.add_argument("--name", required=True, help="results file suffix")
    p.add_argument("--pretrained-report", default=None, help="the JSON of `fastnabla pretrain-digits --report` "
                                                             "(default: <run>/pretrained.json)")
    p.add_argument("--wall-clock-s", type=float, default=None, help="the run's measured wall clock, if known")
    a = p.parse_args(argv)
    with open(os.path.join(a.run, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(a.run, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    pre = a.pretrained_report or os.path.join(a.run, "pretrained.json")
    pretrained = json.load(open(pre)) if os.path.isfile(pre) else None
    import yaml

    with open(os.path.join(a.run, "config.yaml")) as f:
        config = yaml.safe_load(f)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    rec = dict(name=a.name, environment=environment(), config=config, pretrained=pretrained, summary=summary,
               train_seconds=round(sum(h.get("seconds", 0.0) for h in history), 1), wall_clock_s=a.wall_clock_s)
    with open(os.path.join(out, f"digits_{a.name}.json"), "w") as f:
        json.dump(rec, f, indent=2)
    with open(os.path.join(out, f"digits_{a.name}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE)
        for h in history:
            w.writerow([h.get(k, "") for k in CURVE])
    print(f"wrote {out}/digits_{a.name}.json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
