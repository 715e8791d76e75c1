"""∇-GFlowNet's (methods/nabla_gfn.py) terms against an independent per-sample Jacobian computation (toy2d, float64)."""
import pytest
import torch

from fastnabla.backbones.toy2d import Toy2DBackbone
from fastnabla.config import load_config
from fastnabla.methods import TransitionBatch
from fastnabla.methods.nabla_gfn import NablaGFN
from fastnabla.rewards import build_reward
from fastnabla.sampling import sample_trajectories, step_coefficients


def _setup(**over):
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    torch.manual_seed(0)
    bb = Toy2DBackbone.from_config(cfg).double()
    with torch.no_grad():  # move the zero-initialised heads so policy ≠ reference and g ≠ 0
        for p in list(bb.residual.head.parameters()) + list(bb.flow_net.head.parameters()):
            p.normal_(0, 0.3)
    reward = build_reward("gaussian_bump", {"center": [1.0, 0.5], "width": 0.8})
    c = step_coefficients(bb).to(torch.float64)
    return cfg, bb, reward, c


def _manual(cfg, bb, reward, c, b):
    """Every term of ALGORITHM §3/§4 from per-sample Jacobians; returns loss_b."""
    g, N = cfg.gfn, c.coef_x.numel()
    ts = bb.scheduler.timesteps
    beta, lam = g.reward_scale, g.pretrained_strength

    def gamma(j):
        if j >= N:
            return 1.0
        a = float(c.alpha_prod[j])
        return {"squared": a, "sqrt": a**0.5, "none": 1.0}[g.reward_adaptive_mode]

    def logr_x0(x, j):  # log R(x̂0(x)) for state index j
        if j >= N:
            return reward(x[None], None, None)[0][0]
        out = bb.policy(x[None], ts[j : j + 1])[0]
        if not g.reward_grad_through_model:
            out = out.detach()
        return reward((c.x0_coef_x[j] * x + c.x0_coef_out[j] * out)[None], None, None)[0][0]

    def r(x, j):
        if not g.reward_grad_through_model and j < N:
            xx = x.clone().requires_grad_(True)
            out = bb.policy(xx[None], ts[j : j + 1])[0].detach()
            x0 = c.x0_coef_x[j] * xx + c.x0_coef_out[j] * out
            (gr,) = torch.autograd.grad(reward(x0[None], None, None)[0][0], xx)
        else:
            gr = torch.autograd.functional.jacobian(lambda z: logr_x0(z, j), x)
        return beta * gamma(j) * gr

    losses = []
    for i in range(b.x.shape[0]):
        k, x, xn = int(b.k[i]), b.x[i], b.x_next[i]
        term = k == N - 1
        t = ts[k : k + 1]
        sig2 = 1 / float(c.inv_var[k])

        def mu(z, net):
            return c.coef_x[k] * z + c.coef_out[k] * net(z[None], t)[0]

        sF = -(xn - mu(x, bb.policy)) / sig2
        sF_ref = -(xn - mu(x, bb.reference)) / sig2
        J = torch.autograd.functional.jacobian(lambda z: mu(z, bb.policy), x)
        J_ref = torch.autograd.functional.jacobian(lambda z: mu(z, bb.reference), x)
        sR = J.T @ ((xn - mu(x, bb.policy)) / sig2)
        sR_ref = J_ref.T @ ((xn - mu(x, bb.reference)) / sig2)
        tn = torch.tensor([0 if term else int(ts[k + 1])])
        g_next = bb.flow(xn[None], tn)[0]
        g_cur = bb.flow(x[None], t)[0]
        LF = ((sF - lam * sF_ref - r(xn, k + 1) - (0 if term else g_next)) ** 2).mean()
        LT = (g_next**2).mean() if term else 0.0
        LR = 0.0 if term else ((sR - lam * sR_ref + g_cur + r(x, k)) ** 2).mean()
        out_old = b.out_old[i]
        Lreg = ((bb.policy(x[None], t)[0] - out_old) ** 2).mean()
        losses.append(LF + g.terminal_scale * LT + g.reverse_scale * LR + g.trust_region_scale * Lreg)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in losses])


