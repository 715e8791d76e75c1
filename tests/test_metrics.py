"""Sample-and-feature metrics against closed forms and hand computations: importance sampling vs toy2d's exact
tilted weights, FID/KID for Gaussian features, diversity, class histograms; the digits ground truth by hand."""
import math

import pytest
import torch

from fastnabla import metrics
from fastnabla.backbones.toy2d import mixture_from_config, mode_weights, tilted_weights



pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py

def test_importance_sampling_recovers_the_exact_tilted_mixture_weights():
    means, stds, w = mixture_from_config([-2.0, 0.0, 2.0], 0.25)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    idx = torch.multinomial(w, n, replacement=True, generator=g)
    x = means[idx] + stds[idx, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    for center, width, beta in [([1.0, 0.5], 1.0, 1.0), ([-1.0, -1.5], 1.0, 0.5), ([2.0, 2.0], 1.0, 2.0)]:
        log_r = -((x - torch.tensor(center, dtype=torch.float64)) ** 2).sum(1) / (2 * width**2)
        iw, ess = metrics.importance_weights(log_r, beta)
        assert 1 < ess < n
        _, near = torch.cdist(x, means).min(1)
        est = metrics.class_histogram(near, means.shape[0], iw)
        exact = tilted_weights(means, stds, w, center, width, beta)
        assert metrics.histogram_tv(est, exact) < 0.01, (center, beta)
    # unweighted histogram = toy2d's mode weights
    torch.testing.assert_close(metrics.class_histogram(near, 9), mode_weights(x.float(), means.float())[0])


def test_importance_weights_and_ess_limits():
    w, ess = metrics.importance_weights(torch.zeros(50), 3.0)
    torch.testing.assert_close(w, torch.full((50,), 1 / 50, dtype=torch.float64))
    assert ess == pytest.approx(50)
    w, ess = metrics.importance_weights(torch.tensor([0.0, 0.0, math.log(2.0)]), 1.0)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert ess == pytest.approx(1 / (0.25**2 * 2 + 0.25))


def test_mean_se_by_hand_and_against_repeated_importance_sampling():
    # uniform weights: the ÷n sample standard deviation over √n; [0, 2, 4]: variance 8/3
    assert metrics.mean_se(torch.tensor([0.0, 2.0, 4.0])) == pytest.approx(math.sqrt(8 / 3) / math.sqrt(3))
    # weights (1, 1, 2)/4 on [0, 2, 4]: mean 2.5, sqrt(Σ w²(v − 2.5)²)
    se = metrics.mean_se(torch.tensor([0.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 2.0]))
    assert se == pytest.approx(math.sqrt((6.25 + 0.25) / 16 + 2.25 / 4))
    # self-normalised importance sampling of p* ∝ N(0, 1)·e^{βx} = N(β, 1) from N(0, 1) draws: the estimator's spread
    # over independent repeats is what one draw's mean_se says it is
    g = torch.Generator().manual_seed(3)
    beta, n, repeats = 1.0, 2000, 400
    est, ses = [], []
    for _ in range(repeats):
        x = torch.randn(n, generator=g, dtype=torch.float64)
        w, _ = metrics.importance_weights(x, beta)
        est.append(float((w * x).sum()))
        ses.append(metrics.mean_se(x, w))
    est = torch.tensor(est)
    assert float(est.mean()) == pytest.approx(beta, abs=0.02)
    assert float(torch.tensor(ses).mean()) == pytest.approx(float(est.std()), rel=0.12)


def test_tilt_kl_of_a_gaussian_tilt_matches_the_closed_form():
    # p_ref = N(0, 1), log R = −(x − c)²/(2s²): p* = N(m, v) with 1/v = 1 + β/s², m = v·β·c/s²
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400_000, generator=g, dtype=torch.float64)
    for c, s, beta in [(1.0, 1.0, 1.0), (-0.5, 0.7, 0.5), (1.5, 1.2, 2.0)]:
        log_z, kl = metrics.tilt_kl(-(x - c) ** 2 / (2 * s**2), beta)
        v = 1 / (1 + beta / s**2)
        m = v * beta * c / s**2
        assert log_z == pytest.approx(-0.5 * math.log(1 + beta / s**2) - beta * c**2 / (2 * (s**2 + beta)), abs=0.01)
        assert kl == pytest.approx(0.5 * (v + m**2 - 1 - math.log(v)), abs=0.01)
    assert metrics.tilt_kl(torch.zeros(10), 2.0) == pytest.approx((0.0, 0.0))  # R constant: p* = p_ref


