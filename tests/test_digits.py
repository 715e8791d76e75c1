"""The digits benchmark: data, the cached p_ref samples, and a 2-epoch run of a tiny on-the-fly pixel model through
the Trainer with every digits output (samples, summary, plots)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from fastnabla.backbones.pixel import SCHEDULER_CONFIG, PixelBackbone, build_unet
from fastnabla.config import load_config
from fastnabla.rewards.digits import DigitClassifier, DigitClassReward
from fastnabla.transitions import make_scheduler



pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py

def _tiny(num_steps=4, eta=1.0):
    torch.manual_seed(0)
    sched = make_scheduler("ddim", SCHEDULER_CONFIG, num_steps)
    bb = PixelBackbone(build_unet(8, [8, 16]), sched, lora_rank=2, flow_channels=[8, 16], eta=eta,
                       lora_target_modules=["to_q", "to_v", "conv1"])
    return bb, DigitClassifier(8, width=8, features=16).eval()


def test_digit_data_and_split():
    pytest.importorskip("sklearn")
    from fastnabla.digits import _shift, load_digit_data, split_indices

    x, y = load_digit_data(8)
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0 and set(y.tolist()) == set(range(10))
    x16, _ = load_digit_data(16)
    assert x16.shape == (1797, 1, 16, 16) and float(x16.min()) >= -1 and float(x16.max()) <= 1
    tr, te = split_indices(1797)
    assert len(te) == 359 and len(set(tr.tolist()) | set(te.tolist())) == 1797
    one = torch.full((64, 1, 8, 8), -1.0)
    one[:, 0, 4, 4] = 1.0
    moved = _shift(one, torch.Generator().manual_seed(0))
    where = (moved[:, 0] == 1).nonzero()[:, 1:]
    assert where.shape == (64, 2) and bool(((where - 4).abs() <= 1).all()) and len(torch.unique(where, dim=0)) == 9


def test_reference_samples_are_cached_and_keyed_by_the_sampler(tmp_path):
    from fastnabla.digits import reference_samples

    bb, clf = _tiny()
    a = reference_samples(bb, clf, 40, seed=1, batch=16, cache_dir=str(tmp_path), progress=False)
    files = os.listdir(tmp_path)
    assert a["images"].shape == (40, 1, 8, 8) and a["logits"].shape == (40, 10) and a["features"].shape == (40, 16)
    b = reference_samples(bb, clf, 40, seed=1, batch=16, cache_dir=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == files and torch.equal(a["images"], b["images"])
    # the policy's adapter does not change p_ref's samples; another sampler (η) is another cache entry
    with torch.no_grad():
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    c = reference_samples(bb, clf, 40, seed=1, batch=16, cache_dir=str(tmp_path), progress=False)
    assert torch.equal(a["images"], c["images"]) and os.listdir(tmp_path) == files
    bb2, _ = _tiny(eta=0.5)
    reference_samples(bb2, clf, 40, seed=1, batch=16, cache_dir=str(tmp_path), progress=False)
    assert len(os.listdir(tmp_path)) == 2
    # a full finetune of the same pretrained weights (frozen copy, no adapter) has the same reference: same entry
    torch.manual_seed(0)
    unet = build_unet(8, [8, 16])
    full = PixelBackbone(unet, bb.scheduler, lora_rank=0, flow_channels=[8, 16], eta=1.0)
    d = reference_samples(full, clf, 40, seed=1, batch=16, cache_dir=str(tmp_path), progress=False)
    assert len(os.listdir(tmp_path)) == 2 and torch.equal(a["images"], d["images"])


def test_two_epoch_digits_run_writes_every_output(tmp_path):
    pytest.importorskip("torchmetrics")
    from fastnabla.trainer import build_trainer

    bb, clf = _tiny()
    cfg_overrides = [
        "model.backbone=pixel", "model.flow_channels=[8,16]", "sampling.num_steps=4", "sampling.batch_size=8",
        "sampling.guidance_scale=1.0", "gfn.timestep_fraction=0.5", "train.epochs=2", "eval.every=1",
        "eval.num_samples=48", "eval.ground_truth_samples=96", "logging.progress=false", "checkpoint.every=0",
        f"model.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(None, cfg_overrides, output_dir=str(tmp_path / "run"))
    tr = build_trainer(cfg, backbone=bb, reward_fn=DigitClassReward([3, 5, 8], classifier=clf))
    res = tr.run()
    out = tmp_path / "run"
    fin, pre = np.load(out / "final_samples.npy"), np.load(out / "pretrained_samples.npy")
    assert fin.shape == pre.shape == (48, 1, 8, 8) and fin.min() >= -1 and fin.max() <= 1
    summary = json.loads((out / "summary.json").read_text())
    for key in ("class_histogram", "class_tv", "mean_log_r", "mean_log_r_gap", "diversity", "fid_pretrained",
                "kid_pretrained", "pretrained", "target", "classifier_test_accuracy"):
        assert key in summary, key
    tgt = summary["target"]
    assert tgt["num_samples"] == 96 and 1 <= tgt["ess"] <= 96 and sum(tgt["class_histogram"]) == pytest.approx(1)
    # the TV is recomputed from the reported histograms, and the pretrained samples are p_ref's at the same seeds
    assert summary["class_tv"] == pytest.approx(
        0.5 * sum(abs(a - b) for a, b in zip(summary["class_histogram"], tgt["class_histogram"])), abs=1e-3)
    # the gap split by class: each side's shares sum to its mean log R, so the split sums to the gap
    assert sum(summary["mean_log_r_share_per_class"]) == pytest.approx(summary["mean_log_r"], abs=1e-6)
    assert sum(tgt["mean_log_r_share_per_class"]) == pytest.approx(tgt["mean_log_r"], abs=1e-6)
    assert sum(summary["mean_log_r_gap_per_class"]) == pytest.approx(summary["mean_log_r_gap"], abs=1e-6)
    # the gap's standard error combines the model's draw (n = 48) and the target's importance-sampled one
    assert summary["mean_log_r_gap_se"] == pytest.approx(math.hypot(summary["mean_log_r_se"], tgt["mean_log_r_se"]))
    assert summary["mean_log_r_se"] == pytest.approx(summary["eval_reward_std"] * math.sqrt(47 / 48) / math.sqrt(48),
                                                     rel=1e-4)
    # each diversity ratio's error: both sides' (the model's 48 samples, the target's weighted draw) combined
    assert summary["diversity_ratio_per_class"]
    for c, r in summary["diversity_ratio_per_class"].items():
        if c not in summary["diversity_per_class"]:  # a class the model lost (fewer than 2 samples): 0 and 0
            assert r == 0 and summary["diversity_ratio_se_per_class"][c] == 0
            continue
        m, t = summary["diversity_per_class"][c], tgt["diversity_per_class"][c]
        assert summary["diversity_ratio_se_per_class"][c] == pytest.approx(
            r * math.hypot(summary["diversity_per_class_se"][c] / m, tgt["diversity_per_class_se"][c] / t))
    with bb.reference_sampling():
        again, _ = tr.sample_final(48, seed=cfg.seed + 7919)
    np.testing.assert_allclose(pre, again.clamp(-1, 1).numpy(), atol=1e-6)
    # the pretrained → finetuned class table pairs the two same-seed draws: its margins are their histograms
    moves = np.array(summary["class_transitions"])
    np.testing.assert_allclose(moves.sum(1) / 48, summary["pretrained"]["class_histogram"], atol=1e-4)
    np.testing.assert_allclose(moves.sum(0) / 48, summary["class_histogram"], atol=1e-4)
    # benchmarks/digits_class_transitions.py reads the table back, or recomputes it from the two .npy files (older
    # runs lack the key): a "finetuned" draw identical to the pretrained one gives a diagonal table
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("digits_class_transitions", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "digits_class_transitions.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    np.testing.assert_array_equal(bench.run_table(str(out))[0], moves)
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(out / "pretrained_samples.npy", same / "pretrained_samples.npy")
    shutil.copy(out / "pretrained_samples.npy", same / "final_samples.npy")
    (same / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "class_transitions"}))
    diag = bench.run_table(str(same), classifier=clf)[0]
    assert diag.sum() == 48 and np.count_nonzero(diag - np.diag(np.diag(diag))) == 0
    # benchmarks/digits_policy_steps.py: a cut above every timestep is the run's own evaluation; a cut at the last
    # timestep leaves the policy one step, and the method's own setting comes back afterwards
    spec = importlib.util.spec_from_file_location("digits_policy_steps", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "digits_policy_steps.py"))
    steps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(steps)
    ts = [int(t) for t in bb.scheduler.timesteps]
    rows = steps.policy_steps(tr, [10_000, ts[-1], ts[-1] - 1], [0, ts[0], ts[0] + 1])
    assert [r["policy_steps"] for r in rows] == [4, 1, 4, 1]
    assert (tr.method.policy_from, tr.method.policy_to) == (0, None)  # the method's own range comes back
    assert rows[2]["class_tv"] == rows[0]["class_tv"] and rows[2]["mean_log_r_gap"] == rows[0]["mean_log_r_gap"]
    assert rows[0]["class_tv"] == pytest.approx(summary["class_tv"], abs=1e-4)
    assert rows[0]["mean_log_r_gap"] == pytest.approx(summary["mean_log_r_gap"], abs=1e-4)
    # benchmarks/digits_path_kl.py: the finished policy's per-step KL, and the pretrained model's own bound (its KL is 0)
    spec = importlib.util.spec_from_file_location("digits_path_kl", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "digits_path_kl.py"))
    pk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pk)
    r = pk.path_kl_of(tr, 16)
    assert [s[0] for s in r["steps"]] == ts and r["kl_path"] == pytest.approx(sum(s[2] for s in r["steps"]))
    assert r["kl_path"] > 0 and r["log_z"] == tgt["log_z"]
    assert r["elbo_gap"] == pytest.approx(r["log_z"] - r["beta_log_r"] + r["kl_path"])
    for png in ("samples_grid.png", "class_histogram.png", "class_transitions.png", "curves.png", "report_curves.png"):
        assert (out / png).stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "class-histogram TV" in page and "Where each pretrained class went" in page
    met = summary["targets_met"]
    assert met["class_tv"] == summary["class_tv"] and met["class_tv_ok"] == (summary["class_tv"] <= 0.05)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and "class_tv_batch" in lines[0] and "fid_pretrained" in lines[0]
    # each epoch's trajectories: their KL to the reference (the first from the untrained policy, the reference itself)
    # and the evidence bound log Z − β·mean log R + KL on KL(P_θ‖P*)
    assert lines[0]["kl_path_batch"] == pytest.approx(0.0, abs=1e-9) and lines[1]["kl_path_batch"] > 1e-6
    for rec in lines:
        assert rec["kl_target_bound_batch"] == pytest.approx(
            tgt["log_z"] - cfg.gfn.reward_scale * rec["reward_mean"] + rec["kl_path_batch"], rel=1e-6)
    assert tgt["kl_to_reference"] >= 0
    assert res["eval_reward_mean"] == pytest.approx(summary["mean_log_r"])
    # the target belongs to p_ref and its sampler: a run with another seed reuses the cached draw, same target
    draws = sorted((tmp_path / "cache").glob("refsamples-*.npz"))
    assert len(draws) == 1
    cfg2 = load_config(None, [*cfg_overrides, "seed=1", "train.epochs=1"], output_dir=str(tmp_path / "run1"))
    build_trainer(cfg2, backbone=bb, reward_fn=DigitClassReward([3, 5, 8], classifier=clf)).run()
    assert sorted((tmp_path / "cache").glob("refsamples-*.npz")) == draws
    assert json.loads((tmp_path / "run1" / "summary.json").read_text())["target"] == tgt


def test_class_conditional_run_uses_digit_prompts(tmp_path):
    pytest.importorskip("torchmetrics")
    from fastnabla.trainer import build_trainer

    torch.manual_seed(0)
    sched = make_scheduler("ddim", SCHEDULER_CONFIG, 2)
    bb = PixelBackbone(build_unet(8, [8, 16], num_classes=10), sched, lora_rank=2, flow_channels=[8, 16],
                       guidance_scale=2.0, lora_target_modules=["to_q", "to_v"])
    cfg = load_config(None, [
        "model.backbone=pixel", "model.class_conditional=true", "model.flow_channels=[8,16]", "prompts.train=digits",
        "sampling.num_steps=2", "sampling.batch_size=8", "sampling.guidance_scale=2.0", "gfn.timestep_fraction=0.5",
        "train.epochs=1", "eval.every=0", "eval.num_samples=40", "eval.ground_truth_samples=0",
        "logging.progress=false", "logging.plots=false", "checkpoint.every=0", f"model.cache_dir={tmp_path / 'c'}"],
        output_dir=str(tmp_path / "run"))
    tr = build_trainer(cfg, backbone=bb, reward_fn=DigitClassReward(3, classifier=DigitClassifier(8, 8, 16).eval()))
    assert set(tr.prompts.sample(50, torch.Generator().manual_seed(0))) <= set("0123456789")
    res = tr.run()
    assert "class_tv" not in res and "fid_pretrained_per_prompt" in res and math.isfinite(res["kid_pretrained_per_prompt"])
