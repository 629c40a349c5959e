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
