"""``gfn.value_guidance``: the value h_φ ≈ E_ref[R^β | x_t] (``fastnabla.value``) and the policy's fixed push from it.

The fit is checked against a closed-form conditional mean, the push against a hand gradient of a linear value, the
cache against its key, and the trainer against a hand-stepped sampler."""
import math
import os

import pytest
import torch

from fastnabla.backbones.pixel import SCHEDULER_CONFIG, PixelBackbone, build_unet
from fastnabla.config import load_config
from fastnabla.rewards.digits import DigitClassifier, DigitClassReward
from fastnabla.transitions import make_scheduler
from fastnabla.value import ensure_value, explained_share, fit_value, guidance_scales, value_logit

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py

VALUE_KEYS = ["gfn.value_trajectories=32", "gfn.value_steps=3", "gfn.value_batch=16", "gfn.value_channels=[8,16]"]


def _tiny():
    torch.manual_seed(0)
    bb = PixelBackbone(build_unet(8, [8, 16]), make_scheduler("ddim", SCHEDULER_CONFIG, 4), lora_rank=2,
                       flow_channels=[8, 16], lora_target_modules=["to_q", "to_v", "conv1"])
    return bb, DigitClassReward([3, 5, 8], classifier=DigitClassifier(8, width=8, features=16).eval())


def _cfg(tmp_path, *over):
    return load_config(None, [
        "model.backbone=pixel", "sampling.num_steps=4", "sampling.batch_size=8", "gfn.timestep_fraction=0.5",
        "gfn.policy_target=return", "gfn.value_guidance=1.5", "gfn.reward_scale=0.7", *VALUE_KEYS,
        "train.epochs=1", "eval.every=0", "eval.num_samples=16", "eval.ground_truth_samples=32",
        "logging.progress=false", "checkpoint.every=0", f"model.cache_dir={tmp_path / 'cache'}", *over],
        output_dir=str(tmp_path / "run"))


