"""Loss scales from 2^126 up: GradScaler grows its scale by 2x every growth_interval
steps without an overflow, and a long run (bfloat16 autocast, say) can get there.

MMEngine's AmpOptimWrapper unscales (times 2^-126 or 2^-127: exact, a power of two)
and then clips (times the clip coefficient c). The fused update multiplies by one
factor, 1/scale x c, which float32 then holds only as a subnormal: it lost c's low
bits and exp_avg came out 1-2 ulp off. The update now reads the grads times 2^-32
against a factor 2^32 times larger (exact), so it equals unscale-then-clip bit for
bit, as the same update at scale 1 does."""
import contextlib

import pytest
import torch
from torch import nn

import pygan_optim
from pygan_optim import FusedAdam, cuda_interpret, ops

HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def _lists(params, grads):
    return (params, grads, [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [torch.zeros(()) for _ in params])


@pytest.mark.parametrize("mode", ["cpu", "cuda_interpret"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale_exp", [126, 127])
def test_a_clipped_update_at_a_huge_scale_equals_unscale_then_clip(scale_exp, dtype, mode):
    gen = torch.Generator().manual_seed(0)
    # An eighth of unit size: times 2^127 they stay below float32's 2^128.
    unscaled = [(torch.randn(n, generator=gen) / 8).to(dtype) for n in (64, 4099)]
    starts = [torch.randn(g.numel(), generator=gen).to(dtype) for g in unscaled]
    scale, clip = torch.tensor(2.0 ** scale_exp), torch.tensor(0.3)
    context = cuda_interpret.enabled() if mode == "cuda_interpret" else contextlib.nullcontext()
    with context:
        fused = _lists([s.clone() for s in starts], [g * scale for g in unscaled])
        ops.adam_step_(*fused, grad_scale=scale, grad_mult=clip, **HP)
        # The unscaled grads are what unscale_ leaves (exact); then the clip factor.
        reference = _lists([s.clone() for s in starts], [g.clone() for g in unscaled])
        ops.adam_step_(*reference, grad_mult=clip, **HP)
    for got, want in zip(fused[0] + fused[2] + fused[3], reference[0] + reference[2] + reference[3]):
        assert torch.equal(got, want), int((got != want).sum())
    # The caller's grads are read, not rescaled in place.
    assert all(torch.equal(g, u * scale) for g, u in zip(fused[1], unscaled))


def test_a_power_of_two_factor_needs_no_shift_and_stays_exact():
    # Unscale alone at 2^127: the factor 2^-127 is a float32 subnormal, but exact.
    gen = torch.Generator().manual_seed(1)
    unscaled = [torch.randn(300, generator=gen) / 8]
    start = torch.randn(300, generator=gen)
    fused = _lists([start.clone()], [unscaled[0] * 2.0 ** 127])
    ops.adam_step_(*fused, grad_scale=torch.tensor(2.0 ** 127), **HP)
    reference = _lists([start.clone()], [unscaled[0].clone()])
    ops.adam_step_(*reference, **HP)
    for got, want in zip(fused[0] + fused[2] + fused[3], reference[0] + reference[2] + reference[3]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("zero_kwargs", [None, dict(set_to_none=False)])
def test_the_wrapper_at_scale_2_127_with_clip_equals_scale_one(zero_kwargs):
    def run(scale):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        wrapper = pygan_optim.AmpOptimWrapper(
            optimizer=FusedAdam(model.parameters(), lr=1e-2, betas=(0.0, 0.999)),
            loss_scale=dict(init_scale=scale, growth_interval=1000),
            clip_grad=dict(max_norm=0.01))
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
        # Small grads: times 2^127 they stay finite floats.
        loss = model(x).pow(2).mean() * 2.0 ** -8
        wrapper.update_params(loss, zero_kwargs=zero_kwargs)
        assert wrapper.loss_scaler.get_scale() == scale  # not an overflow step
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    reference = run(1.0)
    for scale in (2.0 ** 126, 2.0 ** 127):
        got = run(scale)
        assert got.isfinite().all() and torch.equal(got, reference), scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("scale_exp, clip", [(-140, None), (127, 0.3)])
def test_shifted_updates_are_the_same_bits_on_the_cpu_and_in_cuda_interpret_mode(
        dtype, scale_exp, clip):
    """The shift is part of the element math both backends share (after widening to
    the op-math type): float16 grads at a tiny scale, whose copies in float16 used to
    overflow on the CPU, included."""
    gen = torch.Generator().manual_seed(4)
    # Scaled grads whose unscaled values are finite floats: up to 2^-2 at 2^127,
    # up to 2^-17 (float16 holds it, as a subnormal from 2^-14 down) at 2^-140, whose
    # squares then overflow exp_avg_sq: the parameters stay finite.
    size = 2.0 ** -2 if scale_exp > 0 else 2.0 ** -17
    grads = [((torch.rand(n, generator=gen) + 2.0 ** -5) * size).to(dtype) for n in (5, 1030)]
    starts = [torch.randn(g.numel(), generator=gen).to(dtype) for g in grads]
    kw = dict(grad_scale=torch.tensor(2.0 ** scale_exp))
    if clip is not None:
        kw["grad_mult"] = torch.tensor(clip)
    results = []
    for context in (contextlib.nullcontext(), cuda_interpret.enabled()):
        with context:
            run = _lists([s.clone() for s in starts], [g.clone() for g in grads])
            ops.adam_step_(*run, **kw, **HP)
        results.append(run[0] + run[2] + run[3])
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
    for got, want in zip(*results):
        assert torch.equal(got.view(bits[dtype]), want.view(bits[dtype]))
    assert all(p.isfinite().all() for p in results[0][:2])
