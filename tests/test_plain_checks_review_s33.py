"""Review of the Adam op's common-case checks (`plain_slot` / `plain_data` in
csrc/ops.cpp, commit 3ce5187): a parameter whose tensors share its key set,
dtype, device, sizes and strides and are plainly addressable is taken without
the full checks, its data pointers computed from the storage. Each case here
twists one parameter among plain ones, through the explicit op
(`ops.adam_step_`) and through FusedAdam's plan (grads read from the
parameters, no overlap check): what the full checks accept must give
torch.optim.Adam(fused=True)'s numbers, what they refuse must be refused with
nothing written (validate_only too). Storages flagged to throw on writable
data access (as torch flags FakeTensor's) must be refused before anything is
written, also by a FusedAdam step of several calls and for staged parameters.
"""
import threading

import numpy as np
import pytest
import torch
from torch import nn

from pygan_optim import FusedAdam, ops
from test_fused_adam import _uses_fma

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
N = 5
ODD = 2  # the twisted parameter
SHAPE = (8, 16)  # a multiple of 64 elements: see the one_thread fixture
KINDS = ("P", "G", "M", "V", "X")  # param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq


def _setup(shape=SHAPE, n=N):
    gen = torch.Generator().manual_seed(0)
    d = {k: [torch.randn(shape, generator=gen) for _ in range(n)] for k in ("P", "G", "M")}
    for k in ("V", "X"):
        d[k] = [torch.rand(shape, generator=gen) for _ in range(n)]
    d["S"] = [torch.tensor(3.0) for _ in range(n)]
    return d


def _ours(d, amsgrad=False, validate_only=False, zero_grads=False):
    ops.adam_step_(d["P"], d["G"], d["M"], d["V"], d["S"], amsgrad=amsgrad,
                   max_exp_avg_sqs=d["X"] if amsgrad else None, validate_only=validate_only,
                   zero_grads=zero_grads, **HP)


def _theirs(d, amsgrad=False):
    """torch.optim.Adam(fused=True) from the same values (contiguous copies):
    the new params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs; None where skipped."""
    out = {k: [None] * len(d["P"]) for k in ("P", "M", "V", "X")}
    for i in range(len(d["P"])):
        if d["G"][i] is None or d["P"][i].numel() == 0:
            continue
        p = nn.Parameter(d["P"][i].detach().clone().contiguous())
        opt = torch.optim.Adam([p], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                               amsgrad=amsgrad, fused=True)
        p.grad = d["G"][i].detach().clone().contiguous()
        s = {"step": d["S"][i].detach().clone().float().reshape(()),
             "exp_avg": d["M"][i].detach().clone().contiguous(),
             "exp_avg_sq": d["V"][i].detach().clone().contiguous()}
        if amsgrad:
            s["max_exp_avg_sq"] = d["X"][i].detach().clone().contiguous()
        opt.state[p] = s
        opt.step()
        out["P"][i] = p.detach()
        out["M"][i], out["V"][i] = s["exp_avg"], s["exp_avg_sq"]
        out["X"][i] = s.get("max_exp_avg_sq")
    return out


def _same(a, b):
    """Bit for bit where both loops contract alike (see test_fused_adam), else
    within a few roundings."""
    b = b.reshape(a.shape).to(a.dtype)
    if _uses_fma(ours=True) == _uses_fma(ours=False) and a.numel() % 64 == 0:
        assert torch.equal(a, b)
    elif a.dtype in (torch.float16, torch.bfloat16):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-3)
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _check_against_torch(d, theirs, amsgrad, steps_before):
    for i in range(len(d["P"])):
        if theirs["P"][i] is None:
            continue
        _same(d["P"][i].detach(), theirs["P"][i])
        _same(d["M"][i], theirs["M"][i])
        _same(d["V"][i], theirs["V"][i])
        if amsgrad:
            _same(d["X"][i], theirs["X"][i])
        assert float(d["S"][i]) == steps_before[i] + 1


def _readable(t):
    if type(t) not in (torch.Tensor, nn.Parameter):  # None, or a subclass (FakeTensor)
        return False
    if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized or t.is_nested:
        return False
    if t.numel() == 0:
        return True
    reach = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return t.untyped_storage().nbytes() >= reach * t.element_size()


def _snapshot(d):
    return {k: [t.detach().clone() if _readable(t) else None for t in d[k]] for k in d}


def _assert_unchanged(d, before):
    for k in d:
        for t, b in zip(d[k], before[k]):
            if b is not None and _readable(t):
                assert torch.equal(t.detach(), b), k


def _put(d, kinds, make):
    for k in kinds:
        d[k][ODD] = make(d[k][ODD])


def _copy_into_strided(t, size, stride):
    out = torch.empty_strided(size, stride, dtype=t.dtype)
    out.copy_(t)
    return out


