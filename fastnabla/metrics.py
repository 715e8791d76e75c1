"""Run metrics and report plots.

Per epoch: reward statistics of the fresh samples (in the trainer) and, for toy2d, the total variation of their
mode weights to the exact target p_ref·R^β and the off-manifold mass. At eval epochs and at the end: the same on
``eval.num_samples`` fresh samples (precise), ``final_samples.npy``, and plots.
"""
from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["epoch_metrics", "evaluate", "plot_toy2d", "plot_curves"]


def _is_toy(backbone) -> bool:
    return hasattr(backbone, "target_weights")


def _target(trainer):
    r, g = trainer.cfg.reward, trainer.cfg.gfn
    return trainer.backbone.target_weights(r.center, r.width, g.reward_scale)


def epoch_metrics(trainer, fresh) -> dict:
    if not _is_toy(trainer.backbone) or trainer.cfg.reward.name != "gaussian_bump":
        return {}
    from fastnabla.backbones.toy2d import total_variation

    tv, off = total_variation(fresh.xs[:, -1].cpu(), trainer.backbone.means.cpu(), _target(trainer))
    return {"tv_batch": tv, "off_manifold_batch": off}


def evaluate(trainer, final: bool) -> dict:
    """Precise metrics on ``eval.num_samples`` samples; at the end also samples on disk and plots."""
    cfg = trainer.cfg
    n = max(cfg.eval.num_samples, 4096) if final and _is_toy(trainer.backbone) else cfg.eval.num_samples
    samples, prompts = trainer.sample_final(n, seed=cfg.seed + 7919)
    out = {}
    mb = cfg.sampling.batch_size  # decode and score in micro-batches: a 512×512 decode of every sample at once OOMs
    scores = []
    with torch.no_grad():
        for s in range(0, n, mb):
            lr, _ = trainer.reward_fn(trainer.backbone.decode(samples[s:s + mb].to(trainer.device)),
                                      None if prompts is None else prompts[s:s + mb], None)
            scores.append(lr.float().cpu())
    lr = torch.cat(scores)
    out["eval_reward_mean"] = float(lr.mean())
    out["eval_reward_std"] = float(lr.std()) if n > 1 else 0.0
    toy = _is_toy(trainer.backbone) and cfg.reward.name == "gaussian_bump"
    if toy:
        from fastnabla.backbones.toy2d import mode_weights, total_variation

        target = _target(trainer)
        tv, off = total_variation(samples, trainer.backbone.means.cpu(), target)
        w, _ = mode_weights(samples, trainer.backbone.means.cpu())
        out.update(tv=tv, off_manifold=off)
        if final:
            # exact target samples are off the manifold too (a component's tail beyond the radius; sharp rewards move
            # the tilted components): the bar for the model's off-manifold mass
            r, beta = cfg.reward, cfg.gfn.reward_scale
            exact = trainer.backbone.sample_target(20000, torch.Generator().manual_seed(cfg.seed + 104729), r.center,
                                                   r.width, beta)
            _, target_off = total_variation(exact, trainer.backbone.means.cpu(), target)
            out.update(mode_weights=[round(float(v), 4) for v in w], target_weights=[round(float(v), 4) for v in target],
                       num_samples=n, target_off_manifold=target_off)
    if final and trainer.is_main:
        if toy:
            np.save(os.path.join(trainer.out_dir, "final_samples.npy"), samples.numpy())
        if cfg.logging.plots:
            if toy:
                out["plots"] = [plot_toy2d(trainer, samples)]
            curves = plot_curves(trainer.out_dir, trainer.history)
            if curves:
                out.setdefault("plots", []).append(curves)
    return out


def plot_toy2d(trainer, samples: torch.Tensor) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bb, r, beta = trainer.backbone, trainer.cfg.reward, trainer.cfg.gfn.reward_scale
    lim = 3.5
    g, prior = bb.log_density_grid(lim)
    _, target = bb.log_density_grid(lim, center=r.center, width=r.width, beta=beta)
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.5), gridspec_kw={"width_ratios": [1, 1, 1, 1.15]})
    ax[0].imshow(np.exp(prior), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    ax[0].set_title("pretrained prior p_ref (exact)")
    h, _, _ = np.histogram2d(samples[:, 1].numpy(), samples[:, 0].numpy(), bins=120, range=[[-lim, lim], [-lim, lim]])
    ax[1].imshow(h, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    res = trainer.history[-1] if trainer.history else {}
    ax[1].set_title(f"finetuned samples (n={len(samples)})")
    ax[2].imshow(np.exp(target), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    ax[2].set_title(f"target p_ref·R^β (exact, β={beta:g})")
    for a in ax[:3]:
        a.plot([r.center[0]], [r.center[1]], "r+", ms=12, mew=2)
        a.set_xticks([])
        a.set_yticks([])
    from fastnabla.backbones.toy2d import mode_weights

    target = bb.target_weights(r.center, r.width, beta).numpy()
    got, _ = mode_weights(samples, bb.means.cpu())
    k = np.arange(len(target))
    ax[3].bar(k - 0.27, bb.weights.cpu().numpy(), 0.27, color="0.7", label="prior")
    ax[3].bar(k, got.numpy(), 0.27, label="finetuned")
    ax[3].bar(k + 0.27, target, 0.27, label="target")
    tv = 0.5 * float(np.abs(got.numpy() - target).sum())
    ax[3].set_title(f"mode weights (TV to target {tv:.3f})")
    ax[3].set_xticks(k, [f"({m[0]:g},{m[1]:g})" for m in bb.means.cpu().tolist()], rotation=60, fontsize=7)
    ax[3].legend(fontsize=8)
    fig.suptitle(f"toy2d: reward center {list(r.center)}, width {r.width:g}; epoch {res.get('epoch', '-')}")
    fig.tight_layout()
    path = os.path.join(trainer.out_dir, "toy2d_densities.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(out_dir: str, history: list) -> str | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    panels = [("reward_mean", "reward (mean log R of fresh samples)"), ("loss", "loss")]
    if "tv_batch" in history[0]:
        panels.append(("tv", "TV to the exact target"))
    fig, ax = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
    for a, (key, title) in zip(np.atleast_1d(ax), panels):
        if key == "tv":
            a.plot(ep, [h.get("tv_batch") for h in history], alpha=0.5, label="fresh batch")
            ev = [(h["epoch"], h["tv"]) for h in history if "tv" in h]
            if ev:
                a.plot(*zip(*ev), "o-", label="eval")
            a.axhline(0.10, color="gray", ls="--", lw=1, label="target 0.10")
            a.legend()
        else:
            a.plot(ep, [h.get(key, np.nan) for h in history])
            if key == "loss":
                a.set_yscale("log")
        a.set_title(title)
        a.set_xlabel("epoch")
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
