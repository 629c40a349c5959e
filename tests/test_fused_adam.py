"""FusedAdam / FusedAdamW against torch.optim.Adam / AdamW.

Oracle
------
``torch.optim.Adam`` / ``torch.optim.AdamW`` with ``foreach=False`` (torch's
for-loop implementation). Not ``fused=True``: torch 2.13's fused CPU Adam
mishandles parameters whose grad has other strides, which we test here.

Tolerances
----------
* Per step, derived from the arithmetic (``test_each_step_within_a_few_ulps_...``):
  FusedAdam does torch's fused CPU Adam's arithmetic in its order, so it is
  bit-identical to ``fused=True`` on one layout, and within ulp(p) + 4 eps |update|
  of the for-loop (whose sqrt op is not always correctly rounded).
* fp32 over many steps: those ulps compound through the state. After 25 steps we require
  ``rtol=1e-5`` with ``atol = 1e-6 * max|expected|`` (scaled per tensor, so
  the small ``exp_avg_sq`` values are held to the same relative standard as
  the parameters).
* fp64: the same algorithm in double: ``rtol=1e-12``.
* bf16 / fp16: torch's for-loop Adam on low-precision tensors rounds after
  every single op (lerp, mul, addcmul, sqrt, div, +eps; in fp16 eps=1e-8 even
  becomes 0 and the update turns inf/NaN), so it is no fair oracle. FusedAdam's
  contract (see ``pygan_optim.reference``) is fp32 math with ONE rounding to
  the storage dtype per step. The oracle for that is torch's fp32 for-loop Adam
  on an fp32 master copy whose parameters and state are rounded to the storage
  dtype after every step (``RoundedMaster``). Both compute the same fp32
  values up to a few fp32 ulps, so results may only differ where such a value
  straddles a rounding boundary of the storage dtype: we allow 2 storage ulps
  (``rtol = 2 * finfo.eps``) and require >= 99 % of the elements bitwise equal.
  lr is 1e-2 there so that updates are larger than a bf16 ulp (we assert the
  parameters did move).
"""
import copy
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import pygan_optim
from pygan_optim import FusedAdam, FusedAdamW

STEPS = 25
PAIRS = {"adam": (FusedAdam, torch.optim.Adam), "adamw": (FusedAdamW, torch.optim.AdamW)}


# ---- helpers ----------------------------------------------------------------

def grad_for(shape, dtype, step, index, scale=1.0):
    """A deterministic gradient, the same for both optimizers."""
    gen = torch.Generator().manual_seed(7919 * step + index)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def close(actual, expected, rtol=1e-5, atol_rel=1e-6, atol_floor=0.0):
    """assert_close with atol scaled to the expected tensor's magnitude (at least atol_floor)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=max(atol_rel * scale, atol_floor))


def assert_matches(ours_opt, ours, ref_opt, ref, rtol=1e-5, atol_rel=1e-6, param_atol=0.0):
    """Parameters and every state tensor of ours equal the oracle's; steps exactly.
    ``param_atol`` floors the parameters' absolute tolerance (see the property test)."""
    for a, b in zip(ours, ref):
        close(a.detach(), b.detach(), rtol, atol_rel, param_atol)
        sa, sb = ours_opt.state[a], ref_opt.state[b]
        assert sorted(sa) == sorted(sb)
        for key in sb:
            if key == "step":
                assert_close(sa[key], sb[key], rtol=0, atol=0)
            else:
                close(sa[key], sb[key], rtol, atol_rel)


def step_both(pairs, step, scale=1.0, skip=lambda step, i: False):
    """Gives (ours, ref) parameter pairs the same grads, None where skip() says."""
    for i, (a, b) in enumerate(pairs):
        if skip(step, i):
            a.grad = b.grad = None
        else:
            a.grad = grad_for(a.shape, a.dtype, step, i, scale)
            b.grad = a.grad.clone()


def run_pair(kind, shapes, kw, steps=STEPS, dtype=torch.float32, skip=lambda s, i: False):
    ours_cls, ref_cls = PAIRS[kind]
    ours, ref = make_params(shapes, dtype), make_params(shapes, dtype)
    o, t = ours_cls(ours, **kw()), ref_cls(ref, foreach=False, **kw())
    for s in range(steps):
        step_both(list(zip(ours, ref)), s, skip=skip)
        o.step()
        t.step()
    return o, ours, t, ref


def snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def assert_unchanged(opt, before):
    params, state = before
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(now, params))
    assert {id(p): sorted(s) for p, s in opt.state.items() if s} == \
        {k: sorted(v) for k, v in state.items() if v}
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k


class RoundedMaster:
    """Oracle for low-precision params: torch's fp32 (fp64) for-loop optimizer on a
    master copy, with params and state rounded to the storage dtype after each step."""

    def __init__(self, params, ref_cls, **kw):
        self.dtypes = [p.dtype for p in params]
        self.master = [nn.Parameter(p.detach().to(self._math(p.dtype))) for p in params]
        self.opt = ref_cls(self.master, foreach=False, **kw)

    @staticmethod
    def _math(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def step(self, grads):
        for m, g in zip(self.master, grads):
            m.grad = None if g is None else g.to(m.dtype)
        self.opt.step()
        for m, dt in zip(self.master, self.dtypes):
            m.copy_(m.to(dt).to(m.dtype))
            for k, v in self.opt.state[m].items():
                if k != "step":
                    v.copy_(v.to(dt).to(v.dtype))


def assert_low_precision_close(actual, expected):
    """actual (storage dtype) vs expected (rounded master): <= 2 ulps, >= 99% exact."""
    eps = torch.finfo(actual.dtype).eps
    got = actual.to(expected.dtype)
    assert_close(got, expected, rtol=2 * eps, atol=torch.finfo(actual.dtype).tiny)
    if expected.numel():
        assert (got == expected).float().mean().item() >= 0.99


# ---- numerics: option combinations, sizes, dtypes ------------------------------

def _lr(kind):
    return (lambda: 1e-2) if kind == "float" else (lambda: torch.tensor(1e-2))


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.999)], ids=["b1=0.9", "b1=0"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_every_option_combination(kind, amsgrad, maximize, weight_decay, betas, lr_kind):
    lr = _lr(lr_kind)

    def kw():
        return dict(lr=lr(), betas=betas, weight_decay=weight_decay, amsgrad=amsgrad,
                    maximize=maximize)

    shapes = [(), (7,), (64, 3), (1023,)]
    o, ours, t, ref = run_pair(kind, shapes, kw)
    assert_matches(o, ours, t, ref)
    assert not torch.equal(ours[3], make_params(shapes)[3])  # it did train


SIZES = [0, 1, 3, 7, 64, 1023, 4097, 65537, 2 * 65536 + 37]


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.99)], ids=["b1=0.9", "b1=0"])
@pytest.mark.parametrize("size", SIZES)
def test_sizes_around_chunk_and_vector_borders(size, betas):
    kw = lambda: dict(lr=1e-2, betas=betas, weight_decay=0.1, amsgrad=True)  # noqa: E731
    o, ours, t, ref = run_pair("adamw", [(size,)], kw, steps=20)
    assert_matches(o, ours, t, ref)
    assert o.state[ours[0]]["step"].item() == 20


