"""Atomic, resumable checkpoints: write to a temporary directory, then rename; keep the last N.

A checkpoint is a directory ``<output_dir>/checkpoints/<name>/`` holding ``state.pt`` (everything the trainer
needs to continue bit for bit: trainables, optimizer, RNG states, the lagged sample buffer, counters). A crash
while writing leaves only a ``.tmp-*`` directory, which is never picked up as a checkpoint.

Under DeepSpeed (an engine with ``owns_weights``) the same directory holds ``state_rank{r}.pt`` for every rank r
(that rank's RNG states, sample buffer and counters) and ``deepspeed/`` (DeepSpeed's checkpoint: weights and
optimizer state, sharded under ZeRO). Every rank writes into one shared temporary directory; after a barrier
rank 0 alone renames it into place and prunes, and a second barrier keeps the other ranks from moving on first.
The number of ``state_rank*.pt`` files is the world size the checkpoint was written with.

Every checkpoint carries ``manifest.json``: the size and SHA-256 of each of its files, written last into the
temporary directory (so it is renamed into place with them). Resuming checks it: ``resume_from=latest`` skips a
damaged checkpoint (a truncated or altered file) with a one-line warning and takes the newest intact one; a
damaged checkpoint named explicitly is a one-line ``ValueError``. Under DeepSpeed rank 0 checks and every rank
takes its answer, so all ranks resume from the same checkpoint. A checkpoint from before manifests is checked
by reading its ``.pt`` files' zip directories and CRCs instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import zipfile
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_resume", "verify_checkpoint", "list_checkpoints",
           "checkpoint_world_size", "rng_state", "set_rng_state", "atomic_write",
           "atomic_json"]

PREFIX = "step_"
MANIFEST = "manifest.json"

log = logging.getLogger("fastnabla")


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Writes one file atomically: ``write(tmp)`` fills a temporary file beside ``path`` (the same extension, a name
    of this process's own, so two processes writing the same file do not share it), which is then renamed onto
    ``path``. A reader sees the old file or the whole new one, never a part; a failed write leaves no temporary
    file. Returns ``path``. (Checkpoints are directories and have their own scheme below.)"""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_json(path: str, obj, indent: int = 2) -> str:
    """``obj`` as JSON at ``path``, written atomically (``atomic_write``)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)

    return atomic_write(path, write)


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


def save_checkpoint(root: str, name: str, state: dict, keep_last: int, engine=None) -> str:
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
    with open(os.path.join(tmp, "state.pt"), "rb") as f:
        os.fsync(f.fileno())
    _write_manifest(tmp)
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
        _write_manifest(tmp)
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


# --- integrity ----------------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    """Every file under ``directory``, as sorted paths relative to it."""
    out = []
    for here, _, names in os.walk(directory):
        out += [os.path.relpath(os.path.join(here, n), directory) for n in names]
    return sorted(out)


def _write_manifest(directory: str) -> None:
    files = {}
    for rel in _files(directory):
        if rel != MANIFEST:
            f = os.path.join(directory, rel)
            files[rel] = {"size": os.path.getsize(f), "sha256": _sha256(f)}
    path = os.path.join(directory, MANIFEST)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(path: str) -> Optional[str]:
    """None when the checkpoint at ``path`` is intact, else what is wrong with it (a short phrase)."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):  # written before manifests: torch.save's zip directory and CRCs still tell
        for rel in _files(path):
            if rel.endswith(".pt"):
                try:
                    with zipfile.ZipFile(os.path.join(path, rel)) as z:
                        bad = z.testzip()
                except (zipfile.BadZipFile, OSError) as e:
                    return f"{rel} is not a readable torch file ({e})"
                if bad is not None:
                    return f"{rel} fails its CRC check ({bad})"
        return None
    try:
        with open(manifest, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for rel, want in sorted(files.items()):
        f = os.path.join(path, rel)
        if not os.path.isfile(f):
            return f"{rel} is missing"
        size = os.path.getsize(f)
        if size != want["size"]:
            return f"{rel} is {size} bytes, {want['size']} when written"
        if _sha256(f) != want["sha256"]:
            return f"{rel} does not match its SHA-256 from when it was written"
    return None


def resolve_resume(spec: str, root: str, engine=None) -> str:
    """``latest`` → the newest intact checkpoint under ``root`` (damaged ones are skipped with a warning);
    otherwise a checkpoint directory (or its state.pt), which must be intact.

    With a multi-process ``engine`` this is collective: rank 0 checks the files, every rank takes its choice."""
    if spec == "latest":
        candidates = list_checkpoints(root)
        if not candidates:
            raise FileNotFoundError(f"checkpoint.resume_from=latest: no checkpoint under {root}")
    else:
        path = os.path.dirname(spec) if spec.endswith(".pt") else spec
        if not _is_checkpoint(path):
            raise FileNotFoundError(f"checkpoint.resume_from={spec}: no state.pt there; pass a checkpoint directory "
                                    f"(e.g. {root}/{PREFIX}…) or 'latest'")
        candidates = [path]
    distributed = engine is not None and engine.world_size > 1
    main = engine is None or engine.rank == 0
    choice, damaged = -1, []
    if main:
        for i in reversed(range(len(candidates))):
            why = verify_checkpoint(candidates[i])
            if why is None:
                choice = i
                break
            damaged.append((candidates[i], why))
            if spec == "latest":
                log.warning("checkpoint %s is damaged (%s); skipping it, resuming from an older one", candidates[i],
                            why)
    if distributed:
        choice = int(engine.all_gather(torch.tensor([choice], dtype=torch.int64))[0])
    if choice >= 0:
        return candidates[choice]
    if not damaged:  # another rank than 0: rank 0 found them damaged; say why from here too
        damaged = [(c, verify_checkpoint(c) or "damaged according to rank 0") for c in reversed(candidates)]
    if spec == "latest":
        raise ValueError(f"checkpoint.resume_from=latest: no intact checkpoint under {root} ({len(damaged)} damaged; "
                         f"newest {damaged[0][0]}: {damaged[0][1]}); start without checkpoint.resume_from or "
                         f"restore a checkpoint")
    raise ValueError(f"checkpoint.resume_from={spec}: the checkpoint is damaged ({damaged[0][1]}); resume from "
                     f"another one (checkpoint.resume_from=latest takes the newest intact one)")


def load_checkpoint(path: str, engine=None) -> dict:
    """The trainer state at ``path``. With a DeepSpeed ``engine`` (collective): check the world size, restore the
    engine's weights and optimizer state, and return this rank's ``state_rank{r}.pt``."""
    saved = checkpoint_world_size(path)
    if not _sharded(engine):
        if saved is not None:
            raise ValueError(f"{path} was written by a DeepSpeed run ({saved} ranks); resume it with the same "
                             f"train.deepspeed config and {saved} processes")
        return _load_state(path, "state.pt")
    if saved is None:
        raise ValueError(f"{path} was written without DeepSpeed; resume it without train.deepspeed (one process)")
    if saved != engine.world_size:
        raise ValueError(f"{path} was written with world size {saved}, this run has {engine.world_size}: the "
                         "sample buffers, RNG states and ZeRO shards are per rank; resume with the same number of "
                         "processes")
    engine.load_checkpoint(path)
    return _load_state(path, f"state_rank{engine.rank}.pt")


def _load_state(path: str, name: str) -> dict:
    try:
        return torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a file that passed verify_checkpoint and still fails: say which
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: {name} cannot be read ({cause}); resume from another checkpoint") from None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