@pytest.mark.parametrize("over", [
    {},
    {"gfn.reward_adaptive_mode": "sqrt", "gfn.reward_scale": 2.0, "gfn.trust_region_scale": 3.0},
    {"gfn.reward_adaptive_mode": "none", "gfn.reward_grad_through_model": "false", "gfn.pretrained_strength": 0.7},
    {"gfn.reverse_scale": 0.0, "gfn.terminal_scale": 2.0},
    {"gfn.pretrained_strength": 0.0},  # λ = 0: no pretrained reverse score, d without out_ref
])
def test_paper_objective_matches_per_sample_jacobians(over):
    """gfn.recipe=paper is main's objective before the returns recipe: every term of ALGORITHM §4."""
    cfg, bb, reward, c = _setup(**{"gfn.recipe": "paper", **over})
    assert cfg.gfn.reverse_scale == over.get("gfn.reverse_scale", 1.0) and cfg.gfn.policy_weighting == "none"
    assert cfg.gfn.reward_grad_through_model == (over.get("gfn.reward_grad_through_model") != "false")
    g = torch.Generator().manual_seed(3)
    tr = sample_trajectories(bb, 6, g, c)
    k = torch.tensor([0, 7, 25, 48, 49, 49])
    i = torch.arange(6)
    b = TransitionBatch(x=tr.xs[i, k], x_next=tr.xs[i, k + 1], k=k, out_old=tr.outs[i, k] + 0.1, cond=None,
                        prompts=None)
    loss_b, stats = NablaGFN(bb, reward, c, cfg)(b)
    expect = _manual(cfg, bb, reward, c, b)
    torch.testing.assert_close(loss_b, expect, rtol=1e-7, atol=1e-9)


def test_no_flow_drops_flow_and_reverse():
    cfg, bb, reward, c = _setup(**{"gfn.no_flow": "true", "gfn.recipe": "paper"})
    tr = sample_trajectories(bb, 3, torch.Generator().manual_seed(0), c)
    k = torch.tensor([3, 20, 49])
    i = torch.arange(3)
    b = TransitionBatch(tr.xs[i, k], tr.xs[i, k + 1], k, tr.outs[i, k], None, None)
    loss_b, stats = NablaGFN(bb, reward, c, cfg)(b)
    assert float(stats["loss_reverse"].abs().sum()) == 0 and float(stats["norm_flow_next"].sum()) == 0
    loss_b.sum().backward()
    assert all(p.grad is None for p in bb.flow_net.parameters())
    # with the flow head zeroed (g ≡ 0) and no reverse term, the full objective is no_flow's, term by term
    with torch.no_grad():
        for p in bb.flow_net.head.parameters():
            p.zero_()
    cfg_full, *_ = _setup(**{"gfn.recipe": "paper", "gfn.reverse_scale": 0.0})
    full_b, full_stats = NablaGFN(bb, reward, c, cfg_full)(b)
    torch.testing.assert_close(full_b, loss_b.detach(), rtol=1e-12, atol=0)
    assert float(full_stats["norm_flow_next"].abs().sum()) == 0


def test_objective_through_the_triton_kernel_equals_reference():
    """The trainer's objective with backend='triton' (interpreter on CPU) gives the reference's loss and grads."""
    cfg, bb, reward, c = _setup(**{"gfn.trust_region_scale": 2.0, "gfn.recipe": "paper"})
    bb = bb.float()
    c = c.to(torch.float32)
    tr = sample_trajectories(bb, 4, torch.Generator().manual_seed(2), c)
    k = torch.tensor([5, 30, 48, 49])
    i = torch.arange(4)
    b = TransitionBatch(tr.xs[i, k], tr.xs[i, k + 1], k, tr.outs[i, k], None, None)
    grads = {}
    for backend in ("reference", "triton"):
        bb.zero_grad()
        cfg.train.backend = backend
        loss_b, _ = NablaGFN(bb, reward, c, cfg)(b)
        loss_b.sum().backward()
        grads[backend] = (loss_b.detach(), [p.grad.clone() for p in bb.policy_parameters() + bb.flow_parameters()])
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], rtol=1e-5, atol=1e-6)
    for a, r in zip(grads["triton"][1], grads["reference"][1]):
        # fp32 sums in a different order: tolerance relative to the gradient's scale
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


# --- the gradient-returns recipe (ALGORITHM §5b) ---------------------------------------------------------------

def _jacobian_chain_returns(cfg, bb, reward, c, xs):
    """G_k = J_ref(x_k)ᵀ ⋯ J_ref(x_{N−1})ᵀ · β∇log R(x_N), with each J_ref a full per-sample Jacobian of μ_ref."""
    N, ts = c.coef_x.numel(), bb.scheduler.timesteps
    out = torch.zeros_like(xs)
    for i in range(xs.shape[0]):
        xN = xs[i, N].clone().requires_grad_(True)
        (gN,) = torch.autograd.grad(reward(xN[None], None, None)[0][0], xN)
        G = cfg.gfn.reward_scale * gN
        out[i, N] = G
        for k in range(N - 1, -1, -1):
            J = torch.autograd.functional.jacobian(
                lambda z: c.coef_x[k] * z + c.coef_out[k] * bb.reference(z[None], ts[k : k + 1])[0], xs[i, k])
            G = J.T @ G
            out[i, k] = G
    return out


