"""The reference residual ∇-DB loss against hand computations and the score formulation of ALGORITHM §2."""

import pytest
import torch

from fastnabla import residual_db_loss
from fastnabla.loss import STAT_NAMES
from tests.helpers.loss_closed_form import closed_form


def make(B=4, S=(3, 5), dtype=torch.float64, seed=0, terminal="some"):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    d = dict(
        out=r(B, *S), out_ref=r(B, *S), reward_grad_next=r(B, *S), flow_next=r(B, *S), x=r(B, *S), x_next=r(B, *S),
        out_old=r(B, *S), score_rev=r(B, *S), score_rev_ref=r(B, *S), flow_cur=r(B, *S), reward_grad_cur=r(B, *S),
        coef_out=r(B).abs() + 0.5, coef_x=r(B).abs() + 0.5, inv_var=r(B).abs() + 1.0,
    )
    d["terminal"] = {"none": torch.zeros(B, dtype=torch.bool), "all": torch.ones(B, dtype=torch.bool),
                     "some": torch.arange(B) % 2 == 1}[terminal]
    return d


def score_formulation(d, strength, trust, rev, tscale):
    """ALGORITHM §2/§3 written with the scores: s_F = −(x' − μ)/σ², μ = coef_x·x + coef_out·out."""
    B = d["out"].shape[0]
    v = lambda t: t.reshape(B, -1).double()  # noqa: E731
    c = lambda t: t.double().view(B, 1)  # noqa: E731
    sigma2 = 1.0 / c(d["inv_var"])
    mu = c(d["coef_x"]) * v(d["x"]) + c(d["coef_out"]) * v(d["out"])
    mu_ref = c(d["coef_x"]) * v(d["x"]) + c(d["coef_out"]) * v(d["out_ref"])
    sF = -(v(d["x_next"]) - mu) / sigma2
    sF_ref = -(v(d["x_next"]) - mu_ref) / sigma2
    term = c(d["terminal"].double())
    g_next = v(d["flow_next"]) * (1 - term)
    LF = (sF - strength * sF_ref - v(d["reward_grad_next"]) - g_next).pow(2).mean(1)
    LT = term.view(B) * v(d["flow_next"]).pow(2).mean(1)
    LR = (1 - term.view(B)) * (v(d["score_rev"]) - strength * v(d["score_rev_ref"]) + v(d["flow_cur"])
                               + v(d["reward_grad_cur"])).pow(2).mean(1)
    Lreg = (v(d["out"]) - v(d["out_old"])).pow(2).mean(1)
    return LF + tscale * LT + rev * LR + trust * Lreg


def test_hand_computed_lambda_one():
    # B=1, S=(2,): d = coef_out·(out − out_ref)·inv_var = 2·(3−1)·0.5 = 2 on each element
    out = torch.tensor([[3.0, 1.0]])
    kw = dict(coef_out=torch.tensor([2.0]), inv_var=torch.tensor([0.5]), reward_grad_next=torch.tensor([[1.0, 0.0]]))
    # d = [2, 0]; residual = d − r' = [1, 0] → mean of squares 0.5
    loss = residual_db_loss(out, torch.tensor([[1.0, 1.0]]), **kw)
    assert loss.dtype == torch.float32 and loss.shape == (1,)
    assert loss.item() == pytest.approx(0.5)
    # with a flow value g' = [1, 1] at a non-terminal x': residual [0, −1] → 0.5
    loss = residual_db_loss(out, torch.tensor([[1.0, 1.0]]), flow_next=torch.ones(1, 2), **kw)
    assert loss.item() == pytest.approx(0.5)
    # the same x' terminal: g' is 0 in L_F (0.5) and L_T = mean(1²) = 1, scaled by terminal_scale 3
    loss = residual_db_loss(out, torch.tensor([[1.0, 1.0]]), flow_next=torch.ones(1, 2), terminal=torch.tensor([True]),
                            terminal_scale=3.0, **kw)
    assert loss.item() == pytest.approx(0.5 + 3.0)