def test_path_kl_matches_torch_gaussian_kl():
    g = torch.Generator().manual_seed(2)
    n, N = 5, 4
    x = torch.randn(n, N, 3, 2, 2, generator=g, dtype=torch.float64)
    out, out_ref = torch.randn(2, n, N, 3, 2, 2, generator=g, dtype=torch.float64)
    coef_x, coef_out = torch.rand(N, generator=g, dtype=torch.float64), -torch.rand(N, generator=g, dtype=torch.float64)
    std = 0.1 + torch.rand(N, generator=g, dtype=torch.float64)
    b = lambda v: v.view(1, N, 1, 1, 1)  # noqa: E731
    mu, mu_ref = b(coef_x) * x + b(coef_out) * out, b(coef_x) * x + b(coef_out) * out_ref
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mu, b(std).expand_as(mu)),
                                             torch.distributions.Normal(mu_ref, b(std).expand_as(mu)))
    torch.testing.assert_close(metrics.path_kl(coef_out, std, out, out_ref), want.flatten(2).sum(2))
    with pytest.raises(ValueError, match="eta > 0"):
        metrics.path_kl(coef_out, torch.zeros(N, dtype=torch.float64), out, out_ref)
    with pytest.raises(ValueError, match="N = 4 steps"):
        metrics.path_kl(coef_out, std, out[:, :3], out_ref[:, :3])


def test_class_histogram_and_tv_by_hand():
    h = metrics.class_histogram(torch.tensor([0, 1, 1, 2]), 4)
    torch.testing.assert_close(h, torch.tensor([0.25, 0.5, 0.25, 0.0], dtype=torch.float64))
    hw = metrics.class_histogram(torch.tensor([0, 1, 1, 2]), 4, torch.tensor([1.0, 1.0, 2.0, 4.0]))
    torch.testing.assert_close(hw, torch.tensor([0.125, 0.375, 0.5, 0.0], dtype=torch.float64))
    assert metrics.histogram_tv(h, hw) == pytest.approx(0.5 * (0.125 + 0.125 + 0.25))
    # each class's share of the mean log R: Σ over the class of w_i·log R_i, with Σ w = 1
    log_r = torch.tensor([-1.0, -2.0, -4.0, -8.0])
    share = metrics.log_r_share_per_class(torch.tensor([0, 1, 1, 2]), log_r, 4)
    torch.testing.assert_close(share, torch.tensor([-0.25, -1.5, -2.0, 0.0], dtype=torch.float64))
    share_w = metrics.log_r_share_per_class(torch.tensor([0, 1, 1, 2]), log_r, 4, torch.tensor([1.0, 1.0, 2.0, 4.0]))
    torch.testing.assert_close(share_w, torch.tensor([-1 / 8, -10 / 8, -32 / 8, 0.0], dtype=torch.float64))


def test_class_transitions_by_hand():
    before, after = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 2, 1, 1, 2, 2])
    m = metrics.class_transitions(before, after, 3)
    assert m.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
    # its margins are the two class histograms
    torch.testing.assert_close(m.sum(1).double() / 6, metrics.class_histogram(before, 3))
    torch.testing.assert_close(m.sum(0).double() / 6, metrics.class_histogram(after, 3))
    with pytest.raises(ValueError, match="one to one"):
        metrics.class_transitions(before, after[:5], 3)


def test_diversity_by_hand():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0], [10.0, 10.0], [10.0, 12.0]])
    groups = torch.tensor([0, 0, 0, 1, 1])
    d = metrics.diversity(f[:3])
    assert d["overall"] == pytest.approx((5 + 4 + 3) / 3)  # pairwise distances 5, 4, 3
    dw = metrics.diversity(f[:3], weights=torch.tensor([1.0, 1.0, 2.0]))
    assert dw["overall"] == pytest.approx(2 * (1 * 1 * 5 + 1 * 2 * 4 + 1 * 2 * 3) / (4**2 - 6))
    dg = metrics.diversity(f, groups)
    assert dg["per_group"] == {0: pytest.approx(4.0), 1: pytest.approx(2.0)}
    assert metrics.diversity(f[:1], torch.tensor([0]))["per_group"] == {}
    # its standard error: each point's mean distance to the others h = (4.5, 4, 3.5), 2·sd(h)/√3 with sd ÷ n
    assert d["overall_se"] == pytest.approx(2 * math.sqrt(1 / 6) / math.sqrt(3))
    # weighted (1, 1, 2): h = ((5 + 2·4)/3, (5 + 2·3)/3, (4 + 3)/2), 2·sqrt(Σ w²(h − h̄)²)/Σ w, h̄ = Σ w·h/Σ w = 3.75
    h, w = torch.tensor([13 / 3, 11 / 3, 3.5], dtype=torch.float64), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    assert dw["overall_se"] == pytest.approx(2 * math.sqrt(float((w.square() * (h - 3.75).square()).sum())) / 4)
    assert math.isnan(dg["per_group_se"][1])  # two points: each one's mean distance is the other's, no error