@pytest.mark.parametrize("micro_batch", [0, 2])
def test_gradient_returns_match_a_hand_unrolled_jacobian_chain(micro_batch):
    cfg, bb, reward, c = _setup(**{"gfn.reward_scale": 1.7, "gfn.reward_adaptive_mode": "off"})
    tr = sample_trajectories(bb, 3, torch.Generator().manual_seed(5), c)
    cfg.reward.micro_batch = micro_batch
    G = NablaGFN(bb, reward, c, cfg).gradient_returns(tr.xs, None, None)
    torch.testing.assert_close(G, _jacobian_chain_returns(cfg, bb, reward, c, tr.xs), rtol=1e-9, atol=1e-12)


def test_a_branch_from_a_state_replays_the_tail_and_its_returns():
    """sample_trajectories(start=(x_k0, k0)) with the noise the full run drew after step k0 gives that run's tail, and
    _returns(first=k0) on it (earlier states never read) gives the full trajectories' G_k for k ≥ k0."""
    cfg, bb, reward, c = _setup(**{"gfn.reward_adaptive_mode": "off"})
    full = sample_trajectories(bb, 3, torch.Generator().manual_seed(7), c)
    k0, N = 3, c.coef_x.numel()
    g = torch.Generator().manual_seed(7)
    bb.sample_noise(3, g)
    for _ in range(k0):  # the noise of steps 0 … k0−1
        torch.randn(full.xs[:, 0].shape, generator=g)
    tail = sample_trajectories(bb, 3, g, c, start=(full.xs[:, k0], k0))
    torch.testing.assert_close(tail.xs, full.xs[:, k0:], rtol=0, atol=0)
    torch.testing.assert_close(tail.outs, full.outs[:, k0:], rtol=0, atol=0)
    m = NablaGFN(bb, reward, c, cfg)
    padded = torch.cat([torch.full_like(full.xs[:, :k0], float("nan")), tail.xs], 1)
    G = m._returns(padded, None, None, first=k0)[0]
    torch.testing.assert_close(G[:, k0:], m.gradient_returns(full.xs, None, None)[:, k0:], rtol=1e-12, atol=0)
    assert not G[:, :k0].any()
    with pytest.raises(ValueError, match="start step"):
        sample_trajectories(bb, 3, g, c, start=(full.xs[:, 0], N))


