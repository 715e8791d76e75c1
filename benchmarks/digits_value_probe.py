"""How close the Gaussian sampler gets to the digits target when the tilt's push comes from a low-noise estimate.

    python benchmarks/digits_value_probe.py c358 --trajectories 8192 --steps 2000 --scales 1
    python benchmarks/digits_value_probe.py c3b05 --scales 1,1.5

The exact tilted sampler moves each step of the reference toward h_{k+1}(x) = E_ref[R^β(x_N) | x_{k+1} = x]:
p*(x_{k+1} | x_k) ∝ p_ref(x_{k+1} | x_k)·h_{k+1}(x_{k+1}). A Gaussian step gets the mean μ_ref(x_k) + σ_k²·∇log
h_{k+1}(μ_ref(x_k)). ∇-GFlowNet's returns recipe learns that push by regressing on Monte-Carlo gradient returns,
whose noise is 20–800× their state-dependent part in the middle of the chain (digits_returns_branch.py). This probe
asks what the same Gaussian family reaches when the push comes instead from a *value* h_φ(x, t) fitted to the scalar
R^β(x_N) ∈ [0, 1] of reference trajectories (binary cross-entropy with soft labels, whose minimiser is the
conditional mean): a bounded regression target rather than a gradient. The sampler is the file's (N, η, timesteps),
pushed at every step by s·σ_k²·∇log h_φ(μ_ref(x_k), t_{k+1}) (at the last step by the reward itself), with no policy
training; each scale s is evaluated as a run's evaluation is (``metrics.evaluate``: class-histogram TV to the
importance-sampled target, mean log R gap, within-class diversity relative to the target's).

It also reports the value's held-out fit per step: the share of Var(R^β) it explains on trajectories it did not
train on (its BCE-optimal predictions against the constant one).

Rows go to ``benchmarks/results/digits_value_probe_<task><tag>.csv``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def reference_trajectories(bb, coeffs, reward_fn, n: int, beta: float, seed: int, batch: int = 1024):
    """(xs (n, N+1, *S), y (n,) = R^β(x_N)) of n trajectories of the reference sampler."""
    import torch

    from fastnabla.sampling import sample_trajectories

    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    with torch.no_grad(), bb.reference_sampling():
        for s in range(0, n, batch):
            m = min(batch, n - s)
            tr = sample_trajectories(bb, m, g, coeffs, None, reward_fn)
            xs.append(tr.xs.cpu())
            ys.append((beta * tr.log_reward.cpu().double()).exp().float())
    return torch.cat(xs), torch.cat(ys)


def build_value(sample_shape):
    """The value net for states of shape (C, S, S): the flow net's UNet (channels 32, 64); see ``value_logit``."""
    from fastnabla.backbones.pixel import build_pixel_flow_net

    return build_pixel_flow_net(sample_shape[-1], (32, 64), sample_shape[0])


def value_logit(net, x, t):
    """logit h_φ(x, t) (B,): the mean of the net's output image."""
    return net(x, t).sample.mean((1, 2, 3))