class _Linear(torch.nn.Module):
    """logit = mean(w ⊙ x) + c·t: ∇_x log sigmoid(logit) = (1 − h)·w/D by hand."""

    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(shape))
        self.c = torch.nn.Parameter(torch.tensor(0.01))

    def forward(self, x, t):
        return self.w * x + self.c * t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class _Affine(torch.nn.Module):
    """One affine logit of the state, the same at every step."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x, t):
        return self.lin(x) + 0 * t.view(-1, 1)


def test_fit_value_reaches_the_conditional_mean():
    """BCE with soft labels is minimised by E[y | x]: Bernoulli labels drawn with P(y = 1 | x) = sigmoid(1.5·x − 0.5)
    give back that slope and intercept (the t term fits 0: the labels do not depend on it)."""
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x = torch.rand(n, 2, 1, generator=g) * 4 - 2  # states x_0, x_1 of one step; the fit reads x_0
    x[:, 1] = 0
    y = torch.bernoulli(torch.sigmoid(1.5 * x[:, 0, 0] - 0.5), generator=g)

    net = fit_value(_Affine, x, y, torch.tensor([500, 0]), steps=3000, batch=1024, lr=0.05, seed=0)
    assert float(net.lin.weight) == pytest.approx(1.5, abs=0.1) and float(net.lin.bias) == pytest.approx(-0.5, abs=0.1)
    assert not any(p.requires_grad for p in net.parameters())
    share = explained_share(net, x, y, torch.tensor([500, 0]))
    # the best predictor's share of Var(y) is Var(p(x))/Var(y), computed in closed form on the same draw
    p = torch.sigmoid(1.5 * x[:, 0, 0] - 0.5)
    assert share[0] == pytest.approx(float(1 - (p - y).square().mean() / y.var()), abs=0.01)


@pytest.mark.parametrize("bootstrap,relative_floor", [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-3)])
def test_fit_value_reaches_the_conditional_mean_of_a_two_step_chain(bootstrap, relative_floor):
    """x_1 = x_0 + 0.7·ε, P(y = 1 | x_1) = sigmoid(2·x_1): h_1 = sigmoid(2·x) exactly, and h_0(x) = E_ε[sigmoid(2·(x +
    0.7·ε))], integrated numerically. Monte-Carlo labels, bootstrapped ones ((1 − b)·y + b·h̄(x_1) at x_0) and the
    relative-error weighting all fit both, with one affine logit per step."""
    class PerStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.c = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))

        def forward(self, x, t):
            i = (t < 400).long()  # step 0 at t = 500, step 1 at t = 250
            return self.w[i].view(-1, 1) * x + self.c[i].view(-1, 1)

    g = torch.Generator().manual_seed(0)
    n = 40_000
    x0 = torch.rand(n, generator=g) * 4 - 2
    x1 = x0 + 0.7 * torch.randn(n, generator=g)
    y = torch.bernoulli(torch.sigmoid(2 * x1), generator=g)
    ts = torch.tensor([500, 250])
    net = fit_value(PerStep, torch.stack([x0, x1, x1], 1)[..., None], y, ts, steps=3000, batch=1024, lr=0.05, seed=0,
                    bootstrap=bootstrap, relative_floor=relative_floor)
    grid = torch.linspace(-1.5, 1.5, 13)
    eps = 0.7 * torch.randn(200_000, generator=g)
    h0 = torch.stack([torch.sigmoid(2 * (v + eps)).mean() for v in grid])
    fit0, fit1 = (torch.sigmoid(value_logit(net, grid[:, None], torch.full((13,), t))) for t in (500, 250))
    assert torch.allclose(fit1, torch.sigmoid(2 * grid), atol=0.01)
    assert torch.allclose(fit0, h0, atol=0.015)  # the affine logit's own error at step 0 is about 0.005
    assert not torch.allclose(fit0, fit1, atol=0.05)  # step 0 is flatter: the fit did not copy step 1


def test_relative_fit_trades_error_near_one_for_log_error_in_the_tail():
    """A fit that cannot be exact: soft labels with mean h(x) = 0.9·exp(−x²) on [0, 3] (h from 0.9 to 1e-4) and an
    affine logit. Plain BCE spends the line on where h is large; divided by h (``relative_floor``) it follows log h
    into the tail, where a target with β < 1 keeps a few percent of its mass, and pays near h ≈ 1."""
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x0 = torch.rand(n, generator=g) * 3
    y = 0.9 * torch.exp(-x0.square()) * 2 * torch.rand(n, generator=g)  # soft labels, mean h(x)

    grid = torch.linspace(0, 3, 31)
    log_h = math.log(0.9) - grid.square()
    tail, head = grid >= 2, grid <= 1
    err = {}
    for f in (0.0, 1e-3):
        net = fit_value(_Affine, torch.stack([x0, x0], 1)[..., None], y, torch.tensor([500, 0]), steps=3000,
                        batch=1024, lr=0.05, seed=0, relative_floor=f)
        fit = torch.nn.functional.logsigmoid(value_logit(net, grid[:, None], torch.full((31,), 500)))
        err[f] = (float((fit - log_h)[tail].abs().mean()), float((fit.exp() - log_h.exp())[head].abs().mean()))
    assert err[1e-3][0] < 0.7 * err[0.0][0]  # the tail's log h: nearer (measured 0.53 against 0.98 nats)
    assert err[0.0][1] < err[1e-3][1]  # and h where it is large: plain BCE's is nearer


def test_value_push_moves_the_mean_by_s_sigma2_grad_log_h(tmp_path):
    """The guided mean is μ_ref(x) + s·σ_k²·∇log h(μ_ref(x), t_{k+1}), and μ_ref + s·σ²·β·∇log R(μ_ref) into the clean
    sample, against a value and a reward whose gradients are closed forms; with_reference returns the reference's
    output, and a batch of mixed steps gives each row its own step's push."""
    from fastnabla.methods.nabla_gfn import NablaGFN
    from fastnabla.sampling import step_coefficients

    bb, classifier_reward = _tiny()
    c = step_coefficients(bb)

    def reward(images, prompts, meta):  # log R = −Σ (img − 0.3)²: ∇_x log R = −(x/2 + 0.5 − 0.3) through decode
        return -(images - 0.3).square().sum((1, 2, 3)), None

    ensure_value(bb, c, classifier_reward, _cfg(tmp_path))  # the fit the method loads (its labels are the reward's)
    m = NablaGFN(bb, reward, c, _cfg(tmp_path))
    m.value_net = _Linear(bb.sample_shape)
    w, D, s, beta = m.value_net.w.detach(), 64, 1.5, 0.7
    ts = bb.scheduler.timesteps
    x = torch.randn(3, *bb.sample_shape, generator=torch.Generator().manual_seed(1))
    for k in range(4):
        shift, out_ref = m.guidance(x, k, None, None, with_reference=True)
        with torch.no_grad():
            ref = bb.reference(x, ts[k].expand(3), None)
        torch.testing.assert_close(out_ref, ref)
        mu = c[k].mean(x, ref)
        if k < 3:
            logit = (w * mu).mean((1, 2, 3)) + 0.01 * float(ts[k + 1])
            grad = (1 - torch.sigmoid(logit)).view(-1, 1, 1, 1) * w / D
        else:
            grad = beta * -(mu / 2 + 0.5 - 0.3)
        moved = c.coef_out[k] * shift  # μ(x, ref + shift) − μ(x, ref), without float32's cancellation
        torch.testing.assert_close(moved, s * c.std[k] ** 2 * grad, rtol=1e-5, atol=1e-8)
    k = torch.tensor([0, 3, 1])
    mixed = m.guidance(x, k, None, None)
    for r in range(3):
        torch.testing.assert_close(mixed[r], m.guidance(x[r:r + 1], int(k[r]), None, None)[0], rtol=1e-5, atol=1e-7)


