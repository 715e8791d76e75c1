"""∇-GFlowNet against the baselines (ALGORITHM §5c) in the same trainer, at equal update counts and at equal
wall-clock.

    python benchmarks/compare_methods.py toy2d --updates 300 --eval-every 25
    python benchmarks/compare_methods.py digits --updates 100 --eval-every 25
    python benchmarks/compare_methods.py toy2d --methods nabla_gfn,draft --set sampling.num_steps=20

Each method runs its preset (``configs/<backbone>.yaml`` for ∇-GFlowNet, ``configs/<backbone>_<method>.yaml`` for the
others, DRaFT-LV = the DRaFT preset with ``draft.lv_copies=2``) for ``--updates`` epochs, one run at a time in this
process. Every preset of a backbone makes the same number of optimizer updates per epoch over the same trajectories
(toy2d: one over 256; digits: three over 64). Every ``--eval-every`` epochs (and before the first) it samples ``--eval-samples`` clean states
of the policy (its EMA when the preset keeps one) from a fixed noise seed and measures:

- ``reward``: mean log R;
- toy2d: ``tv`` (mode-weight TV to the exact target p_ref·R^β), ``off_manifold``, ``coverage`` (the fraction of the
  target's modes of weight ≥ 1% that hold at least half their target weight), ``diversity`` (mean pairwise distance
  of 2048 samples) and ``energy`` (energy distance to 4096 exact target samples);
- digits: the run's digits evaluation (class-histogram TV to the importance-sampled target, class coverage,
  diversity, FID/KID to the pretrained model's samples).

``train_seconds`` is the time spent in training epochs (sampling, the method's per-trajectory work and the updates;
evaluation excluded). "Equal wall-clock" reads every method at the largest evaluation with train_seconds ≤ the
slowest-finishing budget that all of them reached (the shortest total). Writes
``benchmarks/results/compare_<backbone><tag>.csv``, ``.png`` and ``.md`` (the tables of docs/comparison.md).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import git_sha  # noqa: E402  (after the path: the script runs from its own folder)

METHODS = {  # label → (preset suffix or None for ∇-GFlowNet's own preset, extra overrides)
    "nabla_gfn": (None, []),
    "refl": ("refl", []),
    "draft": ("draft", []),
    "draft_lv": ("draft", ["draft.lv_copies=2"]),
    "alignprop": ("alignprop", []),
    "ddpo": ("ddpo", []),
}

FIELDS = ["backbone", "method", "epoch", "updates", "train_seconds", "reward", "tv", "off_manifold", "coverage",
          "diversity", "energy", "fid", "kid", "class_coverage", "scale", "device", "torch_threads", "git_sha", "date"]


def _energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def toy2d_eval(tr, n: int, target_samples: torch.Tensor) -> dict:
    from fastnabla.backbones.toy2d import mode_weights

    cfg, bb = tr.cfg, tr.backbone
    samples, _ = tr.sample_final(n, seed=cfg.seed + 7919)
    with torch.no_grad():
        lr, _ = tr.reward_fn(bb.decode(samples.to(tr.device)), None, None)
    m = bb.target_metrics(samples, cfg.reward, cfg.gfn.reward_scale)
    w, _ = mode_weights(samples, bb.means.cpu())
    target = bb.target_weights(cfg.reward.center, cfg.reward.width, cfg.gfn.reward_scale)
    big = target >= 0.01
    sub = samples[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:2048]]
    return {"reward": float(lr.mean()), "tv": m["tv"], "off_manifold": m["off_manifold"],
            "coverage": float((w[big] >= 0.5 * target[big]).double().mean()),
            "diversity": float(torch.pdist(sub.double()).mean()),
            "energy": _energy_distance(samples, target_samples)}


def digits_eval(tr, n: int) -> dict:
    from fastnabla import metrics

    old = tr.cfg.eval.num_samples
    tr.cfg.eval.num_samples = n
    try:
        ev = metrics.evaluate(tr.eval_ctx, final=False)
    finally:
        tr.cfg.eval.num_samples = old
    tgt = tr.eval_ctx.cache["digits"]["target"]
    hist = torch.tensor(ev["class_histogram"])
    t_hist = torch.tensor(tgt["class_histogram"])
    big = t_hist >= 0.02
    refs = [{"backbone": "digits", "method": "pretrained (p_ref)", "reward": ev["pretrained"]["mean_log_r"],
             "tv": ev["pretrained"]["class_tv"], "diversity": ev["pretrained"]["diversity"], "fid": 0.0,
             "class_coverage": _class_coverage(torch.tensor(ev["pretrained"]["class_histogram"]), t_hist)},
            {"backbone": "digits", "method": "IS target", "reward": tgt["mean_log_r"], "tv": 0.0,
             "diversity": tgt.get("diversity"), "class_coverage": 1.0}]
    return {"reward": ev["eval_reward_mean"], "tv": ev["class_tv"], "class_coverage": _class_coverage(hist, t_hist),
            "diversity": ev["diversity"], "fid": ev["fid_pretrained"], "kid": ev["kid_pretrained"], "_refs": refs,
            "_big": int(big.sum())}


def _class_coverage(hist: torch.Tensor, target: torch.Tensor) -> float:
    """The fraction of the target's classes of mass ≥ 2 % that hold at least half their target mass."""
    big = target >= 0.02
    return float((hist[big] >= 0.5 * target[big]).double().mean())