@pytest.mark.parametrize("over", [
    {},
    {"gfn.reward_adaptive_mode": "off", "gfn.trust_region_scale": 3.0},
    {"gfn.policy_weighting": "none", "gfn.reward_grad_through_model": "true", "gfn.reward_scale": 2.0},
    {"gfn.no_flow": "true"},
    {"gfn.policy_target": "return", "gfn.trust_region_scale": 2.0},
    {"gfn.policy_target": "return", "gfn.policy_weighting": "none"},
    {"gfn.policy_target": "return", "gfn.policy_weighting": "output"},
    {"gfn.policy_weighting": "output"},
    {"gfn.policy_target": "return", "gfn.reward_guidance": 0.7, "gfn.trust_region_scale": 2.0,
     "gfn.reward_scale": 1.5},
    {"gfn.policy_target": "return", "gfn.reward_guidance": 2.0, "gfn.reward_adaptive_mode": "sqrt"},
    {"gfn.reward_guidance": 1.0, "gfn.policy_weighting": "output"},
])
def test_returns_objective_matches_an_independent_computation(over):
    """loss_b = w_k·mean(d − sg(r' + g'))² + trust·mean(out − out_old)² + (1 − terminal)·mean(g' + r' − G_{k+1})²,
    with the policy's gradient from the first two terms only and the flow's from the last only. With
    ``gfn.policy_target: return``: w_k·mean(d − G_{k+1})² + trust·mean(out − out_old)², and no flow gradient. With
    ``gfn.reward_guidance`` s the policy's mean gains s·σ²·β·∇_x log R(x̂0_ref(x)), so d gains s·β·∇_x log R(x̂0_ref)
    and the stored sampling-time output out_old carries the same shift."""
    cfg, bb, reward, c = _setup(**over)
    g, N, ts = cfg.gfn, c.coef_x.numel(), bb.scheduler.timesteps
    tr = sample_trajectories(bb, 6, torch.Generator().manual_seed(3), c)
    k = torch.tensor([0, 7, 25, 48, 49, 49])
    i = torch.arange(6)
    returns = torch.randn(6, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    b = TransitionBatch(x=tr.xs[i, k], x_next=tr.xs[i, k + 1], k=k, out_old=tr.outs[i, k] + 0.1, cond=None,
                        prompts=None, returns=returns)
    loss_b, stats = NablaGFN(bb, reward, c, cfg)(b)
    pol, flow = list(bb.policy_parameters()), list(bb.flow_parameters())
    got = torch.autograd.grad(loss_b.sum(), pol + flow, allow_unused=True)

    gamma = {"squared": lambda a: a, "sqrt": lambda a: a**0.5, "none": lambda a: 1.0, "off": lambda a: 0.0}
    expect_pol, expect_flow = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for n in range(6):
        kk, x, xn = int(k[n]), b.x[n], b.x_next[n]
        term = kk == N - 1
        sig2 = 1 / float(c.inv_var[kk])
        out = bb.policy(x[None], ts[kk : kk + 1])[0]
        out_ref = bb.reference(x[None], ts[kk : kk + 1])[0].detach()
        d = c.coef_out[kk] * (out - out_ref) / sig2  # λ = 1: the x and x' terms cancel
        shift = torch.zeros(2, dtype=torch.float64)
        if g.reward_guidance:  # per sample: x̂0 of the reference at x, the reward's gradient carried back to x
            xx = x.clone().requires_grad_(True)
            x0 = c.x0_coef_x[kk] * xx + c.x0_coef_out[kk] * bb.reference(xx[None], ts[kk : kk + 1])[0]
            (gx,) = torch.autograd.grad(reward(x0[None], None, None)[0][0], xx)
            gx = gamma[g.reward_adaptive_mode](float(c.alpha_prod[kk])) * gx
            d = d + g.reward_guidance * g.reward_scale * gx
            shift = g.reward_guidance * g.reward_scale * sig2 * gx / c.coef_out[kk]
        xr = xn.clone().requires_grad_(True)
        if term:
            (r,) = torch.autograd.grad(reward(xr[None], None, None)[0][0], xr)
            r, g_next = g.reward_scale * r, torch.zeros(2, dtype=torch.float64)
        else:
            o = bb.policy(xr[None], ts[kk + 1 : kk + 2])[0]
            o = o if g.reward_grad_through_model else o.detach()
            (r,) = torch.autograd.grad(reward((c.x0_coef_x[kk + 1] * xr + c.x0_coef_out[kk + 1] * o)[None], None,
                                              None)[0][0], xr)
            r = g.reward_scale * gamma[g.reward_adaptive_mode](float(c.alpha_prod[kk + 1])) * r
            g_next = torch.zeros(2, dtype=torch.float64) if g.no_flow else bb.flow(xn[None], ts[kk + 1 : kk + 2])[0]
        w = {"sigma2": sig2, "output": sig2**2 / float(c.coef_out[kk]) ** 2, "none": 1.0}[g.policy_weighting]
        target = returns[n] if g.policy_target == "return" else (r + g_next).detach()
        expect_pol = expect_pol + w * ((d - target) ** 2).mean() \
            + g.trust_region_scale * ((out - (b.out_old[n] - shift)) ** 2).mean()
        if not term and not g.no_flow and g.policy_target == "flow":
            expect_flow = expect_flow + ((g_next + r.detach() - returns[n]) ** 2).mean()
    torch.testing.assert_close(loss_b.sum(), (expect_pol + expect_flow).detach(), rtol=1e-9, atol=1e-12)
    want = torch.autograd.grad(expect_pol, pol, allow_unused=True)
    for a, e in zip(got[: len(pol)], want):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-12)
    if g.no_flow or g.policy_target == "return":
        assert all(a is None for a in got[len(pol):])
    else:
        for a, e in zip(got[len(pol):], torch.autograd.grad(expect_flow, flow)):
            torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("over", [
    {"train.backend": "triton"},
    {"train.backend": "triton", "gfn.policy_weighting": "none", "gfn.trust_region_scale": 3.0},
    {"train.backend": "triton", "gfn.policy_target": "return"},
    {"train.backend": "triton", "gfn.policy_target": "return", "gfn.reward_guidance": 0.7},
])
def test_returns_objective_through_the_fused_kernel(over):
    """The same independent computation, with the returns terms (policy_weight, return_next) on the fused Triton
    kernel (interpreted on CPU, float64) instead of the PyTorch reference."""
    test_returns_objective_matches_an_independent_computation(over)


