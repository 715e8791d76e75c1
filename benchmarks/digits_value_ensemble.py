"""Does averaging several fitted values steady the push where one fit's tail is off?

    python benchmarks/digits_value_ensemble.py c3b05 --scale 1.75 \
        --member "gfn.value_draw=target" --member "gfn.value_net=encoder" \
        --set gfn.value_trajectories=32768 gfn.value_steps=6000 eval.num_samples=6144 --tag _bad3

Class 3 at β = 0.5 keeps its kept 8s' diversity with one fitted value of four (stop 37): the push from the others
narrows the 8s before any training (``digits_value_probe.py``), and training does not widen them again. If the fits
differ by independent errors in the value's small-h tail, the mean of their logits has less of that error than any
one of them. This script evaluates the untrained push (as ``digits_value_probe.py`` does: the push at every step, no
policy training) from each member alone and from the mean of the members' logits, on the same evaluation draw.

Each ``--member`` is a set of ``gfn.value_*`` overrides naming one fitted value (with ``--set`` added to every
member); the values are fitted and cached as a run would (``fastnabla.value.ensure_value``), so members a run has
already fitted only load. Rows go to ``benchmarks/results/digits_value_ensemble_<task><tag>.csv``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class MeanLogit:
    """A value net whose logit (``fastnabla.value.value_logit``: the mean of a net's output) is the mean of its
    members' logits."""

    def __init__(self, members):
        self.members = list(members)

    def __call__(self, x, t):
        from fastnabla.value import value_logit

        return sum(value_logit(m, x, t) for m in self.members) / len(self.members)


def main(argv=None) -> int:
    from benchmarks.common import (build_digits_task, digits_eval_figures, digits_figures_line, digits_task_config,
                                   git_sha, write_rows)
    from benchmarks.digits_sweep import TASKS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--member", action="append", required=True,
                    help="one fitted value's overrides, space-separated key=value (repeat for each member)")
    ap.add_argument("--scale", type=float, default=1.75, help="the push's scale s (gfn.value_guidance)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every member and the evaluation")
    ap.add_argument("--alone", action="store_true", help="also evaluate each member's push alone")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    if a.scale <= 0:
        ap.error(f"--scale {a.scale}: must be > 0 (0 is the pretrained model itself)")
    members = [m.split() for m in a.member]

    import torch

    from fastnabla import metrics
    from fastnabla.value import ensure_value, value_cache_path

    sha, rows = git_sha(), []
    with tempfile.TemporaryDirectory() as out:
        every = ["logging.progress=true", f"gfn.value_guidance={a.scale}", *a.set]
        tr, cfg = build_digits_task(a.task, [*every, *members[0]], out)
        method = tr.method
        method.policy_from, method.policy_to = 0, tr.backbone.scheduler.timesteps.numel()  # the push at every step
        nets, files = [], []
        for m in members:  # the first member is the trainer's own value: loaded again from the cache
            cfg_m = digits_task_config(a.task, [*every, *m], out)
            nets.append(ensure_value(tr.backbone, method.c, method.reward_fn, cfg_m)[0])
            files.append(os.path.basename(value_cache_path(tr.backbone, cfg_m)[0]))
        cases = [([i], " ".join(m) or "defaults") for i, m in enumerate(members)] if a.alone else []
        cases.append((list(range(len(members))), "mean of " + " | ".join(" ".join(m) or "defaults" for m in members)))
        for idx, name in cases:
            group = [nets[i] for i in idx]
            method.value_net = group[0] if len(group) == 1 else MeanLogit(group)
            t0 = time.time()
            torch.manual_seed(cfg.seed)
            ev = metrics.evaluate(tr.eval_ctx, final=False)
            row = dict(task=a.task, scale=a.scale, values=name, members=len(group), **digits_eval_figures(ev),
                       samples=cfg.eval.num_samples, eval_s=round(time.time() - t0, 1),
                       value_files=" ".join(files[i] for i in idx), overrides=" ".join(a.set), git_sha=sha,
                       date=datetime.date.today().isoformat())
            rows.append(row)
            print(f"{name}: {digits_figures_line(row)}", flush=True)
    path = os.path.join(ROOT, "benchmarks", "results", f"digits_value_ensemble_{a.task}{a.tag}.csv")
    write_rows(path, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
