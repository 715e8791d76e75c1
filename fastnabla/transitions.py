"""Per-transition coefficients of diffusers samplers (ALGORITHM §2).

Every sampler fastnabla trains through has a Gaussian transition whose mean is affine in the current state x and
the network output ``out``::

    μ  = coef_x · x + coef_out · out          x' = μ + std · z,  z ~ N(0, I)
    x̂0 = x0_coef_x · x + x0_coef_out · out    (the predicted clean sample)

so one set of per-transition scalars describes the sampler and everything downstream (the loss, the kernels,
the trainer) is sampler-agnostic. ``transition_coefficients`` reads those scalars off a diffusers scheduler
after ``set_timesteps``; the tests check that ``μ + std·z`` equals the scheduler's own ``step(...)``.

Supported: ``DDIMScheduler`` (η > 0 for training; η = 0 gives std = 0; ``ListedDDIMScheduler`` for an explicit
timestep list), ``DDPMScheduler`` (fixed_small,
fixed_small_log and fixed_large variances) and first-order ``sde-dpmsolver++``
(``DPMSolverMultistepScheduler``/``DPMSolverSinglestepScheduler`` with ``solver_order=1``), each with ε-, v- or
sample-prediction. Everything is computed in float64 and cast at the end.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

__all__ = ["TransitionCoefficients", "transition_coefficients", "make_scheduler", "schedule_coefficients",
           "ListedDDIMScheduler"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class TransitionCoefficients:
    """Per-transition scalars, each a (B,) tensor (see the module docstring for their meaning).

    ``alpha_prod`` is ᾱ at the transition's start state x (the forward-looking attenuation γ reads it).
    ``inv_var`` = 1/std² (inf where std = 0).

    This class is the one place the affine transition is written: sampling steps with ``step``, the objective
    forms μ, x̂0 and the reverse score with ``mean``, ``pred_x0`` and ``reverse_score``, and the tests check them
    against diffusers' own ``scheduler.step``. Indexing (``c[k]``) selects transitions; an int index gives 0-d
    fields, which broadcast the same way.
    """

    coef_x: torch.Tensor
    coef_out: torch.Tensor
    std: torch.Tensor
    x0_coef_x: torch.Tensor
    x0_coef_out: torch.Tensor
    alpha_prod: torch.Tensor

    @property
    def inv_var(self) -> torch.Tensor:
        return 1.0 / (self.std * self.std)

    def to(self, *args, **kwargs) -> "TransitionCoefficients":
        return TransitionCoefficients(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})

    def __getitem__(self, index) -> "TransitionCoefficients":
        return TransitionCoefficients(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def mean(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """μ = coef_x·x + coef_out·out, broadcasting the (B,) scalars over the sample dims."""
        return _bcast(self.coef_x, x) * x + _bcast(self.coef_out, x) * out

    def pred_x0(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x̂0 = x0_coef_x·x + x0_coef_out·out."""
        return _bcast(self.x0_coef_x, x) * x + _bcast(self.x0_coef_out, x) * out

    def step(self, x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x' = μ + std·z (z = ``noise``; the mean alone when ``noise`` is None)."""
        mu = self.mean(x, out)
        return mu if noise is None else mu + _bcast(self.std, x) * noise

    def reverse_cotangent(self, x: torch.Tensor, out: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """v = (x' − μ)/σ², detached: the reverse score is (∂μ/∂x)ᵀ·v."""
        return ((x_next - self.mean(x, out)) * _bcast(self.inv_var, x)).detach()

    def mean_vjp(self, v: torch.Tensor, out_vjp: torch.Tensor) -> torch.Tensor:
        """(∂μ/∂x)ᵀ·v = coef_x·v + (∂out/∂x)ᵀ·(coef_out·v), given ``out_vjp`` = the network's input-VJP of
        coef_out·v (``out_cotangent``), e.g. from ``Backbone.reference_vjp``."""
        return _bcast(self.coef_x, v) * v + out_vjp

    def out_cotangent(self, v: torch.Tensor) -> torch.Tensor:
        """coef_out·v: the cotangent of the network output whose input-VJP ``mean_vjp`` needs."""
        return _bcast(self.coef_out, v) * v

    def log_density(self, x_next: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """Elementwise log N(x'; μ, std²), (B, *S): −(x' − μ)²/(2σ²) − log σ − ½·log 2π (DDPO's ratio, §5c)."""
        std = _bcast(self.std, x_next)
        return -(x_next - mu).square() / (2 * std * std) - std.log() - 0.5 * math.log(2 * math.pi)

    def reverse_score(self, x: torch.Tensor, mu: torch.Tensor, x_next: torch.Tensor,
                      retain_graph: bool = False) -> torch.Tensor:
        """s_R = (∂μ/∂x)ᵀ·(x' − μ)/σ², the score of the transition density w.r.t. its start state (ALGORITHM §3).

        ``mu`` = ``self.mean(x, out(x))`` with a graph to ``x`` (which requires grad); one input-VJP. Detached.
        """
        v = ((x_next - mu) * _bcast(self.inv_var, x)).detach()
        (s,) = torch.autograd.grad(mu, x, grad_outputs=v, retain_graph=retain_graph)
        return s.detach()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) or 0-d per-transition scalar shaped to broadcast over ``like``'s sample dims, in its dtype."""
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def check_timestep_list(timesteps, num_train_timesteps: Optional[int] = None) -> list[int]:
    """``sampling.timesteps`` as a list of ints: strictly decreasing, ≥ 0 and, when the model's
    ``num_train_timesteps`` is given, below it. The one check of an explicit schedule (the config's and the
    scheduler's); a ValueError names what is wrong."""
    ts = list(timesteps) if isinstance(timesteps, (list, tuple)) else timesteps
    if not isinstance(ts, list) or not ts or not all(isinstance(v, int) and not isinstance(v, bool) for v in ts):
        raise ValueError(f"sampling.timesteps: {ts!r} must be a non-empty list of ints, e.g. [951, 801, 651, 501, 1]")
    if any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0:
        raise ValueError(f"sampling.timesteps: {ts!r} must be strictly decreasing and ≥ 0 (the sampler runs from "
                         "noise to data)")
    if num_train_timesteps is not None and ts[0] >= num_train_timesteps:
        raise ValueError(f"sampling.timesteps: {ts!r} must lie in [0, {num_train_timesteps - 1}] (the model's "
                         "num_train_timesteps)")
    return ts


@functools.lru_cache(maxsize=None)
def _listed_ddim_class():
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    class ListedDDIMScheduler(DDIMScheduler):
        """DDIM between consecutive timesteps of an explicit, possibly non-uniform, descending list.

        diffusers' ``DDIMScheduler.step`` assumes a uniform stride (prev = t − T/N). Here the step from the k-th
        listed timestep goes to the (k+1)-th, and the step from the last to ``final_alpha_cumprod`` as DDIM's does;
        with the uniform list it is ``DDIMScheduler``. ``step`` applies ``transition_coefficients``, the one place
        the affine transition is written; the tests check it against diffusers' DDPM posterior (η = 1) on the same
        list and against ``DDIMScheduler`` on the uniform one.
        """

        def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
            if timesteps is None:
                return super().set_timesteps(num_inference_steps, device)
            ts = check_timestep_list(timesteps, self.config.num_train_timesteps)
            if num_inference_steps is not None and num_inference_steps != len(ts):
                raise ValueError(f"num_inference_steps={num_inference_steps} but {len(ts)} timesteps are listed")
            self.num_inference_steps = len(ts)
            self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)

        def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
                 generator=None, variance_noise=None, return_dict: bool = True):
            c = transition_coefficients(self, [int(timestep)], eta=eta, dtype=sample.dtype, device=sample.device)
            if variance_noise is None:
                variance_noise = torch.randn(sample.shape, generator=generator, device=sample.device,
                                             dtype=sample.dtype)
            prev = c[0].step(sample, model_output, variance_noise)
            x0 = c[0].pred_x0(sample, model_output)
            if not return_dict:
                return prev, x0
            return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    return ListedDDIMScheduler


