"""Seconds per step of the value fit (``fastnabla.value.fit_value``'s work: a BCE step of AdamW) for each
``gfn.value_net``, side by side in one process, at one and at two threads.

    python benchmarks/bench_value_fit.py --channels 32,64 --batch 256 --image-size 8

Random states and timesteps: the cost of a step does not depend on the data. Writes
``benchmarks/results/bench_value_fit<tag>.json`` with the machine, versions, git commit and date.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    import torch

    from fastnabla.backbones.pixel import VALUE_NETS, build_pixel_value_net
    from fastnabla.digits import environment
    from fastnabla.value import value_logit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", default="32,64")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per net, after 5 warm-up steps")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    channels = [int(c) for c in a.channels.split(",")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 1, a.image_size, a.image_size, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g)
    y = torch.rand(a.batch, generator=g)
    out = dict(channels=channels, batch=a.batch, image_size=a.image_size, steps=a.steps, results=[])
    for threads in (int(n) for n in a.threads.split(",")):
        torch.set_num_threads(threads)
        for kind in VALUE_NETS:
            torch.manual_seed(0)
            net = build_pixel_value_net(a.image_size, channels, 1, kind)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            for i in range(a.steps + 5):
                if i == 5:
                    t0 = time.perf_counter()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(value_logit(net, x, t), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sec = (time.perf_counter() - t0) / a.steps
            out["results"].append(dict(threads=threads, value_net=kind, seconds_per_step=round(sec, 4),
                                       parameters=sum(p.numel() for p in net.parameters())))
            print(f"{threads} thread(s), {kind}: {sec:.3f} s per step", flush=True)
    # where it ran (``digits.environment``), less its torch_threads: each result above carries its own
    out.update({k: v for k, v in environment().items() if k != "torch_threads"})
    path = os.path.join(ROOT, "benchmarks", "results", f"bench_value_fit{a.tag}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