def test_hand_computed_strength_and_terms():
    # λ = 0.5: d = [(0.5)·(coef_x·x − x') + coef_out·(out − 0.5·out_ref)]·inv_var
    out, out_ref = torch.tensor([[2.0]]), torch.tensor([[2.0]])
    x, xn = torch.tensor([[1.0]]), torch.tensor([[3.0]])
    # = [0.5·(2·1 − 3) + 1·(2 − 1)]·2 = [−0.5 + 1]·2 = 1 ; r' = 0 → L_F = 1
    kw = dict(coef_out=torch.tensor([1.0]), inv_var=torch.tensor([2.0]), reward_grad_next=torch.zeros(1, 1),
              strength=0.5, x=x, x_next=xn, coef_x=torch.tensor([2.0]))
    assert residual_db_loss(out, out_ref, **kw).item() == pytest.approx(1.0)
    # trust region: + 10·(2 − 1.5)² = 2.5
    assert residual_db_loss(out, out_ref, out_old=torch.tensor([[1.5]]), trust_region_scale=10.0, **kw).item() == \
        pytest.approx(3.5)
    # reverse: s_R − λ s_R_ref + g + r = 1 − 0.5·2 + 0.25 + 0.5 = 0.75 → 0.5625 · reverse_scale 2
    rev = dict(reverse_scale=2.0, score_rev=torch.tensor([[1.0]]), score_rev_ref=torch.tensor([[2.0]]),
               flow_cur=torch.tensor([[0.25]]), reward_grad_cur=torch.tensor([[0.5]]))
    assert residual_db_loss(out, out_ref, **rev, **kw).item() == pytest.approx(1.0 + 2 * 0.5625)
    # reverse term is off on a terminal transition
    assert residual_db_loss(out, out_ref, terminal=torch.tensor([1.0]), **rev, **kw).item() == pytest.approx(1.0)


@pytest.mark.parametrize("terminal", ["none", "some", "all"])
@pytest.mark.parametrize("strength", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("trust,rev,tscale", [(0.0, 0.0, 1.0), (3.0, 0.0, 1.0), (0.0, 0.5, 2.0), (1e3, 1.0, 0.3)])
def test_equals_score_formulation(terminal, strength, trust, rev, tscale):
    d = make(terminal=terminal)
    expect = score_formulation(d, strength, trust, rev, tscale)
    got = residual_db_loss(**d, strength=strength, trust_region_scale=trust, reverse_scale=rev, terminal_scale=tscale)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)


def test_lambda_one_ignores_x_terms():
    d = make()
    a = residual_db_loss(**d)
    d2 = dict(d, x=torch.full_like(d["x"], float("nan")), x_next=None, coef_x=None)
    torch.testing.assert_close(residual_db_loss(**d2), a)


