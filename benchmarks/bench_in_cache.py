"""The Adam step on parameters that stay in the caches: the element math's own
speed limit, without the memory's (issue 9's "% of roof" in a fast-memory phase).

    python benchmarks/bench_in_cache.py                     # 16 x 65536 fp32, 2 threads
    python benchmarks/bench_in_cache.py --size 65536 --tensors 16 --threads 1

Prints the median step and G elements/s, with the grad kept as exp_avg (20 B/param from
memory) and copied (24 B/param), at early steps and from param_sets.STEADY_STEP on, where
sqrt(1 - 0.999^step) rounds to 1 in fp32 and the loop leaves its divide out. Times vary
between processes: run it a few times.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from param_sets import STEADY_STEP, at_step, grad_refill, make_params  # noqa: E402

import pygan_optim  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=65536, help="elements per tensor")
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    numel = args.size * args.tensors
    timed = harness.Timer("cpu")
    print(f"{args.tensors} x {args.size} fp32 ({numel * 16 / 2**20:.0f} MB of params, grads "
          f"and state), {args.threads} threads, {harness.machine('cpu')['cpu']}")
    for late in (False, True):
        for keep in (True, False):
            params = make_params([args.size] * args.tensors)
            opt = at_step(pygan_optim.FusedAdam(params, lr=1e-4, betas=(0.0, 0.999), eps=1e-6),
                          STEADY_STEP if late else 1)
            # Kept: updates that release the grads, new ones filled in untimed (in
            # cache again); copied: plain steps on the same grads. These tensors are
            # under the CPU's 32 MiB keep threshold, lowered here to time the kept path.
            opt.keep_grad_min_bytes_cpu = 0
            refill = grad_refill(params) if keep else (lambda: None)
            call = opt.step_and_zero_grad if keep else opt.step

            def one():
                refill()
                return timed(call)
            for _ in range(4):  # plans, caches
                one()
            med = statistics.median(one() for _ in range(args.steps))
            print(f"{'late' if late else 'early'} steps, grad kept as exp_avg: {str(keep):5s}  "
                  f"median {med * 1e3:.3f} ms = {numel / med / 1e9:.2f} G elements/s")


if __name__ == "__main__":
    main()