def __getattr__(name):  # the subclass needs diffusers, which this module otherwise imports lazily
    if name == "ListedDDIMScheduler":
        return _listed_ddim_class()
    raise AttributeError(name)


def make_scheduler(kind: str, base_config: dict, num_steps: int, timesteps: Sequence[int] | None = None):
    """A diffusers scheduler of ``kind`` (ddim | ddpm | sde-dpmsolver++) built from a model's scheduler config, with
    the settings fastnabla needs (no clipping/thresholding: the transition stays affine), after
    ``set_timesteps(num_steps)``, or on the explicit descending ``timesteps`` list (``sampling.timesteps``; ddim
    through ``ListedDDIMScheduler``, ddpm natively)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    cfg = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    cfg.update(clip_sample=False, thresholding=False)
    if timesteps is not None and len(timesteps) != num_steps:
        raise ValueError(f"sampling.timesteps lists {len(timesteps)} timesteps but sampling.num_steps={num_steps}; "
                         "set them to agree")
    if kind == "ddim":
        sched = (DDIMScheduler if timesteps is None else _listed_ddim_class()).from_config(cfg)
    elif kind == "ddpm":
        cfg.setdefault("variance_type", "fixed_small")
        sched = DDPMScheduler.from_config(cfg)
    elif kind == "sde-dpmsolver++":
        if timesteps is not None:
            raise ValueError("sampling.timesteps is supported with sampling.scheduler=ddim or ddpm, not "
                             "sde-dpmsolver++; remove it or change the scheduler")
        cfg.update(algorithm_type="sde-dpmsolver++", solver_order=1, lower_order_final=True)
        sched = DPMSolverMultistepScheduler.from_config(cfg)
    else:
        raise ValueError(f"sampling.scheduler={kind!r}: must be ddim, ddpm or sde-dpmsolver++")
    if timesteps is None:
        sched.set_timesteps(num_steps)
    else:
        sched.set_timesteps(timesteps=check_timestep_list(timesteps, sched.config.num_train_timesteps))
    return sched


def schedule_coefficients(scheduler, eta: float, device=None) -> "TransitionCoefficients":
    """Coefficients of every step of ``scheduler``'s schedule, (N,) float32 fields (step k starts at timesteps[k])."""
    return transition_coefficients(scheduler, scheduler.timesteps, eta=eta, device=device)


