"""The digits benchmark's one-time pieces, all cached: data, the classifier, the pretrained UNet, the ground truth.

- Data: scikit-learn's ``load_digits`` (1,797 images 8×8, read from disk), scaled to [−1, 1] → (n, 1, S, S); a
  fixed split (seed 0, 20 % held out) serves classifier testing and the pretrained model's FID/KID.
- ``ensure_classifier``: the reward/feature CNN (``rewards.digits.DigitClassifier``), trained on the train split with
  ±1-pixel shifts, test accuracy recorded.
- ``ensure_pretrained``: the ``UNet2DModel`` (``backbones.pixel.build_unet``) trained with the ε-prediction loss
  E‖ε − ε_θ(√ᾱ_t x + √(1−ᾱ_t) ε, t)‖² on the train split (an EMA of the weights is what is saved), stored as a
  diffusers pipeline directory (``unet/`` + ``scheduler/``).
- ``reference_samples``: n samples of p_ref drawn with exactly the training sampler (scheduler, N, η, guidance;
  ALGORITHM §5b), with the classifier's logits and features.
- ``ground_truth``: the target p_ref·R^β by self-normalised importance sampling over those samples.

Each cached item lives in ``<cache>/<kind>-<sha of its spec>``, ``<cache>`` = ``model.cache_dir``, else
$FASTNABLA_CACHE_DIR, else ``~/.cache/fastnabla/digits``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import Optional

import numpy as np
import torch

from fastnabla.checkpoint import atomic_json, atomic_write

log = logging.getLogger("fastnabla")

__all__ = ["cache_root", "load_digit_data", "split_indices", "train_classifier", "ensure_classifier",
           "load_classifier", "unet_spec", "pretrain_unet", "ensure_pretrained", "reference_samples",
           "target_draw_batch", "ground_truth", "classifier_outputs"]

SKLEARN_ERROR = "the digits benchmark needs scikit-learn: pip install 'fastnabla[digits]'"


def cache_root(cache_dir: Optional[str] = None) -> str:
    root = cache_dir or os.environ.get("FASTNABLA_CACHE_DIR") or os.path.join("~", ".cache", "fastnabla", "digits")
    return os.path.expanduser(root)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _bar(total: int, desc: str, enabled: bool):
    """A progress bar, or tqdm's silent one (the same calls, nothing shown) when ``enabled`` is false."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=not enabled)