def test_diversity_se_against_repeated_draws():
    """One draw's standard error is the spread of the estimate over independent draws: uniform weights, and
    self-normalised importance weights of the tilt N(0, I)·e^{x₁} = N(e₁, I) from N(0, I) draws."""
    g = torch.Generator().manual_seed(5)
    for tilt in (False, True):
        est, ses = [], []
        for _ in range(300):
            f = torch.randn(300, 4, generator=g, dtype=torch.float64)
            w = metrics.importance_weights(f[:, 0], 1.0)[0] if tilt else None
            d = metrics.diversity(f, weights=w)
            est.append(d["overall"])
            ses.append(d["overall_se"])
        est = torch.tensor(est)
        assert float(torch.tensor(ses).mean()) == pytest.approx(float(est.std()), rel=0.15)


def test_diversity_ratio_se_combines_both_sides_by_hand():
    target = {"class_histogram": [0.5, 0.49, 0.01], "diversity_per_class": {0: 10.0, 1: 20.0, 2: 5.0},
              "diversity_per_class_se": {0: 0.3, 1: 0.4}}
    se = metrics.diversity_ratio_se_per_class({0: 9.0, 2: 5.0}, {0: 0.45, 2: 1.0}, target)
    # class 0: 0.9·hypot(0.05, 0.03); class 1 lost (ratio 0, error 0); class 2 under the target's 2 % is left out
    assert se == {0: pytest.approx(0.9 * math.hypot(0.05, 0.03)), 1: 0.0}
    # a target without errors (a summary.json from before they were recorded) counts the model's side alone
    old = {k: v for k, v in target.items() if k != "diversity_per_class_se"}
    assert metrics.diversity_ratio_se_per_class({0: 9.0}, {0: 0.45}, old) == {0: pytest.approx(0.045), 1: 0.0}


