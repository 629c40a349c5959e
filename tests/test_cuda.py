"""The CUDA kernels against the plain-PyTorch oracle (pygan_optim.reference) and
FusedAdam on CUDA against torch.optim.Adam/AdamW. Skipped without a GPU;
tests/test_cuda_interpret.py runs the same tests in interpret mode (DEV = "cpu",
the CUDA backend and kernels executed on the CPU) everywhere."""
from __future__ import annotations

import pytest
import torch

import pygan_optim
from pygan_optim import cuda_interpret, ops, reference
from pygan_optim.optim import FusedAdam, FusedAdamW

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not pygan_optim.cuda_built(), reason="pygan_optim built without CUDA"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [0, 1, 3, 7, 64, 65537]  # 65537: two chunks, the second of one element

# One step against the oracle (same op-math, rounded once per step).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEV)


def _clone(tensors):
    return [t.clone() for t in tensors]


def _assert_lists_close(actual, expected, dtype, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m: f"{what}[{i}]: {m}")


def _adam_case(dtype, sizes, amsgrad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [_randn(n, dtype, gen) for n in sizes]
    grads = [_randn(n, dtype, gen) for n in sizes]
    exp_avgs = [_randn(n, dtype, gen, 0.1) for n in sizes]
    exp_avg_sqs = [_randn(n, dtype, gen, 0.1).abs() for n in sizes]
    max_sqs = [v + _randn(n, dtype, gen, 0.01).abs() for v, n in zip(exp_avg_sqs, sizes)]
    steps = [torch.tensor(float(k % 3), device=DEV) for k in range(len(sizes))]
    return dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                max_exp_avg_sqs=max_sqs if amsgrad else None, state_steps=steps)


def _copy_case(case):
    return {k: (None if v is None else _clone(v)) for k, v in case.items()}


def _run_adam(fn, case, **kw):
    fn(case["params"], case["grads"], case["exp_avgs"], case["exp_avg_sqs"], case["state_steps"],
       max_exp_avg_sqs=case["max_exp_avg_sqs"], **kw)


def _assert_adam_close(ours, ref, dtype, amsgrad):
    keys = ["params", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if amsgrad else [])
    for key in keys:
        _assert_lists_close(ours[key], ref[key], dtype, key)
    for a, e in zip(ours["state_steps"], ref["state_steps"]):
        assert a.item() == e.item()


ADAM_VARIANTS = {
    "adam": dict(),
    "adam_l2": dict(weight_decay=0.1),
    "adamw": dict(weight_decay=0.1, decoupled=True),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True, weight_decay=0.05),
    "beta1_zero": dict(beta1=0.0),
    "beta1_zero_amsgrad_w": dict(beta1=0.0, amsgrad=True, weight_decay=0.1, decoupled=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(ADAM_VARIANTS))
