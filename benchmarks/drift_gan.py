"""How far each Adam implementation drifts from torch's for-loop Adam over a GAN run.

    python benchmarks/drift_gan.py              # tiny BigGAN, 8 iterations
    python benchmarks/drift_gan.py --iters 16

Every variant trains configs/biggan_32x32_tiny.py from the same seed and data in
MMEngine's Runner; only the optimizer (and wrapper) type changes. A GAN amplifies
last-bit differences: a conv bias that feeds a BatchNorm has a true gradient of
zero, so Adam turns its rounding noise into lr-sized steps. So the figure to
compare is each fused path's drift beside torch fused's, never an absolute one.
``tests/test_gan.py`` asserts that ours is no worse than torch fused's.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Dict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "biggan_32x32_tiny.py")
REFERENCE = "torch Adam for-loop"
RTOL = 1e-4  # "within rtol" below: |a - b| <= RTOL * |b| + 1e-6

# name -> (wrapper type, optimizer type, extra optimizer kwargs)
VARIANTS = {
    REFERENCE: ("OptimWrapper", "Adam", dict(foreach=False)),
    "torch Adam foreach": ("OptimWrapper", "Adam", dict(foreach=True)),
    "torch Adam fused": ("OptimWrapper", "Adam", dict(fused=True)),
    "FusedAdam in MMEngine's OptimWrapper": ("OptimWrapper", "FusedAdam", {}),
    "FusedAdam in FusedOptimWrapper": ("FusedOptimWrapper", "FusedAdam", {}),
}


def train(variant: str, iters: int, work_dir: str) -> Dict[str, torch.Tensor]:
    """The model's floating-point state after `iters` iterations of the tiny BigGAN."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from mmengine.config import Config
    from mmengine.runner import Runner

    import pygan_optim  # noqa: F401  (registers the fused types)

    wrapper, optimizer, extra = VARIANTS[variant]
    cfg = Config.fromfile(CONFIG)
    cfg.work_dir = work_dir
    cfg.merge_from_dict({"train_cfg.max_iters": iters, "default_hooks.checkpoint.interval": 10**6,
                         "default_hooks.logger.interval": 10**6, "log_level": "WARNING"})
    for key in ("generator", "discriminator"):
        cfg.optim_wrapper[key].type = wrapper
        cfg.optim_wrapper[key].optimizer.type = optimizer
        cfg.optim_wrapper[key].optimizer.update(extra)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()
            if v.is_floating_point()}


def drift(state: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> dict:
    """Elements outside rtol of the reference, elements not bit-equal, max abs diff."""
    far = unequal = total = 0
    max_abs = 0.0
    for k, ref in reference.items():
        a = state[k]
        far += (~torch.isclose(a, ref, rtol=RTOL, atol=1e-6)).sum().item()
        unequal += (a != ref).sum().item()
        total += ref.numel()
        max_abs = max(max_abs, (a - ref).abs().max().item())
    return dict(far=far, unequal=unequal, total=total, within=1 - far / total, max_abs=max_abs)


def measure(iters: int = 8, variants=tuple(VARIANTS)) -> Dict[str, dict]:
    """Drift of each variant from the for-loop; ``vs_torch_fused``: its elements
    not bit-equal to torch fused's."""
    with tempfile.TemporaryDirectory() as tmp:
        states = {name: train(name, iters, os.path.join(tmp, str(i)))
                  for i, name in enumerate((REFERENCE,) + tuple(v for v in variants
                                                                 if v != REFERENCE))}
    results = {name: drift(state, states[REFERENCE]) for name, state in states.items()
               if name != REFERENCE}
    if "torch Adam fused" in states:
        for name, r in results.items():
            r["vs_torch_fused"] = drift(states[name], states["torch Adam fused"])["unequal"]
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=8)
    args = parser.parse_args(argv)
    results = measure(args.iters)
    import pygan_optim
    print(f"tiny BigGAN, {args.iters} iterations, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU loops {pygan_optim.cpu_capability()}; "
          f"compared with {REFERENCE}")
    print(f"| path | within rtol {RTOL:g} | not bit-equal | max abs diff "
          f"| not bit-equal to torch fused |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {100 * r['within']:.2f}% | {r['unequal']} of {r['total']} "
              f"| {r['max_abs']:.1e} | {r.get('vs_torch_fused', '-')} |")


if __name__ == "__main__":
    main()