def test_many_tensors_across_chunks_and_threads():
    shapes = [(65537,), (3,), (2 * 65536 + 37,), (0,), (4097,), (16,), (1, 70000)]
    kw = lambda: dict(lr=1e-3, amsgrad=True, weight_decay=0.05)  # noqa: E731
    o, ours, t, ref = run_pair("adam", shapes, kw, steps=20)
    assert_matches(o, ours, t, ref)


def test_thousands_of_tensors_with_uneven_steps():
    """Past 512 parameters the checks run on several threads, and each thread's
    kernels cache the coefficients of the step count they last saw: parameters
    that skipped steps (so their counts differ from their neighbours'), empty
    ones, and one of several chunks whose chunks land on different threads
    must all match torch, step counts exactly."""
    shapes = [((i * 7) % 13,) for i in range(1500)]
    shapes[700] = (2 * 65536 + 37,)
    skip = lambda step, i: i % 3 == 0 and step % 2 == 0 or i % 5 == 1 and step == 3  # noqa: E731
    o, ours, t, ref = run_pair("adam", shapes, lambda: dict(lr=1e-2), steps=6, skip=skip)
    assert_matches(o, ours, t, ref)
    assert {o.state[p]["step"].item() for p in ours} == {2.0, 3.0, 5.0, 6.0}


def test_result_does_not_depend_on_thread_count():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            o, ours, _, _ = run_pair("adam", [(2 * 65536 + 37,), (65537,)],
                                     lambda: dict(lr=1e-2, amsgrad=True), steps=3)
            results.append([p.detach().clone() for p in ours])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_float64_tight(kind):
    kw = lambda: dict(lr=torch.tensor(3e-3, dtype=torch.float64), weight_decay=0.1,  # noqa: E731
                      amsgrad=True, maximize=True)
    o, ours, t, ref = run_pair(kind, [(7,), (1023,), (65537,)], kw, dtype=torch.float64)
    assert_matches(o, ours, t, ref, rtol=1e-12, atol_rel=1e-14)
    assert all(o.state[p]["exp_avg"].dtype == torch.float64 for p in ours)


