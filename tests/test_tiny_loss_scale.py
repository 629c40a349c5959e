"""Loss scales at and below 2^-127, whose float32 reciprocal is inf: GradScaler
gets there after some 144 skipped steps in a row (from 2^16, halving on each).

torch's fused Adam divides the grads by the scale and goes on. Multiplying by
the float32 reciprocal instead turned every grad into inf or NaN and the
parameters into NaN, with found_inf unset (the scaled grads are finite). The
fused paths now read the grads times 2^32 against a multiplier 2^32 times
smaller (the norm's squares likewise), which is exact (powers of two): the
results are those at scale 1, bit for bit, and torch's fused Adam's."""
import pytest
import torch
from torch import nn

import pygan_optim
from pygan_optim import FusedAdam
from test_fused_adam import _uses_fma

SCALES = [2.0 ** -126, 2.0 ** -127, 2.0 ** -128, 2.0 ** -140]


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"2^{int(torch.tensor(s).log2())}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_step_at_a_tiny_grad_scale_equals_torch_fused(scale, dtype, one_thread):
    if _uses_fma(ours=True) != _uses_fma(ours=False):
        pytest.skip("torch's CPU capability and ours differ in FMA use")
    base = torch.randn(1024, generator=torch.Generator().manual_seed(0)).to(dtype)
    # What backward of scaler.scale(loss) leaves: grads times the scale.
    grad = (torch.randn(1024, generator=torch.Generator().manual_seed(1)) * scale).to(dtype)
    results = []
    for cls, kw in ((FusedAdam, {}), (torch.optim.Adam, dict(fused=True))):
        p = nn.Parameter(base.clone())
        opt = cls([p], lr=1e-2, **kw)
        p.grad = grad.clone()
        # GradScaler.step's protocol for optimizers that unscale themselves
        # (GradScaler itself keeps no bfloat16 grads apart).
        opt.grad_scale = torch.tensor(scale)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        results.append((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    (ours, *our_state), (theirs, *their_state) = results
    assert ours.isfinite().all()
    for a, b in zip([ours] + our_state, [theirs] + their_state):
        assert torch.equal(a, b)  # finite: equal values are equal bits but for a zero's sign


@pytest.mark.parametrize("clip", [None, dict(max_norm=1.0)])
@pytest.mark.parametrize("zero_kwargs", [None, dict(set_to_none=False)])
def test_wrapper_update_at_a_tiny_scale_equals_the_one_at_scale_one(clip, zero_kwargs):
    def run(scale):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        wrapper = pygan_optim.AmpOptimWrapper(
            optimizer=FusedAdam(model.parameters(), lr=1e-2, betas=(0.0, 0.999)),
            loss_scale=dict(init_scale=scale, growth_interval=1000), clip_grad=clip)
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
        # Grads 2^40 times their size: scaled by 2^-140 they stay normal floats,
        # and the sum of their squares stays finite.
        loss = model(x).pow(2).mean() * 2.0 ** 40
        wrapper.update_params(loss, zero_kwargs=zero_kwargs)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    reference = run(1.0)
    for scale in SCALES:
        got = run(scale)
        assert got.isfinite().all(), scale
        assert torch.equal(got, reference), scale


@pytest.mark.parametrize("mode", ["cpu", "cuda_interpret"])
@pytest.mark.parametrize("scale_exp", [-128, -149])
def test_the_ops_unscale_exactly_past_floats_range(scale_exp, mode):
    """ops.adam_step_ with grad_scale 2^-128 / 2^-149 (the smallest float32) and
    l2_norm with their reciprocals as the scale, against the same calls on the
    unscaled grads: equal bits. The CUDA kernels run in interpret mode."""
    import contextlib

    from pygan_optim import cuda_interpret, ops

    scale = 2.0 ** scale_exp
    gen = torch.Generator().manual_seed(3)
    # 2^40 times unit size: scaled by 2^-149 they are still normal floats.
    unscaled = [torch.randn(n, generator=gen) * 2.0 ** 40 for n in (7, 4099)]

    def lists(grads):
        params = [torch.linspace(-1, 1, g.numel()) for g in grads]
        return (params, grads, [torch.zeros_like(g) for g in grads],
                [torch.zeros_like(g) for g in grads], [torch.zeros(()) for _ in grads])

    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    context = cuda_interpret.enabled() if mode == "cuda_interpret" else contextlib.nullcontext()
    with context:
        scaled_run, plain_run = lists([g * scale for g in unscaled]), lists(unscaled)
        ops.adam_step_(*scaled_run, grad_scale=torch.tensor(scale), **hp)
        ops.adam_step_(*plain_run, **hp)
        for got, want in zip(scaled_run[0] + scaled_run[2] + scaled_run[3],
                             plain_run[0] + plain_run[2] + plain_run[3]):
            assert got.isfinite().all() and torch.equal(got, want)
        inverse = torch.tensor(1 / scale, dtype=torch.float64)  # past float32's range
        total, per_tensor = ops.l2_norm(scaled_run[1], inverse)
        plain_total, plain_per_tensor = ops.l2_norm(unscaled)
        assert torch.equal(total, plain_total) and torch.equal(per_tensor, plain_per_tensor)
