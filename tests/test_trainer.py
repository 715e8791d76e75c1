"""The trainer end to end on toy2d: determinism, exact resume, signals, bad steps, outputs, entry points."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastnabla.config import load_config
from fastnabla.methods import TransitionBatch
from fastnabla.trainer import TrainingStopped, build_trainer

FAST = ["sampling.batch_size=32", "sampling.num_steps=10", "gfn.timestep_fraction=0.2", "eval.num_samples=256",
        "eval.every=0", "logging.progress=false", "logging.plots=false", "checkpoint.every=0",
        "train.batch_size=16", "train.gradient_accumulation_steps=2", "model.hidden=32"]


def _cfg(tmp, *extra):
    return load_config(None, FAST + list(extra), output_dir=str(tmp))


def _params(tr):
    return torch.cat([p.detach().flatten() for p in list(tr.backbone.policy_parameters())
                      + list(tr.backbone.flow_parameters())])


def test_runs_learns_and_writes_outputs(tmp_path):
    tr = build_trainer(_cfg(tmp_path, "train.epochs=3", "logging.plots=true"))
    res = tr.run()
    assert set(["tv", "off_manifold", "mode_weights", "target_weights"]) <= set(res)
    s = np.load(tmp_path / "final_samples.npy")
    assert s.shape == (4096, 2) and np.isfinite(s).all()
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    # a fresh run into the same directory starts its log afresh instead of appending to the last run's
    build_trainer(_cfg(tmp_path, "train.epochs=2")).run()
    assert [json.loads(l)["epoch"] for l in open(tmp_path / "metrics.jsonl")] == [0, 1]
    for key in ("reward_mean", "reward_std", "loss", "loss_forward", "loss_terminal", "loss_reverse", "norm_d",
                "norm_reward_grad_next", "grad_norm_policy", "grad_norm_flow", "tv_batch", "off_manifold_batch"):
        assert key in recs[0], key
    assert (tmp_path / "toy2d_densities.png").stat().st_size > 10000 and (tmp_path / "curves.png").exists()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "final" / "trainables.pt").exists()
    # 3 transitions (2 + terminal) × 32 trajectories = 96 → 6 micro-batches of 16 → 3 updates of 2 per epoch
    assert tr.engine.updates == 3 * 3
    summary = json.load(open(tmp_path / "summary.json"))  # the resolved recipe, as config.yaml has it
    assert summary["method"]["name"] == "nabla_gfn" and summary["method"]["recipe"] == "returns"
    assert (summary["method"]["policy_weighting"], summary["method"]["reverse_scale"]) == ("sigma2", 0.0)


def test_an_update_lowers_the_loss_of_its_own_batch(tmp_path):
    """One optimizer update (gradient of the update's mean loss, AdamW) lowers that same batch's loss."""
    tr = build_trainer(_cfg(tmp_path, "train.lr=1e-3", "train.flow_lr=1e-3"))
    traj = tr.sample(0)
    micro = tr.plan(0, len(traj))[0]

    def batch_loss():
        return sum(float(tr.method(TransitionBatch.gather(traj, idx, tr.device))[0].detach().sum()) for idx in micro)

    before = batch_loss()
    info = tr.update(traj, micro)
    assert not info["skipped"] and info["loss"] * sum(len(i) for i in micro) == pytest.approx(before, rel=1e-5)
    assert batch_loss() < before


def test_update_averages_over_its_items_even_when_short(tmp_path):
    """The losses handed to backward sum to the mean item loss of the update, for a full update and for a short last
    one (fewer micro-batches than gradient_accumulation_steps, and a smaller last micro-batch)."""
    tr = build_trainer(_cfg(tmp_path, "train.batch_size=20", "train.gradient_accumulation_steps=4"))
    traj = tr.sample(0)
    updates = tr.plan(0, len(traj))  # 96 transitions → micro-batches 20,20,20,20 | 16
    assert [len(m) for m in updates] == [4, 1] and len(updates[1][0]) == 16
    seen = []
    real = tr.engine.backward
    tr.engine.backward = lambda loss: (seen.append(float(loss.detach())), real(loss))
    for micro in updates:
        with torch.no_grad():
            item = torch.cat([tr.method(TransitionBatch.gather(traj, idx, tr.device))[0] for idx in micro])
        seen.clear()
        tr.update(traj, micro)
        assert sum(seen) == pytest.approx(float(item.mean()), rel=1e-5)


@pytest.mark.parametrize("extra", [
    (),  # the gradient-returns recipe: the returns travel with the lagged buffer
    ("gfn.recipe=paper",),
    ("gfn.no_flow=true",),  # returns recipe without a flow: no returns are computed or needed
    ("train.ema_decay=0.9", "train.lr_schedule=cosine"),
])
def test_bit_reproducible_and_resume_equals_uninterrupted(tmp_path, extra):
    a = build_trainer(_cfg(tmp_path / "a", "train.epochs=4", *extra))
    a.run()
    b = build_trainer(_cfg(tmp_path / "b", "train.epochs=4", *extra))
    b.run()
    assert torch.equal(_params(a), _params(b))
    # interrupted in the middle of epoch 2's updates, then resumed from the checkpoint
    c = build_trainer(_cfg(tmp_path / "c", "train.epochs=4", *extra))
    real_update = c.update
    count = {"n": 0}

    def update(*args, **kw):
        count["n"] += 1
        if count["n"] == 2 * 3 + 2:
            c._stop_signal = signal.SIGTERM
        return real_update(*args, **kw)

    c.update = update
    res = c.run()
    assert res["stopped"] and c.epoch == 2 and c.update_in_epoch == 2
    with open(tmp_path / "c" / "metrics.jsonl", "a") as f:  # a row written after the checkpoint, before a crash
        f.write(json.dumps({"epoch": 2, "stale": True}) + "\n" + '{"epoch": 3, "cut sho')  # and one cut short
    d = build_trainer(_cfg(tmp_path / "c", "train.epochs=4", "checkpoint.resume_from=latest", *extra))
    d.run()
    assert torch.equal(_params(a), _params(d))
    if a.engine.ema is not None:
        assert all(torch.equal(x, y) for x, y in zip(a.engine.ema.shadow, d.engine.ema.shadow))
    ha = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    hd = [json.loads(l) for l in open(tmp_path / "c" / "metrics.jsonl")]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in ha] == [strip(r) for r in hd]


@pytest.mark.parametrize("lag", [0, 1])
def test_sample_lag_trains_each_epoch_on_the_right_batch(tmp_path, lag):
    """lag 0: epoch e trains on its own fresh batch. lag 1: on epoch e−1's (epoch 0 on one more batch drawn first,
    seeded as epoch −1), so every trained batch is trained in exactly one epoch."""
    tr = build_trainer(_cfg(tmp_path, "train.epochs=3", f"gfn.sample_lag={lag}"))
    drawn, trained = {}, {}
    real_sample, real_update = tr.sample, tr.update

    def sample(epoch):
        drawn[epoch] = real_sample(epoch)
        return drawn[epoch]

    def update(traj, micro):
        trained.setdefault(tr.epoch, set()).add(id(traj))
        return real_update(traj, micro)

    tr.sample, tr.update = sample, update
    tr.run()
    want = {e: {id(drawn[e - lag])} for e in range(3)}
    assert trained == want
    assert sorted(drawn) == ([-1, 0, 1, 2] if lag else [0, 1, 2])
    # the epoch-(−1) batch is a different draw from epoch 0's
    if lag:
        assert not torch.equal(drawn[-1].xs, drawn[0].xs)


def test_keep_last_and_resume_errors(tmp_path):
    tr = build_trainer(_cfg(tmp_path, "train.epochs=5", "checkpoint.every=1", "checkpoint.keep_last=2"))
    tr.run()
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["step_000004_00000", "step_000005_00000"]
    with pytest.raises(FileNotFoundError, match="no state.pt"):
        build_trainer(_cfg(tmp_path, "checkpoint.resume_from=/nonexistent")).run()


def test_non_finite_updates_are_skipped_then_stop(tmp_path, caplog):
    tr = build_trainer(_cfg(tmp_path, "train.epochs=3", "train.max_bad_steps=3"))
    with torch.no_grad():
        tr.backbone.residual.head.bias.fill_(float("nan"))
    before = _params(tr).clone()
    with pytest.raises(TrainingStopped, match="3 non-finite updates in a row"):
        tr.run()
    assert "update skipped" in caplog.text
    assert torch.equal(_params(tr).nan_to_num(), before.nan_to_num())  # nothing was stepped
    assert os.listdir(tmp_path / "checkpoints")


def test_sigterm_in_subprocess_writes_checkpoint_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "fastnabla/train.py", "--output-dir", str(tmp_path), "train.epochs=100000",
           "logging.progress=false", "sampling.batch_size=64"]
    p = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert "stopped by signal" in out
    assert any(n.startswith("step_") for n in os.listdir(tmp_path / "checkpoints"))


def test_deterministic_transition_refused(tmp_path):
    with pytest.raises(ValueError, match="deterministic"):
        build_trainer(_cfg(tmp_path, "sampling.scheduler=ddpm"))


def test_policy_ema_is_the_running_average_and_is_what_evaluation_samples(tmp_path):
    tr = build_trainer(_cfg(tmp_path, "train.epochs=1", "train.ema_decay=0.5"))
    params, ema = tr.engine.policy_params, tr.engine.ema
    start = [p.detach().clone() for p in params]
    expect = [p.clone() for p in start]
    for step in range(3):  # stand-in updates: shift every weight, then average as the engine does after a step
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * (step + 1))
        ema.update()
        expect = [0.5 * e + 0.5 * p.detach() for e, p in zip(expect, params)]
    for s, e in zip(ema.shadow, expect):
        torch.testing.assert_close(s, e, rtol=0, atol=1e-7)
    live = [p.detach().clone() for p in params]
    ema_samples, _ = tr.sample_final(64, seed=1)
    assert all(torch.equal(p, v) for p, v in zip(params, live))  # the live weights are back
    with torch.no_grad():
        for p, s in zip(params, ema.shadow):
            p.copy_(s)
    by_hand, _ = tr.sample_final(64, seed=1)
    assert torch.equal(ema_samples, by_hand)


@pytest.mark.parametrize("extra", [(), ("gfn.recipe=paper",)])  # paper: one forward, several backward passes
def test_compile_trains_like_eager(tmp_path, extra):
    """train.compile compiles the backbone's networks in place (same parameter names, so checkpoints are unchanged)
    and an epoch trains to the same parameters as eager execution."""
    a = build_trainer(_cfg(tmp_path / "a", "train.epochs=1", "eval.num_samples=64", *extra))
    b = build_trainer(_cfg(tmp_path / "b", "train.epochs=1", "eval.num_samples=64", "train.compile=true", *extra))
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in (b.backbone.residual, b.backbone.flow_net))
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in (a.backbone.residual, a.backbone.flow_net))
    assert list(a.backbone.trainable_state_dict()) == list(b.backbone.trainable_state_dict())
    a.run()
    b.run()
    torch.testing.assert_close(_params(b), _params(a), rtol=1e-4, atol=1e-6)


def test_reward_guidance_reaches_training_and_evaluation_samples(tmp_path):
    """With ``gfn.reward_guidance`` the trainer's sampler steps with policy + guidance (the stored outputs carry it),
    evaluation samples are drawn the same way, and the pretrained-sample draw stays unguided."""
    from tests.helpers.guidance import assert_guided_sampling

    tr = build_trainer(_cfg(tmp_path, "train.epochs=1", "gfn.policy_target=return", "gfn.reward_guidance=2.0"))
    assert_guided_sampling(tr, (0, 4, 9))
    tr.run()  # trains through the guided objective


def test_ema_sampling_draws_the_training_trajectories_with_the_average(tmp_path):
    """``train.ema_sampling``: the epoch's trajectories are the policy EMA's (the same draw as sampling with the EMA
    weights copied in), and the live weights are back afterwards; without it, the live policy's."""
    from fastnabla.sampling import sample_trajectories

    tr = build_trainer(_cfg(tmp_path, "train.epochs=1", "train.ema_decay=0.5", "train.ema_sampling=true"))
    params, ema = tr.engine.policy_params, tr.engine.ema
    with torch.no_grad():
        for s in ema.shadow:  # an average that differs from the live weights
            s.add_(0.05)
    live = [p.detach().clone() for p in params]
    traj = tr.sample(0)
    assert all(torch.equal(p, v) for p, v in zip(params, live))
    tr.cfg.train.ema_sampling = False  # from here the trainer samples with whatever weights are live
    with ema.swapped_in():
        by_hand = tr.sample(0)
    torch.testing.assert_close(traj.xs, by_hand.xs, rtol=0, atol=0)
    assert not torch.allclose(tr.sample(0).xs, traj.xs)
    with pytest.raises(ValueError, match="train.ema_sampling"):
        _cfg(tmp_path, "train.ema_sampling=true")
