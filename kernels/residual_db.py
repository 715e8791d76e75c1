"""Fused residual ∇-DB loss (ALGORITHM §4, §5b) in Triton: the forward value and the gradients in one pass.

The loss of transition b is a sum of means over its flattened sample (N elements)::

    d      = [co·(out − λ·out_ref) + (1−λ)·(cx·x − x')]·iv
    r_F    = d − r' − (1 − t)·g'                          L_F   = w · Σ r_F² / N
                                                          L_T   = t · Σ g'² / N
    r_R    = s_R − λ·s_R^ref + g + r                      L_R   = (1 − t) · Σ r_R² / N
    δ      = out − out_old                                L_reg = Σ δ² / N
    loss_b = L_F + ts·L_T + rs·L_R + trs·L_reg

(co = coef_out, iv = inv_var, cx = coef_x, t = terminal, w = policy_weight (1 when absent), r' = reward_grad_next,
g' = flow_next, g = flow_cur, r = reward_grad_cur; ts, rs, trs the terminal/reverse/trust-region scales) and its
gradients are elementwise:

    ∂loss_b/∂out = 2/N·(w·co·iv·r_F + trs·δ)
    ∂loss_b/∂g'  = 2/N·(ts·t·g' − (1 − t)·r_F)
    ∂loss_b/∂g   = 2/N·rs·(1 − t)·r_R

Returns mode (``return_next`` = G given; λ = 1 and rs = 0 are enforced by validation): g' is data in r_F, L_T is
dropped, and the flow-return residual is added as the flow's only gradient source:

    r_A    = g' + r' − G                                  L_A   = (1 − t) · Σ r_A² / N
    loss_b = L_F + trs·L_reg + L_A
    ∂loss_b/∂out = 2/N·(w·co·iv·r_F + trs·δ)              ∂loss_b/∂g' = 2/N·(1 − t)·r_A

With classifier-free guidance fused in, out = out_u + w·(out_c − out_u) lives only in registers and the out
gradient is split: ∂/∂out_u = (1 − w)·∂/∂out, ∂/∂out_c = w·∂/∂out.

Where the gradient work happens (bytes moved; R = input reads, W = gradient writes, per element):

- forward (``_residual_db_fwd_kernel``) reads every input once, accumulates the sums, and, when a gradient is
  needed, writes the *unscaled* gradients above (for an upstream gradient of 1): U buffers, one per gradient
  source (out, g', g; with CFG one buffer for the guided out serves both halves), in the input's dtype;
- backward (``_scale_grads_kernel``) reads them and writes the W final gradients × grad_output[b].

Full forward+backward therefore moves R + 2U + W. When the caller announces the upstream gradient at forward
time (``expected_grad``: the trainer's 1/items), the forward writes the final gradients (×upstream[b]) and the
backward hands them back after one comparison: R + W, the minimum (without CFG; its halves still take the splitting
pass). Any other upstream gradient is rescaled by grad/expected, exactly.

Recomputing in backward instead moves R + R' + W, where R' are the inputs the gradients need again (out or both
CFG halves, out_ref, r', g' and whichever of x, x', out_old, s_R, s_R^ref, g, r, G are on). Each gradient source
needs at least two more reads than it has buffers (out: out, out_ref, r'; g' adds g', and G in returns mode; g adds
s_R, r, g), so R' ≥ 2U always (λ = 1 with g': R' = 4, U = 2) and the fused pass is never worse, strictly better
once λ ≠ 1, the trust region, the reverse residual or CFG is on. The price: gradients of 16-bit inputs are rounded
twice (once unscaled, once scaled; ≤ 1 extra ulp), and the unscaled buffers live from forward to backward (W bytes,
like any saved activation). Scaling out of place rather than in place costs W extra bytes of memory during backward
only, and keeps retain_graph / repeated backward (gradcheck does that) correct.

Reduction: deterministic two stages. The grid is (transition, block); each program loops over a contiguous
chunk of its transition's row and writes seven partial sums to a (B, n_blocks, 7) buffer; a second tiny kernel
sums them in fixed block order and forms loss_b and the statistics. When one block per transition is enough
(large B fills the GPU on its own) the first kernel finalises directly: one launch.

Precision: fp32 math and an fp32 loss for 16/32-bit inputs (each pointer may have its own dtype); fp64 math and
an fp64 loss when the (guided) output is float64, so ``torch.autograd.gradcheck`` runs through the kernel.
Python-float hyper-parameters travel as an fp32 (hi, lo) pair so the fp64 path sees them to ~48 bits.
"""
from __future__ import annotations

import os
import struct
from contextlib import nullcontext
from typing import Optional

import torch
import triton
import triton.language as tl

from fastnabla.loss_contract import SAMPLE_ARGS, STAT_NAMES

__all__ = ["residual_db_loss_triton", "residual_db_loss_cfg_triton", "launch_geometry"]

