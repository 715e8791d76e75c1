"""One page per digits run: ``report.html`` next to ``metrics.jsonl`` (issue 12, item 6).

The page holds the issue's three pictures and the numbers behind them:
- curves against updates (``report_curves.png``): mean log R, class-histogram TV to the importance-sampled target,
  diversity and FID against the pretrained samples; fresh training batches as thin lines, evaluations as dots
  (the pretrained model's value at update 0), the target's value (or bar) dashed;
- the pretrained and finetuned samples at the same seeds (``samples_grid.png``, drawn by ``metrics``);
- the class histogram against the target (``class_histogram.png``, drawn by ``metrics``);
- where each pretrained class went: the class of the finetuned sample at the same seed, row by row
  (``class_transitions.png``, drawn by ``metrics``);
- a table of target / pretrained / finetuned figures and the issue's three checks (``check_targets``).

Images are embedded (base64), so the page is one self-contained file. ``python -m fastnabla.report RUN_DIR``
rebuilds it from a finished run's files.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import sys
from typing import Optional

__all__ = ["TV_BAR", "GAP_BAR", "DIVERSITY_BAR", "check_targets", "eval_series", "plot_report_curves", "write_report",
           "main"]

#: the issue's bars: class-histogram TV, |mean log R − target's| (nat), within-class diversity / target's
TV_BAR, GAP_BAR, DIVERSITY_BAR = 0.05, 0.1, 0.9


def check_targets(summary: dict) -> Optional[dict]:
    """The issue's three checks on a digits evaluation (a ``summary.json`` or one eval record): class TV ≤ 0.05,
    |mean log R gap| ≤ 0.1 nat, and the smallest within-class diversity ratio (over the classes the target keeps)
    ≥ 0.9. None when the run has no importance-sampled target."""
    if "class_tv" not in summary:
        return None
    ratios = summary.get("diversity_ratio_per_class") or {}
    worst = min(ratios.values()) if ratios else float("nan")
    tv, gap = float(summary["class_tv"]), float(summary["mean_log_r_gap"])
    out = {"class_tv": tv, "class_tv_ok": tv <= TV_BAR, "mean_log_r_gap": gap, "mean_log_r_ok": abs(gap) <= GAP_BAR,
           "min_diversity_ratio": worst, "diversity_ok": bool(worst >= DIVERSITY_BAR)}
    out["all_ok"] = out["class_tv_ok"] and out["mean_log_r_ok"] and out["diversity_ok"]
    return out


def _series(history: list, key: str) -> tuple[list, list]:
    pts = [(h["updates_total"], h[key]) for h in history
           if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
    return ([u for u, _ in pts], [v for _, v in pts])


def eval_series(history: list, summary: dict, key: str) -> tuple[list, list]:
    """(updates, values) of an evaluation figure: the pretrained model's value at update 0 (FID and KID against the
    pretrained samples are 0 there), every evaluation in the history, and the final one (``summary``)."""
    pre = summary.get("pretrained") or {}
    start = 0.0 if key in ("fid_pretrained", "kid_pretrained") else pre.get(key)
    last_u = history[-1]["updates_total"] if history else 0
    u, v = _series(history + [dict(summary, updates_total=last_u)], key)
    if isinstance(start, (int, float)) and math.isfinite(start):
        u, v = [0] + u, [start] + v
    return u, v


def plot_report_curves(path: str, history: list, summary: dict) -> str:
    """Mean log R, class TV, diversity and FID against updates (the final evaluation as the last dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tgt = summary.get("target") or {}
    panels = [("reward_mean", "mean_log_r", "mean log R", tgt.get("mean_log_r")),
              ("class_tv_batch", "class_tv", "class-histogram TV to the target", TV_BAR if tgt else None),
              ("diversity_batch", "diversity", "diversity (mean pairwise feature distance)", tgt.get("diversity")),
              (None, "fid_pretrained", "FID against the pretrained samples", None)]
    fig, ax = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.5))
    for a, (batch_key, eval_key, title, ref) in zip(ax, panels):
        if batch_key is not None:
            u, v = _series(history, batch_key)
            if u:
                a.plot(u, v, lw=0.8, alpha=0.5, label="fresh batch")
        u, v = eval_series(history, summary, eval_key)
        if u:
            a.plot(u, v, "o-", ms=4, label="evaluation")
        if ref is not None:
            a.axhline(ref, color="k", ls="--", lw=1, label="bar" if eval_key == "class_tv" else "target")
        if eval_key == "class_tv":
            a.set_ylim(bottom=0)
        a.set_title(title, fontsize=10)
        a.set_xlabel("updates")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _img(path: str, alt: str) -> str:
    if not os.path.isfile(path):
        return f"<p><i>{html.escape(os.path.basename(path))} was not drawn (logging.plots=false?)</i></p>"
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return html.escape(str(v))