def test_guidance_scales_ramp_over_the_policy_steps_by_hand():
    """s_k goes linearly in the timestep from value_guidance at the policy's first step to value_guidance_last at its
    last; steps outside the policy's range keep value_guidance; None, or a one-step policy, is constant."""
    ts = [951, 651, 401, 101, 1]
    got = guidance_scales(ts, 1, 4, 2.0, 1.0)
    want = torch.tensor([2.0, 2.0, 1.0 + 300 / 550, 1.0, 2.0])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(guidance_scales(ts, 0, 5, 2.0, 0.0),
                               torch.tensor([2.0, 2 * 650 / 950, 2 * 400 / 950, 2 * 100 / 950, 0.0]))
    torch.testing.assert_close(guidance_scales(ts, 1, 4, 2.0), torch.full((5,), 2.0))
    torch.testing.assert_close(guidance_scales(ts, 2, 3, 2.0, 1.0), torch.full((5,), 2.0))


def test_value_guidance_last_scales_each_steps_push(tmp_path):
    """With gfn.value_guidance_last the push at step k is s_k/s times the constant one (s_k of guidance_scales over
    the policy's steps), and the fit is the same one (the scale is not part of its cache key)."""
    from fastnabla.methods.nabla_gfn import NablaGFN
    from fastnabla.sampling import step_coefficients

    bb, reward = _tiny()
    c = step_coefficients(bb)
    ensure_value(bb, c, reward, _cfg(tmp_path))
    m = NablaGFN(bb, reward, c, _cfg(tmp_path))
    ramp = NablaGFN(bb, reward, c, _cfg(tmp_path, "gfn.value_guidance_last=0.5"))
    assert len(_fits(tmp_path)) == 1
    ts = [int(t) for t in bb.scheduler.timesteps]
    x = torch.randn(3, *bb.sample_shape, generator=torch.Generator().manual_seed(1))
    for k in range(4):
        s_k = 0.5 + (1.5 - 0.5) * (ts[k] - ts[3]) / (ts[0] - ts[3])
        torch.testing.assert_close(ramp.guidance(x, k, None, None), s_k / 1.5 * m.guidance(x, k, None, None),
                                   rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["unet", "encoder"])
def test_value_nets_start_at_one_half_and_fit_a_state_and_time_dependent_mean(kind):
    """Both ``gfn.value_net`` choices: logit 0 (h = 1/2) at init, and a fit that recovers a conditional mean which
    depends on the state and the timestep: soft labels sigmoid(3·mean(x)) at t = 50, while the states at t = 900
    carry no information (their best prediction is the labels' mean). A net that ignored x or t would be about
    0.1–0.25 off; the fit is within 0.05."""
    from fastnabla.backbones.pixel import build_pixel_value_net

    torch.manual_seed(0)
    probe = torch.randn(5, 1, 8, 8)
    assert torch.equal(value_logit(build_pixel_value_net(8, [8, 16], 1, kind), probe, torch.arange(5)), torch.zeros(5))
    g = torch.Generator().manual_seed(0)

    def states(n):  # images with a random offset ("ink") c ∈ [−1, 1] and pixel noise
        return torch.rand(n, 1, 1, 1, generator=g) * 2 - 1 + 0.3 * torch.randn(n, 1, 8, 8, generator=g)

    n = 8192
    x1 = states(n)
    y = torch.sigmoid(3 * x1.mean((1, 2, 3)))  # soft labels: the conditional mean itself at t = 50
    xs = torch.stack([states(n), x1, x1], 1)  # x_0 at t = 900 is independent of y; x_1 at t = 50 decides it
    net = fit_value(lambda: build_pixel_value_net(8, [8, 16], 1, kind), xs, y, torch.tensor([900, 50, 0]), steps=400,
                    batch=256, lr=3e-3, seed=0)
    test = states(512)
    h50, h900 = (torch.sigmoid(value_logit(net, test, torch.full((512,), t))) for t in (50, 900))
    assert float((h50 - torch.sigmoid(3 * test.mean((1, 2, 3)))).abs().mean()) < 0.05
    assert float((h900 - y.mean()).abs().mean()) < 0.05