@torch.no_grad()
def _ema_update(avg: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    """avg ← decay·avg + (1 − decay)·live, parameter by parameter (a module's running average, e.g. the pretrained
    UNet's EMA and the value fit's bootstrap target)."""
    for pa, p in zip(avg.parameters(), live.parameters()):
        pa.lerp_(p, 1 - decay)


# --- data ---------------------------------------------------------------------------------------------------------

def load_digit_data(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): x (1797, 1, S, S) float32 in [−1, 1] (bilinear upsampling when S ≠ 8), y (1797,) long."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(SKLEARN_ERROR) from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1), torch.tensor(d.target, dtype=torch.long)


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) index tensors of a fixed random split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * test_fraction))
    return perm[k:], perm[:k]


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image (B, 1, S, S) shifted by a random (dy, dx) ∈ {−1, 0, 1}², the background (−1) filled in."""
    B, _, S, _ = x.shape
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    d = torch.randint(0, 3, (B, 2), generator=g)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            m = (d[:, 0] == dy) & (d[:, 1] == dx)
            out[m] = pad[m, :, dy:dy + S, dx:dx + S]
    return out


# --- the classifier -----------------------------------------------------------------------------------------------

CLASSIFIER_DEFAULTS = dict(width=32, features=128, steps=1500, batch_size=128, lr=2e-3, seed=0, version=1)


def train_classifier(image_size: int = 8, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, width: int = 32, features: int = 128, progress: bool = True):
    """Train ``DigitClassifier`` on the train split; returns (model in eval mode, test accuracy)."""
    from fastnabla.rewards.digits import DigitClassifier

    x, y = load_digit_data(image_size)
    tr, te = split_indices(len(y))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier(image_size, width, features)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = _bar(steps, "digits classifier", progress)
    model.train()
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (batch_size,), generator=g)]
        xb = _shift(x[idx], g) + 0.05 * torch.randn(batch_size, 1, image_size, image_size, generator=g)
        loss = torch.nn.functional.cross_entropy(model(xb / 2 + 0.5), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[te] / 2 + 0.5).argmax(1) == y[te]).float().mean())
    return model, acc


def load_classifier(directory: str):
    """(classifier, meta) from a directory written by ``ensure_classifier``."""
    from fastnabla.rewards.digits import DigitClassifier

    directory = os.path.expanduser(str(directory))
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        state = torch.load(os.path.join(directory, "classifier.pt"), map_location="cpu", weights_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"reward.model={directory!r}: not a digits classifier directory (meta.json + "
                         f"classifier.pt): {type(e).__name__}; leave it unset to use the cached default") from None
    model = DigitClassifier(**meta["model"])
    model.load_state_dict(state)
    return model.eval(), meta


def ensure_classifier(image_size: int = 8, cache_dir: Optional[str] = None, progress: bool = True):
    """(classifier, meta) of the cached classifier for ``image_size``, trained and cached on first use."""
    spec = dict(kind="classifier", image_size=image_size, **CLASSIFIER_DEFAULTS)
    d = os.path.join(cache_root(cache_dir), f"classifier-{spec_hash(spec)}")
    if os.path.isfile(os.path.join(d, "meta.json")):
        return load_classifier(d)
    log.info("training the digits classifier (once; cached in %s)", d)
    t0 = time.time()
    c = CLASSIFIER_DEFAULTS
    model, acc = train_classifier(image_size, c["steps"], c["batch_size"], c["lr"], c["seed"], c["width"],
                                  c["features"], progress)
    meta = dict(spec=spec, model=model.config, test_accuracy=acc, train_seconds=round(time.time() - t0, 1),
                hash=spec_hash(spec))
    os.makedirs(d, exist_ok=True)
    atomic_write(os.path.join(d, "classifier.pt"), lambda tmp: torch.save(model.state_dict(), tmp))
    atomic_json(os.path.join(d, "meta.json"), meta)  # last: its presence marks the cache complete
    log.info("digits classifier: test accuracy %.4f", acc)
    return model, meta


@torch.no_grad()
def classifier_outputs(classifier, images01: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, 10), features (n, F)) of images (n, 1, S, S) in [0, 1], float32 on the CPU."""
    dev = next(classifier.parameters()).device
    logits, feats = [], []
    for s in range(0, images01.shape[0], batch):
        f = classifier.features(images01[s:s + batch].to(dev).float())
        feats.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(logits), torch.cat(feats)


# --- pretraining --------------------------------------------------------------------------------------------------

def unet_spec(cfg) -> dict:
    """What determines the pretrained weights (and therefore its cache key)."""
    m = cfg.model
    from fastnabla.backbones.pixel import SCHEDULER_CONFIG

    return dict(kind="unet", image_size=m.image_size, channels=list(m.unet_channels),
                class_conditional=m.class_conditional, steps=m.pretrain_steps, batch_size=m.pretrain_batch_size,
                lr=m.pretrain_lr, ema=0.999, class_dropout=0.1, seed=0, schedule=SCHEDULER_CONFIG, version=1)


