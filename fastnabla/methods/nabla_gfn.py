"""∇-GFlowNet (residual ∇-DB, ALGORITHM §3–§5b): the per-transition terms for a batch of transitions x_k → x_{k+1}.

``method.name: nabla_gfn`` (the default); its hyper-parameters are the ``gfn`` config section, ``gfn.recipe``
choosing between the paper's objective (§4) and the returns recipe (§5b).

For each transition the objective computes, from the backbone and the reward:

- ``out``      policy output at x (gradients to the policy), ``out_ref`` the pretrained output at x;
- ``r'``       the forward-looking reward gradient at x': β·γ(τ')·∇_{x'} log R(decode(x̂0_θ(x', τ'))), through the
               network's Jacobian unless ``reward_grad_through_model`` is off (then ``out`` is held constant);
               at the terminal state x̂0 = x_N and γ = 1;
- ``g'``, ``g`` the flow network at x' and x (gradients to the flow);
- reverse scores s_R = (∂μ/∂x)ᵀ (x' − μ)/σ² by one VJP for the policy and one for the pretrained model;
- ``out_old``  the sampling-time output (trust region).

and hands them to ``fastnabla.residual_db_loss``. One policy forward at x serves the loss, the reverse score and
the reward gradient at x (the graph is kept until the loss backward).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from fastnabla.loss import residual_db_loss
from fastnabla.methods.base import Method, TransitionBatch, acting_steps
from fastnabla.sampling import Trajectories
from fastnabla.transitions import TransitionCoefficients, _bcast as _col

__all__ = ["NablaGFN"]


class NablaGFN(Method):
    name = "nabla_gfn"

    def __init__(self, backbone, reward_fn, coeffs: TransitionCoefficients, cfg):
        super().__init__(backbone, reward_fn, coeffs, cfg)
        self.gfn = cfg.gfn
        self.backend = cfg.train.backend
        self.micro_batch = cfg.reward.micro_batch
        if self.gfn.policy_weighting == "output" and bool((coeffs.coef_out == 0).any()):
            raise ValueError("gfn.policy_weighting=output weights by σ⁴/coef_out², but a sampling step has coef_out = 0 "
                             "(the network output does not move its mean); use gfn.policy_weighting=sigma2")
        fixed = [key for key in ("reward_guidance", "value_guidance") if getattr(self.gfn, key) > 0]
        if fixed:  # the policy's fixed part (``guidance``); the config allows one of the two at a time
            if bool((coeffs.coef_out == 0).any()):
                raise ValueError(f"gfn.{fixed[0]} shifts the policy's mean through its output, but a sampling step "
                                 f"has coef_out = 0; set gfn.{fixed[0]}=0")
            if self.gfn.value_guidance > 0:
                from fastnabla.value import ensure_value

                self.value_net, self.value_meta = ensure_value(backbone, coeffs, reward_fn, cfg)
            self.guide = self.guidance
        cut, low = self.gfn.policy_max_timestep, self.gfn.policy_min_timestep
        if cut is not None or low is not None:
            acting = acting_steps(self.timesteps, cut, low)
            keys = " and ".join(f"gfn.{k}={v}" for k, v in (("policy_max_timestep", cut), ("policy_min_timestep", low))
                                if v is not None)
            if acting is None:
                raise ValueError(f"{keys}: no sampling timestep is left to the policy (they run "
                                 f"{int(self.timesteps[0])} … {int(self.timesteps[-1])}), it would never act; widen "
                                 "the range or set it to null")
            self.policy_from, self.policy_to = acting
            try:  # timestep_fraction applies to the policy's steps: refuse a selection that does not fit them now
                self.select(1, torch.Generator().manual_seed(0))
            except ValueError as e:
                raise ValueError(f"{keys}: the policy acts at {self.policy_to - self.policy_from} of the {self.N} "
                                 f"steps, and gfn.timestep_fraction={self.gfn.timestep_fraction} is taken of those: "
                                 f"{e}; choose a fraction that fits them") from None
        if self.gfn.value_guidance > 0:  # s_k per step (gfn.value_guidance_last), over the steps the policy acts at
            from fastnabla.value import guidance_scales

            self.value_scales = guidance_scales(self.timesteps.cpu(), self.policy_from,
                                                self.N if self.policy_to is None else self.policy_to,
                                                self.gfn.value_guidance, self.gfn.value_guidance_last
                                                ).to(self.timesteps.device)

    # --- the seam -------------------------------------------------------------------------------------------------
    @property
    def targets_returns(self) -> bool:
        """``gfn.policy_target: return``: the policy regresses on G_{k+1} itself; no flow is read or trained."""
        return self.gfn.recipe == "returns" and self.gfn.policy_target == "return"

    @property
    def trains_flow(self) -> bool:
        return not self.gfn.no_flow and not self.targets_returns

    @property
    def uses_returns(self) -> bool:
        return self.gfn.recipe == "returns" and (not self.gfn.no_flow or self.targets_returns)

    @property
    def stores_returns(self) -> bool:
        """Monte-Carlo returns (κ = 1, no truncation): computed once after sampling and stored."""
        return self.uses_returns and self.gfn.return_kappa == 1.0 and self.gfn.return_steps == 0

    @property
    def bootstraps(self) -> bool:
        """κ < 1 or truncated returns: computed per trained transition with the current flow."""
        return self.uses_returns and not self.stores_returns

    @property
    def reuses_policy_forward(self) -> bool:
        # the paper's reverse loss: score VJP, reward gradient at x, then the loss, all through one policy forward
        return self.gfn.recipe == "paper" and self.gfn.reverse_scale > 0 and not self.gfn.no_flow

    def check_engine(self, engine) -> None:
        if getattr(engine, "stage", 0) == 3 and self.uses_returns:  # stored or bootstrapped: both take ref VJPs
            raise ValueError("ZeRO stage 3 cannot compute the gradient returns of gfn.recipe=returns (input-VJPs "
                             "through the sharded reference); use ZeRO stage 2 (configs/deepspeed/zero2.json), or "
                             "gfn.recipe=paper with gfn.reverse_scale=0")

    def prepare(self, tr: Trajectories) -> Trajectories:
        if self.stores_returns:  # the flow's regression targets, with the (frozen) reference
            tr.returns, kl = self._returns(tr.xs, tr.cond, tr.prompts, tr.outs)
            if kl is not None:  # free: the returns ran the reference at every policy state
                tr.extras["path_kl"] = kl
        return tr

    def gather(self, tr: Trajectories, idx: torch.Tensor, device) -> TransitionBatch:
        return TransitionBatch.gather(tr, idx, device, with_states=self.bootstraps)

    # --- γ(τ) -------------------------------------------------------------------------------------------------
    def gamma(self, j: torch.Tensor) -> torch.Tensor:
        """FL attenuation at state index j (0..N; N = the clean sample, where γ = 1)."""
        a = self.c.alpha_prod[j.clamp(max=self.N - 1)]
        mode = self.gfn.reward_adaptive_mode
        g = {"squared": lambda: a, "sqrt": a.sqrt, "none": lambda: torch.ones_like(a),
             "off": lambda: torch.zeros_like(a)}[mode]()
        return torch.where(j >= self.N, torch.ones_like(g), g)

    def _reward_grad(self, x: torch.Tensor, x0: torch.Tensor, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """∇_x log R(decode(x0(x))) and log R, for x0 a differentiable function of x.

        With ``reward.micro_batch`` smaller than the batch, the decode and the reward run per chunk on detached
        copies of x̂0 (their activations live one chunk at a time), and one VJP carries ∂log R/∂x̂0 back to x."""
        B, mb = x.shape[0], self.micro_batch
        if not 0 < mb < B:
            log_r, _ = self.reward_fn(self.backbone.decode(x0), prompts, None)
            (grad,) = torch.autograd.grad(log_r.sum(), x, retain_graph=True)
            return grad.detach(), log_r.detach()
        g_x0, logs = [], []
        for s in range(0, B, mb):
            leaf = x0[s:s + mb].detach().requires_grad_(True)
            log_r, _ = self.reward_fn(self.backbone.decode(leaf), None if prompts is None else prompts[s:s + mb], None)
            (g,) = torch.autograd.grad(log_r.sum(), leaf)
            g_x0.append(g)
            logs.append(log_r.detach())
        (grad,) = torch.autograd.grad(x0, x, grad_outputs=torch.cat(g_x0), retain_graph=True)
        return grad.detach(), torch.cat(logs)

    def reward_grad(self, x: torch.Tensor, j: torch.Tensor, cond, prompts, out: Optional[torch.Tensor] = None,
                    rows: Optional[torch.Tensor] = None):
        """Forward-looking reward gradient r = β·γ·∇_x log R(x̂0_θ(x)) at states x with indices j (detached).

        ``out`` (with a graph to ``x``, which must require grad) reuses an existing policy forward at x (then
        ``reward.micro_batch`` chunks the decode and reward only: ``_reward_grad``); ``rows`` then limits the decode
        and the reward to those rows (the others get r = 0; log R is returned for ``rows`` only). With the
        forward-looking term off (γ = 0 before the clean sample) only the clean rows are decoded and scored; the other
        rows get r = 0 and log R = NaN.
        """
        if out is None and self.gfn.reward_adaptive_mode == "off" and not bool((j >= self.N).all()):
            rows = (j >= self.N).nonzero(as_tuple=True)[0]
            r = torch.zeros_like(x)
            lr = torch.full((x.shape[0],), float("nan"), dtype=torch.float32, device=x.device)
            if rows.numel():
                r_rows, lr_rows = self.reward_grad(x[rows], j[rows], None if cond is None else cond[rows],
                                                   None if prompts is None else [prompts[i] for i in rows.tolist()])
                r = r.index_copy(0, rows, r_rows.to(r.dtype))
                lr = lr.index_copy(0, rows, lr_rows.to(lr.dtype))
            return r, lr
        B, mb = x.shape[0], self.micro_batch
        if out is None and 0 < mb < B:  # bound the decode/reward activations: one leaf and forward per chunk
            parts = [self.reward_grad(x[s:s + mb], j[s:s + mb], None if cond is None else cond[s:s + mb],
                                      None if prompts is None else prompts[s:s + mb]) for s in range(0, B, mb)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        beta = self.gfn.reward_scale
        jj = j.clamp(max=self.N - 1)
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            if out is not None:  # a forward at x already exists (x is never terminal here)
                if not self.gfn.reward_grad_through_model:
                    out = out.detach()
                x0 = self.c[jj].pred_x0(x, out)
                if rows is not None:
                    x0 = x0[rows]
                    prompts = None if prompts is None else [prompts[i] for i in rows.tolist()]
            else:  # the network runs only on non-terminal rows: at the clean sample x̂0 = x_N
                rows = (j < self.N).nonzero(as_tuple=True)[0]
                x0 = x
                if rows.numel():
                    xs, js = x[rows], jj[rows]
                    with torch.set_grad_enabled(self.gfn.reward_grad_through_model):
                        out = self.backbone.policy(xs, self.timesteps[js], None if cond is None else cond[rows])
                    out = out.to(x.dtype)
                    if not self.gfn.reward_grad_through_model:
                        out = out.detach()
                    x0_rows = self.c[js].pred_x0(xs, out)
                    x0 = x.index_copy(0, rows, x0_rows)
            g, lr = self._reward_grad(x, x0, prompts)
        return beta * _col(self.gamma(j), g) * g, lr

    def guidance(self, x: torch.Tensor, k, cond, prompts, with_reference: bool = False):
        """The policy's fixed part: the output shift (detached) at states x of step k (an int or (B,)) that moves
        the mean by a state-specific guess of σ_k²·∇log h_{k+1}; the network learns the rest, and the fixed point
        p_θ = p* is unchanged. With ``with_reference`` also the reference's output at x, computed on the way.

        - ``gfn.reward_guidance`` = s: σ_k²·s·β·γ_k·∇_x log R(x̂0_ref(x)), the forward-looking term r of the flow's
          parametrisation moved into the policy with the reference's clean-sample prediction (γ_k of
          ``gfn.reward_adaptive_mode``);
        - ``gfn.value_guidance`` = s: s_k·σ_k²·∇log h_φ(μ_ref(x), t_{k+1}) with the fitted value h_φ
          (``fastnabla.value``), and s_k·σ_k²·β·∇log R(μ_ref(x)) into the clean sample; s_k = s at every step, or
          from s to ``gfn.value_guidance_last`` over the policy's steps (``value.guidance_scales``)."""
        j = torch.full((x.shape[0],), int(k), dtype=torch.long, device=x.device) if not torch.is_tensor(k) else k
        cj = self.c[j]
        if self.gfn.value_guidance > 0:
            shift, out_ref = self._value_shift(x, j, cj, cond, prompts)
            return (shift, out_ref) if with_reference else shift
        with torch.enable_grad(), self.backbone.reference_scope():
            xx = x.detach().requires_grad_(True)
            out_ref = self.backbone.reference(xx, self.timesteps[j], cond).to(x.dtype)
            grad, _ = self._reward_grad(xx, cj.pred_x0(xx, out_ref), prompts)
        scale = self.gfn.reward_guidance * self.gfn.reward_scale * self.gamma(j) * cj.std.square() / cj.coef_out
        shift = _col(scale, grad) * grad.to(x.dtype)
        return (shift, out_ref.detach()) if with_reference else shift

    def _value_shift(self, x: torch.Tensor, j: torch.Tensor, cj: TransitionCoefficients, cond, prompts):
        """(``gfn.value_guidance``'s output shift, the reference's output) at states x of steps j (``guidance``)."""
        from fastnabla.value import value_logit

        with torch.no_grad(), self.backbone.reference_scope():
            out_ref = self.backbone.reference(x.detach(), self.timesteps[j], cond).to(x.dtype)
        nxt = j + 1
        inner, last = (nxt < self.N).nonzero(as_tuple=True)[0], (nxt >= self.N).nonzero(as_tuple=True)[0]
        with torch.enable_grad():
            mu = cj.mean(x.detach(), out_ref).requires_grad_(True)
            log_h = mu.new_zeros((), dtype=torch.float32)
            if inner.numel():
                log_h = log_h + torch.nn.functional.logsigmoid(
                    value_logit(self.value_net, mu[inner], self.timesteps[nxt[inner]])).sum()
            if last.numel():
                log_r, _ = self.reward_fn(self.backbone.decode(mu[last]),
                                          None if prompts is None else [prompts[i] for i in last.tolist()], None)
                log_h = log_h + self.gfn.reward_scale * log_r.float().sum()
            (grad,) = torch.autograd.grad(log_h, mu)
        scale = self.value_scales[j].to(cj.std.dtype) * cj.std.square() / cj.coef_out
        return (_col(scale, grad) * grad).to(x.dtype).detach(), out_ref

    def policy_weight(self, coef: TransitionCoefficients) -> Optional[torch.Tensor]:
        """w_k on the policy's forward residual (``gfn.policy_weighting``): σ_k² ("sigma2"), σ_k⁴/coef_out_k²
        ("output": d = coef_out·Δout/σ², so w·(d − target)² = (Δout − σ²·target/coef_out)², every transition's
        error in the network output weighted alike), or None (1)."""
        mode = self.gfn.policy_weighting
        if mode == "sigma2":
            return coef.std.square()
        if mode == "output":
            return coef.std.pow(4) / coef.coef_out.square()
        return None

    # --- gradient returns (recipe "returns", ALGORITHM §5b) -------------------------------------------------------
    def gradient_returns(self, xs: torch.Tensor, cond, prompts) -> torch.Tensor:
        """Monte-Carlo gradient returns of sampled trajectories, (n, N+1, *S), detached.

        G_N = β·∇log R(x_N) and G_k = J_ref(x_k)ᵀ·G_{k+1} with J_ref = ∂μ_ref/∂x of the frozen (guided) reference:
        the gradient of β·log R(x_N) carried back along the trajectory through the reference's mean maps. Under the
        target policy its expectation is ∇log h_k(x_k), the residual flow score the flow net regresses on
        (L_A). One reference input-VJP per step; ``gfn.return_micro_batch`` (else ``reward.micro_batch``) bounds the
        trajectories per VJP. With CFG the reference is the guided one, so J_ref is the guided mean map's Jacobian.
        G_k for k < ``policy_from`` (``gfn.policy_max_timestep``) is not computed: zero. The reference's own late steps
        (k ≥ ``policy_to``, ``gfn.policy_min_timestep``) are part of the chain.
        """
        return self._returns(xs, cond, prompts)[0]

    def _returns(self, xs: torch.Tensor, cond, prompts, outs: Optional[torch.Tensor] = None,
                 first: Optional[int] = None):
        """(``gradient_returns``, per-step KL) of sampled trajectories. Given the sampling-time outputs ``outs``
        (n, N, *S) and a sampler with σ > 0 at every step, the KL (n, N) of each policy step to the reference's
        (``metrics.path_kl``), read off the reference outputs the VJPs compute anyway (0 at the reference's own
        steps); else None. ``first`` (default ``policy_from``): the lowest k whose G_k is computed; the states
        before it are not read."""
        from fastnabla.metrics import path_kl

        n, N = xs.shape[0], self.N
        G = torch.zeros_like(xs)
        with_kl = outs is not None and bool((self.c.std > 0).all())
        kl = torch.zeros(n, N, dtype=torch.float64, device=xs.device) if with_kl else None
        mb = self.gfn.return_micro_batch or self.micro_batch
        mb = mb if 0 < mb < n else n
        for s in range(0, n, mb):
            sl = slice(s, s + mb)
            c_s = None if cond is None else cond[sl]
            p_s = None if prompts is None else prompts[sl]
            jN = torch.full((xs[sl].shape[0],), N, dtype=torch.long, device=xs.device)
            G[sl, N], _ = self.reward_grad(xs[sl, N], jN, c_s, p_s)  # γ = 1 at the clean sample in every FL mode
            lowest = self.policy_from if first is None else first  # none regresses on G_k for k < policy_from
            for k in range(N - 1, lowest - 1, -1):
                G[sl, k], out_ref = self._reference_mean_vjp(xs[sl, k], torch.full_like(jN, k), c_s, G[sl, k + 1])
                if with_kl and k < (self.policy_to or N):
                    kl[sl, k] = path_kl(self.c.coef_out[k:k + 1], self.c.std[k:k + 1], outs[sl, k:k + 1],
                                        out_ref[:, None])[:, 0]
        return G, kl

    def _reference_mean_vjp(self, x: torch.Tensor, j: torch.Tensor, cond, v: torch.Tensor):
        """(J_ref(x)ᵀ·v, out_ref(x)) at states x with step indices j: one input-VJP of the reference's mean map
        (detached)."""
        cj = self.c[j]
        out_ref, out_vjp = self.backbone.reference_vjp(x, self.timesteps[j], cond, lambda out: cj.out_cotangent(v))
        return cj.mean_vjp(v, out_vjp), out_ref

    @torch.no_grad()
    def bootstrapped_returns(self, b: TransitionBatch) -> torch.Tensor:
        """G_{k+1} at each transition's next state with κ = ``gfn.return_kappa`` and truncation after
        ``gfn.return_steps`` steps (ALGORITHM §5b), from the transition's trajectory ``b.states``; detached.

        With s = k+1 and the bootstrap state e = min(s + n, N) (e = N without truncation):
        G_e = (g + r)(x_e) (at x_N: β∇log R, g := 0), then G_j = J_ref(x_j)ᵀ[(1−κ)·(g + r)(x_{j+1}) + κ·G_{j+1}]
        for j = e−1 … s, with the current flow g and the forward-looking gradient r (0 before x_N when it is off).
        """
        N, kappa, n = self.N, self.gfn.return_kappa, self.gfn.return_steps
        B = b.k.shape[0]
        start = b.k + 1
        stop = torch.full_like(start, N) if n == 0 else (start + n).clamp(max=N)

        def sel(rows):
            return (None if b.cond is None else b.cond[rows],
                    None if b.prompts is None else [b.prompts[i] for i in rows.tolist()])

        def g_plus_r(rows, j):  # (g + r)(x_j) of the given rows, at state indices j
            x = b.states[rows, j]
            cond, prompts = sel(rows)
            val, _ = self.reward_grad(x, j, cond, prompts)
            inner = (j < N).nonzero(as_tuple=True)[0]
            if inner.numel():
                g = self.backbone.flow(x[inner], self.timesteps[j[inner]], None if cond is None else cond[inner])
                val = val.index_add(0, inner, g.to(val.dtype))
            return val

        rows_all = torch.arange(B, device=b.k.device)
        G = g_plus_r(rows_all, stop)
        gr_next = G.clone()
        L = stop - start
        for t in range(1, int(L.max()) + 1 if B else 1):
            act = (L >= t).nonzero(as_tuple=True)[0]
            j = stop[act] - t
            v = kappa * G[act] + (1 - kappa) * gr_next[act] if kappa < 1 else G[act]
            cond, _ = sel(act)
            G[act] = self._reference_mean_vjp(b.states[act, j], j, cond, v)[0]
            more = L[act] > t
            if kappa < 1 and bool(more.any()):
                gr_next[act[more]] = g_plus_r(act[more], j[more])
        return G

    def __call__(self, b: TransitionBatch, return_stats: bool = True):
        if self.gfn.recipe == "returns":
            if self.bootstraps:
                b = dataclasses.replace(b, returns=self.bootstrapped_returns(b))
            return self._returns_objective(b, return_stats)
        bb, gfn, c = self.backbone, self.gfn, self.c
        k = b.k
        t = self.timesteps[k]
        terminal = k == self.N - 1
        coef = c[k]
        reverse = gfn.reverse_scale > 0 and not gfn.no_flow
        lam = gfn.pretrained_strength

        # r' at x' (state index k+1; index N is the clean sample)
        r_next, _ = self.reward_grad(b.x_next, k + 1, b.cond, b.prompts)

        need_x_grad = reverse
        x = b.x.detach().requires_grad_(need_x_grad)
        out = bb.policy(x, t, b.cond).to(x.dtype)
        if reverse and lam != 0:  # s_R^ref = (∂μ_ref/∂x)ᵀ(x' − μ_ref)/σ²: one input-VJP through the reference
            out_ref, ref_vjp = bb.reference_vjp(
                b.x, t, b.cond, lambda o: coef.out_cotangent(coef.reverse_cotangent(b.x, o, b.x_next)))
        else:
            with torch.no_grad():
                out_ref = bb.reference(b.x, t, b.cond).to(b.x.dtype)

        flow_next = flow_cur = score_rev = score_rev_ref = r_cur = None
        if not gfn.no_flow:
            t_next = self.timesteps[(k + 1).clamp(max=self.N - 1)]
            # the flow at a clean x_N is evaluated at τ = 0; L_T trains it toward 0 there
            t_next = torch.where(terminal, torch.zeros_like(t_next), t_next)
            if reverse:
                both = bb.flow(torch.cat([b.x_next, b.x]), torch.cat([t_next, t]),
                               None if b.cond is None else torch.cat([b.cond, b.cond])).to(x.dtype)
                flow_next, flow_cur = both.chunk(2)
            else:
                flow_next = bb.flow(b.x_next, t_next, b.cond).to(x.dtype)
        if reverse:
            score_rev = coef.reverse_score(x, coef.mean(x, out), b.x_next, retain_graph=True)
            if lam != 0:
                score_rev_ref = coef.mean_vjp(coef.reverse_cotangent(b.x, out_ref, b.x_next), ref_vjp)
            # L_R is (1 − terminal)·…: the terminal rows' reward gradient at x is never read, so it is not computed
            inner = (~terminal).nonzero(as_tuple=True)[0]
            r_cur = self.reward_grad(x, k, b.cond, b.prompts, out=out, rows=inner)[0] if inner.numel() \
                else torch.zeros_like(x)

        return residual_db_loss(
            out, out_ref, coef_out=coef.coef_out, inv_var=coef.inv_var, reward_grad_next=r_next,
            flow_next=flow_next, terminal=terminal, strength=lam,
            x=b.x if lam != 1 else None, x_next=b.x_next if lam != 1 else None, coef_x=coef.coef_x if lam != 1 else None,
            out_old=b.out_old if gfn.trust_region_scale > 0 else None, trust_region_scale=gfn.trust_region_scale,
            reverse_scale=gfn.reverse_scale if reverse else 0.0, score_rev=score_rev, score_rev_ref=score_rev_ref,
            flow_cur=flow_cur, reward_grad_cur=r_cur, terminal_scale=gfn.terminal_scale, backend=self.backend,
            expected_grad=self.item_grad,
            return_stats=return_stats, check_values=False,  # the coefficients were checked once at start
        )

    def _returns_objective(self, b: TransitionBatch, return_stats: bool):
        """ALGORITHM §5b: loss_b = w_k·mean_S (d − sg(r' + g'))² + trust_region + L_A, with
        L_A = (1 − terminal)·mean_S (g(x') + r' − sg(G_{k+1}))² training the flow on the next state x' only.
        With ``gfn.policy_target: return``: loss_b = w_k·mean_S (d − G_{k+1})² + trust_region, no flow.

        All of it is one ``residual_db_loss`` call: ``policy_weight`` = w_k and ``return_next`` = G_{k+1} switch the
        loss to these terms (the flow is data in the policy's residual and learns from L_A alone).
        """
        bb, gfn, c = self.backbone, self.gfn, self.c
        k = b.k
        t = self.timesteps[k]
        terminal = k == self.N - 1
        coef = c[k]
        if b.returns is None and self.uses_returns:
            raise ValueError("gfn.recipe=returns needs the gradient returns of the sampled trajectories "
                             "(NablaGFN.gradient_returns), stored with them")
        w = self.policy_weight(coef)
        out = bb.policy(b.x, t, b.cond).to(b.x.dtype)
        out_old = b.out_old if gfn.trust_region_scale > 0 else None
        if self.guide is not None:
            # the guided policy's output is out + shift; shifting the reference's by −shift instead gives the loss the
            # same residual d = coef_out·(out + shift − out_ref)/σ² (and the stored sampling-time outputs include it)
            shift, out_ref = self.guidance(b.x, k, b.cond, b.prompts, with_reference=True)
            out_ref = out_ref - shift
            out_old = None if out_old is None else out_old - shift
        else:
            with torch.no_grad():
                out_ref = bb.reference(b.x, t, b.cond).to(b.x.dtype)
        g_next = return_next = None
        if self.targets_returns:  # w_k·mean_S (d − G_{k+1})²: at the clean sample G_N = β∇log R(x_N) = r'
            target_next = b.returns
        else:
            target_next, _ = self.reward_grad(b.x_next, k + 1, b.cond, b.prompts)
            if not gfn.no_flow:
                # g' at the non-terminal rows only: at a clean x_N the flow is never read (g' := 0, no L_A)
                rows = (~terminal).nonzero(as_tuple=True)[0]
                g_next = torch.zeros_like(b.x_next)
                if rows.numel():
                    g_rows = bb.flow(b.x_next[rows], self.timesteps[k[rows] + 1],
                                     None if b.cond is None else b.cond[rows]).to(b.x.dtype)
                    g_next = g_next.index_copy(0, rows, g_rows)
                return_next = b.returns
        return residual_db_loss(
            out, out_ref, coef_out=coef.coef_out, inv_var=coef.inv_var, reward_grad_next=target_next,
            flow_next=g_next, terminal=terminal, policy_weight=w, return_next=return_next,
            out_old=out_old, trust_region_scale=gfn.trust_region_scale,
            backend=self.backend, return_stats=return_stats, check_values=False, expected_grad=self.item_grad,
        )