def _at_offset(t, offset, extra_after=0):
    buf = torch.full((offset + t.numel() + extra_after,), 7.0, dtype=t.dtype)
    buf[offset:offset + t.numel()].copy_(t.flatten())
    return buf[offset:offset + t.numel()].view(t.shape)


def _set_into_bigger_storage(t):
    buf = torch.zeros(t.numel() + 9, dtype=t.dtype)
    buf[5:5 + t.numel()].copy_(t.flatten())
    out = torch.empty(0, dtype=t.dtype)
    out.set_(buf.untyped_storage(), 5, t.shape, t.stride())
    return out


def _data_swapped_to_other_strides(t):
    t = t.clone()
    t.data = t.detach().t().contiguous().t()
    return t


def _odd_size1_strides(t):
    # (8, 1, 16) with a stride of 77 on the size-1 dim: dense, as a plain param
    return t.reshape(8, 1, 16).clone().as_strided((8, 1, 16), (16, 77, 1))


def _numpy_shared(t):
    return torch.from_numpy(t.numpy().copy())


def _frombuffer(t):
    return torch.frombuffer(bytearray(t.numpy().tobytes()), dtype=t.dtype).view(t.shape)


def _from_file(t, tmp_path):
    path = tmp_path / f"t{id(t)}.bin"
    path.write_bytes(t.numpy().tobytes())
    return torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)


def _inference(t):
    with torch.inference_mode():
        return t.clone()


def _swapped(t):
    other = t.detach().t().contiguous().t()  # the same values, other strides
    torch.utils.swap_tensors(t, other)
    return t


def _offset_step_past_the_end():
    step = torch.tensor([1.0, 3.0])[1:].reshape(())
    step.untyped_storage().resize_(4)  # its element was the second float
    return step


def _resized(nbytes):
    def make(t):
        t = t.clone()
        t.untyped_storage().resize_(nbytes(t))
        return t
    return make


# Twists the full checks accept: the op's numbers must be torch's.
ACCEPTED = {
    "step a 0-dim view at an offset": lambda d, tmp: d["S"].__setitem__(
        ODD, torch.tensor([1.0, 2.0, 3.0])[2:].reshape(())),
    "step of shape [1, 1, 1]": lambda d, tmp: d["S"].__setitem__(ODD, torch.tensor(3.0).reshape(1, 1, 1)),
    "step as_strided (1, 1) with odd strides": lambda d, tmp: d["S"].__setitem__(
        ODD, torch.tensor([9.0, 3.0]).as_strided((1, 1), (7, 9), 1)),
    "step float64": lambda d, tmp: d["S"].__setitem__(ODD, d["S"][ODD].double()),
    "step requiring grad": lambda d, tmp: d["S"].__setitem__(ODD, torch.tensor(3.0, requires_grad=True)),
    "step copy-on-write": lambda d, tmp: d["S"].__setitem__(ODD, torch._lazy_clone(d["S"][ODD])),
    "grad at an offset ending at its storage's end": lambda d, tmp: _put(d, "G", lambda t: _at_offset(t, 11)),
    "every tensor at an offset": lambda d, tmp: _put(d, KINDS, lambda t: _at_offset(t, 3, 5)),
    "exp_avg set_ into a bigger storage": lambda d, tmp: _put(d, "M", _set_into_bigger_storage),
    "exp_avg_sq .data set to other strides": lambda d, tmp: _put(d, "V", _data_swapped_to_other_strides),
    "all tensors of one param with gaps (empty_strided)": lambda d, tmp: _put(
        d, KINDS, lambda t: _copy_into_strided(t, SHAPE, (40, 2))),
    "all tensors of one param transposed alike": lambda d, tmp: _put(
        d, KINDS, lambda t: t.t().contiguous().t()),
    "companions with gaps, param dense": lambda d, tmp: _put(
        d, "GMVX", lambda t: _copy_into_strided(t, SHAPE, (40, 2))),
    "size-1 dim with an odd stride, alike": lambda d, tmp: _put(d, KINDS, _odd_size1_strides),
    "size-1 dim with an odd stride on exp_avg only": lambda d, tmp: (
        _put(d, KINDS, lambda t: t.reshape(8, 1, 16).clone()), _put(d, "M", _odd_size1_strides)),
    "channels_last, all alike": lambda d, tmp: _put(
        d, KINDS, lambda t: t.reshape(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)),
    "channels_last grad only": lambda d, tmp: (
        _put(d, KINDS, lambda t: t.reshape(2, 4, 4, 4).clone()),
        _put(d, "G", lambda t: t.contiguous(memory_format=torch.channels_last))),
    "numpy-shared storages": lambda d, tmp: _put(d, KINDS, _numpy_shared),
    "frombuffer storages": lambda d, tmp: _put(d, KINDS, _frombuffer),
    "from_file shared storages": lambda d, tmp: _put(d, KINDS, lambda t: _from_file(t, tmp)),
    "shared-memory storages": lambda d, tmp: _put(d, KINDS, lambda t: t.share_memory_()),
    "param requiring grad": lambda d, tmp: d["P"][ODD].requires_grad_(),
    "exp_avg requiring grad": lambda d, tmp: d["M"][ODD].requires_grad_(),
    "exp_avg a non-leaf": lambda d, tmp: _put(
        d, "M", lambda t: t.clone().requires_grad_() * 1),
    "param a view of a base that requires grad": lambda d, tmp: _put(
        d, "P", lambda t: t.clone().requires_grad_().view(SHAPE)),
    "grad an inference tensor (only read)": lambda d, tmp: _put(d, "G", _inference),
    "float16, all alike": lambda d, tmp: _put(d, KINDS, lambda t: t.half()),
    "bfloat16, all alike": lambda d, tmp: _put(d, KINDS, lambda t: t.bfloat16()),
    "float64, all alike (float32 step)": lambda d, tmp: _put(d, KINDS, lambda t: t.double()),
    "0-dim param": lambda d, tmp: _put(d, KINDS, lambda t: t[1, 1].clone()),
    "param with a zero-size dim (skipped)": lambda d, tmp: _put(d, KINDS, lambda t: torch.zeros(3, 0, 2)),
    "grad None (skipped)": lambda d, tmp: d["G"].__setitem__(ODD, None),
    "param copy-on-write": lambda d, tmp: _put(d, "P", torch._lazy_clone),
    "grad and step copy-on-write": lambda d, tmp: (
        _put(d, "G", torch._lazy_clone), _put(d, "S", torch._lazy_clone)),
    "param swapped (swap_tensors) with a tensor of other strides": lambda d, tmp: _put(
        d, "P", _swapped),
}