NUM_PARTIALS = 7  # w·Σr_F², Σg'², Σr_R², Σδ², Σd², Σr'² (statistics only), Σr_A²
NUM_STATS = len(STAT_NAMES)  # rows of the stats buffer, in the order of STAT_NAMES

# GPU launch defaults. One config (no autotune: nothing to tune against in CI, and multi-config autotune does not
# run under the interpreter). A program streams BLOCK elements per loop step.
_GPU_BLOCK = 1024
_GPU_WARPS = 4
# Split a row over several programs until the grid has about this many programs per SM.
_PROGRAMS_PER_SM = 4
# Interpreter: cost grows with the number of programs and of loop steps, not with the block width.
_INTERP_MAX_BLOCK = 16384
_F32 = struct.Struct("f")


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _up(v, F64: tl.constexpr):
    """Upcast to the compute dtype: fp64 in the float64 path, fp32 otherwise (never compute in 16 bits)."""
    if F64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _arg(v, F64: tl.constexpr):
    """A scalar kernel argument (fp32 / int on a GPU, a Python number when interpreted) in the compute dtype."""
    if F64:
        return tl.full([], v, tl.float64)
    else:
        return tl.full([], v, tl.float32)


@triton.jit
def _div(x, y, F64: tl.constexpr):
    """x / y correctly rounded (fp32 '/' compiles to an approximate division; fp64's is IEEE already)."""
    if F64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _ld(row_ptr, offs, mask, F64: tl.constexpr):
    return _up(tl.load(row_ptr + offs, mask=mask, other=0.0), F64)


@triton.jit
def _finalize(
    loss_ptr,  # (B,) compute dtype
    stats_ptr,  # (9, B) fp32
    b, mask, B,
    s_f, s_t, s_r, s_reg, s_d2, s_g2, s_a, term, nf, ts, rs, trs,
    FLOW_NEXT: tl.constexpr, REVERSE: tl.constexpr, TRUST: tl.constexpr, RETURNS: tl.constexpr,
    STATS: tl.constexpr, F64: tl.constexpr,
):
    """loss_b and the statistics from the per-transition sums (scalars in stage 1, BLOCK_B vectors in stage 2).

    s_f already carries the policy weight w. The loss is built with correctly rounded divisions and explicit fused
    multiply-adds, so that it does not depend on STATS: compiled, whether the compiler fuses a product into the
    next addition depends on how many uses the product has, and storing a term as a statistic adds one."""
    l_f = _div(s_f, nf, F64)
    loss = l_f
    if RETURNS:  # the flow's only term: L_A, no L_T
        q_a = _div(s_a, nf, F64)
        l_a = (1.0 - term) * q_a
        loss = tl.fma(1.0 - term, q_a, loss)
    elif FLOW_NEXT:
        l_t = term * _div(s_t, nf, F64)
        loss = tl.fma(ts, l_t, loss)
    if REVERSE:
        l_r = (1.0 - term) * _div(s_r, nf, F64)
        loss = tl.fma(rs, l_r, loss)
    if TRUST:
        l_reg = _div(s_reg, nf, F64)
        loss = tl.fma(trs, l_reg, loss)
    tl.store(loss_ptr + b, loss.to(loss_ptr.dtype.element_ty), mask=mask)
    if STATS:
        tl.store(stats_ptr + 0 * B + b, l_f.to(tl.float32), mask=mask)
        tl.store(stats_ptr + 4 * B + b, tl.sqrt(s_d2).to(tl.float32), mask=mask)
        tl.store(stats_ptr + 5 * B + b, tl.sqrt(s_g2).to(tl.float32), mask=mask)
        if RETURNS:
            tl.store(stats_ptr + 8 * B + b, l_a.to(tl.float32), mask=mask)
        elif FLOW_NEXT:
            tl.store(stats_ptr + 1 * B + b, l_t.to(tl.float32), mask=mask)
        if FLOW_NEXT:
            tl.store(stats_ptr + 6 * B + b, tl.sqrt(s_t).to(tl.float32), mask=mask)
        if REVERSE:
            tl.store(stats_ptr + 2 * B + b, l_r.to(tl.float32), mask=mask)
        if TRUST:
            tl.store(stats_ptr + 3 * B + b, l_reg.to(tl.float32), mask=mask)
            tl.store(stats_ptr + 7 * B + b, tl.sqrt(s_reg).to(tl.float32), mask=mask)
        # rows of terms that are off stay as the host zero-filled them


