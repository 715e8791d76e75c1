"""The per-transition residual ∇-DB loss (ALGORITHM §4): validation, dispatch, and the pure-PyTorch reference.

For each trained transition b, with the sample dims S flattened and every mean taken over S::

    d      = [(1−λ)·(coef_x·x − x') + coef_out·(out − λ·out_ref)] · inv_var     (= s_F^θ − λ·s_F^ref)
    g'     = flow_next · (1 − terminal)                                          (g' := 0 at a terminal x')
    L_F    = mean (d − reward_grad_next − g')²
    L_T    = terminal · mean flow_next²                                         (if flow_next is given)
    L_R    = (1 − terminal) · mean (score_rev − λ·score_rev_ref + flow_cur + reward_grad_cur)²
    L_reg  = mean (out − out_old)²
    loss_b = L_F + terminal_scale·L_T + reverse_scale·L_R + trust_region_scale·L_reg

Gradients reach ``out``, ``flow_next`` and ``flow_cur`` only; everything else is treated as data. The reference
is the spec: it is what the tests and benchmarks compare the Triton kernel with, so it stays readable.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["residual_db_loss", "residual_db_loss_reference", "residual_db_loss_cfg", "residual_db_loss_cfg_reference",
           "LossInputs", "validate_loss_inputs", "STAT_NAMES"]

_log = logging.getLogger(__name__)

#: keys of the per-transition statistics returned with ``return_stats=True`` (each a detached (B,) float32).
STAT_NAMES = (
    "loss_forward",  # L_F
    "loss_terminal",  # L_T (0 where not terminal or no flow_next)
    "loss_reverse",  # L_R (0 where unused)
    "loss_trust_region",  # L_reg (0 where unused)
    "norm_d",  # ‖d‖ over the sample dims
    "norm_reward_grad_next",  # ‖reward_grad_next‖
    "norm_flow_next",  # ‖flow_next‖ (0 without a flow)
    "norm_out_delta",  # ‖out − out_old‖ (0 without out_old)
)

_FULL = ("out", "out_ref", "reward_grad_next", "flow_next", "x", "x_next", "out_old", "score_rev", "score_rev_ref",
         "flow_cur", "reward_grad_cur")
_SCALARS = ("coef_out", "inv_var", "coef_x", "terminal")


@dataclass
class LossInputs:
    """Validated arguments of ``residual_db_loss``; tensors that a setting does not use are None."""

    out: torch.Tensor
    out_ref: torch.Tensor
    coef_out: torch.Tensor
    inv_var: torch.Tensor
    reward_grad_next: torch.Tensor
    flow_next: Optional[torch.Tensor]
    terminal: Optional[torch.Tensor]  # (B,) float in {0, 1}, or None for "no terminal transition"
    strength: float
    x: Optional[torch.Tensor]
    x_next: Optional[torch.Tensor]
    coef_x: Optional[torch.Tensor]
    out_old: Optional[torch.Tensor]
    trust_region_scale: float
    reverse_scale: float
    score_rev: Optional[torch.Tensor]
    score_rev_ref: Optional[torch.Tensor]
    flow_cur: Optional[torch.Tensor]
    reward_grad_cur: Optional[torch.Tensor]
    terminal_scale: float

    @property
    def use_strength(self) -> bool:
        return self.strength != 1.0

    @property
    def use_trust(self) -> bool:
        return self.trust_region_scale != 0.0

    @property
    def use_reverse(self) -> bool:
        return self.reverse_scale != 0.0

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.out.dtype == torch.float64 else torch.float32


def _scalar_float(name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a Python number (one value for the whole batch), got shape "
                             f"{tuple(v.shape)}")
        v = v.item()
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def validate_loss_inputs(
    out, out_ref, *, coef_out, inv_var, reward_grad_next, flow_next=None, terminal=None, strength=1.0, x=None,
    x_next=None, coef_x=None, out_old=None, trust_region_scale=0.0, reverse_scale=0.0, score_rev=None,
    score_rev_ref=None, flow_cur=None, reward_grad_cur=None, terminal_scale=1.0, check_values=True,
) -> LossInputs:
    """Check every argument of ``residual_db_loss`` once; a ValueError names the argument at fault.

    ``check_values=False`` skips the checks that read tensor values (finite coefficients, inv_var > 0, terminal in
    {0, 1}): on a GPU each of them is a host–device sync. Shapes, devices and dtypes are always checked.
    """
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ValueError("out must be a tensor shaped (B, *S) with at least one sample dim")
    if not out.is_floating_point():
        raise ValueError(f"out must be a floating-point tensor, got {out.dtype}")
    B, shape, dev = out.shape[0], out.shape, out.device
    strength = _scalar_float("strength", strength)
    trust_region_scale = _scalar_float("trust_region_scale", trust_region_scale)
    reverse_scale = _scalar_float("reverse_scale", reverse_scale)
    terminal_scale = _scalar_float("terminal_scale", terminal_scale)

    args = dict(out=out, out_ref=out_ref, reward_grad_next=reward_grad_next, flow_next=flow_next, x=x,
                x_next=x_next, out_old=out_old, score_rev=score_rev, score_rev_ref=score_rev_ref,
                flow_cur=flow_cur, reward_grad_cur=reward_grad_cur, coef_out=coef_out, inv_var=inv_var,
                coef_x=coef_x, terminal=terminal)
    required = {"out", "out_ref", "reward_grad_next", "coef_out", "inv_var"}
    if strength != 1.0:
        required |= {"x", "x_next", "coef_x"}
    if trust_region_scale != 0.0:
        required |= {"out_old"}
    if reverse_scale != 0.0:
        required |= {"score_rev", "reward_grad_cur"}
        if strength != 0.0:
            required |= {"score_rev_ref"}
    why = {"x": "strength != 1", "x_next": "strength != 1", "coef_x": "strength != 1",
           "out_old": "trust_region_scale != 0", "score_rev": "reverse_scale != 0",
           "reward_grad_cur": "reverse_scale != 0", "score_rev_ref": "reverse_scale != 0 and strength != 0"}
    for name in sorted(required):
        if args[name] is None:
            raise ValueError(f"{name} is required when {why.get(name, 'always')}; pass a tensor")
    for name in _FULL:
        t = args[name]
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor shaped {tuple(shape)}, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of out)")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, expected {dev} (the device of out)")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name in _SCALARS:
        t = args[name]
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a per-transition tensor shaped ({B},), got {type(t).__name__}")
        if t.shape != (B,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({B},): one value per transition")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, expected {dev} (the device of out)")
    for name in ("coef_out", "coef_x", "inv_var"):
        t = args[name]
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name in ("coef_out", "coef_x") if check_values else ():
        t = args[name]
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN/inf (or is not floating point); check the scheduler coefficients")
    if check_values and not bool((torch.isfinite(inv_var) & (inv_var > 0)).all()):
        raise ValueError(
            "inv_var must be finite and > 0 on every transition: a deterministic step (σ = 0: eta = 0, or the last "
            "step with set_alpha_to_one=True) cannot be trained; use eta > 0 and set_alpha_to_one=False/steps_offset=1"
        )
    if terminal is not None:
        if terminal.dtype == torch.bool:
            terminal = terminal.to(torch.float32)
        elif check_values and not bool(((terminal == 0) | (terminal == 1)).all()):
            raise ValueError("terminal must be a bool tensor or contain only 0/1 values")
        else:
            terminal = terminal.to(torch.float32)
    return LossInputs(
        out=out, out_ref=out_ref, coef_out=coef_out, inv_var=inv_var, reward_grad_next=reward_grad_next,
        flow_next=flow_next, terminal=terminal, strength=strength,
        x=x if strength != 1.0 else None, x_next=x_next if strength != 1.0 else None,
        coef_x=coef_x if strength != 1.0 else None,
        out_old=out_old if trust_region_scale != 0.0 else None, trust_region_scale=trust_region_scale,
        reverse_scale=reverse_scale,
        score_rev=score_rev if reverse_scale != 0.0 else None,
        score_rev_ref=score_rev_ref if (reverse_scale != 0.0 and strength != 0.0) else None,
        flow_cur=flow_cur if reverse_scale != 0.0 else None,
        reward_grad_cur=reward_grad_cur if reverse_scale != 0.0 else None,
        terminal_scale=terminal_scale,
    )


def residual_db_loss_reference(p: LossInputs, return_stats: bool = False):
    """The readable reference of ALGORITHM §4 on validated inputs: fp32 math (float64 for float64 ``out``).

    Returns loss (B,) in the compute dtype, and with ``return_stats`` a dict of detached (B,) statistics
    (``STAT_NAMES``).
    """
    cd = p.compute_dtype
    B = p.out.shape[0]

    def flat(t, grad=False):
        if t is None:
            return None
        t = t if grad else t.detach()
        return t.reshape(B, -1).to(cd)

    def col(t):
        return t.detach().to(cd).view(B, 1)

    lam = p.strength
    out = flat(p.out, grad=True)
    out_ref = flat(p.out_ref)
    term = col(p.terminal) if p.terminal is not None else torch.zeros(B, 1, dtype=cd, device=out.device)

    # d = s_F^θ − λ·s_F^ref
    diff = col(p.coef_out) * (out - lam * out_ref)
    if p.use_strength:
        diff = diff + (1.0 - lam) * (col(p.coef_x) * flat(p.x) - flat(p.x_next))
    d = diff * col(p.inv_var)

    resid_f = d - flat(p.reward_grad_next)
    flow_next = flat(p.flow_next, grad=True)
    zero = torch.zeros(B, dtype=cd, device=out.device)
    if flow_next is not None:
        resid_f = resid_f - flow_next * (1.0 - term)
        l_term = term.view(B) * flow_next.square().mean(dim=1)
    else:
        l_term = zero
    l_fwd = resid_f.square().mean(dim=1)

    if p.use_reverse:
        resid_r = flat(p.score_rev) + flat(p.reward_grad_cur)
        if p.score_rev_ref is not None:
            resid_r = resid_r - lam * flat(p.score_rev_ref)
        if p.flow_cur is not None:
            resid_r = resid_r + flat(p.flow_cur, grad=True)
        l_rev = (1.0 - term.view(B)) * resid_r.square().mean(dim=1)
    else:
        l_rev = zero

    if p.use_trust:
        delta = out - flat(p.out_old)
        l_reg = delta.square().mean(dim=1)
    else:
        delta, l_reg = None, zero

    loss = l_fwd + p.terminal_scale * l_term + p.reverse_scale * l_rev + p.trust_region_scale * l_reg
    if not return_stats:
        return loss
    with torch.no_grad():
        stats = {
            "loss_forward": l_fwd,
            "loss_terminal": l_term,
            "loss_reverse": l_rev,
            "loss_trust_region": l_reg,
            "norm_d": d.norm(dim=1),
            "norm_reward_grad_next": flat(p.reward_grad_next).norm(dim=1),
            "norm_flow_next": flow_next.norm(dim=1) if flow_next is not None else zero,
            "norm_out_delta": delta.norm(dim=1) if delta is not None else zero,
        }
        stats = {k: v.detach().to(torch.float32) for k, v in stats.items()}
    return loss, stats


def _triton_available_for(device: torch.device) -> tuple[bool, str]:
    import os

    # Decide before importing triton: triton's own @jit helpers are built at import time for whatever
    # TRITON_INTERPRET says then, so an import made while it is off breaks a later interpreted launch.
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False, (
            f"the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before the first @triton.jit runs to "
            f"interpret it on {device.type} (slow; for tests)"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install triton)"
    return True, ""


_fallback_logged = False


def _kernels_for(backend: str, device: torch.device):
    """The fused-kernel module when this call should run it, else None (the reference runs).

    CUDA tensors (backend="auto") and backend="triton" ask for the kernel. When it is unavailable, an explicit
    backend="triton" raises; "auto" on CUDA falls back to the reference with a one-time log line.
    """
    if not (backend == "triton" or (backend == "auto" and device.type == "cuda")):
        return None
    ok, why = _triton_available_for(device)
    if ok:
        try:
            from fastnabla.kernels import residual_db as _k

            return _k
        except ImportError as e:
            why = f"the fused kernel could not be imported ({e})"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' is unavailable: {why}")
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        _log.warning("fastnabla: the fused Triton loss is unavailable (%s); using the PyTorch reference", why)
    return None


def residual_db_loss(
    out: torch.Tensor,
    out_ref: torch.Tensor,
    *,
    coef_out: torch.Tensor,
    inv_var: torch.Tensor,
    reward_grad_next: torch.Tensor,
    flow_next: Optional[torch.Tensor] = None,
    terminal: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    x: Optional[torch.Tensor] = None,
    x_next: Optional[torch.Tensor] = None,
    coef_x: Optional[torch.Tensor] = None,
    out_old: Optional[torch.Tensor] = None,
    trust_region_scale: float = 0.0,
    reverse_scale: float = 0.0,
    score_rev: Optional[torch.Tensor] = None,
    score_rev_ref: Optional[torch.Tensor] = None,
    flow_cur: Optional[torch.Tensor] = None,
    reward_grad_cur: Optional[torch.Tensor] = None,
    terminal_scale: float = 1.0,
    backend: str = "auto",
    return_stats: bool = False,
    check_values: bool = True,
):
    """Residual ∇-DB loss per transition (ALGORITHM §4); a drop-in for any trainer.

    Args:
        out: (B, *S) policy output at x (after CFG); receives gradients.
        out_ref: (B, *S) pretrained output at x (after CFG); data.
        coef_out, inv_var: (B,) transition scalars (``transition_coefficients``; inv_var = 1/σ² > 0).
        reward_grad_next: (B, *S) r' = β·γ(τ')·∇_{x'} log R(x̂0(x')); data.
        flow_next: (B, *S) g_φ(x', τ') or None; receives gradients.
        terminal: (B,) bool/0-1, whether x' is the clean sample; None = no terminal transition.
        strength: λ (pretrained_strength). x, x_next, coef_x are required iff λ != 1.
        out_old, trust_region_scale: trust region toward the sampling-time output.
        reverse_scale, score_rev, score_rev_ref, flow_cur, reward_grad_cur: the reverse residual (s_R's are data,
            flow_cur receives gradients).
        terminal_scale: weight of the terminal flow term.
        backend: "auto" (Triton on CUDA, reference elsewhere; on CUDA without triton the reference, with a
            one-time log line), "reference" or "triton" (on CPU only under TRITON_INTERPRET=1).
        return_stats: also return a dict of detached per-transition statistics (``STAT_NAMES``).
        check_values: validate tensor values too (finite coefficients, inv_var > 0, terminal 0/1). Each such check
            syncs a GPU with the host; a hot loop whose coefficients are checked once can pass False.

    Returns:
        loss_b, (B,) float32 (float64 for float64 ``out``); and the stats dict if ``return_stats``.
    """
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    p = validate_loss_inputs(
        out, out_ref, coef_out=coef_out, inv_var=inv_var, reward_grad_next=reward_grad_next, flow_next=flow_next,
        terminal=terminal, strength=strength, x=x, x_next=x_next, coef_x=coef_x, out_old=out_old,
        trust_region_scale=trust_region_scale, reverse_scale=reverse_scale, score_rev=score_rev,
        score_rev_ref=score_rev_ref, flow_cur=flow_cur, reward_grad_cur=reward_grad_cur,
        terminal_scale=terminal_scale, check_values=check_values,
    )
    _k = _kernels_for(backend, out.device)
    if _k is not None:
        return _k.residual_db_loss_triton(p, return_stats=return_stats)
    return residual_db_loss_reference(p, return_stats=return_stats)


def residual_db_loss_cfg_reference(p: LossInputs, out_uncond: torch.Tensor, guidance_scale: float,
                                   return_stats: bool = False):
    """Guidance, then the reference loss: ``p.out`` holds out_cond (as ``residual_db_loss_cfg`` validates it)."""
    out = out_uncond + guidance_scale * (p.out - out_uncond)
    return residual_db_loss_reference(dataclasses.replace(p, out=out), return_stats=return_stats)


def residual_db_loss_cfg(
    out_uncond: torch.Tensor,
    out_cond: torch.Tensor,
    guidance_scale: float,
    out_ref: torch.Tensor,
    *,
    coef_out: torch.Tensor,
    inv_var: torch.Tensor,
    reward_grad_next: torch.Tensor,
    flow_next: Optional[torch.Tensor] = None,
    terminal: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    x: Optional[torch.Tensor] = None,
    x_next: Optional[torch.Tensor] = None,
    coef_x: Optional[torch.Tensor] = None,
    out_old: Optional[torch.Tensor] = None,
    trust_region_scale: float = 0.0,
    reverse_scale: float = 0.0,
    score_rev: Optional[torch.Tensor] = None,
    score_rev_ref: Optional[torch.Tensor] = None,
    flow_cur: Optional[torch.Tensor] = None,
    reward_grad_cur: Optional[torch.Tensor] = None,
    terminal_scale: float = 1.0,
    backend: str = "auto",
    return_stats: bool = False,
    check_values: bool = True,
):
    """``residual_db_loss`` of the guided policy output out = out_uncond + w·(out_cond − out_uncond).

    The fused kernel never materialises ``out`` and writes gradients into both halves
    (∂/∂out_uncond = (1 − w)·∂/∂out, ∂/∂out_cond = w·∂/∂out); the reference forms ``out`` in the inputs' dtype
    and calls the plain reference. ``out_ref`` is the (already guided) pretrained output; every other argument is
    as in ``residual_db_loss``. The compute dtype is float64 when the guided output is float64, else float32.
    """
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    for name, t in (("out_uncond", out_uncond), ("out_cond", out_cond)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor shaped (B, *S) with at least one sample dim")
    if out_uncond.shape != out_cond.shape:
        raise ValueError(f"out_uncond has shape {tuple(out_uncond.shape)}, expected {tuple(out_cond.shape)} "
                         f"(the shape of out_cond)")
    if out_uncond.device != out_cond.device:
        raise ValueError(f"out_uncond is on {out_uncond.device}, expected {out_cond.device} (the device of out_cond)")
    w = _scalar_float("guidance_scale", guidance_scale)
    p = validate_loss_inputs(
        out_cond, out_ref, coef_out=coef_out, inv_var=inv_var, reward_grad_next=reward_grad_next,
        flow_next=flow_next, terminal=terminal, strength=strength, x=x, x_next=x_next, coef_x=coef_x,
        out_old=out_old, trust_region_scale=trust_region_scale, reverse_scale=reverse_scale, score_rev=score_rev,
        score_rev_ref=score_rev_ref, flow_cur=flow_cur, reward_grad_cur=reward_grad_cur,
        terminal_scale=terminal_scale, check_values=check_values,
    )
    _k = _kernels_for(backend, out_cond.device)
    if _k is not None:
        return _k.residual_db_loss_cfg_triton(p, out_uncond, w, return_stats=return_stats)
    return residual_db_loss_cfg_reference(p, out_uncond, w, return_stats=return_stats)