@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("twist", sorted(ACCEPTED))
def test_accepted_twist_matches_torch_fused(twist, amsgrad, one_thread, tmp_path):
    d = _setup()
    ACCEPTED[twist](d, tmp_path)
    theirs = _theirs(d, amsgrad)
    steps_before = [float(s) for s in d["S"]]
    before = _snapshot(d)
    _ours(d, amsgrad=amsgrad, validate_only=True)
    _assert_unchanged(d, before)
    _ours(d, amsgrad=amsgrad)
    _check_against_torch(d, theirs, amsgrad, steps_before)


def test_accepted_under_inference_mode_with_inference_tensors(one_thread):
    d = _setup()
    theirs = _theirs(d)
    with torch.inference_mode():
        d = {k: [t.clone() for t in v] for k, v in d.items()}
        _ours(d)
    _check_against_torch(d, theirs, False, [3.0] * N)


def test_normal_tensors_are_written_under_inference_mode_and_no_grad(one_thread):
    d = _setup()
    theirs = _theirs(d)
    with torch.no_grad(), torch.inference_mode():
        _ours(d)
    _check_against_torch(d, theirs, False, [3.0] * N)


def test_zero_grads_zeroes_plain_and_staged_grads(one_thread):
    d = _setup()
    _put(d, "G", lambda t: t.t().contiguous().t())  # staged
    theirs = _theirs(d)
    _ours(d, zero_grads=True)
    _check_against_torch(d, theirs, False, [3.0] * N)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in d["G"])


def _quantized(t):
    return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)