# Sizes and strides are left to Triton's integer specialisation on purpose: knowing that N, CHUNK and the row
# strides are multiples of 16 is what lets it vectorise the masked loads and stores.
@triton.jit
def _residual_db_fwd_kernel(
    # ---- outputs
    loss_ptr,  # (B,) compute dtype: loss_b (FINALIZE only)
    stats_ptr,  # (9, B) fp32, zero-filled: STAT_NAMES rows (FINALIZE and STATS only)
    part_ptr,  # (B, n_blocks, 7) compute dtype: partial sums (not FINALIZE)
    g_out_ptr,  # (B, N) dtype of out (CFG: of the guided out), contiguous: unscaled ∂loss_b/∂out
    g_flow_next_ptr,  # (B, N) dtype of flow_next, contiguous: unscaled ∂loss_b/∂flow_next
    g_flow_cur_ptr,  # (B, N) dtype of flow_cur, contiguous: unscaled ∂loss_b/∂flow_cur
    # ---- inputs: rows of the flattened sample, any float dtype each, unit stride inside a row
    out_ptr,  # (B, N) out (CFG: out_uncond)
    out_cond_ptr,  # (B, N) out_cond (CFG only)
    out_ref_ptr,  # (B, N) out_ref
    reward_grad_next_ptr,  # (B, N) reward_grad_next
    flow_next_ptr,  # (B, N) flow_next (FLOW_NEXT)
    x_ptr,  # (B, N) x (STRENGTH)
    x_next_ptr,  # (B, N) x_next (STRENGTH)
    out_old_ptr,  # (B, N) out_old (TRUST)
    score_rev_ptr,  # (B, N) score_rev (REVERSE)
    score_rev_ref_ptr,  # (B, N) score_rev_ref (REV_REF)
    flow_cur_ptr,  # (B, N) flow_cur (FLOW_CUR)
    reward_grad_cur_ptr,  # (B, N) reward_grad_cur (REVERSE)
    return_next_ptr,  # (B, N) return_next G (RETURNS)
    coef_out_ptr,  # (B,) coef_out, any float dtype
    inv_var_ptr,  # (B,) inv_var
    coef_x_ptr,  # (B,) coef_x (STRENGTH)
    terminal_ptr,  # (B,) terminal as 0/1 float (TERMINAL)
    policy_weight_ptr,  # (B,) policy_weight (WEIGHT)
    upstream_ptr,  # (B,) ∂L/∂loss_b known at forward time (UPSTREAM): the gradients are written final
    # ---- row strides of the inputs, in elements
    s_out, s_out_cond, s_out_ref, s_reward_grad_next, s_flow_next, s_x, s_x_next, s_out_old, s_score_rev,
    s_score_rev_ref, s_flow_cur, s_reward_grad_cur, s_return_next,
    # ---- sizes
    B, N, CHUNK, n_blocks,
    # ---- hyper-parameters as fp32 (hi, lo) pairs
    lam_hi, lam_lo, w_hi, w_lo, ts_hi, ts_lo, rs_hi, rs_lo, trs_hi, trs_lo,
    # ---- flags
    BLOCK: tl.constexpr, F64: tl.constexpr, CFG: tl.constexpr, STRENGTH: tl.constexpr, FLOW_NEXT: tl.constexpr,
    TERMINAL: tl.constexpr, REVERSE: tl.constexpr, REV_REF: tl.constexpr, FLOW_CUR: tl.constexpr,
    TRUST: tl.constexpr, RETURNS: tl.constexpr, WEIGHT: tl.constexpr, STATS: tl.constexpr, G_OUT: tl.constexpr,
    G_FN: tl.constexpr, G_FC: tl.constexpr, FINALIZE: tl.constexpr, UPSTREAM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)

    nf = _arg(N, F64)
    two_n = 2.0 / nf  # the gradients' common factor (× the known upstream gradient: then they are final)
    if UPSTREAM:
        two_n = two_n * _up(tl.load(upstream_ptr + b), F64)
    lam = _arg(lam_hi, F64) + _arg(lam_lo, F64)
    ts = _arg(ts_hi, F64) + _arg(ts_lo, F64)
    rs = _arg(rs_hi, F64) + _arg(rs_lo, F64)
    trs = _arg(trs_hi, F64) + _arg(trs_lo, F64)
    co = _up(tl.load(coef_out_ptr + b), F64)
    iv = _up(tl.load(inv_var_ptr + b), F64)
    co_iv = co * iv
    if WEIGHT:
        pw = _up(tl.load(policy_weight_ptr + b), F64)
        co_iv = pw * co_iv  # ∂(w·r_F²)/∂out: the weight rides on the out gradient only
    if STRENGTH:
        cx = _up(tl.load(coef_x_ptr + b), F64)
    if TERMINAL:
        term = _up(tl.load(terminal_ptr + b), F64)
    else:
        term = 0.0
    keep = 1.0 - term  # g' counts in the forward residual only at a non-terminal x'
    if CFG:
        w = _arg(w_hi, F64) + _arg(w_lo, F64)

    acc_f = _up(tl.zeros([BLOCK], dtype=tl.float32), F64)
    acc_t = acc_f
    acc_r = acc_f
    acc_reg = acc_f
    acc_d2 = acc_f
    acc_g2 = acc_f
    acc_a = acc_f

    g_row = b * N  # gradient buffers are contiguous
    start = blk * CHUNK
    for it in range(0, CHUNK, BLOCK):
        offs = start + it + tl.arange(0, BLOCK)
        mask = offs < N  # masked lanes load 0 and every term is linear in the loads: they add 0
        o = _ld(out_ptr + b * s_out, offs, mask, F64)
        if CFG:
            o = o + w * (_ld(out_cond_ptr + b * s_out_cond, offs, mask, F64) - o)
        diff = co * (o - lam * _ld(out_ref_ptr + b * s_out_ref, offs, mask, F64))
        if STRENGTH:
            diff = diff + (1.0 - lam) * (cx * _ld(x_ptr + b * s_x, offs, mask, F64)
                                         - _ld(x_next_ptr + b * s_x_next, offs, mask, F64))
        rg = _ld(reward_grad_next_ptr + b * s_reward_grad_next, offs, mask, F64)
        # an explicit fused multiply-add: the statistics' second use of d = diff·iv must not change how the compiler
        # fuses r_F (as in _finalize)
        r_f = tl.fma(diff, iv, -rg)
        if FLOW_NEXT:
            fn = _ld(flow_next_ptr + b * s_flow_next, offs, mask, F64)
            r_f = r_f - fn * keep
            acc_t += fn * fn
            if RETURNS:  # g' is data in r_F; the flow's gradient comes from L_A alone
                r_a = fn + rg - _ld(return_next_ptr + b * s_return_next, offs, mask, F64)
                acc_a += r_a * r_a
                if G_FN:
                    g = two_n * keep * r_a
                    tl.store(g_flow_next_ptr + g_row + offs, g.to(g_flow_next_ptr.dtype.element_ty), mask=mask)
            elif G_FN:
                g = two_n * (ts * term * fn - keep * r_f)
                tl.store(g_flow_next_ptr + g_row + offs, g.to(g_flow_next_ptr.dtype.element_ty), mask=mask)
        acc_f += r_f * r_f
        if STATS:
            d = diff * iv
            acc_d2 += d * d
            acc_g2 += rg * rg
        g_o = co_iv * r_f
        if TRUST:
            delta = o - _ld(out_old_ptr + b * s_out_old, offs, mask, F64)
            acc_reg += delta * delta
            g_o = g_o + trs * delta
        if G_OUT:  # CFG: the guided output's gradient; backward splits it into the two halves
            tl.store(g_out_ptr + g_row + offs, (two_n * g_o).to(g_out_ptr.dtype.element_ty), mask=mask)
        if REVERSE:
            r_r = (_ld(score_rev_ptr + b * s_score_rev, offs, mask, F64)
                   + _ld(reward_grad_cur_ptr + b * s_reward_grad_cur, offs, mask, F64))
            if REV_REF:
                r_r = r_r - lam * _ld(score_rev_ref_ptr + b * s_score_rev_ref, offs, mask, F64)
            if FLOW_CUR:
                r_r = r_r + _ld(flow_cur_ptr + b * s_flow_cur, offs, mask, F64)
                if G_FC:
                    g = two_n * rs * keep * r_r
                    tl.store(g_flow_cur_ptr + g_row + offs, g.to(g_flow_cur_ptr.dtype.element_ty), mask=mask)
            acc_r += r_r * r_r

    s_f = tl.sum(acc_f, axis=0)
    s_t = tl.sum(acc_t, axis=0)
    s_r = tl.sum(acc_r, axis=0)
    s_reg = tl.sum(acc_reg, axis=0)
    s_d2 = tl.sum(acc_d2, axis=0)
    s_g2 = tl.sum(acc_g2, axis=0)
    s_a = tl.sum(acc_a, axis=0)
    if WEIGHT:
        s_f = pw * s_f
    if FINALIZE:
        _finalize(loss_ptr, stats_ptr, b, None, B, s_f, s_t, s_r, s_reg, s_d2, s_g2, s_a, term, nf, ts, rs, trs,
                  FLOW_NEXT, REVERSE, TRUST, RETURNS, STATS, F64)
    else:
        p = part_ptr + (b * n_blocks + blk) * 7
        tl.store(p + 0, s_f)
        tl.store(p + 1, s_t)
        tl.store(p + 2, s_r)
        tl.store(p + 3, s_reg)
        tl.store(p + 4, s_d2)
        tl.store(p + 5, s_g2)
        tl.store(p + 6, s_a)