@pytest.mark.parametrize("through_model", ["true", "false"])
def test_chunked_reward_gradient_equals_the_whole_batch(through_model):
    """reward.micro_batch splits the forward-looking reward gradient into chunks (one leaf and forward each): the
    same r and log R as one pass over the batch, which the tests above check against per-sample Jacobians."""
    cfg, bb, reward, c = _setup(**{"gfn.reward_grad_through_model": through_model})
    tr = sample_trajectories(bb, 5, torch.Generator().manual_seed(4), c)
    j = torch.tensor([3, 50, 17, 49, 50])  # index 50 = N: the clean sample (no network call)
    x = tr.xs[torch.arange(5), j]
    whole = NablaGFN(bb, reward, c, cfg).reward_grad(x, j, None, None)
    cfg.reward.micro_batch = 2
    chunked = NablaGFN(bb, reward, c, cfg).reward_grad(x, j, None, None)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _hand_bootstrapped(cfg, bb, reward, c, xs, k, kappa, n):
    """G_{k+1} of one trajectory xs (N+1, 2) by per-sample Jacobians, the flow and hand reward gradients."""
    N, ts, g = c.coef_x.numel(), bb.scheduler.timesteps, cfg.gfn

    def grad_logr(x):
        xx = x.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(reward(xx[None], None, None)[0][0], xx)
        return gr

    def g_plus_r(j):
        x = xs[j]
        if j == N:
            return g.reward_scale * grad_logr(x)
        xx = x.clone().requires_grad_(True)
        out = bb.policy(xx[None], ts[j : j + 1])[0].detach()  # FL with the network held constant
        (gr,) = torch.autograd.grad(reward((c.x0_coef_x[j] * xx + c.x0_coef_out[j] * out)[None], None, None)[0][0], xx)
        gamma = {"squared": float(c.alpha_prod[j]), "off": 0.0}[g.reward_adaptive_mode]
        return bb.flow(x[None], ts[j : j + 1])[0].detach() + g.reward_scale * gamma * gr

    s = k + 1
    e = N if n == 0 else min(s + n, N)
    G = g_plus_r(e)
    gr_next = G
    for j in range(e - 1, s - 1, -1):
        J = torch.autograd.functional.jacobian(
            lambda z: c.coef_x[j] * z + c.coef_out[j] * bb.reference(z[None], ts[j : j + 1])[0], xs[j])
        G, gr_next = J.T @ ((1 - kappa) * gr_next + kappa * G), (g_plus_r(j) if j > s else None)
    return G


@pytest.mark.parametrize("kappa,steps,mode", [(0.5, 3, "squared"), (1.0, 4, "squared"), (0.3, 0, "off"),
                                              (1.0, 0, "squared")])
def test_bootstrapped_returns_match_a_hand_recursion(kappa, steps, mode):
    """κ-returns with truncation: G_e = (g + r)(x_e), G_j = J_refᵀ[(1−κ)(g + r)(x_{j+1}) + κ·G_{j+1}], at training time
    with the current flow; κ = 1 without truncation is the stored Monte-Carlo return."""
    cfg, bb, reward, c = _setup(**{"gfn.return_kappa": kappa, "gfn.return_steps": steps,
                                   "gfn.reward_adaptive_mode": mode})
    obj = NablaGFN(bb, reward, c, cfg)
    assert obj.bootstraps == (kappa < 1 or steps > 0)
    tr = sample_trajectories(bb, 4, torch.Generator().manual_seed(6), c)
    i = torch.tensor([0, 1, 2, 3, 0])
    k = torch.tensor([0, 44, 47, 49, 21])
    b = obj.gather(tr, torch.stack([i, k], 1), "cpu") if obj.bootstraps else \
        TransitionBatch.gather(tr, torch.stack([i, k], 1), "cpu", with_states=True)
    got = obj.bootstrapped_returns(b)
    for r in range(5):
        want = _hand_bootstrapped(cfg, bb, reward, c, tr.xs[int(i[r])], int(k[r]), kappa, steps)
        torch.testing.assert_close(got[r], want, rtol=1e-9, atol=1e-12)
    if not obj.bootstraps:  # the stored Monte-Carlo returns are the same numbers
        G = obj.gradient_returns(tr.xs, None, None)
        torch.testing.assert_close(got, G[i, k + 1], rtol=1e-9, atol=1e-12)


def test_bootstrapped_returns_feed_the_loss_and_are_not_stored():
    cfg, bb, reward, c = _setup(**{"gfn.return_kappa": 0.7, "gfn.return_steps": 2})
    obj = NablaGFN(bb, reward, c, cfg)
    tr = obj.prepare(sample_trajectories(bb, 3, torch.Generator().manual_seed(1), c))
    assert tr.returns is None
    idx = torch.tensor([[0, 5], [1, 30], [2, 49]])
    b = obj.gather(tr, idx, "cpu")
    assert b.states.shape == (3, 51, 2) and b.returns is None
    loss_b, stats = obj(b)
    import dataclasses

    want, _ = obj._returns_objective(dataclasses.replace(b, returns=obj.bootstrapped_returns(b)), True)
    torch.testing.assert_close(loss_b, want, rtol=0, atol=0)
    assert float(stats["loss_returns"][:2].sum()) > 0 and float(stats["loss_returns"][2]) == 0  # terminal: no L_A