# Twists the full checks refuse (the message names the tensor where ours decides).
REFUSED = {
    "param's storage resized to 0 bytes": (lambda d: _put(d, "P", _resized(lambda t: 0)),
                                           r"params\[2\] is a tensor without storage"),
    "grad's storage resized to 0 bytes": (lambda d: _put(d, "G", _resized(lambda t: 0)),
                                          r"grads\[2\] is a tensor without storage"),
    "step's storage resized to 0 bytes": (lambda d: _put(d, "S", _resized(lambda t: 0)),
                                          r"state_steps\[2\] is a tensor without storage"),
    "exp_avg's storage one byte short": (
        lambda d: _put(d, "M", _resized(lambda t: t.nbytes - 1)), r"exp_avgs\[2\].*past the end"),
    "max_exp_avg_sq's storage one byte short": (
        lambda d: _put(d, "X", _resized(lambda t: t.nbytes - 1)),
        r"max_exp_avg_sqs\[2\].*past the end"),
    "grad at an offset, storage then shrunk": (
        lambda d: _put(d, "G", lambda t: _resized(lambda u: u.untyped_storage().nbytes() - 4)(
            _at_offset(t, 11))), r"grads\[2\].*past the end"),
    "step at an offset past its storage's end": (
        lambda d: _put(d, "S", lambda t: _offset_step_past_the_end()),
        r"state_steps\[2\].*past the end"),
    "param an inference tensor": (lambda d: _put(d, "P", _inference),
                                  r"params\[2\] is an inference tensor"),
    "all of one param's tensors inference tensors": (
        lambda d: _put(d, KINDS + ("S",), _inference), r"params\[2\] is an inference tensor"),
    "exp_avg_sq an inference tensor": (lambda d: _put(d, "V", _inference),
                                       r"exp_avg_sqs\[2\] is an inference tensor"),
    "step an inference tensor": (lambda d: _put(d, "S", _inference),
                                 r"state_steps\[2\] is an inference tensor"),
    "exp_avg on the meta device": (lambda d: _put(d, "M", lambda t: t.to("meta")),
                                   r"exp_avgs\[2\] is on meta"),
    "all of one param's tensors on the meta device": (
        lambda d: _put(d, KINDS + ("S",), lambda t: t.to("meta")), r"params\[2\] is on meta"),
    "grad a negative view": (lambda d: _put(d, "G", lambda t: t._neg_view()),
                             r"grads\[2\] is a negative or conjugate view"),
    "grad sparse": (lambda d: _put(d, "G", lambda t: t.to_sparse()), r"Sparse"),
    "grad mkldnn": (lambda d: _put(d, "G", lambda t: t.to_mkldnn()), r"Mkldnn"),
    "grad an efficient zero tensor": (
        lambda d: _put(d, "G", lambda t: torch._efficientzerotensor(*SHAPE)),
        r"grads\[2\] is a tensor without storage"),
    "quantized, all alike": (lambda d: _put(d, KINDS, _quantized), r"Quantized"),
    "complex, all alike": (lambda d: _put(d, KINDS, lambda t: torch.complex(t, t)),
                           r"params\[2\] has dtype ComplexFloat"),
    "float8, all alike": (lambda d: _put(d, KINDS, lambda t: t.to(torch.float8_e4m3fn)),
                          r"params\[2\] has dtype Float8"),
    "bfloat16 param and grad, float32 state": (lambda d: _put(d, "PG", lambda t: t.bfloat16()),
                                               r"exp_avgs\[2\] has dtype Float"),
    "step bfloat16": (lambda d: _put(d, "S", lambda t: t.bfloat16()),
                      r"state_steps\[2\] must be float32 or float64"),
    "step int64": (lambda d: _put(d, "S", lambda t: torch.tensor(3)),
                   r"state_steps\[2\] must be float32 or float64"),
    "step empty": (lambda d: _put(d, "S", lambda t: torch.empty(0)),
                   r"state_steps\[2\] must be a one-element tensor"),
    "0-dim param with an exp_avg of shape [1]": (
        lambda d: (_put(d, KINDS, lambda t: t[1, 1].clone()), _put(d, "M", lambda t: t.reshape(1))),
        r"exp_avgs\[2\] has shape \[1\]"),
    "exp_avg expanded (stride 0)": (
        lambda d: _put(d, "M", lambda t: torch.rand(1, SHAPE[1]).expand(SHAPE)),
        r"exp_avgs\[2\] has elements that share memory"),
    "grad is the param": (lambda d: d["G"].__setitem__(ODD, d["P"][ODD]),
                          r"params\[2\] is written and shares memory with grads\[2\]"),
    "grad overlaps the param": (
        lambda d: (d["P"].__setitem__(ODD, torch.rand(140)[:128].view(SHAPE)),
                   d["G"].__setitem__(ODD, d["P"][ODD].view(-1).as_strided(SHAPE, (16, 1), 3))),
        r"params\[2\] is written and shares memory with grads\[2\]"),
    "exp_avg is the param": (lambda d: d["M"].__setitem__(ODD, d["P"][ODD]),
                             r"exp_avgs\[2\] and params\[2\] share memory"),
    "exp_avg is the exp_avg_sq": (lambda d: d["M"].__setitem__(ODD, d["V"][ODD]),
                                  r"share memory"),
    "step a view of the param": (lambda d: d["S"].__setitem__(ODD, d["P"][ODD].view(-1)[3:4]),
                                 r"state_steps\[2\] and params\[2\] share memory"),
    "one step shared by two params": (lambda d: d["S"].__setitem__(ODD, d["S"][0]),
                                      r"state_steps\[2\] and state_steps\[0\] share memory"),
}


@pytest.mark.parametrize("validate_only", [False, True], ids=["", "validate_only"])
@pytest.mark.parametrize("twist", sorted(REFUSED))
def test_refused_twist_changes_nothing(twist, validate_only):
    d = _setup()
    change, message = REFUSED[twist]
    change(d)
    before = _snapshot(d)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match=message):
        _ours(d, amsgrad=True, validate_only=validate_only)
    _assert_unchanged(d, before)


def test_nested_param_is_refused():
    d = _setup()
    _put(d, KINDS, lambda t: torch.nested.nested_tensor([t, t[:2]]))
    with pytest.raises(RuntimeError, match="NestedTensor"):
        _ours(d)


# --- storages flagged to refuse writable data access -------------------------