def test_adam_step_matches_reference(dtype, variant):
    opts = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    opts.update(ADAM_VARIANTS[variant])
    amsgrad = opts.get("amsgrad", False)
    ours = _adam_case(dtype, SIZES, amsgrad)
    ref = _copy_case(ours)
    for step in range(3):
        gen = torch.Generator().manual_seed(100 + step)
        new_grads = [_randn(n, dtype, gen) for n in SIZES]
        for case in (ours, ref):
            for g, new in zip(case["grads"], new_grads):
                g.copy_(new)
        _run_adam(ops.adam_step_, ours, **opts)
        _run_adam(reference.adam_step_, ref, **opts)
        if DEV == "cuda":
            torch.cuda.synchronize()
        _assert_adam_close(ours, ref, dtype, amsgrad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("skip", [False, True], ids=["update", "found_inf"])
def test_adam_step_blends_emas_as_ema_after_the_step(dtype, skip):
    """EMAs blended in the update pass (one param without a grad, one without an
    EMA) give the bits of the same step followed by ema_ on the same device."""
    opts = dict(lr=1e-2, beta1=0.0, beta2=0.999, eps=1e-8, zero_grads=True,
                found_inf=torch.full((), float(skip), device=DEV))
    fused = _adam_case(dtype, SIZES, amsgrad=False)
    separate = _copy_case(fused)
    fused["grads"][2] = separate["grads"][2] = None
    gen = torch.Generator().manual_seed(7)
    emas = [_randn(n, dtype, gen) for n in SIZES]
    emas[3] = None
    separate_emas = [None if e is None else e.clone() for e in emas]
    _run_adam(ops.adam_step_, fused, emas=emas, ema_momentum=0.999, **opts)
    _run_adam(ops.adam_step_, separate, **opts)
    pairs = [(e, p) for e, p in zip(separate_emas, separate["params"]) if e is not None]
    ops.ema_([e for e, _ in pairs], [p for _, p in pairs], 0.999)
    if DEV == "cuda":
        torch.cuda.synchronize()
    for key in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        for i, (a, b) in enumerate(zip(fused[key], separate[key])):
            assert torch.equal(a, b), f"{key}[{i}]"
    for i, (a, b) in enumerate(zip(emas, separate_emas)):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"emas[{i}]"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_step_tensor_lr_grad_scale_grad_mult(dtype):
    amsgrad = False
    ours = _adam_case(dtype, SIZES, amsgrad)
    ref = _copy_case(ours)
    kw = dict(lr=torch.tensor(3e-3, device=DEV), beta1=0.8, beta2=0.99, eps=1e-6,
              grad_scale=torch.tensor(1024.0, device=DEV),
              grad_mult=torch.tensor(0.5, device=DEV),
              found_inf=torch.tensor(0.0, device=DEV))
    for case in (ours, ref):
        for g in case["grads"]:
            g.mul_(1024.0)  # scaled as GradScaler leaves them (exact: a power of two)
    _run_adam(ops.adam_step_, ours, **kw)
    _run_adam(reference.adam_step_, ref, **kw)
    _assert_adam_close(ours, ref, dtype, amsgrad)


def test_adam_step_lr_on_cpu_and_float64_steps():
    ours = _adam_case(torch.float32, SIZES, False)
    ours["state_steps"] = [s.double() for s in ours["state_steps"]]
    ref = _copy_case(ours)
    kw = dict(lr=torch.tensor(1e-3), beta1=0.9, beta2=0.999, eps=1e-8)  # lr on the CPU
    _run_adam(ops.adam_step_, ours, **kw)
    _run_adam(reference.adam_step_, ref, **kw)
    _assert_adam_close(ours, ref, torch.float32, False)
    assert all(s.dtype == torch.float64 for s in ours["state_steps"])


@pytest.mark.parametrize("zero_grads", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_step_found_inf_skips(dtype, zero_grads):
    case = _adam_case(dtype, SIZES, True)
    before = _copy_case(case)
    _run_adam(ops.adam_step_, case, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True,
              grad_scale=torch.tensor(2.0, device=DEV), found_inf=torch.tensor(1.0, device=DEV),
              zero_grads=zero_grads)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"):
        for a, b in zip(case[key], before[key]):
            assert torch.equal(a, b), key
    for g, g0 in zip(case["grads"], before["grads"]):
        assert torch.equal(g, torch.zeros_like(g) if zero_grads else g0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_step_zero_grads(dtype):
    ours = _adam_case(dtype, SIZES, False)
    ref = _copy_case(ours)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, zero_grads=True)
    _run_adam(ops.adam_step_, ours, **kw)
    _run_adam(reference.adam_step_, ref, **kw)
    _assert_adam_close(ours, ref, dtype, False)
    assert all(torch.count_nonzero(g) == 0 for g in ours["grads"])


def test_adam_step_mixed_dtypes_in_one_call():
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]
    sizes = [65537, 5, 64, 70000, 0]

    def make():
        g = torch.Generator().manual_seed(7)
        return dict(params=[_randn(n, d, g) for n, d in zip(sizes, dtypes)],
                    grads=[_randn(n, d, g) for n, d in zip(sizes, dtypes)],
                    exp_avgs=[_randn(n, d, g, 0.1) for n, d in zip(sizes, dtypes)],
                    exp_avg_sqs=[_randn(n, d, g, 0.1).abs() for n, d in zip(sizes, dtypes)],
                    max_exp_avg_sqs=None,
                    state_steps=[torch.tensor(float(k), device=DEV) for k in range(len(sizes))])

    ours, ref = make(), make()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    _run_adam(ops.adam_step_, ours, **kw)
    _run_adam(reference.adam_step_, ref, **kw)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for i, d in enumerate(dtypes):
            torch.testing.assert_close(ours[key][i], ref[key][i], **TOL[d])
    for a, e in zip(ours["state_steps"], ref["state_steps"]):
        assert a.item() == e.item()


def test_adam_step_non_dense_tensors_are_staged():
    gen = torch.Generator().manual_seed(5)
    base = [_randn((6, 40), torch.float32, gen) for _ in range(4)]
    # A transposed parameter whose state shares its layout, and a strided slice.
    ours = dict(params=[base[0].t(), base[1][:, ::2]],
                grads=[_randn((6, 40), torch.float32, gen).t(), _randn((6, 20), torch.float32, gen)],
                exp_avgs=[torch.zeros(6, 40, device=DEV).t(), torch.zeros(6, 20, device=DEV)],
                exp_avg_sqs=[torch.zeros(6, 40, device=DEV).t(), torch.zeros(6, 20, device=DEV)],
                max_exp_avg_sqs=None,
                state_steps=[torch.tensor(0.0, device=DEV), torch.tensor(0.0, device=DEV)])
    ref = dict(ours)
    ref.update(params=[p.clone() for p in ours["params"]], grads=_clone(ours["grads"]),
               exp_avgs=_clone(ours["exp_avgs"]), exp_avg_sqs=_clone(ours["exp_avg_sqs"]),
               state_steps=_clone(ours["state_steps"]))
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    _run_adam(ops.adam_step_, ours, **kw)
    _run_adam(reference.adam_step_, ref, **kw)
    _assert_adam_close(ours, ref, torch.float32, False)


# ---- FusedAdam vs torch.optim.Adam ---------------------------------------------

SHAPES = [(0,), (1,), (3,), (7,), (64,), (65537,), (9, 33)]

OPTIM_VARIANTS = {
    "adam": (FusedAdam, torch.optim.Adam, dict()),
    "adam_wd": (FusedAdam, torch.optim.Adam, dict(weight_decay=0.1)),
    "amsgrad": (FusedAdam, torch.optim.Adam, dict(amsgrad=True)),
    "maximize": (FusedAdam, torch.optim.Adam, dict(maximize=True)),
    "gan_betas": (FusedAdam, torch.optim.Adam, dict(betas=(0.0, 0.999))),
    "adamw": (FusedAdamW, torch.optim.AdamW, dict(weight_decay=0.05)),
    "adamw_amsgrad": (FusedAdamW, torch.optim.AdamW, dict(weight_decay=0.05, amsgrad=True)),
}


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(_randn(s, dtype, gen)) for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("variant", list(OPTIM_VARIANTS))
def test_fused_adam_matches_torch_adam_20_steps(dtype, variant):
    ours_cls, torch_cls, kw = OPTIM_VARIANTS[variant]
    ours_p, torch_p = _params(dtype), _params(dtype)
    ours = ours_cls(ours_p, lr=1e-3, **kw)
    theirs = torch_cls(torch_p, lr=1e-3, foreach=False, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for a, b in zip(ours_p, torch_p):
            g = _randn(a.shape, dtype, gen)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(ours_p, torch_p):
        sa, sb = ours.state[a], theirs.state[b]
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kw.get("amsgrad") else ()):
            torch.testing.assert_close(sa[key], sb[key], **tol)
        assert float(sa["step"]) == float(sb["step"]) == 20.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["adam", "amsgrad", "adamw", "gan_betas"])
