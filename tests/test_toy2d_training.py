"""toy2d end to end with the shipped config: training moves the samples toward the exact tilted target for
several rewards (three reward centers, β ∈ {0.5, 1, 2}), stays on the data manifold, and raises the reward.

The TV numbers of full-length runs live in benchmarks/results/toy2d_rewards_*.csv (benchmarks/toy2d_sweep.py);
this test runs a shortened schedule so the suite stays fast.
"""
import os

import pytest

from fastnabla.backbones.toy2d import total_variation
from fastnabla.config import load_config
from fastnabla.trainer import Trainer

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy2d.yaml")
CASES = [((1.0, 0.5), 1.0), ((-1.0, -1.5), 0.5), ((2.0, 2.0), 2.0)]


@pytest.mark.parametrize("center,beta", CASES)
def test_training_moves_toward_the_tilted_target(tmp_path, center, beta):
    cfg = load_config(CONFIG, [
        f"reward.center=[{center[0]},{center[1]}]", f"gfn.reward_scale={beta}", "train.epochs=500",
        "eval.every=0", "eval.num_samples=2048", "logging.progress=false", "logging.plots=false",
        "checkpoint.every=0"], output_dir=str(tmp_path))
    tr = Trainer(cfg)
    target = tr.backbone.target_weights(list(center), 1.0, beta)
    prior_samples, _ = tr.sample_final(4096, seed=123)
    prior_tv, _ = total_variation(prior_samples, tr.backbone.means, target)
    res = tr.run()
    assert res["off_manifold"] <= 0.02
    assert res["tv"] <= prior_tv - 0.04, (prior_tv, res["tv"])
    first = tr.history[0]["reward_mean"]
    assert res["eval_reward_mean"] > first
