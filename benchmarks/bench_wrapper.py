"""Whole wrapper step: AMP dynamic loss scale + clip_grad max_norm + Adam + zero_grad,
pygan_optim.AmpOptimWrapper (FusedAmpOptimWrapper) with FusedAdam vs the native path.

    python benchmarks/bench_wrapper.py [--quick] [--threads N] [--repeats R] [--json PATH]

The native path is MMEngine's AmpOptimWrapper step sequence (MMEngine refuses to
build that class on the CPU, so the sequence is spelled out): GradScaler.unscale_,
clip_grad_norm_, GradScaler.step, GradScaler.update, zero_grad, on torch's CPU
GradScaler with torch.optim.Adam(fused=True) and with the default torch Adam.
Grads are refilled (untimed) before each step with the same scaled values, as a
backward pass would leave them; with set_to_none the refill allocates them anew.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from param_sets import make_params, synthetic_sizes  # noqa: E402

import pygan_optim  # noqa: E402

SCALE = 2.0 ** 16
MAX_NORM = 1.0
HP = dict(lr=1e-4, betas=(0.0, 0.999), eps=1e-6)
# Bytes per fp32 parameter each variant moves by design (see NOTES.md): ours reads
# the grads once for norm + inf check (4), then Adam (24 with beta1 = 0, 28
# otherwise; + 4 when it also writes zeros into the grads). Native: unscale_ (8),
# norm (4), clip multiply (8), then the optimizer.
def bytes_per_param(beta1_zero: bool) -> dict:
    adam = 24 if beta1_zero else 28
    return {
        "pygan_optim, zero in the step": 4 + adam + 4,
        "pygan_optim, set_to_none": 4 + adam,
        "native, torch fused Adam": 20 + 28,
        "native, torch Adam (default)": 20 + 72,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--params", type=float, default=70.0, help="millions of parameters")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default="bench_out/wrapper.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.params, args.repeats = min(args.params, 4.0), 3
    sizes = synthetic_sizes(args.params)
    numel = sum(sizes)
    print(f"Wrapper step (AMP dynamic scale + clip_grad max_norm={MAX_NORM} + Adam + zero_grad), "
          f"{numel / 1e6:.1f}M fp32 params in {len(sizes)} tensors, {torch.get_num_threads()} threads")
    roof = harness.memory_roof("cpu", repeats=5, megabytes=32 if args.quick else 512)
    scaled_grads = [p.grad * SCALE for p in make_params(sizes, seed=1)]

    def refill(params, in_place):
        def run():
            for p, g in zip(params, scaled_grads):
                if in_place and p.grad is not None:
                    p.grad.copy_(g)
                else:
                    p.grad = g.clone()
        return run

    variants, setups = {}, {}
    for name, in_place in (("pygan_optim, zero in the step", True),
                           ("pygan_optim, set_to_none", False)):
        params = make_params(sizes)
        wrapper = pygan_optim.AmpOptimWrapper(
            optimizer=pygan_optim.FusedAdam(params, **HP), loss_scale=dict(init_scale=SCALE),
            clip_grad=dict(max_norm=MAX_NORM))
        wrapper.loss_scaler.scale(torch.ones(()))  # creates the scale tensor, as a backward would
        variants[name] = wrapper.step_and_zero_grad if in_place else (
            lambda w=wrapper: (w.step(), w.zero_grad()))
        setups[name] = refill(params, in_place)
    for name, opt_kwargs in (("native, torch fused Adam", dict(fused=True)),
                             ("native, torch Adam (default)", {})):
        params = make_params(sizes)
        optimizer = torch.optim.Adam(params, **HP, **opt_kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        scaler.scale(torch.ones(()))

        def native(optimizer=optimizer, scaler=scaler, params=params):
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        variants[name] = native
        setups[name] = refill(params, False)

    show = harness.progress_printer("wrapper step")
    samples = harness.interleaved(variants, args.repeats, warmup=2, timer=harness.Timer("cpu"),
                                  progress=show, setups=setups)
    harness.end_progress()
    moved = bytes_per_param(beta1_zero=HP["betas"][0] == 0.0)
    ours = harness.median(samples["pygan_optim, zero in the step"])
    rows, results = [], {}
    for name, xs in samples.items():
        t = harness.median(xs)
        rate = moved[name] * numel / t
        results[name] = dict(median_s=t, spread=harness.spread(xs), bytes_per_param=moved[name],
                             bytes_per_s=rate, roof_fraction=rate / roof["bytes_per_s"],
                             time_vs_ours=t / ours)
        rows.append([name, f"{t * 1e3:.1f} ±{harness.spread(xs) * 100:.0f}%", str(moved[name]),
                     f"{rate / 1e9:.1f}", f"{100 * rate / roof['bytes_per_s']:.0f}%", f"{t / ours:.2f}x"])
    print(harness.table(rows, ["variant", "ms/step", "B/param", "GB/s", "of roof",
                               "time / ours (zero in step)"]))
    print(f"memory roof: {roof['bytes_per_s'] / 1e9:.1f} GB/s")
    payload = dict(benchmark="wrapper_step", machine=harness.machine("cpu"), numel=numel,
                   tensors=len(sizes), hyper_parameters=HP, max_norm=MAX_NORM, scale=SCALE,
                   roof=roof, results=results, samples=samples, argv=sys.argv[1:])
    harness.write_json(args.json, payload)
    print(f"raw samples: {args.json}")
    return payload


if __name__ == "__main__":
    main()
