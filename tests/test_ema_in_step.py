"""The generator's EMA blended inside its optimizer update (issue 9, item 2).

Contract: ``ops.adam_step_(..., emas=, ema_momentum=)`` leaves every given
``emas[i]`` equal, bit for bit, to what ``ops.ema_([emas[i]], [params[i]],
ema_momentum)`` called right after the step gives (skipped steps, parameters
without a grad, staged layouts, every dtype included); ``FusedAdam.step(ema=
EmaBlend(pairs, momentum))`` does the same for the pairs whose parameter it owns
and leaves the others in ``blend.pending()``; the EMA model's ``blend_in_step``
protocol and BigGAN's use of it change no bit of any weight.

Oracles:

* the same step without ``emas`` followed by a separate ``ema_`` call: bitwise,
  on the CPU backend and in interpret mode (the CUDA kernels run on the CPU);
* the CPU backend against interpret mode: bitwise where the CPU loops use FMAs
  (``mul_add``), as ``tests/test_cuda_interpret.py`` requires for Adam;
* ``pygan_optim.reference`` (plain PyTorch, with the same arguments);
* ``torch.optim.Adam(foreach=False, fused=False)`` followed by MMagic's
  per-parameter loop ``avg.mul_(m).add_(p, alpha=1 - m)``, one step at a time
  from a shared state, within bounds derived from the arithmetic (below);
* for the EMA model and BigGAN: the same run with ``blend_in_step=False``
  (which ``tests/test_mmagic_ema.py`` checks against MMagic's EMA): bitwise.

Refused inputs are checked to leave every tensor as it was (clones compared).
"""
import copy
import math
import uuid

import pytest
import torch
import torch.nn as nn
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper as MMOptimWrapper
from mmengine.optim import OptimWrapperDict, build_optim_wrapper
from mmengine.registry import MODELS

import pygan_optim
from pygan_optim import _ext, cuda_interpret, ops, reference
from pygan_optim.gan import FusedExponentialMovingAverage
from pygan_optim.gan.ema import ExponentialMovingAverage
from pygan_optim.optim import EmaBlend, FusedAdam, FusedAdamW

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CHUNK = 65536

# One step against the plain-PyTorch oracle: tests/test_cuda.py's tolerances.
from test_cuda import TOL  # noqa: E402

FMA_CPU = _ext.cpu_capability() != "default"


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# ---- op-level cases ---------------------------------------------------------------

# Kinds of tensor in one call: empty, tails, one spanning two 64K chunks, a staged
# parameter (transposed param and EMA, contiguous grad and state) and one whose
# every stream starts one element into its buffer (no 16-byte packs).
KINDS = [("plain", (0,)), ("plain", (1,)), ("plain", (7,)), ("plain", (CHUNK + 17,)),
         ("staged", (9, 33)), ("odd", (5, 13))]


def _make(kind, shape, dtype, gen, scale=1.0):
    value = _randn(shape, dtype, gen, scale)
    if kind == "staged":  # same shape, transposed strides
        out = torch.empty(tuple(reversed(shape)), dtype=dtype).t()
        out.copy_(value)
        return out
    if kind == "odd":
        buf = torch.zeros(value.numel() + 9, dtype=dtype)
        out = buf[1:1 + value.numel()].view(shape)
        out.copy_(value)
        return out
    return value


def _case(dtype, *, amsgrad=True, grad_none=(2,), ema_none=(1,), seed=0, kinds=KINDS):
    """Lists for adam_step_ plus emas. ``dtype``: one dtype, or "mixed" (each
    tensor its own). Parameter ``grad_none`` has no grad, ``ema_none`` no EMA.
    Deterministic: two calls give equal values and equal layouts."""
    gen = torch.Generator().manual_seed(seed)
    case = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                            "state_steps", "emas")}
    for i, (kind, shape) in enumerate(kinds):
        dt = DTYPES[i % len(DTYPES)] if dtype == "mixed" else dtype
        param = _make(kind, shape, dt, gen)
        grad = _make("plain" if kind == "staged" else kind, shape, dt, gen)
        exp_avg = _make("plain" if kind == "staged" else kind, shape, dt, gen, 0.1)
        exp_avg_sq = _make("plain" if kind == "staged" else kind, shape, dt, gen, 0.1).abs_()
        max_sq = _make("plain" if kind == "staged" else kind, shape, dt, gen, 0.01).abs_()
        max_sq.add_(exp_avg_sq)
        ema = _make(kind, shape, dt, gen)  # the parameter's layout, as required
        assert ema.stride() == param.stride()
        case["params"].append(param)
        case["grads"].append(None if i in grad_none else grad)
        case["exp_avgs"].append(exp_avg)
        case["exp_avg_sqs"].append(exp_avg_sq)
        case["max_exp_avg_sqs"].append(max_sq)
        case["state_steps"].append(torch.tensor(float(i % 3)))
        case["emas"].append(None if i in ema_none else ema)
    if not amsgrad:
        case["max_exp_avg_sqs"] = None
    return case


def _step(fn, case, with_emas, **kw):
    extra = dict(emas=case["emas"]) if with_emas else {}
    fn(case["params"], case["grads"], case["exp_avgs"], case["exp_avg_sqs"], case["state_steps"],
       max_exp_avg_sqs=case["max_exp_avg_sqs"], **extra, **kw)


def _separate_ema(ema_fn, case, momentum):
    pairs = [(e, p) for e, p in zip(case["emas"], case["params"]) if e is not None]
    ema_fn([e for e, _ in pairs], [p for _, p in pairs], momentum)


def _tensors(case):
    """(name, tensor) for every tensor of a case (None entries left out)."""
    out = []
    for key, values in case.items():
        for i, t in enumerate(values or ()):
            if t is not None:
                out.append((f"{key}[{i}]", t))
    return out


def _assert_same(actual, expected, what=""):
    a, e = _tensors(actual), _tensors(expected)
    assert [n for n, _ in a] == [n for n, _ in e]
    for (name, x), (_, y) in zip(a, e):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what} {name}"
        assert torch.equal(x, y), f"{what} {name}: {(x.double() - y.double()).abs().max()}"


ADAM_VARIANTS = {
    "beta1_zero": dict(beta1=0.0),
    "adam_l2": dict(beta1=0.9, weight_decay=0.1),
    "adamw_amsgrad": dict(beta1=0.9, weight_decay=0.1, decoupled=True, amsgrad=True),
    "zero_grads": dict(beta1=0.0, amsgrad=True, zero_grads=True),
    "scaled_maximize": dict(beta1=0.5, maximize=True, lr=torch.tensor(3e-3),
                            grad_scale=torch.tensor(8.0), grad_mult=torch.tensor(0.75)),
    "skipped": dict(beta1=0.9, amsgrad=True, zero_grads=True, found_inf=torch.ones(())),
}


