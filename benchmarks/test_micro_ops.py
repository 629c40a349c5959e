"""pytest-benchmark micro benchmarks of each fused op and its torch counterpart.

    pytest benchmarks/test_micro_ops.py --benchmark-only [--benchmark-columns=median,iqr]

64 fp32 tensors of 256k elements (16.8M elements) unless said otherwise.
"""
import pytest
import torch

import pygan_optim
from pygan_optim import ops

SIZES = [256 * 1024] * 64


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    return {k: [torch.randn(n, generator=g) for n in SIZES] for k in ("a", "b", "c", "d")}


@pytest.mark.parametrize("impl", ["pygan_optim", "torch_fused"])
def test_adam_step(benchmark, impl):
    params = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    for p in params:
        p.grad = torch.randn_like(p)
    hp = dict(lr=1e-4, betas=(0.0, 0.999), eps=1e-6)
    opt = pygan_optim.FusedAdam(params, **hp) if impl == "pygan_optim" else torch.optim.Adam(
        params, fused=True, **hp)
    benchmark(opt.step)


@pytest.mark.parametrize("impl", ["pygan_optim", "torch_foreach"])
def test_unscale_with_inf_check(benchmark, impl, tensors):
    found = torch.zeros(1)
    inv = torch.tensor(1.0)
    if impl == "pygan_optim":
        benchmark(ops.scale_, tensors["a"], inv, found)
    else:
        benchmark(torch._amp_foreach_non_finite_check_and_unscale_, tensors["a"], found, inv)


@pytest.mark.parametrize("impl", ["pygan_optim", "torch_foreach"])
def test_global_norm(benchmark, impl, tensors):
    if impl == "pygan_optim":
        benchmark(ops.l2_norm, tensors["b"])
    else:
        benchmark(lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors["b"]))))


@pytest.mark.parametrize("impl", ["pygan_optim", "torch_foreach_lerp"])
def test_ema(benchmark, impl, tensors):
    if impl == "pygan_optim":
        benchmark(ops.ema_, tensors["c"], tensors["d"], 0.999)
    else:
        benchmark(torch._foreach_lerp_, tensors["c"], tensors["d"], 0.001)
