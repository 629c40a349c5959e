"""The EMA's two weights (session 33): the ops take the new parameters' weight too.

MMagic's EMA blends ``avg.mul_(1 - m).add_(param, alpha=m)`` with a Python float
m: in fp32 the old average's weight is float32(1 - m, computed in double) and the
new parameters' weight float32(m). ``ops.ema_(ema, params, momentum, new_weight)``
and ``ops.adam_step_(..., ema_momentum=, ema_new_weight=)`` (also through
``EmaBlend(pairs, momentum, new_weight)``, ``FusedAdam.step(ema=...)`` and the EMA
model) take both; without the new weight they derive it as 1 - momentum in
double, as before, which for some m is one float ulp away from float32(m).

Oracles: MMagic's formula written in torch ops, bit for bit in fp32 (and, in the
other dtypes, the same two weights in the op-math type with one rounding to the
storage dtype, which is what the kernels do); the old-style call for the
default; clones for refused calls (nothing changes).
"""
import math
import random

import pytest
import torch
import torch.nn as nn

from pygan_optim import _ext, cuda_interpret, ops, reference
from pygan_optim.gan.ema import ExponentialMovingAverage
from pygan_optim.optim import EmaBlend, FusedAdam
from test_fused_adam import _uses_fma

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BACKENDS = ["cpu", "interpret"]
SIZE = 1037  # vector loops (and the streamed beta1 = 0 loop, from 1000) and a tail


def _derived(m: float) -> float:
    """The new parameters' weight the ops derive without new_weight: 1 - (1 - m)."""
    return 1.0 - (1.0 - m)


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _is_hard(m: float) -> bool:
    """Whether the derived weight rounds to another float32 than m does."""
    return _f32(_derived(m)) != _f32(m)


def _momenta(seed: int, n_random: int, n_hard: int):
    """``n_random`` m drawn log-uniformly from [1e-9, 1e-2] (seeded), then ``n_hard``
    more drawn the same way among those where the derived weight misses float32(m)."""
    rng = random.Random(seed)

    def draw():
        return 10.0 ** rng.uniform(-9.0, -2.0)

    momenta = [draw() for _ in range(n_random)]
    hard = []
    while len(hard) < n_hard:
        m = draw()
        if _is_hard(m):
            hard.append(m)
    return momenta + hard, hard


MOMENTA, HARD = _momenta(seed=33, n_random=48, n_hard=24)


def test_the_drawn_momenta_cover_both_kinds():
    assert all(1e-9 <= m <= 1e-2 for m in MOMENTA)
    assert len(HARD) == 24 and all(_is_hard(m) for m in HARD)
    assert any(not _is_hard(m) for m in MOMENTA)


def _mmagic_(avg: torch.Tensor, src: torch.Tensor, m: float) -> torch.Tensor:
    """MMagic's blend, written in torch ops, in place on ``avg``."""
    return avg.mul_(1 - m).add_(src, alpha=m)


def _pair(dtype, seed, size=SIZE):
    """An average with zeros in every other element (there the blend is the
    parameter times the new weight, so a weight one ulp off shows) and a source."""
    gen = torch.Generator().manual_seed(seed)
    avg = torch.randn(size, generator=gen, dtype=torch.float64)
    avg[::2] = 0.0
    src = torch.randn(size, generator=gen, dtype=torch.float64)
    return avg.to(dtype), src.to(dtype)


def _fma_parity(backend) -> bool:
    """Whether our loops and torch's add(alpha=) both fuse a*b+c or both do not
    (interpret mode always fuses, as CUDA does)."""
    ours = True if backend == "interpret" else _uses_fma(ours=True)
    return ours == _uses_fma(ours=False)


def _ops(backend):
    return ops if backend == "cpu" else cuda_interpret


def _skip_without_fma_parity(backend):
    if not _fma_parity(backend):
        pytest.skip("torch's CPU capability and ours differ in FMA use")