def _adam_kw(variant):
    kw = dict(lr=1e-2, beta2=0.999, eps=1e-8)
    kw.update(ADAM_VARIANTS[variant])
    amsgrad = kw.pop("amsgrad", False)
    return amsgrad, kw


# Every dtype and variant at momentum 0.999; the other momenta (0: the EMA becomes
# the param, 1: it stays) on float32, with one updating and one skipped step.
OP_CASES = ([(d, v, 0.999) for d in DTYPES + ["mixed"] for v in ADAM_VARIANTS]
            + [(torch.float32, v, m) for v in ("adam_l2", "skipped") for m in (0.0, 0.5, 1.0)])


@pytest.mark.parametrize("dtype,variant,momentum", [
    pytest.param(*c, id=f"{str(c[0]).replace('torch.', '')}-{c[1]}-{c[2]}") for c in OP_CASES])
def test_adam_step_emas_equal_the_step_then_ema_(dtype, variant, momentum):
    """CPU backend: each given EMA ends as a separate ema_ after the same step
    leaves it, bit for bit; every other tensor is what the step without emas
    gives. Covers no grad (param 2), no EMA (param 1), a skipped step, a staged
    layout, an odd offset, mixed dtypes in one call."""
    amsgrad, kw = _adam_kw(variant)
    fused, separate = _case(dtype, amsgrad=amsgrad), _case(dtype, amsgrad=amsgrad)
    before = _case(dtype, amsgrad=amsgrad)
    _step(ops.adam_step_, fused, True, amsgrad=amsgrad, ema_momentum=momentum, **kw)
    _step(ops.adam_step_, separate, False, amsgrad=amsgrad, **kw)
    _separate_ema(ops.ema_, separate, momentum)
    _assert_same(fused, separate, variant)
    # It did something: the EMAs moved (unless momentum 1), the params too (unless skipped).
    moved = [not torch.equal(a, b) for a, b in zip(fused["emas"], before["emas"])
             if a is not None]
    assert any(moved) if momentum != 1.0 else not any(moved)
    assert torch.equal(fused["params"][2], before["params"][2])  # no grad: not updated
    if variant != "skipped":
        assert not torch.equal(fused["params"][3], before["params"][3])


def test_adam_step_without_emas_is_unchanged_by_ema_momentum():
    """emas=None (or all None): ema_momentum changes nothing."""
    base, a, b = _case(torch.float32), _case(torch.float32), _case(torch.float32)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True)
    _step(ops.adam_step_, base, False, **kw)
    _step(ops.adam_step_, a, False, ema_momentum=0.3, **kw)
    b["emas"] = [None] * len(b["params"])
    _step(ops.adam_step_, b, True, ema_momentum=0.3, **kw)
    for case in (a, b):
        case["emas"] = base["emas"]
        _assert_same(case, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["adam_l2", "adamw_amsgrad", "skipped"])
def test_reference_takes_emas_and_the_op_follows_it(dtype, variant):
    """pygan_optim.reference has the same arguments: its result is its own step
    followed by its own ema_ (bitwise), and the op agrees with it as a step does
    (test_cuda's tolerances)."""
    amsgrad, kw = _adam_kw(variant)
    ref, ref_separate, ours = (_case(dtype, amsgrad=amsgrad) for _ in range(3))
    _step(reference.adam_step_, ref, True, amsgrad=amsgrad, ema_momentum=0.9, **kw)
    _step(reference.adam_step_, ref_separate, False, amsgrad=amsgrad, **kw)
    _separate_ema(reference.ema_, ref_separate, 0.9)
    _assert_same(ref, ref_separate, "reference")
    _step(ops.adam_step_, ours, True, amsgrad=amsgrad, ema_momentum=0.9, **kw)
    for (name, a), (_, e) in zip(_tensors(ours), _tensors(ref)):
        torch.testing.assert_close(a, e, **TOL[a.dtype], msg=lambda m: f"{name}: {m}")


# ---- refused inputs ---------------------------------------------------------------

def _bad_emas(case, bad):
    """emas with a wrong entry, per ``bad``, at index ``at`` (mostly 4, the staged
    (9, 33) parameter); returns (emas, at)."""
    emas = list(case["emas"])
    at = 4
    p = case["params"][at]
    other = torch.float64 if p.dtype != torch.float64 else torch.float32
    if bad == "dtype":
        emas[at] = torch.zeros_like(p, dtype=other)
    elif bad == "dtype_grad_none":  # checked also where the param has no grad
        at = 2
        emas[at] = torch.zeros_like(case["params"][at], dtype=other)
    elif bad == "shape":
        emas[at] = torch.zeros(33, 9, dtype=p.dtype)
    elif bad == "shape_same_numel":
        emas[at] = torch.zeros(p.numel(), dtype=p.dtype)
    elif bad == "strides_contiguous":  # the param is transposed, this is not
        emas[at] = torch.zeros(p.shape, dtype=p.dtype)
    elif bad == "strides_gaps":
        emas[at] = torch.zeros(9, 66, dtype=p.dtype)[:, ::2]
    elif bad == "strides_plain_param":  # a contiguous param, an EMA with gaps
        at = 3
        q = case["params"][at]
        emas[at] = torch.zeros(2 * q.numel(), dtype=q.dtype)[::2]
    elif bad == "device":
        emas[at] = torch.zeros(p.shape, dtype=p.dtype, device="cuda")
    else:
        raise AssertionError(bad)
    return emas, at


BAD = ["dtype", "dtype_grad_none", "shape", "shape_same_numel", "strides_contiguous",
       "strides_gaps", "strides_plain_param",
       pytest.param("device", marks=pytest.mark.skipif(
           not (torch.cuda.is_available() and pygan_optim.cuda_built()), reason="needs a GPU"))]


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("bad", BAD)
def test_a_mismatched_ema_is_refused_and_nothing_changes(bad, backend):
    fn = ops.adam_step_ if backend == "cpu" else cuda_interpret.adam_step_
    case = _case(torch.float32)
    before = _case(torch.float32)
    emas, at = _bad_emas(case, bad)
    before_bad = emas[at].clone()
    case["emas"] = emas
    with pytest.raises(RuntimeError, match=rf"emas\[{at}\]"):
        fn(case["params"], case["grads"], case["exp_avgs"], case["exp_avg_sqs"],
           case["state_steps"], max_exp_avg_sqs=case["max_exp_avg_sqs"], emas=emas,
           ema_momentum=0.9, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True,
           zero_grads=True)
    assert torch.equal(emas[at].cpu(), before_bad)
    case["emas"] = [e if i != at else before["emas"][i] for i, e in enumerate(emas)]
    _assert_same(case, before, bad)


