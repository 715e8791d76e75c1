"""Where finetuning moved each pretrained class, pooled over digits runs.

    python benchmarks/digits_class_transitions.py runs/digits_sweep/c358_shipped_floor001 … --name c358_shipped

For each run directory it takes the (C, C) table of ``metrics.class_transitions``: row = the classifier's class of
a pretrained sample, column = the class of the finetuned sample drawn from the same noise. A run that wrote
``class_transitions`` to its ``summary.json`` is read as is; an older run is recomputed from its
``pretrained_samples.npy`` and ``final_samples.npy`` with the run's classifier (``reward.model``, else the cached
default under the run's ``model.cache_dir``, as the run itself finds it). The .npy files hold the samples clamped to
[−1, 1] while the run classified them unclamped, so a recomputed table can differ from the run's own by a few
samples in 2,048 (seeds 0 and 1 of the shipped file: 3 and 5 finetuned samples change class). The tables are summed,
and the pooled row fractions and both margins (the pretrained and finetuned class histograms) go to
``benchmarks/results/digits_class_transitions_<name>.{csv,png}``, next to the mean target histogram of the runs when
they have one.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_table(run: str, classifier=None) -> tuple[np.ndarray, dict]:
    """(the run's (C, C) counts, its summary); ``classifier`` replaces the run's own for a recomputed table."""
    from fastnabla import digits, metrics

    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    if "class_transitions" in summary and classifier is None:
        return np.asarray(summary["class_transitions"]), summary
    clf = classifier
    if clf is None:
        cfg = {}
        if os.path.isfile(os.path.join(run, "config.yaml")):
            import yaml

            with open(os.path.join(run, "config.yaml")) as f:
                cfg = yaml.safe_load(f)
        model, reward = cfg.get("model") or {}, cfg.get("reward") or {}
        if reward.get("model"):
            clf, _ = digits.load_classifier(reward["model"])
        else:  # the default the run's own evaluation uses (metrics._digits_state)
            clf, _ = digits.ensure_classifier(model.get("image_size", 8), model.get("cache_dir"), progress=False)
    labels = []
    for name in ("pretrained_samples.npy", "final_samples.npy"):
        x = torch.from_numpy(np.load(os.path.join(run, name))).float()
        logits, _ = digits.classifier_outputs(clf, (x + 1) / 2)  # samples in [−1, 1], the classifier takes [0, 1]
        labels.append(logits.argmax(1))
    return metrics.class_transitions(labels[0], labels[1], logits.shape[1]).numpy(), summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished digits run directories (summary.json and the two .npy files)")
    p.add_argument("--name", required=True, help="results file suffix")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from fastnabla.metrics import plot_class_transitions

    tables, targets = [], []
    for run in a.runs:
        try:
            m, summary = run_table(run)
        except OSError as e:
            print(f"digits_class_transitions: {run!r} is not a finished digits run ({e.strerror}: {e.filename})",
                  file=sys.stderr)
            return 2
        tables.append(m)
        if (summary.get("target") or {}).get("class_histogram"):
            targets.append(summary["target"]["class_histogram"])
    total = sum(tables)
    n = total.sum()
    rows = total.sum(1)
    frac = total / np.maximum(rows[:, None], 1)
    target = np.mean(targets, 0) if targets else None
    out = os.path.join(ROOT, "benchmarks", "results", f"digits_class_transitions_{a.name}")
    with open(out + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        C = total.shape[0]
        w.writerow(["pretrained_class", "count", *[f"to_{j}" for j in range(C)]])
        for i in range(C):
            w.writerow([i, int(rows[i]), *[f"{v:.4f}" for v in frac[i]]])
        w.writerow(["pretrained_histogram", int(n), *[f"{v:.4f}" for v in rows / n]])
        w.writerow(["finetuned_histogram", int(n), *[f"{v:.4f}" for v in total.sum(0) / n]])
        if target is not None:
            w.writerow(["target_histogram", "", *[f"{v:.4f}" for v in target]])
        w.writerow(["runs", len(a.runs), *[os.path.basename(os.path.normpath(r)) for r in a.runs]])
    plot_class_transitions(out + ".png", total.tolist())
    print(f"{len(a.runs)} runs, {int(n)} pairs")
    print("finetuned:", " ".join(f"{v:.3f}" for v in total.sum(0) / n))
    if target is not None:
        print("target:   ", " ".join(f"{v:.3f}" for v in target))
    print(f"wrote {out}.csv and {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
