"""benchmarks/common.py: the shared CSV writer, commit hash and scale parser of the benchmark scripts."""
import argparse
import csv
import math
import os
import re

import pytest
import torch

from benchmarks.common import git_sha, parse_scales, write_rows


def test_write_rows_round_trip_in_first_row_order(tmp_path):
    rows = [dict(b=1, a="x"), dict(b=2.5, a="y, z")]
    path = write_rows(str(tmp_path / "sub" / "t.csv"), rows)
    with open(path, newline="") as f:
        r = csv.reader(f)
        assert next(r) == ["b", "a"]
        assert list(r) == [["1", "x"], ["2.5", "y, z"]]
    with pytest.raises(ValueError, match="no rows to write"):
        write_rows(str(tmp_path / "e.csv"), [])


def test_git_sha_is_a_short_hash_or_empty(monkeypatch):
    monkeypatch.delenv("FASTNABLA_GIT_SHA", raising=False)
    assert re.fullmatch(r"([0-9a-f]{7,40})?", git_sha())


def test_git_sha_takes_the_sha_a_copied_tree_was_prepared_at(monkeypatch):
    monkeypatch.setenv("FASTNABLA_GIT_SHA", "abc1234")  # gpu_suite.sh sets it from .whl/GIT_SHA
    assert git_sha() == "abc1234"


def test_the_digits_reports_record_the_same_commit(monkeypatch):
    from fastnabla.digits import environment

    monkeypatch.setenv("FASTNABLA_GIT_SHA", "abc1234")
    assert environment()["git_sha"] == "abc1234"
    monkeypatch.delenv("FASTNABLA_GIT_SHA")
    sha = environment()["git_sha"]
    assert sha is None or (re.fullmatch(r"[0-9a-f]{40}", sha) and sha.startswith(git_sha()))


def test_parse_scales_reads_positive_numbers_and_exits_2_on_anything_else(capsys):
    ap = argparse.ArgumentParser(prog="bench")
    assert parse_scales(ap, "1,1.5,2") == [1.0, 1.5, 2.0]
    for bad, says in (("1,x", "must be comma-separated numbers"), ("1,0", "every scale must be > 0")):
        with pytest.raises(SystemExit) as e:
            parse_scales(ap, bad)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_returns_branch_variance_split_against_a_closed_form():
    """benchmarks/digits_returns_branch.py: G = m_i + noise with known spreads; the split recovers Var(m) and the
    noise, and a predictor equal to m explains all of Var(m), one equal to the mean push none."""
    from benchmarks import digits_returns_branch as bench

    g = torch.Generator().manual_seed(0)
    n, M, P = 4000, 6, 3
    m = 2.0 * torch.randn(n, P, generator=g) + torch.tensor([1.0, 0.0, -1.0])  # Var(m) = 3·4 = 12 over pixels
    G = m[:, None] + 0.5 * torch.randn(n, M, P, generator=g)  # noise: 3·0.25 = 0.75
    out = bench.variance_split(G, m)
    assert out["between"] == pytest.approx(12.0, rel=0.05) and out["within"] == pytest.approx(0.75, rel=0.03)
    assert out["learnable"] == pytest.approx(12 / 12.75, rel=0.01) and 0 < out["between_se"] < 0.6
    assert out["explained_by_d"] == pytest.approx(1.0, abs=0.01) and out["cos_mean"] == pytest.approx(1.0, abs=1e-3)
    flat = bench.variance_split(G, m.mean(0).expand(n, P))
    assert flat["explained_by_d"] == pytest.approx(0.0, abs=0.02)
    # a feature a·f + b: the conditional mean itself at another scale explains all of it, an unrelated one nothing
    feat = bench.variance_split(G, f=2.0 * m + 3.0)
    assert feat["explained_by_f"] == pytest.approx(1.0, abs=0.01) and feat["f_scale"] == pytest.approx(0.5, rel=0.01)
    assert bench.variance_split(G, f=torch.randn(n, P, generator=g))["explained_by_f"] == pytest.approx(0.0, abs=0.02)
    with pytest.raises(ValueError, match="≥ 2 branches"):
        bench.variance_split(G[:, :1])


