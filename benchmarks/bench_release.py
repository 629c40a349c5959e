"""What page size does to an update: torch's CPU allocator on 4 KB pages against
transparent huge pages (its THP_MEM_ALLOC_ENABLE setting), on BigGAN-128 G's parameters.

    python benchmarks/bench_release.py                 # 3 processes per setting, alternating
    python benchmarks/bench_release.py --processes 1 --rounds 8

An update releases one tensor per parameter (torch's zero_grad the grads, our
step_and_zero_grad the old exp_avgs) and the next backward allocates new grads. Each
setting runs in processes of its own (the allocator reads the setting once), alternating,
and times per round: giving every parameter a new grad (as backward does), releasing the
grads, our update, torch fused Adam's update (step + zero_grad). Prints medians of the
process medians, with the range of those medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROWS = ("new grads", "release grads", "pygan_optim update", "torch fused update")


def child(rounds: int, threads: int, quick: bool) -> None:
    import torch

    sys.path.insert(0, BENCH)
    import harness
    from bench_biggan import SEED_HP, real_shapes
    from param_sets import at_step, grad_refill, make_params, update_call

    import pygan_optim

    torch.set_num_threads(threads)
    shapes = real_shapes(quick)["generator"]
    hp = SEED_HP["generator"]
    ours_params, torch_params = make_params(shapes), make_params(shapes, seed=1)
    ours = update_call(at_step(pygan_optim.FusedAdam(ours_params, **hp)))
    theirs = update_call(at_step(torch.optim.Adam(torch_params, fused=True, **hp)))
    refill_ours, refill_torch = grad_refill(ours_params), grad_refill(torch_params)

    timed = harness.Timer("cpu")

    def release() -> None:
        for p in torch_params:
            p.grad = None

    times = {row: [] for row in ROWS}
    for r in range(rounds + 1):  # round 0 warms up
        sample = {"new grads": timed(refill_torch), "release grads": timed(release)}
        refill_torch()
        refill_ours()
        sample["pygan_optim update"] = timed(ours)
        sample["torch fused update"] = timed(theirs)
        if r:
            for row, t in sample.items():
                times[row].append(t)
    print(json.dumps({row: statistics.median(ts) for row, ts in times.items()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=3, help="processes per setting")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="BigGAN-32's G: a smoke test")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.rounds, args.threads, args.quick)

    sys.path.insert(0, BENCH)
    import harness

    settings = {"4 KB pages": "0", "huge pages": "1"}
    results = harness.settings_in_processes(
        harness.child_argv(__file__, args.rounds, args.threads, args.quick),
        {name: {"THP_MEM_ALLOC_ENABLE": value} for name, value in settings.items()},
        args.processes)
    facts = harness.machine("cpu")
    print(f"{'BigGAN-32 G (--quick)' if args.quick else 'BigGAN-128 G (70.4M params)'}, {args.threads} threads, {facts['cpu']}, torch "
          f"{facts['torch']}; {facts['huge_pages'].split(', ')[-1]}; {args.processes} processes "
          f"x {args.rounds} rounds per setting")
    print(harness.process_table(results, ROWS, 40))


if __name__ == "__main__":
    main()