def test_reverse_path_honours_reward_micro_batch():
    """The paper's reward gradient at x reuses the policy forward; reward.micro_batch still chunks its decode and
    reward (one VJP back through x̂0): the same loss as one pass, which the per-sample Jacobian test checks."""
    cfg, bb, reward, c = _setup(**{"gfn.recipe": "paper"})
    tr = sample_trajectories(bb, 6, torch.Generator().manual_seed(3), c)
    idx = torch.stack([torch.arange(6), torch.tensor([0, 7, 25, 48, 49, 49])], 1)
    b = TransitionBatch.gather(tr, idx, "cpu")
    seen = []

    def spy(images, prompts, meta):
        seen.append(images.shape[0])
        return reward(images, prompts, meta)

    whole, _ = NablaGFN(bb, spy, c, cfg)(b)
    # r' at all 6 next states; r at x only on the 4 non-terminal transitions (L_R is 0 on the terminal ones)
    assert seen == [6, 4]
    seen.clear()
    cfg.reward.micro_batch = 2
    chunked, _ = NablaGFN(bb, spy, c, cfg)(b)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-12)
    assert max(seen) <= 2 and sum(seen) == 10
    seen.clear()  # a micro-batch of terminal transitions only: nothing is scored at x
    loss_t, stats_t = NablaGFN(bb, spy, c, cfg)(TransitionBatch.gather(tr, idx[4:], "cpu"))
    assert seen == [2] and torch.isfinite(loss_t).all() and bool((stats_t["loss_reverse"] == 0).all())


@pytest.mark.parametrize("recipe", ["paper", "returns"])
def test_trainer_announced_item_gradient_through_the_kernel(recipe):
    """The trainer announces 1/items as each item's upstream gradient (Method.item_grad); through the fused kernel
    the gradients equal the reference's for loss_b.sum()/items."""
    cfg, bb, reward, c = _setup(**{"gfn.recipe": recipe, "gfn.trust_region_scale": 2.0})
    bb, c = bb.float(), c.to(torch.float32)
    tr = NablaGFN(bb, reward, c, cfg).prepare(sample_trajectories(bb, 4, torch.Generator().manual_seed(2), c))
    idx = torch.stack([torch.arange(4), torch.tensor([5, 30, 48, 49])], 1)
    grads = {}
    for backend in ("reference", "triton"):
        cfg.train.backend = backend
        obj = NablaGFN(bb, reward, c, cfg)
        obj.item_grad = 1.0 / 4
        bb.zero_grad()
        loss_b, _ = obj(TransitionBatch.gather(tr, idx, "cpu"))
        (loss_b.sum() / 4).backward()
        grads[backend] = [p.grad.clone() for p in bb.policy_parameters() + bb.flow_parameters()]
    for a, r in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


def test_guided_sampling_adds_the_guidance_to_every_step_and_stores_it():
    """``gfn.reward_guidance``: the sampler's step k uses policy(x) + guidance(x, k), the stored outputs include the
    shift, and inside ``reference_sampling()`` the sampler draws from the unguided reference."""
    cfg, bb, reward, c = _setup(**{"gfn.reward_guidance": 0.8, "gfn.reward_scale": 1.3})
    m = NablaGFN(bb, reward, c, cfg)
    assert m.guide is not None and NablaGFN(bb, reward, c, _setup()[0]).guide is None
    tr = sample_trajectories(bb, 5, torch.Generator().manual_seed(4), c, guide=m.guide)
    g = torch.Generator().manual_seed(4)
    x = bb.sample_noise(5, g).double()
    ts = bb.scheduler.timesteps
    for k in range(c.coef_x.numel()):
        out = bb.policy(x, ts[k].expand(5)).detach()
        xx = x.clone().requires_grad_(True)  # the guidance by hand: the reward gradient through the reference's x̂0
        x0 = c.x0_coef_x[k] * xx + c.x0_coef_out[k] * bb.reference(xx, ts[k].expand(5))
        (gx,) = torch.autograd.grad(reward(x0, None, None)[0].sum(), xx)
        out = out + 0.8 * 1.3 * c.alpha_prod[k] * gx / c.inv_var[k] / c.coef_out[k]  # γ = ᾱ ("squared")
        torch.testing.assert_close(tr.outs[:, k], out, rtol=1e-9, atol=1e-12)
        x = c[k].step(x, out, torch.randn(x.shape, generator=g).double())
        torch.testing.assert_close(tr.xs[:, k + 1], x, rtol=1e-9, atol=1e-12)
    with bb.reference_sampling():
        plain = sample_trajectories(bb, 5, torch.Generator().manual_seed(4), c, guide=m.guide)
    with bb.reference_sampling():
        ref = sample_trajectories(bb, 5, torch.Generator().manual_seed(4), c)
    torch.testing.assert_close(plain.xs, ref.xs, rtol=0, atol=0)


