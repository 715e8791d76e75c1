"""A value h_φ(x, t) ≈ E_ref[R^β(x_N) | x_t = x] for the policy's fixed part (``gfn.value_guidance``).

The exact tilted sampler moves each reference step toward the Doob function h_{k+1}:
p*(x_{k+1} | x_k) ∝ p_ref(x_{k+1} | x_k)·h_{k+1}(x_{k+1}). A Gaussian step with the reference's σ_k gets, to first
order, the mean μ_ref(x_k) + σ_k²·∇log h_{k+1}(μ_ref(x_k)). With ``gfn.value_guidance`` = s the policy's mean carries
s times that push, and its network learns the rest from the gradient returns (``methods.nabla_gfn``).

h is fitted once, before training: binary cross-entropy with soft labels y = R^β(x_N) on the states of reference
trajectories (divided by the draw's largest R^β when that exceeds 1; a constant factor leaves ∇log h alone). The
minimiser is the conditional mean, so the fit is h under p_ref, and a bounded scalar label carries far less noise
per state than a gradient return (on digits 20–800× the returns' learnable share in the middle of the chain,
``benchmarks/digits_returns_branch.py``). The network is the backbone's (``Backbone.build_value_net``), its logit
the mean of its output. With ``gfn.value_bootstrap`` = b the labels of the states before the last mix in the
value's own (EMA) estimate at the next state, (1 − b)·y + b·h̄(x_{k+1}): the same conditional mean, with one step's
spread in the label instead of the whole remaining chain's. The trajectories are a draw of their own, or with
``gfn.value_draw: target`` the first ones of the importance-sampled target's draw, which then continues from them
(``digits.reference_samples``), so a first run samples them once. The fit is cached under the cache directory, keyed
by the reference weights, the sampler, the reward, β and the fit's settings.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import torch

from fastnabla.checkpoint import atomic_json, atomic_write

__all__ = ["value_logit", "guidance_scales", "reference_trajectories", "value_draw_stream", "reference_draw_path",
           "fit_value", "explained_share", "value_cache_path", "save_value", "ensure_value"]

#: the reference draw's seed is this plus ``gfn.value_seed``: its own stream, apart from training's and the target's
VALUE_DRAW_SEED = 10_000
#: trajectories per sampling call of the reference draw (part of the draw's cache key: it splits the noise stream)
DRAW_BATCH = 1024


def value_logit(net, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """logit h_φ(x, t), shape (B,): the mean of the value net's output over all but its first dimension (an output
    of shape (B,) is the logits themselves)."""
    out = net(x, t)
    out = getattr(out, "sample", out).float()
    return out if out.dim() == 1 else out.mean(tuple(range(1, out.dim())))


@torch.no_grad()
def guidance_scales(timesteps, first: int, stop: int, scale: float, last: Optional[float] = None) -> torch.Tensor:
    """The push's scale s_k per sampling step k (``gfn.value_guidance`` and ``gfn.value_guidance_last``), (N,)
    float32: ``scale`` at the policy's first step ``first``, ``last`` at its last step ``stop`` − 1, linear in the
    timestep between them; ``scale`` at every step when ``last`` is None (or the policy has one step). Steps outside
    [first, stop) keep ``scale``: the policy does not act there."""
    ts = torch.as_tensor([float(t) for t in timesteps], dtype=torch.float64)
    out = torch.full_like(ts, float(scale))
    if last is not None and stop - first > 1:
        t0, t1 = ts[first], ts[stop - 1]
        frac = (ts[first:stop] - t1) / (t0 - t1)  # 1 at the first policy step, 0 at the last
        out[first:stop] = last + (scale - last) * frac
    return out.float()


def reference_trajectories(backbone, coeffs, reward_fn, n: int, beta: float, seed: int, batch: int = DRAW_BATCH,
                           progress: bool = False, cache: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(xs (n, N+1, *S), y (n,)) of n trajectories of the reference sampler, y = R^β(x_N) (divided by its largest
    value when that exceeds 1), on the CPU.

    With ``cache`` (a directory) the states are read from, or written to, a file there keyed by the reference weights,
    the sampler, n, ``batch`` and ``seed`` (``reference_draw_path``), so fits with another reward, β or setting reuse
    one draw; log R is computed from x_N in the same batches either way."""
    from fastnabla.digits import _bar
    from fastnabla.sampling import sample_trajectories, terminal_log_reward

    path = reference_draw_path(backbone, n, seed, batch, cache) if cache else None
    if path and os.path.isfile(path):
        xs = torch.load(path, map_location="cpu")["xs"]
    else:
        g = torch.Generator().manual_seed(seed)
        parts = []
        bar = _bar(n, "sampling p_ref for the value", progress)
        with backbone.reference_sampling():
            for s in range(0, n, batch):
                parts.append(sample_trajectories(backbone, min(batch, n - s), g, coeffs).xs.cpu())
                bar.update(parts[-1].shape[0])
        bar.close()
        xs = torch.cat(parts)
        if path:  # with the generator's state after the draw: the target's draw continues it (``value_draw``)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda tmp: torch.save({"xs": xs, "generator": g.get_state()}, tmp))
    dev = backbone.device
    logs = [terminal_log_reward(backbone, reward_fn, xs[s:s + batch, -1].to(dev)).cpu().double()
            for s in range(0, n, batch)]
    lb = beta * torch.cat(logs)
    if not bool(torch.isfinite(lb).all()):
        raise ValueError("the value's labels need a finite log R on every reference sample; the reward returned "
                         "NaN or ±inf")
    return xs, (lb - lb.max().clamp(min=0.0)).exp().float()


