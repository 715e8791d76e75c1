"""The per-transition residual ∇-DB loss (ALGORITHM §4, §5b): validation, dispatch, and the pure-PyTorch reference.

For each trained transition b, with the sample dims S flattened and every mean taken over S::

    d      = [(1−λ)·(coef_x·x − x') + coef_out·(out − λ·out_ref)] · inv_var     (= s_F^θ − λ·s_F^ref)
    g'     = flow_next · (1 − terminal)                                          (g' := 0 at a terminal x')
    L_F    = w · mean (d − reward_grad_next − g')²                               (w = policy_weight, else 1)
    L_T    = terminal · mean flow_next²                                         (if flow_next is given)
    L_R    = (1 − terminal) · mean (score_rev − λ·score_rev_ref + flow_cur + reward_grad_cur)²
    L_reg  = mean (out − out_old)²
    loss_b = L_F + terminal_scale·L_T + reverse_scale·L_R + trust_region_scale·L_reg

The returns recipe (§5b): given ``return_next`` = G_{k+1}, the flow changes role. In L_F, g' is data (the target
is sg(reward_grad_next + g')); L_T goes (and L_R is refused); the flow is trained only by

    L_A    = (1 − terminal) · mean (flow_next + reward_grad_next − return_next)²
    loss_b = L_F + trust_region_scale·L_reg + L_A

Gradients reach ``out``, ``flow_next`` and ``flow_cur`` only; everything else is treated as data. The reference
is the spec: it is what the tests and benchmarks compare the Triton kernel with, so it stays readable.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from fastnabla.loss_contract import (ARGS, STAT_NAMES, LossInputs, _scalar_float, args_doc, loss_signature,
                                     validate_loss_inputs)

__all__ = ["residual_db_loss", "residual_db_loss_reference", "residual_db_loss_cfg", "residual_db_loss_cfg_reference",
           "LossInputs", "validate_loss_inputs", "STAT_NAMES", "ARGS"]

_log = logging.getLogger(__name__)


def residual_db_loss_reference(p: LossInputs, return_stats: bool = False):
    """The readable reference of ALGORITHM §4 (and §5b's returns terms) on validated inputs: fp32 math (float64
    for float64 ``out``).

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

    reward_grad_next = flat(p.reward_grad_next)
    resid_f = d - reward_grad_next
    flow_next = flat(p.flow_next, grad=True)
    zero = torch.zeros(B, dtype=cd, device=out.device)
    l_term = l_ret = zero
    if p.use_returns:  # §5b: the flow is data in L_F and learns from L_A alone
        resid_f = resid_f - flow_next.detach() * (1.0 - term)
        resid_a = flow_next + reward_grad_next - flat(p.return_next)
        l_ret = (1.0 - term.view(B)) * resid_a.square().mean(dim=1)
    elif flow_next is not None:
        resid_f = resid_f - flow_next * (1.0 - term)
        l_term = term.view(B) * flow_next.square().mean(dim=1)
    l_fwd = resid_f.square().mean(dim=1)
    if p.policy_weight is not None:
        l_fwd = p.policy_weight.detach().to(cd) * l_fwd

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
    if p.use_returns:
        loss = loss + l_ret
    if not return_stats:
        return loss
    with torch.no_grad():
        stats = {
            "loss_forward": l_fwd,
            "loss_terminal": l_term,
            "loss_reverse": l_rev,
            "loss_trust_region": l_reg,
            "norm_d": d.norm(dim=1),
            "norm_reward_grad_next": reward_grad_next.norm(dim=1),
            "norm_flow_next": flow_next.norm(dim=1) if flow_next is not None else zero,
            "norm_out_delta": delta.norm(dim=1) if delta is not None else zero,
            "loss_returns": l_ret,
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


def _empty(p: LossInputs) -> bool:
    return p.out.shape[0] == 0 or p.out[0].numel() == 0


def _check_expected_grad(expected_grad, B: int) -> None:
    if expected_grad is None:
        return
    t = torch.as_tensor(expected_grad)
    if not (t.dim() == 0 or tuple(t.shape) == (B,)) or not t.is_floating_point() and t.dtype != torch.int64:
        raise ValueError(f"expected_grad must be a number or a ({B},) tensor (the upstream gradient of loss_b), got "
                         f"shape {tuple(t.shape)}")


def residual_db_loss(out, out_ref, *, backend: str = "auto", return_stats: bool = False, check_values: bool = True,
                     expected_grad=None, **terms):
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    p = validate_loss_inputs(out, out_ref, check_values=check_values, **terms)
    _check_expected_grad(expected_grad, p.out.shape[0])
    _k = None if _empty(p) else _kernels_for(backend, out.device)
    if _k is not None:
        return _k.residual_db_loss_triton(p, return_stats=return_stats, expected_grad=expected_grad)
    return residual_db_loss_reference(p, return_stats=return_stats)


residual_db_loss.__signature__ = loss_signature(["out", "out_ref"], [("backend", "auto"), ("return_stats", False),
                                                                     ("check_values", True), ("expected_grad", None)])
residual_db_loss.__doc__ = f"""Residual ∇-DB loss per transition (ALGORITHM §4; §5b with return_next); a drop-in.

    Args:
        out: (B, *S) policy output at x (after CFG); receives gradients.
        out_ref: (B, *S) pretrained output at x (after CFG); data.
{args_doc()}
        backend: "auto" (Triton on CUDA, reference elsewhere; on CUDA without triton the reference, with a
            one-time log line), "reference" or "triton" (on CPU only under TRITON_INTERPRET=1).
        return_stats: also return a dict of detached per-transition statistics (``STAT_NAMES``).
        check_values: validate tensor values too (finite coefficients, inv_var > 0, terminal 0/1). Each such check
            syncs a GPU with the host; a hot loop whose coefficients are checked once can pass False.
        expected_grad: the gradient the caller will send into loss_b (a non-zero number or (B,)), e.g. 1/n for
            ``loss_b.sum() / n``. The fused kernel then writes the final gradients in its forward pass and its
            backward hands them back after one comparison (any other upstream gradient is still handled exactly,
            by a rescaling pass). Values are unchanged; the reference ignores it.

    Every loss argument is described once, in ``fastnabla.loss_contract.ARGS``.

    Returns:
        loss_b, (B,) float32 (float64 for float64 ``out``); and the stats dict if ``return_stats``.
    """


def residual_db_loss_cfg_reference(p: LossInputs, out_uncond: torch.Tensor, guidance_scale: float,
                                   return_stats: bool = False):
    """Guidance, then the reference loss: ``p.out`` holds out_cond (as ``residual_db_loss_cfg`` validates it)."""
    out = out_uncond + guidance_scale * (p.out - out_uncond)
    return residual_db_loss_reference(dataclasses.replace(p, out=out), return_stats=return_stats)


def residual_db_loss_cfg(out_uncond, out_cond, guidance_scale, out_ref, *, backend: str = "auto",
                         return_stats: bool = False, check_values: bool = True, expected_grad=None, **terms):
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
    p = validate_loss_inputs(out_cond, out_ref, check_values=check_values, **terms)
    _check_expected_grad(expected_grad, p.out.shape[0])
    _k = None if _empty(p) else _kernels_for(backend, out_cond.device)
    if _k is not None:
        return _k.residual_db_loss_cfg_triton(p, out_uncond, w, return_stats=return_stats,
                                              expected_grad=expected_grad)
    return residual_db_loss_cfg_reference(p, out_uncond, w, return_stats=return_stats)


residual_db_loss_cfg.__signature__ = loss_signature(
    ["out_uncond", "out_cond", "guidance_scale", "out_ref"],
    [("backend", "auto"), ("return_stats", False), ("check_values", True), ("expected_grad", None)])
residual_db_loss_cfg.__doc__ = """``residual_db_loss`` of the guided policy output out = out_uncond + w·(out_cond − out_uncond).

    For trainers whose model returns the two CFG halves separately (fastnabla's own backbones return the guided
    output, so its trainer calls ``residual_db_loss``). The fused kernel never materialises ``out`` and writes
    gradients into both halves (∂/∂out_uncond = (1 − w)·∂/∂out, ∂/∂out_cond = w·∂/∂out); the reference forms
    ``out`` in the inputs' dtype and calls the plain reference. ``out_ref`` is the (already guided) pretrained
    output; every other argument is as in ``residual_db_loss`` (``fastnabla.loss_contract.ARGS``). The compute
    dtype is float64 when the guided output is float64, else float32.
    """
