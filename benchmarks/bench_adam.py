"""Adam step over ~70M fp32 parameters in a few hundred tensors:
pygan_optim.FusedAdam vs torch.optim.Adam (for-loop, foreach, fused), with the
machine's memory roof measured in the same run.

    python benchmarks/bench_adam.py [--quick] [--threads N] [--repeats R] [--json PATH]

An Adam step must read param, grad, exp_avg, exp_avg_sq and write param,
exp_avg, exp_avg_sq: 28 bytes per fp32 parameter is the floor every variant is
charged with, so GB/s and % of roof compare like with like. With beta1 = 0
(`--betas 0 0.999`) ours reads no exp_avg and is charged 24 (torch's kernels
read it all the same).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from param_sets import at_step, make_params, synthetic_sizes  # noqa: E402

import pygan_optim  # noqa: E402

BYTES_PER_PARAM = 28


def main(argv=None) -> dict:
    def extra(ap):
        ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        ap.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))

    args = harness.synthetic_set_args(__doc__, "bench_out/adam.json", 15, extra, argv)
    sizes = synthetic_sizes(args.params)
    numel = sum(sizes)
    hp = dict(lr=1e-4, betas=tuple(args.betas), eps=1e-8)
    print(f"Adam step, {numel / 1e6:.1f}M fp32 params in {len(sizes)} tensors, "
          f"betas={hp['betas']}, {torch.get_num_threads()} threads, device {args.device}")

    show = harness.progress_printer("roof")
    roof = harness.memory_roof(args.device, repeats=max(3, args.repeats // 2),
                               megabytes=32 if args.quick else 512)
    harness.end_progress()
    optimizers = {  # from param_sets.STEADY_STEP on, as in almost all of a GAN run
        "pygan_optim FusedAdam": at_step(pygan_optim.FusedAdam(make_params(sizes, args.device), **hp)),
        "torch Adam for-loop": at_step(torch.optim.Adam(make_params(sizes, args.device), foreach=False, **hp)),
        "torch Adam foreach": at_step(torch.optim.Adam(make_params(sizes, args.device), foreach=True, **hp)),
        "torch Adam fused": at_step(torch.optim.Adam(make_params(sizes, args.device), fused=True, **hp)),
    }
    show = harness.progress_printer("adam")
    samples = harness.interleaved({k: o.step for k, o in optimizers.items()}, args.repeats,
                                  warmup=2, timer=harness.Timer(args.device), progress=show)
    harness.end_progress()

    ours = harness.median(samples["pygan_optim FusedAdam"])
    charged = {name: BYTES_PER_PARAM for name in samples}
    if hp["betas"][0] == 0.0:
        charged["pygan_optim FusedAdam"] = BYTES_PER_PARAM - 4
    rows, results = [], {}
    for name, xs in samples.items():
        t = harness.median(xs)
        rate = charged[name] * numel / t
        results[name] = dict(median_s=t, spread=harness.spread(xs), bytes_per_s=rate,
                             bytes_per_param=charged[name],
                             roof_fraction=rate / roof["bytes_per_s"], ours_speedup=t / ours)
        rows.append([name, f"{t * 1e3:.1f} ±{harness.spread(xs) * 100:.0f}%", f"{rate / 1e9:.1f}",
                     f"{100 * rate / roof['bytes_per_s']:.0f}%", f"{t / ours:.2f}x"])
    print(harness.table(rows, ["variant", "ms/step", "GB/s", "of roof", "ours faster by"]))
    print(f"memory roof (read-modify-write stream): {roof['bytes_per_s'] / 1e9:.1f} GB/s "
          f"({', '.join(f'{k} {v / 1e9:.1f}' for k, v in roof['per_probe'].items())}); "
          f"floor at {BYTES_PER_PARAM} B/param: {BYTES_PER_PARAM * numel / roof['bytes_per_s'] * 1e3:.1f} ms")
    payload = dict(benchmark="adam_step", machine=harness.machine(args.device), numel=numel,
                   tensors=len(sizes), hyper_parameters=hp, bytes_per_param=BYTES_PER_PARAM,
                   roof=roof, results=results, samples=samples, argv=sys.argv[1:])
    harness.write_json(args.json, payload)
    print(f"raw samples: {args.json}")
    return payload


if __name__ == "__main__":
    main()
