"""Checkpoint integrity: the manifest written at save, and resuming past a damaged checkpoint (``latest``) or
refusing one named explicitly (one line, exit code 2). The DeepSpeed case (every rank resumes from the same
checkpoint) is in test_distributed.py; the rank-agreement logic is checked here with stand-in engines."""
import hashlib
import json
import logging
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastnabla import checkpoint as ckpt
from fastnabla.config import load_config
from fastnabla.train import main as train_main
from fastnabla.trainer import build_trainer

FAST = ["sampling.batch_size=32", "sampling.num_steps=10", "gfn.timestep_fraction=0.2", "eval.num_samples=256",
        "eval.every=0", "logging.progress=false", "logging.plots=false", "train.batch_size=16",
        "train.gradient_accumulation_steps=2", "model.hidden=32"]
EVERY_EPOCH = ["checkpoint.every=1", "checkpoint.keep_last=5"]
NAMES = ["step_000001_00000", "step_000002_00000", "step_000003_00000"]


def _params(tr):
    return torch.cat([p.detach().flatten() for p in list(tr.backbone.policy_parameters())
                      + list(tr.backbone.flow_parameters())])


def _truncate(path, keep: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """A toy2d run of 3 epochs with a checkpoint after each; (its directory, its final parameters)."""
    out = tmp_path_factory.mktemp("run")
    tr = build_trainer(load_config(None, FAST + EVERY_EPOCH + ["train.epochs=3"], output_dir=str(out)))
    tr.run()
    assert sorted(os.listdir(out / "checkpoints")) == NAMES
    return out, _params(tr)


@pytest.fixture
def run_copy(three_epochs, tmp_path):
    out, final = three_epochs
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run", final


def test_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), "step_000001_00000", {"x": torch.arange(1000)}, keep_last=2)
    assert sorted(os.listdir(path)) == ["manifest.json", "state.pt"]
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    data = open(os.path.join(path, "state.pt"), "rb").read()
    assert manifest["files"] == {"state.pt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    assert ckpt.verify_checkpoint(path) is None


def test_verify_names_what_is_wrong(tmp_path):
    state = {"x": torch.arange(1000)}
    path = ckpt.save_checkpoint(str(tmp_path), "step_000001_00000", state, keep_last=5)
    f = os.path.join(path, "state.pt")
    size = os.path.getsize(f)
    _truncate(f)
    assert ckpt.verify_checkpoint(path) == f"state.pt is {size // 2} bytes, {size} when written"

    path = ckpt.save_checkpoint(str(tmp_path), "step_000002_00000", state, keep_last=5)
    f = os.path.join(path, "state.pt")
    with open(f, "r+b") as fh:  # same size, one byte of the tensor data changed
        fh.seek(size // 2)
        b = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert ckpt.verify_checkpoint(path) == "state.pt does not match its SHA-256 from when it was written"

    path = ckpt.save_checkpoint(str(tmp_path), "step_000003_00000", state, keep_last=5)
    os.remove(os.path.join(path, "state.pt"))
    torch.save(state, os.path.join(path, "state_rank0.pt"))  # still listed as a checkpoint, but state.pt is gone
    assert ckpt.verify_checkpoint(path) == "state.pt is missing"

    path = ckpt.save_checkpoint(str(tmp_path), "step_000004_00000", state, keep_last=5)
    _truncate(os.path.join(path, "manifest.json"))
    assert ckpt.verify_checkpoint(path) == "manifest.json is unreadable (JSONDecodeError)"


def test_checkpoints_from_before_manifests_are_checked_by_their_zip_structure(tmp_path):
    d = tmp_path / "step_000001_00000"
    d.mkdir()
    torch.save({"x": torch.arange(1000)}, d / "state.pt")
    assert ckpt.verify_checkpoint(str(d)) is None
    _truncate(d / "state.pt")
    why = ckpt.verify_checkpoint(str(d))
    assert why.startswith("state.pt is not a readable torch file") and "\n" not in why


def test_latest_skips_a_damaged_checkpoint_and_resumes_from_the_newest_intact_one(run_copy, caplog):
    out, final = run_copy
    newest = out / "checkpoints" / NAMES[2]
    _truncate(newest / "state.pt")
    cfg = load_config(None, FAST + EVERY_EPOCH + ["train.epochs=3", "checkpoint.resume_from=latest"],
                      output_dir=str(out))
    with caplog.at_level(logging.INFO, logger="fastnabla"):
        tr = build_trainer(cfg)
        tr.run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "damaged (state.pt is" in warnings[0]
    assert "\n" not in warnings[0]
    assert any(r.getMessage().startswith(f"resumed from {out / 'checkpoints' / NAMES[1]} (epoch 2")
               for r in caplog.records)
    # epoch 2 trained again from the intact checkpoint: the same weights as the uninterrupted run
    assert torch.equal(_params(tr), final)
    assert ckpt.verify_checkpoint(str(newest)) is None  # and the damaged one was rewritten by the resumed run


def test_a_damaged_checkpoint_named_explicitly_is_one_line_and_exit_2(run_copy, capsys):
    out, _ = run_copy
    newest = out / "checkpoints" / NAMES[2]
    size = os.path.getsize(newest / "state.pt")
    _truncate(newest / "state.pt")
    argv = ["--output-dir", str(out), *FAST, "train.epochs=4", f"checkpoint.resume_from={newest}"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fastnabla.train: error: checkpoint.resume_from={newest}: the checkpoint is damaged (state.pt is "
                   f"{size // 2} bytes, {size} when written); resume from another one "
                   f"(checkpoint.resume_from=latest takes the newest intact one)")


def test_latest_with_every_checkpoint_damaged_is_one_line(run_copy):
    out, _ = run_copy
    for name in NAMES:
        _truncate(out / "checkpoints" / name / "state.pt")
    with pytest.raises(ValueError, match=r"^checkpoint\.resume_from=latest: no intact checkpoint under .* \(3 "
                                         r"damaged; newest .*step_000003_00000: state\.pt is \d+ bytes"):
        ckpt.resolve_resume("latest", str(out / "checkpoints"))


class _Rank(SimpleNamespace):
    """A stand-in multi-process engine: ``all_gather`` returns what the given ranks contributed, with this rank's
    value at its own position."""

    def all_gather(self, t):
        self.sent = t.clone()
        values = list(self.others)
        values.insert(self.rank, int(t[0]))
        return torch.tensor(values)


def test_every_rank_takes_rank_0s_choice(tmp_path):
    root = tmp_path / "checkpoints"
    for name in NAMES:
        ckpt.save_checkpoint(str(root), name, {"name": name}, keep_last=5)
    _truncate(root / NAMES[2] / "state.pt")

    rank0 = _Rank(world_size=2, rank=0, others=[7])
    assert ckpt.resolve_resume("latest", str(root), engine=rank0) == str(root / NAMES[1])
    assert rank0.sent.tolist() == [1]  # rank 0 checked the files and sent the index of the newest intact one

    # whatever rank 1's files look like (all intact here), it resumes from the checkpoint rank 0 chose
    shutil.rmtree(root / NAMES[2])
    ckpt.save_checkpoint(str(root), NAMES[2], {"name": NAMES[2]}, keep_last=5)
    rank1 = _Rank(world_size=2, rank=1, others=[0])
    assert ckpt.resolve_resume("latest", str(root), engine=rank1) == str(root / NAMES[0])

    # rank 0 found the named checkpoint damaged: the other ranks raise too (nobody waits in a collective)
    rank1 = _Rank(world_size=2, rank=1, others=[-1])
    with pytest.raises(ValueError, match=r"the checkpoint is damaged \(damaged according to rank 0\)"):
        ckpt.resolve_resume(str(root / NAMES[2]), str(root), engine=rank1)


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    # the caches (classifier, UNet marker, target samples, value) and the metrics rewrite go through this one helper
    path = tmp_path / "cache.npz"
    seen = []

    def write(tmp):
        seen.append(tmp)
        np.savez(tmp, a=np.arange(3))  # numpy appends .npz to a name without it: the temporary keeps the extension

    assert ckpt.atomic_write(str(path), write) == str(path)
    assert seen[0].endswith(".npz") and str(os.getpid()) in seen[0] and seen[0] != str(path)
    assert sorted(os.listdir(tmp_path)) == ["cache.npz"]

    def fails(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(str(path), fails)
    assert sorted(os.listdir(tmp_path)) == ["cache.npz"]  # no temporary left, the old file intact
    assert np.load(path)["a"].tolist() == [0, 1, 2]
    ckpt.atomic_json(str(tmp_path / "meta.json"), {"x": [1, 2]})
    assert json.loads((tmp_path / "meta.json").read_text()) == {"x": [1, 2]}
