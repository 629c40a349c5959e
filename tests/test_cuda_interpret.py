"""tests/test_cuda.py's whole matrix in interpret mode: the CUDA backend's host
code and kernels (csrc/cuda/, compiled for the CPU against emulation.h) on CPU
tensors, against the same oracles (pygan_optim.reference, torch.optim.Adam).
Runs on every machine, GPU or not."""
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import test_cuda
from pygan_optim import _ext, cuda_interpret, ops

pytestmark = pytest.mark.cuda_interpret


@pytest.fixture(autouse=True)
def interpret_mode(monkeypatch):
    monkeypatch.setattr(test_cuda, "DEV", "cpu")
    with cuda_interpret.enabled():  # every CPU op call, FusedAdam's too
        yield


# Collected here a second time, with the fixture above.
for _name in dir(test_cuda):
    if _name.startswith("test_"):
        globals()[_name] = getattr(test_cuda, _name)


def test_same_signatures_as_ops_and_enabled_here():
    for name in ("adam_step_", "scale_", "scale", "l2_norm", "ema_"):
        assert inspect.signature(getattr(cuda_interpret, name)) == \
            inspect.signature(getattr(ops, name))
    previous = _ext._C.set_cuda_interpret(True)
    assert previous is True  # the fixture's doing: these tests do run interpret mode


@pytest.mark.skipif(_ext.cpu_capability() == "default",
                    reason="the default CPU loops round a*b+c twice; CUDA fuses it")
@pytest.mark.parametrize("dtype", test_cuda.DTYPES, ids=str)
def test_adam_element_math_equals_the_cpu_backend_bit_for_bit(dtype):
    """CPU and CUDA share math.h: element by element the interpreted kernels
    give the CPU loops' results exactly (sizes cover several chunks and a tail)."""
    case = test_cuda._adam_case(dtype, [1, 100, 65536 + 17], amsgrad=True)
    cpu = test_cuda._copy_case(case)
    opts = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True)
    test_cuda._run_adam(ops.adam_step_, case, **opts)  # interpret mode (fixture)
    previous = _ext._C.set_cuda_interpret(False)
    try:
        test_cuda._run_adam(ops.adam_step_, cpu, **opts)
    finally:
        _ext._C.set_cuda_interpret(previous)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"):
        for a, b in zip(case[key], cpu[key]):
            assert torch.equal(a, b), key


def _plan_handle(opt):
    (built,) = [entry[-2] for entry in opt._plans.values()]  # (..., built, pending)
    (plan,) = built
    return plan.handle


