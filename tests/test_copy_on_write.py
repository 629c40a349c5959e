"""Copy-on-write tensors (torch._lazy_clone) in every role of every entry point.

Such a tensor shares its source's memory until its first write, when torch
copies it ("materializes" it). torch's own ops accept them; torch forbids that
copy inside a parallel region, where our kernels and the check pass run. Each
case runs once with copy-on-write inputs and once with plain clones of the same
values: the results must be identical bit for bit (the same arithmetic runs on
both), and the tensors the clones came from must be left as they were.

Tensor lists are 1100 long, with the copy-on-write tensors at 100 and 900, so
that both threads' halves of the check pass (512-tensor tasks) meet one."""
import pytest
import torch
from torch import nn

from pygan_optim import AmpOptimWrapper, EmaBlend, FusedAdam, ops

N = 1100
AT = (100, 900)


def values(seed):
    """N tensors, those at AT large enough for an update to keep their grads
    (keep_small_cpu_grads)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32768 if i in AT else 33, generator=g) for i in range(N)]


def lazy(tensors, at=AT):
    """The list with copy-on-write clones at `at`, and their sources (snapshots
    of the sources to compare with afterwards)."""
    out = list(tensors)
    sources = []
    for i in at:
        out[i] = torch._lazy_clone(tensors[i])
        sources.append((tensors[i], tensors[i].clone()))
    return out, sources


def assert_sources_kept(sources):
    for source, before in sources:
        assert torch.equal(source, before), "a write reached a copy-on-write clone's source"


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def adam_inputs(seed):
    params, grads, m, v = values(seed), values(seed + 1), values(seed + 2), values(seed + 3)
    v = [t.abs() for t in v]
    steps = [torch.tensor(5.0) for _ in range(N)]
    return dict(params=params, grads=grads, exp_avgs=m, exp_avg_sqs=v, state_steps=steps)


ROLES = ["params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps", "emas"]


@pytest.mark.parametrize("zero_grads", [False, True])
@pytest.mark.parametrize("role", ROLES)
def test_adam_step_with_a_copy_on_write_tensor_in_each_role(role, zero_grads):
    def run(make_lazy):
        lists = adam_inputs(seed=1)
        emas = values(seed=9)
        sources = []
        if make_lazy:
            if role == "emas":
                emas, sources = lazy(emas)
            else:
                lists[role], sources = lazy(lists[role])
        ops.adam_step_(**lists, lr=1e-2, beta1=0.5, beta2=0.999, eps=1e-8,
                       zero_grads=zero_grads, emas=emas, ema_momentum=0.9)
        return lists, emas, sources

    plain, plain_emas, _ = run(make_lazy=False)
    cow, cow_emas, sources = run(make_lazy=True)
    for key in plain:
        assert_same(cow[key], plain[key])
    assert_same(cow_emas, plain_emas)
    assert_sources_kept(sources)


def test_scale_l2_norm_and_ema_with_copy_on_write_tensors():
    found_inf = torch.zeros(1)
    tensors, sources = lazy(values(seed=3))
    ops.scale_(tensors, 0.5, found_inf)
    assert_same(tensors, [t * 0.5 for t in values(seed=3)])
    assert_sources_kept(sources)

    inputs, sources = lazy(values(seed=4))
    assert_same(ops.scale(inputs, 2.0, found_inf), [t * 2.0 for t in values(seed=4)])
    total, per_tensor = ops.l2_norm(inputs)
    plain_total, plain_per_tensor = ops.l2_norm(values(seed=4))
    assert torch.equal(total, plain_total) and torch.equal(per_tensor, plain_per_tensor)
    assert_sources_kept(sources)
    assert found_inf.item() == 0

    averages, average_sources = lazy(values(seed=5))
    params, param_sources = lazy(values(seed=6))
    ops.ema_(averages, params, 0.9)
    plain = values(seed=5)
    ops.ema_(plain, values(seed=6), 0.9)
    assert_same(averages, plain)
    assert_sources_kept(average_sources + param_sources)


def fused_adam_run(make_lazy, update, keep_fixture_on):
    """Two steps of FusedAdam over N parameters; returns the parameters, the
    state and the sources of the copy-on-write tensors."""
    params = [nn.Parameter(t) for t in values(seed=11)]
    sources = []
    if make_lazy:
        for i in AT:
            sources.append((params[i].data, params[i].data.clone()))
            params[i] = nn.Parameter(torch._lazy_clone(params[i].data))
    opt = FusedAdam(params, lr=1e-2, betas=(0.0, 0.999))
    for step in range(2):
        grads = values(seed=20 + step)
        for p, g in zip(params, grads):
            p.grad = g
        if make_lazy:
            for i in AT:
                sources.append((grads[i], grads[i].clone()))
                params[i].grad = torch._lazy_clone(grads[i])
        if update:
            opt.step_and_zero_grad(set_to_none=True)
        else:
            opt.step()
    state = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    return params, state, sources


@pytest.mark.parametrize("update", [False, True], ids=["step", "step_and_zero_grad"])
def test_fused_adam_with_copy_on_write_params_and_grads(update, keep_small_cpu_grads):
    plain_params, plain_state, _ = fused_adam_run(False, update, keep_small_cpu_grads)
    params, state, sources = fused_adam_run(True, update, keep_small_cpu_grads)
    assert_same(params, plain_params)
    assert_same(state, plain_state)
    assert_sources_kept(sources)


def test_wrapper_step_with_clip_and_ema_blend_on_copy_on_write_tensors():
    def run(make_lazy):
        params = [nn.Parameter(t) for t in values(seed=31)]
        averages = values(seed=32)
        sources = []
        if make_lazy:
            averages, sources = lazy(averages)
        opt = FusedAdam(params, lr=1e-2, betas=(0.0, 0.999))
        wrapper = AmpOptimWrapper(optimizer=opt, loss_scale=dict(init_scale=4.0),
                                  clip_grad=dict(max_norm=1.0))
        wrapper.loss_scaler.scale(torch.ones(()))
        grads = values(seed=33)
        for p, g in zip(params, grads):
            p.grad = g * 4.0
        if make_lazy:
            for i in AT:
                scaled = params[i].grad
                sources.append((scaled, scaled.clone()))
                params[i].grad = torch._lazy_clone(scaled)
        wrapper.step()
        opt.step(ema=EmaBlend(zip(params, averages), momentum=0.9))
        return params, averages, sources

    plain_params, plain_averages, _ = run(False)
    params, averages, sources = run(True)
    assert_same(params, plain_params)
    assert_same(averages, plain_averages)
    assert_sources_kept(sources)
