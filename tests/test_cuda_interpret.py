"""tests/test_cuda.py's whole matrix in interpret mode: the CUDA backend's host
code and kernels (csrc/cuda/, compiled for the CPU against emulation.h) on CPU
tensors, against the same oracles (pygan_optim.reference, torch.optim.Adam).
Runs on every machine, GPU or not."""
import inspect

import pytest
import torch

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
    (built,) = [entry[4] for entry in opt._plans.values()]
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
