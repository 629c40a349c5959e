"""Peak memory of a generator iteration: ours against torch's path (issue 9).

    python benchmarks/bench_memory.py [--quick] [--iters 12]
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_memory.py   # torch's allocator on huge pages

Each variant runs in a process of its own (so each peak is its own): the
BigGAN-128 generator (70.4M fp32 parameters) with the seed config's Adam and
an EMA copy, for a few iterations of forward + backward at batch 1, step,
EMA, zero_grad(set_to_none=True). Reported, each minus its value before the
optimizer's first step (model, EMA copy, first grads):
- the allocator's bytes in use (glibc mallinfo2: heap in use + mmapped), the
  largest of its values after each backward, step and zero_grad: live memory;
- the process's peak resident set (ru_maxrss), which also counts transients
  inside a step and memory freed but kept by malloc, and its resident set after
  the last zero_grad. malloc's heaps can fragment over iterations (the RSS of a
  variant that frees older blocks grew for about 10), hence a dozen.

Variants:
- native: torch.optim.Adam(fused=True), then MMagic's per-parameter EMA loop;
- ours: FusedAdam with the EMA blended in the step (grads of 32 MiB or more kept
  as exp_avg, FusedAdam.keep_grad_min_bytes_cpu).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_biggan import SEED_HP, model_cfgs  # noqa: E402

VARIANTS = ("native", "ours")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def live_bytes() -> int:
    """Bytes malloc has handed out and not got back (heap in use + mmapped blocks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def run_variant(name: str, quick: bool, iters: int) -> dict:
    import pygan_optim
    from pygan_optim.models import BigGANGenerator

    torch.manual_seed(0)
    model = BigGANGenerator(**model_cfgs(quick)["generator"])
    ema = copy.deepcopy(model).requires_grad_(False)
    params, averages = list(model.parameters()), list(ema.parameters())
    hp = SEED_HP["generator"]
    opt = (pygan_optim.FusedAdam(params, **hp) if name == "ours"
           else torch.optim.Adam(params, fused=True, **hp))
    momentum = 1e-4  # MMagic's convention: the new parameters' weight

    def backward():
        noise = torch.randn(1, model.noise_size)
        label = torch.randint(0, model.num_classes, (1,))
        model(noise, label=label).mean().backward()

    backward()
    before, live_before = rss_bytes(), live_bytes()
    live = []
    for i in range(iters):
        if i:
            backward()
            live.append(live_bytes())
        if name == "ours":  # update_params's call: grads released (those of 32 MiB or
            # more kept as exp_avg)
            blend = pygan_optim.EmaBlend(zip(params, averages), 1 - momentum, momentum)
            opt.step_and_zero_grad(ema=blend)
        else:
            opt.step()
            with torch.no_grad():
                for a, p in zip(averages, params):
                    a.mul_(1 - momentum).add_(p, alpha=momentum)
        live.append(live_bytes())
        opt.zero_grad(set_to_none=True)
        live.append(live_bytes())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    numel = sum(p.numel() for p in params)
    return dict(variant=name, params=numel, live_peak_over_start=max(live) - live_before,
                live_end_over_start=live[-1] - live_before, rss_peak_over_start=peak - before,
                rss_end_over_start=rss_bytes() - before, rss_start=before, rss_peak=peak)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="BigGAN-32 sizes (a smoke run)")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--json", default="bench_out/memory.json")
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.quick, args.iters)))
        return {}
    results = []
    for name in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", name,
               "--iters", str(args.iters)] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    mb = 2 ** 20
    print(f"generator: {results[0]['params'] / 1e6:.1f}M fp32 parameters "
          f"({results[0]['params'] * 4 / mb:.0f} MB per copy); {args.iters} iterations")
    print(f"{'variant':8s} {'live, peak':>11s} {'live, end':>10s} {'RSS, peak':>10s} "
          f"{'RSS, end':>9s}   (minus start; THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')})")
    for r in results:
        print(f"{r['variant']:8s} {r['live_peak_over_start'] / mb:8.0f} MB "
              f"{r['live_end_over_start'] / mb:7.0f} MB {r['rss_peak_over_start'] / mb:7.0f} MB "
              f"{r['rss_end_over_start'] / mb:6.0f} MB")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return {r["variant"]: r for r in results}


if __name__ == "__main__":
    main()
