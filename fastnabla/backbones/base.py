"""The one interface the trainer talks to. A backbone owns the networks, the scheduler and the decoder.

The trainer never touches a UNet, a VAE or a text encoder directly: it asks the backbone for

- ``encode(prompts)``: the conditioning of a batch (None for an unconditional backbone);
- ``sample_noise(n, generator)``: x_0 ~ N(0, I) in the backbone's state space, shape (n, *sample_shape);
- ``policy(x, t, cond)``: the finetuned network's output at (x, t), classifier-free guidance applied when the
  backbone is conditional; differentiable w.r.t. x and the policy parameters;
- ``reference(x, t, cond)``: the pretrained network's output at (x, t) (guidance applied), without gradients;
- ``reference_sampling()``: a context inside which ``policy`` returns ``reference``'s output, so the trainer's own
  sampler draws from p_ref (the pretrained samples of the evaluation); each ``policy`` checks
  ``self._reference_sampling`` first;
- ``reference_vjp(x, t, cond, cotangent)``: the reference's output and its input-VJP (∂out_ref/∂x)ᵀ·w with
  w = cotangent(out_ref), forward and backward in one context (a LoRA backbone keeps its adapters off through the
  backward, where checkpointed blocks recompute);
- ``flow(x, t, cond)``: the residual flow-score network g_φ(x, t, c), same shape as x; differentiable;
- ``decode(x)``: the clean state → what the reward scores (images in [0, 1] for SD, 2-D points for toy2d);
  differentiable w.r.t. x;
- ``policy_parameters()`` / ``flow_parameters()``: the two trainable parameter groups;
- ``trainable_state_dict()`` / ``load_trainable_state_dict(sd)``: what a checkpoint stores;
- ``save_pretrained(directory)``: the finetuned weights in the backbone's native format (SD: a diffusers LoRA);
- evaluation hooks: ``target_metrics(samples, reward_cfg, beta, final)`` (figures against the tilted target that
  this backbone can compute exactly; toy2d's mode-weight TV), ``report_plots(...)`` (its pictures),
  ``benchmark`` (the name of a benchmark evaluation in ``fastnabla.metrics``, e.g. "digits") and
  ``min_final_samples``.

``t`` is always a (B,) long tensor of the scheduler's timesteps (per-sample timesteps are allowed). All tensors
live on ``self.device``; ``x`` is float32 in the trainer, the backbone casts to its weights' dtype inside.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn


class Backbone(nn.Module):
    """Base class of the backbones (see the module docstring for the contract)."""

    #: shape of one state x, e.g. (2,) for toy2d, (4, 64, 64) for SD1.5 at 512×512.
    sample_shape: tuple
    #: whether ``encode`` returns a conditioning (and ``policy``/``reference`` apply CFG).
    conditional: bool = False
    #: the diffusers scheduler, ``set_timesteps`` already called with the sampling step count.
    scheduler: Any
    #: DDIM η used for sampling and for the transition coefficients.
    eta: float = 1.0
    #: a benchmark evaluation of ``fastnabla.metrics`` this backbone's runs get (None: the generic one)
    benchmark: Optional[str] = None
    #: the final evaluation draws at least this many samples
    min_final_samples: int = 0
    #: attribute paths ("vae.decoder") of the networks ``compile_networks`` compiles (absent or None ones are skipped)
    compiled_networks: tuple = ()
    #: set inside ``reference_sampling()``: ``policy`` then returns the reference's output
    _reference_sampling: bool = False

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # --- conditioning -------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Optional[torch.Tensor]:
        return None

    # --- networks -----------------------------------------------------------------------------------------------
    def sample_noise(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randn((n, *self.sample_shape), generator=generator, device="cpu").to(self.device)

    def policy(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def flow(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def reference_sampling(self):
        """Inside this context ``policy`` returns the reference's output: the sampler then draws from p_ref (what
        the importance-sampled ground truth and the pretrained-sample metrics need, with the training sampler)."""
        old, self._reference_sampling = self._reference_sampling, True
        try:
            yield
        finally:
            self._reference_sampling = old

    def reference_scope(self):
        """The context the reference runs in, forward and backward. A backbone whose reference is the policy's
        network with its LoRA adapters off returns ``adapters_off()``: a gradient-checkpointed network recomputes
        its blocks during the backward, and must recompute the reference there, not the policy."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def adapters_off(self):
        """Adapters off inside (re-entrant: only the outermost entry and exit switch them), via ``_set_adapters``."""
        depth = getattr(self, "_adapters_off_depth", 0)
        self._adapters_off_depth = depth + 1
        if depth == 0:
            self._set_adapters(False)
        try:
            yield
        finally:
            self._adapters_off_depth = depth
            if depth == 0:
                self._set_adapters(True)

    def _set_adapters(self, on: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no adapters to switch")

    def reference_vjp(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor],
                      cotangent) -> tuple[torch.Tensor, torch.Tensor]:
        """(out_ref, (∂out_ref/∂x)ᵀ·cotangent(out_ref)), both detached, in x's dtype. The forward and the backward
        both run inside ``reference_scope()``."""
        with torch.enable_grad(), self.reference_scope():
            x = x.detach().requires_grad_(True)
            out = self.reference(x, t, cond).to(x.dtype)
            (g,) = torch.autograd.grad(out, x, grad_outputs=cotangent(out.detach()))
        return out.detach(), g

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def compile_networks(self, **options) -> list[str]:
        """``torch.compile`` each network of ``compiled_networks`` in place (``nn.Module.compile``: parameter names,
        state dicts and checkpoints stay as they are; ``train.compile``). Returns the names compiled."""
        def resolve(path):
            m = self
            for part in path.split("."):
                m = getattr(m, part, None)
            return m

        names = [n for n in self.compiled_networks if isinstance(resolve(n), nn.Module)]
        for n in names:
            resolve(n).compile(**options)
        return names

    # --- parameters and saving ----------------------------------------------------------------------------------
    def policy_parameters(self) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def build_value_net(self, channels: Sequence[int], kind: str = "unet") -> nn.Module:
        """A fresh network of ``kind`` (``gfn.value_net``) whose output's mean is the logit of a value h_φ(x, t)
        (``fastnabla.value``)."""
        raise ValueError(f"gfn.value_guidance needs a value network, which the {type(self).__name__} backbone does not "
                         "build (the pixel backbone does); set gfn.value_guidance=0")

    def flow_parameters(self) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def trainable_state_dict(self) -> dict:
        """Policy and flow trainables only (what a checkpoint needs), keyed by parameter name."""
        names = {id(p) for p in list(self.policy_parameters()) + list(self.flow_parameters())}
        return {k: v.detach().clone() for k, v in self.named_parameters() if id(v) in names}

    def load_trainable_state_dict(self, state: dict) -> None:
        params = dict(self.named_parameters())
        missing = [k for k in self.trainable_state_dict() if k not in state]
        if missing:
            raise ValueError(f"checkpoint lacks trainable parameters {missing[:3]}…; was it saved by another model?")
        with torch.no_grad():
            for k, v in state.items():
                if k not in params:
                    raise ValueError(f"checkpoint has parameter {k!r} that this model does not; wrong model config?")
                if params[k].shape != v.shape:
                    raise ValueError(f"checkpoint parameter {k!r} has shape {tuple(v.shape)}, model expects "
                                     f"{tuple(params[k].shape)}")
                params[k].copy_(v)

    def save_pretrained(self, directory: str) -> None:
        torch.save(self.trainable_state_dict(), f"{directory}/trainables.pt")

    # --- evaluation hooks -----------------------------------------------------------------------------------------
    def target_metrics(self, samples: torch.Tensor, reward_cfg, beta: float, final: bool = False) -> dict:
        """Figures of clean ``samples`` (n, *S) against the exact tilted target p_ref·R^β, where this backbone knows
        it for the configured reward; {} otherwise."""
        return {}

    def report_plots(self, samples: torch.Tensor, reward_cfg, beta: float, out_dir: str, title: str = "") -> list:
        """Paths of the pictures this backbone draws of final ``samples`` (written into ``out_dir``)."""
        return []
