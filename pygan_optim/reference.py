"""The fused ops written in plain PyTorch, one tensor at a time: the tests' oracle.

Same signatures and semantics as :mod:`pygan_optim.ops`. The Adam step follows
``torch.optim.Adam(foreach=False)``'s operation order (the kernels differ from
it only in last-bit rounding: FMAs where torch's fused CPU kernel has them);
the math runs in fp32 (fp64 for fp64 tensors) and is rounded to the
storage dtype once per step.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor


def _opmath(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _value(x: Union[float, Tensor]) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


@torch.no_grad()
def adam_step_(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
               weight_decay=0.0, amsgrad=False, max_exp_avg_sqs=None, maximize=False,
               decoupled=False, grad_scale=None, found_inf=None, grad_mult=None,
               zero_grads=False, emas=None, ema_momentum=0.0, ema_new_weight=None) -> None:
    skip = found_inf is not None and _value(found_inf) != 0.0
    if not skip:
        lr = _value(lr)
        mult = 1.0
        if grad_scale is not None:
            mult /= _value(grad_scale)
        if grad_mult is not None:
            mult *= _value(grad_mult)
        for i, p in enumerate(params):
            if grads[i] is None:  # skipped, as by the op
                continue
            dt = _opmath(p)
            param = p.to(dt)
            grad = grads[i].to(dt) * mult
            if maximize:
                grad = -grad
            step = _value(state_steps[i]) + 1
            m, v = exp_avgs[i].to(dt), exp_avg_sqs[i].to(dt)
            if decoupled:
                param = param * (1 - lr * weight_decay)
            elif weight_decay:
                grad = grad + weight_decay * param
            m = torch.lerp(m, grad, 1 - beta1)
            v = v * beta2 + (1 - beta2) * grad * grad
            second = v
            if amsgrad:
                vmax = torch.maximum(max_exp_avg_sqs[i].to(dt), v)
                max_exp_avg_sqs[i].copy_(vmax)
                second = vmax
            step_size = lr / (1 - beta1 ** step)
            denom = second.sqrt() / (1 - beta2 ** step) ** 0.5 + eps
            param = param - step_size * (m / denom)
            p.copy_(param)
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            state_steps[i].add_(1)
    if zero_grads:
        for g in grads:
            if g is not None:
                g.zero_()
    if emas is not None:
        pairs = [(e, p) for e, p in zip(emas, params) if e is not None]
        ema_([e for e, _ in pairs], [p for _, p in pairs], ema_momentum, ema_new_weight)


def _mark_if_not_finite(tensors: Sequence[Tensor], found_inf: Optional[Tensor]) -> None:
    if found_inf is not None and any(not torch.isfinite(t).all() for t in tensors):
        found_inf.fill_(1.0)


@torch.no_grad()
def scale_(tensors: Sequence[Tensor], factor: Union[float, Tensor], found_inf: Tensor) -> None:
    _mark_if_not_finite(tensors, found_inf)
    f = _value(factor)
    for t in tensors:
        t.copy_(t.to(_opmath(t)) * f)


@torch.no_grad()
def scale(inputs: Sequence[Tensor], factor: Union[float, Tensor], found_inf: Tensor) -> list:
    _mark_if_not_finite(inputs, found_inf)
    f = _value(factor)
    return [(t.to(_opmath(t)) * f).to(t.dtype) for t in inputs]


@torch.no_grad()
def l2_norm(tensors: Sequence[Tensor], scale: Union[float, Tensor] = 1.0,
            found_inf: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    _mark_if_not_finite(tensors, found_inf)
    s = _value(scale)
    sums = [((t.to(torch.float64) * s) ** 2).sum() for t in tensors]
    per_tensor = torch.stack([x.sqrt() for x in sums]).to(torch.float32)
    total = torch.stack(sums).sum().sqrt().to(torch.float32)
    return total, per_tensor


@torch.no_grad()
def ema_(ema: Sequence[Tensor], params: Sequence[Tensor], momentum: float,
         new_weight: Optional[float] = None) -> None:
    if new_weight is None:
        new_weight = 1 - momentum
    for e, p in zip(ema, params):
        dt = _opmath(e)
        e.copy_(e.to(dt) * momentum + p.to(dt) * new_weight)