def test_fused_adam_low_precision_matches_reference_20_steps(dtype, variant):
    # torch.optim.Adam does its math in bf16/fp16 for such params; ours (and the
    # oracle's) is in fp32, rounded once per step, so the oracle is the baseline.
    ours_cls, _, kw = OPTIM_VARIANTS[variant]
    ours_p = _params(dtype)
    ref_p = [p.detach().clone() for p in _params(dtype)]
    opt = ours_cls(ours_p, lr=1e-3, **kw)
    group = opt.param_groups[0]
    amsgrad = group["amsgrad"]
    ref_state = dict(exp_avgs=[torch.zeros_like(p) for p in ref_p],
                     exp_avg_sqs=[torch.zeros_like(p) for p in ref_p],
                     max_exp_avg_sqs=[torch.zeros_like(p) for p in ref_p] if amsgrad else None,
                     state_steps=[torch.tensor(0.0, device=DEV) for _ in ref_p])
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [_randn(p.shape, dtype, gen) for p in ours_p]
        for p, g in zip(ours_p, grads):
            p.grad = g.clone()
        opt.step()
        reference.adam_step_(ref_p, grads, ref_state["exp_avgs"], ref_state["exp_avg_sqs"],
                             ref_state["state_steps"], lr=group["lr"], beta1=group["betas"][0],
                             beta2=group["betas"][1], eps=group["eps"],
                             weight_decay=group["weight_decay"], amsgrad=amsgrad,
                             max_exp_avg_sqs=ref_state["max_exp_avg_sqs"],
                             decoupled=group["decoupled_weight_decay"])
    # 20 roundings to the storage dtype: allow a couple of ulps.
    tol = dict(rtol=3e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=4e-3, atol=1e-4)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a.detach(), b, **tol)


