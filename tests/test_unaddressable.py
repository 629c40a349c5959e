"""Tensors the kernels cannot address through a data pointer are refused, never
dereferenced: every entry point raises a clear error naming the tensor, and
nothing is modified. (A DTensor reaching the kernel through FusedAdam's C++
plan once meant a SIGSEGV: its wrapper's data pointer is null.)

The kinds: a DTensor (a real one, on a one-rank gloo mesh), a FakeTensor used
outside its mode, a functional tensor, a meta tensor, and a tensor on another
device than the rest (meta beside CPU). A crash would take the test process
down, so passing means refused in an orderly way."""
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

import pygan_optim
from pygan_optim import FusedAdam, OptimWrapper, ops
from pygan_optim.gan.ema import ExponentialMovingAverage


@pytest.fixture(scope="module")
def mesh():
    from torch.distributed.device_mesh import init_device_mesh
    store = tempfile.NamedTemporaryFile(delete=False)
    store.close()
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
        os.unlink(store.name)


def make(kind, mesh, values):
    """`values` (a plain CPU tensor) as a tensor of the given kind."""
    if kind == "dtensor":
        from torch.distributed.tensor import Shard, distribute_tensor
        return distribute_tensor(values.clone(), mesh, [Shard(0)])
    if kind == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            return torch.empty(values.shape)
    if kind == "functional":
        return torch._to_functional_tensor(values.clone())
    if kind == "meta":
        return values.to("meta")
    raise ValueError(kind)


KINDS = ["dtensor", "fake", "functional", "meta"]
# How each entry point may phrase the refusal: ours names the tensor and the
# reason; the dispatcher (for tensors that carry their own dispatch key) may
# refuse first with its own error, which is just as orderly.
REFUSED = (RuntimeError, NotImplementedError, AssertionError, TypeError, ValueError)


def plain_set(n=4):
    return [torch.randn(8, 4) for _ in range(n)]


def unchanged(tensors, before):
    return all(torch.equal(a, b) for a, b in zip(tensors, before))


