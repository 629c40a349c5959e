"""Reproducibility and numerics hunt (session 31): minimal cases where a claim did not
hold or a result differed from torch / MMagic / MMEngine. Each test states the expected
(torch's or MMagic's) result. Known gaps are kept as strict xfails (NOTES.md, "Known
gaps"), which pass, and so fail here, once fixed; every case here is fixed now."""
import pytest
import torch
from torch import nn

from pygan_optim import FusedAdam, FusedAdamW, ops
from pygan_optim.gan.ema import ExponentialMovingAverage
from test_fused_adam import _uses_fma


def test_fused_ema_blend_equals_mmagics_formula_bit_for_bit_at_momentum_5e_6():
    """README: "In fp32 the fused blend equals MMagic's mul_(1 - m).add_(p, alpha=m) bit
    for bit". The ops took only the old average's weight 1 - m and computed the new
    parameters' weight as 1 - (1 - m) in double; float32 of that is not float32(m) for
    some m (5.061160891326576e-06 here; 2e-9; about 1 in 100k random m in [1e-5, 1e-3];
    none of 0.0001, 0.0002, 0.001, ...). Fixed in session 33: the ops also take m
    (``new_weight``), and the EMA passes it (tests/test_ema_new_weight.py)."""
    m = 5.061160891326576e-06
    ema, param = torch.zeros(1), torch.ones(1)
    mmagic = ema.clone().mul_(1 - m).add_(param, alpha=m)
    ours = ema.clone()
    ops.ema_([ours], [param], 1.0 - m, new_weight=m)
    assert torch.equal(ours, mmagic), (ours.item(), mmagic.item())
    # What ExponentialMovingAverage passes (its per-tensor hook; update_parameters
    # and blend_in_step pass the same two weights).
    ours = ema.clone()
    ExponentialMovingAverage(nn.Linear(1, 1), momentum=m).avg_func(ours, param, steps=1)
    assert torch.equal(ours, mmagic), (ours.item(), mmagic.item())
    # Without the new weight the op keeps its old derivation: one ulp off here.
    old_style = ema.clone()
    ops.ema_([old_style], [param], 1.0 - m)
    assert old_style.item() == torch.tensor(1.0 - (1.0 - m), dtype=torch.float32).item()
    assert not torch.equal(old_style, mmagic)


def test_adamw_without_weight_decay_at_an_infinite_lr_matches_torch_fused(one_thread):
    """Torch leaves AdamW's decay out when weight_decay == 0; ours multiplies by
    1 - lr * 0, which is NaN for lr = inf: every parameter NaN where torch's are +-inf."""
    if _uses_fma(ours=True) != _uses_fma(ours=False):
        pytest.skip("torch's CPU capability and ours differ in FMA use")
    ours, theirs = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
    o = FusedAdamW([ours], lr=float("inf"), weight_decay=0.0)
    t = torch.optim.AdamW([theirs], lr=float("inf"), weight_decay=0.0, fused=True)
    ours.grad, theirs.grad = torch.ones(1), torch.ones(1)
    o.step()
    t.step()
    assert theirs.item() == float("-inf")
    assert ours.item() == theirs.item()


def test_float16_grads_at_a_loss_scale_past_floats_range_match_torch_fused(one_thread):
    """The CPU read copies of the grads times 2^32 when 1/grad_scale overflows float,
    made in the grads' dtype: float16 overflowed (2^-10 * 2^32) and the parameter became
    NaN where torch's fused Adam leaves it finite. Since session 32 the shift is part of
    the shared element math, after widening to float, on the CPU as on CUDA."""
    results = []
    for cls, kw in ((FusedAdam, {}), (torch.optim.Adam, dict(fused=True))):
        p = nn.Parameter(torch.ones(1, dtype=torch.float16))
        opt = cls([p], lr=1e-3, **kw)
        p.grad = torch.full((1,), 2.0 ** -10, dtype=torch.float16)
        opt.grad_scale = torch.tensor(2.0 ** -130)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        results.append(p.detach().clone())
    ours, theirs = results
    assert theirs.isfinite().all()
    assert torch.equal(ours, theirs), (ours, theirs)


@pytest.mark.parametrize("scale_exp", [126, 127])
def test_clip_factor_at_a_huge_loss_scale_equals_unscale_then_clip(scale_exp, one_thread):
    """At loss scales from 2^126, float32(1/scale x clip coefficient) is a subnormal and
    lost the coefficient's low bits, where MMEngine's unscale_ (exact: a power of two)
    then clip (x coefficient) keeps them. Fixed in session 32 (test_huge_loss_scale.py):
    the grads are read shifted down against a factor shifted up."""
    gen = torch.Generator().manual_seed(0)
    grad, start = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    scale, clip = torch.tensor(2.0 ** scale_exp), torch.tensor(0.3)
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)

    def step(g, **kw):
        p, m, v, s = [start.clone()], [torch.zeros(64)], [torch.zeros(64)], [torch.zeros(())]
        ops.adam_step_(p, [g], m, v, s, **hp, **kw)
        return m[0]

    fused = step(grad * scale, grad_scale=scale, grad_mult=clip)
    mmengine = step((grad * scale) * (1 / scale) * clip)
    assert torch.equal(fused, mmengine), int((fused != mmengine).sum())
