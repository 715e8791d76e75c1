"""The importance-sampled targets of the digits benchmark's rewards, from the cached p_ref samples.

    python benchmarks/digits_ground_truth.py            # after `make digits` (or any digits run) has drawn them

For each (reward, β) of the issue's targets: the target's class histogram, mean log R, diversity (overall and per
class, importance-weighted) and effective sample size, written to benchmarks/results/digits_ground_truth.json.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastnabla import digits  # noqa: E402
from fastnabla.backbones.pixel import PixelBackbone  # noqa: E402
from fastnabla.config import load_config  # noqa: E402
from fastnabla.rewards import build_reward  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = [("digit_class", {"classes": [3, 5, 8]}, 1.0), ("digit_class", {"classes": 3}, 0.5),
           ("digit_ink", {"scale": 10.0}, 1.0)]


def main() -> int:
    torch.set_num_threads(1)
    cfg = load_config(os.path.join(ROOT, "configs", "digits.yaml"), ["logging.progress=false"])
    bb = PixelBackbone.from_config(cfg)
    clf, meta = digits.ensure_classifier(cfg.model.image_size, cfg.model.cache_dir, False)
    t0 = time.time()
    ref = digits.reference_samples(bb, clf, cfg.eval.ground_truth_samples, batch=digits.target_draw_batch(cfg),
                                   cache_dir=cfg.model.cache_dir, progress=True)
    sample_s = time.time() - t0
    images01 = bb.decode(ref["images"])
    out = dict(environment=digits.environment(), num_samples=len(images01), sampling_or_cache_load_s=round(sample_s, 1),
               sampler=dict(scheduler=cfg.sampling.scheduler, num_steps=cfg.sampling.num_steps, eta=cfg.sampling.eta,
                            guidance_scale=cfg.sampling.guidance_scale),
               classifier_test_accuracy=meta["test_accuracy"], targets=[])
    for name, opts, beta in TARGETS:
        r = build_reward(name, dict(opts, classifier=clf) if name == "digit_class" else opts)
        with torch.no_grad():
            log_r = torch.cat([r(images01[s:s + 4096], None, None)[0] for s in range(0, len(images01), 4096)])
        gt = digits.ground_truth(ref, log_r, beta)
        gt.update(reward=name, options=opts, prior_mean_log_r=float(log_r.mean()))
        out["targets"].append(gt)
        print(name, opts, beta, "ESS", round(gt["ess"]), "hist", [round(v, 3) for v in gt["class_histogram"]],
              "mean log R", round(gt["mean_log_r"], 4))
    path = os.path.join(ROOT, "benchmarks", "results", "digits_ground_truth.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
