"""The epoch loop (ALGORITHM §5): sample → buffer → pick transitions → method → engine step → log/ckpt/eval.

``build_trainer(cfg)`` is the composition root: it sets up the device (the engine's business), builds the reward,
then the backbone (which asks the reward whether it reads prompts), the method (``method.name``) and the engine,
and hands them to ``Trainer``, which is the loop alone.

One epoch e:
 1. sample ``sampling.num_batches × batch_size`` fresh trajectories with the current policy (RNG seeded by
    (seed, e, shard), so a resumed run draws the same noise); the method's ``prepare`` runs on each batch and its
    ``prepare_epoch`` on all of them;
 2. train on the previous epoch's trajectories (``Method.sample_lag`` = 1, ∇-GFlowNet's ``gfn.sample_lag``; with
    sample_lag = 0, which the on-policy baselines use, on the fresh ones):
    pick the trained items of each trajectory (transitions, or the trajectory itself for the reward-backpropagation
    baselines), shuffle them, and run ``gradient_accumulation_steps`` micro-batches of ``train.batch_size`` items per
    update. With sample_lag = 1, epoch 0 first draws one more batch (seeded as epoch −1, same policy) to train on,
    so every sampled batch is trained on exactly once and every epoch has the same number of updates;
 3. the fresh trajectories become the buffer; log metrics, evaluate, checkpoint.

The loop is resumable at any update: a checkpoint holds the epoch, the next update within it, the fresh samples,
the buffer and the method's state, so resuming replays exactly what the uninterrupted run would have done (bit for
bit on CPU).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from typing import Optional

import torch

from fastnabla import checkpoint as ckpt
from fastnabla.config import Config, config_to_dict
from fastnabla.methods import Method
from fastnabla.sampling import Trajectories, sample_trajectories, step_coefficients

log = logging.getLogger("fastnabla")

__all__ = ["Trainer", "TrainingStopped", "build_trainer"]


class TrainingStopped(RuntimeError):
    """Raised after ``train.max_bad_steps`` non-finite updates in a row (a checkpoint has been written)."""


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def build_trainer(cfg: Config, *, backbone=None, reward_fn=None, engine=None, method: Optional[Method] = None,
                  prompt_source=None) -> "Trainer":
    """Compose a ``Trainer`` from ``cfg``; any component passed in is used as given (tests, custom models).

    Order: device (joins the process group under DeepSpeed), reward, backbone (asks the reward ``needs_prompts``),
    per-step coefficients, method, engine (told whether the method trains the flow and reuses a policy forward),
    prompts.
    """
    from fastnabla.engine import setup_device

    device = setup_device(cfg.train)
    if reward_fn is None:
        from fastnabla.rewards import reward_from_config

        reward_fn = reward_from_config(cfg, device)
    torch.manual_seed(cfg.seed)
    if backbone is None:
        from fastnabla.backbones import build_backbone

        backbone = build_backbone(cfg, reward=reward_fn)
    backbone = backbone.to(device)
    coeffs = step_coefficients(backbone)
    if bool((coeffs.std <= 0).any()):
        k = int((coeffs.std <= 0).nonzero()[0])
        raise ValueError(
            f"sampling step {k} (timestep {int(backbone.scheduler.timesteps[k])}) is deterministic (σ = 0) and cannot "
            "be trained; use sampling.eta > 0 and a scheduler with set_alpha_to_one=False/steps_offset=1")
    if method is None:
        from fastnabla.methods import build_method

        method = build_method(cfg, backbone, reward_fn, coeffs)
    if cfg.train.compile:
        if method.reuses_policy_forward:
            # one compiled forward then serves several backward passes (retain_graph), which AOTAutograd's donated
            # buffers forbid
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
        backbone.compile_networks()
    if engine is None:
        from fastnabla.engine import build_engine

        engine = build_engine(backbone, backbone.policy_parameters(),
                              backbone.flow_parameters() if method.trains_flow else [], cfg.train,
                              reused_forward=method.reuses_policy_forward)
    method.check_engine(engine)
    if prompt_source is None and backbone.conditional:
        from fastnabla.prompts import PromptSource

        prompt_source = PromptSource(cfg.prompts.train, column=cfg.prompts.column)
    return Trainer(cfg, backbone, reward_fn, engine, method, prompt_source)


class Trainer:
    """The loop over composed parts (``build_trainer`` builds them from a config)."""

    def __init__(self, cfg: Config, backbone, reward_fn, engine, method: Method, prompt_source=None):
        self.cfg = cfg
        self.out_dir = cfg.output_dir
        os.makedirs(self.out_dir, exist_ok=True)
        self.backbone, self.reward_fn, self.engine, self.method = backbone, reward_fn, engine, method
        self.device = backbone.device
        self.coeffs = method.c
        self.N = method.N
        self.rank, self.world_size = engine.rank, engine.world_size
        self.is_main = engine.is_main
        shards = cfg.sampling.data_shards or self.world_size
        if shards % self.world_size:
            raise ValueError(f"sampling.data_shards={shards} must be a multiple of the world size {self.world_size}")
        per = shards // self.world_size
        self.shards = list(range(self.rank * per, (self.rank + 1) * per))  # the data shards this rank owns
        self.prompts = prompt_source
        # state that a checkpoint carries
        self.epoch = 0
        self.update_in_epoch = 0
        self.fresh: Optional[Trajectories] = None
        self.buffer: Optional[Trajectories] = None
        self.bad_steps = 0
        self.history: list[dict] = []
        self._stop_signal: Optional[int] = None
        self._epoch_acc: dict = {}
        from fastnabla.metrics import EvalContext

        self.eval_ctx = EvalContext(cfg=cfg, backbone=backbone, reward_fn=reward_fn, device=self.device,
                                    out_dir=self.out_dir, is_main=self.is_main, history=self.history,
                                    sample_final=self.sample_final)

    # --- sampling ---------------------------------------------------------------------------------------------
    def sample(self, epoch: int) -> Trajectories:
        sc = self.cfg.sampling
        bar = _progress(len(self.shards) * sc.num_batches * self.N, f"epoch {epoch} sampling",
                        self.cfg.logging.progress and self.is_main)
        parts = []
        # train.ema_sampling: the trajectories come from the policy EMA (two timescales), else the live policy
        average = self.engine.policy_average() if self.cfg.train.ema_sampling else contextlib.nullcontext()
        with average:
            for shard in self.shards:  # one shard per rank unless sampling.data_shards says otherwise
                g = torch.Generator().manual_seed(_seed(self.cfg.seed, epoch, shard, 1))
                for _ in range(sc.num_batches):
                    prompts = self.prompts.sample(sc.batch_size, g) if self.backbone.conditional else None
                    tr = sample_trajectories(self.backbone, sc.batch_size, g, self.coeffs, prompts, self.reward_fn,
                                             progress=bar, guide=self.method.guide,
                                             policy_from=self.method.policy_from,
                                             policy_to=self.method.policy_to)
                    parts.append(self.method.prepare(tr))
        if bar is not None:
            bar.close()
        return self.method.prepare_epoch(Trajectories.cat(parts))

    @torch.no_grad()
    def sample_final(self, n: int, seed: int) -> tuple[torch.Tensor, Optional[list]]:
        """n clean samples of the current policy (its EMA with ``train.ema_decay``; no trajectories kept) and their
        prompts, in batches.

        Prompts come from ``prompts.eval`` (the training set when unset), drawn with ``prompts.eval_seed``, so every
        evaluation of a run scores the same prompts with the same noise."""
        g = torch.Generator().manual_seed(seed)
        pg = torch.Generator().manual_seed(self.cfg.prompts.eval_seed)
        bs = max(self.cfg.sampling.batch_size, 1024) if not self.backbone.conditional else self.cfg.sampling.batch_size
        outs, prompts_all = [], [] if self.backbone.conditional else None
        with self.engine.policy_average():  # the EMA weights when train.ema_decay > 0
            for s in range(0, n, bs):
                m = min(bs, n - s)
                prompts = self.eval_prompts.sample(m, pg) if self.backbone.conditional else None
                tr = sample_trajectories(self.backbone, m, g, self.coeffs, prompts, None, keep_trajectory=False,
                                         guide=self.method.guide, policy_from=self.method.policy_from,
                                         policy_to=self.method.policy_to)
                outs.append(tr.xs[:, -1].cpu())
                if prompts is not None:
                    prompts_all += prompts
        return torch.cat(outs), prompts_all

    @property
    def eval_prompts(self):
        if self.cfg.prompts.eval is None:
            return self.prompts
        if getattr(self, "_eval_prompts", None) is None:
            from fastnabla.prompts import PromptSource

            self._eval_prompts = PromptSource(self.cfg.prompts.eval, column=self.cfg.prompts.column)
        return self._eval_prompts

    # --- the transitions of one epoch -------------------------------------------------------------------------
    def plan(self, epoch: int, n_traj: int) -> list[list[torch.Tensor]]:
        """Updates of the epoch, each a list of micro-batches of (trajectory, step) index pairs.

        Each owned data shard (a contiguous block of the trajectories) is planned from its own seed; micro-batch k
        of the update joins micro-batch k of every owned shard."""
        n_shard = n_traj // len(self.shards)
        per_shard = []
        for j, shard in enumerate(self.shards):
            g = torch.Generator().manual_seed(_seed(self.cfg.seed, epoch, shard, 2))
            sel = self.method.select(n_shard, g)
            pairs = torch.stack([torch.arange(n_shard).repeat_interleave(sel.shape[1]), sel.reshape(-1)], 1)
            pairs = pairs[torch.randperm(pairs.shape[0], generator=g)]
            pairs[:, 0] += j * n_shard
            per_shard.append(list(pairs.split(self.cfg.train.batch_size or pairs.shape[0])))
        micro = [torch.cat(parts) for parts in zip(*per_shard)]
        acc = self.cfg.train.gradient_accumulation_steps
        return [micro[i : i + acc] for i in range(0, len(micro), acc)]

    # --- one update -------------------------------------------------------------------------------------------
    def update(self, tr: Trajectories, micro: list[torch.Tensor]) -> dict:
        """One optimizer update over ``micro`` (a list of (B_i, 2) index micro-batches).

        Each item's loss is divided by the update's item count Σ B_i, so the gradient is the mean over the update's
        transitions however the micro-batches split them (a short last update of an epoch included). Statistics
        accumulate on the device and are read once per update."""
        total = sum(int(idx.shape[0]) for idx in micro)
        stats_sum, finite = {}, True
        self.method.item_grad = 1.0 / total
        self.engine.begin_update(len(micro))
        for idx in micro:
            loss_b, stats = self.method(self.method.gather(tr, idx, self.device))
            loss = loss_b.sum() / total
            if not self.engine.finite(loss):  # collective under DeepSpeed: one rank non-finite → all skip
                finite = False
                break
            self.engine.backward(loss)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v.detach().double().sum()
            stats_sum["loss"] = stats_sum.get("loss", 0.0) + loss_b.detach().double().sum()
        if finite:
            info = self.engine.step()
            out = dict(zip(stats_sum, torch.stack(list(stats_sum.values())).div(total).tolist()))  # one host read
        else:
            self.engine.skip(loss)
            info = {"grad_norm_policy": float("nan"), "grad_norm_flow": float("nan"), "skipped": True}
            out = {}
        out.update(info)
        return out

    # --- the loop ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {  # under DeepSpeed the engine's own checkpoint holds the weights and optimizer state
            "trainables": None if self.engine.owns_weights else self.backbone.trainable_state_dict(),
            "engine": self.engine.state_dict(),
            "rng": ckpt.rng_state(),
            "epoch": self.epoch,
            "update_in_epoch": self.update_in_epoch,
            "fresh": None if self.fresh is None else self.fresh.state_dict(),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "bad_steps": self.bad_steps,
            "history": self.history,
            "epoch_acc": self._epoch_acc,
            "method": self.method.state_dict(),
            "world_size": self.world_size,
            "config": config_to_dict(self.cfg),
        }

    def load_state_dict(self, s: dict) -> None:
        if s.get("world_size", 1) != self.world_size:
            raise ValueError(f"checkpoint was written with world size {s['world_size']}, this run has "
                             f"{self.world_size}; resume with the same number of processes")
        if s["trainables"] is not None:
            self.backbone.load_trainable_state_dict(s["trainables"])
        self.engine.load_state_dict(s["engine"])
        ckpt.set_rng_state(s["rng"])
        self.epoch, self.update_in_epoch = s["epoch"], s["update_in_epoch"]
        self.fresh = None if s["fresh"] is None else Trajectories.from_state_dict(s["fresh"], self.device)
        self.buffer = None if s["buffer"] is None else Trajectories.from_state_dict(s["buffer"], self.device)
        self.bad_steps, self._epoch_acc = s["bad_steps"], s["epoch_acc"]
        self.method.load_state_dict(s.get("method", {}))
        self.history[:] = s["history"]  # in place: the evaluation context holds this list

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    def save(self) -> str:
        name = f"{ckpt.PREFIX}{self.epoch:06d}_{self.update_in_epoch:05d}"
        path = ckpt.save_checkpoint(self.ckpt_root, name, self.state_dict(), self.cfg.checkpoint.keep_last,
                                    engine=self.engine)
        if self.is_main:
            log.info("checkpoint written: %s", path)
        return path

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def run(self) -> dict:
        cfg = self.cfg
        if cfg.checkpoint.resume_from:
            path = ckpt.resolve_resume(cfg.checkpoint.resume_from, self.ckpt_root, engine=self.engine)
            self.load_state_dict(ckpt.load_checkpoint(path, engine=self.engine))
            if self.is_main:
                log.info("resumed from %s (epoch %d, update %d)", path, self.epoch, self.update_in_epoch)
        if self.is_main:
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                import yaml

                yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
            self._trim_metrics_log()
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, self._on_signal)
        try:
            while self.epoch < cfg.train.epochs:
                if not self.run_epoch():
                    return {"stopped": True, "epoch": self.epoch}
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self.finish()

    def _trim_metrics_log(self):
        """metrics.jsonl holds this run's epochs only: a fresh run into a used output directory starts it empty, and a
        resumed one keeps the rows of the epochs before its checkpoint's (rows written after that checkpoint are
        written again; a line cut short by a crash is dropped). Rewritten atomically."""
        path = os.path.join(self.out_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return

        def before(line):
            try:
                return json.loads(line).get("epoch", -1) < self.epoch
            except ValueError:
                return False

        with open(path) as f:
            keep = [line for line in f if line.strip() and before(line)]

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)

        ckpt.atomic_write(path, write)

    def _stop_requested(self) -> bool:
        # collective: a signal that reached one rank stops every rank at the same update (checkpoints are collective)
        if not self.engine.any(self._stop_signal is not None):
            return False
        if self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        path = self.save()
        if self.is_main:
            log.warning("received signal %d: checkpoint written to %s; resume with checkpoint.resume_from=latest",
                        self._stop_signal, path)
        return True

    def run_epoch(self) -> bool:
        """One epoch from wherever the state says; False if a signal stopped it (a checkpoint is written)."""
        cfg, e = self.cfg, self.epoch
        t0 = time.time()
        lag = self.method.sample_lag
        if lag == 1 and self.buffer is None:  # epoch 0: the batch it trains on (seeded as epoch −1)
            if self._stop_requested():
                return False
            self.buffer = self.sample(e - 1)
        if self.fresh is None:
            if self._stop_requested():
                return False
            self.fresh = self.sample(e)
            self._epoch_acc = {}
        tr = self.buffer if lag == 1 else self.fresh
        updates = self.plan(e, len(tr))
        bar = _progress(len(updates), f"epoch {e} training", cfg.logging.progress and self.is_main)
        if bar is not None:
            bar.update(self.update_in_epoch)
        acc = self._epoch_acc
        while self.update_in_epoch < len(updates):
            if self._stop_requested():
                return False
            self.engine.progress = (e + self.update_in_epoch / len(updates)) / cfg.train.epochs
            info = self.update(tr, updates[self.update_in_epoch])
            self.update_in_epoch += 1
            if info["skipped"]:
                self.bad_steps += 1
                acc["skipped"] = acc.get("skipped", 0) + 1
                log.warning("epoch %d update %d: non-finite loss or gradients, update skipped (%d in a row)",
                            e, self.update_in_epoch - 1, self.bad_steps)
                if self.bad_steps >= cfg.train.max_bad_steps:
                    path = self.save()
                    raise TrainingStopped(
                        f"{self.bad_steps} non-finite updates in a row (train.max_bad_steps): stopping; checkpoint "
                        f"at {path}. Lower train.lr/gfn.reward_scale or raise gfn.trust_region_scale")
            else:
                self.bad_steps = 0
                for k, v in info.items():
                    if k != "skipped":
                        acc[k] = acc.get(k, 0.0) + v
                acc["updates"] = acc.get("updates", 0) + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{info.get('loss', float('nan')):.4g}")
        if bar is not None:
            bar.close()
        self._end_epoch(e, time.time() - t0)
        return True

    def _end_epoch(self, e: int, seconds: float) -> None:
        cfg = self.cfg
        acc = dict(self._epoch_acc)
        for k in sorted(acc):  # per-rank sums → means over ranks (every rank has the same keys and update count)
            if k not in ("updates", "skipped"):
                acc[k] = float(self.engine.all_reduce_mean(torch.tensor([float(acc[k])], dtype=torch.float64)))
        n = max(acc.get("updates", 0), 1)
        lr = self.engine.all_gather(self.fresh.log_reward.float())  # every rank's rewards
        rec = {"epoch": e, "updates_total": self.engine.updates, "reward_mean": float(lr.mean()),
               "reward_std": float(lr.std()) if lr.numel() > 1 else 0.0, "seconds": seconds,
               "skipped": acc.get("skipped", 0)}
        rec.update({k: v / n for k, v in acc.items() if k not in ("updates", "skipped")})
        from fastnabla import metrics

        finals = self.fresh.xs[:, -1]
        if self.world_size > 1:  # the metrics see every rank's final states
            finals = self.engine.all_gather(finals.contiguous())
        kl = self.fresh.extras.get("path_kl")  # (n, N): the method's per-step KL to the reference, when it has one
        if kl is not None:
            rec["kl_path_batch"] = float(self.engine.all_gather(kl.contiguous()).sum(1).mean())
        rec.update(metrics.epoch_metrics(self.eval_ctx, finals, lr, rec.get("kl_path_batch")))
        is_last = e + 1 >= cfg.train.epochs
        if cfg.eval.every and ((e + 1) % cfg.eval.every == 0) and not is_last:
            rec.update(metrics.evaluate(self.eval_ctx, final=False))
        self.buffer, self.fresh = self.fresh, None
        self.epoch, self.update_in_epoch = e + 1, 0
        self.history.append(rec)
        if self.is_main:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            log.info("epoch %d: " + " ".join(f"{k}={v:.4g}" for k, v in rec.items()
                                               if isinstance(v, float) and k in _SHOW), e)
        if cfg.checkpoint.every and (e + 1) % cfg.checkpoint.every == 0 and not is_last:
            self.save()

    def finish(self) -> dict:
        from fastnabla import metrics

        result = metrics.evaluate(self.eval_ctx, final=True)
        self.save()
        with self.engine.gathered_parameters(), self.engine.policy_average():  # ZeRO-3 gathers: collective
            if self.is_main:
                final = os.path.join(self.out_dir, "final")
                os.makedirs(final, exist_ok=True)
                self.backbone.save_pretrained(final)
        # the resolved objective (config.yaml holds it too): which recipe ran, with every key the recipe filled in
        result["method"] = {"name": self.cfg.method.name, **config_to_dict(self.cfg)["gfn"]}
        if self.is_main:
            with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
                json.dump(result, f, indent=2)
        return result


_SHOW = ("reward_mean", "loss", "tv", "tv_batch", "off_manifold", "seconds")