def pretrain_unet(spec: dict, progress: bool = True):
    """Train the UNet of ``spec`` on the train split; returns (EMA UNet, stats)."""
    import copy

    from fastnabla.backbones.pixel import SCHEDULER_CONFIG, build_unet

    x, y = load_digit_data(spec["image_size"])
    tr, _ = split_indices(len(y))
    x, y = x[tr], y[tr]
    torch.manual_seed(spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"])
    ncls = 10 if spec["class_conditional"] else 0
    unet = build_unet(spec["image_size"], spec["channels"], 1, ncls)
    ema = copy.deepcopy(unet).requires_grad_(False)
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod.float()
    T, steps, B = len(alphas), spec["steps"], spec["batch_size"]
    opt = torch.optim.AdamW(unet.parameters(), lr=spec["lr"], weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    bar = _bar(steps, "pretraining the digits UNet", progress)
    t0, losses = time.time(), []
    unet.train()
    for i in range(steps):
        idx = torch.randint(0, len(y), (B,), generator=g)
        x0 = x[idx]
        t = torch.randint(0, T, (B,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        labels = None
        if ncls:
            labels = torch.where(torch.rand(B, generator=g) < spec["class_dropout"], torch.full_like(y[idx], ncls),
                                 y[idx])
        loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=labels).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, unet, min(spec["ema"], (1 + i) / (10 + i)))  # warm-up: early averages forget the init
        losses.append(float(loss.detach()))
        bar.update(1)
        if i % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    bar.close()
    stats = dict(train_seconds=round(time.time() - t0, 1), final_loss=float(np.mean(losses[-200:])),
                 parameters=sum(p.numel() for p in unet.parameters()))
    return ema.eval(), stats


def ensure_pretrained(cfg, progress: Optional[bool] = None) -> str:
    """Directory of the cached pretrained UNet for ``cfg.model`` (a diffusers pipeline layout: unet/, scheduler/),
    pretraining it first when missing."""
    from diffusers import DDIMScheduler

    from fastnabla.backbones.pixel import SCHEDULER_CONFIG

    spec = unet_spec(cfg)
    d = os.path.join(cache_root(cfg.model.cache_dir), f"unet-{spec_hash(spec)}")
    if os.path.isfile(os.path.join(d, "meta.json")):
        return d
    log.info("pretraining the digits UNet (once; cached in %s)", d)
    unet, stats = pretrain_unet(spec, cfg.logging.progress if progress is None else progress)
    unet.save_pretrained(os.path.join(d, "unet"))
    DDIMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(os.path.join(d, "scheduler"))
    atomic_json(os.path.join(d, "meta.json"), dict(spec=spec, hash=spec_hash(spec), **stats))  # last: the marker
    return d


# --- samples of p_ref and the importance-sampled target -----------------------------------------------------------

def _weights_digest(state: dict) -> str:
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _reference_digest(backbone) -> str:
    """A digest of the weights the reference computes with (the UNet without its adapter, or the frozen copy of a
    full finetune), under the pretrained model's own parameter names: the same weights give the same digest with
    or without a LoRA wrapped around them (peft renames a wrapped layer's weight to ``….base_layer.weight``)."""
    net = backbone.ref_unet if backbone.ref_unet is not None else backbone.unet
    return _weights_digest({k.replace(".base_layer.", "."): v for k, v in net.state_dict().items()
                            if "lora_" not in k})


#: the seed of the p_ref draw behind the importance-sampled target. The target belongs to the pretrained model and
#: its sampler, not to a training run, so runs with different ``seed`` share one cached draw.
GROUND_TRUTH_SEED = 104729


def target_draw_batch(cfg) -> int:
    """The batch the target's p_ref draw is split into (it orders the noise stream, so a draw that shares the
    stream, ``gfn.value_draw: target``, uses the same)."""
    return max(cfg.sampling.batch_size, 1024)


@torch.no_grad()
def reference_samples(backbone, classifier, n: int, seed: int = GROUND_TRUTH_SEED, batch: int = 1024,
                      cache_dir: Optional[str] = None, progress: bool = True,
                      trajectories: Optional[str] = None) -> dict:
    """n samples of the pretrained model drawn with the backbone's own sampler (the one training uses), cached.

    Returns {"images": (n, 1, S, S) float32 in the state space, "logits": (n, 10), "features": (n, F)}; the cache key
    is the reference weights, the sampler (scheduler class, timesteps, η, guidance), n, the seed and the
    classifier's weights.

    ``trajectories``: the file of a cached draw of this same stream (seed and batch) with its states and generator
    state (``value.reference_trajectories``, ``gfn.value_draw: target``). When it exists, its final states are this
    draw's first ones and the draw continues from its generator, so the samples are the same as a fresh draw's.
    """
    from fastnabla.sampling import sample_trajectories, step_coefficients

    if backbone.conditional:
        raise ValueError("ground truth by importance sampling is implemented for the unconditional digits model; "
                         "set model.class_conditional=false")
    sched = backbone.scheduler
    spec = dict(kind="refsamples", ref=_reference_digest(backbone), scheduler=type(sched).__name__,
                timesteps=[int(t) for t in sched.timesteps], eta=backbone.eta, guidance=backbone.guidance_scale,
                n=n, seed=seed, classifier=_weights_digest(classifier.state_dict()), version=1)
    path = os.path.join(cache_root(cache_dir), f"refsamples-{spec_hash(spec)}.npz")
    if os.path.isfile(path):
        z = np.load(path)
        return {k: torch.from_numpy(z[k].astype(np.float32)) for k in ("images", "logits", "features")}
    coeffs = step_coefficients(backbone)
    g = torch.Generator().manual_seed(seed)
    imgs, start = [], 0
    if trajectories and os.path.isfile(trajectories):
        shared = torch.load(trajectories, map_location="cpu")
        kept = shared["xs"].shape[0]
        # the noise stream is ordered batch by batch: whole batches of the shared draw are this draw's, and the
        # rest continues from the generator's state after them
        if (kept >= n and n % batch == 0) or (kept < n and kept % batch == 0 and "generator" in shared):
            imgs.append(shared["xs"][:n, -1].float())
            start = imgs[0].shape[0]
            if start < n:
                g.set_state(shared["generator"])
        del shared
    bar = _bar(n, "sampling p_ref for the ground truth", progress)
    bar.update(start)
    with backbone.reference_sampling():
        for s in range(start, n, batch):
            m = min(batch, n - s)
            tr = sample_trajectories(backbone, m, g, coeffs, None, None, keep_trajectory=False)
            imgs.append(tr.xs[:, -1].cpu())
            bar.update(m)
    bar.close()
    images = torch.cat(imgs)
    logits, feats = classifier_outputs(classifier, backbone.decode(images))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, images=images.numpy().astype(np.float16), logits=logits.numpy(),
                                            features=feats.numpy().astype(np.float16)))
    return {"images": images.half().float(), "logits": logits, "features": feats.half().float()}