def test_policy_max_timestep_samples_the_reference_above_it_and_trains_only_below():
    """``gfn.policy_max_timestep``: steps whose timestep is above it take the reference's output (no guidance), the
    rest the guided policy's; the trained transitions are drawn among the policy's steps only, and the stored returns
    are those of the full recursion at every state the policy regresses from."""
    over = {"gfn.reward_guidance": 0.5, "gfn.policy_target": "return", "sampling.num_steps": 8,
            "gfn.timestep_fraction": 0.5}
    cfg, bb, reward, c = _setup(**over)
    ts = bb.scheduler.timesteps
    cut = int(ts[2])  # steps 0 and 1 are the reference's
    cfg_cut, _, _, _ = _setup(**over, **{"gfn.policy_max_timestep": cut + 1})  # between two timesteps: the same cut
    m, m_all = NablaGFN(bb, reward, c, cfg_cut), NablaGFN(bb, reward, c, cfg)
    assert (m.policy_from, m_all.policy_from) == (2, 0)
    tr = sample_trajectories(bb, 5, torch.Generator().manual_seed(2), c, guide=m.guide, policy_from=m.policy_from)
    g = torch.Generator().manual_seed(2)
    x = bb.sample_noise(5, g).double()
    for k in range(8):
        t = ts[k].expand(5)
        out = bb.reference(x, t).detach() if k < 2 else bb.policy(x, t).detach() + m.guide(x, k, None, None)
        torch.testing.assert_close(tr.outs[:, k], out, rtol=1e-9, atol=1e-12)
        x = c[k].step(x, out, torch.randn(x.shape, generator=g).double())
    assert not torch.allclose(tr.outs[:, 0], bb.policy(tr.xs[:, 0], ts[0].expand(5)))  # policy ≠ reference there
    # 6 policy steps, fraction 0.5: K = 3 chunks of 2 after the reference's 2 (the last without the terminal step),
    # plus the terminal step
    sel = m.select(400, torch.Generator().manual_seed(0))
    assert sel.shape == (400, 4) and bool((sel[:, -1] == 7).all())
    assert [set(sel[:, j].tolist()) for j in range(3)] == [{2, 3}, {4, 5}, {6}]
    G, G_all = (mm.gradient_returns(tr.xs, None, None) for mm in (m, m_all))
    torch.testing.assert_close(G[:, 2:], G_all[:, 2:], rtol=0, atol=0)  # what the policy regresses on: G_{k+1}, k ≥ 2
    assert float(G[:, :2].abs().max()) == 0.0 and float(G_all[:, 1].abs().max()) > 0


def test_policy_min_timestep_leaves_the_last_steps_to_the_reference():
    """``gfn.policy_min_timestep`` with ``gfn.policy_max_timestep``: the policy (guided) acts at steps 2–5 of 8 only;
    steps 6 and 7 take the reference's output, the trained transitions are drawn among 2–5 with step 5 in the terminal
    step's place, the returns are the full chain's (through the reference's late steps), and the late steps' KL is 0."""
    over = {"gfn.reward_guidance": 0.5, "gfn.policy_target": "return", "sampling.num_steps": 8,
            "gfn.timestep_fraction": 0.5}
    cfg, bb, reward, c = _setup(**over)
    ts = bb.scheduler.timesteps
    cfg_cut, _, _, _ = _setup(**over, **{"gfn.policy_max_timestep": int(ts[2]), "gfn.policy_min_timestep": int(ts[5])})
    m, m_all = NablaGFN(bb, reward, c, cfg_cut), NablaGFN(bb, reward, c, cfg)
    assert (m.policy_from, m.policy_to, m_all.policy_to) == (2, 6, None)
    tr = m.prepare(sample_trajectories(bb, 5, torch.Generator().manual_seed(2), c, guide=m.guide,
                                       policy_from=m.policy_from, policy_to=m.policy_to))
    g = torch.Generator().manual_seed(2)
    x = bb.sample_noise(5, g).double()
    for k in range(8):
        t = ts[k].expand(5)
        out = bb.policy(x, t).detach() + m.guide(x, k, None, None) if 2 <= k < 6 else bb.reference(x, t).detach()
        torch.testing.assert_close(tr.outs[:, k], out, rtol=1e-9, atol=1e-12)
        x = c[k].step(x, out, torch.randn(x.shape, generator=g).double())
    sel = m.select(400, torch.Generator().manual_seed(0))  # 4 policy steps, fraction 0.5: chunks {2, 3}, {4}, then 5
    assert sel.shape == (400, 3) and bool((sel[:, -1] == 5).all())
    assert [set(sel[:, j].tolist()) for j in range(2)] == [{2, 3}, {4}]
    torch.testing.assert_close(tr.returns[:, 2:], m_all.gradient_returns(tr.xs, None, None)[:, 2:], rtol=0, atol=0)
    kl = tr.extras["path_kl"]
    assert float(kl[:, :2].abs().max()) == 0 == float(kl[:, 6:].abs().max()) and bool((kl[:, 2:6] > 0).all())
    with pytest.raises(ValueError, match="gfn.policy_min_timestep"):
        load_config(None, ["gfn.policy_min_timestep=-1"])
    with pytest.raises(ValueError, match="gfn.policy_min_timestep"):
        load_config(None, ["gfn.recipe=paper", "gfn.policy_min_timestep=10"])
    cfg_none, _, _, _ = _setup(**over, **{"gfn.policy_max_timestep": int(ts[5]), "gfn.policy_min_timestep": int(ts[2])})
    with pytest.raises(ValueError, match="policy_max_timestep=.* and gfn.policy_min_timestep=.*: no sampling timestep"):
        NablaGFN(bb, reward, c, cfg_none)


