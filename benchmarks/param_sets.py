"""Parameter sets for the optimizer benchmarks."""
from __future__ import annotations

from typing import Callable, List, Sequence, Union

import torch


def synthetic_sizes(total_millions: float) -> List[int]:
    """A BigGAN-like mix: large conv weights (1.1M elements each) plus many small
    vectors (biases, norm gains) and mid-size 1x1/attention weights; about 220
    tensors for 70M parameters."""
    big = 1_105_920
    n_big = max(1, int(total_millions * 1e6 * 0.95) // big)
    return [big] * n_big + [1536] * (2 * n_big) + [82944] * (2 * n_big // 3)


def make_params(shapes: Sequence[Union[int, Sequence[int]]], device: str = "cpu",
                seed: int = 0) -> List[torch.nn.Parameter]:
    """fp32 parameters of the given shapes (an int is a 1-d size), each with a
    random grad; deterministic."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(device))
        p.grad = torch.randn(shape, generator=g).to(device)
        params.append(p)
    return params


# A GAN run spends almost all its steps past the bias-correction warm-up: from step
# 16628 on, sqrt(1 - 0.999^step) rounds to 1 in fp32 and pygan_optim's fp32 loop leaves
# that divide out (BigGAN-128's 0.x config runs 1.5M iterations). The benchmarks time
# optimizers from this step on; torch's kernels do the same work at every step.
STEADY_STEP = 20000


def at_step(opt: torch.optim.Optimizer, step: int = STEADY_STEP) -> torch.optim.Optimizer:
    """`opt` after one step (with the grads its parameters have, creating its state),
    every parameter's step count then set to `step`."""
    opt.step()
    for state in opt.state.values():
        state["step"].fill_(step)
    return opt


def update_call(opt: torch.optim.Optimizer) -> Callable[..., object]:
    """One update as MMEngine's update_params makes it after backward: step, then
    zero_grad() (grads released). pygan_optim's optimizers do both in one call,
    which lets beta1 == 0 keep the grads as exp_avg."""
    if hasattr(opt, "step_and_zero_grad"):
        return opt.step_and_zero_grad

    def update(**kwargs):
        opt.step(**kwargs)
        opt.zero_grad()
    return update


def grad_refill(params: Sequence[torch.nn.Parameter]) -> Callable[[], None]:
    """Gives the params new grad tensors with the values they have now, as a
    backward does after grads were released (an untimed setup between updates)."""
    values = [p.grad.clone() for p in params]

    def refill():
        for p, g in zip(params, values):
            p.grad = g.clone()
    return refill