def test_fid_matches_the_closed_form_for_gaussian_features():
    pytest.importorskip("torchmetrics")
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    d, n = 4, 100_000
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.tensor([0.5, -0.3, 0.0, 1.0], dtype=torch.float64)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5
    s1 = torch.diag(torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=torch.float64))
    s2 = a @ a.T + 0.3 * torch.eye(d, dtype=torch.float64)
    x = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    cross = scipy_linalg.sqrtm((s1 @ s2).numpy()).real
    exact = float(((mu1 - mu2) ** 2).sum() + torch.trace(s1 + s2) - 2 * cross.trace())
    assert metrics.fid(x, y) == pytest.approx(exact, rel=0.03, abs=0.01)
    assert metrics.fid(x[: n // 2], x[n // 2:]) < 0.01


def test_kid_matches_the_closed_form_for_one_dimensional_gaussians():
    pytest.importorskip("torchmetrics")
    # k(x, y) = (x·y + 1)³ in 1-D; for independent x, y: E k = E[x³]E[y³] + 3E[x²]E[y²] + 3E[x]E[y] + 1
    def moments(m, s):
        return m, m * m + s * s, m**3 + 3 * m * s * s

    def ek(p, q):
        return p[2] * q[2] + 3 * p[1] * q[1] + 3 * p[0] * q[0] + 1

    (m1, s1), (m2, s2) = (0.0, 1.0), (0.5, 0.8)
    p, q = moments(m1, s1), moments(m2, s2)
    exact = ek(p, p) + ek(q, q) - 2 * ek(p, q)
    g = torch.Generator().manual_seed(1)
    x = m1 + s1 * torch.randn(5000, 1, generator=g, dtype=torch.float64)
    y = m2 + s2 * torch.randn(5000, 1, generator=g, dtype=torch.float64)
    mean, std = metrics.kid(x, y, subsets=20, subset_size=1000)
    assert mean == pytest.approx(exact, rel=0.2) and std > 0  # the cubic kernel is heavy-tailed: a loose check
    assert metrics.kid(x, y, subsets=5, seed=3) == metrics.kid(x, y, subsets=5, seed=3)


def test_kid_on_the_whole_set_is_the_unbiased_mmd_by_hand():
    pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(2)
    d, n = 3, 300
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 0.3 + 1.2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = ((kxx.sum() - kxx.trace()) + (kyy.sum() - kyy.trace())) / (n * (n - 1)) - 2 * kxy.mean()
    mean, std = metrics.kid(x, y, subsets=1, subset_size=n)
    assert mean == pytest.approx(float(mmd), rel=1e-9) and std == 0


def test_digits_ground_truth_by_hand():
    from fastnabla.digits import ground_truth

    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0], [1.0, 1.0]])
    log_r = torch.tensor([0.0, math.log(2.0), math.log(2.0), math.log(4.0)])
    gt = ground_truth({"logits": logits, "features": feats}, log_r, beta=1.0, num_classes=3)
    w = torch.tensor([1.0, 2.0, 2.0, 4.0], dtype=torch.float64) / 9
    assert gt["class_histogram"] == pytest.approx([1 / 9, 4 / 9, 4 / 9])
    assert gt["mean_log_r"] == pytest.approx(float((w * log_r.double()).sum()))
    m = float((w * log_r.double()).sum())
    assert gt["mean_log_r_se"] == pytest.approx(float((w**2 * (log_r.double() - m) ** 2).sum().sqrt()))
    assert gt["mean_log_r_share_per_class"] == pytest.approx([0.0, 4 / 9 * math.log(2), 4 / 9 * math.log(4)])
    assert gt["ess"] == pytest.approx(1 / float((w**2).sum()))
    assert gt["log_z"] == pytest.approx(math.log(9 / 4))  # mean R = (1 + 2 + 2 + 4)/4
    assert gt["kl_to_reference"] == pytest.approx(float((w * log_r.double()).sum()) - math.log(9 / 4))
    assert gt["diversity_per_class"] == {1: pytest.approx(3.0)}  # the one class with two samples: ‖(3, 0)‖
    # the unweighted draw against real labels [0, 0, 1, 2]: (1/4, 2/4, 1/4) against (2/4, 1/4, 1/4)
    gt = ground_truth({"logits": logits, "features": feats}, log_r, beta=1.0, num_classes=3,
                      real_labels=torch.tensor([0, 0, 1, 2]))
    assert gt["reference"]["class_histogram"] == pytest.approx([0.25, 0.5, 0.25])
    assert gt["reference"]["class_tv_to_real"] == pytest.approx(0.25)


def test_diversity_ratio_per_class_by_hand():
    # the target keeps classes 0 and 1 (class 2 is under 2 %); the model lost class 1 (counts 0) and has a class 3
    # the target does not keep
    tgt = {"diversity_per_class": {0: 10.0, 1: 20.0, 2: 5.0}, "class_histogram": [0.5, 0.49, 0.01, 0.0]}
    assert metrics.diversity_ratio_per_class({0: 9.0, 2: 5.0, 3: 1.0}, tgt) == {0: pytest.approx(0.9), 1: 0.0}
    assert metrics.diversity_ratio_per_class({0: 9.0}, tgt, min_mass=0.005) == {0: pytest.approx(0.9), 1: 0.0,
                                                                              2: 0.0}


def test_prior_preservation_is_the_per_group_mean():
    pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(4)
    a = torch.randn(300, 3, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(300, 3, generator=g, dtype=torch.float64)
    groups = ["cat"] * 100 + ["dog"] * 200
    pp = metrics.prior_preservation(a, b, groups, kid_subsets=5)
    f_cat, f_dog = metrics.fid(a[:100], b[:100]), metrics.fid(a[100:], b[100:])
    assert pp["per_group"]["cat"]["fid"] == pytest.approx(f_cat) and pp["per_group"]["dog"]["fid"] == pytest.approx(f_dog)
    assert pp["fid"] == pytest.approx((f_cat + f_dog) / 2)
    assert pp["kid"] == pytest.approx((metrics.kid(a[:100], b[:100], 5)[0] + metrics.kid(a[100:], b[100:], 5)[0]) / 2)
    assert metrics.prior_preservation(a, b, kid_subsets=5)["fid"] == pytest.approx(metrics.fid(a, b))