# ---- ops.ema_ ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_op_equals_mmagics_formula_bit_for_bit_at_random_momenta(backend, one_thread):
    _skip_without_fma_parity(backend)
    fn = _ops(backend).ema_
    momenta = MOMENTA if backend == "cpu" else MOMENTA[::4] + HARD[::4]
    old_style_missed = 0
    for k, m in enumerate(momenta):
        avg, src = _pair(torch.float32, seed=k)
        expected = _mmagic_(avg.clone(), src, m)
        ours = avg.clone()
        fn([ours], [src], 1.0 - m, new_weight=m)
        assert torch.equal(ours, expected), (m, (ours - expected).abs().max().item())
        # The old-style call (derived weight) misses MMagic's bits at hard momenta only.
        old_style = avg.clone()
        fn([old_style], [src], 1.0 - m)
        if _is_hard(m):
            old_style_missed += not torch.equal(old_style, expected)
        else:
            assert torch.equal(old_style, expected), m
    assert old_style_missed > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ema_op_takes_both_weights_in_every_dtype(dtype, backend, one_thread):
    """The two weights in the op-math type (float32; float64 for float64), the
    product with the old average rounded to it, then the sum: MMagic's formula
    run in the op-math type, rounded once to the storage dtype. (MMagic on
    bf16/fp16 tensors rounds after each of its two ops; the kernels round once.)"""
    _skip_without_fma_parity(backend)
    fn = _ops(backend).ema_
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    for k, m in enumerate(HARD[:6] + MOMENTA[:2]):
        avg, src = _pair(dtype, seed=100 + k)
        expected = _mmagic_(avg.to(opmath, copy=True), src.to(opmath), m).to(dtype)
        ours = avg.clone()
        fn([ours], [src], 1.0 - m, new_weight=m)
        assert torch.equal(ours, expected), (m, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_takes_the_new_weight_and_the_op_follows_it(dtype):
    m = HARD[0]
    avg, src = _pair(dtype, seed=7)
    ours, ref = avg.clone(), avg.clone()
    ops.ema_([ours], [src], 1.0 - m, new_weight=m)
    reference.ema_([ref], [src], 1.0 - m, new_weight=m)
    if dtype in (torch.float32, torch.float64):
        # One rounding apart at most (the op fuses a*b+c where the CPU has FMA).
        eps = torch.finfo(dtype).eps
        assert ((ours - ref).abs() <= eps * (ref.abs() + src.abs() * m)).all()
    else:
        torch.testing.assert_close(ours, ref)


# ---- the EMA blended inside the Adam step ------------------------------------------------

def _adam_case(seed):
    """fp32 lists: a plain parameter, one without a grad, a staged one (transposed
    param and EMA), one starting an element into its buffer. Each average has
    zeros in every other element."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, scale=1.0):
        return torch.randn(shape, generator=gen) * scale

    case = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps",
                            "emas")}
    for i, kind in enumerate(["plain", "no_grad", "staged", "odd"]):
        shape = (9, 33) if kind == "staged" else (SIZE,) if kind == "plain" else (45,)

        def laid_out(value):
            if kind == "staged":
                out = torch.empty(tuple(reversed(shape))).t()
            elif kind == "odd":
                out = torch.zeros(value.numel() + 3)[1:1 + value.numel()].view(shape)
            else:
                return value
            return out.copy_(value)

        ema = rand(shape)
        ema.view(-1)[::2] = 0.0
        case["params"].append(laid_out(rand(shape)))
        case["grads"].append(None if kind == "no_grad" else rand(shape))
        case["exp_avgs"].append(rand(shape, 0.1))
        case["exp_avg_sqs"].append(rand(shape, 0.1).abs_())
        case["state_steps"].append(torch.tensor(float(i)))
        case["emas"].append(laid_out(ema))
    return case


VARIANTS = {
    "adam": dict(beta1=0.9),
    "beta1_zero": dict(beta1=0.0),  # the streamed fp32 loop on the CPU
    "adamw_scaled": dict(beta1=0.5, weight_decay=0.1, decoupled=True,
                         grad_scale=torch.tensor(8.0)),
    "skipped": dict(beta1=0.9, found_inf=torch.ones(())),
}


def _run_step(fn, case, with_emas, variant, **ema_kw):
    kw = dict(lr=1e-2, beta2=0.999, eps=1e-8, zero_grads=True, **VARIANTS[variant])
    extra = dict(emas=case["emas"], **ema_kw) if with_emas else {}
    fn(case["params"], case["grads"], case["exp_avgs"], case["exp_avg_sqs"], case["state_steps"],
       **kw, **extra)


def _assert_cases_equal(a, b, what):
    for key in a:
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            if x is None:
                assert y is None
                continue
            assert torch.equal(x, y), f"{what}: {key}[{i}]"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adam_step_ema_equals_step_then_mmagics_formula(variant, backend, one_thread):
    """Each average ends as MMagic's formula applied after the same step without
    emas, bit for bit: in the update pass, in a skipped step, and for the
    parameters the pass does not walk (no grad, staged), which an ema_ pass
    blends after it."""
    _skip_without_fma_parity(backend)
    fn = _ops(backend).adam_step_
    momenta = MOMENTA[::6] + HARD[::3] if backend == "cpu" else MOMENTA[:1] + HARD[:3]
    for k, m in enumerate(momenta):
        fused, separate = _adam_case(k), _adam_case(k)
        _run_step(fn, fused, True, variant, ema_momentum=1.0 - m, ema_new_weight=m)
        _run_step(fn, separate, False, variant)
        for avg, param in zip(separate["emas"], separate["params"]):
            _mmagic_(avg, param, m)
        _assert_cases_equal(fused, separate, f"{variant} m={m!r}")


@pytest.mark.parametrize("variant", ["adam", "skipped"])
def test_adam_step_ema_in_interpret_mode_equals_the_cpu_backend(variant):
    """CPU and CUDA share the element math (math.h): the same bits with both weights."""
    if _ext.cpu_capability() == "default":
        pytest.skip("the default CPU loops round a*b+c twice; CUDA fuses it")
    m = HARD[1]
    cpu, interpreted = _adam_case(3), _adam_case(3)
    _run_step(ops.adam_step_, cpu, True, variant, ema_momentum=1.0 - m, ema_new_weight=m)
    _run_step(cuda_interpret.adam_step_, interpreted, True, variant, ema_momentum=1.0 - m,
              ema_new_weight=m)
    _assert_cases_equal(cpu, interpreted, variant)


# ---- FusedAdam, EmaBlend and the EMA model -----------------------------------------------

def _model(seed=0):
    torch.manual_seed(seed)
    # 64 x 520 = 33280 weights: its grad is kept as exp_avg at beta1 = 0
    # (keep_small_cpu_grads), where the step stores no exp_avg.
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 520))


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(5, 16, generator=g)).square().mean().backward()


def _zero_halves(averages):
    with torch.no_grad():
        for a in averages:
            a.view(-1)[::2] = 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.999)], ids=["b1=0", "b1=0.9"])
@pytest.mark.usefixtures("keep_small_cpu_grads")
def test_fused_adam_step_with_both_weights_equals_step_then_mmagics_formula(betas, backend,
                                                                            one_thread):
    _skip_without_fma_parity(backend)
    momenta = HARD[:4] + MOMENTA[:2] if backend == "cpu" else HARD[:2]
    for k, m in enumerate(momenta):
        fused_model, plain_model = _model(k), _model(k)
        fused_avgs = [p.detach().clone() for p in fused_model.parameters()]
        _zero_halves(fused_avgs)
        plain_avgs = [a.clone() for a in fused_avgs]
        opts = [FusedAdam(mdl.parameters(), lr=1e-2, betas=betas)
                for mdl in (fused_model, plain_model)]
        for mdl in (fused_model, plain_model):
            _grads(mdl, seed=k)
        blend = EmaBlend(zip(fused_model.parameters(), fused_avgs), 1.0 - m, new_weight=m)
        assert blend.new_weight == m
        if backend == "interpret":
            with cuda_interpret.enabled():
                opts[0].step_and_zero_grad(ema=blend)
                opts[1].step_and_zero_grad()
        else:
            opts[0].step_and_zero_grad(ema=blend)
            opts[1].step_and_zero_grad()
        assert not blend.pending()
        with torch.no_grad():
            for a, p in zip(plain_avgs, plain_model.parameters()):
                _mmagic_(a, p, m)
        for a, b in zip(fused_avgs, plain_avgs):
            assert torch.equal(a, b), m
        for p, q in zip(fused_model.parameters(), plain_model.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("blend_in_step", [True, False])
def test_the_ema_model_equals_mmagics_formula_bit_for_bit(blend_in_step, one_thread):
    """ExponentialMovingAverage (update_parameters, with the blend in FusedAdam's
    step or not, and its per-tensor avg_func) passes m as the new weight."""
    _skip_without_fma_parity("cpu")
    for k, m in enumerate(HARD[:4]):
        model = _model(k)
        ema = ExponentialMovingAverage(model, momentum=m, blend_in_step=blend_in_step)
        oracle = [p.detach().clone() for p in model.parameters()]
        opt = FusedAdam(model.parameters(), lr=1e-2)
        for it in range(3):
            _grads(model, seed=10 * k + it)
            blend = ema.blend_in_step(model)
            assert (blend is not None) == (blend_in_step and it > 0)
            if blend is not None:
                assert (blend.momentum, blend.new_weight) == (1.0 - m, m)
            opt.step(ema=blend)
            ema.update_parameters(model)
            with torch.no_grad():
                for a, p in zip(oracle, model.parameters()):
                    if it == 0:
                        a.copy_(p)  # the first update copies
                    else:
                        _mmagic_(a, p, m)
            for a, b in zip(ema.module.parameters(), oracle):
                assert torch.equal(a, b), (m, it)
            if it == 0:  # zeros, where a weight one ulp off shows in the blend
                _zero_halves(list(ema.module.parameters()) + oracle)
        avg, src = _pair(torch.float32, seed=k)
        expected = _mmagic_(avg.clone(), src, m)
        ema.avg_func(avg, src, steps=1)
        assert torch.equal(avg, expected)


# ---- old-style calls ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_old_style_calls_without_the_new_weight_still_work(backend):
    """No new weight: 1 - momentum in double, as before (bit for bit the same as
    passing it explicitly), through ops.ema_, the op itself (positional, three
    arguments), adam_step_ and EmaBlend."""
    ns = _ops(backend)
    for m in HARD[:3] + [1e-4, 0.001]:
        momentum = 1.0 - m
        avg, src = _pair(torch.float32, seed=5)
        a, b, c = avg.clone(), avg.clone(), avg.clone()
        ns.ema_([a], [src], momentum)
        ns.ema_([b], [src], momentum, new_weight=_derived(m))
        if backend == "cpu":
            torch.ops.pygan_optim.ema_([c], [src], momentum)
        else:
            with cuda_interpret.enabled():
                torch.ops.pygan_optim.ema_([c], [src], momentum)
        assert torch.equal(a, b) and torch.equal(a, c)
        if _is_hard(m) and _fma_parity(backend):
            assert not torch.equal(a, _mmagic_(avg.clone(), src, m))  # the old gap, kept

        old, explicit = _adam_case(1), _adam_case(1)
        _run_step(ns.adam_step_, old, True, "adam", ema_momentum=momentum)
        _run_step(ns.adam_step_, explicit, True, "adam", ema_momentum=momentum,
                  ema_new_weight=_derived(m))
        _assert_cases_equal(old, explicit, f"m={m!r}")

    blend = EmaBlend([], 0.999)
    assert blend.momentum == 0.999 and blend.new_weight is None
    models = [_model(1), _model(1)]
    avgs = [[p.detach().clone() for p in mdl.parameters()] for mdl in models]
    opts = [FusedAdam(mdl.parameters(), lr=1e-2) for mdl in models]
    blends = [EmaBlend(zip(models[0].parameters(), avgs[0]), 0.999),
              EmaBlend(zip(models[1].parameters(), avgs[1]), 0.999, new_weight=_derived(1e-3))]
    for mdl, opt, bl in zip(models, opts, blends):
        _grads(mdl, seed=2)
        if backend == "cpu":
            opt.step(ema=bl)
        else:
            with cuda_interpret.enabled():
                opt.step(ema=bl)
        assert not bl.pending()
    for a, b in zip(*avgs):
        assert torch.equal(a, b)


def test_the_plan_step_takes_the_new_weight_as_an_optional_keyword():
    model = _model(2)
    avgs = [p.detach().clone() for p in model.parameters()]
    opt = FusedAdam(model.parameters(), lr=1e-2)
    _grads(model, seed=3)
    opt.step()  # builds the plan
    (built,) = [entry[-2] for entry in opt._plans.values()]
    (plan,) = built
    handle = plan.handle
    _grads(model, seed=4)
    avg_of = {id(p): a for p, a in zip(model.parameters(), avgs)}
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
              maximize=False, decoupled=False, lr_tensor=None, grad_scale=None, found_inf=None,
              grad_mult=None, zero_grads=False, validate_only=True,
              emas=[avg_of[id(p)] for p in plan.params])
    handle.step(**kw, ema_momentum=0.5)  # without the new weight
    handle.step(**kw, ema_momentum=0.5, ema_new_weight=None)
    handle.step(**kw, ema_momentum=0.5, ema_new_weight=0.5)
    with pytest.raises(ValueError, match="ema_new_weight"):
        handle.step(**kw, ema_momentum=0.5, ema_new_weight=0.6)


# ---- refused weights ----------------------------------------------------------------------

BAD_WEIGHTS = [
    pytest.param(0.5, -1e-9, "must be in", id="negative"),
    pytest.param(0.5, 1.0 + 1e-9, "must be in", id="above_1"),
    pytest.param(0.5, math.nan, "must be in", id="nan"),
    pytest.param(0.5, math.inf, "must be in", id="inf"),
    pytest.param(0.999, 0.999, "add up to 1", id="m_as_both"),
    pytest.param(1e-3, 1e-3, "add up to 1", id="m_and_m"),
    pytest.param(0.9, 0.2, "add up to 1", id="sum_1.1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum,new_weight,message", BAD_WEIGHTS)
def test_a_bad_new_weight_is_a_value_error_and_nothing_changes(momentum, new_weight, message,
                                                               backend):
    ns = _ops(backend)
    avg, src = _pair(torch.float32, seed=9)
    ours = avg.clone()
    with pytest.raises(ValueError, match=message) as refused:
        ns.ema_([ours], [src], momentum, new_weight=new_weight)
    assert "pygan_optim.ema_" in str(refused.value) and "new_weight" in str(refused.value)
    assert torch.equal(ours, avg)

    case, before = _adam_case(0), _adam_case(0)
    with pytest.raises(ValueError, match=message) as refused:
        _run_step(ns.adam_step_, case, True, "adam", ema_momentum=momentum,
                  ema_new_weight=new_weight)
    assert "ema_new_weight" in str(refused.value)
    _assert_cases_equal(case, before, "refused")

    with pytest.raises(ValueError, match=message) as refused:
        EmaBlend([], momentum, new_weight=new_weight)
    assert "new_weight" in str(refused.value)


def test_a_bad_momentum_is_still_named_when_the_new_weight_is_given():
    avg, src = _pair(torch.float32, seed=9)
    with pytest.raises(ValueError, match="momentum must be in"):
        ops.ema_([avg], [src], math.nan, new_weight=0.5)
    case = _adam_case(0)
    with pytest.raises(ValueError, match="ema_momentum must be in"):
        _run_step(ops.adam_step_, case, True, "adam", ema_momentum=-0.1, ema_new_weight=0.5)


def test_without_emas_the_new_weight_is_not_read():
    """As ema_momentum: a step without EMAs takes any value."""
    base, other = _adam_case(0), _adam_case(0)
    _run_step(ops.adam_step_, base, False, "adam")
    ops.adam_step_(other["params"], other["grads"], other["exp_avgs"], other["exp_avg_sqs"],
                   other["state_steps"], lr=1e-2, beta2=0.999, eps=1e-8, zero_grads=True,
                   **VARIANTS["adam"], emas=None, ema_momentum=0.0, ema_new_weight=math.nan)
    _assert_cases_equal(base, other, "no emas")


# ---- schemas, fake kernels, torch.compile ------------------------------------------------

def test_schemas_take_an_optional_new_weight():
    ema_schema = str(torch.ops.pygan_optim.ema_.default._schema)
    assert ema_schema.endswith("float momentum, float? new_weight=None) -> ()")
    for op in ("adam_step_", "adam_step_read_grads_"):
        schema = str(getattr(torch.ops.pygan_optim, op).default._schema)
        assert schema.endswith("float ema_momentum, float? ema_new_weight=None) -> ()"), op


def test_opcheck_with_the_new_weight():
    from torch.library import opcheck

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(7, generator=gen), torch.randn(3, 5, generator=gen)]
    avgs = [torch.randn_like(p) for p in params]
    opcheck(torch.ops.pygan_optim.ema_.default, ([a.clone() for a in avgs], params, 0.75),
            dict(new_weight=0.25))
    for op in (torch.ops.pygan_optim.adam_step_, torch.ops.pygan_optim.adam_step_read_grads_):
        args = ([p.clone() for p in params], [torch.randn_like(p) for p in params],
                [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [],
                [torch.zeros(()) for _ in params])
        opcheck(op.default, args,
                dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                     amsgrad=False, maximize=False, decoupled=False,
                     emas=[avgs[1].clone()], ema_index=[1], ema_momentum=1.0 - HARD[0],
                     ema_new_weight=HARD[0]))


def test_the_fake_kernels_take_and_check_the_new_weight():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        params = [torch.randn(7), torch.randn(3, 5)]
        avgs = [torch.randn_like(p) for p in params]
        ops.ema_(avgs, params, 0.75, new_weight=0.25)
        case = dict(params=params, grads=[torch.randn_like(p) for p in params],
                    exp_avgs=[torch.zeros_like(p) for p in params],
                    exp_avg_sqs=[torch.zeros_like(p) for p in params],
                    state_steps=[torch.zeros(()) for _ in params], emas=avgs)
        _run_step(ops.adam_step_, case, True, "adam", ema_momentum=0.75, ema_new_weight=0.25)
        with pytest.raises(ValueError, match="ema_new_weight"):
            _run_step(ops.adam_step_, case, True, "adam", ema_momentum=0.75,
                      ema_new_weight=0.75)


def test_torch_compile_passes_the_new_weight(one_thread):
    _skip_without_fma_parity("cpu")
    m = HARD[2]

    def blend(avgs, params):
        ops.ema_(avgs, params, 1.0 - m, new_weight=m)

    avg, src = _pair(torch.float32, seed=11)
    eager, compiled = avg.clone(), avg.clone()
    blend([eager], [src])
    torch.compile(blend, backend="aot_eager", fullgraph=True)([compiled], [src])
    assert torch.equal(compiled, eager)
    assert torch.equal(eager, _mmagic_(avg.clone(), src, m))