def test_fused_adam_with_grad_scaler_skips_inf_steps():
    ours_p, torch_p = _params(torch.float32), _params(torch.float32)
    ours = FusedAdam(ours_p, lr=1e-3)
    theirs = torch.optim.Adam(torch_p, lr=1e-3, foreach=False)
    ours_scaler = torch.amp.GradScaler(DEV, init_scale=2.0 ** 8)
    torch_scaler = torch.amp.GradScaler(DEV, init_scale=2.0 ** 8)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        for scaler in (ours_scaler, torch_scaler):
            scaler.scale(torch.ones((), device=DEV))  # as for a loss: sets up the scale
        for a, b in zip(ours_p, torch_p):
            g = _randn(a.shape, torch.float32, gen) * ours_scaler.get_scale()
            if step == 2 and g.numel() > 3:
                g[3] = float("inf")  # this step must change nothing
            a.grad, b.grad = g.clone(), g.clone()
        before = [p.detach().clone() for p in ours_p]
        ours_scaler.step(ours)
        torch_scaler.step(theirs)
        ours_scaler.update()
        torch_scaler.update()
        if step == 2:
            assert all(torch.equal(p, q) for p, q in zip(ours_p, before))
    assert ours_scaler.get_scale() == torch_scaler.get_scale()
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_p, torch_p):
        assert float(ours.state[a]["step"]) == float(theirs.state[b]["step"]) == 5.0


# ---- scale, l2_norm, ema ------------------------------------------------------