@pytest.mark.parametrize("kind", ["P", "G", "M", "V", "S"])
def test_op_refuses_a_storage_that_throws_on_writable_access(kind):
    d = _setup()
    torch._C._set_throw_on_mutable_data_ptr(d[kind][ODD])
    before = _snapshot(d)
    for validate_only in (True, False):
        with pytest.raises(RuntimeError, match="data pointer"):
            _ours(d, validate_only=validate_only)
        _assert_unchanged(d, before)


def test_op_takes_a_storage_that_warns_on_writable_access(one_thread):
    d = _setup()
    torch._C._set_warn_deprecated_on_mutable_data_ptr(d["P"][ODD])
    theirs = _theirs(d)
    _ours(d)
    _check_against_torch(d, theirs, False, [3.0] * N)


def _fused_setup(groups, shapes=(SHAPE,) * 4):
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    split = len(params) // 2
    opt = FusedAdam([{"params": params[:split]}, {"params": params[split:]}] if groups == 2
                    else params, lr=1e-2)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params, opt


def _fused_snapshot(params, opt):
    return [p.detach().clone() for p in params] + [
        t.clone() for p in params for t in opt.state[p].values()]


def _fused_unchanged(params, opt, before):
    after = [p.detach() for p in params] + [t for p in params for t in opt.state[p].values()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def _staged_param(p):
    """p's values in a non-dense view (every other column of a bigger buffer)."""
    buf = torch.zeros(p.shape[0], 2 * p.shape[1])
    buf[:, ::2] = p.detach()
    p.data = buf[:, ::2]


def _flag_state(p, opt, key):
    """Flags a copy of the state tensor (the packed ones share one storage)."""
    opt.state[p][key] = opt.state[p][key].clone()
    torch._C._set_throw_on_mutable_data_ptr(opt.state[p][key])


FLAGGED = {
    "dense param": lambda ps, opt: torch._C._set_throw_on_mutable_data_ptr(ps[-1]),
    "dense grad": lambda ps, opt: torch._C._set_throw_on_mutable_data_ptr(ps[-1].grad),
    "exp_avg": lambda ps, opt: _flag_state(ps[-1], opt, "exp_avg"),
    "step": lambda ps, opt: _flag_state(ps[-1], opt, "step"),
    "dense param, grad of other strides": lambda ps, opt: (
        torch._C._set_throw_on_mutable_data_ptr(ps[-1]),
        setattr(ps[-1], "grad", ps[-1].grad.t().contiguous().t())),
    # the full checks alone see these (their param is staged or empty)
    "staged param": lambda ps, opt: (
        _staged_param(ps[-1]), torch._C._set_throw_on_mutable_data_ptr(ps[-1])),
    "exp_avg of a staged param": lambda ps, opt: (
        _staged_param(ps[-1]), _flag_state(ps[-1], opt, "exp_avg")),
    "step of a staged param": lambda ps, opt: (
        _staged_param(ps[-1]), _flag_state(ps[-1], opt, "step")),
}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("flagged", sorted(FLAGGED))
def test_fused_adam_refuses_a_flagged_storage_before_writing_anything(flagged, groups):
    """With two groups FusedAdam checks the second call (validate_only) before the
    first one writes: the parent of 3ce5187 passed the check and refused the
    second call after the first group was updated; a staged parameter's
    write-back failed after the kernels had written everything else."""
    params, opt = _fused_setup(groups)
    FLAGGED[flagged](params, opt)
    before = _fused_snapshot(params, opt)
    with pytest.raises(RuntimeError, match="data pointer"):
        opt.step()
    _fused_unchanged(params, opt, before)


@pytest.mark.parametrize("groups", [1, 2])
def test_fused_adam_refuses_a_flagged_empty_param_before_writing_anything(groups):
    params, opt = _fused_setup(groups, shapes=(SHAPE,) * 3 + ((0,),))
    torch._C._set_throw_on_mutable_data_ptr(params[-1])
    before = _fused_snapshot(params, opt)
    with pytest.raises(RuntimeError, match="data pointer"):
        opt.step()
    _fused_unchanged(params, opt, before)


def test_fused_adam_names_a_flagged_staged_param():
    params, opt = _fused_setup(1)
    FLAGGED["staged param"](params, opt)
    with pytest.raises(RuntimeError,
                       match=r"(?s)params\[3\]'s data cannot be written.*parameter 3 of param"):
        opt.step()


def test_fused_adam_still_reads_a_flagged_staged_grad_it_does_not_write(one_thread):
    """A grad of other strides is only read, through its contiguous copy: the
    flag on its storage refuses nothing (as before 3ce5187)."""
    params, opt = _fused_setup(1)
    ref_params, ref = _fused_setup(1)
    for ps in (params, ref_params):
        ps[-1].grad = ps[-1].grad.t().contiguous().t()
    torch._C._set_throw_on_mutable_data_ptr(params[-1].grad)
    opt.step()
    ref.step()
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)


