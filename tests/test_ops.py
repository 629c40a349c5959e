"""Each fused op against its plain-PyTorch twin in pygan_optim.reference, plus
chunk planning, op schemas (opcheck) and every CPU instruction-set path."""
import os
import subprocess
import sys

import pytest
import torch

import pygan_optim
from pygan_optim import _ext, ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SIZES = [0, 1, 3, 7, 64, 1023, 4097, 65537, 2 * 65536 + 5]
# Rounding to the storage dtype bounds the difference between two correct results.
TOL = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12),
       torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3)}


def tensors(sizes, dtype, scale=1.0):
    return [(torch.randn(n) * scale).to(dtype) for n in sizes]


def clones(ts):
    return [t.clone() for t in ts]


# ---- chunk planning -------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 7, 65536])
def test_plan_chunks_covers_every_element_once(chunk):
    numels = [0, 1, 7, 65536, 65537, 3 * 65536, 5]
    plan = _ext.plan_chunks(numels, chunk)
    for t, n in enumerate(numels):
        mine = [(b, e) for (i, b, e) in plan if i == t]
        assert [b for b, _ in mine] == list(range(0, n, chunk))
        assert all(0 < e - b <= chunk for b, e in mine)
        assert (mine[-1][1] if mine else 0) == n
    assert [i for i, _, _ in plan] == sorted(i for i, _, _ in plan)


def test_plan_chunks_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        _ext.plan_chunks([4], 0)


@pytest.mark.parametrize("tasks", [1, 2, 3, 16])
def test_partition_chunks_balances_elements(tasks):
    numels = [10, 100000, 3, 70000, 1, 1, 200000]
    chunk = 4096
    plan = _ext.plan_chunks(numels, chunk)
    offsets = _ext.partition_chunks(numels, chunk, tasks)
    assert offsets[0] == 0 and offsets[-1] == len(plan) and len(offsets) == tasks + 1
    assert offsets == sorted(offsets)
    sizes = [sum(e - b for _, b, e in plan[offsets[t]:offsets[t + 1]]) for t in range(tasks)]
    total = sum(numels)
    # Each run ends at the first chunk that reaches its share: off by at most one chunk.
    assert all(abs(s - total / tasks) <= chunk for s in sizes), sizes


# ---- scale ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_in_place_matches_reference(dtype):
    ours = tensors(SIZES, dtype)
    ref = clones(ours)
    f_ours, f_ref = torch.zeros(1), torch.zeros(1)
    ops.scale_(ours, 0.37, f_ours)
    reference.scale_(ref, 0.37, f_ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    assert f_ours.item() == 0.0 == f_ref.item()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 4096, 70000])
def test_scale_flags_non_finite_anywhere(bad, where):
    ts = tensors([10, 80000], torch.float32)
    idx = 1 if where >= 10 else 0
    ts[idx][where] = bad
    found = torch.zeros(1)
    out = ops.scale(ts, torch.tensor(0.5), found)
    assert found.item() == 1.0
    # scale() leaves its inputs alone.
    assert torch.isnan(ts[idx][where]) or torch.isinf(ts[idx][where])
    assert torch.equal(out[1 - idx], ts[1 - idx] * 0.5)


def test_scale_of_non_contiguous_tensors():
    gappy = torch.randn(40, 30)[::2, 1::3]   # not dense: scaled through a copy
    transposed = torch.randn(30, 40).t()     # dense, walked in storage order
    expect = [gappy * 3, transposed * 3]
    ops.scale_([gappy, transposed], 3.0, torch.zeros(1))
    torch.testing.assert_close(gappy, expect[0])
    torch.testing.assert_close(transposed, expect[1])
    out = ops.scale([gappy], 2.0, torch.zeros(1))[0]
    torch.testing.assert_close(out, gappy * 2)


# ---- l2 norm ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_norm_matches_reference(dtype):
    ts = tensors(SIZES, dtype)
    total, per = ops.l2_norm(ts, 0.5)
    r_total, r_per = reference.l2_norm(ts, 0.5)
    assert total.dtype == torch.float32 and per.shape == (len(ts),)
    torch.testing.assert_close(total, r_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per, r_per, rtol=1e-5, atol=1e-6)