def test_value_is_cached_and_keyed_by_its_settings(tmp_path):
    from fastnabla.sampling import step_coefficients

    bb, reward = _tiny()
    c = step_coefficients(bb)
    net, meta = ensure_value(bb, c, reward, _cfg(tmp_path))
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(_fits(tmp_path)) == 1
    assert sorted(meta["explained_share"]) == sorted(int(t) for t in bb.scheduler.timesteps)
    again, meta2 = ensure_value(bb, c, reward, _cfg(tmp_path))
    assert sorted(os.listdir(tmp_path / "cache")) == files and meta2 == meta
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(2, *bb.sample_shape)
    torch.testing.assert_close(value_logit(net, x, torch.tensor([1, 2])), value_logit(again, x, torch.tensor([1, 2])))
    ensure_value(bb, c, reward, _cfg(tmp_path, "gfn.value_seed=1"))  # another fit, another entry
    ensure_value(bb, c, reward, _cfg(tmp_path, "gfn.reward_scale=0.3"))  # another β: other labels
    ensure_value(bb, c, reward, _cfg(tmp_path, "gfn.value_bootstrap=0.5"))  # bootstrapped labels: another fit
    ensure_value(bb, c, reward, _cfg(tmp_path, "gfn.value_relative_floor=0.001"))  # relative weighting: another
    enc, _ = ensure_value(bb, c, reward, _cfg(tmp_path, "gfn.value_net=encoder"))  # another net: another entry
    assert len(_fits(tmp_path)) == 6 and not any(k.startswith("up_blocks") for k in enc.state_dict())
    ensure_value(bb, c, reward, _cfg(tmp_path, "gfn.value_draw=target"))  # the target's trajectories: another
    assert len(_fits(tmp_path)) == 7
    # the draws: value_seed=1 and the target's stream are draws of their own; β, bootstrap, the floor and the net
    # reuse the first draw
    assert len([f for f in os.listdir(tmp_path / "cache") if f.startswith("valuedraw-")]) == 3


def _fits(tmp_path) -> list:
    return [f for f in os.listdir(tmp_path / "cache") if f.startswith("value-") and f.endswith(".pt")]


def test_reference_draw_is_cached_apart_from_the_reward(tmp_path, monkeypatch):
    """With a cache directory the draw's states are stored once: a second call, with another β, reads them back
    without sampling and labels them from x_N as a fresh draw does; another seed or n is another file."""
    import fastnabla.sampling as sampling
    from fastnabla.sampling import step_coefficients
    from fastnabla.value import reference_trajectories

    bb, reward = _tiny()
    c = step_coefficients(bb)
    cache = str(tmp_path / "draws")
    xs, ys = reference_trajectories(bb, c, reward, 24, 1.0, seed=5, batch=16)  # uncached: the reference
    xs1, ys1 = reference_trajectories(bb, c, reward, 24, 1.0, seed=5, batch=16, cache=cache)
    torch.testing.assert_close(xs1, xs, rtol=0, atol=0)
    torch.testing.assert_close(ys1, ys, rtol=0, atol=0)
    assert len(os.listdir(cache)) == 1

    def no_sampling(*a, **k):
        raise AssertionError("sampled although the draw is cached")

    monkeypatch.setattr(sampling, "sample_trajectories", no_sampling)
    xs2, ys2 = reference_trajectories(bb, c, reward, 24, 0.5, seed=5, batch=16, cache=cache)
    torch.testing.assert_close(xs2, xs, rtol=0, atol=0)
    log_r, _ = reward(bb.decode(xs[:, -1]), None, None)  # the class reward's log p ≤ 0: no division by the max
    torch.testing.assert_close(ys2, (0.5 * log_r.double()).exp().float())
    for other in (dict(seed=6, n=24), dict(seed=5, n=20)):
        with pytest.raises(AssertionError, match="sampled"):
            reference_trajectories(bb, c, reward, other["n"], 1.0, seed=other["seed"], batch=16, cache=cache)


