"""In-place semantics the kernels must report like torch's own in-place ops:
version counters, refused AMP steps, scalar dtypes, and the reference's None grads."""
import pytest
import torch
import torch.nn as nn

import pygan_optim
from pygan_optim import ops, reference


def test_step_bumps_versions_like_torch():
    ours, theirs = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    for p in (ours, theirs):
        p.grad = torch.randn(5)
    o, t = pygan_optim.FusedAdam([ours]), torch.optim.Adam([theirs], foreach=False)
    before = ours._version, theirs._version
    o.step()
    t.step()
    assert ours._version > before[0] and theirs._version > before[1]
    assert o.state[ours]["exp_avg"]._version > 0


def test_backward_through_a_stepped_parameter_is_refused():
    """forward, step, backward: torch refuses (the saved tensor changed); so must we."""
    x = nn.Parameter(torch.randn(4))
    loss = (x * x).sum()  # saves x
    x.grad = torch.ones(4)
    pygan_optim.FusedAdam([x]).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", ["ema_", "scale_"])
def test_in_place_ops_bump_versions(op):
    t = [torch.randn(3)]
    before = t[0]._version
    if op == "ema_":
        ops.ema_(t, [torch.ones(3)], 0.5)
    else:
        ops.scale_(t, 2.0, torch.zeros(1))
    assert t[0]._version > before


def test_amp_step_without_scaled_backward_refuses_and_changes_nothing():
    model = nn.Linear(3, 1)
    w = pygan_optim.AmpOptimWrapper(optimizer=pygan_optim.FusedAdam(model.parameters()),
                                    clip_grad=dict(max_norm=1.0))
    model(torch.randn(2, 3)).sum().backward()  # not through w.loss_scaler.scale()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(AssertionError, match="_scale is None"):
        w.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(w.optimizer.state) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_scalar_tensors_of_any_float_dtype(dtype):
    p = nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    q = nn.Parameter(torch.ones(4))
    q.grad = torch.ones(4)
    pygan_optim.FusedAdam([p], lr=torch.tensor(0.125, dtype=dtype)).step()
    torch.optim.Adam([q], lr=0.125, foreach=False).step()
    torch.testing.assert_close(p, q)


def test_reference_skips_missing_grads_like_the_op():
    params = [torch.ones(3), torch.ones(3)]
    state = [[torch.zeros(3) for _ in params] for _ in range(2)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    reference.adam_step_(params, [None, torch.ones(3)], *state, steps, lr=0.1, beta1=0.9,
                         beta2=0.999, eps=1e-8)
    assert torch.equal(params[0], torch.ones(3)) and steps[0].item() == 0.0
    assert not torch.equal(params[1], torch.ones(3)) and steps[1].item() == 1.0