def _tensors(dtype, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [_randn(n, dtype, gen) for n in sizes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_factor", [False, True])
def test_scale_matches_reference(dtype, tensor_factor):
    xs = _tensors(dtype)
    factor = torch.tensor(0.25, device=DEV) if tensor_factor else 0.375
    found, found_ref = torch.zeros((), device=DEV), torch.zeros((), device=DEV)
    out = ops.scale(xs, factor, found)
    expected = reference.scale(xs, factor, found_ref)
    _assert_lists_close(out, expected, dtype, "scale")
    assert found.item() == found_ref.item() == 0.0

    ys = _clone(xs)
    ops.scale_(ys, factor, found)
    _assert_lists_close(ys, expected, dtype, "scale_")
    assert found.item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_scale_detects_non_finite(dtype, bad):
    xs = _tensors(dtype)
    xs[-1][65536] = bad  # in the second chunk
    found = torch.zeros((), device=DEV)
    ops.scale_(_clone(xs), 2.0, found)
    assert found.item() == 1.0
    found = torch.zeros((), device=DEV)
    ops.scale(xs[:-1], 2.0, found)
    assert found.item() == 0.0


def test_scale_mixed_dtypes_and_strided():
    xs = [_tensors(d, [65537, 3], seed=i)[0] for i, d in enumerate(DTYPES)]
    strided = _tensors(torch.float32, [200])[0][::3]
    xs.append(strided)
    found = torch.zeros((), device=DEV)
    out = ops.scale(xs, 0.5, found)
    for o, x in zip(out, xs):
        torch.testing.assert_close(o, (x.to(torch.float64) * 0.5).to(x.dtype), **TOL[x.dtype])
    base = strided.clone()
    ops.scale_([strided], 4.0, found)
    torch.testing.assert_close(strided, base * 4.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.5, "tensor"])
def test_l2_norm_matches_reference(dtype, scale):
    xs = _tensors(dtype, SIZES + [200000])
    s = torch.tensor(0.125, device=DEV) if scale == "tensor" else scale
    total, per = ops.l2_norm(xs, s)
    total_ref, per_ref = reference.l2_norm(xs, s)
    assert total.dtype == per.dtype == torch.float32 and total.shape == ()
    assert per.shape == (len(xs),) and total.device.type == per.device.type == DEV
    torch.testing.assert_close(total, total_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(per, per_ref, rtol=1e-5, atol=0)
    assert per[0].item() == 0.0  # the empty tensor
    # Deterministic: the same bits on every call.
    total2, per2 = ops.l2_norm(xs, s)
    assert torch.equal(total, total2) and torch.equal(per, per2)


def test_l2_norm_found_inf_and_mixed_dtypes():
    xs = [_tensors(d, [70000], seed=i)[0] for i, d in enumerate(DTYPES)]
    found = torch.zeros((), device=DEV)
    total, per = ops.l2_norm(xs, 1.0, found)
    total_ref, per_ref = reference.l2_norm(xs, 1.0)
    torch.testing.assert_close(total, total_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(per, per_ref, rtol=1e-5, atol=0)
    assert found.item() == 0.0
    xs[2][69999] = float("nan")
    ops.l2_norm(xs, 1.0, found)
    assert found.item() == 1.0


def test_l2_norm_all_empty():
    total, per = ops.l2_norm([torch.empty(0, device=DEV), torch.empty(0, 3, device=DEV)])
    assert total.item() == 0.0 and per.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [0.0, 0.999, 1.0])
def test_ema_matches_reference(dtype, momentum):
    ema = _tensors(dtype, seed=1)
    params = _tensors(dtype, seed=2)
    ema_ref = _clone(ema)
    ops.ema_(ema, params, momentum)
    reference.ema_(ema_ref, params, momentum)
    _assert_lists_close(ema, ema_ref, dtype, "ema")


def test_ema_mixed_dtypes_and_layouts():
    ema = [_tensors(d, [65537], seed=i)[0] for i, d in enumerate(DTYPES)]
    params = [_tensors(d, [65537], seed=10 + i)[0] for i, d in enumerate(DTYPES)]
    gen = torch.Generator().manual_seed(4)
    ema.append(_randn((8, 16), torch.float32, gen).t())  # non-contiguous ema, contiguous param
    params.append(_randn((16, 8), torch.float32, gen))
    ema_ref = _clone(ema)
    ops.ema_(ema, params, 0.9)
    reference.ema_(ema_ref, params, 0.9)
    for e, r in zip(ema, ema_ref):
        torch.testing.assert_close(e, r, **TOL[e.dtype])


@pytest.mark.usefixtures("keep_small_cpu_grads")  # interpret mode: CPU tensors
def test_fused_adam_keeps_grads_as_exp_avg_with_beta1_zero():
    """beta1 == 0: the grad tensor becomes exp_avg and the kernel skips its store
    (tests/test_grad_as_exp_avg.py has the cases); equal to the copying path."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(40000,), (7,)]  # the small one is below the size that is kept
    keep = [torch.nn.Parameter(_randn(s, torch.float32, gen)) for s in shapes]
    copy = [torch.nn.Parameter(p.detach().clone()) for p in keep]
    opts = [FusedAdam(ps, lr=1e-2, betas=(0.0, 0.999)) for ps in (keep, copy)]
    opts[1].grad_as_exp_avg = False
    for step in range(3):
        grads = [_randn(s, torch.float32, gen) for s in shapes]
        for ps, opt in zip((keep, copy), opts):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        # Addresses, not references: a grad referenced elsewhere stays a grad
        # (copied). A kept grad's memory becomes its exp_avg's.
        given = [p.grad.data_ptr() for p in keep]
        for opt in opts:
            opt.step_and_zero_grad()  # releases the grads: they may become exp_avg
        assert [opts[0].state[p]["exp_avg"].data_ptr() == g for p, g in zip(keep, given)] == \
            [True, False]
        for a, b in zip(keep, copy):
            assert a.grad is None and torch.equal(a, b), step
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opts[0].state[a][key], opts[1].state[b][key]), (step, key)


def test_plain_training_steps_skip_the_exact_shared_memory_check():
    """The per-step check asks for the exact (sorting) check only where memory may
    be shared, e.g. memory whose deleter is not the device allocator's: on a GPU
    this shows that the CUDA allocator's tensors are recognised as its own (a
    miss would cost every step the exact check, not a wrong answer)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 128)).to(DEV)
    opt = FusedAdam(net.parameters(), lr=1e-3, betas=(0.0, 0.999))
    before = pygan_optim._ext._C.shared_memory_checks_run()
    for _ in range(3):
        net(torch.randn(8, 64, device=DEV)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(len(opt.state[p]) == 3 for p in net.parameters())
    assert pygan_optim._ext._C.shared_memory_checks_run() == before


def test_adam_step_advances_each_step_once_in_one_launch():
    """The update kernel reads each tensor's step in every chunk's block and the
    last reader advances it: tensors of 0, 1 and 4 chunks, mixed dtypes (one
    launch per dtype), a skipped step in between, all against the reference."""
    sizes = [0, 4 * 65536 - 3, 5, 65536]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float64]
    gen = torch.Generator().manual_seed(9)
    params = [_randn(n, d, gen) for n, d in zip(sizes, dtypes)]
    ours = dict(params=params, grads=[_randn(n, d, gen) for n, d in zip(sizes, dtypes)],
                exp_avgs=[torch.zeros_like(p) for p in params],
                exp_avg_sqs=[torch.zeros_like(p) for p in params], max_exp_avg_sqs=None,
                state_steps=[torch.tensor(0.0, device=DEV) for _ in sizes])
    ref = _copy_case(ours)
    skip, go = torch.ones(1, device=DEV), torch.zeros(1, device=DEV)
    for found_inf in (go, skip, go, go):
        ops.adam_step_(*(ours[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs",
                                          "state_steps")), lr=1e-2, beta1=0.9, beta2=0.999,
                       eps=1e-8, found_inf=found_inf)
        if found_inf is go:
            _run_adam(reference.adam_step_, ref, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    assert [s.item() for s in ours["state_steps"]] == [3.0] * 4
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, e, d in zip(ours[key], ref[key], dtypes):
            torch.testing.assert_close(a, e, **TOL[d])


# ---- 16-byte packs and the element-wise fallback --------------------------------

# Sizes around the pack widths (2, 4 and 8 elements for 8-, 4- and 2-byte dtypes)
# and the chunk size: tails of every length, a chunk boundary inside a tensor.
PACK_SIZES = [1, 7, 8, 9, 15, 65536 + 13, 2 * 65536 - 5]


def _at_offset(tensors, offset):
    """Copies of `tensors` that start `offset` elements into a larger buffer:
    offset 0 keeps torch's 16-byte aligned start, 1 breaks it for every dtype."""
    out = []
    for t in tensors:
        buf = torch.zeros(t.numel() + offset + 8, dtype=t.dtype, device=t.device)
        view = buf[offset:offset + t.numel()].view_as(t)
        view.copy_(t)
        out.append(view)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["adam", "amsgrad_zero_grads", "beta1_zero", "skipped"])
