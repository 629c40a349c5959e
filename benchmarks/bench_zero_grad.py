"""Which zeroing makes a BigGAN-128 training iteration faster here: grads released
(zero_grad(set_to_none=True), torch's default: the next backward allocates them
anew) or zeros written in the fused update pass (set_to_none=False)?

    python benchmarks/bench_zero_grad.py [--batch 1] [--repeats 7]

Times, per model (G and D), one optimizer update followed by the next forward +
backward, the part of an iteration where the two differ; everything else in
the iteration is the same work either way.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_biggan import SEED_HP, model_cfgs  # noqa: E402

import pygan_optim  # noqa: E402
from pygan_optim.models import BigGANDiscriminator, BigGANGenerator  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default="bench_out/zero_grad.json")
    args = ap.parse_args(argv)
    cfgs = model_cfgs(args.quick)
    results = {}
    for key, cls in (("generator", BigGANGenerator), ("discriminator", BigGANDiscriminator)):
        torch.manual_seed(0)
        model = cls(**cfgs[key])
        wrapper = pygan_optim.OptimWrapper(pygan_optim.FusedAdam(model.parameters(), **SEED_HP[key]))
        size = cfgs["generator"]["output_scale"]
        if key == "generator":
            inputs = (torch.randn(args.batch, 120), torch.zeros(args.batch, dtype=torch.long))
        else:
            inputs = (torch.randn(args.batch, 3, size, size), torch.zeros(args.batch, dtype=torch.long))

        def loss():
            return model(*inputs).float().mean()

        def released():  # MMEngine's default
            wrapper.update_params(loss())

        def zeros_in_step():
            wrapper.update_params(loss(), zero_kwargs=dict(set_to_none=False))

        samples = harness.interleaved({"set_to_none (default)": released, "zeros in the step": zeros_in_step},
                                      args.repeats, 2, harness.Timer("cpu"),
                                      harness.progress_printer(key))
        harness.end_progress()
        results[key] = {k: dict(median_s=harness.median(v), spread=harness.spread(v), samples=v)
                        for k, v in samples.items()}
        for k, e in results[key].items():
            print(f"{key:13s} {k:22s} {e['median_s'] * 1e3:9.1f} ms ±{e['spread'] * 100:.0f}%  "
                  f"(update + next forward/backward, batch {args.batch})")
    harness.write_json(args.json, dict(benchmark="zero_grad", machine=harness.machine("cpu"),
                                       results=results, argv=sys.argv[1:]))
    print(f"raw samples: {args.json}")
    return results


if __name__ == "__main__":
    main()
