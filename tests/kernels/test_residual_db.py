"""The fused Triton residual ∇-DB loss (kernels/residual_db.py) against the PyTorch reference, on CPU.

Runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Precision rule for low-precision
inputs (flash-attention style): with the same low-precision input values, compare the kernel and the reference in
that precision against the reference upcast to float64 and require err(kernel) ≤ 2·err(reference) + atol.
Shapes are small and blocks wide so the interpreter runs few programs; ``block``/``num_blocks`` force loops and
the two-stage reduction where a test is about them.

On a GPU the same tests check the compiled kernels: ``FASTNABLA_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest
tests/kernels`` (``benchmarks/gpu_suite.sh`` does this) makes every tensor here, and the float64 data, CUDA tensors.
"""
import logging
import os

import pytest
import torch

from fastnabla import residual_db_loss, residual_db_loss_cfg
from fastnabla import loss as loss_mod
from fastnabla.kernels import residual_db as K
from fastnabla.loss import STAT_NAMES, validate_loss_inputs

SAMPLE_KEYS = ("out_ref", "reward_grad_next", "flow_next", "x", "x_next", "out_old", "score_rev", "score_rev_ref",
               "flow_cur", "reward_grad_cur")
RETURNS_KEYS = ("return_next",)  # a sample key whose presence switches the loss (§5b): passed only when conf asks
GRAD_KEYS = ("out", "out_uncond", "out_cond", "flow_next", "flow_cur")
DEVICE = torch.device(os.environ.get("FASTNABLA_TEST_DEVICE", "cpu"))
EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}

# Each optional term is on in some configs and off in others; λ = 1 and λ ≠ 1 (incl. λ = 0: no score_rev_ref).
# The returns recipe (§5b): return_next / policy_weight are passed when the config sets them True.
CONFIGS = {
    "minimal": dict(strength=1.0, flow_next=False, terminal=None),
    "flow_terminal": dict(strength=1.0, flow_next=True, terminal="some", terminal_scale=2.5),
    "strength_trust": dict(strength=0.6, flow_next=True, terminal="none", trust_region_scale=0.7),
    "reverse": dict(strength=0.8, flow_next=True, flow_cur=True, terminal="some", reverse_scale=1.3,
                    trust_region_scale=0.4, terminal_scale=0.5),
    "reverse_lam0_noflow": dict(strength=0.0, flow_next=False, flow_cur=False, terminal="all", reverse_scale=0.9),
    "returns": dict(strength=1.0, flow_next=True, terminal="some", return_next=True, policy_weight=True,
                    trust_region_scale=0.7, terminal_scale=2.5),  # terminal_scale is not used: no L_T
    "returns_unweighted": dict(strength=1.0, flow_next=True, terminal=None, return_next=True),
    "weighted_noflow": dict(strength=0.6, flow_next=False, terminal="some", policy_weight=True),
}


