"""The Adam step over many small tensors (issue 9's 10k x 1k case), in two regimes.

    python benchmarks/bench_many_tensors.py                  # 10,000 tensors of 1,000 elements
    python benchmarks/bench_many_tensors.py --tensors 2000 --size 4000 --steps 100

- back to back: FusedAdam.step again and again, as a training loop whose forward and
  backward leave the caches alone (they do not: an upper bound on speed);
- between torch's: each step right after a torch fused Adam step over as many tensors of
  their own, as `make bench`'s scaling part runs it (caches full of other dirty lines).

Both optimizers start at param_sets.STEADY_STEP. Prints medians and quartiles, and each
step against the floor of its round: our bytes (24 per fp32 parameter for tensors under
32768 elements) at the bandwidth of the extension's roof probe for our stream mix (3 reads,
3 writes), one pass per round of steps. Timings of one
process vary (memory placement): compare builds over several processes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_biggan import ours_adam_split  # noqa: E402
from param_sets import at_step, make_params  # noqa: E402

import pygan_optim  # noqa: E402


def quartiles(xs):
    xs = sorted(xs)
    return xs[len(xs) // 4], statistics.median(xs), xs[3 * len(xs) // 4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=10000)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per regime")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for flag in ("tensors", "size", "steps", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    torch.set_num_threads(args.threads)
    hp = dict(lr=1e-4, betas=(0.0, 0.999), eps=1e-6)
    sizes = [args.size] * args.tensors
    # From param_sets.STEADY_STEP on, as in almost all of a GAN run and in make bench's
    # scaling part.
    ours = at_step(pygan_optim.FusedAdam(make_params(sizes), **hp))
    theirs = at_step(torch.optim.Adam(make_params(sizes, seed=1), fused=True, **hp))
    for _ in range(2):  # plans, first-touch
        ours.step()
        theirs.step()

    timed = harness.Timer("cpu")

    # Rounds of: a pass of the roof probe, a block of steps back to back, a
    # block between torch's. The VM's memory speed can change from one second
    # to the next, so each step is set against the floor of its own round.
    split = ours_adam_split(sizes, "cpu", releases=False)  # bytes per stream mix
    probe = harness.RoofProbe(list(split))
    rounds = 10
    floors = []
    times = {"back to back": [], "between torch's": []}  # (step seconds, its round's floor)
    for r in range(rounds):
        roofs = probe.roofs(probe.sample(1))
        floors.append(sum(b / roofs[m]["bytes_per_s"] for m, b in split.items()))
        block = args.steps // rounds + (r < args.steps % rounds)
        times["back to back"] += [(timed(ours.step), floors[-1]) for _ in range(block)]
        for _ in range(block):
            theirs.step()
            times["between torch's"].append((timed(ours.step), floors[-1]))

    print(f"{args.tensors} tensors x {args.size} elements, {args.threads} threads, "
          f"{harness.machine('cpu')['cpu']}, torch {torch.__version__}")
    q1, med, q3 = quartiles(floors)
    moved = sum(split.values())
    print(f"floor: {moved / sum(sizes):.0f} B/param at the {'/'.join(split)} probe's bandwidth, "
          "per round: "
          f"median {med * 1e3:.2f} ms (quartiles {q1 * 1e3:.2f}-{q3 * 1e3:.2f}, "
          f"{moved / med / 1e9:.1f} GB/s)")
    for name, pairs in times.items():
        q1, med, q3 = quartiles([t for t, _ in pairs])
        print(f"FusedAdam.step, {name:16s} median {med * 1e3:7.2f} ms "
              f"(quartiles {q1 * 1e3:.2f}-{q3 * 1e3:.2f})"
              f" = {statistics.median(t / f for t, f in pairs):.2f}x its round's floor")


if __name__ == "__main__":
    main()
