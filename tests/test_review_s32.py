"""Review of session 32's diff: step_options blocks inside one another."""
import torch
from torch import nn

from pygan_optim import FusedAdam


def _setup():
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(n, generator=g)) for n in (17, 40000)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params, FusedAdam(params, lr=1e-2, betas=(0.0, 0.99))


def test_a_block_inside_another_keeps_the_outer_options_and_ends_cleanly():
    """step_and_zero_grad() inside a step_options(grad_mult=...) block: the step
    is clipped by the enclosing block's factor, the inner block gives the outer
    one its options back, and the outer block ends without an error (it raised
    AttributeError: the inner block had deleted the options)."""
    clip = torch.tensor(0.3)
    reference_params, reference = _setup()
    with reference.step_options(grad_mult=clip, release_grads=True):
        reference.step()
    params, opt = _setup()
    with opt.step_options(grad_mult=clip):
        opt.step_and_zero_grad()
        assert opt._grad_mult is clip and not opt._release_grads
    assert "_grad_mult" not in vars(opt) and "_release_grads" not in vars(opt)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(params, reference_params))
    for p, q in zip(params, reference_params):
        assert all(torch.equal(opt.state[p][k], reference.state[q][k]) for k in opt.state[p])