def test_l2_norm_flags_non_finite_and_is_thread_count_independent():
    ts = tensors([300000, 5, 70000], torch.float32, scale=3.0)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(ops.l2_norm(ts))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    found = torch.zeros(1)
    ops.l2_norm(ts, found_inf=found)
    assert found.item() == 0.0
    ts[2][-1] = float("nan")
    ops.l2_norm(ts, found_inf=found)
    assert found.item() == 1.0


@pytest.mark.parametrize("base", [1.0, 3e19], ids=["finite_squares", "overflowing_squares"])
def test_l2_norm_flags_an_inf_or_nan_anywhere_but_not_overflowing_squares(base):
    """Finite elements whose squares overflow (3e19^2 > fp32 max) give an inf norm and
    no flag (AMP must not skip a step for them); an inf or NaN at any place of any
    1024-element block is flagged."""
    n = 3 * 1024 + 5  # three full blocks and a short one
    found = torch.zeros(1)
    total, _ = ops.l2_norm([torch.full((n,), base)], found_inf=found)
    assert found.item() == 0.0
    assert total.isinf() == (base > 1e19)
    for pos in (0, 1023, 1024, 2047, n - 1):
        for bad in (float("inf"), float("-inf"), float("nan")):
            t = torch.full((n,), base)
            t[pos] = bad
            found.zero_()
            ops.l2_norm([torch.ones(7), t], found_inf=found)
            assert found.item() == 1.0, (pos, bad)


def test_l2_norm_scale_tensor():
    ts = tensors([1000], torch.float32)
    total, _ = ops.l2_norm(ts, torch.tensor(0.25))
    torch.testing.assert_close(total, ts[0].norm() * 0.25)


# ---- ema --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_ema_matches_reference(dtype):
    ema = tensors(SIZES, dtype)
    params = tensors(SIZES, dtype)
    ref = clones(ema)
    ops.ema_(ema, params, 0.999)
    reference.ema_(ref, params, 0.999)
    for a, b in zip(ema, ref):
        torch.testing.assert_close(a, b, rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_ema_with_mismatched_strides():
    ema = torch.randn(7, 5).t()      # transposed
    param = torch.randn(5, 7)         # contiguous
    expect = ema * 0.9 + param * 0.1
    ops.ema_([ema], [param], 0.9)
    torch.testing.assert_close(ema, expect)


# ---- adam op ------------------------------------------------------------------

def adam_inputs(sizes, dtype=torch.float32):
    params = tensors(sizes, dtype)
    grads = tensors(sizes, dtype)
    m = [torch.randn(n).abs().to(dtype) * 0.1 for n in sizes]
    v = [torch.randn(n).abs().to(dtype) * 0.01 for n in sizes]
    steps = [torch.tensor(float(s)) for s in range(len(sizes))]
    return params, grads, m, v, steps


def deep_clone(lists):
    return [clones(x) for x in lists]


HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_op_matches_reference(dtype, decoupled):
    args = adam_inputs(SIZES, dtype)
    ref = deep_clone(args)
    scale, mult = torch.tensor(1024.0), torch.tensor(0.5)
    ops.adam_step_(*args, **HP, decoupled=decoupled, grad_scale=scale, grad_mult=mult)
    reference.adam_step_(*ref, **HP, decoupled=decoupled, grad_scale=scale, grad_mult=mult)
    for a_list, b_list in zip(args, ref):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b, rtol=TOL[dtype][0] * 10, atol=TOL[dtype][1] * 10)


def test_adam_op_skips_on_found_inf_but_still_zeroes_grads():
    args = adam_inputs([100, 70000])
    before = deep_clone(args)
    ops.adam_step_(*args, **HP, found_inf=torch.ones(1), zero_grads=True)
    params, grads, m, v, steps = args
    for now, then in zip(params + m + v + steps, before[0] + before[2] + before[3] + before[4]):
        assert torch.equal(now, then)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_adam_op_zero_grads_after_update():
    args = adam_inputs([5, 70000])
    ref = deep_clone(args)
    ops.adam_step_(*args, **HP, zero_grads=True)
    reference.adam_step_(*ref, **HP)
    torch.testing.assert_close(args[0], ref[0])
    assert all(torch.count_nonzero(g) == 0 for g in args[1])


def test_adam_op_beta1_zero_matches_reference():
    args = adam_inputs([4097, 3])
    ref = deep_clone(args)
    hp = dict(HP, beta1=0.0)
    ops.adam_step_(*args, **hp)
    reference.adam_step_(*ref, **hp)
    for a_list, b_list in zip(args, ref):
        torch.testing.assert_close(a_list, b_list)