def test_repeated_steps_reuse_the_device_tables():
    """A step whose tensors (and grad addresses) are unchanged uploads nothing:
    the tables stay on the device, and the values that change between steps (lr
    as a tensor, the step counts) are read there, so the same host work serves
    every step: what a CUDA graph capture needs. New grad tensors re-upload."""
    from pygan_optim.optim import FusedAdam

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n)) for n in (3, 65536 + 5, 100)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    lr = torch.tensor(1e-2)
    opt = FusedAdam(ours, lr=lr, betas=(0.0, 0.999))
    ref = torch.optim.Adam(theirs, lr=1e-2, betas=(0.0, 0.999), foreach=False)
    for p in ours + theirs:
        p.grad = torch.zeros_like(p)
    for step in range(4):
        if step == 3:  # new grad tensors: new addresses in the tables
            for p in ours:
                p.grad = torch.zeros_like(p)
        g = [torch.randn_like(p) for p in ours]
        for p, q, x in zip(ours, theirs, g):
            p.grad.copy_(x)
            q.grad.copy_(x)
        lr.fill_(1e-2 / (step + 1))  # changed in place: read on the device
        ref.param_groups[0]["lr"] = 1e-2 / (step + 1)
        opt.step()
        ref.step()
        assert _plan_handle(opt).table_uploads == (1 if step < 3 else 2), step
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---- what a CUDA graph capture needs (interpret mode's stand-in for one) ---------

class _OpLog(TorchDispatchMode):
    """Every ATen op dispatched while active, from Python or from the extension's C++."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_warm_step_does_no_host_work_that_depends_on_device_values():
    """After the warm-up, a step dispatches no ATen op at all (so nothing reads
    a device value to the host: no .item(), no copy, no allocation) and uploads
    no table, whatever the values on the device: lr, steps, grads, AMP's scale
    and the skip flag change between steps and the results still follow torch."""
    from pygan_optim.optim import FusedAdam

    torch.manual_seed(3)
    ours = [torch.nn.Parameter(torch.randn(n)) for n in (65536 + 9, 40, 0)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    lr = torch.tensor(1e-2)
    opt = FusedAdam(ours, lr=lr, betas=(0.0, 0.99), amsgrad=True, capturable=True)
    ref = torch.optim.Adam(theirs, lr=1e-2, betas=(0.0, 0.99), amsgrad=True, foreach=False)
    grad_scale, found_inf = torch.tensor(8.0), torch.zeros(())
    for p in ours:
        p.grad = torch.zeros_like(p)
    traces = []
    for k in range(5):
        skip = k == 3
        for p, q in zip(ours, theirs):
            q.grad = torch.randn_like(q)
            p.grad.copy_(q.grad * 8.0)
        lr.fill_(1e-2 * (k + 1))
        found_inf.fill_(float(skip))
        with _OpLog() as log, opt.step_options(grad_scale=grad_scale, found_inf=found_inf):
            opt.step()
        traces.append([op for op in log.ops if not op.startswith("profiler.")])
        if not skip:
            ref.param_groups[0]["lr"] = 1e-2 * (k + 1)
            ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "aten.zeros.default" in traces[0]  # the first step creates state: seen here
    assert traces[1:] == [[]] * 4
    assert _plan_handle(opt).table_uploads == 1


def test_capture_refuses_an_upload_and_changes_nothing():
    from pygan_optim.optim import FusedAdam

    p = torch.nn.Parameter(torch.randn(70000))
    p.grad = torch.randn_like(p)
    opt = FusedAdam([p], lr=1e-2, capturable=True)
    with cuda_interpret.capturing(), pytest.raises(RuntimeError, match="warm-up"):
        opt.step()  # the first step: no state, no tables yet
    assert not opt.state[p]
    opt.step()
    p.grad = torch.randn_like(p)  # at a new address
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    with cuda_interpret.capturing(), pytest.raises(RuntimeError, match="new addresses"):
        opt.step()
    assert torch.equal(p, before[0])
    for key, value in before[1].items():
        assert torch.equal(opt.state[p][key], value), key
    opt.step()  # outside the capture: uploads again, then a capture works
    with cuda_interpret.capturing():
        opt.step()
    assert opt.state[p]["step"].item() == 3.0


@pytest.mark.usefixtures("keep_small_cpu_grads")  # interpret mode: CPU tensors
def test_capture_after_steps_that_kept_grads_works_and_capturable_never_keeps():
    """A kept grad is the state's own tensor once the step released it: a capture
    after such steps (grads at fixed addresses from then on) updates it in place."""
    from pygan_optim.optim import FusedAdam

    for capturable in (False, True):
        p = torch.nn.Parameter(torch.randn(70000))
        p.grad = torch.randn_like(p)
        given = p.grad.data_ptr()
        opt = FusedAdam([p], lr=1e-2, betas=(0.0, 0.999), capturable=capturable)
        opt.step_and_zero_grad()
        kept = opt.state[p]["exp_avg"]
        assert (kept.data_ptr() == given) is not capturable and p.grad is None
        p.grad = torch.randn_like(p)
        opt.step()  # warm-up with the grads the capture will use
        with cuda_interpret.capturing():
            opt.step()
        assert opt.state[p]["exp_avg"] is kept and torch.equal(kept, p.grad)
        assert opt.state[p]["step"].item() == 3.0
        # Once captured, the graph replays on the state's addresses: an eager
        # update must not move exp_avg onto its grad's memory.
        address = kept.data_ptr()
        del kept  # a held exp_avg is never replaced anyway
        p.grad = torch.randn_like(p)
        opt.step_and_zero_grad()
        assert opt.state[p]["exp_avg"].data_ptr() == address


@pytest.mark.usefixtures("keep_small_cpu_grads")  # interpret mode: CPU tensors
def test_updates_with_an_effective_grad_copy_on_cuda():
    """On the CPU a kept grad may get the effective grad written over it; the
    CUDA backend keeps only grads that are the effective grad as they are."""
    from pygan_optim.optim import FusedAdam

    p = torch.nn.Parameter(torch.randn(70000))
    opt = FusedAdam([p], lr=1e-2, betas=(0.0, 0.999))
    for options, kept in ((dict(grad_mult=torch.tensor(0.5)), False), ({}, True)):
        grad = torch.randn_like(p)
        p.grad = grad.clone()
        given = p.grad.data_ptr()
        with opt.step_options(release_grads=True, **options):
            opt.step()
        assert (opt.state[p]["exp_avg"].data_ptr() == given) is kept, options
        assert torch.equal(opt.state[p]["exp_avg"], grad * (0.5 if options else 1.0))


def test_captured_plans_outlive_a_rebuild():
    """A graph keeps its tables' addresses: the plan that holds them stays with
    the optimizer when an edit replaces it."""
    from pygan_optim.optim import FusedAdam

    p = torch.nn.Parameter(torch.randn(100))
    p.grad = torch.randn_like(p)
    opt = FusedAdam([p], capturable=True)
    opt.step()
    with cuda_interpret.capturing():
        opt.step()
    captured = _plan_handle(opt)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    opt.step()
    assert list(opt._captured_plans.values()) == [captured]


def test_captured_params_are_held_so_a_swap_is_refused():
    """A captured graph writes the parameters at their addresses on every replay:
    the plan holds them from the capture on (swap_tensors refuses a held tensor),
    while without a capture they may be swapped between steps."""
    from pygan_optim.optim import FusedAdam

    for captured in (False, True):
        p = torch.nn.Parameter(torch.randn(100))
        p.grad = torch.randn_like(p)
        opt = FusedAdam([p], capturable=True)
        opt.step()
        if captured:
            with cuda_interpret.capturing():
                opt.step()
        other = torch.nn.Parameter(torch.zeros(100))
        if captured:
            with pytest.raises(RuntimeError, match="use_count"):
                torch.utils.swap_tensors(p, other)
        else:
            torch.utils.swap_tensors(p, other)
            assert torch.equal(p.detach(), torch.zeros(100))


def test_plain_ops_under_capture_need_a_warm_up_call_with_the_same_tensors():
    xs = [torch.randn(n) for n in (7, 65537)]
    found_inf = torch.zeros(1)
    with cuda_interpret.capturing(), pytest.raises(RuntimeError, match="ema_ inside a CUDA graph"):
        ops.ema_(xs, [torch.randn_like(x) for x in xs], 0.5)
    ops.l2_norm(xs, found_inf=found_inf)
    with cuda_interpret.capturing():
        total, _ = ops.l2_norm(xs, found_inf=found_inf)
    torch.testing.assert_close(total, torch.cat(xs).norm())
    with cuda_interpret.capturing(), pytest.raises(RuntimeError, match="l2_norm inside"):
        ops.l2_norm([x.clone() for x in xs])
    # Out of place, the outputs are new at each call: no warm-up can help.
    ops.scale(xs, 2.0, found_inf)
    with cuda_interpret.capturing(), pytest.raises(RuntimeError, match="out of place.*scale_"):
        ops.scale(xs, 2.0, found_inf)


def test_a_plain_adam_step_under_capture_finds_its_warm_up_tables():
    # What a torch.compile'd FusedAdam step calls: ops.adam_step_ without a plan.
    # Its tables and step counters come from the same store as the other ops'.
    def lists(seed):
        gen = torch.Generator().manual_seed(seed)
        params = [torch.randn(n, generator=gen) for n in (5, 65537)]
        return (params, [torch.randn(p.shape, generator=gen) for p in params],
                [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                [torch.zeros(()) for _ in params])

    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    captured, expected = lists(0), lists(0)
    ops.adam_step_(*captured, **hp)  # the warm-up call
    with cuda_interpret.capturing():
        ops.adam_step_(*captured, **hp)
    for _ in range(2):
        ops.adam_step_(*expected, **hp)
    for got, want in zip(captured, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)  # the same kernels on the same values
    fresh = lists(1)
    with cuda_interpret.capturing(), pytest.raises(RuntimeError, match="adam_step_ inside"):
        ops.adam_step_(*fresh, **hp)
    assert all(float(s) == 0.0 for s in fresh[4])


def test_a_barrier_not_every_thread_reaches_fails_the_launch():
    # On a GPU such a kernel is undefined; interpret mode used to let a thread
    # that returned early count as arriving at the others' __syncthreads.
    assert _ext._C.cuda_interpret_barrier_check() == [719, 0]