def value_draw_stream(cfg) -> tuple[int, int]:
    """(seed, batch) of the value's reference draw: its own stream (``VALUE_DRAW_SEED`` + ``gfn.value_seed``, in
    ``DRAW_BATCH``es), or with ``gfn.value_draw: target`` the importance-sampled target's (``digits.GROUND_TRUTH_SEED``
    in ``digits.target_draw_batch``es), whose first trajectories it then is: the target's draw reads them back
    instead of sampling them again (``digits.reference_samples``)."""
    from fastnabla.digits import GROUND_TRUTH_SEED, target_draw_batch

    if cfg.gfn.value_draw == "target":
        return GROUND_TRUTH_SEED, target_draw_batch(cfg)
    return VALUE_DRAW_SEED + cfg.gfn.value_seed, DRAW_BATCH


def reference_draw_path(backbone, n: int, seed: int, batch: int, directory: str) -> str:
    """The file of ``reference_trajectories``' states under ``directory``: keyed by the reference weights, the
    sampler (scheduler, timesteps, η), n, the batch the draw is split into and the seed, not by the reward."""
    from fastnabla.digits import _reference_digest, spec_hash

    sched = backbone.scheduler
    spec = dict(kind="valuedraw", ref=_reference_digest(backbone), scheduler=type(sched).__name__,
                timesteps=[int(t) for t in sched.timesteps], eta=backbone.eta, n=n, batch=batch, seed=seed, version=1)
    return os.path.join(directory, f"valuedraw-{spec_hash(spec)}.pt")


def fit_value(build: Callable[[], torch.nn.Module], xs: torch.Tensor, ys: torch.Tensor, timesteps: torch.Tensor,
              steps: int, batch: int, lr: float, seed: int, progress: bool = False, bootstrap: float = 0.0,
              target_decay: float = 0.99, relative_floor: float = 0.0) -> torch.nn.Module:
    """h_φ = sigmoid(``value_logit``) of a net from ``build()`` (seeded by ``seed``), fitted by BCE over the states
    x_0 … x_{N−1} (AdamW, cosine to 0), returned frozen in eval mode.

    The label of x_k is ``ys`` (R^β(x_N)) when ``bootstrap`` = 0. With ``bootstrap`` = b > 0 the states k < N−1 take
    (1 − b)·y + b·h̄(x_{k+1}, t_{k+1}), h̄ an EMA (``target_decay``) of the net: both have the conditional mean
    E[R^β | x_k] as their expectation given x_k (the tower property, once h̄ fits the next state), and the one-step
    label carries only the next step's spread instead of the whole remaining chain's. x_{N−1}'s label stays y
    (h_N = R^β exactly).

    With ``relative_floor`` = f > 0 each state's BCE is divided by max(h_φ(x_k), f), h_φ detached (a weighted mean
    over the batch): the logit's gradient becomes (h − y)/h, a relative error, so states where h is small weigh as
    much as those where it is near 1. A weight that depends only on the state leaves the minimiser, E[y | x_k],
    alone; it moves what a net of limited size gets right, toward log h where R^β is small (the classes a β < 1
    target keeps at a few percent)."""
    import copy

    from fastnabla.digits import _bar, _ema_update

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n, N = xs.shape[0], xs.shape[1] - 1
    net = build()
    target = copy.deepcopy(net).eval().requires_grad_(False) if bootstrap > 0 else None
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    net.train()
    bar = _bar(steps, "fitting the value", progress)
    for _ in range(steps):
        rows = torch.randint(0, n, (batch,), generator=g)
        k = torch.randint(0, N, (batch,), generator=g)
        label = ys[rows]
        if target is not None:
            inner = (k < N - 1).nonzero(as_tuple=True)[0]
            if inner.numel():
                with torch.no_grad():
                    nxt = torch.sigmoid(value_logit(target, xs[rows[inner], k[inner] + 1], timesteps[k[inner] + 1]))
                label = label.clone()
                label[inner] = (1 - bootstrap) * label[inner] + bootstrap * nxt
        logit = value_logit(net, xs[rows, k], timesteps[k])
        if relative_floor > 0:
            w = 1 / torch.sigmoid(logit.detach()).clamp(min=relative_floor)
            each = torch.nn.functional.binary_cross_entropy_with_logits(logit, label, reduction="none")
            loss = (w * each).sum() / w.sum()
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if target is not None:
            _ema_update(target, net, target_decay)
        bar.update(1)
        bar.set_postfix(bce=f"{loss.item():.4f}", refresh=False)
    bar.close()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def explained_share(net, xs: torch.Tensor, ys: torch.Tensor, timesteps: torch.Tensor) -> list[float]:
    """Per state k < N: 1 − MSE(h_φ(x_k), y)/Var(y) on trajectories (held out from the fit)."""
    out, var = [], float(ys.var())
    for k in range(xs.shape[1] - 1):
        h = torch.sigmoid(value_logit(net, xs[:, k], timesteps[k].expand(xs.shape[0])))
        out.append(1 - float((h - ys).square().mean()) / var)
    return out