@pytest.mark.parametrize("config", [
    dict(kind="adam", lr=1e-2),
    dict(kind="adam", lr=1e-2, amsgrad=True, weight_decay=0.1),
    dict(kind="adamw", lr=1e-2, betas=(0.0, 0.999), maximize=True),
], ids=["adam", "adam-amsgrad-l2", "adamw-b1=0-max"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_rounded_fp32_master(dtype, config):
    config = dict(config)
    ours_cls, ref_cls = PAIRS[config.pop("kind")]
    shapes = [(7,), (4097,), (65537,)]
    ours = make_params(shapes, dtype)
    start = [p.detach().clone() for p in ours]
    oracle = RoundedMaster(ours, ref_cls, **config)
    o = ours_cls(ours, **config)
    for s in range(STEPS):
        grads = [grad_for(p.shape, dtype, s, i) for i, p in enumerate(ours)]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        o.step()
        oracle.step(grads)
    for p, m, p0 in zip(ours, oracle.master, start):
        assert p.dtype == dtype
        assert_low_precision_close(p.detach(), m.detach())
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in oracle.opt.state[m]:
                assert o.state[p][key].dtype == dtype
                assert_low_precision_close(o.state[p][key], oracle.opt.state[m][key])
        assert (p != p0).float().mean().item() > 0.5  # the updates were not rounded away


def test_mixed_dtypes_in_one_group():
    specs = [((4097,), torch.float32), ((7, 3), torch.float64), ((65537,), torch.bfloat16),
             ((1023,), torch.float16), ((3,), torch.float32)]
    gen = torch.Generator().manual_seed(3)
    ours = [nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s, dt in specs]
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    oracle = RoundedMaster(ours, torch.optim.AdamW, **kw)
    o = FusedAdamW(ours, **kw)
    for s in range(STEPS):
        grads = [grad_for(p.shape, p.dtype, s, i) for i, p in enumerate(ours)]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        o.step()
        oracle.step(grads)
    for p, m in zip(ours, oracle.master):
        if p.dtype in (torch.float32, torch.float64):
            tol = dict(rtol=1e-5, atol_rel=1e-6) if p.dtype == torch.float32 else \
                dict(rtol=1e-12, atol_rel=1e-14)
            close(p.detach(), m.detach(), **tol)
            for k, v in oracle.opt.state[m].items():
                if k != "step":
                    close(o.state[p][k], v, **tol)
        else:
            assert_low_precision_close(p.detach(), m.detach())
        assert o.state[p]["step"].item() == STEPS


# ---- per-step parity: bit for bit with torch fused, ulps from the for-loop -------

def wide_range_grads(shape, dtype, step, index):
    """Grads spanning ~10 orders of magnitude, many of them next to or below eps
    (as for a conv bias in front of a BatchNorm, whose true grad is zero)."""
    gen = torch.Generator().manual_seed(104729 * step + index)
    g = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 5)
    if dtype == torch.float16:  # finite in fp16 even when scaled by 1024
        g = g.clamp(-50, 50)
    return g.to(dtype)


def _uses_fma(ours: bool) -> bool:
    if ours:
        return pygan_optim.cpu_capability() != "default"
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


PARITY_OPTIONS = {
    "b1=0": dict(betas=(0.0, 0.999), eps=1e-6),
    "b1=0.5,wd": dict(betas=(0.5, 0.999), weight_decay=0.1),
    "b1=0.9,amsgrad,maximize": dict(amsgrad=True, maximize=True),
    "b1=0,amsgrad,wd": dict(betas=(0.0, 0.99), amsgrad=True, weight_decay=0.01),
}


# Steps 2-5 of a test run as steps 16626-16629: from 16628 on, sqrt(1 - 0.999^step)
# rounds to 1 in fp32 and the fp32 loops leave its divide out.
LATE_STEP = 16625


@pytest.mark.parametrize("late", [False, True], ids=["", "late_steps"])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "grad_scale"])
@pytest.mark.parametrize("options", list(PARITY_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_bit_for_bit_equal_to_torch_fused_cpu_adam(kind, dtype, options, scaled, late):
    """Ours does torch's fused CPU Adam's arithmetic in its order (FMAs where torch's
    vectorised loop has them, a divide by sqrt(bias_correction2), the coefficients
    rounded from double), so on tensors of one layout every step is bit-identical.
    Torch's last numel % 16 elements of each thread's range take a scalar tail that
    its compiler contracts differently: one thread and sizes in multiples of 64
    keep this test off those tails."""
    if _uses_fma(ours=True) != _uses_fma(ours=False):
        pytest.skip("torch's CPU capability and ours differ in FMA use "
                    f"({torch.backends.cpu.get_cpu_capability()} vs "
                    f"{pygan_optim.cpu_capability()})")
    ours_cls, ref_cls = PAIRS[kind]
    kw = dict(lr=1e-3, **PARITY_OPTIONS[options])
    shapes = [(64,), (32, 8), (4, 4, 4, 16), (3 * 65536 + 64,)]
    ours, ref = make_params(shapes, dtype), make_params(shapes, dtype)
    o, t = ours_cls(ours, **kw), ref_cls(ref, fused=True, **kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(5):
            for i, (a, b) in enumerate(zip(ours, ref)):
                a.grad = wide_range_grads(a.shape, dtype, step, i) * (1024 if scaled else 1)
                b.grad = a.grad.clone()
            if scaled:  # torch's GradScaler protocol for optimizers that unscale themselves
                for opt in (o, t):
                    opt.grad_scale = torch.tensor(1024.0)
                    opt.found_inf = torch.tensor(0.0)
            o.step()
            t.step()
            for a, b in zip(ours, ref):
                assert torch.equal(a, b), f"step {step}: param {tuple(a.shape)}"
                for key, value in t.state[b].items():
                    assert torch.equal(o.state[a][key].cpu(), value.cpu()), (step, key)
            if late and step == 0:
                for opt in (o, t):
                    for state in opt.state.values():
                        state["step"].fill_(LATE_STEP)
    finally:
        torch.set_num_threads(threads)


def same_bits(a: torch.Tensor, b: torch.Tensor, signed_zeros: bool = True) -> bool:
    """Equal bit patterns (-0.0 differs from 0.0 unless not `signed_zeros`), any NaN
    equal to any NaN."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    if not signed_zeros:
        return torch.equal(a[~nan], b[~nan])
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return torch.equal(a[~nan].view(ints), b[~nan].view(ints))


SPECIAL_OPTIONS = [  # (kind, options): every decay and grad-multiply path of the loops
    ("adam", dict(betas=(0.9, 0.999))),
    ("adam", dict(betas=(0.0, 0.999), eps=1e-6)),
    ("adam", dict(betas=(0.9, 0.999), weight_decay=0.1)),
    ("adam", dict(betas=(0.9, 0.999), maximize=True)),
    ("adamw", dict(betas=(0.0, 0.999), weight_decay=0.1)),
    ("adamw", dict(betas=(0.9, 0.999), weight_decay=0.0)),
]  # (Adam with L2 decay and beta1 == 0 is left out: an inf param gives an inf exp_avg,
#     where ours differs from torch by design, see adam_update in math.h.)


@pytest.mark.parametrize("scaled", [False, True], ids=["", "grad_scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind, options", SPECIAL_OPTIONS,
                         ids=[f"{k}-{o}" for k, o in SPECIAL_OPTIONS])
def test_inf_nan_and_signed_zero_params_match_torch_fused_bit_for_bit(kind, options, dtype,
                                                                     scaled):
    """Torch leaves out the weight-decay term when weight_decay == 0 (and the grad
    division without a grad scale). Doing it with a zero coefficient differs: an inf
    parameter's grad became NaN (param * 0), and with it exp_avg_sq and the parameter
    (inf in torch). Every element here lands on such a path: +-inf, NaN and +-0.0
    parameters, -0.0 and +0.0 grads, over steps with and without those values.
    With beta1 == 0 the sign of a zero exp_avg (and so of a zero parameter) may differ:
    ours keeps a -0.0 grad, torch's lerp gives +0.0 when the old exp_avg was negative."""
    if _uses_fma(ours=True) != _uses_fma(ours=False):
        pytest.skip("torch's CPU capability and ours differ in FMA use")
    ours_cls, ref_cls = PAIRS[kind]
    specials = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1.5, -2.0, 3e-39]
    n = 4096  # several vector widths of each special value (and the streamed path's size)
    base = torch.tensor(specials, dtype=dtype).repeat(n // len(specials))
    ours, ref = nn.Parameter(base.clone()), nn.Parameter(base.clone())
    o, t = ours_cls([ours], lr=1e-3, **options), ref_cls([ref], lr=1e-3, fused=True, **options)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's per-thread scalar tails (see the test above)
    try:
        for step in range(4):
            g = torch.randn(n, generator=torch.Generator().manual_seed(step), dtype=dtype)
            g[::3] = -0.0
            g[1::5] = 0.0
            ours.grad, ref.grad = g * (1024 if scaled else 1), g * (1024 if scaled else 1)
            if scaled:
                for opt in (o, t):
                    opt.grad_scale = torch.tensor(1024.0)
                    opt.found_inf = torch.tensor(0.0)
            o.step()
            t.step()
            signed = options["betas"][0] != 0
            assert same_bits(ours.detach(), ref.detach(), signed), f"step {step}: param"
            for key, value in t.state[ref].items():
                assert same_bits(o.state[ours][key], value, signed), f"step {step}: {key}"
    finally:
        torch.set_num_threads(threads)


def _stepped_pair(kind, state_edit, n=1024, **options):
    """Ours and torch's fused optimizer after one step each, `state_edit(state)`
    applied to both states, then two more steps (callers run on one thread:
    no scalar tails)."""
    if _uses_fma(ours=True) != _uses_fma(ours=False):
        pytest.skip("torch's CPU capability and ours differ in FMA use")
    ours_cls, ref_cls = PAIRS[kind]
    base = torch.randn(n, generator=torch.Generator().manual_seed(0))
    ours, ref = nn.Parameter(base.clone()), nn.Parameter(base.clone())
    o, t = ours_cls([ours], lr=1e-3, **options), ref_cls([ref], lr=1e-3, fused=True, **options)
    for step in range(3):
        g = torch.randn(n, generator=torch.Generator().manual_seed(step + 1))
        ours.grad, ref.grad = g.clone(), g.clone()
        o.step()
        t.step()
        if step == 0:
            state_edit(o.state[ours])
            state_edit(t.state[ref])
    return o.state[ours], ours.detach(), t.state[ref], ref.detach()


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_a_float32_step_count_stuck_at_2_24_is_used_as_torch_uses_it(kind, one_thread):
    """torch adds 1 to its float32 step tensor and reads the sum: from 2^24 on
    that is 2^24 again. With betas this close to 1 the bias corrections still
    differ from 1 there, so a count read as 2^24 + 1 moves some results by an
    ulp (about 1 in 100 elements: 65536 of them here)."""
    def at_2_24(state):
        state["step"].fill_(2.0 ** 24)

    ours_state, ours, ref_state, ref = _stepped_pair(
        kind, at_2_24, n=65536, betas=(0.9999999, 0.9999999))
    assert float(ours_state["step"]) == float(ref_state["step"]) == 2.0 ** 24
    assert same_bits(ours, ref)
    for key in ("exp_avg", "exp_avg_sq"):
        assert same_bits(ours_state[key], ref_state[key]), key


def test_amsgrad_keeps_a_nan_max_exp_avg_sq_as_torch_does(one_thread):
    """torch's maximum propagates a NaN from either side (a state loaded or
    edited so): the parameter becomes NaN there."""
    def nan_max(state):
        state["max_exp_avg_sq"][::7] = float("nan")

    ours_state, ours, ref_state, ref = _stepped_pair("adam", nan_max, amsgrad=True)
    assert ref.isnan().sum() > 100  # what the test is about
    assert same_bits(ours, ref)
    assert same_bits(ours_state["max_exp_avg_sq"], ref_state["max_exp_avg_sq"])


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of floating-point numbers at |x|."""
    return torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs()


@pytest.mark.parametrize("options", list(PARITY_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_each_step_within_a_few_ulps_of_the_for_loop(kind, dtype, options):
    """From the same state, one step of ours and of torch's for-loop Adam. The two
    evaluate the same expression with the same roundings except that torch's sqrt
    op is not always correctly rounded (1 ulp). That puts the denominator within
    about 2 eps (relative), the update u = -step_size * exp_avg / denom within 3
    eps, and the parameter, after each rounds p + u, within ulp(p) + 3 eps |u|:
    asserted as ulp(p) + 4 eps |u|. exp_avg and exp_avg_sq are rounded the same
    way on both sides: 1 ulp allowed. Any size (vector tails), any thread count;
    the state is re-synchronised after each step so every step is checked alone."""
    ours_cls, ref_cls = PAIRS[kind]
    kw = dict(lr=1e-3, **PARITY_OPTIONS[options])
    shapes = [(), (7,), (1023,), (2 * 65536 + 37,)]
    ours, ref = make_params(shapes, dtype), make_params(shapes, dtype)
    o, t = ours_cls(ours, **kw), ref_cls(ref, foreach=False, **kw)
    eps = torch.finfo(dtype).eps
    for step in range(6):
        before = [b.detach().clone() for b in ref]
        for i, (a, b) in enumerate(zip(ours, ref)):
            a.grad = wide_range_grads(a.shape, dtype, step, i)
            b.grad = a.grad.clone()
        o.step()
        t.step()
        for a, b, p0 in zip(ours, ref, before):
            update = (b.detach() - p0).abs()
            bound = ulp(b.detach()) + 4 * eps * update
            excess = (a.detach() - b.detach()).abs() - bound
            assert excess.max().item() <= 0, f"step {step}, shape {tuple(a.shape)}"
            for key, value in t.state[b].items():
                if key == "step":
                    assert o.state[a][key].item() == value.item()
                else:
                    diff = (o.state[a][key] - value).abs()
                    assert (diff <= ulp(value)).all(), (step, key)
            with torch.no_grad():  # next step from the same state on both sides
                a.copy_(b)
                for key, value in t.state[b].items():
                    o.state[a][key].copy_(value)


# ---- memory layouts ------------------------------------------------------------

def _layout(name, seed):
    """(param, grad factory) for one layout case; same values for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    if name == "transposed_param":
        return nn.Parameter(torch.randn(7, 5, generator=gen).t()), lambda g: g.contiguous()
    if name == "transposed_both":
        return nn.Parameter(torch.randn(7, 5, generator=gen).t()), \
            lambda g: g.t().contiguous().t()
    if name == "gapped_param":
        return nn.Parameter(torch.randn(10, 24, generator=gen)[:, ::2]), lambda g: g.contiguous()
    if name == "transposed_grad":
        return nn.Parameter(torch.randn(5, 7, generator=gen)), lambda g: g.t().contiguous().t()
    if name == "gapped_grad":
        def gapped(g):
            out = torch.full((g.shape[0], 2 * g.shape[1]), float("nan"))
            out[:, ::2] = g
            return out[:, ::2]
        return nn.Parameter(torch.randn(10, 12, generator=gen)), gapped
    w = torch.randn(8, 4, 3, 3, generator=gen)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    if name == "channels_last_param":
        return nn.Parameter(cl(w)), lambda g: g.contiguous()
    if name == "channels_last_grad":
        return nn.Parameter(w), cl
    assert name == "channels_last_both"
    return nn.Parameter(cl(w)), cl


LAYOUTS = ["transposed_param", "transposed_both", "gapped_param", "transposed_grad",
           "gapped_grad", "channels_last_param", "channels_last_grad", "channels_last_both"]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_params_and_grads(layout, amsgrad):
    a, make_grad = _layout(layout, 0)
    b, _ = _layout(layout, 0)
    # The elements between the columns of a gapped param belong to no one.
    gaps = (lambda: torch.as_strided(a.detach(), (10, 12), (24, 2), a.storage_offset() + 1)) \
        if layout == "gapped_param" else None
    gaps_before = gaps().clone() if gaps else None
    ptr, strides = a.data_ptr(), a.stride()
    o = FusedAdam([a], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    t = torch.optim.Adam([b], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, foreach=False)
    for s in range(STEPS):
        g = grad_for(a.shape, a.dtype, s, 0)
        a.grad, b.grad = make_grad(g), make_grad(g)
        o.step()
        t.step()
    assert_matches(o, [a], t, [b])
    assert (a.data_ptr(), a.stride()) == (ptr, strides)  # updated in place
    for key, v in o.state[a].items():
        if key != "step":
            assert v.stride() == t.state[b][key].stride(), key
    if gaps:
        assert torch.equal(gaps(), gaps_before)


# ---- missing grads, param groups ----------------------------------------------

def test_missing_grads_leave_param_and_state_alone():
    shapes = [(7,), (64,), (4097,)]
    ours, ref = make_params(shapes), make_params(shapes)
    o = FusedAdam(ours, lr=1e-2, amsgrad=True, weight_decay=0.1)
    t = torch.optim.Adam(ref, lr=1e-2, amsgrad=True, weight_decay=0.1, foreach=False)
    # param 2 has no grad for the first 5 steps; the others skip every third step
    skip = lambda s, i: (s < 5) if i == 2 else (s + i) % 3 == 0  # noqa: E731
    for s in range(STEPS):
        step_both(list(zip(ours, ref)), s, skip=skip)
        before = [(p.detach().clone(), {k: v.clone() for k, v in o.state[p].items()})
                  for p in ours]
        o.step()
        t.step()
        for i, (p, (p0, st0)) in enumerate(zip(ours, before)):
            assert len(o.state[p]) == len(t.state[ref[i]])
            if skip(s, i):
                assert torch.equal(p, p0)
                assert st0.keys() == o.state[p].keys()
                assert all(torch.equal(o.state[p][k], v) for k, v in st0.items())
    assert_matches(o, ours, t, ref)
    assert o.state[ours[2]]["step"].item() == STEPS - 5


def _groups(params, lr_tensor=torch.tensor):
    return [
        {"params": params[0:1]},
        {"params": params[1:3], "lr": lr_tensor(3e-3), "betas": (0.0, 0.99), "amsgrad": True,
         "weight_decay": 0.2},
        {"params": params[3:], "lr": 2e-2, "eps": 1e-6, "maximize": True, "weight_decay": 0.05,
         "decoupled_weight_decay": True},
    ]


def test_param_groups_and_add_param_group_mid_training():
    shapes = [(5,), (64,), (3, 3), (1023,), (), (20,)]
    ours, ref = make_params(shapes), make_params(shapes)
    o = FusedAdam(_groups(ours[:4]), lr=1e-2)
    t = torch.optim.Adam(_groups(ref[:4]), lr=1e-2, foreach=False)
    pairs = list(zip(ours, ref))
    for s in range(10):
        step_both(pairs[:4], s)
        o.step()
        t.step()
    assert_matches(o, ours[:4], t, ref[:4])
    o.add_param_group({"params": ours[4:], "lr": 5e-2, "amsgrad": True, "betas": (0.5, 0.9)})
    t.add_param_group({"params": ref[4:], "lr": 5e-2, "amsgrad": True, "betas": (0.5, 0.9)})
    hyper = lambda g: {k: v for k, v in g.items() if k not in ("params", "foreach")}  # noqa: E731
    assert [hyper(g) for g in o.param_groups] == [hyper(g) for g in t.param_groups]
    for s in range(10, STEPS):
        step_both(pairs, s)
        o.step()
        t.step()
    assert_matches(o, ours, t, ref)
    assert o.state[ours[5]]["step"].item() == STEPS - 10


def _surgery(kind, opt, checkpoint):
    """Edits people make to an optimizer between steps; done the same way to both."""
    group = opt.param_groups[0]
    if kind == "replace_param":  # pruning as in 3D Gaussian Splatting: new tensor, cut state
        old = group["params"][1]
        new = nn.Parameter(old.detach()[:40].clone())
        state = opt.state.pop(old)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            state[k] = state[k][:40].clone()
        group["params"][1] = new
        opt.state[new] = state
    elif kind == "reset_state":
        del opt.state[group["params"][0]]
    elif kind == "replace_state_tensor":
        state = opt.state[group["params"][2]]
        state["exp_avg"] = state["exp_avg"] * 0.5
        state["step"] = torch.tensor(2.0)
    elif kind == "hyper_parameters":
        group.update(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.2, maximize=True, amsgrad=False)
    elif kind == "swap_param_data":
        p = group["params"][0]
        p.data = p.data.flip(0).contiguous()  # new storage, same Parameter
    else:
        assert kind == "load_state_dict"
        opt.load_state_dict(copy.deepcopy(checkpoint))
        if not isinstance(opt, FusedAdam):
            opt.param_groups[0]["foreach"] = False


@pytest.mark.parametrize("kind", ["replace_param", "reset_state", "replace_state_tensor",
                                  "hyper_parameters", "swap_param_data", "load_state_dict"])
def test_edits_between_steps_are_seen(kind):
    shapes = [(7,), (64,), (3, 5)]
    ours, ref = make_params(shapes), make_params(shapes)
    o = FusedAdam(ours, lr=1e-2, amsgrad=True)
    t = torch.optim.Adam(ref, lr=1e-2, amsgrad=True, foreach=False)
    checkpoint = None
    for s in range(10):
        step_both(list(zip(ours, ref)), s)
        o.step()
        t.step()
        if s == 4:
            checkpoint = copy.deepcopy(t.state_dict())
    _surgery(kind, o, checkpoint)
    _surgery(kind, t, checkpoint)
    ours, ref = o.param_groups[0]["params"], t.param_groups[0]["params"]
    for s in range(10, STEPS):
        step_both(list(zip(ours, ref)), s)
        o.step()
        t.step()
    assert_matches(o, ours, t, ref)
    assert [len(o.state[p]) for p in ours] == [len(t.state[p]) for p in ref]


@pytest.mark.parametrize("how", ["update", "setdefault", "ior"])
def test_state_edits_through_any_dict_method_are_seen(how):
    ours, ref = make_params([(5,), (3,)]), make_params([(5,), (3,)])
    o = FusedAdam(ours, lr=1e-2)
    t = torch.optim.Adam(ref, lr=1e-2, foreach=False)
    pairs = list(zip(ours, ref))
    for s in range(STEPS):
        step_both(pairs, s)
        o.step()
        t.step()
        for opt, p in ((o, ours[0]), (t, ref[0])):
            if s == 9 and how == "update":
                opt.state.update({p: dict(opt.state[p])})
            elif s == 9 and how == "setdefault":
                opt.state.setdefault(p, dict(opt.state.pop(p)))
            elif s == 12:  # a later edit of that entry
                entry = opt.state[p]
                if how == "ior":
                    entry |= {"exp_avg": entry["exp_avg"] * 0.5}
                else:
                    entry["exp_avg"] = entry["exp_avg"] * 0.5
    assert_matches(o, ours, t, ref)


# ---- state_dict ------------------------------------------------------------------

def _trained(which, kind, shapes, kw, steps):
    ours_cls, ref_cls = PAIRS[kind]
    params = make_params(shapes)
    opt = ours_cls(params, **kw()) if which == "ours" else ref_cls(params, foreach=False, **kw())
    for s in range(steps):
        for i, p in enumerate(params):
            p.grad = grad_for(p.shape, p.dtype, s, i)
        opt.step()
    return opt, params


def test_state_dict_layout_equals_torch():
    shapes = [(3, 4), (7,), (0,)]
    kw = lambda: dict(lr=1e-2, amsgrad=True)  # noqa: E731
    for kind in PAIRS:
        o, _ = _trained("ours", kind, shapes, kw, 3)
        t, _ = _trained("torch", kind, shapes, kw, 3)
        so, st_ = o.state_dict(), t.state_dict()
        assert [sorted(g) for g in so["param_groups"]] == [sorted(g) for g in st_["param_groups"]]
        hyper = lambda g: {k: v for k, v in g.items() if k != "foreach"}  # noqa: E731
        assert [hyper(g) for g in so["param_groups"]] == [hyper(g) for g in st_["param_groups"]]
        assert sorted(so["state"]) == sorted(st_["state"]) == [0, 1, 2]
        for i in st_["state"]:
            assert sorted(so["state"][i]) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
            step = so["state"][i]["step"]
            assert torch.is_tensor(step) and step.dim() == 0 and step.dtype == torch.float32
            assert step.item() == st_["state"][i]["step"].item() == 3
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                v, w = so["state"][i][k], st_["state"][i][k]
                assert (v.shape, v.dtype, v.device) == (w.shape, w.dtype, w.device)


def _reload(cls, params, state_dict, **kw):
    opt = cls(params, **kw)
    opt.load_state_dict(state_dict)
    if not isinstance(opt, FusedAdam):
        for g in opt.param_groups:  # the oracle stays on torch's for-loop path
            g["foreach"], g["fused"] = False, None
    return opt


def _checkpoint(opt):
    """What a checkpoint holds: a copy (state_dict() returns the live tensors)."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("config", [
    ("adam", lambda: dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("adamw", lambda: dict(lr=torch.tensor(1e-2), betas=(0.0, 0.999), maximize=True)),
], ids=["adam-amsgrad", "adamw-lr-tensor"])
@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch", "ours->ours"])
def test_state_dict_round_trip(direction, config):
    kind, kw = config
    ours_cls, ref_cls = PAIRS[kind]
    shapes = [(7,), (3, 5), (1023,)]
    source = "torch" if direction.startswith("torch") else "ours"
    first, params = _trained(source, kind, shapes, kw, 10)
    ckpt = _checkpoint(first)
    # Oracle: torch trained 10 steps, then 15 more, never reloaded.
    t, ref = _trained("torch", kind, shapes, kw, 10)
    resumed = make_params(shapes)
    with torch.no_grad():
        for r, p in zip(resumed, params):
            r.copy_(p)
    dest_cls = ref_cls if direction.endswith("torch") else ours_cls
    extra = dict(foreach=False) if dest_cls is ref_cls else {}
    d = _reload(dest_cls, resumed, ckpt, **kw(), **extra)
    if dest_cls is ours_cls:
        assert sorted(d.state[resumed[0]]) == sorted(t.state[ref[0]])
    for s in range(10, STEPS):
        step_both(list(zip(resumed, ref)), s)
        d.step()
        t.step()
    assert_matches(d, resumed, t, ref)


# ---- LR schedulers -----------------------------------------------------------

@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("scheduler", ["StepLR", "LambdaLR"])
def test_torch_lr_schedulers(scheduler, lr_kind):
    make = {"StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
            "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1 / (1 + e))}
    lr = _lr(lr_kind)
    ours, ref = make_params([(64,), (5,)]), make_params([(64,), (5,)])
    o = FusedAdam(ours, lr=lr(), amsgrad=True)
    t = torch.optim.Adam(ref, lr=lr(), amsgrad=True, foreach=False)
    so, st_ = make[scheduler](o), make[scheduler](t)
    lrs = []
    for s in range(STEPS):
        step_both(list(zip(ours, ref)), s)
        o.step()
        t.step()
        so.step()
        st_.step()
        assert so.get_last_lr() == st_.get_last_lr()
        lrs.append(float(o.param_groups[0]["lr"]))
    assert lrs[-1] < lrs[0]
    assert_matches(o, ours, t, ref)


def test_mmengine_multistep_lr_on_optim_wrapper():
    from mmengine.optim import MultiStepLR, OptimWrapper

    ours, ref = make_params([(64,), (5,)]), make_params([(64,), (5,)])
    wo = OptimWrapper(optimizer=FusedAdam(ours, lr=1e-2))
    wt = OptimWrapper(optimizer=torch.optim.Adam(ref, lr=1e-2, foreach=False))
    so = MultiStepLR(wo, milestones=[5, 12], gamma=0.1, by_epoch=False)
    st_ = MultiStepLR(wt, milestones=[5, 12], gamma=0.1, by_epoch=False)
    target = [torch.randn(64), torch.randn(5)]
    for _ in range(20):
        for w, ps, sched in ((wo, ours, so), (wt, ref, st_)):
            loss = sum(((p - x) ** 2).sum() for p, x in zip(ps, target))
            w.update_params(loss)
            sched.step()
        assert wo.get_lr() == wt.get_lr()
    assert wo.get_lr()["lr"][0] == pytest.approx(1e-4)
    assert_matches(wo.optimizer, ours, wt.optimizer, ref)


# ---- GradScaler ------------------------------------------------------------------

def _model(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _scaled_step(model, opt, scaler, x, poison=None, clip=None):
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    if poison is not None:
        model[0].weight.grad[0, 0] = poison
    if clip is not None:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("clip", [None, 0.05], ids=["plain", "unscale_+clip"])
def test_grad_scaler_matches_torch_and_skips_inf_steps(clip):
    assert FusedAdam._step_supports_amp_scaling
    mo, mt = _model(), _model()
    # L2 weight decay makes the update depend on the grads' scale: a missed unscale shows.
    o = FusedAdam(mo.parameters(), lr=1e-2, amsgrad=True, weight_decay=0.1)
    t = torch.optim.Adam(mt.parameters(), lr=1e-2, amsgrad=True, weight_decay=0.1,
                         foreach=False)
    so, st_ = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 6, generator=gen) for _ in range(STEPS)]
    for s, x in enumerate(xs[:20]):
        _scaled_step(mo, o, so, x, clip=clip)
        _scaled_step(mt, t, st_, x, clip=clip)
    assert_matches(o, list(mo.parameters()), t, list(mt.parameters()))
    # A step with inf / NaN grads: nothing moves, the scale backs off.
    for poison in (float("inf"), float("nan")):
        before, scale = snapshot(o), so.get_scale()
        _scaled_step(mo, o, so, xs[20], poison=poison, clip=clip)
        _scaled_step(mt, t, st_, xs[20], poison=poison, clip=clip)
        assert_unchanged(o, before)
        assert so.get_scale() == scale * 0.5 == st_.get_scale()
    for x in xs[21:]:
        _scaled_step(mo, o, so, x, clip=clip)
        _scaled_step(mt, t, st_, x, clip=clip)
    assert_matches(o, list(mo.parameters()), t, list(mt.parameters()))
    assert o.state[next(mo.parameters())]["step"].item() == STEPS - 1


@pytest.mark.parametrize("options", [dict(release_grads=True), dict(zero_grads=True)])
def test_grad_scaler_step_inside_step_options_matches_torch(options):
    """GradScaler sets (and then deletes) the optimizer's grad_scale and
    found_inf itself: step_options must leave them for it to set, and a
    scaled update never keeps its grads as exp_avg."""
    mo, mt = _model(), _model()
    o = FusedAdam(mo.parameters(), lr=1e-2, betas=(0.0, 0.999))
    o.keep_grad_min_bytes_cpu = 0
    t = torch.optim.Adam(mt.parameters(), lr=1e-2, betas=(0.0, 0.999), foreach=False)
    so, st_ = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 6, generator=gen)
        for model, opt, scaler in ((mo, o, so), (mt, t, st_)):
            scaler.scale(model(x).pow(2).mean()).backward()
        with o.step_options(**options):
            so.step(o)
        so.update()
        st_.step(t)
        st_.update()
        t.zero_grad(set_to_none="release_grads" in options)
        assert not hasattr(o, "grad_scale") and not hasattr(o, "found_inf")
        for p in mo.parameters():
            assert p.grad is None if "release_grads" in options else not p.grad.any()
    assert_matches(o, list(mo.parameters()), t, list(mt.parameters()))


# ---- bad input -----------------------------------------------------------------

@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW])
def test_empty_param_list(cls):
    with pytest.raises(ValueError, match="empty"):
        cls([])


@pytest.mark.parametrize("kwargs, shown", [
    (dict(lr=-0.5), "-0.5"),
    (dict(lr=torch.tensor(-0.25)), "-0.25"),
    (dict(betas=(1.0, 0.999)), "1.0"),
    (dict(betas=(-0.1, 0.999)), "-0.1"),
    (dict(betas=(0.9, 1.5)), "1.5"),
    (dict(eps=-1e-8), "-1e-08"),
    (dict(weight_decay=-0.125), "-0.125"),
])
@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW])
def test_invalid_hyper_parameters_are_named(cls, kwargs, shown):
    with pytest.raises(ValueError) as info:
        cls([nn.Parameter(torch.randn(3))], **kwargs)
    assert shown in str(info.value)


def test_multi_element_lr_tensor_is_a_value_error():
    with pytest.raises(ValueError, match="one element|1-element"):
        FusedAdam([nn.Parameter(torch.randn(3))], lr=torch.tensor([1e-3, 2e-3]))


def test_invalid_hyper_parameter_set_later_refuses_the_step():
    a, b = make_params([(4,), (5,)])
    o = FusedAdam([{"params": [a]}, {"params": [b]}], lr=1e-2)
    a.grad, b.grad = torch.randn(4), torch.randn(5)
    o.step()
    o.param_groups[1]["lr"] = -0.375
    before = snapshot(o)
    with pytest.raises(ValueError, match="-0.375"):
        o.step()
    assert_unchanged(o, before)


def _set_bad_grad(p, bad):
    if bad == "sparse":
        p.grad = torch.randn(p.shape).to_sparse()
    elif bad == "dtype":
        p.grad = torch.randn(p.shape)
        p.grad.data = p.grad.data.double()  # the .grad setter would refuse this
    elif bad == "shape":
        p.grad = torch.randn(p.shape)
        p.grad.data = torch.randn(p.shape[0] + 1, *p.shape[1:])


@pytest.mark.parametrize("bad, words", [
    ("sparse", ["sparse"]),
    ("dtype", ["torch.float64", "torch.float32"]),
    ("shape", ["(5, 3)", "(4, 3)"]),
])
def _refused_setup(bad):
    """Group 0 fine (with state), group 1's only param has a bad grad; returns the
    optimizer and a group-0 param that gets its first grad in the refused step."""
    good = make_params([(6,), (4097,)], seed=1)
    fresh, target = make_params([(2,), (4, 3)], seed=2)
    o = FusedAdam([{"params": good + [fresh]}, {"params": [target], "amsgrad": True}], lr=1e-2)
    for s in range(3):
        for i, p in enumerate(good + [target]):
            p.grad = grad_for(p.shape, p.dtype, s, i)
        o.step()
    fresh.grad = torch.randn(2)
    for i, p in enumerate(good):
        p.grad = grad_for(p.shape, p.dtype, 9, i)
    _set_bad_grad(target, bad)
    return o, fresh


BAD_GRADS = [("sparse", ["sparse"]),
             ("dtype", ["torch.float64", "torch.float32"]),
             ("shape", ["(5, 3)", "(4, 3)"])]


@pytest.mark.parametrize("bad, words", BAD_GRADS)
def test_bad_grad_refuses_the_whole_step(bad, words):
    o, fresh = _refused_setup(bad)
    params_before = [p.detach().clone() for g in o.param_groups for p in g["params"]]
    state_before = {p: {k: v.clone() for k, v in s.items()} for p, s in o.state.items() if s}
    with pytest.raises(RuntimeError) as info:
        o.step()
    message = str(info.value)
    for word in ["parameter 0", "param group 1", "(4, 3)"] + words:
        assert word in message, (word, message)
    now = [p.detach() for g in o.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(now, params_before))
    for p, s in state_before.items():
        assert s.keys() == o.state[p].keys()
        assert all(torch.equal(o.state[p][k], v) for k, v in s.items())


@pytest.mark.parametrize("bad", [b for b, _ in BAD_GRADS])
def test_refused_step_creates_no_state(bad):
    # torch creates a parameter's state lazily in the step that first uses it;
    # a refused step uses none, so no state_dict entry may appear.
    o, fresh = _refused_setup(bad)
    before = snapshot(o)
    with pytest.raises(RuntimeError):
        o.step()
    assert_unchanged(o, before)
    assert len(o.state.get(fresh, {})) == 0


def test_step_refused_by_the_kernel_changes_no_group():
    # An integer lr tensor passes the Python checks; torch accepts it. Whether
    # FusedAdam accepts it too or its op refuses it, group 0 must not be half-done.
    a, b = make_params([(4,), (4,)])
    o = FusedAdam([{"params": [a]}, {"params": [b], "lr": torch.tensor(1)}], lr=1e-2)
    t = torch.optim.Adam([a.detach().clone().requires_grad_()], lr=1e-2, foreach=False)
    a.grad, b.grad = torch.randn(4), torch.randn(4)
    t.param_groups[0]["params"][0].grad = a.grad.clone()
    before = snapshot(o)
    try:
        o.step()
    except RuntimeError:
        assert_unchanged(o, before)  # refused: nothing may have changed
    else:  # accepted (as torch accepts an integer lr tensor): group 0 as torch
        t.step()
        close(a.detach(), t.param_groups[0]["params"][0].detach())


@pytest.mark.parametrize("edit", ["amsgrad_on", "int_step", "number_step"])
def test_a_refused_step_undoes_what_it_completed_in_existing_states(edit):
    """Building the plans completes existing states (a max_exp_avg_sq once amsgrad is
    switched on, a float step tensor for a loaded one); a step refused in a later
    group must take that back too."""
    a, b = make_params([(5,), (4, 3)])
    o = FusedAdam([{"params": [a]}, {"params": [b]}], lr=1e-2)
    for _ in range(2):
        a.grad, b.grad = torch.randn(5), torch.randn(4, 3)
        o.step()
    if edit == "amsgrad_on":
        o.param_groups[0]["amsgrad"] = True
    else:
        o.state[a]["step"] = torch.tensor(2) if edit == "int_step" else 2.0
    before = dict(o.state[a])
    a.grad, b.grad = torch.randn(5), torch.randn(4, 3)
    b.grad.data = torch.randn(5, 3)  # refused in group 1
    with pytest.raises(RuntimeError, match="param group 1"):
        o.step()
    assert o.state[a].keys() == before.keys()
    assert all(o.state[a][k] is v for k, v in before.items())
    b.grad = torch.randn(4, 3)
    o.step()  # the next step completes them again
    assert ("max_exp_avg_sq" in o.state[a]) == (edit == "amsgrad_on")
    assert o.state[a]["step"].dtype == torch.float32 and float(o.state[a]["step"]) == 3.0


@pytest.mark.parametrize("how", ["storage freed", "complex data"])
def test_a_parameter_without_a_grad_is_skipped_whatever_it_holds(how):
    """As torch's Adam: a parameter without a grad this step (FSDP-style freed
    storage, or data it could not update) is not looked at. Oracles: the same step
    with that parameter intact (bit for bit) and torch's fused Adam (whose scalar
    tails may round differently: `close`)."""
    results = []
    for make, broken in ((lambda ps: FusedAdam(ps, lr=1e-2), True),
                         (lambda ps: FusedAdam(ps, lr=1e-2), False),
                         (lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), True)):
        a, b = make_params([(5,), (6,)])
        opt = make([a, b])
        g = torch.Generator().manual_seed(3)
        a.grad, b.grad = torch.randn(5, generator=g), torch.randn(6, generator=g)
        opt.step()
        b.grad = None
        if broken and how == "storage freed":
            b.data.untyped_storage().resize_(0)
        elif broken:
            b.data = torch.zeros(6, dtype=torch.complex64)
        a.grad = torch.randn(5, generator=g)
        opt.step()
        results.append((a.detach().clone(), opt.state[a]["exp_avg_sq"].clone()))
    assert all(torch.equal(x, y) for x, y in zip(results[0], results[1]))
    for x, y in zip(results[0], results[2]):
        close(x, y)


def test_group_params_replaced_in_place_or_made_a_tuple_are_followed_as_by_torch():
    """The plan is reused while the group holds the same objects in the same order
    (an identity check in C++ for lists, in Python for other sequences): a new
    parameter put in an old one's place, with no state edit, is stepped."""
    ours, ref = make_params([(5,), (6,), (7,)]), make_params([(5,), (6,), (7,)])
    o, t = FusedAdam(ours, lr=1e-2), torch.optim.Adam(ref, lr=1e-2, foreach=False)
    for step in range(3):
        for k, (a, b) in enumerate(zip(ours, ref)):
            a.grad = b.grad = grad_for(a.shape, a.dtype, step, k)
        o.step()
        t.step()
        if step == 0:  # a new object in place of the second, same length
            for opt, params in ((o, ours), (t, ref)):
                params[1] = nn.Parameter(torch.full((6,), 0.5))
                opt.param_groups[0]["params"][1] = params[1]
        if step == 1:  # a tuple, as a user might assign it
            for opt in (o, t):
                opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])
    assert_matches(o, ours, t, ref)
    assert o.state[ours[1]]["step"].item() == 2