def test_adam_op_stride_mismatch_param_vs_grad():
    p = torch.randn(7, 5).t()        # non-contiguous parameter
    g = torch.randn(5, 7)             # contiguous grad
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ref = [[p.clone()], [g.clone()], [m.clone()], [v.clone()], [torch.tensor(0.0)]]
    ops.adam_step_([p], [g], [m], [v], [torch.tensor(0.0)], **HP)
    reference.adam_step_(*ref, **HP)
    torch.testing.assert_close(p, ref[0][0])
    torch.testing.assert_close(m, ref[2][0])


@pytest.mark.parametrize("bad, message", [
    (lambda a: a[1].__setitem__(1, a[1][1].half()), r"grads\[1\] has dtype Half but params\[1\]"),
    (lambda a: a[2].__setitem__(0, torch.zeros(3)), r"exp_avgs\[0\] has shape \[3\]"),
    (lambda a: a[4].__setitem__(1, torch.zeros(2)), r"state_steps\[1\] must be a one-element"),
    (lambda a: a[1].pop(), r"expected 2 tensors in grads, got 1"),
    (lambda a: a[0].__setitem__(0, torch.zeros(4, dtype=torch.int32)), r"params\[0\] has dtype Int"),
])
def test_adam_op_errors_name_the_tensor_and_change_nothing(bad, message):
    args = adam_inputs([4, 6])
    bad(args)
    before = deep_clone(args)
    with pytest.raises(RuntimeError, match=message):
        ops.adam_step_(*args, **HP)
    for now, then in zip(args, before):
        for a, b in zip(now, then):
            assert torch.equal(a, b)


def test_adam_op_rejects_invalid_hyper_parameters():
    args = adam_inputs([4])
    with pytest.raises(ValueError, match="invalid beta2"):
        ops.adam_step_(*args, **dict(HP, beta2=1.0))


# ---- schemas and fake kernels ---------------------------------------------------