def test_value_guidance_reaches_training_and_evaluation_samples(tmp_path):
    """The trainer's sampler steps with policy + the value's push (the stored outputs carry it), the final samples
    are drawn the same way, and the reference draw stays unpushed; an epoch trains through it."""
    from fastnabla.trainer import build_trainer
    from tests.helpers.guidance import assert_guided_sampling

    bb, reward = _tiny()
    tr = build_trainer(_cfg(tmp_path), backbone=bb, reward_fn=reward)
    assert tr.method.value_net is not None
    assert_guided_sampling(tr, range(4), n=16, atol_ref=1e-4)
    before = [p.detach().clone() for p in bb.policy_parameters()]
    tr.run()
    assert any(not torch.equal(a, p) for a, p in zip(before, bb.policy_parameters()))


def test_value_guidance_refused_by_a_backbone_without_a_value_net(tmp_path):
    """The config's own checks of the gfn.value_* keys are in tests/test_config.py's table of one-line errors."""
    from fastnabla.trainer import build_trainer

    with pytest.raises(ValueError, match="does not build"):  # toy2d has no value net
        build_trainer(load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "toy2d.yaml"),
                                  ["gfn.value_guidance=1.0", "logging.progress=false"],
                                  output_dir=str(tmp_path / "toy")))


def test_target_draw_continues_the_value_draw_of_its_stream(tmp_path, monkeypatch):
    """``gfn.value_draw: target``: the value's trajectories are the first ones of the target's draw. Given the value's
    cached file (states and generator state), ``digits.reference_samples`` takes its final states and samples only
    the rest, and its samples equal a fresh draw's exactly; a file whose last batch is partial cannot be continued,
    so the draw starts afresh (and still equals it)."""
    import fastnabla.sampling as sampling
    from fastnabla import digits
    from fastnabla.sampling import step_coefficients
    from fastnabla.value import reference_draw_path, reference_trajectories, value_draw_stream

    bb, reward = _tiny()
    c, clf = step_coefficients(bb), reward.classifier
    fresh = digits.reference_samples(bb, clf, 40, seed=7, batch=16, cache_dir=str(tmp_path / "fresh"), progress=False)
    calls = []
    real = sampling.sample_trajectories
    monkeypatch.setattr(sampling, "sample_trajectories",
                        lambda bb_, m, *a, **k: calls.append(m) or real(bb_, m, *a, **k))
    for kept, sampled in ((32, [8]), (24, [16, 16, 8])):
        draws = str(tmp_path / f"draws{kept}")
        reference_trajectories(bb, c, reward, kept, 1.0, seed=7, batch=16, cache=draws)
        calls.clear()
        got = digits.reference_samples(bb, clf, 40, seed=7, batch=16, cache_dir=str(tmp_path / f"gt{kept}"),
                                       progress=False, trajectories=reference_draw_path(bb, kept, 7, 16, draws))
        assert calls == sampled
        for key in ("images", "logits", "features"):
            torch.testing.assert_close(got[key], fresh[key], rtol=0, atol=0)
    cfg = _cfg(tmp_path, "gfn.value_draw=target")
    assert value_draw_stream(cfg) == (digits.GROUND_TRUTH_SEED, digits.target_draw_batch(cfg))
    assert value_draw_stream(_cfg(tmp_path))[0] != digits.GROUND_TRUTH_SEED


def test_value_logit_is_one_number_per_state_whatever_the_net_returns():
    """A net's logit is the mean of its output over all but the batch dimension: a (B, C, H, W) map, a (B, 1) column
    or (B,) logits give each state its own logit (a mean over no dimensions would average the whole batch)."""
    x, t = torch.randn(3, 1, 4, 4), torch.arange(3)
    want = x.mean((1, 2, 3))
    for net in (lambda x, t: x, lambda x, t: x.flatten(1).mean(1, keepdim=True), lambda x, t: x.flatten(1).mean(1)):
        torch.testing.assert_close(value_logit(net, x, t), want)


def test_the_ensemble_probe_pushes_with_the_mean_of_its_members_logits():
    """``benchmarks/digits_value_ensemble.py``'s MeanLogit: its logit, and so log h's gradient in the push, is the
    mean of the members' (a (B,) mean that ``value_logit`` keeps per state)."""
    from benchmarks.digits_value_ensemble import MeanLogit

    a, b = (lambda x, t: 2 * x), (lambda x, t: x.flatten(1).sum(1, keepdim=True) - t[:, None])
    x, t = torch.randn(4, 1, 3, 3, requires_grad=True), torch.arange(4.0)
    want = (value_logit(a, x, t) + value_logit(b, x, t)) / 2
    got = value_logit(MeanLogit([a, b]), x, t)
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(torch.nn.functional.logsigmoid(got).sum(), x)
    (g_want,) = torch.autograd.grad(torch.nn.functional.logsigmoid(want).sum(), x)
    torch.testing.assert_close(g, g_want)
