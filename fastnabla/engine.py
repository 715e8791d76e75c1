"""The trainer's one door to optimisation: parameter groups, optimizer, clipping, accumulation, skipping.

Two parameter groups with their own learning rate and weight decay (ALGORITHM §5): the policy trainables and the
flow network. Gradients are clipped per group (``max_grad_norm``); an update whose loss or gradients are not
finite is skipped (gradients dropped) and reported, so the trainer can count bad steps.

``Engine`` is plain PyTorch in one process. ``DeepSpeedEngine`` (``train.deepspeed`` set; see
docs/distributed.md) runs the same contract over several processes with ZeRO 0–3. ``build_engine`` picks one.
The trainer calls, per update of ``n`` micro-batches: ``begin_update(n)``; for each micro-batch
``finite(loss)`` then ``backward(loss)``; then ``step()``, or ``skip(loss)`` after a non-finite loss.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from typing import Iterable, Optional

import torch

__all__ = ["Engine", "DeepSpeedEngine", "CollectiveTimeout", "build_engine", "build_optimizer", "init_distributed",
           "setup_device",
           "resolve_deepspeed_config"]


def build_optimizer(name: str, groups: list[dict], betas=(0.9, 0.999)):
    """adamw (torch) | adamw8bit | lion8bit (bitsandbytes, which also steps CPU tensors)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(betas), eps=1e-8)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RuntimeError(f"train.optimizer={name} needs bitsandbytes: pip install 'fastnabla[8bit]'") from None
    if name == "adamw8bit":
        # bitsandbytes keeps tensors under min_8bit_size (default 4096) in 32-bit; LoRA matrices are mostly smaller
        return bnb.optim.AdamW8bit(groups, betas=tuple(betas), eps=1e-8, min_8bit_size=256)
    if name == "lion8bit":
        return bnb.optim.Lion8bit(groups, betas=tuple(betas), min_8bit_size=256)
    raise ValueError(f"train.optimizer={name!r}: must be adamw, adamw8bit or lion8bit")


def set_group_lrs(groups: list[dict], train_cfg, updates: int, progress: float) -> None:
    """Each group's learning rate for the coming update: its base lr (``train.lr`` / ``train.flow_lr``) times the
    schedule of ``train.lr_schedule`` at ``progress`` (the fraction of the run done), times a linear warm-up over
    ``train.flow_warmup_updates`` / ``train.policy_warmup_updates``. Cosine decays to ``train.lr_min_ratio``·base at
    the end."""
    t = train_cfg
    decay = 1.0
    if t.lr_schedule == "cosine":
        decay = t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    for i, g in enumerate(groups):
        flow = g.get("name", "flow" if i == 1 else "policy") == "flow"
        span = t.flow_warmup_updates if flow else t.policy_warmup_updates
        warm = min(1.0, (updates + 1) / span) if span > 0 else 1.0
        g["lr"] = (t.flow_lr if flow else t.lr) * decay * warm


class PolicyEMA:
    """Exponential moving average of the policy's trainables (``train.ema_decay``), kept in float32.

    Training samples with the live policy (with the average under ``train.ema_sampling``); evaluation, the final
    samples and the exported weights use the average,
    which smooths the update-to-update jitter of the policy (a window of about 1/(1 − decay) updates).
    """

    def __init__(self, params: list, decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in place of the live ones inside the block."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(live, self.params):
                    p.copy_(v)

    def state_dict(self) -> list:
        return [s.cpu() for s in self.shadow]

    def load_state_dict(self, state: list) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"checkpoint's policy EMA has {len(state)} tensors, this model {len(self.shadow)}")
        for s, v in zip(self.shadow, state):
            s.copy_(v)