def test_prepare_stores_each_steps_kl_to_the_reference():
    """The returns run the reference at every policy state; ``prepare`` keeps its outputs' KL per step and trajectory
    (``metrics.path_kl``, checked against the reference run again here), zero at the reference's own steps; the
    returns are ``gradient_returns``'."""
    from fastnabla import metrics

    over = {"gfn.reward_guidance": 0.5, "gfn.policy_target": "return", "sampling.num_steps": 8,
            "gfn.timestep_fraction": 0.5}
    cfg, bb, reward, c = _setup(**over)
    ts = bb.scheduler.timesteps
    cfg, _, _, _ = _setup(**over, **{"gfn.policy_max_timestep": int(ts[2])})
    m = NablaGFN(bb, reward, c, cfg)
    tr = m.prepare(sample_trajectories(bb, 4, torch.Generator().manual_seed(3), c, guide=m.guide,
                                       policy_from=m.policy_from))
    with torch.no_grad():
        ref = torch.stack([bb.reference(tr.xs[:, k], ts[k].expand(4)) for k in range(8)], 1)
    want = metrics.path_kl(c.coef_out, c.std, tr.outs, ref)
    kl = tr.extras["path_kl"]
    assert kl.shape == (4, 8) and float(kl[:, :2].abs().max()) == 0.0 and bool((kl[:, 2:] > 0).all())
    torch.testing.assert_close(kl[:, 2:], want[:, 2:], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tr.returns, m.gradient_returns(tr.xs, None, None), rtol=0, atol=0)


def test_policy_max_timestep_errors():
    with pytest.raises(ValueError, match="gfn.policy_max_timestep"):
        load_config(None, ["gfn.policy_max_timestep=-5"])
    with pytest.raises(ValueError, match="gfn.policy_max_timestep"):
        load_config(None, ["gfn.recipe=paper", "gfn.policy_max_timestep=500"])
    cfg, bb, reward, c = _setup(**{"gfn.policy_max_timestep": 0})
    with pytest.raises(ValueError, match="no sampling timestep is left to the policy"):
        NablaGFN(bb, reward, c, cfg)
    ts = _setup(**{"sampling.num_steps": 8, "gfn.timestep_fraction": 0.5})[1].scheduler.timesteps
    cfg, bb, reward, c = _setup(**{"gfn.policy_max_timestep": int(ts[1]), "gfn.timestep_fraction": 0.5,
                                   "sampling.num_steps": 8})
    with pytest.raises(ValueError, match="the policy acts at 7 of the 8 steps"):  # 7 steps, K = 3: not divisible
        NablaGFN(bb, reward, c, cfg)


def test_acting_steps_matches_a_step_by_step_reading():
    """``acting_steps`` (the one reading of the policy's timestep range) against checking every step's timestep, on a
    uniform and a non-uniform descending schedule, for bounds on, between and outside the timesteps."""
    from fastnabla.methods.base import acting_steps

    for ts in ([951, 901, 851, 701, 551, 401, 251, 101, 51, 1], [961, 700, 420, 300, 90, 1]):
        for hi in (None, 2000, 961, 951, 800, 700, 420, 51, 1, 0):
            for lo in (None, 0, 1, 2, 52, 300, 301, 700, 960, 2000):
                ks = [k for k, t in enumerate(ts) if (hi is None or t <= hi) and (lo is None or t >= lo)]
                want = (ks[0], ks[-1] + 1) if ks else None
                assert acting_steps(ts, hi, lo) == want, (ts, hi, lo)