def run_method(backbone: str, label: str, args) -> list[dict]:
    from fastnabla.config import load_config
    from fastnabla.trainer import build_trainer

    suffix, extra = METHODS[label]
    preset = os.path.join(ROOT, "configs", f"{backbone}.yaml" if suffix is None else f"{backbone}_{suffix}.yaml")
    out = os.path.join(args.out_root, backbone + args.tag, label)
    over = [f"train.epochs={args.updates}", "eval.every=0", "checkpoint.every=0", "logging.plots=false",
            "logging.progress=false", f"seed={args.seed}", *extra, *args.set]
    if backbone == "digits":
        over.append(f"eval.ground_truth_samples={args.ground_truth_samples}")
    cfg = load_config(preset, over, output_dir=out)
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        os.remove(os.path.join(out, "metrics.jsonl"))
    tr = build_trainer(cfg)
    target_samples = None
    if backbone == "toy2d":
        target_samples = tr.backbone.sample_target(4096, torch.Generator().manual_seed(104729), cfg.reward.center,
                                                   cfg.reward.width, cfg.gfn.reward_scale)
    rows, secs = [], 0.0
    base = {"backbone": backbone, "method": label, "scale": args.scale_label, "device": str(tr.device),
            "torch_threads": torch.get_num_threads(), "git_sha": git_sha(),
            "date": datetime.date.today().isoformat()}

    def evaluate(epoch):
        ev = toy2d_eval(tr, args.eval_samples, target_samples) if backbone == "toy2d" else \
            digits_eval(tr, args.eval_samples)
        ev.pop("_big", None)
        refs = ev.pop("_refs", None)
        if refs and not DIGITS_REFS:
            DIGITS_REFS.extend(refs)
        row = {**base, "epoch": epoch, "updates": tr.engine.updates, "train_seconds": round(secs, 2), **ev}
        rows.append(row)
        print(f"  {label:10s} upd {row['updates']:5d}  t {secs:7.1f}s  reward {row['reward']:.4f}  "
              f"tv {row.get('tv', float('nan')):.4f}  div {row.get('diversity', float('nan')):.4f}", flush=True)

    evaluate(0)
    while tr.epoch < cfg.train.epochs:
        t0 = time.time()
        tr.run_epoch()
        secs += time.time() - t0
        if tr.epoch % args.eval_every == 0 or tr.epoch == cfg.train.epochs:
            evaluate(tr.epoch)
    return rows


DIGITS_REFS: list = []  # the pretrained model and the importance-sampled target, from the first digits evaluation


def reference_rows(backbone: str, args) -> list[dict]:
    """The pretrained model and the exact target (toy2d), measured like the runs; digits: from its evaluation."""
    if backbone != "toy2d":
        return DIGITS_REFS
    from fastnabla.backbones.toy2d import Toy2DBackbone, mode_weights
    from fastnabla.config import load_config
    from fastnabla.rewards import build_reward

    cfg = load_config(os.path.join(ROOT, "configs", "toy2d.yaml"), args.set)
    bb = Toy2DBackbone.from_config(cfg)
    r = cfg.reward
    reward = build_reward("gaussian_bump", {"center": r.center, "width": r.width})
    tgt = bb.sample_target(4096, torch.Generator().manual_seed(104729), r.center, r.width, cfg.gfn.reward_scale)
    target = bb.target_weights(r.center, r.width, cfg.gfn.reward_scale)
    out = []
    for name, s in (("exact target", bb.sample_target(args.eval_samples, torch.Generator().manual_seed(1), r.center,
                                                       r.width, cfg.gfn.reward_scale)),
                    ("exact prior", bb.sample_prior(args.eval_samples, torch.Generator().manual_seed(1)))):
        m = bb.target_metrics(s, r, cfg.gfn.reward_scale)
        w, _ = mode_weights(s, bb.means.cpu())
        big = target >= 0.01
        sub = s[:2048]
        out.append({"backbone": backbone, "method": name, "reward": float(reward(s, None, None)[0].mean()),
                    "tv": m["tv"], "off_manifold": m["off_manifold"],
                    "coverage": float((w[big] >= 0.5 * target[big]).double().mean()),
                    "diversity": float(torch.pdist(sub.double()).mean()), "energy": _energy_distance(s, tgt)})
    return out