@triton.jit
def _residual_db_reduce_kernel(
    loss_ptr,  # (B,) compute dtype: loss_b
    stats_ptr,  # (9, B) fp32, zero-filled: STAT_NAMES rows (STATS)
    part_ptr,  # (B, n_blocks, 7) compute dtype: partial sums from the forward kernel
    terminal_ptr,  # (B,) terminal as 0/1 float (TERMINAL)
    B, N, n_blocks,
    ts_hi, ts_lo, rs_hi, rs_lo, trs_hi, trs_lo,
    BLOCK_B: tl.constexpr, F64: tl.constexpr, FLOW_NEXT: tl.constexpr, TERMINAL: tl.constexpr,
    REVERSE: tl.constexpr, TRUST: tl.constexpr, RETURNS: tl.constexpr, STATS: tl.constexpr,
):
    """Stage 2: sum the per-block partials of BLOCK_B transitions in fixed block order (deterministic)."""
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = b < B
    nf = _arg(N, F64)
    ts = _arg(ts_hi, F64) + _arg(ts_lo, F64)
    rs = _arg(rs_hi, F64) + _arg(rs_lo, F64)
    trs = _arg(trs_hi, F64) + _arg(trs_lo, F64)
    s_f = _up(tl.zeros([BLOCK_B], dtype=tl.float32), F64)
    s_t = s_f
    s_r = s_f
    s_reg = s_f
    s_d2 = s_f
    s_g2 = s_f
    s_a = s_f
    for j in range(0, n_blocks):
        p = part_ptr + (b * n_blocks + j) * 7
        s_f += tl.load(p + 0, mask=mask, other=0.0)
        s_t += tl.load(p + 1, mask=mask, other=0.0)
        s_r += tl.load(p + 2, mask=mask, other=0.0)
        s_reg += tl.load(p + 3, mask=mask, other=0.0)
        if STATS:
            s_d2 += tl.load(p + 4, mask=mask, other=0.0)
            s_g2 += tl.load(p + 5, mask=mask, other=0.0)
        if RETURNS:
            s_a += tl.load(p + 6, mask=mask, other=0.0)
    if TERMINAL:
        term = _up(tl.load(terminal_ptr + b, mask=mask, other=0.0), F64)
    else:
        term = 0.0
    _finalize(loss_ptr, stats_ptr, b, mask, B, s_f, s_t, s_r, s_reg, s_d2, s_g2, s_a, term, nf, ts, rs, trs,
              FLOW_NEXT, REVERSE, TRUST, RETURNS, STATS, F64)