@pytest.mark.parametrize("misaligned", ["all", "grad", "exp_avg_sq"])
def test_adam_gives_the_same_bits_packed_and_element_wise(dtype, variant, misaligned):
    """A chunk whose streams all start 16-byte aligned moves them in packs, any
    other chunk element by element: the same element math, so the same bits.
    One misaligned stream is enough to take the element-wise path."""
    amsgrad = variant == "amsgrad_zero_grads"
    case = _adam_case(dtype, PACK_SIZES, amsgrad=amsgrad, seed=11)
    odd = _copy_case(case)
    keys = [k for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
            if odd[k] is not None]
    for key in keys if misaligned == "all" else [misaligned + "s"]:
        odd[key] = _at_offset(odd[key], 1)
    kw = dict(lr=1e-2, beta1=0.0 if variant == "beta1_zero" else 0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.1, zero_grads=amsgrad,
              found_inf=torch.ones((), device=DEV) if variant == "skipped" else None)
    if variant == "skipped":
        kw["zero_grads"] = True
    for c in (case, odd):
        _run_adam(ops.adam_step_, c, amsgrad=amsgrad, **kw)
    for key in keys + ["state_steps"]:
        for i, (a, b) in enumerate(zip(case[key], odd[key])):
            assert torch.equal(a, b), f"{key}[{i}] ({a.numel()} elements)"


