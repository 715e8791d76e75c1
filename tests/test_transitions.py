"""transition_coefficients against diffusers' own scheduler steps (float64 schedulers, so diffusers itself is exact)."""
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
)

from fastnabla import transition_coefficients

PRED = ["epsilon", "v_prediction", "sample"]


def _f64(s):
    """Make diffusers do its scalar math in float64 too (its float32 scalars cost ~1e-4 near t = 0)."""
    s.alphas_cumprod = s.alphas_cumprod.double()
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = torch.as_tensor(s.final_alpha_cumprod).double()
    return s


def ddim(pt, **kw):
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1, prediction_type=pt)
    cfg.update(kw)
    return DDIMScheduler(**cfg)


def _pick(s):
    ts = s.timesteps
    return [int(ts[0]), int(ts[1]), int(ts[len(ts) // 2]), int(ts[-2]), int(ts[-1])]


def _data(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3)]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("pt", PRED)
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_ddim_matches_step_and_x0(pt, eta):
    s = _f64(ddim(pt))
    s.set_timesteps(50)
    for t in _pick(s):
        x, out, z = _data(2, seed=t)
        c = transition_coefficients(s, torch.tensor([t, t]), eta=eta, dtype=torch.float64)
        ref = s.step(out, t, x, eta=eta, variance_noise=z)
        assert _rel(c.step(x, out, z), ref.prev_sample) <= 1e-5, (t, pt, eta)
        assert _rel(c.pred_x0(x, out), ref.pred_original_sample) <= 1e-5
        if eta == 0.0:
            assert bool((c.std == 0).all())


def test_ddim_per_sample_mixed_timesteps_first_and_last():
    s = _f64(ddim("epsilon"))
    s.set_timesteps(50)
    ts = [int(s.timesteps[0]), int(s.timesteps[17]), int(s.timesteps[-1]), int(s.timesteps[3])]
    x, out, z = _data(len(ts), seed=3)
    c = transition_coefficients(s, torch.tensor(ts), eta=1.0, dtype=torch.float64)
    mine = c.step(x, out, z)
    for i, t in enumerate(ts):
        ref = s.step(out[i : i + 1], t, x[i : i + 1], eta=1.0, variance_noise=z[i : i + 1]).prev_sample
        assert _rel(mine[i : i + 1], ref) <= 1e-5
    # ALGORITHM §2's closed form for DDIM ε-prediction
    ac = s.alphas_cumprod
    t = torch.tensor(ts)
    a, ap = ac[t], torch.where(t - 20 >= 0, ac[(t - 20).clamp(min=0)], ac[0])
    var = (1 - ap) / (1 - a) * (1 - a / ap)
    assert torch.allclose(c.std, var.sqrt(), rtol=1e-12)
    assert torch.allclose(c.coef_x, ap.sqrt() / a.sqrt(), rtol=1e-12)
    assert torch.allclose(c.coef_out, (1 - ap - var).sqrt() - ap.sqrt() * (1 - a).sqrt() / a.sqrt(), rtol=1e-10)
    assert torch.allclose(c.alpha_prod, a)


def test_ddim_set_alpha_to_one_last_step_is_deterministic():
    s = ddim("epsilon", set_alpha_to_one=True, steps_offset=0)
    s.set_timesteps(10)
    c = transition_coefficients(s, s.timesteps, eta=1.0)
    assert float(c.std[-1]) == 0.0 and bool((c.std[:-1] > 0).all())


@pytest.mark.parametrize("pt", PRED)
@pytest.mark.parametrize("vt", ["fixed_small", "fixed_small_log", "fixed_large"])
def test_ddpm_matches_step(pt, vt):
    s = _f64(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                           prediction_type=pt, variance_type=vt))
    s.one = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(50)
    for t in _pick(s):
        x, out, _ = _data(2, seed=t)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        ref = s.step(out, t, x, generator=torch.Generator().manual_seed(7))
        c = transition_coefficients(s, [t, t], dtype=torch.float64)
        assert _rel(c.step(x, out, z), ref.prev_sample) <= 1e-5, (t, pt, vt)
        assert _rel(c.pred_x0(x, out), ref.pred_original_sample) <= 1e-5
    # DDPM's own final-alpha convention: the last step lands on ᾱ = 1 with no noise (fixed_small)
    c = transition_coefficients(s, s.timesteps[-1:], dtype=torch.float64)
    x, out, _ = _data(1, seed=4)
    assert _rel(c.mean(x, out), c.pred_x0(x, out)) <= 1e-12  # μ = x̂0: the step lands on the clean sample
    if vt != "fixed_large":
        assert float(c.std[0]) == 0.0


@pytest.mark.parametrize("pt", PRED)
def test_listed_ddim_is_ddpms_posterior_on_a_non_uniform_list(pt):
    """DDIM at η = 1 between listed timesteps is DDPM's posterior q(x_prev | x_t, x̂0) (fixed_small), which diffusers'
    DDPMScheduler computes on the same custom list: every step but the last, where DDIM lands on
    final_alpha_cumprod (σ > 0) and DDPM on ᾱ = 1 (σ = 0)."""
    from fastnabla.transitions import ListedDDIMScheduler, make_scheduler

    ts = [951, 801, 651, 551, 501, 451, 401, 351, 301, 251, 101, 1]
    base = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                steps_offset=1, prediction_type=pt)
    s = _f64(make_scheduler("ddim", base, len(ts), timesteps=ts))
    assert isinstance(s, ListedDDIMScheduler) and s.timesteps.tolist() == ts
    p = _f64(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                           prediction_type=pt, variance_type="fixed_small"))
    p.one = torch.tensor(1.0, dtype=torch.float64)
    p.set_timesteps(timesteps=ts)
    c = transition_coefficients(s, ts, eta=1.0, dtype=torch.float64)
    for i, t in enumerate(ts[:-1]):
        x, out, _ = _data(2, seed=t)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        ref = p.step(out, t, x, generator=torch.Generator().manual_seed(7))
        assert _rel(c[i].step(x, out, z), ref.prev_sample) <= 1e-5, (t, pt)
        assert _rel(c[i].pred_x0(x, out), ref.pred_original_sample) <= 1e-5
        # the scheduler's own step is the same transition
        mine = s.step(out, t, x, eta=1.0, variance_noise=z)
        assert _rel(mine.prev_sample, ref.prev_sample) <= 1e-5
    # the last step: DDIM's closed form towards final_alpha_cumprod = ᾱ_0, with noise
    a, ap = s.alphas_cumprod[1], s.alphas_cumprod[0]
    var = (1 - ap) / (1 - a) * (1 - a / ap)
    assert float(c.std[-1]) > 0 and torch.allclose(c.std[-1], var.sqrt(), rtol=1e-12)
    with pytest.raises(ValueError, match="not in the scheduler's schedule"):
        transition_coefficients(s, [900])


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_listed_ddim_on_the_uniform_list_is_ddim(eta):
    from fastnabla.transitions import make_scheduler

    u = _f64(ddim("v_prediction"))
    u.set_timesteps(25)
    s = _f64(make_scheduler("ddim", dict(u.config), 25, timesteps=u.timesteps.tolist()))
    for t in _pick(u):
        x, out, z = _data(2, seed=t)
        ref = u.step(out, t, x, eta=eta, variance_noise=z)
        mine = s.step(out, t, x, eta=eta, variance_noise=z)
        assert _rel(mine.prev_sample, ref.prev_sample) <= 1e-10
        assert _rel(mine.pred_original_sample, ref.pred_original_sample) <= 1e-10


