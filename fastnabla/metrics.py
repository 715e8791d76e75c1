"""Run metrics and report plots.

Per epoch: reward statistics of the fresh samples (in the trainer) and whatever the backbone computes exactly
against the tilted target p_ref·R^β (``Backbone.target_metrics``: toy2d's mode-weight TV and off-manifold mass).
At eval epochs and at the end: the same on ``eval.num_samples`` fresh samples (precise), ``final_samples.npy``,
and plots (``Backbone.report_plots`` plus the curves).

The evaluation functions take an ``EvalContext`` (the run's parts and a sampling function), never the trainer.

For the pixel (digits) backbone, features come from the digit classifier's penultimate layer and the target from
importance sampling (``fastnabla.digits``): class histogram and its TV to the target, mean log R, diversity,
FID/KID against the pretrained model's samples at the same seeds, a sample grid and the class histogram plot.

For SD with ``eval.features`` (clip | dreamsim), features are image embeddings of the decoded samples
(``image_features``): within-prompt diversity, and FID/KID against the pretrained model's samples at the same seeds
and prompts, pooled and per prompt (prior preservation), for the finetuned and, once per run, the pretrained model.

The sample-and-feature metrics (``importance_weights``, ``class_histogram``, ``histogram_tv``, ``diversity``,
``fid``, ``kid``) and the KL ones (``tilt_kl``: the target's log Z and KL to p_ref; ``path_kl``: a sampler's per-step
KL to the reference's) take tensors only, so any backbone can use them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

__all__ = ["EvalContext", "epoch_metrics", "evaluate", "plot_curves", "importance_weights", "class_histogram",
           "histogram_tv", "diversity", "prompt_diversity", "fid", "kid", "prior_preservation", "image_features",
           "ClipImageFeatures", "DreamSimFeatures", "plot_digit_grid", "plot_class_histogram", "class_transitions",
           "plot_class_transitions", "tilt_kl", "path_kl", "mean_se", "diversity_ratio_per_class",
           "diversity_ratio_se_per_class"]

TORCHMETRICS_ERROR = "FID/KID need torchmetrics: pip install 'fastnabla[digits]'"


# --- sample-and-feature metrics -------------------------------------------------------------------------------------

def tilt_kl(log_r: torch.Tensor, beta: float) -> tuple[float, float]:
    """(log Z, KL(p*‖p_ref)) of the tilted target p* = p_ref·R^β/Z from samples of p_ref: log Z = log mean exp(β·log R)
    and KL = β·E_{p*}[log R] − log Z (self-normalised). On paths, P* = P_ref·R(x_N)^β/Z too, so the same KL is the
    target's path KL to the reference sampler: the least that any sampler of p* must move away from it."""
    lr = float(beta) * log_r.detach().double().flatten()
    log_z = float(torch.logsumexp(lr, 0) - math.log(lr.numel()))
    w = torch.softmax(lr, 0)
    return log_z, float((w * lr).sum()) - log_z


def path_kl(coef_out: torch.Tensor, std: torch.Tensor, outs: torch.Tensor, outs_ref: torch.Tensor) -> torch.Tensor:
    """Per-trajectory, per-step KL(p_θ(·|x_k) ‖ p_ref(·|x_k)) of Gaussian transitions with a shared σ_k:
    ‖coef_out_k·(out − out_ref)‖²/(2σ_k²), (n, N) float64. ``outs``/``outs_ref``: (n, N, *S), the policy's and the
    reference's outputs at the same states x_0…x_{N−1} of trajectories sampled from the policy; ``coef_out``, ``std``:
    (N,). The mean over trajectories of the sum over steps estimates the path KL(P_θ‖P_ref) without the step noise."""
    if outs.shape != outs_ref.shape or outs.dim() < 3 or outs.shape[1] != coef_out.numel() \
            or std.numel() != coef_out.numel():
        raise ValueError(f"path_kl: outs {tuple(outs.shape)} and outs_ref {tuple(outs_ref.shape)} must both be "
                         f"(n, N, ...) with N = {coef_out.numel()} steps")
    if bool((std <= 0).any()):
        raise ValueError("path_kl: a step with σ = 0 (a deterministic sampler, eta = 0) has no transition density; "
                         "use eta > 0")
    sq = (outs.double() - outs_ref.double()).flatten(2).square().sum(2)  # (n, N)
    return sq * coef_out.double().square() / (2 * std.double().square())


def importance_weights(log_r: torch.Tensor, beta: float) -> tuple[torch.Tensor, float]:
    """Self-normalised importance weights of p_ref·R^β given samples of p_ref: w_i = exp(β·log R_i) / Σ_j exp(β·log
    R_j), float64 (n,), and the effective sample size ESS = 1 / Σ_i w_i² (n for equal weights, 1 for one)."""
    w = torch.softmax(float(beta) * log_r.detach().double().flatten(), dim=0)
    return w, float(1.0 / (w**2).sum())