def test_a_parameter_twice_in_its_group_or_shared_state_is_refused_by_name():
    """One call writes each tensor once: torch's implementations disagree on what a
    duplicate means (the for-loop updates twice, fused races), so it is refused."""
    a, b = make_params([(5,), (6,)])
    opt = FusedAdam([a, b], lr=1e-2)
    a.grad, b.grad = torch.randn(5), torch.randn(6)
    opt.step()
    opt.param_groups[0]["params"].append(a)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 \(shape \(5,\)\) "
                                           r"appears twice"):
        opt.step()
    assert_unchanged(opt, before)
    opt.param_groups[0]["params"].pop()
    saved = opt.state_dict()  # a checkpoint saved with one step tensor for both
    saved["state"][1]["step"] = saved["state"][0]["step"]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer))
    with pytest.raises(RuntimeError, match=r"the 'step' state of parameter 1 of param group 0 "
                                           r".* are one tensor"):
        opt.step()
    opt.state[b]["step"] = opt.state[b]["step"].clone()  # un-shared: steps again
    opt.step()
    assert float(opt.state[a]["step"]) == float(opt.state[b]["step"]) == 2.0


def test_a_bad_state_tensor_is_named_by_its_place_in_the_group():
    """The op's lists leave out parameters without grads: its index is translated."""
    a, b, c = make_params([(3,), (4,), (5,)])
    opt = FusedAdam([a, b, c], lr=1e-3)
    b.grad, c.grad = torch.ones(4), torch.ones(5)  # a never gets a grad
    opt.step()
    opt.state[c]["exp_avg"] = torch.zeros(6)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has shape \[6\] .*\(exp_avgs\[1\] is "
                                           r"parameter 2 of param group 0, shape \(5,\)\)"):
        opt.step()


