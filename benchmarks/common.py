"""What the benchmark scripts share: the commit they ran at, and how they write a table of result rows."""
from __future__ import annotations

import csv
import os

from fastnabla.digits import git_sha  # noqa: F401  (the benchmarks' one reading of the commit)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_rows(path: str, rows: list[dict]) -> str:
    """Write rows (dicts with the same keys, in the first row's order) as a CSV with a header; returns path."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def load_finished_run(run: str, overrides: list[str], output_dir: str, error):
    """The trainer of a finished run directory (its config.yaml and last checkpoint under checkpoints/), built with
    ``overrides`` and writing to ``output_dir``; returns (trainer, config, checkpoint path). ``error(msg)`` reports
    what is missing (an argparse parser's ``error`` exits with code 2)."""
    from fastnabla import checkpoint as ckpt
    from fastnabla.config import load_config
    from fastnabla.trainer import build_trainer

    cfg_path = os.path.join(run, "config.yaml")
    if not os.path.isfile(cfg_path):
        error(f"{run}: no config.yaml; pass a finished run directory")
    found = ckpt.list_checkpoints(os.path.join(run, "checkpoints"))
    if not found:
        error(f"{run}: no checkpoint under checkpoints/ (a finished run writes one at the end)")
    cfg = load_config(cfg_path, overrides, output_dir=output_dir)
    tr = build_trainer(cfg)
    tr.load_state_dict(ckpt.load_checkpoint(found[-1]))
    return tr, cfg, found[-1]


def run_target(tr, run: str, error) -> tuple[dict, dict]:
    """(the digits evaluation state, its importance-sampled target) of a loaded run (``load_finished_run``): the
    run's own classifier and target, as its evaluation used them. ``error(msg)`` reports a run without a target."""
    from fastnabla import metrics

    st = metrics._digits_state(tr.eval_ctx)
    if st["target"] is None:
        error(f"{run}: the run has no importance-sampled target (eval.ground_truth_samples = 0)")
    return st, st["target"]


def target_draw(tr, cfg, st) -> tuple[dict, "torch.Tensor", "torch.Tensor"]:
    """(the cached pretrained draw the target is built from (``digits.reference_samples``), its log R, its
    self-normalised importance weights R^β) for a loaded run and its evaluation state (``run_target``)."""
    from fastnabla import digits, metrics

    ref = digits.reference_samples(tr.backbone, st["classifier"], cfg.eval.ground_truth_samples,
                                   batch=digits.target_draw_batch(cfg), cache_dir=cfg.model.cache_dir, progress=False)
    ref_lr = metrics._scores(tr.eval_ctx, ref["images"], None)
    w, _ = metrics.importance_weights(ref_lr, cfg.gfn.reward_scale)
    return ref, ref_lr, w


def ratios_text(ratios: dict | None) -> str:
    """Within-class diversity ratios ({class: ratio}) as one CSV cell, "3:0.962 8:0.905" ("" for none)."""
    return " ".join(f"{c}:{v:.3f}" for c, v in sorted((int(c), v) for c, v in ratios.items())) if ratios else ""


def digits_eval_figures(ev: dict) -> dict:
    """The issue-12 figures of a digits evaluation (``metrics.evaluate``), rounded for a result row: class-histogram
    TV to the target, mean log R gap, the lowest within-class diversity ratio, every class's ratio, and the class
    histogram."""
    div = ev.get("diversity_ratio_per_class") or {}
    return dict(class_tv=round(ev["class_tv"], 4), mean_log_r_gap=round(ev["mean_log_r_gap"], 4),
                min_diversity_ratio=round(min(div.values()), 4) if div else "", diversity_ratios=ratios_text(div),
                class_histogram=" ".join(f"{v:.3f}" for v in ev["class_histogram"]))


def digits_figures_line(row: dict) -> str:
    """One line of a row holding ``digits_eval_figures``."""
    ratios = f" ({row['diversity_ratios']})" if row.get("diversity_ratios") else ""
    return (f"class TV {row['class_tv']}, mean log R gap {row['mean_log_r_gap']}, min diversity ratio "
            f"{row['min_diversity_ratio']}{ratios}  [{row['class_histogram']}]")


def parse_scales(ap, text: str, option: str = "--scales") -> list[float]:
    """The comma-separated scales of a guidance key given as ``option``; each must be > 0 (a scale of 0 is the
    pretrained model itself). Anything else goes to ``ap.error`` (one line, exit code 2)."""
    try:
        scales = [float(s) for s in text.split(",")]
    except ValueError:
        ap.error(f"{option} {text!r} must be comma-separated numbers, e.g. 1,1.5,2")
    if any(s <= 0 for s in scales):
        ap.error(f"{option} {text!r}: every scale must be > 0 (0 is the pretrained model itself)")
    return scales


def digits_task_config(task: str, overrides: list[str], output_dir: str):
    """The config of ``configs/digits.yaml`` with the task's overrides (``digits_sweep.TASKS``) and ``overrides``,
    writing to ``output_dir``."""
    from benchmarks.digits_sweep import TASKS
    from fastnabla.config import load_config

    return load_config(os.path.join(ROOT, "configs", "digits.yaml"), [*TASKS[task], *overrides], output_dir=output_dir)


def build_digits_task(task: str, overrides: list[str], output_dir: str):
    """(trainer, config) of ``digits_task_config``; the build fits or draws what is not cached (e.g. a value)."""
    from fastnabla.trainer import build_trainer

    cfg = digits_task_config(task, overrides, output_dir)
    return build_trainer(cfg), cfg


def evaluate_untrained(task: str, overrides: list[str], output_dir: str, every_step: bool = False):
    """Build ``configs/digits.yaml`` with the task's overrides (``digits_sweep.TASKS``) and ``overrides`` into
    ``output_dir``, and evaluate its untrained policy as a run's evaluation does (``metrics.evaluate``, at the
    config's seed). With ``every_step`` the policy acts at every sampling step rather than the file's policy window
    (so a fixed part of the policy pushes everywhere). Returns (trainer, config, evaluation, build seconds,
    evaluation seconds); the build fits or draws what is not cached."""
    import time

    import torch

    from fastnabla import metrics

    t0 = time.time()
    tr, cfg = build_digits_task(task, overrides, output_dir)
    if every_step:
        tr.method.policy_from, tr.method.policy_to = 0, tr.backbone.scheduler.timesteps.numel()
    t1 = time.time()
    torch.manual_seed(cfg.seed)
    ev = metrics.evaluate(tr.eval_ctx, final=False)
    return tr, cfg, ev, round(t1 - t0, 1), round(time.time() - t1, 1)