@torch.no_grad()
def ground_truth(ref: dict, log_r: torch.Tensor, beta: float, num_classes: int = 10,
                 diversity_max: int = 4000, real_labels: Optional[torch.Tensor] = None) -> dict:
    """The target p_ref·R^β by self-normalised importance sampling over the reference samples.

    w_i ∝ exp(β·log R_i) (Σ w = 1), ESS = 1/Σ w_i². Class histogram Σ_i w_i·[argmax logits_i = c]; mean log R
    Σ_i w_i log R_i, its standard error (``metrics.mean_se``), and each class's share of it
    (``metrics.log_r_share_per_class``); diversity the importance-weighted mean pairwise feature distance, overall
    and per class, with each class's standard error.
    ``log_z`` and ``kl_to_reference`` (``metrics.tilt_kl``): the target's KL to p_ref, also its path KL to the
    reference sampler. ``reference``: the unweighted draw's class histogram (p_ref itself, from all the samples),
    and with ``real_labels`` its TV to the real data's: the pretrained model's class balance, measured without the
    finite-sample bias of a small quality draw.
    """
    from fastnabla import metrics

    w, ess = metrics.importance_weights(log_r, beta)
    pred = ref["logits"].argmax(1)
    hist = metrics.class_histogram(pred, num_classes, w)
    div = metrics.diversity(ref["features"], pred, w, max_per_group=diversity_max)
    ref_hist = metrics.class_histogram(pred, num_classes)
    reference = dict(class_histogram=[float(v) for v in ref_hist])
    if real_labels is not None:
        reference["class_tv_to_real"] = metrics.histogram_tv(ref_hist, metrics.class_histogram(real_labels,
                                                                                                num_classes))
    log_z, kl = metrics.tilt_kl(log_r, beta)
    return dict(class_histogram=[float(v) for v in hist], mean_log_r=float((w * log_r.double()).sum()),
                mean_log_r_se=metrics.mean_se(log_r, w),
                mean_log_r_share_per_class=[float(v) for v in metrics.log_r_share_per_class(pred, log_r,
                                                                                            num_classes, w)],
                log_z=log_z, kl_to_reference=kl, diversity=div["overall"], diversity_per_class=div["per_group"],
                diversity_per_class_se=div["per_group_se"],
                ess=ess, num_samples=len(log_r), beta=float(beta), reference=reference)


# --- the pretrained model's own quality ---------------------------------------------------------------------------

@torch.no_grad()
def pretrained_quality(backbone, classifier, n: int = 2000, seed: int = 0, batch: int = 1024) -> dict:
    """The pretrained model against the real digits, in classifier features: FID/KID of n samples (drawn with the
    training sampler) against the held-out split, their class histogram's TV to the real data's (all 1,797 labels)
    and to uniform, and the mean top-class probability. Real-vs-real (held-out against train) FID/KID is the floor
    those numbers sit on at these sample sizes."""
    from fastnabla import metrics
    from fastnabla.sampling import sample_trajectories, step_coefficients

    S = backbone.sample_shape[-1]
    x, y = load_digit_data(S)
    tr, te = split_indices(len(y))
    coeffs = step_coefficients(backbone)
    g = torch.Generator().manual_seed(seed)
    parts = []
    with backbone.reference_sampling():
        for s in range(0, n, batch):
            parts.append(sample_trajectories(backbone, min(batch, n - s), g, coeffs, None, None,
                                             keep_trajectory=False).xs[:, -1].cpu())
    samples = torch.cat(parts)
    logits, feats = classifier_outputs(classifier, backbone.decode(samples))
    _, real_te = classifier_outputs(classifier, x[te] / 2 + 0.5)
    _, real_tr = classifier_outputs(classifier, x[tr] / 2 + 0.5)
    C = logits.shape[1]
    hist = metrics.class_histogram(logits.argmax(1), C)
    real_hist = metrics.class_histogram(y, C)
    kid_m, kid_s = metrics.kid(real_te, feats)
    floor_kid, _ = metrics.kid(real_te, real_tr)
    return dict(num_samples=n, fid_heldout=metrics.fid(real_te, feats), kid_heldout=kid_m, kid_heldout_std=kid_s,
                fid_real_vs_real=metrics.fid(real_te, real_tr), kid_real_vs_real=floor_kid,
                class_histogram=[round(float(v), 4) for v in hist],
                class_tv_to_real=metrics.histogram_tv(hist, real_hist),
                class_tv_to_uniform=metrics.histogram_tv(hist, torch.full((C,), 1.0 / C)),
                mean_top_class_probability=float(torch.softmax(logits, 1).max(1).values.mean()),
                diversity=metrics.diversity(feats)["overall"],
                diversity_real_heldout=metrics.diversity(real_te)["overall"])