def fit_value(xs, ys, timesteps, steps: int, batch: int, lr: float, seed: int):
    """h_φ(x, t) = sigmoid(``value_logit``), fitted by BCE to R^β over the states x_0 … x_{N−1}."""
    import torch

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n, N = xs.shape[0], xs.shape[1] - 1
    net = build_value(xs.shape[2:])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    net.train()
    for i in range(steps):
        rows = torch.randint(0, n, (batch,), generator=g)
        k = torch.randint(0, N, (batch,), generator=g)
        logit = value_logit(net, xs[rows, k], timesteps[k])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, ys[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def explained_share(net, xs, ys, timesteps) -> list[float]:
    """Per state k < N: 1 − MSE(h_φ, y) / Var(y) on held-out trajectories."""
    import torch

    out = []
    var = float(ys.var())
    with torch.no_grad():
        for k in range(xs.shape[1] - 1):
            h = torch.sigmoid(value_logit(net, xs[:, k], timesteps[k].expand(xs.shape[0])))
            out.append(1 - float((h - ys).square().mean()) / var)
    return out


def make_guide(bb, coeffs, reward_fn, net, beta: float, scale: float):
    """The sampler's output shift at step k: s·σ_k²·∇log h_{k+1}(μ_ref(x))/coef_out_k (∇ β·log R at the last step)."""
    import torch

    ts = bb.scheduler.timesteps
    N = ts.numel()

    def guide(x, k, cond, prompts):
        c = coeffs[k]
        with torch.no_grad():
            mu = c.mean(x, bb.reference(x, ts[k].expand(x.shape[0]), cond).to(x.dtype))
        with torch.enable_grad():
            z = mu.detach().requires_grad_(True)
            if k + 1 < N:
                log_h = torch.nn.functional.logsigmoid(value_logit(net, z, ts[k + 1].expand(z.shape[0])))
            else:
                log_h = beta * reward_fn(bb.decode(z), None, None)[0]
            (grad,) = torch.autograd.grad(log_h.sum(), z)
        return (scale * c.std.square() / c.coef_out * grad).detach()

    return guide


def main(argv=None) -> int:
    from benchmarks.common import digits_eval_figures, digits_figures_line, git_sha, write_rows
    from benchmarks.digits_sweep import TASKS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--trajectories", type=int, default=8192, help="reference trajectories the value learns from")
    ap.add_argument("--steps", type=int, default=2000, help="value training steps")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scales", default="1", help="comma-separated push scales s (1 = the Gaussian step of the tilt)")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides, key=value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    try:
        scales = [float(s) for s in a.scales.split(",")]
    except ValueError:
        ap.error(f"--scales {a.scales!r} must be comma-separated numbers, e.g. 1,1.5")
    if a.trajectories < 16:
        ap.error(f"--trajectories {a.trajectories}: need at least 16 (a tenth is held out)")

    import torch

    from fastnabla import metrics
    from fastnabla.config import load_config
    from fastnabla.trainer import build_trainer

    sha = git_sha()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(os.path.join(ROOT, "configs", "digits.yaml"),
                          [*TASKS[a.task], "logging.progress=false", *a.set], output_dir=out)
        tr = build_trainer(cfg)
        bb, coeffs, beta = tr.backbone, tr.coeffs, cfg.gfn.reward_scale
        ts = bb.scheduler.timesteps
        # the fitted value is kept (keyed by everything it depends on), so that more scales cost an evaluation only
        from fastnabla.digits import spec_hash

        key = spec_hash(dict(task=a.task, set=a.set, trajectories=a.trajectories, steps=a.steps, batch=a.batch,
                             lr=a.lr, seed=a.seed))
        saved = os.path.join(ROOT, "runs", "digits_value_probe", f"{a.task}-{key}.pt")
        if os.path.isfile(saved):
            st = torch.load(saved)
            net = build_value(bb.sample_shape)
            net.load_state_dict(st["state"])
            net = net.eval().requires_grad_(False)
            share, t_draw, t_fit = st["share"], st["draw_s"], st["fit_s"]
            print(f"loaded the value fitted before from {saved}", flush=True)
        else:
            t0 = time.time()
            xs, ys = reference_trajectories(bb, coeffs, tr.reward_fn, a.trajectories, beta, seed=10_000 + a.seed)
            t_draw = time.time() - t0
            hold = max(a.trajectories // 10, 1)
            t0 = time.time()
            net = fit_value(xs[hold:], ys[hold:], ts, a.steps, a.batch, a.lr, a.seed)
            t_fit = time.time() - t0
            share = explained_share(net, xs[:hold], ys[:hold], ts)
            os.makedirs(os.path.dirname(saved), exist_ok=True)
            torch.save({"state": net.state_dict(), "share": share, "draw_s": t_draw, "fit_s": t_fit}, saved + ".tmp")
            os.replace(saved + ".tmp", saved)
        print(f"drew {a.trajectories} reference trajectories in {t_draw:.0f} s, fitted the value in {t_fit:.0f} s; "
              "held-out share of Var(R^β) explained at t = "
              + ", ".join(f"{int(t)}: {s:.2f}" for t, s in zip(ts.tolist(), share)), flush=True)
        # every step is pushed: the policy network is the reference (no training), so the push is the only change
        tr.method.policy_from, tr.method.policy_to = 0, ts.numel()
        for s in scales:
            tr.method.guide = make_guide(bb, coeffs, tr.reward_fn, net, beta, s)
            t0 = time.time()
            torch.manual_seed(cfg.seed)
            ev = metrics.evaluate(tr.eval_ctx, final=False)
            row = dict(task=a.task, scale=s, trajectories=a.trajectories, value_steps=a.steps,
                       **digits_eval_figures(ev),
                       explained_share=" ".join(f"{int(t)}:{v:.3f}" for t, v in zip(ts.tolist(), share)),
                       samples=cfg.eval.num_samples, draw_s=round(t_draw, 1), fit_s=round(t_fit, 1),
                       eval_s=round(time.time() - t0, 1), overrides=" ".join(a.set), seed=a.seed, git_sha=sha,
                       date=datetime.date.today().isoformat())
            rows.append(row)
            print(f"scale {s}: {digits_figures_line(row)}", flush=True)
    path = os.path.join(ROOT, "benchmarks", "results", f"digits_value_probe_{a.task}{a.tag}.csv")
    write_rows(path, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
