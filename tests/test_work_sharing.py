"""The CPU passes share their items between threads (csrc/work_sharing.h):
each thread takes its own run in batches, then helps with the batches left in
the others' runs. Whichever thread takes which batch, every parameter must be
checked, updated and marked written exactly once: the same bits for every
thread count, every version counter bumped, and a refused step (the culprit at
a run's or batch's edge) writing nothing. Sizes: thousands of tensors, so the
check and version passes run on several threads in several batches of 256, and
tensors of several 64K chunks, so the kernels' batches span chunks."""
import pytest
import torch

from pygan_optim import FusedAdam, ops

HP = dict(lr=1e-2, beta1=0.0, beta2=0.999, eps=1e-8)
COUNT = 3001  # odd: the runs of two and three threads split unevenly
SIZES = [1 + (i * 37) % 300 for i in range(COUNT - 3)] + [70000, 200001, 131072]
THREADS = [1, 2, 3, 8]  # more than the machine's cores is fine


def _tensors(seed, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for n in sizes]


def _lists():
    return dict(params=_tensors(0), grads=_tensors(1), exp_avgs=_tensors(2),
                exp_avg_sqs=[t.abs() for t in _tensors(3)],
                state_steps=[torch.tensor(float(i % 7)) for i in range(COUNT)])


def _step(lists, threads, **extra):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops.adam_step_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                       lists["state_steps"], **HP, **extra)
    finally:
        torch.set_num_threads(before)


def _flat(lists):
    return torch.cat([t.reshape(-1) for key in sorted(lists) for t in lists[key]])


@pytest.mark.parametrize("threads", THREADS)
def test_each_parameter_updated_and_marked_once_whatever_thread_takes_it(threads):
    expected = _lists()
    _step(expected, 1)
    lists = _lists()
    versions = [t._version for key in ("params", "exp_avg_sqs") for t in lists[key]]
    _step(lists, threads)
    assert torch.equal(_flat(lists), _flat(expected))
    after = [t._version for key in ("params", "exp_avg_sqs") for t in lists[key]]
    assert all(a > b for a, b in zip(after, versions))
    # Each step count advanced once (a tensor stepped twice would show 2).
    assert [float(s) for s in lists["state_steps"]] == [float(i % 7) + 1 for i in range(COUNT)]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("culprit", [0, 255, 256, 1499, 1500, 2000, COUNT - 1])
def test_a_refused_step_writes_nothing_wherever_its_culprit_lies(threads, culprit):
    lists = _lists()
    lists["exp_avg_sqs"][culprit] = lists["exp_avg_sqs"][culprit].double()
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    versions = [t._version for t in lists["params"]]
    with pytest.raises(RuntimeError, match=rf"exp_avg_sqs\[{culprit}\]"):
        _step(lists, threads)
    for key, tensors in lists.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, before[key])), key
    assert [t._version for t in lists["params"]] == versions


def _three_fused_steps(sizes, threads, betas, update):
    """Three FusedAdam steps over parameters of `sizes` on `threads` threads,
    each by `update(opt, grads)`, every parameter marked written each time;
    its parameters and state, flat."""
    params = [torch.nn.Parameter(t) for t in _tensors(0, sizes)]
    opt = FusedAdam(params, lr=1e-2, betas=betas, eps=1e-8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in (1, 2, 3):
            grads = _tensors(seed, sizes)
            for p, g in zip(params, grads):
                p.grad = g
            versions = [p._version for p in params]
            update(opt, params, grads)
            assert all(p._version > v for p, v in zip(params, versions))
    finally:
        torch.set_num_threads(before)
    assert all(float(opt.state[p]["step"]) == 3.0 for p in params)
    return torch.cat([t.reshape(-1) for p in params
                      for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_adam_over_thousands_of_parameters_matches_one_thread(threads):
    def step(opt, params, grads):
        opt.step()

    run = lambda n: _three_fused_steps(SIZES, n, (0.0, 0.999), step)  # noqa: E731
    assert torch.equal(run(threads), run(1))


@pytest.mark.parametrize("set_to_none", [False, True])
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_grads_zeroed_or_let_go_in_the_shared_version_pass(threads, set_to_none):
    """step_and_zero_grad over thousands of parameters: the version pass bumps
    each parameter and zeroes or lets go of its grad batch by batch, each
    batch on whichever thread took it (its look-ahead stays in the batch: past
    it, another thread may be letting go of those grads)."""
    def update(opt, params, grads):
        opt.step_and_zero_grad(set_to_none=set_to_none)
        if set_to_none:
            assert all(p.grad is None for p in params)
        else:
            assert all(p.grad is g and not g.any() for p, g in zip(params, grads))

    sizes = [1 + (i * 53) % 97 for i in range(2305)]
    run = lambda n: _three_fused_steps(sizes, n, (0.9, 0.99), update)  # noqa: E731
    assert torch.equal(run(threads), run(1))
