"""The Adam step over many small tensors (issue 9's 10k x 1k case), in two regimes.

    python benchmarks/bench_many_tensors.py                  # 10,000 tensors of 1,000 elements
    python benchmarks/bench_many_tensors.py --tensors 2000 --size 4000 --steps 100

- back to back: FusedAdam.step again and again, as a training loop whose forward and
  backward leave the caches alone (they do not: an upper bound on speed);
- between torch's: each step right after a torch fused Adam step over as many tensors of
  their own, as `make bench`'s scaling part runs it (caches full of other dirty lines).

Prints medians and quartiles, and the floor: our bytes (24 per fp32 parameter for tensors
under 32768 elements) at the extension's roof probe for our stream mix (3 reads, 3 writes),
measured in the same process. Timings of one process vary (memory placement): compare
builds over several processes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_biggan import adam_mixes, ours_adam_bytes  # noqa: E402
from param_sets import make_params  # noqa: E402

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
    torch.set_num_threads(args.threads)
    hp = dict(lr=1e-4, betas=(0.0, 0.999), eps=1e-6)
    sizes = [args.size] * args.tensors
    ours = pygan_optim.FusedAdam(make_params(sizes), **hp)
    theirs = torch.optim.Adam(make_params(sizes, seed=1), fused=True, **hp)
    for _ in range(3):  # state, plans, first-touch
        ours.step()
        theirs.step()

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    alone = [timed(ours.step) for _ in range(args.steps)]
    between = []
    for _ in range(args.steps):
        theirs.step()
        between.append(timed(ours.step))

    moved = ours_adam_bytes(sizes, "cpu")
    mix = adam_mixes(sizes, "cpu")["pygan_optim FusedAdam"]
    roof = harness.stream_roofs(repeats=5)[mix]["bytes_per_s"]
    floor = moved / roof
    print(f"{args.tensors} tensors x {args.size} elements, {args.threads} threads, "
          f"{harness.machine('cpu')['cpu']}, torch {torch.__version__}")
    print(f"floor: {moved / sum(sizes):.0f} B/param at the {mix} probe's {roof / 1e9:.1f} GB/s"
          f" = {floor * 1e3:.2f} ms")
    for name, xs in (("back to back", alone), ("between torch's", between)):
        q1, med, q3 = quartiles(xs)
        print(f"{name:16s} median {med * 1e3:7.2f} ms (quartiles {q1 * 1e3:.2f}-{q3 * 1e3:.2f})"
              f" = {med / floor:.2f}x the floor")


if __name__ == "__main__":
    main()