def test_optional_terms_absent():
    d = make(terminal="none")
    base = dict(out=d["out"], out_ref=d["out_ref"], coef_out=d["coef_out"], inv_var=d["inv_var"],
                reward_grad_next=d["reward_grad_next"])
    expect = ((d["coef_out"].view(-1, 1, 1) * (d["out"] - d["out_ref"]) * d["inv_var"].view(-1, 1, 1)
               - d["reward_grad_next"]) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(residual_db_loss(**base), expect)
    # no flow, with terminal: no terminal term, no flow subtraction
    torch.testing.assert_close(residual_db_loss(**base, terminal=torch.ones(4, dtype=torch.bool)), expect)


def test_gradients_reach_only_out_and_flows():
    d = make(dtype=torch.float64)
    for k in d:
        if d[k].is_floating_point():
            d[k].requires_grad_(True)
    loss = residual_db_loss(**d, strength=0.6, trust_region_scale=2.0, reverse_scale=1.0).sum()
    loss.backward()
    for k, v in d.items():
        if not v.is_floating_point():
            continue
        if k in ("out", "flow_next", "flow_cur"):
            assert v.grad is not None and v.grad.abs().sum() > 0, k
        else:
            assert v.grad is None or v.grad.abs().sum() == 0, k


@pytest.mark.parametrize("strength,trust,rev,tscale", [(1.0, 0.0, 0.0, 1.0), (0.6, 2.0, 1.0, 1.5),
                                                     (0.0, 0.0, 0.7, 1.0)])
def test_gradients_equal_the_closed_form(strength, trust, rev, tscale):
    """Autograd through the reference gives the element-wise closed-form gradients (λ = 0 included: no s_R^ref)."""
    d = make(B=3, S=(2, 3), terminal="some")
    leaves = {k: d[k].clone().requires_grad_(True) for k in ("out", "flow_next", "flow_cur")}
    kw = dict(d, **leaves)
    if strength == 0.0:
        kw["score_rev_ref"] = None  # λ = 0 needs no pretrained reverse score
    loss = residual_db_loss(**kw, strength=strength, trust_region_scale=trust, reverse_scale=rev,
                            terminal_scale=tscale)
    want_loss, want = closed_form(kw, strength, trust, rev, tscale)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
    for (name, g) in zip(leaves, got):
        if want[name] is None:
            assert g is None or not g.abs().any(), name
        else:
            torch.testing.assert_close(g, want[name], rtol=1e-12, atol=1e-12)


# --- the returns recipe's terms (ALGORITHM §5b) -------------------------------------------------------------------


def test_returns_hand_computed():
    # B=1, S=(2,), λ = 1: d = coef_out·(out − out_ref)·inv_var = 2·[2, 0]·0.5 = [2, 0]
    out, out_ref = torch.tensor([[3.0, 1.0]], requires_grad=True), torch.tensor([[1.0, 1.0]])
    flow = torch.tensor([[1.0, 2.0]], requires_grad=True)
    kw = dict(coef_out=torch.tensor([2.0]), inv_var=torch.tensor([0.5]), reward_grad_next=torch.tensor([[0.5, 0.0]]),
              flow_next=flow, policy_weight=torch.tensor([4.0]), return_next=torch.tensor([[1.0, 1.0]]))
    # r_F = d − r' − g' = [0.5, −2] → w·mean r_F² = 4·(0.25 + 4)/2 = 8.5
    # r_A = g' + r' − G = [0.5, 1] → mean r_A² = (0.25 + 1)/2 = 0.625
    loss, st = residual_db_loss(out, out_ref, **kw, return_stats=True)
    assert loss.item() == pytest.approx(8.5 + 0.625)
    assert st["loss_forward"].item() == pytest.approx(8.5) and st["loss_returns"].item() == pytest.approx(0.625)
    g_out, g_flow = torch.autograd.grad(loss.sum(), [out, flow])
    # ∂/∂out = 2/N·w·coef_out·inv_var·r_F = 4·[0.5, −2]; ∂/∂g' = 2/N·r_A only (g' is data in L_F)
    torch.testing.assert_close(g_out, torch.tensor([[2.0, -8.0]]))
    torch.testing.assert_close(g_flow, torch.tensor([[0.5, 1.0]]))
    # terminal x': g' := 0 in L_F, no L_A and no L_T (whatever terminal_scale is): r_F = [1.5, 0] → 4·1.125
    loss = residual_db_loss(out, out_ref, **kw, terminal=torch.tensor([True]), terminal_scale=3.0)
    assert loss.item() == pytest.approx(4.5)
    assert not torch.autograd.grad(loss.sum(), flow, allow_unused=True)[0].abs().any()


@pytest.mark.parametrize("terminal", ["none", "some", "all"])
@pytest.mark.parametrize("weighted,trust", [(True, 0.0), (False, 2.0), (True, 1e3)])
def test_returns_terms_equal_the_closed_form(terminal, weighted, trust):
    """The reference with policy_weight and return_next: loss and autograd gradients against the closed forms."""
    d = make(B=4, S=(2, 3), terminal=terminal, seed=5)
    g = torch.Generator().manual_seed(6)
    d["return_next"] = torch.randn(d["out"].shape, generator=g, dtype=torch.float64)
    d["policy_weight"] = torch.rand(4, generator=g, dtype=torch.float64) * 3 if weighted else None
    for k in ("x", "x_next", "coef_x", "score_rev", "score_rev_ref", "flow_cur", "reward_grad_cur"):
        d.pop(k)
    leaves = {k: d[k].clone().requires_grad_(True) for k in ("out", "flow_next")}
    kw = dict(d, **leaves)
    loss, st = residual_db_loss(**kw, trust_region_scale=trust, terminal_scale=2.0, return_stats=True)
    want_loss, want = closed_form(kw, trust=trust, tscale=2.0)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss.sum(), list(leaves.values()))
    for name, gr in zip(leaves, got):
        torch.testing.assert_close(gr, want[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.float(), st["loss_forward"] + trust * st["loss_trust_region"] + st["loss_returns"])
    assert not st["loss_terminal"].any() and not st["loss_reverse"].any()


def test_policy_weight_without_flow_scales_the_forward_residual():
    """Without a flow (gfn.no_flow) the weight needs no return_next: w·L_F, and w = 1 changes nothing."""
    d = make(terminal="none")
    base = dict(out=d["out"], out_ref=d["out_ref"], coef_out=d["coef_out"], inv_var=d["inv_var"],
                reward_grad_next=d["reward_grad_next"])
    w = torch.tensor([0.0, 0.5, 1.0, 7.0], dtype=torch.float64)
    unweighted = residual_db_loss(**base)
    torch.testing.assert_close(residual_db_loss(**base, policy_weight=w), w * unweighted, rtol=1e-14, atol=0)
    assert torch.equal(residual_db_loss(**base, policy_weight=torch.ones(4, dtype=torch.float64)), unweighted)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_float64_within_rounding(dtype):
    d = make(B=6, S=(4, 16, 16), dtype=dtype, seed=2)
    kw = dict(strength=0.8, trust_region_scale=5.0, reverse_scale=1.0)
    got = residual_db_loss(**d, **kw)
    assert got.dtype == torch.float32
    # float64 reference on the *same* rounded inputs: only accumulation error remains (fp32 accumulation)
    ref = residual_db_loss(**{k: (v.double() if v.is_floating_point() else v) for k, v in d.items()}, **kw)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # against unrounded float64 inputs the difference is the input rounding: within a few bf16/fp16 ulps
    d64 = make(B=6, S=(4, 16, 16), dtype=torch.float64, seed=2)
    exact = residual_db_loss(**d64, **kw)
    eps = torch.finfo(dtype).eps
    assert float(((got.double() - exact).abs() / exact.abs()).max()) < 50 * eps
    # gradient comes back in the input dtype
    o = d["out"].clone().requires_grad_()
    residual_db_loss(**dict(d, out=o), **kw).sum().backward()
    assert o.grad.dtype == dtype


def test_stats():
    d = make(terminal="some")
    loss, st = residual_db_loss(**d, strength=0.7, trust_region_scale=2.0, reverse_scale=0.5, terminal_scale=1.5,
                                return_stats=True)
    assert set(st) == set(STAT_NAMES)
    torch.testing.assert_close(
        loss.float(), st["loss_forward"] + 1.5 * st["loss_terminal"] + 0.5 * st["loss_reverse"]
        + 2.0 * st["loss_trust_region"])
    B = d["out"].shape[0]
    torch.testing.assert_close(st["norm_out_delta"], (d["out"] - d["out_old"]).reshape(B, -1).norm(dim=1).float())
    torch.testing.assert_close(st["norm_flow_next"], d["flow_next"].reshape(B, -1).norm(dim=1).float())


def _base():
    d = make(B=2, S=(3,), dtype=torch.float32, terminal="none")
    return dict(out=d["out"], out_ref=d["out_ref"], coef_out=d["coef_out"], inv_var=d["inv_var"],
                reward_grad_next=d["reward_grad_next"]), d


@pytest.mark.parametrize("change,msg", [
    (lambda b, d: b.update(out_ref=b["out_ref"][:1]), "out_ref has shape"),
    (lambda b, d: b.update(coef_out=b["coef_out"].view(2, 1)), r"coef_out has shape \(2, 1\), expected \(2,\)"),
    (lambda b, d: b.update(coef_out=torch.tensor([1.0, float("nan")])), "coef_out contains NaN"),
    (lambda b, d: b.update(inv_var=torch.tensor([1.0, float("inf")])), "inv_var must be finite and > 0"),
    (lambda b, d: b.update(inv_var=torch.tensor([1.0, 0.0])), "eta > 0"),
    (lambda b, d: b.update(strength=0.5), "x is required when strength != 1"),
    (lambda b, d: b.update(strength=0.5, x=d["x"], x_next=d["x_next"]), "coef_x is required when strength != 1"),
    (lambda b, d: b.update(trust_region_scale=1.0), "out_old is required when trust_region_scale != 0"),
    (lambda b, d: b.update(reverse_scale=1.0), "score_rev is required when reverse_scale != 0"),
    (lambda b, d: b.update(reverse_scale=1.0, score_rev=d["score_rev"], score_rev_ref=d["score_rev_ref"]),
     "reward_grad_cur is required when reverse_scale != 0"),
    (lambda b, d: b.update(bogus=1.0), "bogus is not an argument of residual_db_loss"),
    (lambda b, d: b.update(reverse_scale=1.0, reward_grad_cur=d["reward_grad_cur"], score_rev=d["score_rev"]),
     "score_rev_ref is required"),
    (lambda b, d: b.update(flow_next=torch.zeros(2, 3, dtype=torch.long)), "flow_next must be a floating-point"),
    (lambda b, d: b.update(terminal=torch.tensor([0.0, 0.5])), "terminal must be a bool"),
    (lambda b, d: b.update(strength=float("nan")), "strength must be a finite number"),
    (lambda b, d: b.update(flow_next=torch.zeros(2, 3, device="meta")), "flow_next is on meta"),
    (lambda b, d: b.update(backend="cuda"), "backend must be"),
    (lambda b, d: b.update(return_next=d["x"]), "return_next needs flow_next"),
    (lambda b, d: b.update(return_next=d["x"], flow_next=d["flow_next"], strength=0.5, x=d["x"], x_next=d["x_next"],
                           coef_x=d["coef_x"]), "return_next needs strength == 1"),
    (lambda b, d: b.update(return_next=d["x"], flow_next=d["flow_next"], reverse_scale=1.0, score_rev=d["score_rev"],
                           score_rev_ref=d["score_rev_ref"], reward_grad_cur=d["reward_grad_cur"]),
     "reverse_scale must be 0 with return_next"),
    (lambda b, d: b.update(policy_weight=torch.ones(2), flow_next=d["flow_next"]),
     "policy_weight with flow_next needs return_next"),
    (lambda b, d: b.update(policy_weight=torch.tensor([1.0, -0.5])), "policy_weight must be finite and ≥ 0"),
    (lambda b, d: b.update(policy_weight=torch.ones(3)), r"policy_weight has shape \(3,\), expected \(2,\)"),
    (lambda b, d: b.update(return_next=d["x"][:1], flow_next=d["flow_next"]), "return_next has shape"),
])
def test_errors(change, msg):
    b, d = _base()
    change(b, d)
    with pytest.raises(ValueError, match=msg):
        residual_db_loss(**b)


def test_triton_backend_without_interpreter_is_a_clear_error(monkeypatch):
    b, _ = _base()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        residual_db_loss(**b, backend="triton")


def test_cpu_auto_dispatches_to_the_reference_and_matches_the_closed_form(monkeypatch):
    """On CPU, backend="auto" never launches the kernel (even with the interpreter on) and gives the closed form."""
    import fastnabla.loss as loss_mod

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert loss_mod._kernels_for("auto", torch.device("cpu")) is None
    d = make(terminal="some")
    for backend in ("auto", "reference"):
        got = residual_db_loss(**d, strength=0.7, trust_region_scale=1.5, reverse_scale=0.5, backend=backend)
        torch.testing.assert_close(got, closed_form(d, 0.7, 1.5, 0.5)[0], rtol=1e-12, atol=1e-12)


def test_check_values_false_skips_only_value_checks():
    b, _ = _base()
    bad = dict(b, inv_var=torch.tensor([1.0, 0.0]))
    residual_db_loss(**bad, check_values=False)  # no host sync, no value check
    with pytest.raises(ValueError, match="coef_out has shape"):
        residual_db_loss(**dict(b, coef_out=b["coef_out"][:1]), check_values=False)