def _scale_in_place(tensors, factor, found_inf):
    found_inf.zero_()
    ops.scale_(tensors, factor, found_inf=found_inf)
    return tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_and_ema_give_the_same_bits_packed_and_element_wise(dtype):
    gen = torch.Generator().manual_seed(12)
    xs = [_randn(n, dtype, gen) for n in PACK_SIZES]
    xs[-1][-1] = float("inf")  # in the last tail element
    expected = [x.clone() for x in xs]
    found = torch.zeros(1, device=DEV)
    ops.scale_(expected, 0.37, found_inf=found)  # aligned: packs
    assert found.item() == 1.0
    odd = _at_offset(xs, 1)
    for result in (ops.scale(odd, 0.37, found_inf=found),  # misaligned in, aligned out
                   _scale_in_place(odd, 0.37, found)):  # misaligned in and out
        assert found.item() == 1.0
        for a, b in zip(result, expected):
            assert torch.equal(a, b)
    params = [_randn(n, dtype, gen) for n in PACK_SIZES]
    ema = [_randn(n, dtype, gen) for n in PACK_SIZES]
    odd_ema = _at_offset(ema, 1)
    ops.ema_(ema, params, 0.9)
    ops.ema_(odd_ema, params, 0.9)
    for a, b in zip(ema, odd_ema):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_l2_norm_packed_and_element_wise_agree(dtype):
    """The two paths sum a chunk's squares in different orders per thread (each
    over at most 128 elements in op-math, then in double): they agree to the
    rounding of such sums."""
    gen = torch.Generator().manual_seed(13)
    xs = [_randn(n, dtype, gen) for n in PACK_SIZES]
    total, per_tensor = ops.l2_norm(xs)
    odd_total, odd_per_tensor = ops.l2_norm(_at_offset(xs, 1))
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=0)
    torch.testing.assert_close(odd_total, total, **tol)
    torch.testing.assert_close(odd_per_tensor, per_tensor, **tol)


