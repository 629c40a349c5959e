"""Review of session 36's plain_slot (the parameter's own checks read from its
TensorImpl, not_addressable's key tests in one set, kNotAddressableKeys):
the parameter itself of each kind that set stands for, every companion of the
same kind (so that the companions' key-set test cannot refuse it first),
through FusedAdam's plan (AdamPlan: no dispatcher in front, grads read from
the parameters), must be refused by the full checks with their message."""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from pygan_optim import _ext

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
          maximize=False, decoupled=False, lr_tensor=None, grad_scale=None, found_inf=None,
          grad_mult=None, zero_grads=False, validate_only=False)


def _nested(*shapes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.randn(s) for s in shapes])


@pytest.mark.parametrize("shape", [(4, 8), (32,), ()])
def test_plan_refuses_an_all_nested_param(shape):
    """A nested parameter (NestedTensorCPU: the bare NestedTensor bit of the
    set) with a nested grad, state and step: without the key test, plain_slot
    asked it for sizes (NestedTensorImpl throws an internal error)."""
    plain = [torch.randn(4, 8) for _ in range(2)]
    p = _nested(shape).requires_grad_()
    (p * 2).backward(_nested(shape))
    params = [plain[0], p, plain[1]]
    plain[0].grad, plain[1].grad = torch.randn(4, 8), torch.randn(4, 8)
    exp_avgs = [torch.zeros(4, 8), _nested(shape), torch.zeros(4, 8)]
    exp_avg_sqs = [torch.zeros(4, 8), _nested(shape).abs(), torch.zeros(4, 8)]
    steps = [torch.tensor(1.0), _nested((1,)), torch.tensor(1.0)]
    before = [t.clone() for t in plain]
    with pytest.raises(RuntimeError, match=r"params\[1\] is a nested tensor"):
        _ext.AdamPlan(params, exp_avgs, exp_avg_sqs, [], steps).step(**HP)
    assert all(torch.equal(a, b) for a, b in zip(plain, before))


PYTHON_POLICY_PARAMS = textwrap.dedent("""
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    from torch.masked import masked_tensor
    from pygan_optim import _ext

    torch.set_num_threads(2)
    # Two runs of 550 on 2 threads (work_sharing.h): the worker's all masked.
    n, ones = 1100, torch.ones(8, dtype=torch.bool)
    params = [torch.randn(8) if i < n // 2 else
              masked_tensor(torch.randn(8), ones, requires_grad=True) for i in range(n)]
    for p in params:
        p.grad = torch.randn(8) if type(p) is torch.Tensor else masked_tensor(torch.randn(8), ones)
    state = [[torch.zeros(8) for _ in range(n)] for _ in range(2)]
    steps = [torch.tensor(1.0) for _ in range(n)]
    try:
        _ext.AdamPlan(params, state[0], state[1], [], steps).step(**%r)
    except RuntimeError as error:
        print(error)
""" % (HP,))


def test_plan_refuses_params_whose_layout_python_answers_on_either_thread():
    """The second half of the parameters MaskedTensors (layout, sizes and
    strides answered from Python): the check pass runs on 2 threads and the
    step keeps the GIL, so a worker asking one for its layout would wait
    forever. plain_slot must refuse
    them by their key set before any other question. In a subprocess, so a
    hang fails the test."""
    done = subprocess.run([sys.executable, "-c", PYTHON_POLICY_PARAMS], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is a tensor subclass or wrapper" in done.stdout
