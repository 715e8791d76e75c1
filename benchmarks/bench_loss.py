"""Throughput, bandwidth, launches and memory of the residual ∇-DB loss: eager reference vs torch.compile vs Triton.

    python benchmarks/bench_loss.py                       # CUDA: every provider, mode, dtype and B
    python benchmarks/bench_loss.py --device cpu --quick  # CPU smoke run: eager vs torch.compile, small B

Providers share one set of pre-validated inputs (``validate_loss_inputs`` runs once, outside the timing, for all
of them) and call the same functions the tests compare: ``residual_db_loss_reference`` (eager and compiled) and
``residual_db_loss_triton``. Modes follow Liger-Kernel: ``forward`` (inputs require grad, forward only),
``backward`` (autograd.grad of a retained graph with a random per-transition upstream gradient) and ``full``.

Figure of merit: bytes_min / time, where bytes_min reads each input once and writes each gradient once
(forward: reads; backward: gradient writes; full: both), against the device-to-device copy bandwidth measured
in the same run (copy bandwidth = 2·bytes / time of ``dst.copy_(src)``). Results go to
``benchmarks/results/loss_<device>.csv`` and a PNG next to it.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_sha  # noqa: E402
from fastnabla.loss import residual_db_loss_reference  # noqa: E402
from fastnabla.loss_contract import ARGS, GRAD_ARGS, LossInputs, validate_loss_inputs  # noqa: E402

SAMPLE_SHAPE = (4, 64, 64)  # SD1.5 latents
FULL_BS = (1, 8, 64, 512, 4096)
QUICK_BS = (1, 8, 64)
COLUMNS = ("kernel", "provider", "mode", "dtype", "B", "p50_ms", "p20_ms", "p80_ms", "gb_s", "pct_copy_bw",
           "launches", "peak_mem_mb", "device", "torch", "triton", "git_sha", "date")

# kernel name → the loss configuration it times
KERNELS = {
    # the λ = 1 training path: reads out, out_ref, reward_grad_next, flow_next; gradients to out and flow_next
    "residual_db": dict(strength=1.0, flow_next=True, terminal=True),
    # ALGORITHM §5 defaults with every term on: trust region 1e3, reverse residual 1.0 with the flow at x
    "residual_db_all_terms": dict(strength=1.0, flow_next=True, terminal=True, trust_region_scale=1e3,
                                  reverse_scale=1.0),
    # the returns recipe (ALGORITHM §5b): σ²-weighted policy residual, the flow on L_A; reads G as well
    "residual_db_returns": dict(strength=1.0, flow_next=True, terminal=True, policy_weight=True, return_next=True),
}


def make_inputs(kernel: str, B: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Validated LossInputs (leaves out/flow_next/flow_cur require grad) and the upstream gradient."""
    cfg = KERNELS[kernel]
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    shape = (B, *SAMPLE_SHAPE)
    kw = dict(coef_out=(torch.rand(B, generator=g) + 0.5).to(device), inv_var=(torch.rand(B, generator=g) * 10 + 1)
              .to(device), reward_grad_next=r(*shape))
    if cfg.get("flow_next"):
        kw["flow_next"] = r(*shape).requires_grad_(True)
    if cfg.get("terminal"):
        kw["terminal"] = (torch.arange(B) == B - 1).to(device)  # the last transition of a trajectory
    if cfg.get("trust_region_scale"):
        kw.update(out_old=r(*shape), trust_region_scale=cfg["trust_region_scale"])
    if cfg.get("policy_weight"):
        kw["policy_weight"] = (torch.rand(B, generator=g) * 2).to(device)
    if cfg.get("return_next"):
        kw["return_next"] = r(*shape)
    if cfg.get("reverse_scale"):
        kw.update(reverse_scale=cfg["reverse_scale"], score_rev=r(*shape), score_rev_ref=r(*shape),
                  reward_grad_cur=r(*shape), flow_cur=r(*shape).requires_grad_(True))
    p = validate_loss_inputs(r(*shape).requires_grad_(True), r(*shape), **kw)
    upstream = (torch.rand(B, generator=g) + 0.5).to(device)
    return p, upstream


