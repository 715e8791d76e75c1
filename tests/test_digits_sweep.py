"""benchmarks/digits_sweep.py: reading a run directory back (evaluation curve, fresh-batch window, verdict)."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "digits_sweep.py")


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("digits_sweep", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(d, hist, summary=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def test_collect_and_verdict_by_hand(sweep, tmp_path):
    # 10 updates per epoch: the 30-update window averages the last three epochs
    hist = [{"epoch": e, "updates_total": 10 * (e + 1), "class_tv_batch": tv, "reward_mean": -float(e),
             "seconds": 2.0} for e, tv in enumerate([0.6, 0.5, 0.4, 0.3])]
    hist[1].update(class_tv=0.45, mean_log_r_gap=-2.0, diversity_ratio_per_class={"3": 0.97, "8": 0.92},
                   fid_pretrained=5.0, mean_log_r=-2.1)
    final = {"class_tv": 0.04, "mean_log_r_gap": 0.09, "diversity_ratio_per_class": {"3": 0.95, "5": 0.91},
             "fid_pretrained": 9.0, "mean_log_r": -0.05}
    _write(tmp_path / "run", hist, final)
    r = sweep.collect(str(tmp_path / "run"), "x", ["a=1"], None)
    assert r["curve"] == [(20, 0.45, -2.0, 0.92, 5.0, -2.1), (40, 0.04, 0.09, 0.91, 9.0, -0.05)]
    assert r["batch"][-1] == pytest.approx((40, (0.5 + 0.4 + 0.3) / 3, (-1 - 2 - 3) / 3))
    assert r["batch"][0] == pytest.approx((10, 0.6, 0.0)) and r["train_seconds"] == 8.0
    assert sweep.verdict(r).startswith("PASS")
    for bad in ({"class_tv": 0.051}, {"mean_log_r_gap": -0.11}, {"diversity_ratio_per_class": {"3": 0.89}}):
        _write(tmp_path / "bad", hist, dict(final, **bad))
        assert sweep.verdict(sweep.collect(str(tmp_path / "bad"), "x", [], None)).startswith("FAIL"), bad


def test_unfinished_and_missing_runs(sweep, tmp_path):
    _write(tmp_path / "stopped", [{"epoch": 0, "updates_total": 3, "class_tv_batch": 0.7, "reward_mean": -9.0}])
    r = sweep.collect(str(tmp_path / "stopped"), "x", [], None)
    assert not r["finished"] and r["curve"] == [] and sweep.verdict(r) == "UNFINISHED (stopped after 3 updates)"
    assert "error" in sweep.collect(str(tmp_path / "nothing"), "x", [], None)
    assert sweep.main(["c358", "--only", "no_such_variant"]) == 2


def test_seeds_label_runs_and_average_finals(sweep, tmp_path):
    assert sweep.label("shipped", 0) == "shipped" and sweep.label("shipped", 1) == "shipped_seed1"
    hist = [{"epoch": 0, "updates_total": 3, "class_tv_batch": 0.5, "reward_mean": -1.0}]
    finals = {0: (0.06, -0.3, 0.9), 1: (0.16, -0.2, 0.8)}
    results = []
    for seed, (tv, gap, div) in finals.items():
        d = tmp_path / f"c358_{sweep.label('shipped', seed)}"
        _write(d, hist, {"class_tv": tv, "mean_log_r_gap": gap, "diversity_ratio_per_class": {"3": div}})
        results.append(dict(sweep.collect(str(d), sweep.label("shipped", seed), [], None), variant="shipped"))
    _write(tmp_path / "stopped", hist)  # an unfinished run does not enter the mean
    results.append(dict(sweep.collect(str(tmp_path / "stopped"), "shipped_seed2", [], None), variant="shipped"))
    k, tv, gap, div = sweep.seed_means(results)["shipped"]
    assert k == 2 and (tv, gap, div) == pytest.approx((0.11, -0.25, 0.85))
    assert sweep.main(["c358", "--only", "shipped", "--seeds", "0,x"]) == 2


def test_returns_snr_state_stats_by_hand():
    import torch

    spec = importlib.util.spec_from_file_location(
        "digits_returns_snr", os.path.join(os.path.dirname(_PATH), "digits_returns_snr.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # two samples, two pixels: G = [[1, 0], [3, 0]] → mean (2, 0), Σ var = ((1−2)² + (3−2)²)/(2−1) = 2
    G = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    zero = torch.zeros_like(G)
    s = mod.state_stats(G, zero, zero)
    assert s["norm_G"] == pytest.approx(2.0) and s["norm_mean_G"] == pytest.approx(2.0)
    assert s["explained_flow_plus_r"] == pytest.approx(1 - 5.0 / 2)  # E‖G − 0‖² = (1 + 9)/2 = 5
    exact = mod.state_stats(G, G / 2, G / 2)  # g + r = G
    assert exact["explained_flow_plus_r"] == pytest.approx(1.0) and exact["explained_r_only"] == pytest.approx(1 - 1.25 / 2)
    mean = mod.state_stats(G, zero, torch.tensor([[2.0, 0.0], [2.0, 0.0]]))  # the batch mean: E‖G − m‖² = 1 = ½·Σvar
    assert mean["explained_flow_plus_r"] == pytest.approx(0.5) and mean["cos_mean"] == pytest.approx(1.0)


def test_verdict_is_on_the_pooled_evaluation_when_there_is_one(sweep, tmp_path):
    hist = [{"epoch": 0, "updates_total": 3, "class_tv_batch": 0.5, "reward_mean": -1.0}]
    _write(tmp_path / "run", hist, {"class_tv": 0.04, "mean_log_r_gap": -0.155,
                                    "diversity_ratio_per_class": {"3": 0.95}})
    r = sweep.collect(str(tmp_path / "run"), "x", [], None)
    assert sweep.verdict(r).startswith("FAIL (the run's own evaluation")  # its own draw's gap misses
    r.update(pooled=(0.017, -0.085, 0.024, 0.915), pool_seeds=(7919, 7920, 101))
    assert sweep.verdict(r).startswith("PASS (pooled over 3 draws")
    r["pooled"] = (0.017, -0.085, 0.024, 0.892)  # the pooled draws' smallest diversity ratio under the bar
    assert "FAIL" in sweep.verdict(r) and "min diversity ratio 0.892" in sweep.verdict(r)


def test_pool_reports_a_directory_that_is_not_a_finished_run(sweep, tmp_path, capsys):
    out = sweep.pool(str(tmp_path / "nothing"), "x", (7919,))
    assert set(out) == {"pool_error"} and "config.yaml" in out["pool_error"]
    assert sweep.main(["c358", "--only", "shipped", "--pool-seeds", "7919,x"]) == 2
    assert "--pool-seeds" in capsys.readouterr().err


def test_write_adds_the_pooled_row_apart_from_the_curve(sweep, tmp_path, monkeypatch):
    import csv

    monkeypatch.setattr(sweep, "ROOT", str(tmp_path))
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    hist = [{"epoch": 0, "updates_total": 3, "class_tv_batch": 0.5, "reward_mean": -1.0}]
    _write(tmp_path / "run", hist, {"class_tv": 0.04, "mean_log_r_gap": -0.155,
                                    "diversity_ratio_per_class": {"3": 0.95}})
    r = dict(sweep.collect(str(tmp_path / "run"), "x", ["a=1"], 5.0), variant="x", seed=0,
             pooled=(0.017, -0.085, 0.024, 0.915), pool_seeds=(7919, 7920, 101))
    r["verdict"] = sweep.verdict(r)
    stem = sweep.write([r], "c3b05", "_t", [])
    rows = list(csv.DictReader(open(stem + ".csv")))
    assert [(w["evaluation"], w["updates"], w["class_tv"], w["mean_log_r_gap"], w["verdict"]) for w in rows] == [
        ("own", "3", "0.0400", "-0.1550", "PASS"), ("pooled 7919,7920,101", "3", "0.0170", "-0.0850", "PASS")]