class Engine:
    """Plain PyTorch on one process."""

    world_size = 1
    rank = 0

    def __init__(self, policy_params: Iterable[torch.nn.Parameter], flow_params: Iterable[torch.nn.Parameter],
                 train_cfg):
        self.cfg = train_cfg
        self.policy_params = [p for p in policy_params if p.requires_grad]
        self.flow_params = [p for p in flow_params if p.requires_grad]
        groups = [dict(params=self.policy_params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, name="policy")]
        if self.flow_params:
            groups.append(dict(params=self.flow_params, lr=train_cfg.flow_lr, weight_decay=train_cfg.flow_weight_decay,
                               name="flow"))
        self.optimizer = build_optimizer(train_cfg.optimizer, groups, train_cfg.betas)
        self.updates = 0
        self.ema = PolicyEMA(self.policy_params, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None

    def policy_average(self):
        """Context with the policy's EMA weights in place (``train.ema_decay``); the live weights without one."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    #: whether ``save_checkpoint``/``load_checkpoint`` carry the trainable weights (else the trainer's state does)
    owns_weights = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def begin_update(self, num_micro_batches: int) -> None:
        """Announce how many ``backward`` calls the coming update has (the last one is the reduction boundary)."""

    def finite(self, loss: torch.Tensor) -> bool:
        return bool(torch.isfinite(loss))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    #: fraction of the run done at the coming update, in [0, 1) (set by the trainer; drives ``train.lr_schedule``)
    progress = 0.0

    def _set_lr(self) -> None:
        set_group_lrs(self.optimizer.param_groups, self.cfg, self.updates, self.progress)

    def step(self) -> dict:
        """Clip per group, step unless something is non-finite, zero the gradients. Returns diagnostics."""
        norms = {}
        for name, params in (("policy", self.policy_params), ("flow", self.flow_params)):
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                norms[name] = 0.0
                continue
            max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = all(math.isfinite(v) for v in norms.values())
        if finite:
            self._set_lr()
            self.optimizer.step()
            self.updates += 1
            if self.ema is not None:
                self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm_policy": norms["policy"], "grad_norm_flow": norms["flow"], "skipped": not finite}

    def skip(self, loss: Optional[torch.Tensor] = None) -> None:
        """Drop accumulated gradients without stepping (a non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    # --- collectives (identities in one process) -------------------------------------------------------------
    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along dim 0, in rank order (same shape on every rank)."""
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return bool(flag)

    def barrier(self) -> None:
        pass

    def gathered_parameters(self):
        """Context in which every trainable parameter is whole (ZeRO-3 partitions them); collective."""
        return contextlib.nullcontext()

    def save_checkpoint(self, directory: str) -> None:
        """Write what the engine itself checkpoints into ``directory`` (collective under DeepSpeed)."""

    def load_checkpoint(self, directory: str) -> None:
        pass

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "updates": self.updates,
                "ema": None if self.ema is None else self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]
        _load_ema(self.ema, state)


# --- DeepSpeed ---------------------------------------------------------------------------------------------------

def _load_ema(ema: Optional[PolicyEMA], state: dict) -> None:
    saved = state.get("ema")
    if (ema is None) != (saved is None):
        raise ValueError("the checkpoint and this run disagree on train.ema_decay (one keeps a policy EMA, the other "
                         "does not); resume with the checkpoint's config.yaml setting")
    if ema is not None:
        ema.load_state_dict(saved)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``train.collective_timeout_s``: another rank died, hung or lags."""


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise RuntimeError("train.deepspeed is set but deepspeed is not installed: pip install 'fastnabla[deepspeed]'") \
            from None
    return deepspeed


def setup_device(train_cfg) -> torch.device:
    """The device this process trains on. Under DeepSpeed it first joins the process group, which on CUDA picks this
    rank's GPU (so call it before building models)."""
    if train_cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    if train_cfg.deepspeed:
        init_distributed(train_cfg)
    if train_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train_cfg.device)


def init_distributed(train_cfg) -> int:
    """Join the process group (gloo on CPU, nccl on CUDA) with ``train.collective_timeout_s``; returns the local rank.

    Works under the ``deepspeed`` launcher, ``torchrun`` (both set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
    MASTER_PORT) and as a bare single process (no variables: this process becomes rank 0 of 1).
    """
    deepspeed = _import_deepspeed()
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    os.environ.setdefault("LOCAL_RANK", "0")
    _, _, local_rank = _dist_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        # DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce op (~30 s, a C++ toolchain
        # needed) that only its inference path uses; training collectives go through torch.distributed (gloo).
        try:
            import deepspeed.ops as ds_ops

            ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
        except Exception:  # an older/newer layout: the op is then built and cached as usual
            pass
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=train_cfg.collective_timeout_s),
                                   verbose=False)
    return local_rank


_AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size")


def resolve_deepspeed_config(source, train_cfg, world_size: int) -> dict:
    """Load the DeepSpeed JSON and fill its ``"auto"`` values from the fastnabla config.

    "auto" is a convention of the HF Trainer, not of DeepSpeed; fastnabla resolves it here:
    ``train_micro_batch_size_per_gpu`` ← ``train.batch_size`` (1 when 0: the trainer's loss is already a mean,
    so the value only feeds DeepSpeed's bookkeeping), ``gradient_accumulation_steps`` ←
    ``train.gradient_accumulation_steps``, ``gradient_clipping`` ← ``train.max_grad_norm``, ``train_batch_size`` ←
    their product × world size. A number that contradicts the fastnabla config is an error, as is an
    ``optimizer``/``scheduler`` section (the optimizer comes from ``train.optimizer``/``train.lr``).
    """
    if isinstance(source, dict):
        cfg, where = json.loads(json.dumps(source)), "the DeepSpeed config"
    else:
        where = f"train.deepspeed={source}"
        try:
            with open(source, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: file not found (shipped configs: configs/deepspeed/zero{{0,1,2,3}}.json)") \
                from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: the top level must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"{where}: remove the {key!r} section; fastnabla builds the optimizer from train.optimizer, "
                             "train.lr, train.flow_lr and their weight decays (a client optimizer, no fused op to compile)")
    if cfg.get("fp16", {}).get("enabled", False) is True:
        raise ValueError(f"{where}: fp16 is not supported (its loss scaling would hide non-finite updates); use bf16")
    micro = train_cfg.batch_size or 1
    want = {"train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": train_cfg.gradient_accumulation_steps,
            "gradient_clipping": float(train_cfg.max_grad_norm),
            "train_batch_size": micro * train_cfg.gradient_accumulation_steps * world_size}
    fastnabla_key = {"train_micro_batch_size_per_gpu": "train.batch_size",
                     "gradient_accumulation_steps": "train.gradient_accumulation_steps",
                     "gradient_clipping": "train.max_grad_norm",
                     "train_batch_size": "train.batch_size × train.gradient_accumulation_steps × world size"}
    for key in _AUTO_KEYS:
        v = cfg.get(key, "auto")
        if v == "auto" or v is None:
            cfg[key] = want[key]
        elif not isinstance(v, (int, float)) or float(v) != float(want[key]):
            if key == "train_micro_batch_size_per_gpu" and train_cfg.batch_size == 0:
                continue  # the whole epoch is one micro-batch; DeepSpeed's number is bookkeeping only
            raise ValueError(f"{where}: {key}={v!r} contradicts {fastnabla_key[key]} (= {want[key]}); set it to "
                             "\"auto\" or make the two agree")
    zero = cfg.setdefault("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ValueError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3")
    cfg.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW / bitsandbytes as client optimizers
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def trainable_modules(model: torch.nn.Module, trainables: list) -> torch.nn.Module:
    """The part of ``model`` that DeepSpeed should own: its direct children holding any trainable parameter.

    Frozen children (SD's VAE, text encoder, reference UNet) stay outside DeepSpeed: ZeRO-3 does not partition
    them (code that reads their weights outside a forward, like CLIP's position-embedding size check, keeps
    working) and bf16 does not recast them. Falls back to ``model`` when it holds trainables directly."""
    ids = {id(p) for p in trainables}
    if any(id(p) in ids for p in model.parameters(recurse=False)):
        return model
    kids = [m for m in model.children() if any(id(p) in ids for p in m.parameters())]
    return torch.nn.ModuleList(kids) if kids else model