def _fmt(v, nd=3):
    return "–" if v is None or v == "" or (isinstance(v, float) and v != v) else f"{v:.{nd}f}"


def tables(rows: list[dict], refs: list[dict], backbone: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = ["reward", "tv", "coverage", "diversity", "energy", "off_manifold"] if backbone == "toy2d" else \
        ["reward", "tv", "class_coverage", "diversity", "fid"]
    last = {m: [r for r in rows if r["method"] == m][-1] for m in methods}
    lines = [f"At equal updates ({max(r['updates'] for r in last.values())} for the toy2d presets; digits: see rows)", "",
             "| method | updates | train s | s/update | " + " | ".join(cols) + " |",
             "|---" * (4 + len(cols)) + "|"]
    for m in methods:
        r = last[m]
        spu = r["train_seconds"] / max(r["updates"], 1)
        lines.append(f"| {m} | {r['updates']} | {r['train_seconds']:.0f} | {spu:.3f} | "
                     + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    for ref in refs:
        lines.append(f"| *{ref['method']}* | – | – | – | " + " | ".join(_fmt(ref.get(c)) for c in cols) + " |")
    budget = min(r["train_seconds"] for r in last.values())
    lines += ["", f"At equal wall-clock (the last evaluation within {budget:.0f} s of training, the shortest run's total)",
              "", "| method | updates | train s | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for m in methods:
        r = [x for x in rows if x["method"] == m and x["train_seconds"] <= budget + 1e-9][-1]
        lines.append(f"| {m} | {r['updates']} | {r['train_seconds']:.0f} | "
                     + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], refs: list[dict], backbone: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = [("updates", "reward"), ("updates", "tv"), ("updates", "diversity"), ("train_seconds", "tv")]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    for ax, (x, y) in zip(axes, panels):
        for m in methods:
            rs = [r for r in rows if r["method"] == m and r.get(y) not in (None, "")]
            ax.plot([r[x] for r in rs], [r[y] for r in rs], marker="o", ms=3, label=m)
        for ref, ls in zip(refs, (":", "--")):
            if ref.get(y) is not None:
                ax.axhline(ref[y], color="k", ls=ls, lw=1, label=ref["method"])
        ax.set_xlabel("training seconds" if x == "train_seconds" else "updates")
        ax.set_ylabel({"tv": "TV to target"}.get(y, y))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{backbone}: ∇-GFlowNet and the baselines in one trainer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbone", choices=["toy2d", "digits"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--updates", type=int, default=300, help="epochs per run (toy2d presets: one update each; digits: three)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-samples", type=int, default=4096)
    p.add_argument("--ground-truth-samples", type=int, default=50000, help="digits: p_ref samples of the IS target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="an override for every run, e.g. sampling.num_steps=20")
    p.add_argument("--tag", default="", help="suffix of the result files, e.g. _reduced")
    p.add_argument("--scale-label", default="full", help="written into every row (e.g. 'reduced: 20 steps')")
    p.add_argument("--out-root", default=os.path.join(ROOT, "runs", "compare"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    labels = [m for m in args.methods.split(",") if m]
    bad = [m for m in labels if m not in METHODS]
    if bad:
        sys.exit(f"--methods: {bad} unknown; valid: {', '.join(METHODS)}")
    rows = []
    res = os.path.join(ROOT, "benchmarks", "results")
    stem = os.path.join(res, f"compare_{args.backbone}{args.tag}")
    for m in labels:
        print(f"{args.backbone} / {m}", flush=True)
        rows += run_method(args.backbone, m, args)
        with open(stem + ".csv", "w", newline="") as f:  # after every method: a partial table survives a stop
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    refs = reference_rows(args.backbone, args)
    if refs:
        with open(stem + "_references.json", "w") as f:
            json.dump(refs, f, indent=2)
    plot(rows, refs, args.backbone, stem + ".png")
    md = tables(rows, refs, args.backbone)
    with open(stem + ".md", "w") as f:
        f.write(f"<!-- {' '.join(sys.argv)} ; {platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} thread(s), git {git_sha()} -->\n" + md)
    print(md)


if __name__ == "__main__":
    main()