def test_timestep_list_errors():
    from fastnabla.transitions import make_scheduler

    base = dict(ddim("epsilon").config)
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_scheduler("ddim", base, 3, timesteps=[901, 901, 1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_scheduler("ddpm", base, 3, timesteps=[1, 501, 901])
    with pytest.raises(ValueError, match=r"lie in \[0, 999\]"):
        make_scheduler("ddim", base, 2, timesteps=[1000, 1])
    with pytest.raises(ValueError, match="ints"):
        make_scheduler("ddim", base, 2, timesteps=[900.5, 1])
    with pytest.raises(ValueError, match="lists 2 timesteps but sampling.num_steps=3"):
        make_scheduler("ddim", base, 3, timesteps=[901, 1])
    with pytest.raises(ValueError, match="not sde-dpmsolver"):
        make_scheduler("sde-dpmsolver++", base, 2, timesteps=[901, 1])


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler])
@pytest.mark.parametrize("pt", PRED)
def test_sde_dpmsolver_first_order_matches_step(cls, pt):
    s = cls(algorithm_type="sde-dpmsolver++", solver_order=1, prediction_type=pt, lower_order_final=True)
    s.set_timesteps(20)
    s.sigmas = s.sigmas.double()
    for i in [0, 1, 10, len(s.timesteps) - 1]:
        t = int(s.timesteps[i])
        x, out, _ = _data(2, seed=i)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        s._step_index = i
        if cls is DPMSolverMultistepScheduler:
            s.lower_order_nums = 0
            ref = s.step(out, t, x, variance_noise=z).prev_sample
        else:
            ref = s.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        c = transition_coefficients(s, [t, t], dtype=torch.float64)
        # the multistep scheduler upcasts to float32 internally, so compare at float32 precision there
        tol = 1e-5
        assert _rel(c.step(x, out, z), ref.double()) <= tol, (i, pt)
        s._step_index = i
        x0 = s.convert_model_output(out, sample=x)
        assert _rel(c.pred_x0(x, out), x0.double()) <= tol
    c = transition_coefficients(s, s.timesteps[-1:])
    assert float(c.std[0]) == 0.0  # final_sigmas_type='zero': the last step is deterministic