def leaves(p: LossInputs):
    return [getattr(p, n) for n in GRAD_ARGS if getattr(p, n) is not None]


def bytes_min(p: LossInputs, mode: str) -> int:
    """Each input read once (forward), each gradient written once (backward); scalars included."""
    tensors = [getattr(p, a.name) for a in ARGS if a.kind != "scalar"]
    reads = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    writes = sum(t.numel() * t.element_size() for t in leaves(p))
    out_bytes = p.out.shape[0] * 4  # the loss
    return {"forward": reads + out_bytes, "backward": writes, "full": reads + out_bytes + writes}[mode]


_FIELDS = tuple(a.name for a in ARGS)


def _reference_fn(*values):
    """The eager reference on the contract's arguments passed positionally (what torch.compile traces)."""
    return residual_db_loss_reference(LossInputs(**dict(zip(_FIELDS, values))))


def _unpack(p: LossInputs):
    return tuple(getattr(p, n) for n in _FIELDS)


_compiled = None


def provider_fn(provider: str):
    """loss(p) for a provider."""
    global _compiled
    if provider == "eager":
        return lambda p: _reference_fn(*_unpack(p))
    if provider == "compile":
        if _compiled is None:
            # one static graph per (kernel, dtype, B): raise dynamo's recompile limit so none falls back to eager
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 256)
            _compiled = torch.compile(_reference_fn, dynamic=False)
        return lambda p: _compiled(*_unpack(p))
    if provider == "triton":
        from fastnabla.kernels.residual_db import residual_db_loss_triton

        return residual_db_loss_triton
    raise ValueError(provider)


def mode_fn(provider: str, mode: str, p: LossInputs, upstream: torch.Tensor):
    """A zero-argument callable timing one mode. ``triton_final``: the kernel told the upstream gradient at forward
    time (``expected_grad``), so it writes final gradients and the backward hands them back."""
    if provider == "triton_final":
        from fastnabla.kernels.residual_db import residual_db_loss_triton

        def loss_fn(q):
            return residual_db_loss_triton(q, expected_grad=upstream)
    else:
        loss_fn = provider_fn(provider)
    xs = leaves(p)
    if mode == "forward":
        return lambda: loss_fn(p)
    if mode == "backward":
        loss = loss_fn(p)
        return lambda: torch.autograd.grad(loss, xs, upstream, retain_graph=True)
    if mode == "full":
        return lambda: torch.autograd.grad(loss_fn(p), xs, upstream)
    raise ValueError(mode)


# ------------------------------------------------------------------------------------------------ measurement


def time_ms(fn, device: torch.device, quick: bool) -> tuple[float, float, float]:
    """(p50, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    for _ in range(2):
        fn()
    budget = 0.3 if quick else 2.0
    samples = []
    t_end = time.perf_counter() + budget
    while len(samples) < 5 or (time.perf_counter() < t_end and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10)  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(samples), q[1], q[7]


def copy_bandwidth_gb_s(device: torch.device) -> float:
    """Device-to-device copy: 2·bytes (read + write) per second, median of a few runs, in GB/s."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    p50, _, _ = time_ms(lambda: dst.copy_(src), device, quick=False)
    del src, dst
    return 2 * n * 4 / (p50 * 1e-3) / 1e9


def count_launches(fn) -> int:
    """GPU kernels (and memcpy/memset) launched by one call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def peak_mem_mb(fn, device: torch.device) -> float:
    """Peak allocated memory during one call, above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    res = fn()
    torch.cuda.synchronize()
    del res
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


