"""The whole-wrapper-step variants both wrapper benchmarks time.

AMP dynamic loss scale + clip_grad max_norm + Adam + zero_grad:
- pygan_optim.AmpOptimWrapper with FusedAdam, zeros written in the step or grads released;
- the native path: MMEngine's AmpOptimWrapper step sequence (MMEngine refuses to build that
  class on the CPU, so it is spelled out) on torch's GradScaler, with torch's fused Adam
  and with its default Adam, each with MMEngine's default zero_grad (grads released), and
  with torch's fused Adam and zero_kwargs=dict(set_to_none=False) (zeros written in
  place), the native counterpart of ours with zeros in the step.
Grads are refilled (untimed) before each step with the same scaled values, as a backward
pass would leave them; where grads were released the refill allocates them anew. Every
optimizer starts at param_sets.STEADY_STEP.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import torch

import pygan_optim
from param_sets import at_step, make_params

SCALE = 2.0 ** 16
MAX_NORM = 1.0
OURS = "pygan_optim, zeros in the step"
OURS_RELEASED = "pygan_optim, set_to_none"
NATIVE_ZEROS = "native, torch fused Adam, zeros in place"


def bytes_per_param(beta1_zero: bool) -> Dict[str, int]:
    """What each variant moves per fp32 parameter by design: ours reads the grads
    once for norm + inf check (4), then Adam (24 with beta1 = 0, else 28; + 4 to
    write zeros into the grads). Native: unscale_ (8), norm (4), clip multiply (8),
    then the optimizer (fused 28, default for-loop 72), + 4 to write zeros into the grads
    where they are zeroed in place."""
    adam = 24 if beta1_zero else 28
    return {OURS: 4 + adam + 4, OURS_RELEASED: 4 + adam,
            "native, torch fused Adam": 20 + 28, "native, torch Adam (default)": 20 + 72,
            NATIVE_ZEROS: 20 + 28 + 4}


def pairs() -> Dict[str, Tuple[str, ...]]:
    """Ours -> the native variants that zero the grads as it does: MMEngine's default
    zero_grad (released) on both sides, and zeros written in place on both sides."""
    return {OURS_RELEASED: ("native, torch fused Adam", "native, torch Adam (default)"),
            OURS: (NATIVE_ZEROS,)}


def variants(shapes, hp: dict, device: str = "cpu"
             ) -> Tuple[Dict[str, Callable[[], object]], Dict[str, Callable[[], object]]]:
    """(steps, refills) keyed by variant name, for harness.interleaved."""
    scaled = [p.grad * SCALE for p in make_params(shapes, device, seed=1)]

    def refill(params, in_place):
        def run():
            for p, g in zip(params, scaled):
                if in_place and p.grad is not None:
                    p.grad.copy_(g)
                else:
                    p.grad = g.clone()
        return run

    steps, refills = {}, {}
    for name, in_place in ((OURS, True), (OURS_RELEASED, False)):
        params = make_params(shapes, device)
        opt = at_step(pygan_optim.FusedAdam(params, **hp))
        opt.zero_grad(set_to_none=not in_place)
        w = pygan_optim.AmpOptimWrapper(optimizer=opt,
                                        loss_scale=dict(init_scale=SCALE),
                                        clip_grad=dict(max_norm=MAX_NORM))
        w.loss_scaler.scale(torch.ones((), device=device))  # creates the scale, as a backward would
        # What update_params runs after backward, with zero_kwargs=dict(set_to_none=False)
        # or MMEngine's default zero_grad().
        steps[name] = functools.partial(w.step_and_zero_grad, set_to_none=not in_place)
        refills[name] = refill(params, in_place)
    for name, kwargs, in_place in (("native, torch fused Adam", dict(fused=True), False),
                                   ("native, torch Adam (default)", {}, False),
                                   (NATIVE_ZEROS, dict(fused=True), True)):
        params = make_params(shapes, device)
        opt = at_step(torch.optim.Adam(params, **hp, **kwargs))
        opt.zero_grad(set_to_none=not in_place)
        scaler = torch.amp.GradScaler(device, init_scale=SCALE)
        scaler.scale(torch.ones((), device=device))

        def native(opt=opt, scaler=scaler, params=params, in_place=in_place):
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=not in_place)
        steps[name] = native
        refills[name] = refill(params, in_place)
    return steps, refills