def mean_se(values: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """The standard error of a sample mean Σ_i w_i·v_i (w normalised to sum 1; uniform when None): the delta-method
    form sqrt(Σ_i w_i²·(v_i − mean)²), which for self-normalised importance weights is that estimator's error and for
    uniform weights the sample standard deviation (÷ n) over √n. A mean log R gap is meaningful to about twice the
    two sides' errors combined; heavy tails (a few samples far below the rest) make it an underestimate."""
    v = values.detach().double().flatten().cpu()
    w = torch.full_like(v, 1.0 / max(v.numel(), 1)) if weights is None else weights.double().flatten().cpu()
    w = w / w.sum()
    m = (w * v).sum()
    return float((w.square() * (v - m).square()).sum().sqrt())


def class_histogram(labels: torch.Tensor, num_classes: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(num_classes,) float64: the (weighted) fraction of samples per class label; sums to 1."""
    labels = labels.long().flatten().cpu()
    w = torch.ones(labels.numel(), dtype=torch.float64) if weights is None else weights.double().flatten().cpu()
    h = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, w)
    return h / h.sum()


def log_r_share_per_class(labels: torch.Tensor, log_r: torch.Tensor, num_classes: int,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """(num_classes,) float64: Σ_{i in class c} w_i·log R_i, w normalised to sum 1 (uniform when None). Each class's
    share of the mean log R: the shares sum to it, and a share over the class's mass is the class's own mean log R.
    A model's shares minus the target's split the mean log R gap by class."""
    labels = labels.long().flatten().cpu()
    w = torch.ones(labels.numel(), dtype=torch.float64) if weights is None else weights.double().flatten().cpu()
    w = w / w.sum()
    return torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, w * log_r.double().flatten().cpu())


def class_transitions(labels_from: torch.Tensor, labels_to: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts of paired samples: row = the class of sample i under one model, column = the class of sample i
    under the other. With the pretrained and finetuned samples drawn at the same seeds it shows where the finetuning
    moved each pretrained class."""
    if labels_from.shape != labels_to.shape:
        raise ValueError(f"class_transitions pairs samples one to one; got {tuple(labels_from.shape)} and "
                         f"{tuple(labels_to.shape)} labels")
    idx = labels_from.long().reshape(-1) * num_classes + labels_to.long().reshape(-1)
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def histogram_tv(p, q) -> float:
    """Total variation ½·Σ_c |p_c − q_c| between two histograms."""
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    return 0.5 * float((p - q).abs().sum())


def _mean_pairwise(f: torch.Tensor, w: torch.Tensor | None) -> tuple[float, float]:
    """(D, its standard error): D = Σ_{i≠j} w_i w_j ‖f_i − f_j‖ / Σ_{i≠j} w_i w_j (equal weights: the mean over
    ordered pairs i ≠ j). The error is the U-statistic's first-order one, 2·``mean_se`` of each sample's mean
    distance to the others h_i = Σ_{j≠i} w_j‖f_i − f_j‖ / Σ_{j≠i} w_j (uniform weights: 2·sd(h)/√n); NaN for fewer
    than 3 samples, and rough for a few dozen."""
    d = torch.cdist(f.double(), f.double())
    w = torch.ones(f.shape[0], dtype=torch.float64) if w is None else w.double()
    den = float(w.sum() ** 2 - (w**2).sum())
    if not den > 0:
        return float("nan"), float("nan")
    if f.shape[0] < 3:  # two samples: each one's mean distance is the other's, and the error says nothing
        return float(w @ d @ w) / den, float("nan")
    h = (d @ w) / (w.sum() - w).clamp_min(torch.finfo(torch.float64).tiny)
    return float(w @ d @ w) / den, 2 * mean_se(h, w)


def diversity(features: torch.Tensor, groups: torch.Tensor | None = None, weights: torch.Tensor | None = None,
              max_per_group: int = 4000, seed: int = 0) -> dict:
    """Mean pairwise feature distance E‖φ(x) − φ(x′)‖ over pairs of distinct samples, overall and within each group
    (class or prompt); with ``weights`` (importance weights) each pair counts w_i·w_j.

    Sets larger than ``max_per_group`` are subsampled uniformly (fixed seed; weights ride along, so the weighted
    ratio stays consistent). Returns {"overall": float, "per_group": {group: float}} (groups with < 2 samples are
    left out), and the standard error of each (``_mean_pairwise``) under "overall_se" and "per_group_se".
    """
    f = features.detach().cpu()
    w = None if weights is None else weights.detach().double().cpu()
    g = torch.Generator().manual_seed(seed)

    def sub(idx):
        if idx.numel() > max_per_group:
            idx = idx[torch.randperm(idx.numel(), generator=g)[:max_per_group]]
        return _mean_pairwise(f[idx], None if w is None else w[idx])

    out = dict(zip(("overall", "overall_se"), sub(torch.arange(f.shape[0]))), per_group={}, per_group_se={})
    if groups is not None:
        groups = groups.cpu()
        for c in torch.unique(groups).tolist():
            idx = (groups == c).nonzero().flatten()
            if idx.numel() >= 2:
                out["per_group"][int(c)], out["per_group_se"][int(c)] = sub(idx)
    return out


def prompt_diversity(features: torch.Tensor, prompts) -> dict:
    """``diversity`` within each prompt (row i of ``features`` was drawn for ``prompts[i]``) and its mean over the
    prompts with at least 2 samples (nan when none has). Returns {"mean": float, "per_prompt": {prompt: float}}."""
    names = sorted(set(prompts))
    index = {p: i for i, p in enumerate(names)}
    per = diversity(features, torch.tensor([index[p] for p in prompts]))["per_group"]
    per = {names[i]: v for i, v in per.items()}
    return {"mean": float(np.mean(list(per.values()))) if per else float("nan"), "per_prompt": per}


def prior_preservation(feats_pre: torch.Tensor, feats_ft: torch.Tensor, groups=None, kid_subsets: int = 50) -> dict:
    """FID and KID of the finetuned model's features against the pretrained model's for the same prompts and seeds,
    per group (prompt or class label, row i of both sets shares ``groups[i]``) and averaged over groups: the
    paper's protocol. Without groups, one group. Returns {"fid", "kid", "per_group": {g: {"fid", "kid"}}}."""
    keys = [None] if groups is None else sorted(set(groups), key=str)
    per = {}
    for g in keys:
        idx = torch.arange(feats_pre.shape[0]) if g is None else \
            torch.tensor([i for i, p in enumerate(groups) if p == g], dtype=torch.long)
        if idx.numel() < 2:
            continue
        per[g] = {"fid": fid(feats_pre[idx], feats_ft[idx]), "kid": kid(feats_pre[idx], feats_ft[idx], kid_subsets)[0]}
    return {"fid": float(np.mean([v["fid"] for v in per.values()])),
            "kid": float(np.mean([v["kid"] for v in per.values()])),
            "per_group": {str(k): v for k, v in per.items() if k is not None}}


class _Features(torch.nn.Module):
    """The identity as torchmetrics' "feature extractor": our metrics receive features, not images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x):
        return x


def _torchmetrics(name: str):
    try:
        import torchmetrics.image.fid as fid_mod
        import torchmetrics.image.kid as kid_mod
    except ImportError:
        raise ImportError(TORCHMETRICS_ERROR) from None
    return fid_mod.FrechetInceptionDistance if name == "fid" else kid_mod.KernelInceptionDistance


def fid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between two feature sets (n, F), by torchmetrics'
    FrechetInceptionDistance with the features passed through."""
    FID = _torchmetrics("fid")
    m = FID(feature=_Features(feats_a.shape[1]))
    m.update(feats_a.double().cpu(), real=True)
    m.update(feats_b.double().cpu(), real=False)
    return float(m.compute())


def kid(feats_a: torch.Tensor, feats_b: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel distance: unbiased MMD² with the kernel k(x, y) = (x·y/F + 1)³, averaged over ``subsets`` random subsets
    of ``min(subset_size, n_a, n_b)`` samples (torchmetrics' KernelInceptionDistance; the subsets are drawn under a
    fixed seed). Returns (mean, std over subsets)."""
    KID = _torchmetrics("kid")
    k = min(subset_size, feats_a.shape[0], feats_b.shape[0])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer": intended
        m = KID(feature=_Features(feats_a.shape[1]), subsets=subsets, subset_size=k)
    m.update(feats_a.double().cpu(), real=True)
    m.update(feats_b.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std)


# --- image features (the SD evaluation's φ) -----------------------------------------------------------------------

CLIP_FEATURES_HOW = ("set eval.feature_model to a local transformers CLIP directory (CLIPModel or "
                     "CLIPVisionModelWithProjection, saved with save_pretrained)")
DREAMSIM_ERROR = ("eval.features=dreamsim needs the dreamsim package: pip install dreamsim, and set "
                  "eval.feature_model to the local directory of its weights")


def _why(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


class ClipImageFeatures(torch.nn.Module):
    """φ(x) = CLIP's projected image embedding (the projection output, not normalised) of images (B, 3, H, W) in
    [0, 1], fp32, after CLIP's own resize / center-crop / normalise written in torch (the rewards' ``ImagePreprocess``,
    read from the directory's preprocessor_config.json when there is one)."""

    def __init__(self, path: str):
        super().__init__()
        import json

        from transformers import CLIPModel, CLIPVisionModelWithProjection

        from fastnabla.rewards.clip_common import image_preprocess_from

        path = os.path.expanduser(str(path))
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                kind = json.load(f).get("model_type")
            cls = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}.get(kind)
            if cls is None:
                raise ValueError(f"its config.json says model_type={kind!r}, not clip or clip_vision_model")
            model = cls.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any loading failure gets the same actionable message
            raise ValueError(f"eval.feature_model={path!r}: cannot load a CLIP model from it ({_why(e)}); "
                             f"{CLIP_FEATURES_HOW}") from None
        self.model = model.float().eval().requires_grad_(False)
        vision = getattr(model.config, "vision_config", model.config)
        self.preprocess = image_preprocess_from(path, vision.image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from fastnabla.rewards.clip_common import clip_image_embeds

        return clip_image_embeds(self.model, self.preprocess(images.float()))


class DreamSimFeatures(torch.nn.Module):
    """φ(x) = DreamSim's embedding (its default ensemble) of images (B, 3, H, W) in [0, 1] resized to 224×224
    (bicubic, antialiased, in torch; for SD's square images that is DreamSim's own ``Resize((224, 224))``). Weights
    from ``path`` (DreamSim's ``cache_dir``). Not exercised by the tests (dreamsim is not installed there)."""

    def __init__(self, path: str):
        super().__init__()
        try:
            from dreamsim import dreamsim
        except ImportError:
            raise ImportError(DREAMSIM_ERROR) from None
        from fastnabla.rewards.clip_common import ImagePreprocess

        path = os.path.expanduser(str(path))
        try:
            self.model, _ = dreamsim(pretrained=True, cache_dir=path, device="cpu")
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"eval.feature_model={path!r}: cannot load DreamSim's weights from it ({_why(e)}); set "
                             "it to the directory DreamSim downloaded its weights into (dreamsim(cache_dir=...))") \
                from None
        self.model.eval().requires_grad_(False)
        self.preprocess = ImagePreprocess(size=224, crop_size=(224, 224), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(self.preprocess(images.float()))


def image_features(kind: str, path: str) -> torch.nn.Module:
    """The ``eval.features`` extractor: images (B, 3, H, W) in [0, 1] → features (B, F), on the CPU until moved."""
    if kind == "clip":
        return ClipImageFeatures(path)
    if kind == "dreamsim":
        return DreamSimFeatures(path)
    raise ValueError(f"eval.features={kind!r}: must be one of none, clip, dreamsim")


@dataclass
class EvalContext:
    """What evaluation needs of a run: its config and parts, where to write, and how to draw samples.

    ``sample_final(n, seed)`` returns n clean samples of the current policy (its EMA when on) and their prompts;
    ``cache`` keeps what a run computes once (a benchmark's classifier and importance-sampled target)."""

    cfg: object
    backbone: object
    reward_fn: Callable
    device: torch.device
    out_dir: str
    is_main: bool
    history: list
    sample_final: Callable
    cache: dict = field(default_factory=dict)


def _target_metrics(ctx: EvalContext, samples: torch.Tensor, final: bool) -> dict:
    return ctx.backbone.target_metrics(samples, ctx.cfg.reward, ctx.cfg.gfn.reward_scale, final=final)


def epoch_metrics(ctx: EvalContext, finals: torch.Tensor, log_r: torch.Tensor | None = None,
                  kl_path: float | None = None) -> dict:
    """Metrics of one epoch's fresh clean states ``finals`` (n, *S), every rank's, with their log R and the mean
    path KL of their trajectories to the reference sampler when the method measures it."""
    if ctx.backbone.benchmark == "digits":
        return _digits_epoch(ctx, finals, log_r, kl_path)
    return {f"{k}_batch": v for k, v in _target_metrics(ctx, finals.cpu(), final=False).items()}


def evaluate(ctx: EvalContext, final: bool) -> dict:
    """Precise metrics on ``eval.num_samples`` samples; at the end also samples on disk and plots."""
    cfg, bb = ctx.cfg, ctx.backbone
    n = max(cfg.eval.num_samples, bb.min_final_samples) if final else cfg.eval.num_samples
    samples, prompts = ctx.sample_final(n, seed=_eval_seed(cfg))
    out = {}
    lr = _scores(ctx, samples, prompts)
    out["eval_reward_mean"] = float(lr.mean())
    out["eval_reward_std"] = float(lr.std()) if n > 1 else 0.0
    if bb.benchmark == "digits":
        out.update(_digits_eval(ctx, samples, prompts, lr, final))
        return out
    if cfg.eval.features != "none":  # SD: diversity and prior preservation in image-feature space
        out.update(_image_eval(ctx, samples, prompts))
    exact = _target_metrics(ctx, samples, final)
    out.update(exact)
    if final and exact:
        out["num_samples"] = n
    if final and ctx.is_main:
        if exact:
            np.save(os.path.join(ctx.out_dir, "final_samples.npy"), samples.numpy())
        if cfg.logging.plots:
            title = f"epoch {ctx.history[-1]['epoch']}" if ctx.history else ""
            out["plots"] = bb.report_plots(samples, cfg.reward, cfg.gfn.reward_scale, ctx.out_dir, title)
            curves = plot_curves(ctx.out_dir, ctx.history)
            if curves:
                out["plots"].append(curves)
            if not out["plots"]:
                del out["plots"]
    return out


def _eval_seed(cfg) -> int:
    """The noise seed of every evaluation draw: the policy's and the pretrained model's samples share it."""
    return cfg.seed + 7919


def _pretrained_samples(ctx: EvalContext, n: int) -> tuple:
    """(samples, prompts): the pretrained model's n evaluation samples, drawn by the run's own sampler inside
    ``reference_sampling()`` at the evaluation's seed and prompts. The reference never changes, so they are drawn once
    per run and size and kept in ``ctx.cache`` (the latest size only)."""
    cached = ctx.cache.get("pretrained_samples")
    if cached is None or cached[0] != n:
        with ctx.backbone.reference_sampling():
            cached = (n,) + tuple(ctx.sample_final(n, seed=_eval_seed(ctx.cfg)))
        ctx.cache["pretrained_samples"] = cached
    return cached[1], cached[2]


def _scores(ctx: EvalContext, samples: torch.Tensor, prompts) -> torch.Tensor:
    """log R of samples (n, *S), decoded and scored in micro-batches of sampling.batch_size (a 512×512 decode of
    every sample at once OOMs); (n,) float32 on the CPU."""
    mb = ctx.cfg.sampling.batch_size
    scores = []
    with torch.no_grad():
        for s in range(0, samples.shape[0], mb):
            lr, _ = ctx.reward_fn(ctx.backbone.decode(samples[s:s + mb].to(ctx.device)),
                                      None if prompts is None else prompts[s:s + mb], None)
            scores.append(lr.float().cpu())
    return torch.cat(scores)


# --- image features (SD): diversity and prior preservation -------------------------------------------------------

def _features_of(ctx: EvalContext, extractor: torch.nn.Module, samples: torch.Tensor) -> torch.Tensor:
    """φ(decode(x)) of samples (n, *S), in micro-batches of sampling.batch_size; (n, F) float32 on the CPU. The
    extractor sits on the device only while it runs, so it holds no device memory through training."""
    mb = ctx.cfg.sampling.batch_size
    extractor.to(ctx.device)
    try:
        with torch.no_grad():
            return torch.cat([extractor(ctx.backbone.decode(samples[s:s + mb].to(ctx.device))).float().cpu()
                              for s in range(0, samples.shape[0], mb)])
    finally:
        extractor.to("cpu")


def _image_state(ctx: EvalContext, n: int) -> dict:
    """What an SD run with ``eval.features`` computes once and keeps: the extractor, and the features and reward of
    the pretrained model's n samples."""
    st = ctx.cache.get("image_eval")
    if st is None:
        st = ctx.cache["image_eval"] = {"extractor": image_features(ctx.cfg.eval.features, ctx.cfg.eval.feature_model)}
    if st.get("pretrained_n") != n:
        ps, pp = _pretrained_samples(ctx, n)
        p_feats = _features_of(ctx, st["extractor"], ps)
        st.update(pretrained_n=n, pretrained_prompts=pp, pretrained_features=p_feats,
                  pretrained_reward=_scores(ctx, ps, pp))
    return st


def _image_eval(ctx: EvalContext, samples: torch.Tensor, prompts) -> dict:
    """Within-prompt diversity of the policy's and the pretrained model's samples, and FID/KID between the two, pooled
    and per prompt then averaged (prior preservation: the pretrained model drew its samples at the same seeds and
    prompts)."""
    n = samples.shape[0]
    st = _image_state(ctx, n)
    if st["pretrained_prompts"] != prompts:
        raise RuntimeError("the pretrained samples were drawn for other prompts than the evaluation's")
    p_feats = st["pretrained_features"]
    feats = _features_of(ctx, st["extractor"], samples)
    div, p_div = prompt_diversity(feats, prompts), prompt_diversity(p_feats, prompts)
    pp = prior_preservation(p_feats, feats, prompts)
    kid_m, kid_s = kid(p_feats, feats)
    return {"diversity": div["mean"], "diversity_per_prompt": div["per_prompt"],
            "fid_pretrained": fid(p_feats, feats), "kid_pretrained": kid_m, "kid_pretrained_std": kid_s,
            "fid_pretrained_per_prompt": pp["fid"], "kid_pretrained_per_prompt": pp["kid"],
            "prior_preservation_per_prompt": pp["per_group"],
            "pretrained": {"diversity": p_div["mean"], "diversity_per_prompt": p_div["per_prompt"],
                           "reward_mean": float(st["pretrained_reward"].mean())},
            "num_samples": n}


# --- the digits benchmark ---------------------------------------------------------------------------------------

def _digits_state(ctx: EvalContext) -> dict:
    """What a digits run computes once and keeps: the feature classifier and the importance-sampled target."""
    st = ctx.cache.get("digits")
    if st is not None:
        return st
    from fastnabla import digits

    cfg = ctx.cfg
    clf = getattr(ctx.reward_fn, "classifier", None)
    meta = dict(getattr(ctx.reward_fn, "meta", {}) or {})
    if clf is None:
        clf, meta = digits.ensure_classifier(cfg.model.image_size, cfg.model.cache_dir, cfg.logging.progress)
    clf = clf.to(ctx.device).eval()
    st = {"classifier": clf, "classifier_test_accuracy": meta.get("test_accuracy"), "target": None}
    n_gt = cfg.eval.ground_truth_samples
    if n_gt and not ctx.backbone.conditional:
        shared = None  # the value's trajectories, when they are this draw's first ones (gfn.value_draw: target)
        if cfg.gfn.value_guidance > 0 and cfg.gfn.value_draw == "target":
            from fastnabla.value import reference_draw_path, value_draw_stream

            shared = reference_draw_path(ctx.backbone, cfg.gfn.value_trajectories, *value_draw_stream(cfg),
                                         digits.cache_root(cfg.model.cache_dir))
        ref = digits.reference_samples(ctx.backbone, clf, n_gt, batch=digits.target_draw_batch(cfg),
                                       cache_dir=cfg.model.cache_dir, progress=cfg.logging.progress and ctx.is_main,
                                       trajectories=shared)
        log_r = _scores(ctx, ref["images"], None)
        C = clf.head.out_features
        st["target"] = digits.ground_truth(ref, log_r, cfg.gfn.reward_scale, C,
                                           real_labels=digits.load_digit_data()[1] if C == 10 else None)
    ctx.cache["digits"] = st
    return st


def diversity_ratio_per_class(per_class: dict, target: dict, min_mass: float = 0.02) -> dict:
    """{class: the model's within-class diversity / the target's} for every class the target keeps (its mass ≥
    ``min_mass``); a class the model lost counts 0. ``per_class``: ``diversity(...)["per_group"]`` of the model's
    samples grouped by class; ``target``: the importance-sampled target (``digits.ground_truth``)."""
    return {c: per_class.get(c, 0.0) / v for c, v in target["diversity_per_class"].items()
            if target["class_histogram"][c] >= min_mass and v > 0}


def diversity_ratio_se_per_class(per_class: dict, per_class_se: dict, target: dict, min_mass: float = 0.02) -> dict:
    """{class: the standard error of ``diversity_ratio_per_class``'s ratio}: both sides' errors (``diversity``'s
    "per_group_se", the target's "diversity_per_class_se") combined, ratio·hypot(se_m/m, se_t/t). A class the model
    lost gets 0, like its ratio."""
    ratios = diversity_ratio_per_class(per_class, target, min_mass)
    t, t_se = target["diversity_per_class"], target.get("diversity_per_class_se", {})
    return {c: r * math.hypot(per_class_se.get(c, 0.0) / per_class[c], t_se.get(c, 0.0) / t[c])
            if per_class.get(c, 0.0) > 0 else 0.0 for c, r in ratios.items()}


def _digits_features(st, backbone, samples: torch.Tensor):
    from fastnabla.digits import classifier_outputs

    return classifier_outputs(st["classifier"], backbone.decode(samples))


def _digits_epoch(ctx: EvalContext, finals: torch.Tensor, log_r: torch.Tensor | None, kl_path: float | None) -> dict:
    st = _digits_state(ctx)
    logits, feats = _digits_features(st, ctx.backbone, finals)
    pred = logits.argmax(1)
    out = {"diversity_batch": diversity(feats, max_per_group=1024)["overall"]}
    tgt = st["target"]
    if tgt is not None:
        out["class_tv_batch"] = histogram_tv(class_histogram(pred, logits.shape[1]), tgt["class_histogram"])
        if log_r is not None and kl_path is not None:  # the evidence bound: KL(P_θ‖P*) ≤ this (≥ 0)
            out["kl_target_bound_batch"] = tgt["log_z"] - ctx.cfg.gfn.reward_scale * float(log_r.mean()) + kl_path
    return out


def _digits_eval(ctx: EvalContext, samples: torch.Tensor, prompts, log_r: torch.Tensor, final: bool) -> dict:
    """Class histogram (and its TV to the target), diversity, FID/KID against the pretrained model's samples at the
    same seeds and prompts; at the end also the .npy files and the report plots."""
    cfg, bb = ctx.cfg, ctx.backbone
    st = _digits_state(ctx)
    n = samples.shape[0]
    key = ("pretrained", n)
    if st.get("pretrained_key") != key:  # the reference never changes: its samples are drawn once per size
        ps, pp = _pretrained_samples(ctx, n)
        st["pretrained"] = (ps, pp, _scores(ctx, ps, pp)) + tuple(_digits_features(st, bb, ps))
        st["pretrained_key"] = key
    ps, _, p_lr, p_logits, p_feats = st["pretrained"]
    logits, feats = _digits_features(st, bb, samples)
    C = logits.shape[1]
    pred, p_pred = logits.argmax(1), p_logits.argmax(1)
    hist, p_hist = class_histogram(pred, C), class_histogram(p_pred, C)
    div, p_div = diversity(feats, pred), diversity(p_feats, p_pred)
    kid_m, kid_s = kid(p_feats, feats)
    out = {}
    if prompts is not None:  # class-conditional: per prompt, then averaged (the paper's protocol)
        pp = prior_preservation(p_feats, feats, prompts)
        out.update(fid_pretrained_per_prompt=pp["fid"], kid_pretrained_per_prompt=pp["kid"])
    out.update({
        "class_histogram": [round(float(v), 4) for v in hist], "mean_log_r": float(log_r.mean()),
        "mean_log_r_se": mean_se(log_r),
        "mean_log_r_share_per_class": [float(v) for v in log_r_share_per_class(pred, log_r, C)],
        "diversity": div["overall"], "diversity_per_class": div["per_group"],
        "diversity_per_class_se": div["per_group_se"], "fid_pretrained": fid(p_feats, feats), "kid_pretrained": kid_m, "kid_pretrained_std": kid_s,
        "pretrained": {"class_histogram": [round(float(v), 4) for v in p_hist], "mean_log_r": float(p_lr.mean()),
                       "diversity": p_div["overall"], "diversity_per_class": p_div["per_group"]},
        "classifier_test_accuracy": st["classifier_test_accuracy"], "num_samples": n})
    if final:  # rows: a pretrained sample's class; columns: the class of the finetuned sample at the same seed
        out["class_transitions"] = class_transitions(p_pred, pred, C).tolist()
    tgt = st["target"]
    if tgt is not None:
        out["class_tv"] = histogram_tv(hist, tgt["class_histogram"])
        out["mean_log_r_gap"] = out["mean_log_r"] - tgt["mean_log_r"]
        if "mean_log_r_se" in tgt:  # both sides' sampling error, combined (independent draws)
            out["mean_log_r_gap_se"] = math.hypot(out["mean_log_r_se"], tgt["mean_log_r_se"])
        if "mean_log_r_share_per_class" in tgt:  # the gap split by class: where the model's mean log R falls short
            out["mean_log_r_gap_per_class"] = [m - t for m, t in zip(out["mean_log_r_share_per_class"],
                                                                     tgt["mean_log_r_share_per_class"])]
        out["diversity_ratio_per_class"] = diversity_ratio_per_class(div["per_group"], tgt)
        out["diversity_ratio_se_per_class"] = diversity_ratio_se_per_class(div["per_group"], div["per_group_se"], tgt)
        if final:
            out["target"] = tgt
        out["pretrained"]["class_tv"] = histogram_tv(p_hist, tgt["class_histogram"])
        if final:
            from fastnabla.report import check_targets

            out["targets_met"] = check_targets(out)
    if final and ctx.is_main:
        np.save(os.path.join(ctx.out_dir, "final_samples.npy"), samples.clamp(-1, 1).numpy())
        np.save(os.path.join(ctx.out_dir, "pretrained_samples.npy"), ps.clamp(-1, 1).numpy())
        if cfg.logging.plots:
            out["plots"] = [
                plot_digit_grid(os.path.join(ctx.out_dir, "samples_grid.png"), bb.decode(ps), bb.decode(samples)),
                plot_class_histogram(os.path.join(ctx.out_dir, "class_histogram.png"), hist, p_hist,
                                     None if tgt is None else tgt["class_histogram"]),
                plot_class_transitions(os.path.join(ctx.out_dir, "class_transitions.png"),
                                       out["class_transitions"])]
            curves = plot_curves(ctx.out_dir, ctx.history)
            if curves:
                out["plots"].append(curves)
            from dataclasses import asdict

            from fastnabla.report import write_report  # report_curves.png + report.html

            out["plots"] += write_report(ctx.out_dir, ctx.history, out, asdict(cfg))
    return out


def plot_digit_grid(path: str, pretrained01: torch.Tensor, finetuned01: torch.Tensor, n: int = 64) -> str:
    """Side-by-side grids of the first n pretrained and finetuned images (same seeds), images in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(x):
        k = int(math.ceil(math.sqrt(min(n, x.shape[0]))))
        x = x[: k * k, 0].clamp(0, 1).cpu().numpy()
        x = np.concatenate([x, np.zeros((k * k - x.shape[0], *x.shape[1:]))]) if x.shape[0] < k * k else x
        x = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=0.3)  # a grey frame around each image
        S = x.shape[-1]
        return x.reshape(k, k, S, S).transpose(0, 2, 1, 3).reshape(k * S, k * S)

    fig, ax = plt.subplots(1, 2, figsize=(9, 4.8))
    for a, x, title in zip(ax, (pretrained01, finetuned01), ("pretrained", "finetuned (same seeds)")):
        a.imshow(grid(x), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        a.set_title(title)
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_class_histogram(path: str, model, pretrained, target=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = len(model)
    xs = np.arange(C)
    bars = [("pretrained", pretrained), ("finetuned", model)] + ([("target (IS)", target)] if target is not None else [])
    wdt = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (name, h) in enumerate(bars):
        ax.bar(xs + (i - (len(bars) - 1) / 2) * wdt, [float(v) for v in h], wdt, label=name)
    ax.set_xticks(xs)
    ax.set_xlabel("class (classifier argmax)")
    ax.set_ylabel("fraction")
    title = "class histogram"
    if target is not None:
        title += f": TV(finetuned, target) = {histogram_tv(model, target):.3f}"
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_class_transitions(path: str, counts) -> str:
    """Heat map of ``class_transitions``: each row (a pretrained class) as fractions of its samples, with the counts
    behind each row on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(counts, dtype=float)
    rows = m.sum(1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    C = m.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(C):
        for j in range(C):
            if frac[i, j] >= 0.005:
                txt = f"{frac[i, j]:.2f}"
                ax.text(j, i, "1" if txt == "1.00" else txt[1:], ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(C))
    ax.set_yticks(range(C), [f"{i} ({int(rows[i, 0])})" for i in range(C)])
    ax.set_xlabel("class of the finetuned sample at the same seed")
    ax.set_ylabel("class of the pretrained sample (count)")
    ax.set_title("where finetuning moved each pretrained class (row fractions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(out_dir: str, history: list) -> str | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    panels = [("reward_mean", "reward (mean log R of fresh samples)"), ("loss", "loss")]
    if "tv_batch" in history[0]:
        panels.append(("tv", "TV to the exact target"))
    if "diversity_batch" in history[0]:
        panels.append(("diversity", "diversity (mean pairwise feature distance)"))
    if "class_tv_batch" in history[0]:
        panels.append(("class_tv", "class-histogram TV to the IS target"))
    if any("fid_pretrained" in h for h in history):
        panels.append(("fid_pretrained", "FID vs pretrained samples (eval)"))
    if "kl_path_batch" in history[0]:
        panels.append(("kl_path_batch", "path KL to the reference (fresh batch, nats)"))
    fig, ax = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
    for a, (key, title) in zip(np.atleast_1d(ax), panels):
        if key in ("diversity", "class_tv"):
            a.plot(ep, [h.get(f"{key}_batch") for h in history], alpha=0.5, label="fresh batch")
            ev = [(h["epoch"], h[key]) for h in history if key in h]
            if ev:
                a.plot(*zip(*ev), "o-", label="eval")
            a.legend()
        elif key == "kl_path_batch":
            a.plot(ep, [h.get(key, np.nan) for h in history], label="KL(P_θ‖P_ref)")
            if "kl_target_bound_batch" in history[0]:
                a.plot(ep, [h.get("kl_target_bound_batch", np.nan) for h in history],
                       label="KL(P_θ‖P*) bound")
            a.set_yscale("log")
            a.legend()
        elif key == "fid_pretrained":
            a.plot(*zip(*[(h["epoch"], h[key]) for h in history if key in h]), "o-")
        elif key == "tv":
            a.plot(ep, [h.get("tv_batch") for h in history], alpha=0.5, label="fresh batch")
            ev = [(h["epoch"], h["tv"]) for h in history if "tv" in h]
            if ev:
                a.plot(*zip(*ev), "o-", label="eval")
            a.axhline(0.10, color="gray", ls="--", lw=1, label="target 0.10")
            a.legend()
        else:
            a.plot(ep, [h.get(key, np.nan) for h in history])
            if key == "loss":
                a.set_yscale("log")
        a.set_title(title)
        a.set_xlabel("epoch")
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
