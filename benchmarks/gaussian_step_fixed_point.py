"""One sampling step against a sharp tilt: the fixed point of the policy's regression on its own returns, against
the exact tilted kernel.

    python benchmarks/gaussian_step_fixed_point.py

One step of the reference is x' ~ N(0, σ²) (σ = 1), and the tilt ahead of it is h(x') = sigmoid(a·x'/σ): a class
boundary at 0 that the next states' h crosses within a width σ/a. The exact tilted kernel p*(x') ∝ N(x'; 0, 1)·h(x')
is not Gaussian. The policy of ``gfn.policy_target: return`` keeps σ and shifts the mean by d (in σ units), and its
regression on the returns has the fixed point d = E_{x'~N(d, 1)}[∇log h(x')] (the returns' conditional mean when the
policy ahead is exact): the reverse-KL-best mean shift. For each sharpness a the script finds that fixed point by
bisection on a fine grid, and reports the mass each puts on the wrong side x' < 0 ("leak"), the exact kernel's mean,
and the slope of the map d → E_{N(d, 1)}[∇log h]. A slope below −1 makes the plain iteration (regress, resample,
regress) overshoot and swing instead of settling; only a step smaller than 2/(1 − slope) of the way converges.
Rows go to ``benchmarks/results/gaussian_step_fixed_point.csv``.
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import write_rows  # noqa: E402


def analyse(a: float, x: torch.Tensor) -> dict:
    dx = float(x[1] - x[0])
    phi = lambda m: torch.exp(-0.5 * (x - m) ** 2) / (2 * torch.pi) ** 0.5  # noqa: E731
    grad_log_h = a * torch.sigmoid(-a * x)

    def regression_mean(d: float) -> float:
        return float((phi(d) * grad_log_h).sum() * dx)

    lo, hi = 0.0, 50.0  # regression_mean(d) − d falls from > 0 at d = 0 to < 0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if regression_mean(mid) > mid else (lo, mid)
    d = 0.5 * (lo + hi)
    p = phi(0.0) * torch.sigmoid(a * x)
    p = p / (p.sum() * dx)
    eps = 1e-4
    return dict(sharpness=a, fixed_point_shift=round(d, 4),
                fixed_point_leak=round(float((phi(d) * (x < 0)).sum() * dx), 5),
                exact_leak=round(float((p * (x < 0)).sum() * dx), 5),
                exact_mean_shift=round(float((p * x).sum() * dx), 4),
                map_slope=round((regression_mean(d + eps) - regression_mean(d - eps)) / (2 * eps), 3))


def main() -> int:
    x = torch.linspace(-14, 14, 400001, dtype=torch.float64)
    rows = [analyse(a, x) for a in (1.0, 3.0, 10.0, 30.0, 100.0)]
    for r in rows:
        print(f"sharpness {r['sharpness']:>5}: fixed point d = {r['fixed_point_shift']}σ leaks {r['fixed_point_leak']}"
              f"; the exact kernel leaks {r['exact_leak']} (mean {r['exact_mean_shift']}σ); map slope "
              f"{r['map_slope']}")
    path = os.path.join(ROOT, "benchmarks", "results", "gaussian_step_fixed_point.csv")
    write_rows(path, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