# --- FusedAdam: grads read from the parameters --------------------------------


def _torch_twin(params, opt):
    twins = [nn.Parameter(p.detach().clone().contiguous()) for p in params]
    ref = torch.optim.Adam(twins, lr=1e-2, fused=True)
    for p, q in zip(params, twins):
        q.grad = p.grad.detach().clone().contiguous()
        ref.state[q] = {k: v.detach().clone().contiguous() for k, v in opt.state[p].items()}
        ref.state[q]["step"] = ref.state[q]["step"].float().reshape(())
    return twins, ref


def _grad_at_offset(p):
    p.grad = _at_offset(p.grad, 10)


def _param_set_offset(p):
    buf = torch.zeros(p.numel() + 20)
    buf[7:7 + p.numel()] = p.detach().flatten()
    with torch.no_grad():
        p.set_(buf.untyped_storage(), 7, p.shape, p.stride())


def _grad_inference(p):
    with torch.inference_mode():
        g = p.grad.clone()
    p.grad = g


FUSED_ACCEPTED = {
    "grad at an offset": lambda p, st: _grad_at_offset(p),
    "grad of other strides": lambda p, st: setattr(p, "grad", p.grad.t().contiguous().t()),
    "grad copy-on-write": lambda p, st: setattr(p, "grad", torch._lazy_clone(p.grad)),
    "grad requiring grad": lambda p, st: p.grad.requires_grad_(),
    "grad an inference tensor": lambda p, st: _grad_inference(p),
    "grad sharing the param's memory": lambda p, st: setattr(p, "grad", p.detach()),
    "param set_ at an offset of a bigger storage": lambda p, st: _param_set_offset(p),
    "param staged (non-dense)": lambda p, st: (
        _staged_param(p), setattr(p, "grad", p.grad.clone())),
    "param copy-on-write": lambda p, st: setattr(p, "data", torch._lazy_clone(p.data)),
    "step float64": lambda p, st: st.__setitem__("step", st["step"].double()),
    "exp_avg of other strides": lambda p, st: st.__setitem__(
        "exp_avg", st["exp_avg"].t().contiguous().t()),
    "exp_avg with gaps": lambda p, st: st.__setitem__(
        "exp_avg", _copy_into_strided(st["exp_avg"], SHAPE, (40, 2))),
}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("twist", sorted(FUSED_ACCEPTED))
def test_fused_adam_accepted_twist_matches_torch_fused(twist, groups, one_thread):
    params, opt = _fused_setup(groups)
    FUSED_ACCEPTED[twist](params[-1], opt.state[params[-1]])
    twins, ref = _torch_twin(params, opt)
    opt.step()
    ref.step()
    for p, q in zip(params, twins):
        _same(p.detach(), q.detach())
        for k in ("exp_avg", "exp_avg_sq"):
            _same(opt.state[p][k], ref.state[q][k])
        assert float(opt.state[p]["step"]) == 2.0