def value_cache_path(backbone, cfg) -> tuple[str, dict]:
    """(the cache file of ``cfg``'s value, its key): the reference weights, the sampler, the reward, β and the fit's
    settings (``gfn.value_*``), under ``model.cache_dir``."""
    from fastnabla.digits import _reference_digest, cache_root, spec_hash

    g, sched = cfg.gfn, backbone.scheduler
    spec = dict(kind="value", ref=_reference_digest(backbone), scheduler=type(sched).__name__,
                timesteps=[int(t) for t in sched.timesteps], eta=backbone.eta, reward=cfg.reward.name,
                reward_options=cfg.reward.options, beta=g.reward_scale, channels=list(g.value_channels),
                trajectories=g.value_trajectories, steps=g.value_steps, batch=g.value_batch, lr=g.value_lr,
                seed=g.value_seed, version=1, **({"bootstrap": g.value_bootstrap} if g.value_bootstrap else {}),
                **({"relative_floor": g.value_relative_floor} if g.value_relative_floor else {}),
                **({"net": g.value_net} if g.value_net != "unet" else {}),
                **({"draw": g.value_draw, "draw_batch": value_draw_stream(cfg)[1]} if g.value_draw != "own" else {}))
    return os.path.join(cache_root(cfg.model.cache_dir), f"value-{spec_hash(spec)}.pt"), spec


def save_value(path: str, net, meta: dict) -> None:
    """Writes a fitted value and its meta (atomically), with the meta also as JSON beside it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"state": net.state_dict(), "meta": meta}, tmp))
    atomic_json(path[:-3] + ".json", meta, indent=1)


def ensure_value(backbone, coeffs, reward_fn, cfg, progress: Optional[bool] = None):
    """(h_φ frozen, meta) for ``cfg``: loaded from the cache (``value_cache_path``), else drawn, fitted and cached.

    meta: the draw's seconds (its read when ``draw_cached``: ``reference_trajectories`` keeps the draw apart), the
    fit's seconds, the held-out explained share of Var(R^β) per timestep (a tenth of the trajectories is held out)
    and the cache key."""
    g, progress = cfg.gfn, cfg.logging.progress if progress is None else progress
    if backbone.conditional:
        raise ValueError("gfn.value_guidance fits a value on unconditional reference trajectories, but the backbone "
                         "is conditional; set gfn.value_guidance=0")
    build = lambda: backbone.build_value_net(g.value_channels, g.value_net)  # noqa: E731
    net = build()  # first: a backbone without a value net says so before any work
    path, spec = value_cache_path(backbone, cfg)
    if os.path.isfile(path):
        st = torch.load(path, map_location="cpu")
        net.load_state_dict(st["state"])
        return net.to(backbone.device).eval().requires_grad_(False), st["meta"]
    from fastnabla.digits import cache_root

    ts, root = backbone.scheduler.timesteps.cpu(), cache_root(cfg.model.cache_dir)
    seed, batch = value_draw_stream(cfg)
    draw_cached = os.path.isfile(reference_draw_path(backbone, g.value_trajectories, seed, batch, root))
    t0 = time.time()
    xs, ys = reference_trajectories(backbone, coeffs, reward_fn, g.value_trajectories, g.reward_scale, seed, batch,
                                    progress=progress, cache=root)
    draw_s, hold = time.time() - t0, max(g.value_trajectories // 10, 1)
    t0 = time.time()
    net = fit_value(lambda: build().cpu(), xs[hold:], ys[hold:], ts, g.value_steps, g.value_batch, g.value_lr,
                    g.value_seed, progress=progress, bootstrap=g.value_bootstrap,
                    relative_floor=g.value_relative_floor)
    share = explained_share(net, xs[:hold], ys[:hold], ts)
    meta = dict(draw_s=round(draw_s, 1), draw_cached=draw_cached, fit_s=round(time.time() - t0, 1),
                explained_share={int(t): round(v, 4) for t, v in zip(ts.tolist(), share)}, spec=spec)
    save_value(path, net, meta)
    return net.to(backbone.device), meta