def _as_timesteps(timesteps) -> torch.Tensor:
    if isinstance(timesteps, torch.Tensor):
        t = timesteps.detach().reshape(-1)
    elif isinstance(timesteps, (int, float)):
        t = torch.tensor([timesteps])
    elif isinstance(timesteps, Sequence):
        t = torch.as_tensor(list(timesteps))
    else:
        raise ValueError(f"timesteps must be an int, a sequence or a 1-D tensor, got {type(timesteps).__name__}")
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError("timesteps must be integers (the scheduler's discrete timesteps)")
    return t.to("cpu", torch.long)


def _check_common(scheduler) -> None:
    cfg = scheduler.config
    name = type(scheduler).__name__
    if getattr(scheduler, "num_inference_steps", None) is None and not getattr(scheduler, "custom_timesteps", False):
        raise ValueError(f"{name}: set_timesteps was not called; call scheduler.set_timesteps(num_steps) first")
    if cfg.get("clip_sample", False):
        raise ValueError(
            f"{name}: clip_sample=True makes the transition mean non-affine in the model output; "
            "create the scheduler with clip_sample=False"
        )
    if cfg.get("thresholding", False):
        raise ValueError(
            f"{name}: thresholding=True makes the transition mean non-affine in the model output; "
            "create the scheduler with thresholding=False"
        )
    pt = cfg.get("prediction_type", "epsilon")
    if pt not in _PREDICTION_TYPES:
        raise ValueError(f"{name}: prediction_type={pt!r} is not supported; use one of {_PREDICTION_TYPES}")
    vt = cfg.get("variance_type", None)
    if vt in ("learned", "learned_range"):
        raise ValueError(f"{name}: variance_type={vt!r} (a learned variance) is not supported; use a fixed variance")


def _x0_and_eps_coefs(pred_type: str, a: torch.Tensor, s: torch.Tensor):
    """x̂0 and ε̂ as affine maps of (x, out) given x = a·x0 + s·ε (a = √ᾱ, s = √(1−ᾱ) for DDPM-style)."""
    if pred_type == "epsilon":
        x0 = (1.0 / a, -s / a)
        eps = (torch.zeros_like(a), torch.ones_like(a))
    elif pred_type == "sample":
        x0 = (torch.zeros_like(a), torch.ones_like(a))
        eps = (1.0 / s, -a / s)
    else:  # v_prediction, with a² + s² = 1
        x0 = (a, -s)
        eps = (s, a)
    return x0, eps


