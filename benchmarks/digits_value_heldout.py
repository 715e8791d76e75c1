"""Fitted values side by side on the same held-out trajectories: which fit is better, apart from which draw it holds out.

    python benchmarks/digits_value_heldout.py c3b05 --value unet= encoder=gfn.value_net=encoder \
        "encoder_target=gfn.value_net=encoder gfn.value_draw=target" --tag _s37

A value's own explained share (``fastnabla.value.explained_share``, in its cache meta) is read on the tenth of its
own draw that it held out, so two fits on two draws are compared on two different sets. Here every value (each
``NAME=overrides`` of ``gfn.value_*`` on top of ``--base``, loaded from the cache or fitted as a run would) is read on
the held-out tenth of every value's draw (the first tenth of each, which no value trained on), at a few timesteps.
With ``--classes`` each value is also scored on the held-out trajectories whose clean sample the classifier reads as
each digit given: how much of R^β's spread within a minority class (class 3's kept 8s) the value explains.
Rows go to ``benchmarks/results/digits_value_heldout_<task><tag>.csv``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TIMESTEPS = (601, 405, 210, 101, 51, 1)


def main(argv=None) -> int:
    import torch

    from benchmarks.common import build_digits_task, git_sha, write_rows
    from fastnabla.digits import cache_root
    from fastnabla.value import explained_share, reference_trajectories, value_draw_stream

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["c358", "c3b05"])
    ap.add_argument("--value", nargs="+", required=True, metavar="NAME=OVERRIDES",
                    help="a value to read: its name, '=', its space-separated gfn.value_* overrides (may be empty)")
    ap.add_argument("--base", default="gfn.value_trajectories=32768 gfn.value_steps=6000",
                    help="overrides every value shares")
    ap.add_argument("--classes", default="", help="comma-separated digits: also score each value on the held-out "
                    "trajectories whose clean sample the classifier reads as that digit (its share of their Var(R^β))")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    bad_classes = f"--classes {a.classes!r} must be comma-separated digits 0…9, e.g. 8,9"
    try:
        classes = [int(c) for c in a.classes.split(",") if c.strip()]
    except ValueError:
        ap.error(bad_classes)
    if any(not 0 <= c <= 9 for c in classes):
        ap.error(bad_classes)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    values = {}  # name: its overrides on top of --base
    for spec in a.value:
        name, sep, over = spec.partition("=")
        if not sep or not name:
            ap.error(f"--value {spec!r}: write NAME=OVERRIDES, e.g. encoder=gfn.value_net=encoder")
        values[name] = [*a.base.split(), *over.split()]

    nets, draws = {}, {}
    for name, over in values.items():
        tr, cfg = build_digits_task(a.task, ["gfn.value_guidance=1.5", "logging.progress=false", "eval.every=0", *over],
                                    tempfile.mkdtemp())
        nets[name] = tr.method.value_net.cpu()
        stream = value_draw_stream(cfg)
        if stream not in draws:
            xs, ys = reference_trajectories(tr.backbone, tr.coeffs, tr.reward_fn, cfg.gfn.value_trajectories,
                                            cfg.gfn.reward_scale, *stream, cache=cache_root(cfg.model.cache_dir))
            hold = max(cfg.gfn.value_trajectories // 10, 1)
            with torch.no_grad():  # the classifier's reading of each held-out clean sample (the reward's "pred")
                pred = tr.reward_fn(tr.backbone.decode(xs[:hold, -1].to(tr.backbone.device)), None, None)[1]["pred"]
            draws[stream] = (name, xs[:hold], ys[:hold], pred.cpu())
            del xs, ys
    ts = tr.backbone.scheduler.timesteps.cpu()  # one sampler for all: only gfn.value_* keys differ
    cols = [i for i, t in enumerate(ts.tolist()) if int(t) in TIMESTEPS]
    rows, sha, stamp = [], git_sha(), datetime.date.today().isoformat()
    for (seed, batch), (owner, xs, ys, pred) in draws.items():
        for name, net in nets.items():
            for digit in [None, *classes]:
                keep = slice(None) if digit is None else pred == digit
                share = explained_share(net, xs[keep], ys[keep], ts)
                rows.append(dict(task=a.task, value=name, overrides=" ".join(values[name]), heldout_of=owner,
                                 draw_seed=seed, digit="all" if digit is None else digit, heldout=len(ys[keep]),
                                 **{f"share_t{int(ts[i])}": round(share[i], 4) for i in cols}, git_sha=sha,
                                 date=stamp))
                print(f"held out of {owner}'s draw: {name}{'' if digit is None else f' (read as {digit})'}: "
                      + " ".join(f"{int(ts[i])}:{share[i]:.3f}" for i in cols), flush=True)
    path = write_rows(os.path.join(ROOT, "benchmarks", "results", f"digits_value_heldout_{a.task}{a.tag}.csv"), rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
