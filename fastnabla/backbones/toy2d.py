"""toy2d: a 2-D Gaussian mixture whose exact denoiser is the pretrained model (ALGORITHM §6).

The prior is p_ref = Σ_i w_i N(μ_i, s_i² I). Under the forward process x_t = √ᾱ x_0 + √(1−ᾱ) ε the marginal stays a
mixture, Σ_i w_i N(√ᾱ μ_i, (ᾱ s_i² + 1 − ᾱ) I), so the optimal ε-prediction is known in closed form:
ε̂(x, t) = −√(1−ᾱ) ∇_x log p_t(x). With a Gaussian-bump reward log R = −‖x − c‖²/(2 w²), the target
p_ref·R^β is again a mixture with known weights, so a run can be scored exactly (``tilted_weights``).

The policy is the exact denoiser plus a residual MLP with a zero-initialised output layer (the toy's "LoRA"); the
flow network g_φ is an MLP with a zero-initialised output layer.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from fastnabla.backbones.base import Backbone


def mixture_from_config(grid: Sequence[float], std: float, weights: Optional[Sequence[float]] = None):
    g = torch.tensor([float(v) for v in grid], dtype=torch.float64)
    means = torch.cartesian_prod(g, g)  # (K, 2)
    k = means.shape[0]
    if weights is None:
        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    else:
        if len(weights) != k:
            raise ValueError(f"model.weights has {len(weights)} entries; the grid defines {k} components")
        w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("model.weights must be non-negative with a positive sum")
        w = w / w.sum()
    stds = torch.full((k,), float(std), dtype=torch.float64)
    return means, stds, w


def tilted_weights(means, stds, weights, center, width, beta) -> torch.Tensor:
    """Mixture weights of p_ref·R^β for log R = −‖x − c‖²/(2·width²) (ALGORITHM §6), float64."""
    d = means.shape[1]
    c = torch.as_tensor(center, dtype=torch.float64)
    v = stds.double() ** 2 + width**2 / beta
    logw = weights.double().log() - 0.5 * d * v.log() - ((means.double() - c) ** 2).sum(1) / (2 * v)
    return torch.softmax(logw, dim=0)


def mode_weights(samples: torch.Tensor, means: torch.Tensor, radius: float = 0.75):
    """Empirical mass of each component (every sample goes to its nearest mean) and the off-manifold mass (the
    fraction farther than ``radius`` from every mean; exact samples of a std-0.25 component give e^-4.5 ≈ 1.1%)."""
    dist = torch.cdist(samples.double(), means.double())
    near, idx = dist.min(dim=1)
    n = max(samples.shape[0], 1)
    return torch.bincount(idx, minlength=means.shape[0]).double() / n, float((near > radius).sum()) / n


def total_variation(samples: torch.Tensor, means: torch.Tensor, target: torch.Tensor, radius: float = 0.75):
    """(TV between the empirical mode weights and ``target``, off-manifold mass)."""
    w, off = mode_weights(samples, means, radius)
    return 0.5 * float((w - target).abs().sum()), off


class TimeMLP(nn.Module):
    """MLP on (x, Fourier features of t/T) with a zero-initialised output layer."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, num_train_timesteps: int = 1000,
                 n_freq: int = 8):
        super().__init__()
        self.T = float(num_train_timesteps)
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 8, persistent=False)
        mods, d_in = [], dim + 2 * n_freq
        for _ in range(layers - 1):
            mods += [nn.Linear(d_in, hidden), nn.SiLU()]
            d_in = hidden
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(d_in, dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = (t.to(x.dtype) / self.T).view(-1, 1) * self.freqs.to(x.dtype)
        h = torch.cat([x, tt.sin(), tt.cos()], dim=1)
        return self.head(self.body(h))


class Toy2DBackbone(Backbone):
    compiled_networks = ("residual", "flow_net")
    sample_shape = (2,)
    conditional = False

    def __init__(self, scheduler, means, stds, weights, hidden: int = 128, layers: int = 3, eta: float = 1.0):
        super().__init__()
        self.scheduler = scheduler
        self.eta = eta
        self.register_buffer("means", means.float())
        self.register_buffer("stds", stds.float())
        self.register_buffer("weights", weights.float())
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone())
        T = scheduler.config.num_train_timesteps
        self.residual = TimeMLP(2, hidden, layers, T)
        self.flow_net = TimeMLP(2, hidden, layers, T)

    @classmethod
    def from_config(cls, cfg) -> "Toy2DBackbone":
        from fastnabla.transitions import make_scheduler

        means, stds, w = mixture_from_config(cfg.model.grid, cfg.model.component_std, cfg.model.weights)
        base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
        sched = make_scheduler(cfg.sampling.scheduler, base, cfg.sampling.num_steps, cfg.sampling.timesteps)
        return cls(sched, means, stds, w, cfg.model.hidden, cfg.model.layers, cfg.sampling.eta)

    def exact_eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂(x, t) = −√(1−ᾱ)·∇ log p_t(x) for the mixture; differentiable in x."""
        a = self.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1)  # (B,1,1)
        mu = a.sqrt() * self.means.to(x.dtype).unsqueeze(0)  # (B,K,2)
        var = a * self.stds.to(x.dtype).view(1, -1, 1) ** 2 + (1 - a)  # (B,K,1)
        diff = x.unsqueeze(1) - mu  # (B,K,2)
        logp = self.weights.to(x.dtype).log().view(1, -1) - (diff**2).sum(-1) / (2 * var.squeeze(-1)) \
            - var.squeeze(-1).log()  # d/2·log(var) with d = 2
        post = torch.softmax(logp, dim=1).unsqueeze(-1)  # (B,K,1)
        score = -(post * diff / var).sum(1)
        return -(1 - a.view(-1, 1)).sqrt() * score

    def policy(self, x, t, cond=None):
        if self._reference_sampling:  # inside reference_sampling() (Backbone)
            return self.reference(x, t, cond)
        return self.exact_eps(x, t) + self.residual(x, t)

    def reference(self, x, t, cond=None):
        return self.exact_eps(x, t)

    def flow(self, x, t, cond=None):
        return self.flow_net(x, t)

    def policy_parameters(self):
        return list(self.residual.parameters())

    def flow_parameters(self):
        return list(self.flow_net.parameters())

    # --- the exact answer ---------------------------------------------------------------------------------------
    def target_weights(self, center, width, beta) -> torch.Tensor:
        return tilted_weights(self.means.double(), self.stds.double(), self.weights.double(), center, width, beta)

    def sample_prior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(self.weights.cpu().double(), n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means.cpu().double()[idx] + self.stds.cpu().double()[idx, None] * z).float()

    def sample_target(self, n: int, generator: torch.Generator, center, width, beta) -> torch.Tensor:
        """Exact samples of p_ref·R^β: each tilted component is N((s²c + v μ)/(s² + v), s²v/(s² + v)) with
        v = width²/β."""
        w = self.target_weights(center, width, beta)
        idx = torch.multinomial(w, n, replacement=True, generator=generator)
        s2 = self.stds.cpu().double()[idx, None] ** 2
        v = width**2 / beta
        c = torch.as_tensor(center, dtype=torch.float64)
        mean = (s2 * c + v * self.means.cpu().double()[idx]) / (s2 + v)
        std = (s2 * v / (s2 + v)).sqrt()
        return (mean + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()

    def log_density_grid(self, lim: float = 3.5, n: int = 200, center=None, width=None, beta=None):
        """log density of the prior (or of the exact target, given the reward) on an n×n grid, for plots."""
        g = torch.linspace(-lim, lim, n, dtype=torch.float64)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
        means, s2 = self.means.cpu().double(), self.stds.cpu().double() ** 2
        if center is None:
            w, mu, var = self.weights.cpu().double(), means, s2
        else:
            v = width**2 / beta
            c = torch.as_tensor(center, dtype=torch.float64)
            w, mu, var = self.target_weights(center, width, beta), (s2[:, None] * c + v * means) / (s2[:, None] + v), \
                s2 * v / (s2 + v)
        d2 = ((pts[:, None, :] - mu[None]) ** 2).sum(-1)
        logp = torch.logsumexp(w.log() - d2 / (2 * var) - torch.log(2 * math.pi * var), dim=1)
        return g.numpy(), logp.view(n, n).numpy()

    # --- evaluation hooks (exact: the prior is a known mixture and gaussian_bump tilts it in closed form) -----------
    min_final_samples = 4096

    def target_metrics(self, samples, reward_cfg, beta, final=False) -> dict:
        if reward_cfg.name != "gaussian_bump":
            return {}
        samples = samples.cpu()
        means = self.means.cpu()
        target = self.target_weights(reward_cfg.center, reward_cfg.width, beta)
        tv, off = total_variation(samples, means, target)
        out = {"tv": tv, "off_manifold": off}
        if final:
            # exact target samples are off the manifold too (a component's tail beyond the radius; sharp rewards move
            # the tilted components): the bar for the model's off-manifold mass
            exact = self.sample_target(20000, torch.Generator().manual_seed(104729), reward_cfg.center,
                                       reward_cfg.width, beta)
            _, target_off = total_variation(exact, means, target)
            w, _ = mode_weights(samples, means)
            out.update(mode_weights=[round(float(v), 4) for v in w],
                       target_weights=[round(float(v), 4) for v in target], target_off_manifold=target_off)
        return out

    def report_plots(self, samples, reward_cfg, beta, out_dir, title="") -> list:
        if reward_cfg.name != "gaussian_bump":
            return []
        return [plot_toy2d(self, samples, reward_cfg, beta, out_dir, title)]


def plot_toy2d(bb: "Toy2DBackbone", samples: torch.Tensor, r, beta: float, out_dir: str, title: str = "") -> str:
    """Prior, finetuned samples, exact target and mode weights side by side; writes ``toy2d_densities.png``."""
    import os

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = 3.5
    g, prior = bb.log_density_grid(lim)
    _, target = bb.log_density_grid(lim, center=r.center, width=r.width, beta=beta)
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.5), gridspec_kw={"width_ratios": [1, 1, 1, 1.15]})
    ax[0].imshow(np.exp(prior), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    ax[0].set_title("pretrained prior p_ref (exact)")
    h, _, _ = np.histogram2d(samples[:, 1].numpy(), samples[:, 0].numpy(), bins=120, range=[[-lim, lim], [-lim, lim]])
    ax[1].imshow(h, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    ax[1].set_title(f"finetuned samples (n={len(samples)})")
    ax[2].imshow(np.exp(target), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    ax[2].set_title(f"target p_ref·R^β (exact, β={beta:g})")
    for a in ax[:3]:
        a.plot([r.center[0]], [r.center[1]], "r+", ms=12, mew=2)
        a.set_xticks([])
        a.set_yticks([])
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
    fig.suptitle(f"toy2d: reward center {list(r.center)}, width {r.width:g}" + (f"; {title}" if title else ""))
    fig.tight_layout()
    path = os.path.join(out_dir, "toy2d_densities.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