def git_sha(short: bool = True) -> str:
    """The checkout's HEAD commit ('' outside a git checkout), or $FASTNABLA_GIT_SHA when set: a copy of the working
    tree on another machine (benchmarks/gpu_suite.sh) can carry a .git older than the code it runs."""
    import subprocess

    if os.environ.get("FASTNABLA_GIT_SHA"):
        return os.environ["FASTNABLA_GIT_SHA"]
    try:
        r = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], capture_output=True,
                           text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):  # no git: the measurement is still written
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def environment() -> dict:
    """Where a measurement was taken: machine, library versions, git commit, UTC date."""
    import datetime
    import platform

    vers = {}
    for mod in ("torch", "diffusers", "peft", "sklearn", "torchmetrics", "numpy"):
        try:
            vers[mod] = __import__(mod).__version__
        except ImportError:
            vers[mod] = None
    return dict(machine=f"{platform.machine()} {platform.processor() or ''}".strip(), cpus=os.cpu_count(),
                torch_threads=torch.get_num_threads(), python=platform.python_version(), versions=vers,
                git_sha=git_sha(short=False) or None,
                date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))


def main(argv=None) -> int:
    """``fastnabla pretrain-digits --config configs/digits.yaml [--report FILE] [key=value …]``: train (or load) the
    classifier and the UNet, measure the pretrained model, and print/write the numbers."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="fastnabla pretrain-digits", description=main.__doc__)
    p.add_argument("--config", default=None, help="a digits YAML config (model.backbone=pixel)")
    p.add_argument("--report", default=None, help="also write the measurements to this JSON file")
    p.add_argument("--samples", type=int, default=2000, help="samples for the quality report")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from fastnabla.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fastnabla pretrain-digits: error: {e}", file=sys.stderr)
        return 2
    if cfg.model.backbone != "pixel":
        print("fastnabla pretrain-digits: error: model.backbone must be pixel (use configs/digits.yaml)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    from fastnabla.backbones.pixel import PixelBackbone

    t0 = time.time()
    clf, cmeta = ensure_classifier(cfg.model.image_size, cfg.model.cache_dir, cfg.logging.progress)
    path = cfg.model.pretrained or ensure_pretrained(cfg)
    with open(os.path.join(path, "meta.json")) as f:
        umeta = json.load(f)
    bb = PixelBackbone.from_config(cfg)
    sampler = dict(scheduler=cfg.sampling.scheduler, num_steps=cfg.sampling.num_steps, eta=cfg.sampling.eta)
    qpath = os.path.join(path, f"quality-{spec_hash(dict(sampler, n=args.samples, v=1))}.json")
    if os.path.isfile(qpath):
        with open(qpath) as f:
            quality = json.load(f)
    else:
        q0 = time.time()
        quality = pretrained_quality(bb, clf, args.samples)
        quality["seconds"] = round(time.time() - q0, 1)
        atomic_json(qpath, quality)
    report = dict(classifier=dict(test_accuracy=cmeta["test_accuracy"], train_seconds=cmeta.get("train_seconds"),
                                  cache=cmeta.get("hash")),
                  unet=dict(path=path, **{k: umeta.get(k) for k in ("parameters", "train_seconds", "final_loss",
                                                                    "spec")}),
                  sampler=sampler, quality=quality, seconds_this_call=round(time.time() - t0, 1),
                  environment=environment())
    print(json.dumps(report, indent=2))
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 0