def _position(scheduler, t: torch.Tensor) -> torch.Tensor:
    """Index of each timestep in ``scheduler.timesteps`` (clear error for a timestep not in the schedule)."""
    sched_t = scheduler.timesteps.detach().to("cpu").reshape(-1)
    if sched_t.is_floating_point():
        sched_t = sched_t.round()
    sched_t = sched_t.long()
    if torch.unique(sched_t).numel() != sched_t.numel():
        raise ValueError(f"{type(scheduler).__name__}: the schedule repeats a timestep; the transition is ambiguous")
    match = t.view(-1, 1) == sched_t.view(1, -1)
    found = match.any(dim=1)
    if not bool(found.all()):
        bad = t[~found][:4].tolist()
        raise ValueError(f"timesteps {bad} are not in the scheduler's schedule (scheduler.timesteps)")
    return match.float().argmax(dim=1)


def _next_on_schedule(scheduler, t: torch.Tensor) -> torch.Tensor:
    """The schedule's timestep after each of t (−1 after the last one); t must be on the schedule."""
    pos = _position(scheduler, t)
    sched_t = scheduler.timesteps.detach().to("cpu").long()
    n = sched_t.numel()
    return torch.where(pos < n - 1, sched_t[(pos + 1).clamp(max=n - 1)], torch.full_like(t, -1))


def _ddim(scheduler, t: torch.Tensor, eta: float):
    cfg = scheduler.config
    ac = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
    if bool(((t < 0) | (t >= ac.numel())).any()):
        raise ValueError(f"timesteps must lie in [0, {ac.numel() - 1}]")
    if any(c.__name__ == "ListedDDIMScheduler" for c in type(scheduler).__mro__):
        prev = _next_on_schedule(scheduler, t)
    else:
        prev = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    final = float(scheduler.final_alpha_cumprod)
    a_t = ac[t]
    a_p = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.full_like(a_t, final))
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    std = eta * var.clamp(min=0).sqrt()
    dir2 = 1 - a_p - std**2
    if bool((dir2 < -1e-12).any()):
        raise ValueError(f"eta={eta} is too large: the DDIM direction term 1 − ᾱ' − σ² is negative; use 0 < eta ≤ 1")
    c = dir2.clamp(min=0).sqrt()
    (x0x, x0o), (ex, eo) = _x0_and_eps_coefs(cfg.prediction_type, a_t.sqrt(), (1 - a_t).sqrt())
    coef_x = a_p.sqrt() * x0x + c * ex
    coef_out = a_p.sqrt() * x0o + c * eo
    return coef_x, coef_out, std, x0x, x0o, a_t


def _ddpm(scheduler, t: torch.Tensor, eta: float):
    cfg = scheduler.config
    if eta != 1.0:
        raise ValueError("DDPMScheduler has no eta (its variance is fixed by variance_type); pass eta=1.0")
    vt = cfg.variance_type
    if vt not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ValueError(f"DDPMScheduler variance_type={vt!r} is not supported")
    ac = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
    # diffusers' own convention: the step after the last one lands on ᾱ = 1 (a clean sample, no noise).
    prev = _next_on_schedule(scheduler, t)
    a_t = ac[t]
    a_p = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones_like(a_t))
    alpha_cur = a_t / a_p
    beta_cur = 1 - alpha_cur
    (x0x, x0o), _ = _x0_and_eps_coefs(cfg.prediction_type, a_t.sqrt(), (1 - a_t).sqrt())
    c0 = a_p.sqrt() * beta_cur / (1 - a_t)  # weight of x̂0
    cx = alpha_cur.sqrt() * (1 - a_p) / (1 - a_t)  # weight of x
    coef_x = cx + c0 * x0x
    coef_out = c0 * x0o
    if vt.startswith("fixed_small"):
        # zero at the last step (ᾱ' = 1); diffusers clamps it to 1e-20, a numerical zero.
        var = (1 - a_p) / (1 - a_t) * beta_cur
    else:
        var = beta_cur
    std = var.clamp(min=0).sqrt()
    std = torch.where(t <= 0, torch.zeros_like(std), std)  # diffusers adds no noise at t = 0
    return coef_x, coef_out, std, x0x, x0o, a_t