def test_errors():
    s = ddim("epsilon")
    with pytest.raises(ValueError, match="set_timesteps"):
        transition_coefficients(s, [981])
    s = ddim("epsilon", clip_sample=True)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="clip_sample"):
        transition_coefficients(s, [901])
    s = ddim("epsilon", thresholding=True)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="thresholding"):
        transition_coefficients(s, [901])
    e = EulerDiscreteScheduler()
    e.set_timesteps(10)
    with pytest.raises(ValueError, match="unsupported scheduler class EulerDiscreteScheduler"):
        transition_coefficients(e, [999])
    d = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    d.set_timesteps(10)
    with pytest.raises(ValueError, match="solver_order"):
        transition_coefficients(d, [int(d.timesteps[0])])
    d = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=1)
    d.set_timesteps(10)
    with pytest.raises(ValueError, match="deterministic"):
        transition_coefficients(d, [int(d.timesteps[0])])
    p = DDPMScheduler(clip_sample=False)
    p.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the scheduler's schedule"):
        transition_coefficients(p, [5])
    s = ddim("epsilon")
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="eta"):
        transition_coefficients(s, [901], eta=-1.0)
    with pytest.raises(ValueError, match="eta=3.0 is too large"):
        transition_coefficients(s, [901], eta=3.0)


def test_reverse_score_equals_the_closed_form_for_a_linear_network():
    """s_R = (∂μ/∂x)ᵀ(x' − μ)/σ²; with out = W·x the Jacobian is coef_x·I + coef_out·W, per transition."""
    s = _f64(ddim("epsilon"))
    s.set_timesteps(20)
    c = transition_coefficients(s, [int(s.timesteps[2]), int(s.timesteps[11])], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x = torch.randn(2, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    x_next = torch.randn(2, 6, generator=g, dtype=torch.float64)
    got = c.reverse_score(x, c.mean(x, x @ W.T), x_next)
    for i in range(2):
        J = c.coef_x[i] * torch.eye(6, dtype=torch.float64) + c.coef_out[i] * W
        mu = J @ x[i].detach()
        torch.testing.assert_close(got[i], J.T @ (x_next[i] - mu) / c.std[i] ** 2, rtol=1e-12, atol=1e-12)


def test_sampler_steps_are_the_schedulers_steps():
    """sample_trajectories steps with TransitionCoefficients.step: each x_{k+1} is diffusers' own DDIM step of the
    recorded output with the noise the sampler drew."""
    from fastnabla.sampling import sample_trajectories, step_coefficients
    from fastnabla.transitions import make_scheduler

    class Net(torch.nn.Module):
        sample_shape, conditional, eta = (3, 4), False, 1.0

        def __init__(self):
            super().__init__()
            self.scheduler = make_scheduler("ddim", ddim("epsilon").config, 6)
            self.lin = torch.nn.Linear(4, 4)

        device = torch.device("cpu")

        def sample_noise(self, n, generator):
            return torch.randn((n, *self.sample_shape), generator=generator)

        def policy(self, x, t, cond):
            return torch.tanh(self.lin(x)) * (t.view(-1, 1, 1) / 1000.0)

    net = Net()
    c = step_coefficients(net)
    tr = sample_trajectories(net, 2, torch.Generator().manual_seed(0), c)
    g = torch.Generator().manual_seed(0)
    torch.randn((2, 3, 4), generator=g)  # x_0
    for k, t in enumerate(net.scheduler.timesteps):
        z = torch.randn((2, 3, 4), generator=g)
        ref = net.scheduler.step(tr.outs[:, k], t, tr.xs[:, k], eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(tr.xs[:, k + 1], ref, rtol=1e-5, atol=1e-6)
