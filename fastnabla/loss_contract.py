"""The arguments of ``residual_db_loss``, described once (ALGORITHM §4).

``ARGS`` is the one list: validation (``validate_loss_inputs``), the validated record (``LossInputs``), the public
signatures and docstrings of ``residual_db_loss``/``residual_db_loss_cfg``, the reference, the kernel launcher and
the loss benchmark all read it. A new term is one new ``Arg`` here plus its arithmetic in the reference and the
kernel. This module sits below both ``fastnabla.loss`` and ``fastnabla.kernels`` so neither imports the other.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["Arg", "ARGS", "CONFLICTS", "STAT_NAMES", "LossInputs", "validate_loss_inputs", "loss_signature",
           "args_doc", "SAMPLE_ARGS", "GRAD_ARGS"]

#: keys of the per-transition statistics returned with ``return_stats=True`` (each a detached (B,) float32).
#: "loss_forward" is the policy-weighted w·L_F when ``policy_weight`` is given.
STAT_NAMES = (
    "loss_forward",  # L_F
    "loss_terminal",  # L_T (0 where not terminal or no flow_next)
    "loss_reverse",  # L_R (0 where unused)
    "loss_trust_region",  # L_reg (0 where unused)
    "norm_d",  # ‖d‖ over the sample dims
    "norm_reward_grad_next",  # ‖reward_grad_next‖
    "norm_flow_next",  # ‖flow_next‖ (0 without a flow)
    "norm_out_delta",  # ‖out − out_old‖ (0 without out_old)
    "loss_returns",  # L_A, the flow-return residual (0 where terminal or without return_next)
)


@dataclass(frozen=True)
class Arg:
    """One argument of the loss.

    kind: "sample" (B, *S) tensor, "transition" (B,) tensor or "scalar" (one Python number for the batch).
    grad: the loss sends gradients to it (everything else is data, detached).
    used: over the scalar arguments, whether the argument takes part (None: always); an argument that does not
        take part is dropped (None in ``LossInputs``) even when passed.
    required: whether it must be given whenever it takes part; ``when`` says when, in words, for the error.
    """

    name: str
    kind: str
    doc: str
    grad: bool = False
    default: object = None
    used: Optional[Callable[[dict], bool]] = None
    required: bool = False
    when: str = "always"


def _strength_on(s):
    return s["strength"] != 1.0


def _trust_on(s):
    return s["trust_region_scale"] != 0.0


def _reverse_on(s):
    return s["reverse_scale"] != 0.0


def _reverse_ref_on(s):
    return s["reverse_scale"] != 0.0 and s["strength"] != 0.0


ARGS: tuple[Arg, ...] = (
    Arg("out", "sample", "policy output at x (after CFG)", grad=True, required=True),
    Arg("out_ref", "sample", "pretrained output at x (after CFG)", required=True),
    Arg("coef_out", "transition", "μ's coefficient of the output (``transition_coefficients``)", required=True),
    Arg("inv_var", "transition", "1/σ² of the transition, finite and > 0", required=True),
    Arg("reward_grad_next", "sample", "r' = β·γ(τ')·∇_{x'} log R(x̂0(x'))", required=True),
    Arg("flow_next", "sample", "g_φ(x', τ'), or None for no flow", grad=True),
    Arg("terminal", "transition", "bool/0-1: x' is the clean sample (None: no terminal transition)"),
    Arg("strength", "scalar", "λ, the pretrained strength", default=1.0),
    Arg("x", "sample", "the state x", used=_strength_on, required=True, when="strength != 1"),
    Arg("x_next", "sample", "the next state x'", used=_strength_on, required=True, when="strength != 1"),
    Arg("coef_x", "transition", "μ's coefficient of x", used=_strength_on, required=True, when="strength != 1"),
    Arg("out_old", "sample", "sampling-time output at x (trust region)", used=_trust_on, required=True,
        when="trust_region_scale != 0"),
    Arg("trust_region_scale", "scalar", "weight of mean (out − out_old)²", default=0.0),
    Arg("reverse_scale", "scalar", "weight of the reverse residual L_R", default=0.0),
    Arg("score_rev", "sample", "s_R of the policy at (x, x')", used=_reverse_on, required=True,
        when="reverse_scale != 0"),
    Arg("score_rev_ref", "sample", "s_R of the pretrained model", used=_reverse_ref_on, required=True,
        when="reverse_scale != 0 and strength != 0"),
    Arg("flow_cur", "sample", "g_φ(x, τ) in the reverse residual", grad=True, used=_reverse_on),
    Arg("reward_grad_cur", "sample", "r = β·γ(τ)·∇_x log R(x̂0(x))", used=_reverse_on, required=True,
        when="reverse_scale != 0"),
    Arg("terminal_scale", "scalar", "weight of the terminal flow term L_T (not used with return_next: no L_T)",
        default=1.0),
    # the returns recipe (ALGORITHM §5b)
    Arg("policy_weight", "transition", "w_k ≥ 0 on the policy's forward residual, w·L_F (None: 1); with flow_next "
        "only together with return_next"),
    Arg("return_next", "sample", "G_{k+1}, the gradient return at x' (ALGORITHM §5b). Given, g' is data in L_F "
        "(target sg(r' + g')) and L_A = (1 − terminal)·mean (g' + r' − G_{k+1})² trains the flow instead of L_T; "
        "needs flow_next, strength 1 and reverse_scale 0"),
)

#: combinations the contract refuses, checked after the per-argument checks: (refused(values), message)
CONFLICTS: tuple[tuple[Callable[[dict], bool], str], ...] = (
    (lambda v: v["return_next"] is not None and v["flow_next"] is None,
     "return_next needs flow_next: L_A regresses the flow g' on it (without a flow, pass neither)"),
    (lambda v: v["return_next"] is not None and v["strength"] != 1.0,
     "return_next needs strength == 1: the gradient returns carry the pretrained model's flow (ALGORITHM §5b)"),
    (lambda v: v["return_next"] is not None and v["reverse_scale"] != 0.0,
     "reverse_scale must be 0 with return_next: L_A is then the flow's only gradient source"),
    (lambda v: v["policy_weight"] is not None and v["flow_next"] is not None and v["return_next"] is None,
     "policy_weight with flow_next needs return_next: w weights only the policy's share of L_F, and without "
     "return_next the flow shares L_F (ALGORITHM §5b)"),
)

_BY_NAME = {a.name: a for a in ARGS}
#: the (B, *S) arguments, in contract order
SAMPLE_ARGS = tuple(a.name for a in ARGS if a.kind == "sample")
#: the arguments that receive gradients, in contract order
GRAD_ARGS = tuple(a.name for a in ARGS if a.grad)


def _properties():
    return {
        "use_strength": property(lambda self: self.strength != 1.0),
        "use_trust": property(lambda self: self.trust_region_scale != 0.0),
        "use_reverse": property(lambda self: self.reverse_scale != 0.0),
        "use_returns": property(lambda self: self.return_next is not None),
        "compute_dtype": property(lambda self: torch.float64 if self.out.dtype == torch.float64 else torch.float32),
        "__doc__": "Validated arguments of ``residual_db_loss`` (one field per ``ARGS`` entry); tensors that a "
                   "setting does not use are None, scalars are floats.",
    }


LossInputs = dataclasses.make_dataclass(
    "LossInputs", [(a.name, object, dataclasses.field(default=a.default)) for a in ARGS],
    namespace=_properties())
LossInputs.__module__ = __name__


def _scalar_float(name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a Python number (one value for the whole batch), got shape "
                             f"{tuple(v.shape)}")
        v = v.item()
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def validate_loss_inputs(out, out_ref, *, check_values: bool = True, **terms) -> "LossInputs":
    """Check every argument of ``residual_db_loss`` once; a ValueError names the argument at fault.

    ``check_values=False`` skips the checks that read tensor values (finite coefficients, inv_var > 0, terminal in
    {0, 1}): on a GPU each of them is a host–device sync. Shapes, devices and dtypes are always checked.
    """
    unknown = sorted(set(terms) - set(_BY_NAME))
    if unknown:
        raise ValueError(f"{unknown[0]} is not an argument of residual_db_loss; valid: {', '.join(_BY_NAME)}")
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ValueError("out must be a tensor shaped (B, *S) with at least one sample dim")
    if not out.is_floating_point():
        raise ValueError(f"out must be a floating-point tensor, got {out.dtype}")
    B, shape, dev = out.shape[0], out.shape, out.device
    vals = dict(out=out, out_ref=out_ref)
    for a in ARGS:
        if a.kind == "scalar":
            vals[a.name] = _scalar_float(a.name, terms.get(a.name, a.default))
        elif a.name not in vals:
            vals[a.name] = terms.get(a.name)
    scalars = {a.name: vals[a.name] for a in ARGS if a.kind == "scalar"}
    for a in ARGS:
        if a.kind == "scalar":
            continue
        if a.used is not None and not a.used(scalars):
            vals[a.name] = None  # not part of this setting: dropped, never read
            continue
        t = vals[a.name]
        if t is None:
            if a.required:
                raise ValueError(f"{a.name} is required when {a.when}; pass a tensor")
            continue
        if a.kind == "sample":
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{a.name} must be a tensor shaped {tuple(shape)}, got {type(t).__name__}")
            if t.shape != shape:
                raise ValueError(f"{a.name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of out)")
        else:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{a.name} must be a per-transition tensor shaped ({B},), got {type(t).__name__}")
            if t.shape != (B,):
                raise ValueError(f"{a.name} has shape {tuple(t.shape)}, expected ({B},): one value per transition")
        if t.device != dev:
            raise ValueError(f"{a.name} is on {t.device}, expected {dev} (the device of out)")
        if a.name != "terminal" and not t.is_floating_point():
            raise ValueError(f"{a.name} must be a floating-point tensor, got {t.dtype}")
    for refused, msg in CONFLICTS:
        if refused(vals):
            raise ValueError(msg)
    if check_values:
        pw = vals["policy_weight"]
        if pw is not None and not bool((torch.isfinite(pw) & (pw >= 0)).all()):
            raise ValueError("policy_weight must be finite and ≥ 0 on every transition")
        for name in ("coef_out", "coef_x"):
            t = vals[name]
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN/inf; check the scheduler coefficients")
        if not bool((torch.isfinite(vals["inv_var"]) & (vals["inv_var"] > 0)).all()):
            raise ValueError(
                "inv_var must be finite and > 0 on every transition: a deterministic step (σ = 0: eta = 0, or the "
                "last step with set_alpha_to_one=True) cannot be trained; use eta > 0 and "
                "set_alpha_to_one=False/steps_offset=1")
    term = vals["terminal"]
    if term is not None:
        if term.dtype != torch.bool and check_values and not bool(((term == 0) | (term == 1)).all()):
            raise ValueError("terminal must be a bool tensor or contain only 0/1 values")
        vals["terminal"] = term.to(torch.float32)
    return LossInputs(**vals)


def args_doc(indent: str = "        ") -> str:
    """The ``Args:`` lines of every contract argument after out/out_ref, for the public functions' docstrings."""
    lines = []
    for a in ARGS[2:]:
        shape = {"sample": "(B, *S)", "transition": "(B,)", "scalar": f"float, default {a.default}"}[a.kind]
        extra = "; receives gradients" if a.grad else ""
        need = f"; required when {a.when}" if a.required and a.used is not None else ""
        lines.append(f"{indent}{a.name}: {shape} {a.doc}{extra}{need}.")
    return "\n".join(lines)


def loss_signature(leading: list, trailing: list) -> inspect.Signature:
    """A signature: ``leading`` positional parameters, then every contract argument after out/out_ref as a keyword,
    then ``trailing`` keyword parameters (name, default)."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in leading]
    for a in ARGS[2:]:
        params.append(inspect.Parameter(a.name, inspect.Parameter.KEYWORD_ONLY, default=a.default))
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in trailing]
    return inspect.Signature(params)