def _shrunk_clone(t):
    t = t.clone()
    t.untyped_storage().resize_(t.nbytes // 2)
    return t


FUSED_REFUSED = {
    "grad's storage shrunk": (lambda p, st: p.grad.untyped_storage().resize_(40),
                              r"grads\[\d\].*past the end"),
    "grad's storage resized to 0": (lambda p, st: p.grad.untyped_storage().resize_(0),
                                    r"grads\[\d\] is a tensor without storage"),
    "param's storage shrunk": (lambda p, st: p.untyped_storage().resize_(40),
                               r"params\[\d\].*past the end"),
    "exp_avg's storage shrunk": (lambda p, st: st.__setitem__("exp_avg", _shrunk_clone(
        st["exp_avg"])), r"exp_avgs\[\d\].*past the end"),
    # (A float16 step is read as float32 since session 38: tests/test_gaps_s38.py.)
    "step an inference tensor": (lambda p, st: st.__setitem__("step", _inference(st["step"])),
                                 r"state_steps\[\d\] is an inference tensor"),
    "exp_avg an inference tensor": (lambda p, st: st.__setitem__(
        "exp_avg", _inference(st["exp_avg"])), r"exp_avgs\[\d\] is an inference tensor"),
    "grad a negative view": (lambda p, st: setattr(p, "grad", p.grad._neg_view()),
                             r"grads\[\d\] is a negative or conjugate view"),
    # The parameter's own key tests (session 36: one key-set test in plain_slot).
    "param a negative view": (lambda p, st: setattr(p, "data", p.data._neg_view()),
                              r"params\[\d\] is a negative or conjugate view"),
    "all of a param's tensors negative views": (
        lambda p, st: (setattr(p, "data", p.data._neg_view()),
                       setattr(p, "grad", p.grad._neg_view()),
                       [st.__setitem__(k, st[k]._neg_view()) for k in list(st)]),
        r"params\[\d\] is a negative or conjugate view"),
}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("twist", sorted(FUSED_REFUSED))
def test_fused_adam_refused_twist_changes_nothing(twist, groups):
    params, opt = _fused_setup(groups)
    change, message = FUSED_REFUSED[twist]
    change(params[-1], opt.state[params[-1]])
    before = [p.detach().clone() if _readable(p) else None for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    for p, b in zip(params, before):
        if b is not None and _readable(p):
            assert torch.equal(p.detach(), b)
    assert [float(opt.state[p]["step"]) if _readable(opt.state[p]["step"]) else s
            for p, s in zip(params, steps)] == steps


def test_fused_adam_keeps_grads_as_exp_avg_through_the_plain_path(keep_small_cpu_grads,
                                                                   one_thread):
    """beta1 == 0 and step_and_zero_grad: big grads become their exp_avgs (the
    plain slots' exp_avg pointer is the grad's); one grad at an offset of a
    bigger storage is copied instead. Values as torch's."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(256, 160)] * 3 + [(7,)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedAdam(params, lr=1e-2, betas=(0.0, 0.99))
    ref = torch.optim.Adam(twins, lr=1e-2, betas=(0.0, 0.99), fused=True)
    for step in range(3):
        for p, q in zip(params, twins):
            g = torch.randn(p.shape, generator=gen)
            q.grad = g.clone()
            p.grad = _at_offset(g, 5) if p is params[1] else g
        opt.step_and_zero_grad()
        ref.step()
        ref.zero_grad()
        for p, q in zip(params, twins):
            _same(p.detach(), q.detach())
            _same(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
            assert p.grad is None


# --- the parallel check pass and threads ---------------------------------------


def _many(n=3000):
    gen = torch.Generator().manual_seed(1)
    d = {k: [torch.randn(5, generator=gen) for _ in range(n)] for k in ("P", "G", "M")}
    d["V"] = [torch.rand(5, generator=gen) for _ in range(n)]
    d["X"] = [torch.rand(5, generator=gen) for _ in range(n)]
    d["S"] = [torch.tensor(1.0) for _ in range(n)]
    return d


@pytest.mark.parametrize("where", [0, 1500, 2999])
@pytest.mark.parametrize("twist, message", [
    ("dtype", r"exp_avgs\[{i}\] has dtype Double"),
    ("inference step", r"state_steps\[{i}\] is an inference tensor"),
    ("shrunk grad", r"grads\[{i}\].*past the end"),
])
def test_parallel_check_pass_refuses_one_twisted_param_of_thousands(twist, message, where,
                                                                    two_threads):
    d = _many()
    if twist == "dtype":
        d["M"][where] = d["M"][where].double()
    elif twist == "inference step":
        d["S"][where] = _inference(d["S"][where])
    else:
        d["G"][where].untyped_storage().resize_(8)
    before = _snapshot(d)
    with pytest.raises(RuntimeError, match=message.format(i=where)):
        _ours(d, amsgrad=True)
    _assert_unchanged(d, before)


def test_parallel_check_pass_mixes_plain_and_staged_params(two_threads):
    n = 1200  # three tasks of the check pass
    d = _many(n)
    for i in range(0, n, 7):  # every 7th grad at an offset (plain), every 11th staged
        d["G"][i] = _at_offset(d["G"][i], 3)
    for i in range(0, n, 11):
        for k in KINDS:
            d[k][i] = _copy_into_strided(d[k][i], (5,), (2,))
    theirs = _theirs(d, amsgrad=True)
    _ours(d, amsgrad=True)
    for i in range(n):
        torch.testing.assert_close(d["P"][i], theirs["P"][i], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(d["X"][i], theirs["X"][i], rtol=1e-6, atol=1e-7)
    assert all(float(s) == 2.0 for s in d["S"])


def test_python_threads_step_their_own_lists_at_once():
    """Four threads call the op at once, each on its own lists (one with a
    param at an offset, one staged): each gets torch's numbers."""
    inputs = [_setup() for _ in range(4)]
    inputs[1]["P"][ODD] = _at_offset(inputs[1]["P"][ODD], 5)
    _put(inputs[2], KINDS, lambda t: _copy_into_strided(t, SHAPE, (40, 2)))
    expected = [_theirs(d) for d in inputs]
    barrier, errors = threading.Barrier(4), []

    def work(d):
        try:
            barrier.wait()
            for _ in range(20):  # the same step again and again, on copies
                c = {k: [t.clone() for t in v] for k, v in d.items()}
                _ours(c)
            _ours(d)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(d,)) for d in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for d, theirs in zip(inputs, expected):
        for a, b in zip(d["P"], theirs["P"]):
            torch.testing.assert_close(a, b.view(a.shape), rtol=1e-6, atol=1e-7)


# --- wrappers -----------------------------------------------------------------


def test_one_fake_tensor_among_real_ones_is_refused_and_nothing_changes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    d = _setup()
    d["M"][ODD] = FakeTensorMode().from_tensor(d["M"][ODD])
    before = _snapshot(d)
    with pytest.raises((RuntimeError, AssertionError)):
        _ours(d)
    _assert_unchanged(d, before)


def test_all_fake_tensors_leave_the_real_ones_alone():
    from torch._subclasses.fake_tensor import FakeTensorMode

    d = _setup()
    before = _snapshot(d)
    with FakeTensorMode() as mode:
        fake = {k: [mode.from_tensor(t) for t in v] for k, v in d.items()}
        _ours(fake)
    _assert_unchanged(d, before)


def test_a_functional_wrapper_is_refused():
    d = _setup()
    d["M"][ODD] = torch._to_functional_tensor(d["M"][ODD])
    with pytest.raises(RuntimeError):
        _ours(d)


def test_vmap_over_the_op_is_refused():
    d = _setup()

    def f(x):
        params = list(d["P"])
        params[ODD] = x
        ops.adam_step_(params, d["G"], d["M"], d["V"], d["S"], **HP)
        return x

    before = _snapshot(d)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        torch.func.vmap(f)(torch.stack([d["P"][ODD]] * 2))
    _assert_unchanged(d, before)


# --- gaps found on the way, before 3ce5187 too ------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("edit", [
    "exp_avg is the param", "exp_avg_sq a view of exp_avg", "step a view of exp_avg",
    "exp_avg another param's exp_avg_sq"])