@triton.jit
def _scale_grads_kernel(
    d_out_ptr,  # (B, N) dtype of out (CFG: out_uncond): f1 · grad_output[b] · ∂loss_b/∂out (OUT1)
    d_out2_ptr,  # (B, N) dtype of out_cond: f2 · grad_output[b] · ∂loss_b/∂out (CFG, OUT2)
    d_fn_ptr,  # (B, N) dtype of flow_next: grad_output[b] · ∂loss_b/∂flow_next (FN)
    d_fc_ptr,  # (B, N) dtype of flow_cur: grad_output[b] · ∂loss_b/∂flow_cur (FC)
    g_out_ptr,  # (B, N) unscaled ∂loss_b/∂out from the forward pass (OUT1 or OUT2)
    g_flow_next_ptr,  # (B, N) unscaled ∂loss_b/∂flow_next (FN)
    g_flow_cur_ptr,  # (B, N) unscaled ∂loss_b/∂flow_cur (FC)
    go_ptr,  # (B,) loss dtype, stride s_go (0 for an expanded scalar): upstream ∂L/∂loss_b
    s_go, N, CHUNK,
    f1_hi, f1_lo, f2_hi, f2_lo,  # CFG split of the out gradient: (1 − w, w); plain: f1 = 1
    BLOCK: tl.constexpr, F64: tl.constexpr, G_OUT: tl.constexpr, OUT1: tl.constexpr, OUT2: tl.constexpr,
    FN: tl.constexpr, FC: tl.constexpr,
):
    """Backward: every gradient scaled by grad_output[b] in one launch (all buffers contiguous (B, N))."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    go = _up(tl.load(go_ptr + b * s_go), F64)
    go1 = go * (_arg(f1_hi, F64) + _arg(f1_lo, F64))
    go2 = go * (_arg(f2_hi, F64) + _arg(f2_lo, F64))
    start = blk * CHUNK
    for it in range(0, CHUNK, BLOCK):
        col = start + it + tl.arange(0, BLOCK)
        mask = col < N
        offs = b * N + col
        if G_OUT:
            v = _up(tl.load(g_out_ptr + offs, mask=mask, other=0.0), F64)
            if OUT1:
                tl.store(d_out_ptr + offs, (v * go1).to(d_out_ptr.dtype.element_ty), mask=mask)
            if OUT2:
                tl.store(d_out2_ptr + offs, (v * go2).to(d_out2_ptr.dtype.element_ty), mask=mask)
        if FN:
            v = _up(tl.load(g_flow_next_ptr + offs, mask=mask, other=0.0), F64)
            tl.store(d_fn_ptr + offs, (v * go).to(d_fn_ptr.dtype.element_ty), mask=mask)
        if FC:
            v = _up(tl.load(g_flow_cur_ptr + offs, mask=mask, other=0.0), F64)
            tl.store(d_fc_ptr + offs, (v * go).to(d_fc_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------- host side


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _f32(v: float) -> float:
    return _F32.unpack(_F32.pack(v))[0]


def _hi_lo(v: float) -> tuple[float, float]:
    """v as two fp32 numbers whose sum carries ~48 bits (fp32 kernel args would otherwise round v)."""
    hi = _f32(v)
    return hi, _f32(v - hi)


def launch_geometry(B: int, N: int, device: torch.device, block: Optional[int] = None,
                    num_blocks: Optional[int] = None) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, n_blocks) for B transitions of N elements.

    On a GPU a row is split over programs until the grid holds about ``_PROGRAMS_PER_SM`` programs per SM, so a
    small B still fills the device; with enough transitions each row is one program and the forward kernel
    finalises itself (one launch). Under the interpreter, one program per row with the widest block is fastest.
    ``block``/``num_blocks`` override the choice (tests use them to force loops and splits).
    """
    if block is None:
        if device.type == "cuda" and not _interpreting():
            block = _GPU_BLOCK
        else:
            block = min(triton.next_power_of_2(max(N, 16)), _INTERP_MAX_BLOCK)
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    steps = triton.cdiv(N, block)
    if num_blocks is None:
        if device.type == "cuda" and not _interpreting():
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_blocks = min(steps, max(1, (_PROGRAMS_PER_SM * sms) // B))
        else:
            num_blocks = 1
    num_blocks = max(1, min(int(num_blocks), steps))
    chunk = triton.cdiv(steps, num_blocks) * block
    return block, chunk, triton.cdiv(N, chunk)


def _rows(t: Optional[torch.Tensor], B: int) -> Optional[torch.Tensor]:
    """(B, N) view with unit stride inside a row (copies only when the sample dims are not contiguous)."""
    if t is None:
        return None
    r = t.detach().reshape(B, -1)
    if r.shape[1] > 1 and r.stride(1) != 1:
        r = r.contiguous()
    return r


def _vec(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().contiguous()


def _launch_forward(p, out_uncond: Optional[torch.Tensor], w: float, *, need: tuple[bool, bool, bool, bool],
                    stats: bool, block: Optional[int], num_blocks: Optional[int],
                    upstream: Optional[torch.Tensor] = None):
    """Run the fused pass. ``need`` = gradients wanted for (out | out_uncond, out_cond, flow_next, flow_cur).

    Returns loss (B,), stats (9, B) fp32 or None, and the gradient buffers for (out, flow_next, flow_cur) (None
    where not needed; with CFG the buffer holds ∂loss_b/∂out of the guided output): for an upstream gradient of 1,
    or × ``upstream`` (B,) when it is given.
    """
    cfg = out_uncond is not None
    out_a = out_uncond if cfg else p.out  # the pointer the kernel calls out_ptr
    B = p.out.shape[0]
    N = p.out[0].numel()
    dev = p.out.device
    if cfg:
        f64 = torch.promote_types(out_uncond.dtype, p.out.dtype) == torch.float64
    else:
        f64 = p.out.dtype == torch.float64
    cd = torch.float64 if f64 else torch.float32

    rows = {name: _rows(getattr(p, name), B) for name in SAMPLE_ARGS if name != "out"}
    rows["a"] = _rows(out_a, B)
    rows["c"] = _rows(p.out, B) if cfg else None
    dummy = rows["a"]

    def ptr(name):
        t = rows[name]
        return (t, t.stride(0)) if t is not None else (dummy, 0)

    co, iv = _vec(p.coef_out), _vec(p.inv_var)
    cx = _vec(p.coef_x) if p.coef_x is not None else co
    term = _vec(p.terminal) if p.terminal is not None else co
    pw = _vec(p.policy_weight) if p.policy_weight is not None else co

    need_a, need_c, need_fn, need_fc = need
    need_out = need_a or (need_c and cfg)
    need_fn = need_fn and p.flow_next is not None
    need_fc = need_fc and p.reverse_scale != 0.0 and p.flow_cur is not None

    def grad_buf(flag, like):
        return torch.empty(like.shape, dtype=like.dtype, device=dev) if flag else None

    # CFG: one unscaled buffer for the guided output, in the wider of the two halves' dtypes
    g_out = torch.empty(out_a.shape, device=dev, dtype=torch.promote_types(out_a.dtype, p.out.dtype)) \
        if need_out else None
    g_fn = grad_buf(need_fn, p.flow_next)
    g_fc = grad_buf(need_fc, p.flow_cur)

    BLOCK, CHUNK, nblk = launch_geometry(B, N, dev, block, num_blocks)
    finalize = nblk == 1
    loss = torch.empty(B, dtype=cd, device=dev)
    st = torch.zeros(NUM_STATS, B, dtype=torch.float32, device=dev) if stats else loss
    part = loss if finalize else torch.empty(B, nblk, NUM_PARTIALS, dtype=cd, device=dev)

    lam, ts, rs, trs = p.strength, p.terminal_scale, p.reverse_scale, p.trust_region_scale
    flags = dict(
        F64=f64, FLOW_NEXT=p.flow_next is not None, TERMINAL=p.terminal is not None,
        REVERSE=p.reverse_scale != 0.0, TRUST=p.trust_region_scale != 0.0, RETURNS=p.return_next is not None,
        STATS=stats,
    )
    (a, s_a), (c, s_c), (ref, s_out_ref), (rgn, s_reward_grad_next), (fn, s_flow_next) = (ptr(n) for n in (
        "a", "c", "out_ref", "reward_grad_next", "flow_next"))
    ((x, s_x), (xn, s_x_next), (old, s_out_old), (sr, s_score_rev), (srr, s_score_rev_ref), (fc, s_flow_cur),
     (rgc, s_reward_grad_cur), (ret, s_return_next)) = (
        ptr(n) for n in ("x", "x_next", "out_old", "score_rev", "score_rev_ref", "flow_cur", "reward_grad_cur",
                         "return_next"))
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        _residual_db_fwd_kernel[(B, nblk)](
            loss, st, part, g_out if g_out is not None else dummy,
            g_fn if g_fn is not None else dummy, g_fc if g_fc is not None else dummy,
            a, c, ref, rgn, fn, x, xn, old, sr, srr, fc, rgc, ret, co, iv, cx, term, pw,
            upstream if upstream is not None else co,
            s_a, s_c, s_out_ref, s_reward_grad_next, s_flow_next, s_x, s_x_next, s_out_old, s_score_rev,
            s_score_rev_ref, s_flow_cur, s_reward_grad_cur, s_return_next,
            B, N, CHUNK, nblk,
            *_hi_lo(lam), *_hi_lo(w), *_hi_lo(ts), *_hi_lo(rs), *_hi_lo(trs),
            BLOCK=BLOCK, CFG=cfg, STRENGTH=p.strength != 1.0, REV_REF=p.score_rev_ref is not None,
            FLOW_CUR=p.flow_cur is not None, WEIGHT=p.policy_weight is not None, G_OUT=need_out, G_FN=need_fn,
            G_FC=need_fc, FINALIZE=finalize, UPSTREAM=upstream is not None, num_warps=_GPU_WARPS, **flags,
        )
        if not finalize:
            block_b = min(triton.next_power_of_2(B), 1024)
            _residual_db_reduce_kernel[(triton.cdiv(B, block_b),)](
                loss, st, part, term, B, N, nblk, *_hi_lo(ts), *_hi_lo(rs), *_hi_lo(trs),
                BLOCK_B=block_b, num_warps=_GPU_WARPS, **flags,
            )
    return loss, (st if stats else None), (g_out, g_fn, g_fc)


def _scale_grads(unscaled, specs, factors, grad_loss: torch.Tensor, f64: bool, block: Optional[int],
                 num_blocks: Optional[int]):
    """Scale the forward pass's unscaled gradients by grad_loss[b] into fresh tensors, in one launch.

    unscaled: (g_out, g_flow_next, g_flow_cur); specs: (shape, dtype) of the gradients of (out or out_uncond,
    out_cond, flow_next, flow_cur), None where no gradient is wanted; factors: (f1, f2) for the out gradient.
    Returns the four gradients (None where not wanted).
    """
    g_out, g_fn, g_fc = unscaled
    live = [g for g in (g_out, g_fn, g_fc) if g is not None]
    if not live:
        return [None] * 4
    outs = [torch.empty(sp[0], dtype=sp[1], device=live[0].device) if sp is not None else None for sp in specs]
    B = live[0].shape[0]
    N = live[0][0].numel()
    dev = live[0].device
    BLOCK, CHUNK, nblk = launch_geometry(B, N, dev, block, num_blocks)
    any_ = live[0]
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        _scale_grads_kernel[(B, nblk)](
            *[o if o is not None else any_ for o in outs], *[g if g is not None else any_ for g in unscaled],
            grad_loss, grad_loss.stride(0), N, CHUNK, *_hi_lo(factors[0]), *_hi_lo(factors[1]),
            BLOCK=BLOCK, F64=f64, G_OUT=g_out is not None, OUT1=outs[0] is not None, OUT2=outs[1] is not None,
            FN=outs[2] is not None, FC=outs[3] is not None, num_warps=_GPU_WARPS,
        )
    return outs


class _ResidualDBFunction(torch.autograd.Function):
    """Autograd glue: forward runs the fused pass (writing unscaled gradients), backward scales them.

    With ``expected`` (the upstream gradient the caller announced, (B,)), the forward writes the final gradients
    and the backward hands them back as they are when the upstream gradient is the announced one (one comparison;
    without CFG, whose two halves still need their (1 − w, w) split), and rescales by grad/expected otherwise.

    Only the tensors that receive gradients are Function inputs; everything else rides along in ``p`` as data,
    exactly as the reference detaches it.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, out_a, out_c, flow_next, flow_cur, p, out_uncond, w, need, stats, block, num_blocks,
                expected=None):
        loss, st, grads = _launch_forward(p, out_uncond, w, need=need, stats=stats, block=block,
                                          num_blocks=num_blocks, upstream=expected)
        ctx.expected = expected
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.has = tuple(g is not None for g in grads)
        ctx.specs = tuple((t.shape, t.dtype) if (t is not None and n) else None
                          for t, n in zip((out_a, out_c, flow_next, flow_cur), need))
        ctx.factors = (1.0 - w, w) if out_uncond is not None else (1.0, 0.0)
        ctx.f64 = loss.dtype == torch.float64
        ctx.geometry = (block, num_blocks)
        if st is None:
            return loss
        ctx.mark_non_differentiable(st)
        return loss, st

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss, *unused):
        saved = list(ctx.saved_tensors)
        unscaled = [saved.pop(0) if h else None for h in ctx.has]
        if ctx.expected is not None:
            if ctx.factors == (1.0, 0.0) and torch.equal(grad_loss, ctx.expected.to(grad_loss.dtype)):
                g_out, g_fn, g_fc = unscaled  # already final: no second pass over the gradients
                return (g_out if ctx.specs[0] is not None else None, None,
                        g_fn if ctx.specs[2] is not None else None, g_fc if ctx.specs[3] is not None else None,
                        *[None] * 8)
            grad_loss = grad_loss / ctx.expected.to(grad_loss.dtype)
        grads = _scale_grads(unscaled, ctx.specs, ctx.factors, grad_loss, ctx.f64, *ctx.geometry)
        return (*grads, *[None] * 8)


def _expected(expected_grad, B: int, like: torch.Tensor, f64: bool) -> Optional[torch.Tensor]:
    if expected_grad is None:
        return None
    t = torch.as_tensor(expected_grad, dtype=torch.float64 if f64 else torch.float32, device=like.device)
    return (t.expand(B) if t.dim() == 0 else t).contiguous()


def _run(p, out_uncond, w, return_stats, block, num_blocks, expected_grad=None):
    if p.out.shape[0] == 0 or p.out[0].numel() == 0:
        raise ValueError("the fused kernel needs at least one transition with at least one element; "
                         "call fastnabla.residual_db_loss, which routes empty inputs to the reference")
    cfg = out_uncond is not None
    grad_on = torch.is_grad_enabled()

    def wants(t):
        return bool(grad_on and t is not None and t.requires_grad)

    if cfg:
        need = (wants(out_uncond), wants(p.out), wants(p.flow_next), wants(p.flow_cur))
    else:
        need = (wants(p.out), False, wants(p.flow_next), wants(p.flow_cur))
    if any(need):
        f64 = (torch.promote_types(out_uncond.dtype, p.out.dtype) if cfg else p.out.dtype) == torch.float64
        res = _ResidualDBFunction.apply(
            out_uncond if cfg else p.out, p.out if cfg else None, p.flow_next, p.flow_cur,
            p, out_uncond, w, need, return_stats, block, num_blocks,
            _expected(expected_grad, p.out.shape[0], p.out, f64))
        loss, st = res if return_stats else (res, None)
    else:
        loss, st, _ = _launch_forward(p, out_uncond, w, need=need, stats=return_stats, block=block,
                                      num_blocks=num_blocks)
    if not return_stats:
        return loss
    return loss, {name: st[i] for i, name in enumerate(STAT_NAMES)}


def residual_db_loss_triton(p, return_stats: bool = False, *, block: Optional[int] = None,
                            num_blocks: Optional[int] = None, expected_grad=None):
    """The fused kernel on validated ``LossInputs`` (see ``fastnabla.loss.residual_db_loss``).

    Returns loss (B,) float32 (float64 for float64 ``out``), and with ``return_stats`` the dict of detached (B,)
    float32 statistics of ``STAT_NAMES`` from the same pass. ``block``/``num_blocks`` override the launch
    geometry (tests). ``expected_grad`` (a number or (B,), non-zero): the upstream gradient the caller will send
    into loss_b; the forward then writes final gradients and the backward needs no second pass when it comes.
    ``fastnabla.residual_db_loss`` routes empty inputs to the reference before calling this.
    """
    return _run(p, None, 0.0, return_stats, block, num_blocks, expected_grad)


def residual_db_loss_cfg_triton(p, out_uncond: torch.Tensor, guidance_scale: float, return_stats: bool = False, *,
                                block: Optional[int] = None, num_blocks: Optional[int] = None, expected_grad=None):
    """The fused kernel with classifier-free guidance: ``p.out`` holds out_cond, and the guided output
    out_uncond + w·(out_cond − out_uncond) is formed in registers only. Gradients go to both halves (always a
    second, splitting pass; ``expected_grad`` is accepted and only changes what the first pass writes)."""
    return _run(p, out_uncond, float(guidance_scale), return_stats, block, num_blocks, expected_grad)