def _dpm_sde(scheduler, t: torch.Tensor, eta: float):
    cfg = scheduler.config
    name = type(scheduler).__name__
    if cfg.algorithm_type != "sde-dpmsolver++":
        raise ValueError(
            f"{name} algorithm_type={cfg.algorithm_type!r} is deterministic (no transition density to train); "
            "use algorithm_type='sde-dpmsolver++' with solver_order=1"
        )
    if cfg.solver_order != 1:
        raise ValueError(
            f"{name} solver_order={cfg.solver_order}: higher-order steps depend on earlier outputs, so the "
            "transition is not affine in the current output; use solver_order=1"
        )
    if cfg.get("use_flow_sigmas", False):
        raise ValueError(f"{name}: use_flow_sigmas=True is not supported")
    if eta != 1.0:
        raise ValueError(f"{name} has no eta parameter; pass eta=1.0")
    pos = _position(scheduler, t)
    sig = scheduler.sigmas.detach().to("cpu", torch.float64)
    s_s, s_t = sig[pos], sig[pos + 1]

    def alpha_sigma(s):
        alpha = 1.0 / (s**2 + 1).sqrt()
        return alpha, s * alpha

    al_s, sg_s = alpha_sigma(s_s)
    al_t, sg_t = alpha_sigma(s_t)
    # e^{-h} with h = λ_t − λ_s, λ = log(α/σ): a ratio, so the final step (σ_t = 0) gives exactly 0.
    e = (sg_t / al_t) / (sg_s / al_s)
    (x0x, x0o), _ = _x0_and_eps_coefs(cfg.prediction_type, al_s, sg_s)
    w0 = al_t * (1 - e**2)
    coef_x = sg_t / sg_s * e + w0 * x0x
    coef_out = w0 * x0o
    std = sg_t * (1 - e**2).clamp(min=0).sqrt()
    return coef_x, coef_out, std, x0x, x0o, al_s**2


_HANDLERS = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "DPMSolverMultistepScheduler": _dpm_sde,
    "DPMSolverSinglestepScheduler": _dpm_sde,
}


def transition_coefficients(
    scheduler,
    timesteps,
    eta: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TransitionCoefficients:
    """Per-transition coefficients of ``scheduler``'s step from each of ``timesteps`` (ALGORITHM §2/§4).

    Args:
        scheduler: a diffusers DDIM/DDPM/first-order SDE-DPM-Solver++ scheduler after ``set_timesteps``.
        timesteps: (B,) tensor, list or int; the timestep τ_k each transition starts from (may differ per
            sample).
        eta: DDIM noise level (η = 1 is DDPM's posterior); must be 1.0 for the other schedulers.
        dtype, device: of the returned tensors (computed in float64 on the CPU).

    Returns:
        ``TransitionCoefficients`` with (B,) fields; ``c.step(x, out, z)`` equals
        ``scheduler.step(out, t, x, eta=eta, variance_noise=z).prev_sample``.

    A deterministic transition (η = 0, or DDPM's last step) comes back with std = 0: fine for sampling, refused
    by ``residual_db_loss`` (its inv_var is infinite).
    """
    cls = type(scheduler).__name__
    handler = next((h for n, h in _HANDLERS.items() if any(c.__name__ == n for c in type(scheduler).__mro__)), None)
    if handler is None:
        raise ValueError(
            f"unsupported scheduler class {cls}; supported: DDIMScheduler, DDPMScheduler, "
            "DPMSolverMultistepScheduler/DPMSolverSinglestepScheduler (algorithm_type='sde-dpmsolver++', "
            "solver_order=1)"
        )
    if not (isinstance(eta, (int, float)) and eta >= 0 and eta == eta):
        raise ValueError(f"eta must be a number ≥ 0, got {eta!r}")
    _check_common(scheduler)
    if device is None:
        device = timesteps.device if isinstance(timesteps, torch.Tensor) else "cpu"
    t = _as_timesteps(timesteps)
    vals = handler(scheduler, t, float(eta))
    names = ("coef_x", "coef_out", "std", "x0_coef_x", "x0_coef_out", "alpha_prod")
    out = {}
    for n, v in zip(names, vals):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{cls}: non-finite {n} for timesteps {t.tolist()[:8]}; check the scheduler config")
        out[n] = v.to(device=device, dtype=dtype)
    return TransitionCoefficients(**out)
