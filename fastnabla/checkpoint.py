"""Atomic, resumable checkpoints: write to a temporary directory, then rename; keep the last N.

A checkpoint is a directory ``<output_dir>/checkpoints/<name>/`` holding ``state.pt`` (everything the trainer
needs to continue bit for bit: trainables, optimizer, RNG states, the lagged sample buffer, counters). A crash
while writing leaves only a ``.tmp-*`` directory, which is never picked up as a checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Optional

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_resume", "list_checkpoints", "rng_state", "set_rng_state"]

PREFIX = "step_"


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX) and os.path.isfile(os.path.join(root, n, "state.pt"))]
    return [os.path.join(root, n) for n in sorted(names)]


def save_checkpoint(root: str, name: str, state: dict, keep_last: int, extra_files: Optional[dict] = None) -> str:
    """Write ``state`` atomically to ``root/name``; prune to the newest ``keep_last``. Returns the path."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    for fname, writer in (extra_files or {}).items():
        writer(os.path.join(tmp, fname))
    with open(os.path.join(tmp, "state.pt"), "rb") as f:
        os.fsync(f.fileno())
    if os.path.exists(final):
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve_resume(spec: str, root: str) -> str:
    """``latest`` → the newest checkpoint under ``root``; otherwise a checkpoint directory (or its state.pt)."""
    if spec == "latest":
        found = list_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"checkpoint.resume_from=latest: no checkpoint under {root}")
        return found[-1]
    path = spec[: -len("state.pt")].rstrip("/") if spec.endswith("state.pt") else spec
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise FileNotFoundError(f"checkpoint.resume_from={spec}: no state.pt there; pass a checkpoint directory "
                                f"(e.g. {root}/{PREFIX}…) or 'latest'")
    return path


def load_checkpoint(path: str) -> dict:
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
