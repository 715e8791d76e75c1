"""What the benchmark scripts share: the commit they ran at, and how they write a table of result rows."""
from __future__ import annotations

import csv
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_sha() -> str:
    """The short hash of the checkout's HEAD ('' outside a git checkout)."""
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip()


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


def digits_eval_figures(ev: dict) -> dict:
    """The issue-12 figures of a digits evaluation (``metrics.evaluate``), rounded for a result row: class-histogram
    TV to the target, mean log R gap, the lowest within-class diversity ratio, and the class histogram."""
    div = ev.get("diversity_ratio_per_class") or {}
    return dict(class_tv=round(ev["class_tv"], 4), mean_log_r_gap=round(ev["mean_log_r_gap"], 4),
                min_diversity_ratio=round(min(div.values()), 4) if div else "",
                class_histogram=" ".join(f"{v:.3f}" for v in ev["class_histogram"]))


def digits_figures_line(row: dict) -> str:
    """One line of a row holding ``digits_eval_figures``."""
    return (f"class TV {row['class_tv']}, mean log R gap {row['mean_log_r_gap']}, min diversity ratio "
            f"{row['min_diversity_ratio']}  [{row['class_histogram']}]")