# ---- property test ---------------------------------------------------------------

shapes_st = st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
                     min_size=1, max_size=4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes_st, kind=st.sampled_from(["adam", "adamw"]),
       lr=st.floats(1e-4, 1e-1), beta1=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       beta2=st.floats(0.5, 0.9999), eps=st.floats(1e-10, 1e-4),
       weight_decay=st.sampled_from([0.0, 1e-3, 0.3]), amsgrad=st.booleans(),
       maximize=st.booleans(), lr_tensor=st.booleans(), grad_scale=st.floats(1e-3, 1e2),
       missing=st.integers(0, 2 ** 16 - 1))
def test_property_random_shapes_and_hyper_parameters(shapes, kind, lr, beta1, beta2, eps,
                                                     weight_decay, amsgrad, maximize, lr_tensor,
                                                     grad_scale, missing):
    def kw():
        return dict(lr=torch.tensor(lr) if lr_tensor else lr, betas=(beta1, beta2), eps=eps,
                    weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)

    skip = lambda s, i: bool(missing >> ((3 * s + i) % 16) & 1) and s % 2 == 1  # noqa: E731
    ours_cls, ref_cls = PAIRS[kind]
    ours, ref = make_params(shapes), make_params(shapes)
    o, t = ours_cls(ours, **kw()), ref_cls(ref, foreach=False, **kw())
    for s in range(20):
        step_both(list(zip(ours, ref)), s, scale=grad_scale, skip=skip)
        o.step()
        t.step()
    # A parameter can travel about lr per step and end near zero (cancellation),
    # where a tolerance relative to its final value is meaningless: the floor is
    # 1e-6 of the distance 20 steps can move it.
    assert_matches(o, ours, t, ref, param_atol=1e-6 * lr * 20)


# ---- registration, closure ----------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("FusedAdam", FusedAdam), ("FusedAdamW", FusedAdamW)])
def test_mmengine_registry_builds_the_optimizer(name, cls):
    from mmengine.registry import OPTIMIZERS

    assert pygan_optim.FusedAdam is FusedAdam
    p = nn.Parameter(torch.randn(3))
    opt = OPTIMIZERS.build(dict(type=name, params=[p], lr=0.05, betas=(0.8, 0.99)))
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert opt.param_groups[0]["decoupled_weight_decay"] is (cls is FusedAdamW)


def test_step_with_closure_returns_loss():
    ours, ref = make_params([(5,)]), make_params([(5,)])
    o = FusedAdam(ours, lr=1e-2)
    t = torch.optim.Adam(ref, lr=1e-2, foreach=False)

    def closure_for(opt, p):
        def closure():
            opt.zero_grad()
            loss = (p ** 2).sum()
            loss.backward()
            return loss
        return closure

    for _ in range(STEPS):
        lo, lt = o.step(closure_for(o, ours[0])), t.step(closure_for(t, ref[0]))
        close(lo.detach(), lt.detach())
    assert_matches(o, ours, t, ref)
