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
