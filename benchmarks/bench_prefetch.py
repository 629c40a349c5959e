"""The CPU loops' software prefetch on this machine: PYGAN_OPTIM_STREAM_PREFETCH
distances side by side (it defaults to 2048 bytes on Intel CPUs and 0 elsewhere).

    python benchmarks/bench_prefetch.py                        # 0 against 2048 bytes
    python benchmarks/bench_prefetch.py --aheads 0 1024 2048 --processes 4

The distance is read once per process, so each runs in processes of its own,
alternating (ABBA...), each timing BigGAN-128 G's update (step_and_zero_grad,
grads kept), G's plain step, G's update with the EMA blended and a plain step over
10k tensors of 1k elements, interleaved over its rounds. Prints the median of
the process medians per distance, with their range: decide a CPU's default from
it (kernel_select.cpp) and write the figures in NOTES.md with the CPU's name.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROWS = ("G update", "G plain step", "G update + EMA", "10k x 1k plain step")


def child(rounds: int, threads: int, quick: bool) -> None:
    import torch

    sys.path.insert(0, BENCH)
    import harness
    from bench_biggan import SEED_HP, real_shapes
    from param_sets import at_step, grad_refill, make_params

    import pygan_optim

    torch.set_num_threads(threads)
    hp = SEED_HP["generator"]
    params = make_params(real_shapes(quick)["generator"])
    opt = at_step(pygan_optim.FusedAdam(params, **hp))
    refill = grad_refill(params)
    averages = [p.detach().clone() for p in params]
    small = make_params([1000] * (500 if quick else 10000), seed=1)
    small_opt = at_step(pygan_optim.FusedAdam(small, **hp))
    timed = harness.Timer("cpu")

    def update(ema: bool):
        blend = pygan_optim.EmaBlend(zip(params, averages), 0.999, 0.001) if ema else None
        refill()
        return timed(lambda: opt.step_and_zero_grad(ema=blend))

    def plain():
        refill()
        return timed(opt.step)

    calls = {"G update": lambda: update(False), "G plain step": plain,
             "G update + EMA": lambda: update(True),
             "10k x 1k plain step": lambda: timed(small_opt.step)}
    times = {row: [] for row in ROWS}
    for r in range(rounds + 1):  # round 0 warms up
        for row in (ROWS if r % 2 else ROWS[::-1]):
            t = calls[row]()
            if r:
                times[row].append(t)
    print(json.dumps({"ahead": pygan_optim._ext.stream_prefetch_bytes(),
                      **{row: statistics.median(ts) for row, ts in times.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aheads", type=int, nargs="+", default=[0, 2048],
                    help="prefetch distances in bytes (0: none)")
    ap.add_argument("--processes", type=int, default=3, help="processes per distance")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="BigGAN-32's G and 500 small tensors: a smoke test")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.rounds, args.threads, args.quick)

    sys.path.insert(0, BENCH)
    import harness

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as make bench runs
    results = harness.settings_in_processes(
        harness.child_argv(__file__, args.rounds, args.threads, args.quick),
        {f"{a} B ahead": {"PYGAN_OPTIM_STREAM_PREFETCH": str(a)} for a in args.aheads},
        args.processes)
    for a in args.aheads:  # each child ran at the distance it was given
        assert all(run["ahead"] == a for run in results[f"{a} B ahead"])
    facts = harness.machine("cpu")
    print(f"{facts['cpu']}, {args.threads} threads, CPU loops {facts['cpu_kernels']}, torch "
          f"{facts['torch']}; {facts['huge_pages']}; {args.processes} processes x "
          f"{args.rounds} rounds per distance")
    print(harness.process_table(results, ROWS, 38))


if __name__ == "__main__":
    main()