def test_a_wrong_number_of_emas_is_refused_and_nothing_changes():
    case, before = _case(torch.float32), _case(torch.float32)
    with pytest.raises((RuntimeError, ValueError), match="emas"):
        ops.adam_step_(case["params"], case["grads"], case["exp_avgs"], case["exp_avg_sqs"],
                       case["state_steps"], emas=case["emas"][:-1], ema_momentum=0.9,
                       lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, zero_grads=True)
    _assert_same(case, before)


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("momentum", [-0.25, -1e-9, 1.0 + 1e-9, 2.0, math.nan])
def test_ema_momentum_outside_0_1_is_a_value_error_and_nothing_changes(momentum, backend):
    fn = ops.adam_step_ if backend == "cpu" else cuda_interpret.adam_step_
    case, before = _case(torch.float32), _case(torch.float32)
    with pytest.raises(ValueError):
        _step(fn, case, True, amsgrad=True, ema_momentum=momentum, lr=1e-2, beta1=0.9,
              beta2=0.999, eps=1e-8, zero_grads=True)
    _assert_same(case, before)


# ---- interpret mode: the CUDA kernels on the CPU ----------------------------------

# Small: a launch starts one thread per CUDA thread. The 65553-element tensor spans
# two chunks; the "odd" one takes the element-wise path in every stream.
INTERPRET_VARIANTS = ["beta1_zero", "adamw_amsgrad", "skipped"]


@pytest.mark.cuda_interpret
@pytest.mark.parametrize("variant", INTERPRET_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES + ["mixed"], ids=str)
def test_interpret_mode_emas_equal_the_separate_ema_and_the_cpu_backend(dtype, variant):
    amsgrad, kw = _adam_kw(variant)
    fused, separate, cpu = (_case(dtype, amsgrad=amsgrad, seed=5) for _ in range(3))
    _step(cuda_interpret.adam_step_, fused, True, amsgrad=amsgrad, ema_momentum=0.99, **kw)
    _step(cuda_interpret.adam_step_, separate, False, amsgrad=amsgrad, **kw)
    _separate_ema(cuda_interpret.ema_, separate, 0.99)
    _assert_same(fused, separate, "interpret")
    if FMA_CPU:  # CUDA fuses a*b+c; the default CPU loops round twice
        _step(ops.adam_step_, cpu, True, amsgrad=amsgrad, ema_momentum=0.99, **kw)
        _assert_same(fused, cpu, "interpret vs cpu")


# ---- FusedAdam.step(ema=EmaBlend) ------------------------------------------------

BIG = 40000  # over the 32768 elements from which a beta1 == 0 step keeps grads as exp_avg
SHAPES = [(BIG,), (9, 33), (7,), (3, 5)]


def _params(dtype, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(_randn(s, dtype, gen)) for s in shapes]


def _grads(step, dtype, shapes=SHAPES):
    gen = torch.Generator().manual_seed(1000 + step)
    return [_randn(s, dtype, gen, 10.0 ** (step % 3 - 1)) for s in shapes]


class _Setup:
    """Parameters, an outsider (not in the optimizer), an optimizer over two param
    groups and averages: ready (params 0 and 3), another dtype (param 2), another
    layout (param 1, transposed), and the outsider's."""

    def __init__(self, dtype, cls, options):
        self.params = _params(dtype)
        self.outsider = _params(dtype, seed=7, shapes=[(11,)])[0]
        self.opt = cls([{"params": self.params[:3]}, {"params": self.params[3:], "lr": 3e-3}],
                       lr=1e-2, **options)
        gen = torch.Generator().manual_seed(99)
        other = torch.float64 if dtype != torch.float64 else torch.float32
        avg = [_randn(p.shape, dtype, gen) for p in self.params]
        avg[1] = _randn((33, 9), dtype, gen).t()  # same shape, other strides
        avg[2] = avg[2].to(other)
        self.averages = avg + [_randn((11,), dtype, gen)]
        self.pairs = list(zip(self.params + [self.outsider], self.averages))
        self.ready = [0, 3]  # indices of pairs the step can blend

    def set_grads(self, step, dtype):
        for k, (p, g) in enumerate(zip(self.params, _grads(step, dtype))):
            p.grad = None if (step == 1 and k == 3) else g  # param 3 has state, no grad
        self.outsider.grad = torch.ones_like(self.outsider)


def _blend_leftovers(pairs, momentum):
    """What a caller does with pending pairs: ema_ each (another dtype: its own copy)."""
    for p, avg in pairs:
        ops.ema_([avg], [p.detach().to(avg.dtype)], momentum)


FUSED_OPTIONS = {
    "beta1_zero": (FusedAdam, dict(betas=(0.0, 0.999), eps=1e-6)),
    "adam_l2_amsgrad": (FusedAdam, dict(betas=(0.9, 0.99), weight_decay=0.1, amsgrad=True)),
    "adamw_maximize": (FusedAdamW, dict(betas=(0.5, 0.999), maximize=True)),
}