class DeepSpeedEngine(Engine):
    """The same contract over ``deepspeed.initialize`` (ZeRO 0–3, bf16, several processes).

    Differences from ``Engine`` (documented in docs/distributed.md):
    - clipping is DeepSpeed's: one global norm over both parameter groups (``gradient_clipping`` =
      ``train.max_grad_norm``), not one norm per group; ``grad_norm_policy``/``grad_norm_flow`` are per group under
      ZeRO-0 and both the global norm under ZeRO 1–3, where gradients are partitioned;
    - gradients are averaged over ranks; the finiteness of a loss is decided collectively (any rank non-finite →
      every rank skips), so every rank runs the same number of backward passes and collectives stay aligned;
    - the engine owns the weights and optimizer state in checkpoints (``save_checkpoint``: DeepSpeed's own
      format, sharded under ZeRO).
    """

    owns_weights = True

    def __init__(self, model: torch.nn.Module, policy_params: Iterable[torch.nn.Parameter],
                 flow_params: Iterable[torch.nn.Parameter], train_cfg):
        deepspeed = _import_deepspeed()
        init_distributed(train_cfg)
        self.cfg = train_cfg
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.timeout_s = train_cfg.collective_timeout_s
        self.policy_params = [p for p in policy_params if p.requires_grad]
        self.flow_params = [p for p in flow_params if p.requires_grad]
        self.ds_config = resolve_deepspeed_config(train_cfg.deepspeed, train_cfg, self.world_size)
        self.stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        groups = [dict(params=self.policy_params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, name="policy")]
        if self.flow_params:
            groups.append(dict(params=self.flow_params, lr=train_cfg.flow_lr, weight_decay=train_cfg.flow_weight_decay,
                               name="flow"))
        optimizer = build_optimizer(train_cfg.optimizer, groups, train_cfg.betas)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=trainable_modules(model, self.trainables),
                                                             optimizer=optimizer, config=self.ds_config,
                                                             dist_init_required=False)
        self.updates = 0
        self._n_micro, self._micro = 1, 0
        if train_cfg.ema_decay > 0 and self.stage == 3:
            raise ValueError("train.ema_decay needs whole policy weights on every rank, and ZeRO stage 3 partitions "
                             "them; use ZeRO stage 2 (configs/deepspeed/zero2.json) or train.ema_decay=0")
        self.ema = PolicyEMA(self.policy_params, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None

    @property
    def trainables(self) -> list:
        return self.policy_params + self.flow_params

    # --- the update ------------------------------------------------------------------------------------------
    def begin_update(self, num_micro_batches: int) -> None:
        self._n_micro, self._micro = max(int(num_micro_batches), 1), 0

    def finite(self, loss: torch.Tensor) -> bool:
        return not self.any(not bool(torch.isfinite(loss)))

    def backward(self, loss: torch.Tensor) -> None:
        # The boundary (where ZeRO-0/1 reduce and ZeRO-2/3 finish their reduce-scatter) is the update's last
        # micro-batch, so an update with fewer micro-batches (the epoch's tail) is still one whole update.
        self._micro += 1
        self.ds.set_gradient_accumulation_boundary(self._micro >= self._n_micro)
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer already divides by the accumulation steps

    progress = 0.0

    def _set_lr(self) -> None:
        set_group_lrs(self.ds.optimizer.param_groups, self.cfg, self.updates, self.progress)

    def _group_norms(self) -> tuple[float, float]:
        def norm(params):
            gs = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            return float(torch.stack(gs).norm()) if gs else 0.0

        return norm(self.policy_params), norm(self.flow_params)

    def step(self) -> dict:
        self._set_lr()
        if self.stage == 0:
            # Whole, already averaged gradients: check them here, since DeepSpeed's ZeRO-0 path steps regardless.
            pn, fn = self._group_norms()
            if not (math.isfinite(pn) and math.isfinite(fn)):
                self.ds.zero_grad()
                self.ds.set_gradient_accumulation_boundary(False)
                return {"grad_norm_policy": pn, "grad_norm_flow": fn, "skipped": True}
            self.ds.step()
            skipped = False
        else:
            self.ds.step()  # ZeRO 1–3 skip (and drop the gradients) when the global norm is not finite
            skipped = bool(getattr(self.ds.optimizer, "overflow", False))
            g = self.ds.get_global_grad_norm()
            pn = fn = float(g) if g is not None else float("nan")
        self.ds.set_gradient_accumulation_boundary(False)
        if not skipped:
            self.updates += 1
            if self.ema is not None:
                self.ema.update()
        return {"grad_norm_policy": pn, "grad_norm_flow": fn, "skipped": skipped}

    def skip(self, loss: Optional[torch.Tensor] = None) -> None:
        if self.stage == 0 or loss is None or not loss.requires_grad:
            self.ds.zero_grad()
        else:
            # ZeRO keeps partially reduced gradients in its own buffers. Let it drop them the way it drops an
            # overflowing step: finish the update with a NaN backward (same number of backward passes on every rank)
            # and step; the non-finite global norm makes every rank skip and clear.
            self._micro = self._n_micro - 1
            self.backward(loss * float("nan"))
            self.ds.step()
        self.ds.set_gradient_accumulation_boundary(False)

    # --- collectives -----------------------------------------------------------------------------------------
    def _collective(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as e:  # gloo/nccl report a timeout or a vanished peer as a RuntimeError subclass
            raise CollectiveTimeout(
                f"rank {self.rank}/{self.world_size}: collective {what!r} failed or did not complete within "
                f"train.collective_timeout_s={self.timeout_s:g} s: another rank crashed, hung or is far behind "
                f"(check its log; raise train.collective_timeout_s if ranks are just slow). Cause: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

    def _comm_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.device("cuda", torch.cuda.current_device())) if torch.cuda.is_available() else t.cpu()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        x = t.detach().clone()
        x = self._comm_device(x if x.is_floating_point() else x.float())
        self._collective("all_reduce", lambda: torch.distributed.all_reduce(x))
        return (x / self.world_size).to(t.device)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        x = self._comm_device(t.detach().contiguous())
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        self._collective("all_gather", lambda: torch.distributed.all_gather(out, x))
        return torch.cat(out).to(t.device)

    def any(self, flag: bool) -> bool:
        x = self._comm_device(torch.tensor([1 if flag else 0], dtype=torch.int32))
        self._collective("all_reduce(max)", lambda: torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX))
        return bool(x.item())

    def barrier(self) -> None:
        self._collective("barrier", torch.distributed.barrier)

    def gathered_parameters(self):
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(self.trainables, modifier_rank=None)
        return contextlib.nullcontext()

    # --- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"updates": self.updates, "ema": None if self.ema is None else self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        _load_ema(self.ema, state)

    def save_checkpoint(self, directory: str) -> None:
        self.ds.save_checkpoint(directory, tag="deepspeed", save_latest=False)

    def load_checkpoint(self, directory: str) -> None:
        path, _ = self.ds.load_checkpoint(directory, tag="deepspeed", load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (tag 'deepspeed') to resume from")


def build_engine(model: torch.nn.Module, policy_params, flow_params, train_cfg,
                 reused_forward: bool = False) -> Engine:
    """``DeepSpeedEngine`` when ``train.deepspeed`` names a config, else the plain one-process ``Engine``.

    ``model`` is the module whose forward passes produce the loss (the backbone); DeepSpeed gets its children that
    hold trainables (``trainable_modules``), whose weights ZeRO-3 partitions and gathers around each forward. ``reused_forward``: the objective backpropagates through one
    policy forward more than once (the reverse loss: score VJP, reward gradient at x, then the loss).
    """
    if train_cfg.deepspeed:
        engine = DeepSpeedEngine(model, policy_params, flow_params, train_cfg)
        if engine.stage == 3 and reused_forward:
            # ZeRO-3 re-partitions a module's weights after the first backward through a forward; a second backward
            # through the same forward then finds them empty (DeepSpeed issues #3539, #7352; fixes pending upstream).
            raise ValueError("ZeRO stage 3 cannot run the reverse loss: it backpropagates three times through one "
                             "policy forward, and ZeRO-3 frees the weights after the first. Use ZeRO stage 2 "
                             "(configs/deepspeed/zero2.json), or gfn.reverse_scale=0 (or gfn.no_flow=true) with "
                             "stage 3")
        return engine
    return Engine(policy_params, flow_params, train_cfg)