# ------------------------------------------------------------------------------------------------ driver


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = sorted({r["kernel"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    modes = [m for m in ("forward", "backward", "full") if any(r["mode"] == m for r in rows)]
    panels = [(k, d) for k in kernels for d in dtypes]
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(4.2 * len(modes), 3.3 * len(panels)), squeeze=False)
    for i, (k, d) in enumerate(panels):
        for j, m in enumerate(modes):
            ax = axes[i][j]
            for prov in ("eager", "compile", "triton", "triton_final"):
                pts = sorted((r["B"], r["p50_ms"], r["p20_ms"], r["p80_ms"]) for r in rows
                             if r["kernel"] == k and r["dtype"] == d and r["mode"] == m and r["provider"] == prov)
                if not pts:
                    continue
                bs, p50, p20, p80 = zip(*pts)
                ax.plot(bs, p50, marker="o", label=prov)
                ax.fill_between(bs, p20, p80, alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("B (transitions)")
            ax.set_ylabel("ms (p50; band p20–p80)")
            ax.set_title(f"{k} · {d} · {m}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="small B set, short timing (CPU smoke run)")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--modes", default="forward,backward,full")
    ap.add_argument("--providers", default=None,
                    help="default: eager,compile,triton,triton_final (cpu: eager,compile)")
    ap.add_argument("--kernels", default=None, help=f"default: all on cuda, residual_db on cpu; of {list(KERNELS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: OpenMP spinning on a shared CPU distorts timings)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu (eager vs torch.compile only)")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 is ignored here; the interpreter is never timed", file=sys.stderr)
    providers = (args.providers or ("eager,compile,triton,triton_final" if device.type == "cuda" else
                                    "eager,compile")).split(",")
    if device.type == "cpu" and any(p.startswith("triton") for p in providers):
        sys.exit("the Triton provider needs a GPU (interpreter timings would mean nothing)")
    kernels = (args.kernels or (",".join(KERNELS) if device.type == "cuda" else "residual_db")).split(",")
    bs = args.batch_sizes or (QUICK_BS if args.quick else FULL_BS)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dts = [dtypes[d] for d in args.dtypes.split(",")]
    modes = args.modes.split(",")

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    common = dict(device=device_tag(device), torch=torch.__version__, triton=triton_version, git_sha=git_sha(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    copy_bw = copy_bandwidth_gb_s(device)
    print(f"device {common['device']}: copy bandwidth {copy_bw:.1f} GB/s", flush=True)

    rows = []
    for kernel in kernels:
        for dt in dts:
            for B in bs:
                p, upstream = make_inputs(kernel, B, dt, device)
                for provider in providers:
                    for mode in modes:
                        fn = mode_fn(provider, mode, p, upstream)
                        p50, p20, p80 = time_ms(fn, device, args.quick)
                        gb_s = bytes_min(p, mode) / (p50 * 1e-3) / 1e9
                        row = dict(kernel=kernel, provider=provider, mode=mode, dtype=str(dt).replace("torch.", ""),
                                   B=B, p50_ms=round(p50, 5), p20_ms=round(p20, 5), p80_ms=round(p80, 5),
                                   gb_s=round(gb_s, 3), pct_copy_bw=round(100 * gb_s / copy_bw, 2),
                                   launches=count_launches(fn) if device.type == "cuda" else "",
                                   peak_mem_mb=round(peak_mem_mb(fn, device), 2) if device.type == "cuda" else "",
                                   **common)
                        rows.append(row)
                        print(" ".join(f"{k}={row[k]}" for k in COLUMNS[:12]), flush=True)
                        del fn
                del p, upstream

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"loss_{common['device']}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    label = (f"CPU timings, {args.threads} thread(s) (not a GPU claim)" if device.type == "cpu"
             else common["device"])
    plot(rows, out_dir / f"loss_{common['device']}.png",
         f"residual ∇-DB loss, sample {'×'.join(map(str, SAMPLE_SHAPE))} — {label} — torch {common['torch']}, "
         f"{common['git_sha']}, copy bw {copy_bw:.0f} GB/s")
    print(f"wrote {csv_path} and its .png")


if __name__ == "__main__":
    main()