@pytest.mark.parametrize("position", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_ops_refuse(kind, position, mesh):
    odd = make(kind, mesh, torch.randn(8, 4))
    for op in ("adam_step_", "scale_", "l2_norm", "ema_"):
        tensors = plain_set()
        before = [t.clone() for t in tensors]
        tensors_with_odd = list(tensors)
        tensors_with_odd[position] = odd
        found_inf = torch.zeros(1)
        with pytest.raises(REFUSED):
            if op == "adam_step_":
                steps = [torch.zeros(()) for _ in tensors]
                ops.adam_step_(tensors_with_odd, plain_set(), plain_set(), plain_set(), steps,
                               lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
                assert all(s.item() == 0 for s in steps)
            elif op == "scale_":
                ops.scale_(tensors_with_odd, 0.5, found_inf)
            elif op == "l2_norm":
                ops.l2_norm(tensors_with_odd, 1.0, found_inf)
            else:
                ops.ema_(tensors_with_odd, plain_set(), 0.5)
        assert unchanged(tensors, before), op
        assert found_inf.item() == 0, op


def odd_param(kind, mesh, shape):
    """A parameter of the given kind holding a grad torch lets it hold."""
    if kind == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            p = nn.Parameter(torch.empty(shape))
            p.grad = torch.empty(shape)
        return p
    if kind == "functional":  # not a Parameter: a leaf functional tensor with a plain grad
        p = make(kind, mesh, torch.randn(shape)).requires_grad_()
        p.grad = torch.randn(shape)
        return p
    p = nn.Parameter(make(kind, mesh, torch.randn(shape)))
    p.grad = make(kind, mesh, torch.randn(shape))
    return p


# Not here: a meta grad on a CPU parameter (torch itself refuses to set it) and a
# DTensor parameter (supported: test_dtensor_parameter_steps_its_shard).
ROLES = [(kind, where) for kind in KINDS for where in ("param", "grad", "exp_avg")
         if (kind, where) not in {("meta", "grad"), ("dtensor", "param")}]


@pytest.mark.parametrize("kind, where", ROLES)
def test_fused_adam_step_refuses_and_changes_nothing(kind, where, mesh):
    """FusedAdam reaches the kernels through its C++ plan, not the dispatcher:
    the plan's own checks must catch these tensors."""
    params = [nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(8, 4)
    opt = FusedAdam(params, lr=1e-2)
    opt.step()  # state exists: the odd tensor can be put in any role
    if where == "param":
        opt.param_groups[0]["params"].append(odd_param(kind, mesh, (8, 4)))
    elif where == "grad":
        params[1].grad = make(kind, mesh, torch.randn(8, 4))
    else:
        opt.state[params[2]]["exp_avg"] = make(kind, mesh, torch.randn(8, 4))
    before = [p.detach().clone() for p in params]
    state_before = {i: {k: v.clone() for k, v in opt.state[p].items()
                        if k != "exp_avg" or where != "exp_avg" or i != 2}
                    for i, p in enumerate(params)}
    with pytest.raises(REFUSED):
        opt.step()
    assert unchanged([p.detach() for p in params], before)
    for i, p in enumerate(params):
        for k, v in state_before[i].items():
            assert torch.equal(opt.state[p][k], v), (i, k)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "dtensor"])  # DTensor: supported
def test_fused_wrapper_refuses_and_changes_nothing(kind, clip, mesh):
    model = nn.Linear(4, 3)
    opt = FusedAdam(model.parameters(), lr=1e-2)
    wrapper = OptimWrapper(opt, clip_grad=dict(max_norm=1.0) if clip else None)
    model(torch.randn(2, 4)).sum().backward()
    opt.param_groups[0]["params"].append(odd_param(kind, mesh, (3,)))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(REFUSED):
        wrapper.step()
    assert unchanged([p.detach() for p in model.parameters()], before)
    assert all(s["step"].item() == 0 for s in opt.state.values() if s)


def test_dtensor_parameter_steps_its_shard(mesh):
    """(tests/test_fsdp2.py covers two ranks.) With one rank the shard is the
    whole tensor: the result is the plain tensor's, bit for bit."""
    values, grad = torch.randn(8, 4), torch.randn(8, 4)
    plain = nn.Parameter(values.clone())
    plain.grad = grad.clone()
    sharded = odd_param("dtensor", mesh, (8, 4))
    with torch.no_grad():
        sharded.to_local().copy_(values)
        sharded.grad.to_local().copy_(grad)
    for opt in (FusedAdam([plain], lr=1e-2), FusedAdam([sharded], lr=1e-2)):
        opt.step()
    assert torch.equal(sharded.to_local(), plain.detach())
    assert not torch.equal(plain.detach(), values)


@pytest.mark.parametrize("where", ["grad", "exp_avg", "placement"])
def test_dtensor_parameter_with_a_mismatched_companion_is_refused(where, mesh):
    """A DTensor parameter's grad and state must be DTensors of the same spec
    (else the local shapes mean different elements); partial sums are refused."""
    from torch.distributed.tensor import DTensor, Partial
    params = [nn.Parameter(torch.randn(8, 4)), odd_param("dtensor", mesh, (8, 4))]
    params[0].grad = torch.randn(8, 4)
    opt = FusedAdam(params, lr=1e-2)
    opt.step()
    if where == "grad":
        params[1].grad = torch.randn(8, 4)
        message = "grad of DTensor parameter 0 .* is a plain tensor"
    elif where == "exp_avg":
        opt.state[params[1]]["exp_avg"] = torch.zeros(8, 4)
        message = "exp_avg of DTensor parameter 0 .* is a plain tensor"
    else:
        partial = nn.Parameter(DTensor.from_local(torch.randn(8, 4), mesh, [Partial()]))
        partial.grad = DTensor.from_local(torch.randn(8, 4), mesh, [Partial()])
        opt.add_param_group({"params": [partial]})
        message = "holds partial sums"
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert unchanged([p.detach() for p in params], before)
    assert opt.state[params[0]]["step"].item() == 1


@pytest.mark.parametrize("kind", KINDS)
def test_ema_refuses_and_changes_nothing(kind, mesh):
    model = nn.BatchNorm1d(3)
    ema = ExponentialMovingAverage(model, momentum=0.5, interval=1, update_buffers=True)
    ema.update_parameters(model)  # the first update copies
    averaged = [t.detach().clone() for t in ema.module.state_dict().values()]
    with torch.no_grad():
        model.weight.mul_(2)
    model.running_mean = make(kind, mesh, torch.randn(3))  # a buffer the EMA blends
    with pytest.raises(REFUSED):
        ema.update_parameters(model)
    assert unchanged(list(ema.module.state_dict().values()), averaged)


def test_plain_tensors_still_take_the_fast_path():
    """The checks cost a few flag tests per tensor; results stay bit-identical to
    torch fused on plain tensors (see test_fused_adam.py) and nothing is refused."""
    params = [nn.Parameter(torch.randn(64)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(64)
    FusedAdam(params).step()
    assert pygan_optim.cpu_capability() in ("default", "avx2", "avx512")


PYTHON_POLICY_GRAD = textwrap.dedent("""
    import sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from torch.masked import masked_tensor
    from pygan_optim import FusedAdam

    torch.set_num_threads(2)
    index, where = int(sys.argv[1]), sys.argv[2]
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(1100)]
    opt = FusedAdam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn(8)
    opt.step()
    odd = masked_tensor(torch.randn(8), torch.ones(8, dtype=torch.bool))
    if where == "grad":
        params[index].grad = odd
    else:
        opt.state[params[index]]["exp_avg"] = odd
    try:
        opt.step()
    except RuntimeError as error:
        print(error)
""")


@pytest.mark.parametrize("where", ["grad", "exp_avg"])
@pytest.mark.parametrize("index", [100, 900])
def test_a_subclass_whose_layout_python_answers_is_refused_on_either_thread(index, where):
    """torch's MaskedTensor answers layout, sizes and strides from Python. The
    step keeps the GIL, and with 1100 parameters on 2 threads index 900 is
    checked on an OpenMP worker: asking such a tensor for its layout there
    waited forever for the GIL. It is now refused by its key set before any
    other question. In a subprocess, so a hang fails the test."""
    done = subprocess.run([sys.executable, "-c", PYTHON_POLICY_GRAD, str(index), where],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    name = "grads" if where == "grad" else "exp_avgs"
    assert f"{name}[{index}] is a tensor subclass or wrapper" in done.stdout
