"""Unusual but legal inputs, and illegal ones, against torch.optim.Adam (a bug hunt,
session 31). Each test fails on the code before its fix.
"""
import pytest
import torch
from torch import nn

from pygan_optim import FusedAdam, ops


def _run(cls, kind, step):
    """Three steps of two groups whose step reads one grad memory twice:
    ``shared_grad``, one grad tensor given to both; ``param_twice``, a parameter
    put into a second group by an edit of param_groups (torch's for-loop Adam
    updates it once per group)."""
    gen = torch.Generator().manual_seed(0)
    a = nn.Parameter(torch.randn(6, generator=gen))
    b = nn.Parameter(torch.randn(6, generator=gen))
    o = cls([{"params": [a]}, {"params": [b]}], lr=0.1)
    if kind == "param_twice":
        o.param_groups[1]["params"].append(a)
    for s in range(3):
        g = torch.randn(6, generator=torch.Generator().manual_seed(10 + s))
        a.grad = g
        b.grad = g if kind == "shared_grad" else g.flip(0)
        step(o)
    return a.detach().clone(), b.detach().clone(), o.state[a], a.grad


def _torch_step(o):
    o.step()
    o.zero_grad(set_to_none=False)


@pytest.mark.parametrize("kind", ["shared_grad", "param_twice"])
def test_zeros_in_the_pass_do_not_reach_a_later_group_that_reads_the_same_grad(kind):
    # step_and_zero_grad(set_to_none=False) wrote group 0's zeros into the
    # grad before group 1 read it: group 1 stepped on zeros, silently.
    ta, tb, tstate, _ = _run(torch.optim.Adam, kind, _torch_step)
    fa, fb, fstate, fgrad = _run(FusedAdam, kind,
                                 lambda o: o.step_and_zero_grad(set_to_none=False))
    torch.testing.assert_close(fb, tb)
    torch.testing.assert_close(fa, ta)
    torch.testing.assert_close(fstate["exp_avg"], tstate["exp_avg"])
    assert torch.count_nonzero(fgrad) == 0


def test_compiled_step_zeros_do_not_reach_a_later_group_that_reads_the_same_grad():
    ta, tb, _, _ = _run(torch.optim.Adam, "shared_grad", _torch_step)
    torch._dynamo.reset()

    def compiled(o):
        @torch.compile(backend="eager", fullgraph=True)
        def step():
            o.step()
        with o.step_options(zero_grads=True):
            step()

    fa, fb, _, fgrad = _run(FusedAdam, "shared_grad", compiled)
    torch._dynamo.reset()
    torch.testing.assert_close(fb, tb)
    torch.testing.assert_close(fa, ta)
    assert torch.count_nonzero(fgrad) == 0


@pytest.mark.parametrize("groups", [1, 2])
def test_zeroing_a_view_grad_with_a_graph_is_not_half_applied(groups):
    """torch's zero_grad(set_to_none=False) detaches such a grad in place, which
    raises for a view. The op did that after its kernels wrote: with two
    groups the first was updated, the second not, and FusedAdam.step's
    handler, taking the error for a refusal, dropped the state of the updated
    parameter. Now one pass refuses it by name before writing anything, and
    several passes zero after the step, as torch does (every group updated,
    then zero_grad's error)."""
    gen = torch.Generator().manual_seed(1)
    a = nn.Parameter(torch.randn(4, generator=gen))
    b = nn.Parameter(torch.randn(4, generator=gen))
    o = FusedAdam([{"params": [a]}, {"params": [b]}] if groups == 2 else [a, b], lr=0.1)
    x = torch.randn(8, generator=gen, requires_grad=True)
    a.grad = (x * 2)[:4]  # a view with a graph, as backward(create_graph=True) can make
    b.grad = torch.ones(4)
    a0, b0 = a.detach().clone(), b.detach().clone()
    with pytest.raises(RuntimeError, match="cannot be detached|Can't detach views in-place"):
        o.step_and_zero_grad(set_to_none=False)
    moved = [not torch.equal(p.detach(), p0) for p, p0 in ((a, a0), (b, b0))]
    if groups == 1:  # refused: nothing written, no state
        assert moved == [False, False]
        assert all(len(o.state.get(p, {})) == 0 for p in (a, b))
        assert torch.count_nonzero(b.grad) == 4
    else:  # torch's outcome
        assert moved == [True, True]
        assert all(len(o.state[p]) > 0 for p in (a, b))


def test_op_zeroing_a_staged_grad_that_requires_grad_is_not_half_applied():
    """A grad of another layout than its parameter is zeroed with
    Tensor.zero_() after the write-back, which autograd refused (outside
    no_grad) for (a view of) a leaf that requires grad: the parameter was
    already written when the error came. A contiguous grad of the same kind
    is zeroed by the kernel without complaint; now this one too."""
    p = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    g = torch.randn(4, 3, requires_grad=True).t()
    p0 = p.clone()
    ops.adam_step_([p], [g], [torch.zeros(3, 4)], [torch.zeros(3, 4)], [torch.zeros(())],
                   lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, zero_grads=True)
    assert not torch.equal(p, p0)
    assert torch.count_nonzero(g.detach()) == 0