# ---- CUDA graphs ----------------------------------------------------------------


def _captured(step):
    """`step` captured into a CUDA graph: returns what replays it. In interpret
    mode (DEV == "cpu") there is no graph: each "replay" runs `step` under
    cuda_interpret.capturing(), where any table upload is refused."""
    if DEV == "cpu":
        def replay():
            with cuda_interpret.capturing():
                step()
        return replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _on_side_stream(fn):
    """torch.cuda.graph wants warm-up work on a side stream (a no-op here on the CPU)."""
    if DEV == "cpu":
        return fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.parametrize("variant", ["gan_betas", "amsgrad", "adamw"])
def test_fused_adam_step_replays_from_a_cuda_graph(variant):
    """capturable=True: the step captured once and replayed with new grads
    (copied into the same grad tensors), a new lr (a tensor on the device) and
    AMP's grad_scale/found_inf (skipped replays included) follows
    torch.optim.Adam step by step."""
    cls, ref_cls, kw = OPTIM_VARIANTS[variant]
    ours = _params(torch.float32, seed=21)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    lr = torch.tensor(1e-2, device=DEV)
    opt = cls(ours, lr=lr, capturable=True, **kw)
    ref = ref_cls(theirs, lr=1e-2, foreach=False, **kw)
    gen = torch.Generator().manual_seed(22)
    grad_scale = torch.tensor(4.0, device=DEV)
    found_inf = torch.zeros((), device=DEV)
    for p in ours:
        p.grad = torch.zeros_like(p)

    def step():
        with opt.step_options(grad_scale=grad_scale, found_inf=found_inf):
            opt.step()

    def feed(k):
        """Grads, lr and the skip flag of step k, in place: what a graph replays on."""
        skip = k == 3
        for p, q in zip(ours, theirs):
            g = _randn(p.shape, torch.float32, gen)
            p.grad.copy_(g * 4.0)  # scaled, as AMP's backward leaves them
            q.grad = g
        lr.fill_(1e-2 / (k + 1))
        found_inf.fill_(1.0 if skip else 0.0)
        if not skip:
            for group in ref.param_groups:
                group["lr"] = 1e-2 / (k + 1)
            ref.step()

    for k in range(2):  # warm-up: state and device tables exist before the capture
        feed(k)
        _on_side_stream(step)
    replay = None
    for k in range(2, 7):
        feed(k)
        if replay is None:
            replay = _captured(step)  # captures, and (on a GPU) runs nothing yet
        replay()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        assert all(opt.state[p]["exp_avg"].data_ptr() != p.grad.data_ptr()
                   for p in ours if p.numel())  # a plain step never keeps a grad
    for p in ours:
        assert opt.state[p]["step"].item() == 6.0  # 7 fed, one skipped


def test_l2_norm_and_scale_replay_from_a_cuda_graph():
    """The plain ops find their tables from the warm-up call: a captured
    norm-and-clip replays with new values in the same tensors."""
    xs = _tensors(torch.float32, [5, 65537], seed=23)
    found_inf = torch.zeros(1, device=DEV)
    out = {}

    def clip():
        total, _ = ops.l2_norm(xs, found_inf=found_inf)
        ops.scale_(xs, torch.clamp(1.0 / (total + 1e-6), max=1.0), found_inf=found_inf)
        out["total"] = total

    _on_side_stream(clip)
    replay = _captured(clip)
    gen = torch.Generator().manual_seed(24)
    for _ in range(3):
        fresh = [_randn(x.shape, torch.float32, gen, scale=3.0) for x in xs]
        for x, f in zip(xs, fresh):
            x.copy_(f)
        replay()
        norm = torch.cat([f.double() for f in fresh]).norm()
        torch.testing.assert_close(out["total"].double(), norm, rtol=1e-6, atol=0)
        for x, f in zip(xs, fresh):
            torch.testing.assert_close(x, f / (norm.float() + 1e-6), rtol=1e-5, atol=1e-7)
        assert found_inf.item() == 0.0
