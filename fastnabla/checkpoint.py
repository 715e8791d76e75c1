"""Atomic, resumable checkpoints: write to a temporary directory, then rename; keep the last N.

A checkpoint is a directory ``<output_dir>/checkpoints/<name>/`` holding ``state.pt`` (everything the trainer
needs to continue bit for bit: trainables, optimizer, RNG states, the lagged sample buffer, counters). A crash
while writing leaves only a ``.tmp-*`` directory, which is never picked up as a checkpoint.

Under DeepSpeed (an engine with ``owns_weights``) the same directory holds ``state_rank{r}.pt`` for every rank r
(that rank's RNG states, sample buffer and counters) and ``deepspeed/`` (DeepSpeed's checkpoint: weights and
optimizer state, sharded under ZeRO). Every rank writes into one shared temporary directory; after a barrier
rank 0 alone renames it into place and prunes, and a second barrier keeps the other ranks from moving on first.
The number of ``state_rank*.pt`` files is the world size the checkpoint was written with.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Optional

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_resume", "list_checkpoints", "checkpoint_world_size",
           "rng_state", "set_rng_state"]

PREFIX = "step_"


def _is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.pt")) or os.path.isfile(os.path.join(path, "state_rank0.pt"))


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX) and _is_checkpoint(os.path.join(root, n))]
    return [os.path.join(root, n) for n in sorted(names)]


def checkpoint_world_size(path: str) -> Optional[int]:
    """How many ranks wrote the checkpoint at ``path``; None for a one-process (plain ``Engine``) checkpoint."""
    n = sum(1 for f in os.listdir(path) if f.startswith("state_rank") and f.endswith(".pt"))
    return n or None


def _sharded(engine) -> bool:
    return engine is not None and getattr(engine, "owns_weights", False)


def save_checkpoint(root: str, name: str, state: dict, keep_last: int, extra_files: Optional[dict] = None,
                    engine=None) -> str:
    """Write ``state`` atomically to ``root/name``; prune to the newest ``keep_last``. Returns the path.

    With a DeepSpeed ``engine`` this is collective: call it on every rank with that rank's ``state``."""
    if _sharded(engine):
        return _save_sharded(root, name, state, keep_last, engine)
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
    _replace_and_prune(tmp, final, root, keep_last)
    return final


def _save_sharded(root: str, name: str, state: dict, keep_last: int, engine) -> str:
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}")  # one name every rank agrees on (no pid)
    if engine.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    engine.barrier()
    engine.save_checkpoint(tmp)  # collective: DeepSpeed writes weights/optimizer shards under tmp/deepspeed/
    fname = os.path.join(tmp, f"state_rank{engine.rank}.pt")
    torch.save(state, fname)
    with open(fname, "rb") as f:
        os.fsync(f.fileno())
    engine.barrier()  # every rank's files are on disk
    if engine.rank == 0:
        _replace_and_prune(tmp, final, root, keep_last)
    engine.barrier()  # nobody reads or writes checkpoints before the rename
    return final


def _replace_and_prune(tmp: str, final: str, root: str, keep_last: int) -> None:
    if os.path.exists(final):
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(spec: str, root: str) -> str:
    """``latest`` → the newest checkpoint under ``root``; otherwise a checkpoint directory (or its state.pt)."""
    if spec == "latest":
        found = list_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"checkpoint.resume_from=latest: no checkpoint under {root}")
        return found[-1]
    path = os.path.dirname(spec) if spec.endswith(".pt") else spec
    if not _is_checkpoint(path):
        raise FileNotFoundError(f"checkpoint.resume_from={spec}: no state.pt there; pass a checkpoint directory "
                                f"(e.g. {root}/{PREFIX}…) or 'latest'")
    return path


def load_checkpoint(path: str, engine=None) -> dict:
    """The trainer state at ``path``. With a DeepSpeed ``engine`` (collective): check the world size, restore the
    engine's weights and optimizer state, and return this rank's ``state_rank{r}.pt``."""
    saved = checkpoint_world_size(path)
    if not _sharded(engine):
        if saved is not None:
            raise ValueError(f"{path} was written by a DeepSpeed run ({saved} ranks); resume it with the same "
                             f"train.deepspeed config and {saved} processes")
        return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    if saved is None:
        raise ValueError(f"{path} was written without DeepSpeed; resume it without train.deepspeed (one process)")
    if saved != engine.world_size:
        raise ValueError(f"{path} was written with world size {saved}, this run has {engine.world_size}: the "
                         "sample buffers, RNG states and ZeRO shards are per rank; resume with the same number of "
                         "processes")
    engine.load_checkpoint(path)
    return torch.load(os.path.join(path, f"state_rank{engine.rank}.pt"), map_location="cpu", weights_only=False)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
