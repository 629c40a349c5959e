"""Whole wrapper step on ~70M synthetic fp32 parameters: pygan_optim's
FusedAmpOptimWrapper with FusedAdam vs the native path (see wrapper_step.py).

    python benchmarks/bench_wrapper.py [--quick] [--threads N] [--repeats R] [--json PATH]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import wrapper_step  # noqa: E402
from param_sets import synthetic_sizes  # noqa: E402

HP = dict(lr=1e-4, betas=(0.0, 0.999), eps=1e-6)


def main(argv=None) -> dict:
    args = harness.synthetic_set_args(__doc__, "bench_out/wrapper.json", 11, argv=argv)
    sizes = synthetic_sizes(args.params)
    numel = sum(sizes)
    print(f"Wrapper step (AMP dynamic scale + clip_grad max_norm={wrapper_step.MAX_NORM} + Adam + "
          f"zero_grad), {numel / 1e6:.1f}M fp32 params in {len(sizes)} tensors, "
          f"{torch.get_num_threads()} threads")
    roof = harness.memory_roof("cpu", repeats=5, megabytes=32 if args.quick else 512)
    steps, refills = wrapper_step.variants(sizes, HP)
    samples = harness.interleaved(steps, args.repeats, warmup=2, timer=harness.Timer("cpu"),
                                  progress=harness.progress_printer("wrapper step"), setups=refills)
    harness.end_progress()
    moved = wrapper_step.bytes_per_param(beta1_zero=HP["betas"][0] == 0.0)
    ours = harness.median(samples[wrapper_step.OURS])
    rows, results = [], {}
    for name, xs in samples.items():
        t = harness.median(xs)
        rate = moved[name] * numel / t
        results[name] = dict(median_s=t, spread=harness.spread(xs), bytes_per_param=moved[name],
                             bytes_per_s=rate, roof_fraction=rate / roof["bytes_per_s"],
                             time_vs_ours=t / ours)
        rows.append([name, f"{t * 1e3:.1f} ±{harness.spread(xs) * 100:.0f}%", str(moved[name]),
                     f"{rate / 1e9:.1f}", f"{100 * rate / roof['bytes_per_s']:.0f}%", f"{t / ours:.2f}x"])
    print(harness.table(rows, ["variant", "ms/step", "B/param", "GB/s", "of roof", "time / ours"]))
    print(f"memory roof: {roof['bytes_per_s'] / 1e9:.1f} GB/s")
    payload = dict(benchmark="wrapper_step", machine=harness.machine("cpu"), numel=numel,
                   tensors=len(sizes), hyper_parameters=HP, max_norm=wrapper_step.MAX_NORM,
                   scale=wrapper_step.SCALE, roof=roof, results=results, samples=samples,
                   argv=sys.argv[1:])
    harness.write_json(args.json, payload)
    print(f"raw samples: {args.json}")
    return payload


if __name__ == "__main__":
    main()