def _pm(v, se) -> str:
    """v, and ± se when there is one."""
    return _fmt(v) if se is None or v is None else f"{_fmt(v)} ± {_fmt(float(se))}"


def _hist(h) -> str:
    return "–" if h is None else " ".join(f"{float(v):.2f}" for v in h)


def _pretrained_quality(out_dir: str) -> Optional[dict]:
    """The "quality" block of ``pretrained.json`` (``fastnabla pretrain-digits --report``, which ``make digits`` writes
    into the run directory), when there is one."""
    path = os.path.join(out_dir, "pretrained.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f).get("quality")
    except (OSError, ValueError):
        return None


def write_report(out_dir: str, history: list, summary: dict, config: Optional[dict] = None) -> list[str]:
    """Write ``report_curves.png`` and ``report.html`` in out_dir; returns their paths."""
    curves = plot_report_curves(os.path.join(out_dir, "report_curves.png"), history, summary)
    tgt, pre = summary.get("target") or {}, summary.get("pretrained") or {}
    chk = check_targets(summary)
    reward = (config or {}).get("reward", {})
    beta = tgt.get("beta", (config or {}).get("gfn", {}).get("reward_scale"))
    title = f"digits: {reward['name']} {json.dumps(reward.get('options', {}))}, β = {_fmt(beta, 2)}" \
        if reward.get("name") else f"digits run, β = {_fmt(beta, 2)}"
    rows = [("class histogram (classes 0…9)", _hist(tgt.get("class_histogram")), _hist(pre.get("class_histogram")),
             _hist(summary.get("class_histogram"))),
            ("class-histogram TV to the target", "0", _fmt(pre.get("class_tv")), _fmt(summary.get("class_tv"))),
            ("mean log R (± its standard error)", _pm(tgt.get("mean_log_r"), tgt.get("mean_log_r_se")),
             _fmt(pre.get("mean_log_r")), _pm(summary.get("mean_log_r"), summary.get("mean_log_r_se"))),
            ("each class's share of the mean log R (sums to it)", _hist(tgt.get("mean_log_r_share_per_class")), "–",
             _hist(summary.get("mean_log_r_share_per_class"))),
            ("diversity", _fmt(tgt.get("diversity"), 2), _fmt(pre.get("diversity"), 2),
             _fmt(summary.get("diversity"), 2)),
            ("FID / KID against the pretrained samples", "–", "0 / 0",
             f"{_fmt(summary.get('fid_pretrained'), 1)} / {_fmt(summary.get('kid_pretrained'), 1)}"),
            ("effective sample size of the target", _fmt(tgt.get("ess"), 0), "–", "–")]
    table = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{c}</td><td>{d}</td></tr>" for a, b, c, d in rows)
    ratios = summary.get("diversity_ratio_per_class") or {}
    ratio_se = summary.get("diversity_ratio_se_per_class") or {}
    ratio_txt = ", ".join(f"{c}: {v:.2f}" + (f" ± {ratio_se[c]:.2f}" if math.isfinite(ratio_se.get(c, math.nan))
                                             else "") for c, v in sorted(ratios.items(), key=lambda kv: int(kv[0])))
    checks = "<p>No importance-sampled target in this run (eval.ground_truth_samples = 0).</p>"
    se = summary.get("mean_log_r_gap_se")
    gap_se = "" if se is None else f" ± {se:.3f} (the two draws' standard error)"
    if chk is not None:
        def li(ok, text):
            return f'<li style="color:{"#176117" if ok else "#a11"}">{"met" if ok else "not met"}: {text}</li>'

        checks = "<ul>" + li(chk["class_tv_ok"], f"class-histogram TV {chk['class_tv']:.3f} (bar: ≤ {TV_BAR})") + \
            li(chk["mean_log_r_ok"], f"|mean log R − target's| = {abs(chk['mean_log_r_gap']):.3f} nat{gap_se} "
                                     f"(bar: ≤ {GAP_BAR})") + \
            li(chk["diversity_ok"], f"within-class diversity relative to the target's, smallest over the classes it keeps "
                                    f"{chk['min_diversity_ratio']:.2f} (bar: ≥ {DIVERSITY_BAR}; {ratio_txt})") + "</ul>"
    prior = ""
    q = _pretrained_quality(out_dir)
    if q is not None:
        prior = (f"<h2>The pretrained model against real digits</h2><p>{_fmt(q.get('num_samples'))} samples against "
                 f"the 359 held-out digits, in classifier features: class-histogram TV to the real data's "
                 f"{_fmt(q.get('class_tv_to_real'), 4)} (bar: ≤ 0.05), FID {_fmt(q.get('fid_heldout'), 1)}, KID "
                 f"{_fmt(q.get('kid_heldout'), 1)} ± {_fmt(q.get('kid_heldout_std'), 1)}; real against real (held-out "
                 f"against train) FID {_fmt(q.get('fid_real_vs_real'), 1)}, KID {_fmt(q.get('kid_real_vs_real'), 1)}"
                 f" (from pretrained.json).</p>")
    ref_tv = (tgt.get("reference") or {}).get("class_tv_to_real")
    if ref_tv is not None:
        prior = (prior or "<h2>The pretrained model against real digits</h2>") + (
            f"<p>The {_fmt(tgt.get('num_samples'))} pretrained samples behind the target: class-histogram TV to the "
            f"real data's {ref_tv:.4f} (bar: ≤ 0.05).</p>")
    updates = history[-1]["updates_total"] if history else 0
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:90%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{updates} updates, {summary.get('num_samples', '?')} evaluation samples (the policy's EMA when train.ema_decay &gt; 0);
pretrained samples drawn at the same seeds. Classifier test accuracy {_fmt(summary.get('classifier_test_accuracy'))}.
The target p_ref·R^β is estimated by self-normalised importance sampling over {_fmt(tgt.get('num_samples'))}
pretrained samples.</p>
<h2>The issue's targets</h2>{checks}
<h2>Curves</h2>{_img(curves, 'curves')}
<h2>Samples: pretrained against finetuned, same seeds</h2>{_img(os.path.join(out_dir, 'samples_grid.png'), 'grid')}
<h2>Class histogram against the target</h2>{_img(os.path.join(out_dir, 'class_histogram.png'), 'histogram')}
<h2>Where each pretrained class went</h2><p>Row: the class of a pretrained sample; column: the class of the finetuned
sample drawn from the same noise. The target p_ref·R^β only reweights the pretrained classes; the finetuned sampler
gets there by changing its drift, and this table shows into which classes that drift moved each pretrained class.</p>
{_img(os.path.join(out_dir, 'class_transitions.png'), 'class transitions')}
<h2>Figures</h2><table><tr><th></th><th>target (IS)</th><th>pretrained</th><th>finetuned</th></tr>{table}</table>
{prior}
</body></html>
"""
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return [curves, path]


def main(argv=None) -> int:
    """``python -m fastnabla.report RUN_DIR``: rebuild report.html from a finished digits run's files."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fastnabla.report RUN_DIR (a finished run's output directory)", file=sys.stderr)
        return 2
    d = argv[0]
    try:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(d, "summary.json")) as f:
            summary = json.load(f)
    except OSError as e:
        print(f"fastnabla.report: {d!r} is not a finished run directory ({e.strerror}: {e.filename}); pass the "
              "output directory of a run that has ended", file=sys.stderr)
        return 2
    config = None
    if os.path.isfile(os.path.join(d, "config.yaml")):
        import yaml

        with open(os.path.join(d, "config.yaml")) as f:
            config = yaml.safe_load(f)
    for p in write_report(d, history, summary, config):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
