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


def _step_inputs(count, inference_at, which):
    """Adam inputs for `count` small parameters (past 512 the checks run on
    several threads), with tensor `inference_at` of list `which` made under
    torch.inference_mode()."""
    gen = torch.Generator().manual_seed(3)
    lists = {k: [torch.randn(3, generator=gen) for _ in range(count)]
             for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "emas")}
    lists["exp_avg_sqs"] = [v.abs() for v in lists["exp_avg_sqs"]]
    lists["state_steps"] = [torch.tensor(2.0) for _ in range(count)]
    with torch.inference_mode():
        lists[which][inference_at] = lists[which][inference_at].clone()
    return lists


def _run_step(lists, **extra):
    ops.adam_step_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                   lists["state_steps"], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                   emas=lists["emas"], ema_momentum=0.9, **extra)


@pytest.mark.parametrize("which", ["params", "exp_avgs", "exp_avg_sqs", "state_steps", "emas",
                                   "grads"])
def test_inference_tensors_are_written_only_inside_inference_mode(which):
    """torch refuses in-place writes to inference tensors outside InferenceMode.
    The step refuses too, before writing anything (it used to write, then fail
    while telling autograd), and names the tensor; inside InferenceMode it runs
    and gives the same values as on plain tensors. A grad is written only with
    zero_grads."""
    lists = _step_inputs(1100, 1000, which)
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    versions = [p._version for p in lists["params"][:5]]
    extra = dict(zero_grads=True) if which == "grads" else {}
    with pytest.raises(RuntimeError, match=rf"{which}\[1000\] is an inference tensor"):
        _run_step(lists, **extra)
    for k, v in lists.items():
        assert all(torch.equal(a, b) for a, b in zip(v, before[k])), k
    assert [p._version for p in lists["params"][:5]] == versions

    plain = {k: [t.clone() for t in v] for k, v in before.items()}
    _run_step(plain, **extra)
    with torch.inference_mode():
        _run_step(lists, **extra)
    for k, v in lists.items():
        assert all(torch.equal(a, b) for a, b in zip(v, plain[k])), k


@pytest.mark.parametrize("op", ["ema_", "scale_", "scale_ found_inf"])
def test_other_in_place_ops_refuse_inference_tensors_first(op):
    t = [torch.randn(3), torch.randn(3)]
    found_inf = torch.zeros(1)
    with torch.inference_mode():
        if op == "scale_ found_inf":
            found_inf = torch.zeros(1)
        else:
            t[1] = t[1].clone()
    t[0][0] = float("inf")  # scale_ would set found_inf
    before = [x.clone() for x in t]
    name = "found_inf" if op == "scale_ found_inf" else r"\[1\]"
    with pytest.raises(RuntimeError, match=rf"{name} is an inference tensor"):
        if op == "ema_":
            ops.ema_(t, [torch.ones(3), torch.ones(3)], 0.5)
        else:
            ops.scale_(t, 2.0, found_inf)
    assert all(torch.equal(a, b) for a, b in zip(t, before))
    assert found_inf.item() == 0.0
