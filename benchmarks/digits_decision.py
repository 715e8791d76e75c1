"""When does the pretrained digits sampler decide which digit it draws?

    python benchmarks/digits_decision.py                       # configs/digits.yaml's sampler
    python benchmarks/digits_decision.py --set sampling.num_steps=40 gfn.timestep_fraction=0.125 --tag _40steps

n trajectories of p_ref (the reference, the file's sampler); from the state x_k of each, every step k, M branches
run to the end with fresh noise. The classifier's argmax of each branch's sample against the trajectory's own gives
the chance that the class is already fixed at step k, and the branches' class entropy (nats, mean over
trajectories) how open it still is. The steps where that chance climbs are where a tilt must move mass between
classes, and where a mean-shifted Gaussian step leaks most (docs/digits.md: why the leak and the swings): the
sampling schedule can put its steps there (``sampling.timesteps``).

Writes ``benchmarks/results/digits_decision<tag>.csv`` (one row per step) and a ``.png`` of both against t.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="trajectories")
    ap.add_argument("--branches", type=int, default=8, help="continuations per trajectory and step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. sampling.num_steps=40")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    if a.n < 1 or a.branches < 1:
        ap.error("--n and --branches must be ≥ 1")
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.common import git_sha, write_rows
    from fastnabla.backbones.pixel import PixelBackbone
    from fastnabla.config import load_config
    from fastnabla.digits import classifier_outputs, ensure_classifier
    from fastnabla.sampling import sample_trajectories, step_coefficients

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(os.path.join(ROOT, "configs", "digits.yaml"), ["logging.progress=false", *a.set],
                          output_dir=out)
    t0 = time.time()
    bb = PixelBackbone.from_config(cfg)
    clf, _ = ensure_classifier(cfg.model.image_size, cfg.model.cache_dir, progress=False)
    co, ts = step_coefficients(bb), bb.scheduler.timesteps
    N, M = len(ts), a.branches
    g = torch.Generator().manual_seed(a.seed)

    def run(x, k0):  # the clean samples of branches from the states x before step k0
        return sample_trajectories(bb, x.shape[0], g, co, keep_trajectory=False, start=(x, k0)).xs[:, 0]

    def classes(x):
        logits, _ = classifier_outputs(clf, bb.decode(x))
        return logits.argmax(1)

    rows = []
    with torch.no_grad(), bb.reference_sampling():
        xs = sample_trajectories(bb, a.n, g, co).xs
        final = classes(xs[:, -1])
        for k in range(N):
            c = classes(run(xs[:, k].repeat_interleave(M, 0), k)).view(a.n, M)
            p = torch.stack([(c == j).float().mean(1) for j in range(10)], 1)
            entropy = max(0.0, float(-(p * p.clamp_min(1e-12).log()).sum(1).mean()))
            rows.append(dict(k=k, t=int(ts[k]), same_class=round(float((c == final[:, None]).float().mean()), 4),
                             branch_entropy=round(entropy, 4)))
            print(f"k={k:3d} t={int(ts[k]):4d} same class {rows[-1]['same_class']:.3f} "
                  f"branch entropy {rows[-1]['branch_entropy']:.3f}", flush=True)
    sha = git_sha()
    for r in rows:
        r.update(n=a.n, branches=M, overrides=" ".join(a.set), seconds=round(time.time() - t0, 1),
                 git_sha=sha, date=datetime.date.today().isoformat())
    path = os.path.join(ROOT, "benchmarks", "results", f"digits_decision{a.tag}.csv")
    write_rows(path, rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = [r["t"] for r in rows]
    ax.plot(t, [r["same_class"] for r in rows], "o-", label="branch keeps the trajectory's class")
    ax2 = ax.twinx()
    ax2.plot(t, [r["branch_entropy"] for r in rows], "s--", color="C1", label="branch class entropy (nats)")
    ax.set_xlabel("timestep t of the branch point (noise → data: left to right)")
    ax.invert_xaxis()
    ax.set_ylabel("P(same class)")
    ax2.set_ylabel("entropy (nats)")
    ax.set_title(f"pretrained digits sampler, {N} steps: when the class is decided", fontsize=9)
    fig.legend(loc="center left", fontsize=8, bbox_to_anchor=(0.12, 0.5))
    fig.tight_layout()
    fig.savefig(path[:-4] + ".png", dpi=120)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