def test_digits_eval_figures_rounds_and_takes_the_lowest_diversity_ratio():
    from benchmarks.common import digits_eval_figures, digits_figures_line

    ev = {"class_tv": 0.123456, "mean_log_r_gap": -0.98765, "diversity_ratio_per_class": {8: 1.02, 3: 0.95, 5: 0.87},
          "class_histogram": [0.5, 0.25, 0.25]}
    row = digits_eval_figures(ev)
    assert row == {"class_tv": 0.1235, "mean_log_r_gap": -0.9877, "min_diversity_ratio": 0.87,
                   "diversity_ratios": "3:0.950 5:0.870 8:1.020", "class_histogram": "0.500 0.250 0.250"}
    # a summary.json read back has its classes as strings: the same cell, in the classes' order
    back = digits_eval_figures({**ev, "diversity_ratio_per_class": {"8": 1.02, "10": 0.9, "3": 0.95}})
    assert back["diversity_ratios"] == "3:0.950 8:1.020 10:0.900"
    empty = digits_eval_figures({**ev, "diversity_ratio_per_class": {}})
    assert empty["min_diversity_ratio"] == "" and empty["diversity_ratios"] == ""
    assert digits_figures_line(row) == ("class TV 0.1235, mean log R gap -0.9877, min diversity ratio 0.87 "
                                        "(3:0.950 5:0.870 8:1.020)  [0.500 0.250 0.250]")


def test_gap_by_class_names_a_directory_that_is_not_a_finished_run(tmp_path, capsys):
    from benchmarks.digits_gap_by_class import main

    (tmp_path / "config.yaml").write_text("seed: 0\n")  # a config but no samples
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--name", "x"])
    assert e.value.code == 2 and "no final_samples.npy" in capsys.readouterr().err


def test_value_tail_refuses_a_draw_too_small_to_rank(capsys):
    from benchmarks.digits_value_tail import main

    with pytest.raises(SystemExit) as e:
        main(["c3b05", "--trajectories", "4"])
    assert e.value.code == 2 and "at least 16 trajectories" in capsys.readouterr().err


def test_reeval_band_split_by_hand_and_its_bad_input(tmp_path, capsys):
    from benchmarks.digits_reeval import band_split, main

    log_r = torch.tensor([0.0, -0.05, -0.5, -2.0, -4.0, -7.0, -12.0, -20.0])
    bands = band_split(log_r)
    assert list(bands) == ["0to0.1", "0.1to1", "1to3", "3to5", "5to10", "le10"]
    assert [m for m, _ in bands.values()] == pytest.approx([2 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 8, 2 / 8])
    assert bands["le10"][1] == pytest.approx(-32 / 8) and bands["0to0.1"][1] == pytest.approx(-0.05 / 8)
    assert sum(s for _, s in bands.values()) == pytest.approx(float(log_r.mean()))
    # weighted: the shares sum to the weighted mean
    w = torch.arange(1.0, 9.0)
    assert sum(s for _, s in band_split(log_r, w).values()) == pytest.approx(float((w * log_r).sum() / w.sum()))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--name", "x", "--seeds", "1,a"])
    assert e.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--name", "x"])  # not a run directory
    assert e.value.code == 2 and "no config.yaml" in capsys.readouterr().err


def test_class_bands_by_hand_and_its_bad_input(tmp_path, capsys):
    from benchmarks.digits_class_bands import EDGES, class_band_rows, main

    assert EDGES == (0.0, -3.0, -6.0, -10.0, -15.0)
    log_r = torch.tensor([-1.0, -2.0, -4.0, -20.0, -30.0, -1.0])
    pred = torch.tensor([8, 8, 8, 8, 8, 3])  # the last sample is another class: left out
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0], [1.0, 0.0], [1.0, 2.0], [50.0, 50.0]])
    rows = {r["band"]: r for r in class_band_rows("run", 8, log_r, pred, feats)}
    assert list(rows) == ["0to3", "3to6", "6to10", "10to15", "le15"]
    assert [rows[b]["n"] for b in rows] == [2, 1, 0, 0, 2]
    assert [rows[b]["share"] for b in rows] == [0.4, 0.2, 0.0, 0.0, 0.4]
    assert rows["0to3"]["diversity"] == 5.0 and rows["le15"]["diversity"] == 2.0
    assert math.isnan(rows["0to3"]["diversity_se"])  # two samples: no error to give
    assert math.isnan(rows["3to6"]["diversity"])  # one sample: no pair
    # weighted: the shares are the weights' (1, 1, 2 | 4 | 2 over class 8's 10)
    w = torch.tensor([1.0, 1.0, 4.0, 2.0, 2.0, 100.0])
    rows_w = {r["band"]: r for r in class_band_rows("target", 8, log_r, pred, feats, w)}
    assert rows_w["0to3"]["share"] == 0.2 and rows_w["3to6"]["share"] == 0.4 and rows_w["le15"]["share"] == 0.4
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--name", "x"])  # not a run directory
    assert e.value.code == 2 and "no final_samples.npy" in capsys.readouterr().err
