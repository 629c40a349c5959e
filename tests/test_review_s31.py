"""A review of session 31's diff: legal inputs its new checks refused."""
import torch
from mmengine.optim import OptimWrapper, build_optim_wrapper
from mmengine.registry import OPTIM_WRAPPERS, Registry
from torch import nn

import pygan_optim  # noqa: F401  (registers the constructor and FusedAdam)
from pygan_optim import FusedAdam

SCOPE = "pygan_review_s31"
REVIEW_WRAPPERS = Registry("optim_wrapper", parent=OPTIM_WRAPPERS, scope=SCOPE)


@REVIEW_WRAPPERS.register_module()
class ReviewOptimWrapper(OptimWrapper):
    """A project's wrapper, registered in its child registry only."""


def _leaf_view_grad_step(cls, step):
    gen = torch.Generator().manual_seed(3)
    a = nn.Parameter(torch.randn(4, generator=gen))
    b = nn.Parameter(torch.randn(4, generator=gen))
    o = cls([a, b], lr=0.1)
    g = torch.randn(8, generator=gen)[:4]  # a view...
    g.requires_grad_()  # ...that requires grad, a leaf: no autograd graph
    a.grad = g
    b.grad = torch.ones(4)
    step(o)
    return a.detach().clone(), b.detach().clone(), a.grad


def test_zeros_in_one_pass_accept_a_leaf_view_grad_that_requires_grad():
    """torch's zero_grad(set_to_none=False) takes requires_grad off such a grad
    (no grad_fn: nothing to detach) and zeroes it; the op's new check refuses
    every view that requires grad, naming a graph that is not there."""
    def torch_step(o):
        o.step()
        o.zero_grad(set_to_none=False)

    ta, tb, tgrad = _leaf_view_grad_step(torch.optim.Adam, torch_step)
    fa, fb, fgrad = _leaf_view_grad_step(
        FusedAdam, lambda o: o.step_and_zero_grad(set_to_none=False))
    torch.testing.assert_close(fa, ta)
    torch.testing.assert_close(fb, tb)
    assert torch.count_nonzero(fgrad) == 0
    assert fgrad.requires_grad == tgrad.requires_grad


class TinyGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = nn.Linear(4, 4)
        self.discriminator = nn.Linear(4, 1)


def test_wrapper_type_under_the_configs_scope_key_builds_as_mmengine_builds_it():
    """MMEngine's build_from_cfg switches to the config's '_scope_' before it
    looks the type up; the constructor's new lookup uses the default scope
    only and refuses a wrapper config MMEngine builds."""
    cfg = dict(type="ReviewOptimWrapper", _scope_=SCOPE, optimizer=dict(type="Adam", lr=1e-3))
    ref = build_optim_wrapper(TinyGAN().generator, dict(cfg))  # MMEngine's own path
    w = build_optim_wrapper(TinyGAN(), dict(constructor="MultiOptimWrapperConstructor",
                                            generator=dict(cfg)))["generator"]
    assert type(ref) is ReviewOptimWrapper
    assert type(w) is type(ref)