def make(B=3, S=(4, 9), seed=0, cfg=False):
    """float64 data; callers cast. out is a CFG pair (out_uncond, out_cond) when ``cfg``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, device="cpu")

    t = {k: r(B, *S) for k in SAMPLE_KEYS}
    if cfg:
        t["out_uncond"], t["out_cond"] = r(B, *S), r(B, *S)
    else:
        t["out"] = r(B, *S)
    t["coef_out"] = r(B).abs() + 0.5
    t["coef_x"] = r(B).abs() + 0.5
    t["inv_var"] = r(B).abs() + 0.5
    t["upstream"] = r(B)  # ∂L/∂loss_b ≠ 1 and different per transition
    # drawn last so that the data of the paper's configs does not depend on them
    t["return_next"] = r(B, *S)
    t["policy_weight"] = r(B).abs() + 0.2
    return {k: v.to(DEVICE) for k, v in t.items()}


@pytest.fixture(autouse=True)
def _on_device():
    """Factory calls in the tests (torch.zeros, torch.tensor, …) make tensors on DEVICE."""
    with torch.device(DEVICE):
        yield


def terminal_mask(mode, B):
    if mode is None:
        return None
    return {"none": torch.zeros(B, dtype=torch.bool), "all": torch.ones(B, dtype=torch.bool),
            "some": torch.arange(B) % 2 == 1}[mode]


def evaluate(impl, t, conf, dtype, *, upcast=False, w=None, stats=False, grad=GRAD_KEYS, upstream=True, **launch):
    """Loss, gradients and stats of one implementation.

    impl: "kernel" (the Triton functions, with optional launch overrides), "api" (public entry, backend="triton")
    or "reference". Sample tensors are cast to ``dtype`` (then to float64 when ``upcast``); the names in ``grad``
    that exist become leaves requiring grad. The loss is weighted by ``t["upstream"]`` before summing.
    """
    conf = dict(conf)
    B = t["coef_out"].shape[0]

    def cast(x):
        x = x.to(dtype)
        return x.to(torch.float64) if upcast else x

    leaves = {}
    kw = {}
    for k in ("out", "out_uncond", "out_cond") + SAMPLE_KEYS + RETURNS_KEYS:
        if k not in t or (k in RETURNS_KEYS and not conf.get(k)):
            continue
        if k == "flow_next" and not conf.get("flow_next", True):
            continue
        if k == "flow_cur" and not conf.get("flow_cur", False):
            continue
        x = cast(t[k]).clone().requires_grad_(k in grad)
        if k in grad:
            leaves[k] = x
        kw[k] = x
    kw.update(coef_out=t["coef_out"].float(), inv_var=t["inv_var"].float(), coef_x=t["coef_x"].float(),
              terminal=terminal_mask(conf.pop("terminal", None), B))
    if conf.pop("policy_weight", False):
        kw["policy_weight"] = t["policy_weight"].float()
    conf.pop("flow_next", None), conf.pop("flow_cur", None), conf.pop("return_next", None)
    kw.update(conf)
    cfg = "out_cond" in kw
    if impl in ("api", "reference"):
        backend = "triton" if impl == "api" else "reference"
        if cfg:
            res = residual_db_loss_cfg(kw.pop("out_uncond"), kw.pop("out_cond"), w, kw.pop("out_ref"), **kw,
                                       backend=backend, return_stats=stats)
        else:
            res = residual_db_loss(kw.pop("out"), kw.pop("out_ref"), **kw, backend=backend, return_stats=stats)
    else:
        if cfg:
            ou = kw.pop("out_uncond")
            p = validate_loss_inputs(kw.pop("out_cond"), kw.pop("out_ref"), **kw)
            res = K.residual_db_loss_cfg_triton(p, ou, w, return_stats=stats, **launch)
        else:
            p = validate_loss_inputs(kw.pop("out"), kw.pop("out_ref"), **kw)
            res = K.residual_db_loss_triton(p, return_stats=stats, **launch)
    loss, st = res if stats else (res, None)
    grads = {}
    if leaves:
        weights = t["upstream"].to(loss.dtype) if upstream else torch.ones(B, dtype=loss.dtype)
        gs = torch.autograd.grad((loss * weights).sum(), list(leaves.values()), allow_unused=True)
        grads = dict(zip(leaves, gs))
    return dict(loss=loss.detach(), grads=grads, stats=st)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def scale(x):
    return max(x.abs().max().item(), 1e-30)


def assert_close(a, b, rtol, what):
    err = max_err(a, b)
    assert err <= rtol * scale(b), f"{what}: max error {err:.3e} > {rtol:.1e} × {scale(b):.3e}"


def assert_precision_rule(k, pt, up, dtype):
    """err(kernel) ≤ 2·err(reference in the same precision) + atol, against the float64 reference."""
    loss_atol = 1e-6 * scale(up["loss"])  # the loss is fp32 math in both
    ek, ep = max_err(k["loss"], up["loss"]), max_err(pt["loss"], up["loss"])
    assert ek <= 2 * ep + loss_atol, f"loss: kernel err {ek:.3e}, reference err {ep:.3e}"
    assert k["loss"].dtype == torch.float32
    assert set(k["grads"]) == set(up["grads"])
    for name, g64 in up["grads"].items():
        gk, gp = k["grads"][name], pt["grads"][name]
        assert (gk is None) == (g64 is None), name
        if g64 is None:
            continue
        assert gk.dtype == dtype and gk.shape == g64.shape, name
        # atol: the kernel rounds 16-bit gradients twice (unscaled, then × upstream), and the interpreter's
        # fp32→16-bit stores truncate instead of rounding: ≤ 2 ulp at the largest value.
        atol = (2 * EPS[dtype] if dtype != torch.float32 else 16 * EPS[dtype]) * scale(g64)
        ek, ep = max_err(gk, g64), max_err(gp, g64)
        assert ek <= 2 * ep + atol, f"grad {name}: kernel err {ek:.3e}, reference err {ep:.3e}, atol {atol:.1e}"


# -------------------------------------------------------------------------------------------- precision matrix


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_vs_reference_precision(config, dtype):
    t = make(B=3, S=(5, 13), seed=hash(config) % 1000)
    conf = CONFIGS[config]
    # block 32 over 65 elements: 3 loop steps, the last one partial; two programs per transition
    k = evaluate("kernel", t, conf, dtype, block=32, num_blocks=2)
    pt = evaluate("reference", t, conf, dtype)
    up = evaluate("reference", t, conf, dtype, upcast=True)
    assert_precision_rule(k, pt, up, dtype)


def test_float64_matches_float64_reference():
    t = make(B=4, S=(3, 7), seed=3)
    conf = dict(CONFIGS["reverse"], strength=0.3)
    k = evaluate("kernel", t, conf, torch.float64, block=8, num_blocks=2)
    ref = evaluate("reference", t, conf, torch.float64)
    assert k["loss"].dtype == torch.float64
    assert_close(k["loss"], ref["loss"], 1e-13, "loss")
    for name, g in ref["grads"].items():
        assert_close(k["grads"][name], g, 1e-13, name)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("cfg", [False, True])
def test_float64_kernel_equals_the_closed_form(config, cfg):
    """Independent of the reference: the kernel's loss and gradients (× a per-transition upstream gradient) against
    the element-wise closed forms of ALGORITHM §4 (and §5b's returns terms), CFG halves split (1 − w, w)."""
    from tests.helpers.loss_closed_form import closed_form

    t = make(B=3, S=(3, 5), seed=29, cfg=cfg)
    conf = CONFIGS[config]
    w = 3.0
    k = evaluate("kernel", t, conf, torch.float64, w=w if cfg else None, block=8, num_blocks=2)
    d = {n: t[n] for n in SAMPLE_KEYS}
    d.update({n: t[n].float().double() for n in ("coef_out", "coef_x", "inv_var")})  # evaluate() passes fp32
    d["out"] = t["out_uncond"] + w * (t["out_cond"] - t["out_uncond"]) if cfg else t["out"]
    d["terminal"] = terminal_mask(conf.get("terminal"), 3)
    if not conf.get("flow_next", True):
        d["flow_next"] = None
    if not conf.get("flow_cur", False):
        d["flow_cur"] = None
    d["return_next"] = t["return_next"] if conf.get("return_next") else None
    d["policy_weight"] = t["policy_weight"].float().double() if conf.get("policy_weight") else None
    loss, g = closed_form(d, conf.get("strength", 1.0), conf.get("trust_region_scale", 0.0),
                          conf.get("reverse_scale", 0.0), conf.get("terminal_scale", 1.0))
    torch.testing.assert_close(k["loss"], loss, rtol=1e-12, atol=1e-12)
    up = t["upstream"].view(3, 1, 1)
    want = {"flow_next": g["flow_next"], "flow_cur": g["flow_cur"]}
    if cfg:
        want.update(out_uncond=(1 - w) * g["out"], out_cond=w * g["out"])
    else:
        want["out"] = g["out"]
    for name, v in want.items():
        if v is None:
            assert k["grads"].get(name) is None, name
        else:
            torch.testing.assert_close(k["grads"][name], up * v, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("cfg", [False, True])
def test_gradcheck_through_kernel(cfg):
    t = make(B=2, S=(2, 3), seed=5, cfg=cfg)
    conf = dict(strength=0.7, terminal=terminal_mask("some", 2), trust_region_scale=0.5, reverse_scale=1.1,
                terminal_scale=1.5)
    names = ["out_uncond", "out_cond"] if cfg else ["out"]
    names += ["flow_next", "flow_cur"]
    leaves = [t[n].clone().requires_grad_(True) for n in names]
    data = {k: t[k] for k in SAMPLE_KEYS if k not in names}

    def f(*xs):
        kw = dict(zip(names, xs), **data, coef_out=t["coef_out"], inv_var=t["inv_var"], coef_x=t["coef_x"], **conf)
        if cfg:
            p = validate_loss_inputs(kw.pop("out_cond"), kw.pop("out_ref"), **{k: v for k, v in kw.items()
                                                                               if k != "out_uncond"})
            return K.residual_db_loss_cfg_triton(p, kw["out_uncond"], 2.5)
        p = validate_loss_inputs(kw.pop("out"), kw.pop("out_ref"), **kw)
        return K.residual_db_loss_triton(p)

    assert "ResidualDB" in type(f(*leaves).grad_fn).__name__
    # one program per transition here (interpreter time); loops and splits have their own tests
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("cfg", [False, True])
def test_gradcheck_through_kernel_returns(cfg):
    """The returns terms (§5b) through the policy's gradient: policy weight, trust region, some terminal rows.

    Only the policy's outputs are checked here: the flow's gradient is by definition not the derivative of the loss
    value (g' also enters L_F as the detached target), so finite differences cannot check it; the closed-form tests
    do."""
    t = make(B=3, S=(2, 3), seed=7, cfg=cfg)
    conf = dict(terminal=terminal_mask("some", 3), trust_region_scale=0.5, policy_weight=t["policy_weight"],
                return_next=t["return_next"])
    names = ["out_uncond", "out_cond"] if cfg else ["out"]
    leaves = [t[n].clone().requires_grad_(True) for n in names]
    data = {k: t[k] for k in ("out_ref", "reward_grad_next", "out_old", "flow_next")}

    def f(*xs):
        kw = dict(zip(names, xs), **data, coef_out=t["coef_out"], inv_var=t["inv_var"], **conf)
        if cfg:
            ou = kw.pop("out_uncond")
            p = validate_loss_inputs(kw.pop("out_cond"), kw.pop("out_ref"), **kw)
            return K.residual_db_loss_cfg_triton(p, ou, 2.5)
        p = validate_loss_inputs(kw.pop("out"), kw.pop("out_ref"), **kw)
        return K.residual_db_loss_triton(p)

    assert "ResidualDB" in type(f(*leaves).grad_fn).__name__
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("terminal", [None, "none", "some", "all"])
@pytest.mark.parametrize("num_blocks", [1, 2])
def test_returns_terminal_masks_against_the_closed_form(terminal, num_blocks):
    """Returns mode: L_A and the flow gradient vanish on terminal rows, L_T never appears (whatever terminal_scale
    says), and loss_returns / loss_forward are the closed-form (1 − t)·mean r_A² and w·mean r_F²."""
    from tests.helpers.loss_closed_form import closed_form

    B = 4
    t = make(B=B, S=(12,), seed=8)
    conf = dict(CONFIGS["returns"], terminal=terminal)
    k = evaluate("kernel", t, conf, torch.float64, stats=True, block=4, num_blocks=num_blocks, upstream=False)
    term = terminal_mask(terminal, B)
    d = {n: t[n] for n in ("out", "out_ref", "reward_grad_next", "flow_next", "out_old", "return_next")}
    d.update({n: t[n].float().double() for n in ("coef_out", "inv_var", "policy_weight")}, terminal=term)
    loss, g = closed_form(d, trust=conf["trust_region_scale"], tscale=conf["terminal_scale"])
    torch.testing.assert_close(k["loss"], loss, rtol=1e-12, atol=1e-12)
    for name in ("out", "flow_next"):
        torch.testing.assert_close(k["grads"][name], g[name], rtol=1e-11, atol=1e-12)
    tt = term.double() if term is not None else torch.zeros(B, dtype=torch.float64)
    r_f = (d["coef_out"].view(B, 1) * (t["out"] - t["out_ref"]) * d["inv_var"].view(B, 1) - t["reward_grad_next"]
           - (1 - tt).view(B, 1) * t["flow_next"])
    r_a = t["flow_next"] + t["reward_grad_next"] - t["return_next"]
    st = k["stats"]
    torch.testing.assert_close(st["loss_forward"].double(), d["policy_weight"] * r_f.square().mean(1), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(st["loss_returns"].double(), (1 - tt) * r_a.square().mean(1), rtol=1e-6, atol=0)
    assert torch.all(st["loss_terminal"] == 0) and torch.all(st["loss_reverse"] == 0)
    if terminal == "all":
        assert torch.all(k["grads"]["flow_next"] == 0) and torch.all(st["loss_returns"] == 0)


# ------------------------------------------------------------------------------------------ shapes and blocks


@pytest.mark.parametrize("S,block,num_blocks,expect_blocks", [
    ((3, 5, 7), 16, 1, 1),  # 105 elements: 7 loop steps in one program, last step partial
    ((3, 5, 7), 16, 3, 3),  # split over 3 programs (3 steps each, the last program shorter): two-stage reduction
    ((2, 17), 8, 5, 5),  # 34 elements, block 8: five programs, the last with 2 live lanes
    ((1,), 16, None, 1),  # a single element per transition
    ((64,), 16, 8, 4),  # more programs asked than blocks exist: clamped to 4
])
def test_odd_shapes_and_block_loops(S, block, num_blocks, expect_blocks):
    B = 3
    assert K.launch_geometry(B, torch.Size(S).numel(), torch.device("cpu"), block, num_blocks)[2] == expect_blocks
    t = make(B=B, S=S, seed=11)
    conf = CONFIGS["reverse"]
    k = evaluate("kernel", t, conf, torch.float32, block=block, num_blocks=num_blocks, stats=True)
    ref = evaluate("reference", t, conf, torch.float64, stats=True)
    assert_close(k["loss"], ref["loss"], 1e-5, "loss")
    for name, g in ref["grads"].items():
        assert_close(k["grads"][name], g, 1e-5, name)
    for name in STAT_NAMES:
        assert_close(k["stats"][name], ref["stats"][name], 1e-5, name)


def test_non_contiguous_and_mixed_dtype_inputs():
    B, S = 3, (4, 6)
    t = make(B=B, S=S, seed=2)
    conf = CONFIGS["reverse"]
    # a transposed (non-contiguous) out, bf16 out_ref, fp16 flow_next and fp64 data mixed in one call
    out = t["out"].float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not out.is_contiguous()
    flow_next = t["flow_next"].half().requires_grad_(True)
    flow_cur = t["flow_cur"].clone().requires_grad_(True)  # float64 data in a float32 computation
    wide = torch.cat([t["reward_grad_next"], torch.zeros(B, S[0], 5, dtype=torch.float64)], dim=2)[:, :, :S[1]]
    kw = {k: t[k] for k in SAMPLE_KEYS}
    kw.update(out_ref=t["out_ref"].bfloat16(), flow_next=flow_next, flow_cur=flow_cur, reward_grad_next=wide)
    kw.update({k: v for k, v in conf.items() if k not in ("flow_next", "flow_cur", "terminal")})
    loss = residual_db_loss(out, coef_out=t["coef_out"], inv_var=t["inv_var"].float(), coef_x=t["coef_x"],
                            terminal=terminal_mask(conf["terminal"], B), backend="triton", **kw)
    loss_ref = residual_db_loss(out, coef_out=t["coef_out"], inv_var=t["inv_var"].float(), coef_x=t["coef_x"],
                                terminal=terminal_mask(conf["terminal"], B), backend="reference", **kw)
    assert loss.dtype == torch.float32
    assert_close(loss, loss_ref, 1e-6, "loss")
    g = torch.autograd.grad((loss * t["upstream"].float()).sum(), [out, flow_next, flow_cur])
    assert [x.dtype for x in g] == [torch.float32, torch.float16, torch.float64]
    assert g[0].shape == out.shape
    gr = torch.autograd.grad((loss_ref * t["upstream"].float()).sum(), [out, flow_next, flow_cur])
    for a, b, name in zip(g, gr, ("out", "flow_next", "flow_cur")):
        assert_close(a, b, 2 * EPS[b.dtype] + 1e-6, name)


# --------------------------------------------------------------------------------------- gradients and terms


@pytest.mark.parametrize("with_grad", [(), ("out",), ("flow_next",), ("flow_cur", "out"),
                                       ("out", "flow_next", "flow_cur")])
def test_inputs_with_and_without_requires_grad(with_grad):
    t = make(B=3, S=(10,), seed=4)
    conf = CONFIGS["reverse"]
    k = evaluate("kernel", t, conf, torch.float32, grad=with_grad, num_blocks=2, block=8)
    ref = evaluate("reference", t, conf, torch.float32, grad=with_grad)
    assert_close(k["loss"], ref["loss"], 1e-6, "loss")
    assert set(k["grads"]) == set(with_grad)
    for name in with_grad:
        assert_close(k["grads"][name], ref["grads"][name], 1e-5, name)


def test_no_grad_mode_writes_no_gradients():
    t = make(B=2, S=(8,), seed=1)
    with torch.no_grad():
        k = evaluate("kernel", t, CONFIGS["reverse"], torch.float32, grad=())
    x = t["out"].float().requires_grad_(True)
    with torch.no_grad():
        loss = residual_db_loss(x, t["out_ref"].float(), coef_out=t["coef_out"].float(),
                                inv_var=t["inv_var"].float(), reward_grad_next=t["reward_grad_next"].float(),
                                backend="triton")
    assert loss.grad_fn is None and not loss.requires_grad
    ref = evaluate("reference", t, CONFIGS["reverse"], torch.float32, grad=())
    assert_close(k["loss"], ref["loss"], 1e-6, "loss")


@pytest.mark.parametrize("terminal", [None, "none", "some", "all"])
def test_terminal_masks(terminal):
    t = make(B=4, S=(12,), seed=8)
    conf = dict(CONFIGS["reverse"], terminal=terminal)
    k = evaluate("kernel", t, conf, torch.float64, stats=True)
    ref = evaluate("reference", t, conf, torch.float64, stats=True)
    assert_close(k["loss"], ref["loss"], 1e-12, "loss")
    for name, g in ref["grads"].items():
        assert_close(k["grads"][name], g, 1e-12, name)
    if terminal == "all":
        assert torch.all(k["stats"]["loss_reverse"] == 0) and torch.all(k["grads"]["flow_cur"] == 0)
    if terminal in (None, "none"):
        assert torch.all(k["stats"]["loss_terminal"] == 0)


def test_upstream_gradient_scales_each_transition():
    """Backward multiplies by grad_output[b]: a transition with weight 0 gets zero gradient, weight 2 doubles it."""
    t = make(B=3, S=(16,), seed=9)
    conf = CONFIGS["reverse"]
    base = evaluate("kernel", t, conf, torch.float32, upstream=False)
    t2 = dict(t, upstream=torch.tensor([0.0, 2.0, -0.5], dtype=torch.float64))
    k = evaluate("kernel", t2, conf, torch.float32)
    for name, g in base["grads"].items():
        expect = g * torch.tensor([0.0, 2.0, -0.5]).view(3, *([1] * (g.dim() - 1)))
        assert torch.equal(k["grads"][name], expect), name
    # loss.sum(): the upstream gradient arrives as an expanded (stride 0) tensor
    x = t["out"].float().requires_grad_(True)
    residual_db_loss(x, t["out_ref"].float(), coef_out=t["coef_out"], inv_var=t["inv_var"],
                     reward_grad_next=t["reward_grad_next"].float(), backend="triton").sum().backward()
    y = t["out"].float().requires_grad_(True)
    residual_db_loss(y, t["out_ref"].float(), coef_out=t["coef_out"], inv_var=t["inv_var"],
                     reward_grad_next=t["reward_grad_next"].float(), backend="reference").sum().backward()
    assert_close(x.grad, y.grad, 1e-6, "out")


def test_repeated_backward_with_retained_graph():
    t = make(B=2, S=(8,), seed=1)
    x = t["out"].float().requires_grad_(True)
    loss = residual_db_loss(x, t["out_ref"].float(), coef_out=t["coef_out"], inv_var=t["inv_var"],
                            reward_grad_next=t["reward_grad_next"].float(), backend="triton")
    loss.sum().backward(retain_graph=True)
    first = x.grad.clone()
    (2 * loss).sum().backward()  # the saved unscaled gradients are untouched by the first backward
    assert torch.equal(x.grad, 3 * first)


def test_under_autocast():
    t = make(B=2, S=(8,), seed=6)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        k = evaluate("api", t, CONFIGS["reverse"], torch.float32)
    ref = evaluate("reference", t, CONFIGS["reverse"], torch.float32)
    assert k["loss"].dtype == torch.float32
    assert_close(k["loss"], ref["loss"], 1e-6, "loss")
    for name, g in ref["grads"].items():
        assert k["grads"][name].dtype == torch.float32
        assert_close(k["grads"][name], g, 1e-5, name)


# ------------------------------------------------------------------------------------------------ CFG, stats


@pytest.mark.parametrize("w", [0.0, 1.0, 5.0])
@pytest.mark.parametrize("config", ["flow_terminal", "reverse", "returns"])
def test_cfg_equals_guidance_then_loss(w, config):
    t = make(B=3, S=(4, 5), seed=13, cfg=True)
    conf = CONFIGS[config]
    k = evaluate("kernel", t, conf, torch.float64, w=w, stats=True, block=8, num_blocks=2)
    ref = evaluate("reference", t, conf, torch.float64, w=w, stats=True)
    assert_close(k["loss"], ref["loss"], 1e-12, "loss")
    for name in STAT_NAMES:
        assert_close(k["stats"][name], ref["stats"][name], 1e-6, name)
    assert set(k["grads"]) >= {"out_uncond", "out_cond"}
    for name, g in ref["grads"].items():
        assert_close(k["grads"][name], g, 1e-12, name)
    # and the split of the out gradient is exactly (1 − w, w) of the plain loss's
    guided = {k: v for k, v in t.items() if k not in ("out_uncond", "out_cond")}
    guided["out"] = t["out_uncond"] + w * (t["out_cond"] - t["out_uncond"])
    plain = evaluate("kernel", guided, conf, torch.float64)
    assert_close(k["grads"]["out_uncond"], (1 - w) * plain["grads"]["out"], 1e-12, "out_uncond")
    assert_close(k["grads"]["out_cond"], w * plain["grads"]["out"], 1e-12, "out_cond")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cfg_low_precision(dtype):
    t = make(B=3, S=(4, 9), seed=21, cfg=True)
    conf = CONFIGS["strength_trust"]
    k = evaluate("api", t, conf, dtype, w=4.0)
    pt = evaluate("reference", t, conf, dtype, w=4.0)
    up = evaluate("reference", t, conf, dtype, w=4.0, upcast=True)
    assert_precision_rule(k, pt, up, dtype)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("num_blocks", [1, 3])
def test_stats_equal_reference(config, num_blocks):
    t = make(B=3, S=(6, 7), seed=17)
    k = evaluate("kernel", t, CONFIGS[config], torch.float32, stats=True, block=16, num_blocks=num_blocks)
    ref = evaluate("reference", t, CONFIGS[config], torch.float64, stats=True)
    assert list(k["stats"]) == list(STAT_NAMES)
    for name in STAT_NAMES:
        s = k["stats"][name]
        assert s.dtype == torch.float32 and s.shape == (3,) and not s.requires_grad
        assert_close(s, ref["stats"][name].float(), 1e-5, name)
    # same loss with and without the statistics
    plain = evaluate("kernel", t, CONFIGS[config], torch.float32, block=16, num_blocks=num_blocks)
    assert torch.equal(plain["loss"], k["loss"])


def test_deterministic():
    t = make(B=4, S=(3, 50), seed=23)
    conf = CONFIGS["reverse"]
    runs = [evaluate("kernel", t, conf, torch.bfloat16, stats=True, block=32, num_blocks=3) for _ in range(2)]
    a, b = runs
    assert torch.equal(a["loss"], b["loss"])
    for name in a["grads"]:
        assert torch.equal(a["grads"][name], b["grads"][name]), name
    for name in STAT_NAMES:
        assert torch.equal(a["stats"][name], b["stats"][name]), name


# ----------------------------------------------------------------------------------------------------- dispatch


def _small(requires_grad=True):
    t = make(B=2, S=(6,), seed=0)
    return dict(out=t["out"].float().requires_grad_(requires_grad), out_ref=t["out_ref"].float(),
                coef_out=t["coef_out"].float(), inv_var=t["inv_var"].float(),
                reward_grad_next=t["reward_grad_next"].float(), flow_next=t["flow_next"].float())


def test_dispatch_cpu_reference_and_explicit_triton():
    b = _small()
    assert "ResidualDB" not in type(residual_db_loss(**b).grad_fn).__name__  # CPU auto → reference
    assert "ResidualDB" in type(residual_db_loss(**b, backend="triton").grad_fn).__name__
    ou = b["out"].detach().clone().requires_grad_(True)
    assert "ResidualDB" in type(residual_db_loss_cfg(ou, b.pop("out"), 2.0, b.pop("out_ref"), **b,
                                                     backend="triton").grad_fn).__name__


def test_triton_backend_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    b = _small()
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        residual_db_loss(**b, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        residual_db_loss_cfg(b["out"], b.pop("out"), 2.0, b.pop("out_ref"), **b, backend="triton")


def test_cuda_without_triton_falls_back_once(monkeypatch, caplog):
    monkeypatch.setattr(loss_mod, "_triton_available_for", lambda device: (False, "triton is not installed"))
    monkeypatch.setattr(loss_mod, "_fallback_logged", False)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="fastnabla.loss"):
        assert loss_mod._kernels_for("auto", cuda) is None
        assert loss_mod._kernels_for("auto", cuda) is None
    lines = [r for r in caplog.records if "using the PyTorch reference" in r.getMessage()]
    assert len(lines) == 1 and "triton is not installed" in lines[0].getMessage()
    with pytest.raises(RuntimeError, match="unavailable"):
        loss_mod._kernels_for("triton", cuda)
    monkeypatch.setattr(loss_mod, "_triton_available_for", lambda device: (True, ""))
    assert loss_mod._kernels_for("auto", cuda) is K


def test_cfg_validation_names_the_argument():
    b = _small()
    ou = b["out"].detach()[:, :5]
    with pytest.raises(ValueError, match="out_uncond has shape"):
        residual_db_loss_cfg(ou, b.pop("out"), 2.0, b.pop("out_ref"), **b)
    b = _small()
    with pytest.raises(ValueError, match="guidance_scale"):
        residual_db_loss_cfg(b["out"], b.pop("out"), float("nan"), b.pop("out_ref"), **b)


def test_empty_sample_goes_to_reference():
    B = 2
    kw = dict(coef_out=torch.ones(B), inv_var=torch.ones(B), reward_grad_next=torch.zeros(B, 0))
    out = torch.zeros(B, 0, requires_grad=True)
    got = loss_mod.residual_db_loss(out, torch.zeros(B, 0), backend="triton", **kw)
    want = loss_mod.residual_db_loss_reference(validate_loss_inputs(out, torch.zeros(B, 0), **kw))
    assert torch.equal(got.isnan(), want.isnan())
    with pytest.raises(ValueError, match="at least one element"):
        K.residual_db_loss_triton(validate_loss_inputs(out, torch.zeros(B, 0), **kw))



def test_kernels_compile_for_sm90():
    """The GPU compiler (not the interpreter) accepts every kernel: front end down to an sm_90 cubin."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_sm90.py")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "No such file" in res.stderr:
        pytest.skip("this triton build has no ptxas")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled 16" in res.stdout


@pytest.mark.parametrize("config", ["flow_terminal", "reverse", "returns"])
@pytest.mark.parametrize("announced", ["same", "other"])
@pytest.mark.parametrize("cfg", [False, True])
def test_expected_grad_writes_final_gradients_in_the_forward(config, announced, cfg, monkeypatch):
    """With the upstream gradient announced (expected_grad), the forward writes the final gradients and, without
    CFG, the backward hands them back with no rescaling pass. Another upstream gradient than the announced one
    still gets the exact gradients (through the rescaling pass). Equal to the two-pass path, which the closed-form
    test checks, in float64."""
    t = make(B=3, S=(3, 5), seed=31, cfg=cfg)
    t["upstream"] = torch.full((3,), 0.25, dtype=torch.float64)
    announce = 0.25 if announced == "same" else torch.tensor([0.5, 0.125, 2.0])
    w = 2.0 if cfg else None
    calls = []
    real = K._scale_grads
    monkeypatch.setattr(K, "_scale_grads", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    one = evaluate("kernel", t, CONFIGS[config], torch.float64, w=w, stats=True, block=8, num_blocks=2,
                   expected_grad=announce)
    assert len(calls) == (0 if announced == "same" and not cfg else 1)
    two = evaluate("kernel", t, CONFIGS[config], torch.float64, w=w, stats=True, block=8, num_blocks=2)
    assert torch.equal(one["loss"], two["loss"])
    for name in STAT_NAMES:
        assert torch.equal(one["stats"][name], two["stats"][name]), name
    assert set(one["grads"]) == set(two["grads"])
    for name, g in two["grads"].items():
        if g is None:
            assert one["grads"][name] is None, name
        else:
            assert_close(one["grads"][name], g, 1e-13, name)
