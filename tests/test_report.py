"""fastnabla.report: the issue's three checks against hand-computed cases, and the self-contained HTML page."""
import base64
import json

import pytest

from fastnabla import report


def _summary(tv=0.04, gap=-0.05, ratios=None):
    tgt_hist = [0.0, 0.0, 0.0, 0.5, 0.0, 0.25, 0.0, 0.0, 0.25, 0.0]
    return {"class_tv": tv, "mean_log_r_gap": gap, "mean_log_r": -0.1 + gap,
            "diversity_ratio_per_class": {"3": 0.95, "5": 1.02, "8": 0.91} if ratios is None else ratios,
            "class_histogram": [0.0, 0.0, 0.0, 0.46, 0.0, 0.27, 0.0, 0.0, 0.27, 0.0], "diversity": 40.0,
            "fid_pretrained": 12.5, "kid_pretrained": 3.25, "num_samples": 64, "classifier_test_accuracy": 0.99,
            "pretrained": {"class_histogram": [0.1] * 10, "class_tv": 0.7, "mean_log_r": -9.0, "diversity": 50.0},
            "mean_log_r_share_per_class": [0.0, 0.0, 0.0, -0.02, 0.0, -0.05, 0.0, 0.0, -0.03 + gap, 0.0],
            "target": {"class_histogram": tgt_hist, "mean_log_r": -0.1, "diversity": 42.0, "ess": 1234.0,
                       "mean_log_r_share_per_class": [0.0, 0.0, 0.0, -0.02, 0.0, -0.05, 0.0, 0.0, -0.03, 0.0],
                       "num_samples": 5000, "beta": 1.0}}


def test_check_targets_by_hand():
    ok = report.check_targets(_summary())
    assert ok["all_ok"] and ok["min_diversity_ratio"] == 0.91
    # each bar on its own: TV just over 0.05, a gap of 0.11 nat in either direction, one class at 0.89
    assert not report.check_targets(_summary(tv=0.0501))["class_tv_ok"]
    assert not report.check_targets(_summary(gap=0.11))["mean_log_r_ok"]
    assert not report.check_targets(_summary(gap=-0.11))["mean_log_r_ok"]
    bad = report.check_targets(_summary(ratios={"3": 0.89, "5": 1.0}))
    assert not bad["diversity_ok"] and not bad["all_ok"] and bad["class_tv_ok"] and bad["mean_log_r_ok"]
    assert report.check_targets({"mean_log_r": -1.0}) is None  # no target in the run


def test_eval_series_starts_at_the_pretrained_model():
    history = [{"updates_total": 3}, {"updates_total": 6, "class_tv": 0.3, "fid_pretrained": 8.0},
               {"updates_total": 9}]
    s = _summary()
    assert report.eval_series(history, s, "class_tv") == ([0, 6, 9], [0.7, 0.3, 0.04])
    assert report.eval_series(history, s, "fid_pretrained") == ([0, 6, 9], [0.0, 8.0, 12.5])
    assert report.eval_series(history, {"class_tv": 0.2}, "class_tv") == ([6, 9], [0.3, 0.2])  # no pretrained


def test_write_report_embeds_pictures_and_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"epoch": e, "updates_total": 3 * (e + 1), "reward_mean": -5.0 + e, "class_tv_batch": 0.5 - 0.1 * e,
                "diversity_batch": 45.0} for e in range(4)]
    history[1].update(class_tv=0.3, mean_log_r=-3.0, diversity=44.0, fid_pretrained=8.0)
    (tmp_path / "samples_grid.png").write_bytes(b"\x89PNG fake grid")
    paths = report.write_report(str(tmp_path), history, _summary(),
                                {"reward": {"name": "digit_class", "options": {"classes": [3, 5, 8]}},
                                 "gfn": {"reward_scale": 1.0}})
    assert [p.rsplit("/", 1)[1] for p in paths] == ["report_curves.png", "report.html"]
    page = (tmp_path / "report.html").read_text()
    assert "digit_class" in page and "12 updates" in page and "1234" in page
    assert base64.b64encode(b"\x89PNG fake grid").decode() in page  # embedded, not linked
    assert "class_histogram.png was not drawn" in page  # a missing picture is said, not a broken link
    assert page.count("met:") == 3 and "not met" not in page
    assert "share of the mean log R" in page and "-0.05 0.00 0.00 -0.08" in page  # the finetuned shares, 5 to 8
    assert "± its standard error" in page and "(the two draws' standard error)" not in page  # no error: none shown
    s = _summary()
    assert "3: 0.95, 5: 1.02, 8: 0.91)" in page
    s.update(mean_log_r_se=0.04, mean_log_r_gap_se=0.05,
             diversity_ratio_se_per_class={"3": 0.021, "5": 0.03, "8": float("nan")})
    s["target"]["mean_log_r_se"] = 0.03
    report.write_report(str(tmp_path), history, s)
    page = (tmp_path / "report.html").read_text()
    assert "-0.150 ± 0.040" in page and "-0.100 ± 0.030" in page and "0.050 nat ± 0.050 (the two draws'" in page
    assert "3: 0.95 ± 0.02, 5: 1.02 ± 0.03, 8: 0.91)" in page  # a class of 2 samples has no error to show
    assert (tmp_path / "report_curves.png").stat().st_size > 1000


def test_report_cli_rebuilds_from_a_run_directory(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "updates_total": 2, "reward_mean": -1.0}) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps(_summary(tv=0.2)))
    (tmp_path / "pretrained.json").write_text(json.dumps({"quality": {"class_tv_to_real": 0.0421, "kid_heldout": 77.5,
                                                                      "num_samples": 2000}}))
    assert report.main([str(tmp_path)]) == 0
    assert "TV to the real data's 0.0421" in (tmp_path / "report.html").read_text()
    assert "pretrained samples behind the target" not in (tmp_path / "report.html").read_text()
    s = _summary(tv=0.2)
    s["target"]["reference"] = {"class_histogram": [0.1] * 10, "class_tv_to_real": 0.0486}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    assert report.main([str(tmp_path)]) == 0
    assert "The 5000 pretrained samples behind the target: class-histogram TV to the real data's 0.0486" in \
        (tmp_path / "report.html").read_text()
    assert "not met: class-histogram TV 0.200 (bar: ≤ 0.05)" in (tmp_path / "report.html").read_text()
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "not a finished run directory" in capsys.readouterr().err