def test_fused_adam_refuses_state_sharing_memory_and_writes_nothing(edit, groups):
    """A state tensor edited to share memory with its parameter or another state tensor
    would be written twice in one pass (torch's result then depends on its write order).
    The plan is built again after every state edit and refuses it there, naming the
    parameter; nothing is written (fixed in session 33: the plan path had no check)."""
    params, opt = _fused_setup(groups)
    p, q = params[-1], params[-2]  # q in p's group (one plan, one pass)
    state = opt.state[p]
    if edit == "exp_avg is the param":
        state["exp_avg"] = p.detach()
    elif edit == "exp_avg_sq a view of exp_avg":
        state["exp_avg_sq"] = state["exp_avg"].view(state["exp_avg"].shape)
    elif edit == "step a view of exp_avg":
        state["step"] = state["exp_avg"].view(-1)[0]
    else:  # a view: the same object is refused by the Python check of shared objects
        state["exp_avg"] = opt.state[q]["exp_avg_sq"].view(p.shape)
    before = _fused_snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"share.* memory.*state needs memory of its own"
                                           r".* is parameter \d of param group \d"):
        opt.step()
    after = _fused_snapshot(params, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_parameters_that_share_memory_with_each_other_are_refused():
    """Two parameters that are views of one buffer: torch's loop updates one, then
    the other from its new values, an order the fused step did not keep (a staged
    copy written back over the other's update, or two threads at once; session
    41). Refused since then, naming both, with nothing written."""
    base = torch.randn(4, 16)
    before = base.clone()
    a, b = nn.Parameter(base[:2]), nn.Parameter(base[1:])  # rows 1 shared
    ours = FusedAdam([a, b], lr=1e-2)
    a.grad, b.grad = torch.ones(2, 16), torch.ones(3, 16)
    with pytest.raises(RuntimeError, match=r"params\[1\] and params\[0\] share memory.*"
                                           r"parameter 1 of param group 0.*parameter 0 of"):
        ours.step()
    assert torch.equal(base, before)


def test_step_and_zero_grad_names_a_sparse_grad():
    """The step's own error (naming the parameter), not torch's "Cannot access data
    pointer" from the kept-grad release that runs on the way out (fixed in session 33)."""
    params, opt = _fused_setup(1)
    params[-1].grad = params[-1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step_and_zero_grad()


# --- prefetches (3ce5187 reads the storage field without the checks) ----------


def test_thousands_of_params_with_missing_grads_among_them(two_threads):
    """The check pass asks for the next tensors' storages ahead, undefined grads
    included: skipped as torch skips them, the others updated."""
    d = _many(1500)
    for i in range(0, 1500, 3):
        d["G"][i] = None
    theirs = _theirs(d)
    _ours(d)
    for i in range(1500):
        if d["G"][i] is None:
            assert float(d["S"][i]) == 1.0
        else:
            torch.testing.assert_close(d["P"][i], theirs["P"][i], rtol=1e-6, atol=1e-7)
            assert float(d["S"][i]) == 2.0


def test_fused_adam_over_thousands_of_params_some_without_grads(two_threads):
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(5, generator=gen)) for _ in range(1500)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedAdam(params, lr=1e-2)
    ref = torch.optim.Adam(twins, lr=1e-2, fused=True)
    for step in range(3):
        for k, (p, q) in enumerate(zip(params, twins)):
            g = None if (k + step) % 4 == 0 else torch.randn(5, generator=gen)
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