@pytest.mark.usefixtures("keep_small_cpu_grads")  # BIG is under 32 MiB
@pytest.mark.parametrize("options", list(FUSED_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_adam_step_with_ema_equals_step_then_ema_(dtype, options):
    """Four steps (the first creates the state; then param 3 without a grad; then
    an AMP-skipped one; then a plain one), each with a fresh EmaBlend: the params,
    state and averages equal a step without ema followed by ops.ema_ on the same
    pairs, bit for bit. done / pending name exactly the pairs blended / not."""
    cls, kw = FUSED_OPTIONS[options]
    momentum = 0.9
    ours, twin = _Setup(dtype, cls, kw), _Setup(dtype, cls, kw)
    for step in range(4):
        ours.set_grads(step, dtype)
        twin.set_grads(step, dtype)
        blend = EmaBlend(ours.pairs, momentum)
        assert blend.done == set()
        assert [(id(p), id(a)) for p, a in blend.pending()] == \
            [(id(p), id(a)) for p, a in ours.pairs]
        if step == 2:
            for s in (ours, twin):
                with s.opt.step_options(grad_scale=torch.tensor(4.0), found_inf=torch.ones(1)):
                    s.opt.step(**(dict(ema=blend) if s is ours else {}))
        elif step == 3:  # grads released by the call: with beta1 == 0 they may be kept
            given = ours.params[0].grad.data_ptr()
            ours.opt.step_and_zero_grad(ema=blend)
            twin.opt.step_and_zero_grad()
        else:
            ours.opt.step(ema=blend)
            twin.opt.step()
        assert blend.done == {id(ours.pairs[k][0]) for k in ours.ready}, step
        pending = blend.pending()
        assert [(id(p), id(a)) for p, a in pending] == \
            [(id(p), id(a)) for k, (p, a) in enumerate(ours.pairs) if k not in ours.ready]
        _blend_leftovers(pending, momentum)
        ops.ema_([twin.averages[k] for k in ours.ready], [twin.params[k] for k in ours.ready],
                 momentum)
        _blend_leftovers([twin.pairs[k] for k in range(len(twin.pairs)) if k not in ours.ready],
                         momentum)
        for k, (a, b) in enumerate(zip(ours.params, twin.params)):
            assert torch.equal(a, b), (step, k)
            for key, value in twin.opt.state[b].items():
                assert torch.equal(ours.opt.state[a][key], value), (step, k, key)
        for k, (a, b) in enumerate(zip(ours.averages, twin.averages)):
            assert a.stride() == b.stride() and torch.equal(a, b), (step, "average", k)
        if options == "beta1_zero" and step == 3:  # the kept-grad path ran with it
            assert ours.opt.state[ours.params[0]]["exp_avg"].data_ptr() == given


def test_a_parameter_that_never_had_a_grad_stays_pending_and_untouched():
    """A parameter with no state yet (never had a grad) is in no plan: its pair
    stays pending for the caller (the EMA class blends it), untouched by the step."""
    p, idle = _params(torch.float32, shapes=[(50,), (13,)])
    opt = FusedAdam([p, idle], lr=1e-2)
    avg_p, avg_idle = torch.randn(50), torch.randn(13)
    expected_p, avg_idle0 = avg_p.clone(), avg_idle.clone()
    p.grad = torch.randn(50)
    blend = EmaBlend([(p, avg_p), (idle, avg_idle)], 0.75)
    opt.step(ema=blend)
    assert blend.done == {id(p)}
    assert [(id(a), id(b)) for a, b in blend.pending()] == [(id(idle), id(avg_idle))]
    assert torch.equal(avg_idle, avg_idle0)
    ops.ema_([expected_p], [p.detach()], 0.75)
    assert torch.equal(avg_p, expected_p)


class _TensorSubclass(torch.Tensor):
    pass


@pytest.mark.parametrize("where", [
    "meta", "shape", "dtype", "strides", "neg_view", "subclass",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a GPU"))])
def test_an_average_the_step_cannot_reach_stays_pending_and_untouched(where):
    """An average on another device, of another shape, dtype or strides, a
    negative view or a tensor subclass is left to the caller; the other pairs of
    the same blend are blended."""
    p, q = _params(torch.float32, shapes=[(10,), (6,)])
    opt = FusedAdam([p, q], lr=1e-2)
    p.grad, q.grad = torch.randn(10), torch.randn(6)
    avg_p = {"shape": lambda: torch.zeros(10, 1),
             "dtype": lambda: torch.zeros(10, dtype=torch.float64),
             "strides": lambda: torch.zeros(20)[::2],
             "neg_view": lambda: torch._neg_view(torch.zeros(10)),
             "subclass": lambda: torch.zeros(10).as_subclass(_TensorSubclass),
             }.get(where, lambda: torch.zeros(10, device=where))()
    avg_q = torch.randn(6)
    expected_q = avg_q.clone()
    blend = EmaBlend([(p, avg_p), (q, avg_q)], 0.5)
    opt.step(ema=blend)
    assert blend.done == {id(q)}
    assert [(id(a), id(b)) for a, b in blend.pending()] == [(id(p), id(avg_p))]
    if where != "meta":
        assert not avg_p.any()
    ops.ema_([expected_q], [q.detach()], 0.5)
    assert torch.equal(avg_q, expected_q)


def test_an_average_that_is_the_parameters_own_memory_stays_pending():
    """An 'average' sharing the parameter's memory cannot be blended in the pass
    that writes the parameter: left to the caller, the update itself unchanged."""
    p, twin = _params(torch.float32, shapes=[(10,)]), _params(torch.float32, shapes=[(10,)])
    opt, twin_opt = FusedAdam(p, lr=1e-2), FusedAdam(twin, lr=1e-2)
    p[0].grad = torch.randn(10)
    twin[0].grad = p[0].grad.clone()
    blend = EmaBlend([(p[0], p[0].detach())], 0.5)
    opt.step(ema=blend)
    twin_opt.step()
    assert blend.done == set() and len(blend.pending()) == 1
    assert torch.equal(p[0], twin[0])


@pytest.mark.parametrize("edit", ["param.clamp_", "param.data.clamp_"])
def test_step_post_hooks_leave_every_pair_pending(edit):
    """A step post-hook (weight clipping) changes the parameters after the update
    pass: the EMA must take the hooked values, as MMagic's EMA after the
    optimizer's step does, so the step blends nothing and the caller blends the
    pending pairs (before, an in-place hook made the EMA refuse the next update,
    and a `.data` one left the EMA on the unclipped values)."""
    @torch.no_grad()
    def clamp(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for q in group["params"]:
                (q if edit == "param.clamp_" else q.data).clamp_(-0.3, 0.3)

    p = nn.Parameter(torch.randn(BIG))
    ref = nn.Parameter(p.detach().clone())
    avg, avg_ref = torch.zeros(BIG), torch.zeros(BIG)
    opt, ref_opt = FusedAdam([p], lr=0.5), FusedAdam([ref], lr=0.5)
    for o in (opt, ref_opt):
        o.register_step_post_hook(clamp)
    for step in range(3):
        p.grad = torch.randn(BIG)
        ref.grad = p.grad.clone()
        blend = EmaBlend([(p, avg)], 0.9)
        opt.step_and_zero_grad(ema=blend)
        assert blend.done == set()
        ops.ema_([a for _, a in blend.pending()], [q.detach() for q, _ in blend.pending()], 0.9)
        ref_opt.step_and_zero_grad()  # the oracle: the step and its hooks, then the EMA
        ops.ema_([avg_ref], [ref.detach()], 0.9)
        assert torch.equal(p, ref) and torch.equal(avg, avg_ref), step
    assert avg.abs().max() <= 0.3  # an average of clipped values


def test_ema_blend_is_exported_and_an_untaken_blend_blends_nothing():
    assert pygan_optim.EmaBlend is EmaBlend
    p = nn.Parameter(torch.randn(20))
    avg = torch.randn(20)
    before = avg.clone()
    blend = EmaBlend([(p, avg)], 0.5)
    opt = FusedAdam([p], lr=1e-2)
    p.grad = torch.randn(20)
    opt.step()  # no ema=: the blend is not the optimizer's business
    assert blend.done == set()
    assert [(id(q), id(a)) for q, a in blend.pending()] == [(id(p), id(avg))]
    assert torch.equal(avg, before)


@pytest.mark.usefixtures("keep_small_cpu_grads")  # BIG is under 32 MiB
@pytest.mark.cuda_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_adam_step_with_ema_in_interpret_mode(dtype):
    """The CUDA backend's plan step (device-resident tables) with the blend, in
    interpret mode: equal to its step followed by its ema_, bit for bit; with
    beta1 == 0 the grad kept as exp_avg, a tensor of two chunks."""
    shapes = [(CHUNK + 5,), (9, 33), (7,)]
    ours, twin = _params(dtype, shapes=shapes), _params(dtype, shapes=shapes)
    opts = [FusedAdam(ps, lr=1e-2, betas=(0.0, 0.999), eps=1e-6) for ps in (ours, twin)]
    gen = torch.Generator().manual_seed(8)
    averages = [[_randn(s, dtype, gen) for s in shapes]]
    averages.append([a.clone() for a in averages[0]])
    with cuda_interpret.enabled():
        for step in range(2):
            for ps in (ours, twin):
                for p, g in zip(ps, _grads(step, dtype, shapes)):
                    p.grad = g
            blend = EmaBlend(list(zip(ours, averages[0])), 0.9)
            given = ours[0].grad.data_ptr()
            opts[0].step_and_zero_grad(ema=blend)  # releases the grads: kept as exp_avg
            opts[1].step_and_zero_grad()
            cuda_interpret.ema_(averages[1], [p.detach() for p in twin], 0.9)
            assert blend.done == {id(p) for p in ours}
            for a, b in zip(ours + averages[0], twin + averages[1]):
                assert torch.equal(a, b), step
            assert opts[0].state[ours[0]]["exp_avg"].data_ptr() == given


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of floating-point numbers at |x|."""
    return torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=x.dtype)) - x.abs()


@pytest.mark.parametrize("momentum", [0.9, 0.999])
@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.999)], ids=["b1=0", "b1=0.9"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_close_to_torch_adam_followed_by_mmagics_loop(dtype, betas, momentum):
    """One step at a time from a shared state (re-synchronised after each):
    torch.optim.Adam's for-loop, then MMagic's ``avg.mul_(m).add_(p, alpha=1 - m)``.

    The parameter: within ulp(p) + 4 eps |update| (tests/test_fused_adam.py derives
    it). The average, from the same old average e0: ours is
    ``fma(p, 1 - m, e0 * m)``, MMagic's ``e0 * m + p * (1 - m)`` with up to three
    roundings, on parameters that differ by dp. So they differ by at most
    ``(1 - m) |dp|`` plus the roundings: half an ulp of each of e0 * m and
    p * (1 - m) (``eps (m |e0| + (1 - m) |p|)`` covers both, and the scalars'
    own roundings), and half an ulp of the result on each side (``ulp(e)``);
    asserted with a factor 2 on the roundings."""
    shapes = [(), (7,), (1023,), (BIG,)]
    ours, ref = _params(dtype, shapes=shapes), _params(dtype, shapes=shapes)
    opt = FusedAdam(ours, lr=1e-3, betas=betas, eps=1e-8)
    torch_opt = torch.optim.Adam(ref, lr=1e-3, betas=betas, eps=1e-8, foreach=False, fused=False)
    gen = torch.Generator().manual_seed(5)
    avg_ours = [_randn(s, dtype, gen) for s in shapes]
    avg_ref = [a.clone() for a in avg_ours]
    eps = torch.finfo(dtype).eps
    for step in range(5):
        stale_detectable = False
        before = [b.detach().clone() for b in ref]
        e0 = [a.clone() for a in avg_ref]
        for a, b, g in zip(ours, ref, _grads(step, dtype, shapes)):
            a.grad, b.grad = g, g.clone()
        opt.step(ema=EmaBlend(list(zip(ours, avg_ours)), momentum))
        torch_opt.step()
        with torch.no_grad():
            for avg, p in zip(avg_ref, ref):  # MMagic 1.x's ExponentialMovingAverage loop
                avg.mul_(momentum).add_(p, alpha=1 - momentum)
        for k, (a, b, p0) in enumerate(zip(ours, ref, before)):
            dp = (a.detach() - b.detach()).abs()
            assert (dp <= ulp(b.detach()) + 4 * eps * (b.detach() - p0).abs()).all(), (step, k)
            e_ours, e_ref = avg_ours[k], avg_ref[k]
            bound = ((1 - momentum) * dp + 2 * ulp(e_ref)
                     + 2 * eps * (momentum * e0[k].abs() + (1 - momentum) * b.detach().abs()))
            excess = ((e_ours - e_ref).abs() - bound).max().item()
            assert excess <= 0, f"step {step}, average {k}: {excess}"
            # Blending toward the old parameter instead would be far outside it:
            stale = (1 - momentum) * (b.detach() - p0).abs()
            stale_detectable |= bool((stale > bound).any())
        assert stale_detectable, step
        with torch.no_grad():  # the next step from the same state on both sides
            for a, b in zip(ours, ref):
                b.copy_(a)
                for key, value in opt.state[a].items():
                    torch_opt.state[b][key].copy_(value)
            for x, y in zip(avg_ref, avg_ours):
                x.copy_(y)


# ---- through the wrappers ---------------------------------------------------------

class _Net(nn.Module):
    def __init__(self, outsider=True):
        super().__init__()
        self.inp = nn.Linear(12, 48)
        self.norm = nn.BatchNorm1d(48)
        self.out = nn.Linear(48, 800)  # 38400 weights: the kept-grad path with beta1 == 0
        # A parameter that is not in the optimizer (frozen).
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False) if outsider else None

    def forward(self, x):
        y = self.out(torch.relu(self.norm(self.inp(x))))
        return y if self.frozen is None else y + self.frozen.sum()


def _wrapper(kind, model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = FusedAdam(params, lr=1e-2, betas=(0.0, 0.999), eps=1e-6)
    if kind == "mmengine":
        return MMOptimWrapper(opt, accumulative_counts=2)
    if kind == "fused_clip":
        return pygan_optim.OptimWrapper(opt, accumulative_counts=2, clip_grad=dict(max_norm=0.5))
    if kind == "fused_amp":
        return pygan_optim.AmpOptimWrapper(optimizer=opt, accumulative_counts=2,
                                           dtype="bfloat16", loss_scale="dynamic")
    return pygan_optim.OptimWrapper(opt, accumulative_counts=2)


@pytest.mark.parametrize("via", ["update_params", "step"])
@pytest.mark.parametrize("kind", ["mmengine", "fused", "fused_clip", "fused_amp"])
def test_wrappers_pass_the_blend_to_the_step(kind, via):
    """update_params(loss, step_kwargs=dict(ema=blend)) or step(ema=blend), with
    accumulation 2 (the blend is offered on both passes; only the step uses it),
    zeroing in the update pass (fused), clipping, AMP with one inf step (skipped:
    the average still blends toward the unchanged parameters): bitwise the run
    without it, followed by ops.ema_."""
    torch.manual_seed(0)
    model = _Net()
    twin = copy.deepcopy(model)
    wrappers = [_wrapper(kind, m) for m in (model, twin)]
    averages = [[p.detach().clone() + 0.5 for p in m.parameters()] for m in (model, twin)]
    momentum = 0.8
    zero_kwargs = dict(set_to_none=False) if kind == "fused" else {}
    gen = torch.Generator().manual_seed(1)
    blends = 0
    for window in range(4):
        blend = EmaBlend(list(zip(model.parameters(), averages[0])), momentum)
        for inner in range(2):
            x = torch.randn(6, 12, generator=gen)
            poison = kind == "fused_amp" and window == 2 and inner == 1
            for m, w, fused in ((model, wrappers[0], True), (twin, wrappers[1], False)):
                step_kwargs = dict(ema=blend) if fused else {}
                with w.optim_context(m):
                    loss = m(x).square().mean() * (math.inf if poison else 1.0)
                if via == "update_params":
                    w.update_params(loss, step_kwargs=step_kwargs, zero_kwargs=zero_kwargs)
                else:
                    w.backward(w.scale_loss(loss))
                    if w.should_update():
                        w.step(**step_kwargs)
                        w.zero_grad()
            if inner == 0:
                assert blend.done == set(), "blended before the window's step"
        params = list(model.parameters())
        assert blend.done == {id(p) for p in params if p.requires_grad}, window
        assert [id(p) for p, _ in blend.pending()] == [id(model.frozen)]
        blends += 1
        _blend_leftovers(blend.pending(), momentum)
        ops.ema_(averages[1], [p.detach() for p in twin.parameters()], momentum)
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(a, b), (window, name)
        for k, (a, b) in enumerate(zip(*averages)):
            assert torch.equal(a, b), (window, "average", k)
        states = [w.optimizer.state_dict()["state"] for w in wrappers]
        for key in states[1]:
            for name, value in states[1][key].items():
                assert torch.equal(states[0][key][name], value), (window, key, name)
    if kind == "fused_amp":
        assert wrappers[0].loss_scaler.get_scale() == wrappers[1].loss_scaler.get_scale()
        assert wrappers[0].loss_scaler.get_scale() < 65536.0  # the inf step did back off


# ---- the EMA model: blend_in_step / update_parameters ------------------------------

def _ema_model(outsider=True):
    torch.manual_seed(0)
    return _Net(outsider)


def _train_grads(model, step):
    gen = torch.Generator().manual_seed(500 + step)
    model.zero_grad(set_to_none=True)
    model.train()
    model(torch.randn(6, 12, generator=gen)).square().mean().backward()


def _opt_for(model, **kw):
    return FusedAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                     betas=(0.0, 0.999), eps=1e-6, **kw)


def _assert_emas_equal(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sb:
        assert torch.equal(sa[key], sb[key]), f"{what}: {key}"


# interval, update_buffers, whether a parameter is outside the optimizer. Without
# one and without update_buffers the step leaves update_parameters nothing to blend.
PROTOCOL_CASES = ([(i, u, True) for i in (1, 2, 3) for u in (False, True)]
                  + [(1, False, False), (2, False, False), (1, True, False)])


@pytest.mark.parametrize("interval,update_buffers,outsider", PROTOCOL_CASES)
def test_blend_in_step_protocol_equals_the_separate_blend(interval, update_buffers, outsider):
    """blend_in_step(model) returns a blend exactly when the next
    update_parameters blends (not on its first call, which copies, nor on
    interval-skipped calls); the step blends the optimizer's parameters, and
    update_parameters the rest (the frozen parameter, buffers) and counts. Every
    tensor equals the unfused EMA's (blend_in_step=False), bit for bit."""
    model, twin = _ema_model(outsider), _ema_model(outsider)
    kw = dict(momentum=0.1, interval=interval, update_buffers=update_buffers)
    ema = FusedExponentialMovingAverage(model, **kw)
    ema_twin = FusedExponentialMovingAverage(twin, blend_in_step=False, **kw)
    opt, opt_twin = _opt_for(model), _opt_for(twin)
    fused = 0
    for step in range(8):
        if outsider:
            with torch.no_grad():  # the frozen parameter moves outside the optimizer
                model.frozen.add_(0.1)
                twin.frozen.add_(0.1)
        _train_grads(model, step)
        _train_grads(twin, step)
        steps = int(ema.steps)
        blend = ema.blend_in_step(model)
        assert ema_twin.blend_in_step(twin) is None
        if steps == 0 or steps % interval != 0:
            assert blend is None, (step, steps)
            opt.step()
        else:
            assert isinstance(blend, EmaBlend), (step, steps)
            opt.step(ema=blend)
            assert blend.done == {id(p) for p in model.parameters() if p.requires_grad}
            assert [id(p) for p, _ in blend.pending()] == ([id(model.frozen)] if outsider else [])
            fused += 1
        opt_twin.step()
        ema.update_parameters(model)
        ema_twin.update_parameters(twin)
        assert int(ema.steps) == int(ema_twin.steps) == steps + 1
        _assert_emas_equal(ema, ema_twin, f"step {step}")
        for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
            assert torch.equal(a, b)
    assert fused == sum(1 for s in range(1, 8) if s % interval == 0)
    # And it did average: the EMA is neither the model nor its first copy.
    assert not torch.equal(ema.module.out.weight, model.out.weight)


def test_blend_in_step_false_never_fuses_and_true_is_the_default():
    model = _ema_model()
    off = ExponentialMovingAverage(model, momentum=0.1, blend_in_step=False)
    on = ExponentialMovingAverage(model, momentum=0.1)
    for _ in range(4):
        assert off.blend_in_step(model) is None
        blend = on.blend_in_step(model)
        assert (blend is None) == (int(on.steps) == 0)
        on.update_parameters(model)
        off.update_parameters(model)


@pytest.mark.parametrize("how", ["no_step", "step_without_ema", "other_optimizer"])
def test_update_parameters_blends_everything_when_the_step_did_not(how):
    """A blend asked for but never used by a step (a GradScaler that skips the
    step, a wrapper still accumulating, a step without ema=, or a step of an
    optimizer that owns none of the parameters) is done in full by
    update_parameters: equal to the unfused EMA."""
    model, twin = _ema_model(), _ema_model()
    ema = ExponentialMovingAverage(model, momentum=0.1, update_buffers=True)
    ema_twin = ExponentialMovingAverage(twin, momentum=0.1, update_buffers=True,
                                        blend_in_step=False)
    opt, opt_twin = _opt_for(model), _opt_for(twin)
    stranger = nn.Parameter(torch.randn(4))
    other = FusedAdam([stranger], lr=1e-2)
    for step in range(3):
        with torch.no_grad():  # so that the average lags even without steps
            model.out.weight.add_(0.05)
            twin.out.weight.add_(0.05)
        _train_grads(model, step)
        _train_grads(twin, step)
        stranger.grad = torch.ones(4)
        blend = ema.blend_in_step(model)
        assert (blend is None) == (step == 0)
        if how != "no_step":
            opt.step()
            opt_twin.step()
        if how == "other_optimizer" and blend is not None:
            other.step(ema=blend)
            assert blend.done == set()
        ema.update_parameters(model)
        ema_twin.update_parameters(twin)
        _assert_emas_equal(ema, ema_twin, f"{how}, step {step}")
    assert not torch.equal(ema.module.out.weight, model.out.weight)


@pytest.mark.parametrize("changed", ["out.weight", "norm.bias"])
def test_a_parameter_changed_after_the_blending_step_is_an_error(changed):
    """The step blended toward a value that is no longer the parameter's:
    update_parameters refuses rather than keep a stale average."""
    model = _ema_model()
    ema = ExponentialMovingAverage(model, momentum=0.1)
    opt = _opt_for(model)
    ema.update_parameters(model)  # the first call copies
    _train_grads(model, 0)
    blend = ema.blend_in_step(model)
    assert blend is not None
    opt.step(ema=blend)
    with torch.no_grad():
        model.get_parameter(changed).add_(1e-3)
    with pytest.raises(RuntimeError):
        ema.update_parameters(model)


def test_changes_the_step_did_not_blend_from_are_no_error():
    """Only parameters the step blended are checked: a parameter outside the
    optimizer may change in between (update_parameters blends it itself), and a
    blend that no step used checks nothing."""
    model, twin = _ema_model(), _ema_model()
    ema = ExponentialMovingAverage(model, momentum=0.1)
    ema_twin = ExponentialMovingAverage(twin, momentum=0.1, blend_in_step=False)
    opt, opt_twin = _opt_for(model), _opt_for(twin)
    for m, e in ((model, ema), (twin, ema_twin)):
        e.update_parameters(m)
    for step in range(2):
        _train_grads(model, step)
        _train_grads(twin, step)
        blend = ema.blend_in_step(model)
        if step == 0:
            opt.step(ema=blend)
        else:  # no step used it: a change before update_parameters is fine
            opt.step()
            with torch.no_grad():
                model.out.weight.add_(1e-3)
        opt_twin.step()
        with torch.no_grad():
            model.frozen.add_(1.0)
            twin.frozen.add_(1.0)
            if step == 1:
                twin.out.weight.add_(1e-3)
        ema.update_parameters(model)
        ema_twin.update_parameters(twin)
        _assert_emas_equal(ema, ema_twin, f"step {step}")


# ---- BigGAN: fused and unfused runs give the same bits -----------------------------

def _biggan(ema_config, discriminator_steps, generator_steps):
    torch.manual_seed(0)
    return MODELS.build(dict(
        type="BigGAN", num_classes=10, noise_size=32, generator_steps=generator_steps,
        discriminator_steps=discriminator_steps,
        generator=dict(type="BigGANGenerator", output_scale=32, base_channels=4, shared_dim=16),
        discriminator=dict(type="BigGANDiscriminator", input_scale=32, base_channels=4),
        ema_config=ema_config))


def _train_biggan(wrapper, ema_config, iters, d_steps, d_accu, g_steps):
    """(model, the G step's ema= argument at each G step)."""
    model = _biggan(ema_config, d_steps, g_steps)
    optimizer = dict(type="FusedAdam", lr=1e-3, betas=(0.0, 0.999), eps=1e-6)
    extra = dict(dtype="bfloat16") if wrapper == "FusedAmpOptimWrapper" else {}
    wrappers = OptimWrapperDict(
        generator=build_optim_wrapper(model.generator, dict(
            type=wrapper, optimizer=optimizer, accumulative_counts=2, **extra)),
        discriminator=build_optim_wrapper(model.discriminator, dict(
            type=wrapper, optimizer=dict(optimizer, lr=4e-3), accumulative_counts=d_accu,
            **extra)))
    wrappers["discriminator"].initialize_count_status(model.discriminator, 0, iters)
    seen = []
    wrappers["generator"].optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(kwargs.get("ema")))
    name = f"test_ema_in_step-{uuid.uuid4()}"
    hub = MessageHub.get_instance(name)  # the current instance, which BigGAN reads
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    try:
        for i in range(iters):
            hub.update_info("iter", i)
            data = dict(inputs=dict(img=torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                                                      generator=gen)),
                        data_samples=dict(gt_label=torch.randint(0, 10, (2,), generator=gen)))
            model.train_step(data, wrappers)
    finally:  # leave the previous instance current for later tests
        MessageHub._instance_dict.pop(name, None)
    return model, wrappers, seen


def _expected_blends(iters, d_steps, d_accu, start_iter, interval):
    steps = blends = 0
    for i in range(iters):
        if (i + 1) % (d_steps * d_accu) == 0 and i + 1 >= start_iter * d_steps * d_accu:
            blends += steps > 0 and steps % interval == 0
            steps += 1
    return blends


# wrapper, EMA interval, update_buffers, D accumulative_counts, start_iter,
# generator_steps, iterations. discriminator_steps 2 and G accumulation 2 always.
BIGGAN_CASES = [
    ("FusedOptimWrapper", 1, True, 2, 1, 1, 12),
    ("FusedOptimWrapper", 1, False, 1, 2, 2, 8),
    ("FusedOptimWrapper", 2, True, 1, 2, 2, 8),
    ("FusedOptimWrapper", 2, False, 1, 2, 1, 8),
    ("FusedAmpOptimWrapper", 1, True, 1, 2, 1, 8),
    ("FusedAmpOptimWrapper", 1, False, 1, 2, 2, 8),
    ("FusedAmpOptimWrapper", 2, True, 1, 2, 1, 8),
    ("FusedAmpOptimWrapper", 2, False, 2, 1, 1, 12),
]


@pytest.mark.parametrize("wrapper,interval,update_buffers,d_accu,start_iter,g_steps,iters",
                         BIGGAN_CASES)
def test_biggan_blend_in_step_gives_the_same_weights(wrapper, interval, update_buffers, d_accu,
                                                     start_iter, g_steps, iters):
    """BigGAN with a FusedAdam generator passes the blend to the last G step of
    each window in which the EMA blends: G, D, the EMA (parameters, buffers,
    steps) and both optimizers' state are bit-identical to blend_in_step=False."""
    d_steps = 2
    runs = {}
    for fuse in (True, False):
        ema_config = dict(momentum=0.1, interval=interval, start_iter=start_iter,
                          update_buffers=update_buffers, blend_in_step=fuse)
        runs[fuse] = _train_biggan(wrapper, ema_config, iters, d_steps, d_accu, g_steps)
    (model, wrappers, seen), (twin, twin_wrappers, twin_seen) = runs[True], runs[False]
    expected = _expected_blends(iters, d_steps, d_accu, start_iter, interval)
    assert expected > 0
    assert all(b is None for b in twin_seen)
    assert len(seen) == len(twin_seen) > 0
    assert sum(b is not None for b in seen) == expected, seen
    g_params = {id(p) for p in model.generator.parameters()}
    for k, b in enumerate(seen):
        if b is not None:
            assert k % g_steps == g_steps - 1, "a blend before the window's last G step"
            assert b.done == g_params and b.pending() == []
    assert int(model.generator_ema.steps) == int(twin.generator_ema.steps) > 0
    a, b = model.state_dict(), twin.state_dict()
    assert list(a) == list(b)
    for key in b:
        assert torch.equal(a[key], b[key]), key
    for name in ("generator", "discriminator"):
        sa, sb = (w[name].optimizer.state_dict()["state"] for w in (wrappers, twin_wrappers))
        for index in sb:
            for key, value in sb[index].items():
                assert torch.equal(sa[index][key], value), (name, index, key)
    # The EMA did average (it differs from G) and training moved G.
    ema_w = model.generator_ema.module.state_dict()
    assert any(not torch.equal(v, model.generator.state_dict()[k])
               for k, v in ema_w.items() if v.is_floating_point())


# ---- refusals added after review -------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "interpret"])
@pytest.mark.parametrize("alias", ["same_ema_twice", "ema_is_other_param", "ema_is_exp_avg_sq",
                                   "ema_overlaps_grad", "ema_is_grad_of_param_without_ema"])
def test_an_ema_sharing_memory_is_refused_and_nothing_changes(alias, backend):
    """The kernels read and write the EMAs through restrict pointers: an EMA
    overlapping another EMA or any tensor of the step is refused, by name."""
    fn = ops.adam_step_ if backend == "cpu" else cuda_interpret.adam_step_
    p = [torch.randn(40) for _ in range(3)]
    g = [torch.randn(40) for _ in range(3)]
    m = [torch.zeros(40) for _ in range(3)]
    v = [torch.rand(40) for _ in range(3)]
    steps = [torch.zeros(()) for _ in range(3)]
    own = torch.randn(40)
    emas = {"same_ema_twice": [own, own, None],
            "ema_is_other_param": [p[1], None, None],
            "ema_is_exp_avg_sq": [None, None, v[0]],
            "ema_overlaps_grad": [None, None, None],
            "ema_is_grad_of_param_without_ema": [None, g[0], None]}[alias]
    if alias == "ema_overlaps_grad":  # emas[1] reaches into grads[2]: views of one buffer
        buf = torch.randn(60)
        g[2], emas[1] = buf[20:], buf[:40]
    tensors = p + g + m + v + steps + [e for e in emas if e is not None]
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=r"emas\[\d\] (and \w+\[\d\] |is written and )?shares? memory"):
        fn(p, g, m, v, steps, lr=1e-2, beta1=0.0, beta2=0.999, eps=1e-8, emas=emas,
           ema_momentum=0.9)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


def _one_pair():
    """A parameter with a grad, its average, a FusedAdam over it and an EmaBlend."""
    p = nn.Parameter(torch.randn(30))
    p.grad = torch.randn(30)
    avg = torch.randn(30)
    return p, avg, FusedAdam([p], lr=1e-2, betas=(0.0, 0.999)), EmaBlend([(p, avg)], 0.9)


def test_a_blend_serves_one_step_of_an_optimizer():
    p, avg, opt, blend = _one_pair()
    opt.step(ema=blend)
    after_first = (p.detach().clone(), avg.clone())
    p.grad = torch.randn(30)
    with pytest.raises(RuntimeError, match="already used by a step"):
        opt.step(ema=blend)
    assert torch.equal(p, after_first[0]) and torch.equal(avg, after_first[1])


def test_a_refused_step_gives_the_blend_back():
    p, avg, opt, blend = _one_pair()
    opt.param_groups[0]["lr"] = -1.0  # refused by the op, before anything changes
    with pytest.raises(ValueError, match="learning rate"):
        opt.step(ema=blend)
    assert not blend.done
    opt.param_groups[0]["lr"] = 1e-2
    expected = avg.clone()
    opt.step(ema=blend)
    ops.ema_([expected], [p.detach()], 0.9)
    assert torch.equal(avg, expected) and blend.done == {id(p)}


def test_params_sharing_a_version_counter_across_groups_are_no_error():
    """Views of one buffer share a version counter: blending group 0, then
    updating group 1, must not look like a change after the blend."""
    flat = torch.randn(100)
    model = nn.Module()
    model.a = nn.Parameter(flat[:60])
    model.b = nn.Parameter(flat[60:])
    assert model.a._version == model.b._version
    ema = ExponentialMovingAverage(model, momentum=0.1)
    opt = FusedAdam([{"params": [model.a]}, {"params": [model.b], "lr": 3e-3}], lr=1e-2,
                    betas=(0.0, 0.999))
    reference = copy.deepcopy(model)
    ref_ema = ExponentialMovingAverage(reference, momentum=0.1, blend_in_step=False)
    ref_opt = FusedAdam([{"params": [reference.a]}, {"params": [reference.b], "lr": 3e-3}],
                        lr=1e-2, betas=(0.0, 0.999))
    for _ in range(3):
        for m in (model, reference):
            m.a.grad, m.b.grad = torch.ones(60), -torch.ones(40)
        opt.step(ema=ema.blend_in_step(model))
        ema.update_parameters(model)
        ref_opt.step()
        ref_ema.update_parameters(reference)
    for mine, theirs in zip(ema.module.parameters(), ref_ema.module.parameters()):
        assert torch.equal(mine, theirs)


def test_ema_blend_under_a_capture_is_refused_before_anything():
    """A replay would blend again while the EMA's step count stays: refused, in
    FusedAdam and in the op (interpret mode's capture stand-in)."""
    p = nn.Parameter(torch.randn(50))
    avg = torch.randn(50)
    opt = FusedAdam([p], lr=1e-2, betas=(0.0, 0.999), capturable=True)
    with cuda_interpret.enabled():
        p.grad = torch.randn(50)
        opt.step()  # warm-up
        before = (p.detach().clone(), avg.clone())
        with cuda_interpret.capturing():
            with pytest.raises(RuntimeError, match="CUDA graph capture"):
                opt.step(ema=EmaBlend([(p, avg)], 0.9))
            state = opt.state[p]
            with pytest.raises(RuntimeError, match="CUDA graph capture"):
                ops.adam_step_([p.detach()], [p.grad], [state["exp_avg"]], [state["exp_avg_sq"]],
                               [state["step"]], lr=1e-2, beta1=0.0, beta2=0.999, eps=1e-8,
                               emas=[avg], ema_momentum=0.9)
    assert torch.equal(p, before[0]) and torch.equal(avg, before[1])


def test_a_wrapper_that_blends_refuses_a_second_ema():
    model = nn.Linear(4, 3)
    ema = ExponentialMovingAverage(model, momentum=0.1)
    wrapper = pygan_optim.OptimWrapper(FusedAdam(model.parameters(), lr=1e-2))
    wrapper.blend_ema_in_step(ema)
    ema.update_parameters(model)  # the first call copies; the next one blends
    wrapper.initialize_count_status(model, 0, 1)
    loss = model(torch.randn(2, 4)).sum()
    with pytest.raises(RuntimeError, match="do not pass ema="):
        wrapper.update_params(loss, step_kwargs=dict(ema=EmaBlend([], 0.9)))