def test_opcheck_every_op():
    from torch.library import opcheck

    args = adam_inputs([7, 70000])
    opcheck(torch.ops.pygan_optim.adam_step_.default, tuple(args[:4]) + ([], args[4]),
            dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled=False, emas=[], ema_index=[], ema_momentum=0.0))
    args = adam_inputs([7, 70000])
    opcheck(torch.ops.pygan_optim.adam_step_.default, tuple(args[:4]) + ([], args[4]),
            dict(lr=1e-3, beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled=False, emas=[torch.randn_like(args[0][1])],
                 ema_index=[1], ema_momentum=0.9))
    ts = tensors([5, 70000], torch.float32)
    opcheck(torch.ops.pygan_optim.scale_.default, (clones(ts), 2.0, None, torch.zeros(1)))
    # Functionalization (aot_dispatch) does not handle an op that both mutates
    # an input (found_inf) and returns new tensors; the other checks apply.
    opcheck(torch.ops.pygan_optim.scale.default, (ts, 2.0, torch.tensor(0.5), torch.zeros(1)),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    opcheck(torch.ops.pygan_optim.l2_norm.default, (ts, 1.0, None, torch.zeros(1)))
    opcheck(torch.ops.pygan_optim.ema_.default, (clones(ts), ts, 0.9))


# ---- instruction sets ---------------------------------------------------------

_ISA_SCRIPT = r"""
import torch, pygan_optim
from pygan_optim import ops, reference
torch.manual_seed(0)
print(pygan_optim.cpu_capability())
sizes = [1, 7, 17, 1023, 4097, 70001]
import itertools
for dtype, beta1, amsgrad in itertools.product(
        (torch.float32, torch.float64, torch.bfloat16, torch.float16), (0.9, 0.0), (True, False)):
    p = [torch.randn(n).to(dtype) for n in sizes]; g = [torch.randn(n).to(dtype) for n in sizes]
    m = [torch.randn(n).to(dtype) for n in sizes]; v = [torch.rand(n).to(dtype) for n in sizes]
    vm = [torch.rand(n).to(dtype) for n in sizes]
    # offset views: streaming stores must handle unaligned starts
    p[3], g[3], m[3], v[3], vm[3] = (t[5:] for t in (p[3], g[3], m[3], v[3], vm[3]))
    s = [torch.tensor(3.0) for _ in sizes]
    # The same inputs again (tensor 3 again an offset view, after 5 sentinels), for the
    # step with zeros written into the grads (the register loop writes them as it goes).
    def offset(t, k):
        return torch.cat([torch.full((5,), 7.0, dtype=dtype), t])[5:] if k == 3 and t.dim() else t.clone()
    again = [[offset(t, k) for k, t in enumerate(x)] for x in (p, g, m, v, s, vm)]
    ref = [[t.clone() for t in x] for x in (p, g, m, v, s)]
    hp = dict(lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad,
              max_exp_avg_sqs=vm)
    vmax0 = [t.clone() for t in hp['max_exp_avg_sqs']]
    ops.adam_step_(p, g, m, v, s, **hp)
    vmax = hp['max_exp_avg_sqs']
    hp['max_exp_avg_sqs'] = [t.clone() for t in vmax0]
    reference.adam_step_(*ref, **hp)
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    for ours, theirs in zip((p, m, v, vmax), (ref[0], ref[2], ref[3], hp['max_exp_avg_sqs'])):
        if ours is vmax and not amsgrad:
            continue
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    zp, zg, zm, zv, zs, zvm = again
    ops.adam_step_(zp, zg, zm, zv, zs, **dict(hp, max_exp_avg_sqs=zvm), zero_grads=True)
    assert all(torch.equal(a, b) for a, b in zip(zp + zm + zv, p + m + v))
    assert all(torch.count_nonzero(t) == 0 for t in zg)
    assert torch.equal(zg[3]._base[:5], torch.full((5,), 7.0, dtype=dtype))
    t1, _ = ops.l2_norm(g); t2, _ = reference.l2_norm(g)
    torch.testing.assert_close(t1, t2, rtol=1e-4, atol=1e-4)
    e = [x.clone() for x in m]; r = [x.clone() for x in m]
    ops.ema_(e, p, 0.99); reference.ema_(r, p, 0.99)
    for a, b in zip(e, r):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
print("ok")
"""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_instruction_set_path(isa):
    flags = _cpu_flags()
    if isa == "avx512" and "avx512bw" not in flags or isa == "avx2" and "avx2" not in flags:
        pytest.skip(f"this CPU lacks {isa}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [isa, "ok"]


def test_package_reports_build():
    assert pygan_optim.cpu_capability() in ("default", "avx2", "avx512")
    assert isinstance(pygan_optim.cuda_built(), bool)


def test_stream_pass_roof_probe_sums_and_refuses_bad_input():
    """The benchmarks' memory-roof probe: outputs = sum of inputs, in place too."""
    from pygan_optim import _ext

    a, b, c, d = (torch.rand(100003) for _ in range(4))
    expected = a + b + c + d
    # Write-only outputs get streaming stores after plain ones up to a vector
    # boundary: this one starts 4 bytes past one (a 15- or 7-element peel).
    fresh = torch.empty(100004)[1:]
    _ext.stream_pass([a, b, c, d], [fresh, b, c, d])  # three written back, one write-only
    for out in (b, c, d, fresh):
        assert torch.equal(out, expected)
    only = torch.empty(100003)
    _ext.stream_pass([a], [only])  # nothing written back
    assert torch.equal(only, a)
    with pytest.raises(RuntimeError, match="1 to 4 inputs and 1 to 4 outputs"):
        _ext.stream_pass([], [a])
    with pytest.raises(RuntimeError, match="1 to 4 inputs and 1 to 4 outputs"):
        _ext.stream_pass([a], [b, c, d, fresh, a])
    with pytest.raises(RuntimeError, match="contiguous float32 CPU tensor of 100003"):
        _ext.stream_pass([a], [torch.empty(5)])
    with pytest.raises(RuntimeError, match="contiguous float32"):
        _ext.stream_pass([a.double()], [a])


def test_empty_lists_do_nothing_and_mismatched_lengths_are_refused():
    ops.adam_step_([], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    ops.ema_([], [], 0.5)
    ops.scale_([], 2.0, found_inf=torch.zeros(1))
    total, per_tensor = ops.l2_norm([])
    assert float(total) == 0.0 and per_tensor.shape == (0,)  # as clip_grad_norm_ without grads
    with pytest.raises(RuntimeError, match="expected 0 tensors in grads, got 1"):
        ops.adam_step_([], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(())],
                       lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
