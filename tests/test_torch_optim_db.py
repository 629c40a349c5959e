"""FusedAdam / FusedAdamW against PyTorch's own optimizer test data.

The data
--------
``torch.testing._internal.common_optimizers.optim_db`` (shipped in the torch
wheel) is what torch's ``test/test_optim.py`` runs every optimizer on. Its Adam
and AdamW entries give

* ``optim_inputs_func(device)``: constructor kwargs, named by ``desc``;
  ``_get_optim_inputs_including_global_cliquey_kwargs`` adds a ``fused=True``
  and a ``differentiable=True`` twin of each (on the CPU no ``foreach`` twin:
  the CPU has no foreach kernels). For ``dtype=float16`` the db bumps ``eps`` to
  0.1, because 1e-8 is 0 in fp16 and the for-loop's denominator would underflow
  to 0; the helper above does not pass the dtype on, so we apply that here.
* ``optim_error_inputs_func(device, dtype)``: inputs that must fail, with the
  error type (a Warning subclass means "must warn"), a regex for the message
  and when (``CONSTRUCTION_ERROR`` or ``STEP_ERROR``). torch's ``test_errors``
  builds ``optim_cls(params, **kwargs)`` under ``assertRaisesRegex`` (or
  ``assertWarnsRegex``) and, for a step error, builds the optimizer and calls
  ``step()`` under it. Where the db's ``params`` is None it passes None: that
  works only because Adam checks its hyper-parameters before it looks at the
  params. We pass a real parameter instead, so the error must come from the
  kwargs alone. All of Adam's and AdamW's CPU error inputs in torch 2.13 are
  construction errors; a sparse-grad input of our own exercises the step path.

The oracle
----------
torch's class with ``foreach=False`` (the for-loop). ``fused``, ``foreach``
and ``capturable`` are dropped for it: the for-loop refuses ``capturable=True``
on the CPU, and with ``fused=True`` the reference would be torch's fused
kernel, whose arithmetic ours copies (the bit-identical test below covers
it). Ours gets the kwargs as they are: it accepts those flags and they change
nothing. Nothing needs dropping for ours either: torch's fused CPU path takes
every input used here (all four dtypes; Tensor lr with or without
capturable), and it refuses only fused with differentiable or with foreach,
which the db never combines. Each case runs ``STEPS`` steps with the same
seeded grads on identical copies of parameters in several layouts and
compares parameters and state after every step, within tolerances derived
below. Separately, ``fused=True`` on both sides must be bit-identical.

Then contract tests (a)-(g): state_dict loading (old Python-number steps, an
Adam dict into AdamW, param groups missing option keys), state_dict hooks that
store non-dict values, a reset of ``optimizer.state``, hyper-parameter errors
compared with torch's word for word, and what ours refuses on purpose.
"""
import collections
import copy
import math
import re
import warnings

import pytest
import torch

# Importing torch's test utilities runs torch.backends.disable_global_flags()
# (common_utils), after which setting a flag such as torch.backends.cudnn.benchmark
# raises for the rest of the process, as mmengine's Runner does for
# cudnn_benchmark=True or deterministic=True. Torch's own context manager puts the
# flags back as they were, so the other test files of the session are not affected.
with torch.backends.__allow_nonbracketed_mutation():
    from torch.testing._internal.common_optimizers import (
        ErrorOptimizerInput,
        OptimizerErrorEnum,
        OptimizerInput,
        _get_optim_inputs_including_global_cliquey_kwargs,
        optim_db,
    )

import pygan_optim  # noqa: E402
from pygan_optim.optim import FusedAdam, FusedAdamW  # noqa: E402

OURS = {torch.optim.Adam: FusedAdam, torch.optim.AdamW: FusedAdamW}
INFOS = [info for info in optim_db if info.optim_cls in OURS]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
STEPS = 5
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def _slug(text):
    return re.sub(r"[^\w&]+", "_", text).strip("_")


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# ---- inputs --------------------------------------------------------------------------

def _comparison_inputs(info):
    """The db's inputs for one optimizer, as ours must run them on the CPU."""
    cpu = _get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", None, info, skip=("differentiable",))  # refused by ours: see test (g)
    # torch's helper gives no foreach twin on the CPU; ours takes the flag.
    foreach = [OptimizerInput(None, dict(i.kwargs, foreach=True), f"{i.desc} & foreach")
               for i in cpu if not i.kwargs.get("fused")]
    # The db's CUDA-only inputs (capturable; Tensor lr and betas) are plain kwargs that
    # ours takes on the CPU. The CPU list has no Tensor lr input at all.
    seen = {i.desc for i in cpu}
    cuda_only = [i for i in info.optim_inputs_func("cuda") if i.desc not in seen]
    own = [OptimizerInput(None, {"lr": torch.tensor(1e-3)}, "own: Tensor lr"),
           OptimizerInput(None, {"lr": torch.tensor(1e-3), "capturable": True},
                          "own: Tensor lr & capturable")]
    return cpu + foreach + cuda_only + own


def _kwargs(optim_input, dtype):
    """(ours, reference) constructor kwargs for one input and dtype."""
    ours = copy.deepcopy(optim_input.kwargs)
    if dtype == torch.float16:
        ours["eps"] = 0.1  # as optim_inputs_func_adam(dtype=torch.float16) does
    ref = {k: v for k, v in copy.deepcopy(ours).items() if k not in IMPLEMENTATION_FLAGS}
    return ours, dict(ref, foreach=False)


def _case_id(torch_cls, optim_input, dtype=None):
    parts = [torch_cls.__name__, _slug(optim_input.desc)]
    return "-".join(parts + ([_dtype_name(dtype)] if dtype is not None else []))


CASES = [pytest.param(info.optim_cls, optim_input, dtype,
                      id=_case_id(info.optim_cls, optim_input, dtype))
         for info in INFOS for optim_input in _comparison_inputs(info) for dtype in DTYPES]


# ---- layouts ---------------------------------------------------------------------------

# name: (shape allocated, the param taken from it, the grad taken from its own allocation)
LAYOUTS = {
    "contiguous": ((8, 16), lambda t: t, lambda t: t),
    "transposed": ((16, 24), lambda t: t.t(), lambda t: t.t()),  # dense, not contiguous
    # A view with gaps: the elements between must never be written.
    "strided slice": ((10, 40), lambda t: t[1::2, ::3], lambda t: t[1::2, ::3]),
    "channels_last": ((2, 3, 4, 5), lambda t: t.contiguous(memory_format=torch.channels_last),
                      lambda t: t.contiguous(memory_format=torch.channels_last)),
    "0-dim": ((), lambda t: t, lambda t: t),
    "empty": ((0, 3), lambda t: t, lambda t: t),
    "odd size": ((1031,), lambda t: t, lambda t: t),  # prime: a tail for every vector width
    # Param and grad of different strides (how a transposed weight's grad often comes).
    "transposed, contiguous grad": ((16, 24), lambda t: t.t(), lambda t: t.t().contiguous()),
}


def _values(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _layout_param(name, dtype, seed):
    """(allocation, param) with seeded values: the same for the same seed."""
    shape, view, _ = LAYOUTS[name]
    base = _values(shape, dtype, seed)
    return base, view(base)


def _layout_grad(name, dtype, seed):
    shape, _, view = LAYOUTS[name]
    return view(_values(shape, dtype, seed))


def _gaps(name):
    """Mask of the allocation's elements that are not in the param."""
    shape, view, _ = LAYOUTS[name]
    mask = torch.ones(shape, dtype=torch.bool)
    view(mask).fill_(False)  # a no-op where the param is a copy (channels_last)
    return mask


# ---- the side-by-side comparison and its tolerances ------------------------------------
#
# Both sides evaluate the same expressions on the same inputs; they differ in how
# often and in which precision they round. For a quantity X, after each step the
# allowed |ours - reference| grows by a per-step budget, summed over the steps
# (the trajectories are never re-synchronised, so the differences add up):
#
#  * param: 2 ulp(p) + (K_UPDATE eps + delta_t) lr R_t.
#      The for-loop rounds p twice a step in AdamW (the decay p * (1 - lr wd),
#      then p + u), once in Adam; ours once. The update u = step_size m^/denom
#      passes through about 6 roundings in the for-loop (step_size, sqrt, /bc2,
#      + eps, the divide, the multiply) and 4 in ours, 0.5 eps each, and torch's
#      sqrt is not always correctly rounded (1 ulp, NOTES.md): K_UPDATE = 8
#      relative. |u| <= lr R_t: by Cauchy-Schwarz, with m^ = sum a_i g_i and
#      v^ = sum b_i g_i^2 (the bias-corrected weights), |m^| <= sqrt(sum a_i^2/b_i)
#      sqrt(v^) = R_t sqrt(v^) for any grads (R_5 = 1.011 for the default betas).
#      delta_t: with lr or betas given as (float32) Tensors, the for-loop computes
#      step_size and sqrt(1 - beta2^t) in float32 Tensor arithmetic, not in
#      Python floats; delta_t is that rounding, evaluated the same way. It is 0
#      for float hyper-parameters, and it is what bounds float64 params with a
#      Tensor lr (to ~1e-7 relative of the update, against ~1e-15 otherwise).
#      Likewise AdamW's decay factor 1 - lr wd, a float32 Tensor there: + its
#      rounding times |p|.
#  * exp_avg m: ulp(m) + (1 - beta1) D + dw (S + |m_prev|).
#      One rounding of m on each side (ours stores m in the param dtype too):
#      ulp(m). Both lerp the same way, so cancellation in m costs nothing more;
#      what differs is the grad they lerp towards: the for-loop adds wd p to the
#      grad as a separate op, rounding wd p and the sum (2 x 0.5 eps of the
#      terms' size S = |g| + wd |p_prev|, even where g and wd p cancel), and the
#      params the two sides decay differ by their budget so far, B_p:
#      D = K_STATE (eps S + wd B_p), K_STATE = 2 for margin; D = 0 without L2
#      decay (AdamW, or wd = 0): the grad is used as given. dw: with Tensor
#      betas the for-loop lerps with beta1 cast to the param dtype (torch's
#      workaround for pytorch#140601), which in bf16 turns 0.9 into 0.8984375:
#      dw = |beta1 - dtype(beta1)|.
#  * exp_avg_sq / max_exp_avg_sq v: 2 ulp(v) + (1 - beta2) (2 S D + D^2):
#      two roundings in the for-loop (mul, addcmul), one in ours, 1.5 ulp; and
#      the squared grads differ by |g'^2 - g^2| <= 2 |g| D + D^2. No
#      cancellation (all terms >= 0).
#  * step: exactly equal, same dtype.
# eps is the param dtype's machine epsilon; ulp() is the spacing of the dtype at
# the reference value, subnormals included (fp16's exp_avg_sq goes subnormal).
# For fp32 / fp64 with float hyper-parameters these come to ~1e-6 / ~1e-15
# relative of p over 5 steps; for bf16 / fp16, where the for-loop itself
# computes in the low dtype, to a couple of dtype ulps per step.

K_UPDATE = 8
K_STATE = 2


def ulp(x):
    """Spacing of x's dtype at |x| (the distance to the next representable value)."""
    a = x.detach().abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def _update_bound(beta1, beta2, t):
    """R_t: |m^_t| <= R_t sqrt(v^_t) for every grad sequence (see above)."""
    a = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t) for i in range(1, t + 1)]
    b = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t) for i in range(1, t + 1)]
    return math.sqrt(sum(ai * ai / bi for ai, bi in zip(a, b)))


def _scalar_rounding(group, t):
    """delta_t: relative rounding of the for-loop's step_size and sqrt(1 - beta2^t)."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    if not any(torch.is_tensor(x) for x in (lr, beta1, beta2)):
        return 0.0  # Python floats on both sides
    exact_step_size = float(lr) / (1 - float(beta1) ** t)
    exact_bc2_sqrt = math.sqrt(1 - float(beta2) ** t)
    step_size = float(lr / (1 - beta1 ** float(t)))  # the for-loop's arithmetic
    bc2_sqrt = float((1 - beta2 ** float(t)) ** 0.5)
    return abs(step_size / exact_step_size - 1) + abs(bc2_sqrt / exact_bc2_sqrt - 1)


def _decay_rounding(group):
    """AdamW's for-loop multiplies p by 1 - lr wd: a float32 Tensor when lr is one."""
    lr, wd = group["lr"], group["weight_decay"]
    if not (group["decoupled_weight_decay"] and torch.is_tensor(lr)):
        return 0.0
    return abs(float(1 - lr * wd) - (1 - float(lr) * wd))


def _lerp_weight_rounding(group, dtype):
    beta1 = group["betas"][0]
    if not torch.is_tensor(beta1):
        return 0.0
    return abs(float(beta1.to(dtype)) - float(beta1))


def _group_of(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


class SideBySide:
    """Ours and the reference on identical params and grads, compared after each step."""

    def __init__(self, ours, ref, ours_params, ref_params, names=None, grad=None):
        self.ours, self.ref = ours, ref
        self.ours_params, self.ref_params = list(ours_params), list(ref_params)
        self.names = names or [f"param {i}" for i in range(len(self.ref_params))]
        self.grad = grad or (lambda i, p, seed: _values(p.shape, p.dtype, seed))
        self.budgets = [collections.defaultdict(float) for _ in self.ref_params]

    def step(self, seed):
        grads = []
        for i, (a, b) in enumerate(zip(self.ours_params, self.ref_params)):
            # Built twice rather than cloned: a clone of a strided view is dense.
            a.grad = self.grad(i, a, 1000 * seed + i)
            b.grad = self.grad(i, b, 1000 * seed + i)
            assert a.grad.stride() == b.grad.stride()
            grads.append(b.grad)
        before = [(b.detach().to(torch.float64, copy=True), self._exp_avg(b))
                  for b in self.ref_params]
        self.ours.step()
        self.ref.step()
        assert len(self.ours.state) == len(self.ref.state)  # state for the same params
        for i, (g, (p_prev, m_prev)) in enumerate(zip(grads, before)):
            self._check(i, g, p_prev, m_prev, seed)

    def _exp_avg(self, p):
        m = self.ref.state[p].get("exp_avg") if p in self.ref.state else None
        return (torch.zeros_like(p, dtype=torch.float64) if m is None
                else m.to(torch.float64, copy=True))

    def _check(self, i, g, p_prev, m_prev, seed):
        a, b, name = self.ours_params[i], self.ref_params[i], self.names[i]
        ours_state, ref_state = self.ours.state[a], self.ref.state[b]
        where = f"{name} {tuple(b.shape)} {_dtype_name(b.dtype)}, step seed {seed}"
        assert set(ours_state) == set(ref_state), where
        assert ours_state["step"].dtype == ref_state["step"].dtype, where
        assert float(ours_state["step"]) == float(ref_state["step"]), where

        group = _group_of(self.ref, b)
        t = int(ref_state["step"])
        eps = torch.finfo(b.dtype).eps
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta1, beta2 = (float(x) for x in group["betas"])
        # L2 weight decay (Adam) puts wd p into the grad; AdamW's decay is not in it.
        wd_grad = 0.0 if group["decoupled_weight_decay"] else wd
        size = g.double().abs() + wd_grad * p_prev.abs()  # S
        budget = self.budgets[i]
        # D; without L2 decay both sides use the given grad (or -grad) as it is.
        grad_gap = K_STATE * (eps * size + wd_grad * budget["param"]) if wd_grad else 0.0
        budget["param"] = budget["param"] + 2 * ulp(b) + (
            K_UPDATE * eps + _scalar_rounding(group, t)) * lr * _update_bound(beta1, beta2, t) + (
            _decay_rounding(group) * p_prev.abs())
        budget["exp_avg"] = budget["exp_avg"] + ulp(ref_state["exp_avg"]) + (
            (1 - beta1) * grad_gap
            + _lerp_weight_rounding(group, b.dtype) * (size + m_prev.abs()))
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            if key in ref_state:
                budget[key] = budget[key] + 2 * ulp(ref_state[key]) + (1 - beta2) * (
                    2 * size * grad_gap + grad_gap * grad_gap)

        pairs = [("param", a, b)]
        for key, value in ref_state.items():
            if key != "step" and torch.is_tensor(value):
                pairs.append((key, ours_state[key], value))
            elif key != "step":  # put there by a hook: kept as it is
                assert ours_state[key] == value, (where, key)
        for key, x, y in pairs:
            assert x.dtype == y.dtype and x.shape == y.shape, (where, key)
            if key != "param":  # state laid out as torch lays it out (preserve_format)
                assert x.stride() == y.stride(), (where, key, x.stride(), y.stride())
            assert torch.isfinite(y).all(), f"{where}: reference {key} not finite"
            assert torch.isfinite(x).all(), f"{where}: {key} not finite"
            if y.numel() == 0:
                continue
            diff = (x.double() - y.double()).abs()
            excess = diff - budget[key]
            worst = excess.argmax()
            assert excess.flatten()[worst] <= 0, (
                f"{where}: {key} differs by {diff.flatten()[worst].item():.3e} where "
                f"{budget[key].flatten()[worst].item():.3e} is allowed (ours "
                f"{x.flatten()[worst].item()!r}, torch {y.flatten()[worst].item()!r})")


# ---- every db input, every dtype, every layout -----------------------------------------

@pytest.mark.parametrize("torch_cls, optim_input, dtype", CASES)
def test_matches_torch_for_loop(torch_cls, optim_input, dtype):
    """All layouts as one param group, so one step also covers mixed layouts."""
    ours_kwargs, ref_kwargs = _kwargs(optim_input, dtype)
    names = list(LAYOUTS)
    ours = [_layout_param(name, dtype, seed) for seed, name in enumerate(names)]
    ref = [_layout_param(name, dtype, seed) for seed, name in enumerate(names)]
    initial = [base.clone() for base, _ in ref]
    run = SideBySide(OURS[torch_cls]([p for _, p in ours], **ours_kwargs),
                     torch_cls([p for _, p in ref], **ref_kwargs),
                     [p for _, p in ours], [p for _, p in ref], names,
                     grad=lambda i, p, seed: _layout_grad(names[i], dtype, seed))
    for step in range(1, STEPS + 1):
        run.step(step)
    for name, (base, _), before in zip(names, ours, initial):
        gaps = _gaps(name)
        assert torch.equal(base[gaps], before[gaps]), f"{name}: elements outside the view written"


# ---- bit-identical to torch's fused CPU Adam --------------------------------------------

FUSED_CASES = [pytest.param(info.optim_cls, optim_input, dtype,
                            id=_case_id(info.optim_cls, optim_input, dtype))
               for info in INFOS
               for optim_input in (
                   [i for i in _get_optim_inputs_including_global_cliquey_kwargs(
                       "cpu", None, info, skip=("differentiable",)) if i.kwargs["fused"]]
                   + [OptimizerInput(None, {"lr": torch.tensor(1e-3), "fused": True},
                                     "own: Tensor lr & fused")])
               for dtype in DTYPES]


@pytest.mark.parametrize("torch_cls, optim_input, dtype", FUSED_CASES)
def test_bit_identical_to_torch_fused(one_thread, torch_cls, optim_input, dtype):
    if (torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")
            or pygan_optim.cpu_capability() == "default"):
        pytest.skip("torch's default-capability build does not use FMAs as ours does "
                    f"(torch {torch.backends.cpu.get_cpu_capability()}, "
                    f"ours {pygan_optim.cpu_capability()})")
    kwargs, _ = _kwargs(optim_input, dtype)
    shapes = [(64,), (16, 8), (2, 4, 8, 16)]
    ours = [_values(shape, dtype, i) for i, shape in enumerate(shapes)]
    ref = [_values(shape, dtype, i) for i, shape in enumerate(shapes)]
    o = OURS[torch_cls](ours, **copy.deepcopy(kwargs))
    t = torch_cls(ref, **copy.deepcopy(kwargs))
    for step in range(1, STEPS + 1):
        for i, (a, b) in enumerate(zip(ours, ref)):
            a.grad = _values(a.shape, dtype, 1000 * step + i)
            b.grad = a.grad.clone()
        o.step()
        t.step()
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert torch.equal(a, b), f"step {step}: param {tuple(a.shape)}"
            assert set(o.state[a]) == set(t.state[b])
            for key, value in t.state[b].items():
                assert o.state[a][key].dtype == value.dtype, (step, key)
                assert torch.equal(o.state[a][key], value), (step, tuple(a.shape), key)


# ---- the db's error inputs -------------------------------------------------------------

def _own_error_inputs():
    """A step error: torch's Adam refuses sparse grads in step(). A dense param
    comes first, so torch's loop has created its state when it meets the sparse one."""
    dense, sparse = torch.randn(4, 3), torch.randn(4, 3)
    dense.grad, sparse.grad = torch.randn(4, 3), torch.randn(4, 3).to_sparse()
    return [ErrorOptimizerInput(
        OptimizerInput([dense, sparse], {}, "own: sparse grad after a dense one"),
        error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError,
        # torch says "Adam does not ..." for AdamW too; so does ours, naming the parameter.
        error_regex="Adam does not support sparse gradients")]


ERROR_CASES = [pytest.param(info.optim_cls, error_input,
                            id=_case_id(info.optim_cls, error_input.optimizer_error_input))
               for info in INFOS
               for error_input in (info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
                                   + _own_error_inputs())]


def _error_params(optim_input):
    if optim_input.params is None:
        return [torch.randn(2, 2)]
    return copy.deepcopy(optim_input.params)  # keeps the aliasing of duplicates, and grads


def _outcome(call):
    """(exception type, message, warnings) of call()."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except Exception as error:  # noqa: BLE001 - compared below
            return type(error), str(error), [(w.category, str(w.message)) for w in caught]
    return None, None, [(w.category, str(w.message)) for w in caught]


def _expect(outcome, error_input, who):
    raised, message, caught = outcome
    expected, regex = error_input.error_type, error_input.error_regex
    if issubclass(expected, Warning):
        assert raised is None, f"{who} raised {raised.__name__}: {message}"
        assert any(issubclass(c, expected) and re.search(regex, m) for c, m in caught), (
            f"{who} gave no {expected.__name__} matching {regex!r}: {caught}")
    else:
        assert raised is expected, f"{who} raised {raised} ({message}), expected {expected}"
        assert re.search(regex, message), f"{who}: {message!r} does not match {regex!r}"


def _snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
             if p in opt.state}
    return params, state


def _assert_same_snapshot(a, b):
    (params_a, state_a), (params_b, state_b) = a, b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b)), "params changed"
    assert state_a.keys() == state_b.keys(), f"state entries {state_a.keys()} -> {state_b.keys()}"
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys(), f"state of param {i}"
        for k, v in state_a[i].items():
            assert torch.equal(v, state_b[i][k]) if torch.is_tensor(v) else v == state_b[i][k]


@pytest.mark.parametrize("torch_cls, error_input", ERROR_CASES)
def test_error_inputs(torch_cls, error_input):
    optim_input = error_input.optimizer_error_input
    kwargs = optim_input.kwargs
    ours_cls = OURS[torch_cls]
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        ours = _outcome(lambda: ours_cls(_error_params(optim_input), **copy.deepcopy(kwargs)))
        ref = _outcome(lambda: torch_cls(_error_params(optim_input), **copy.deepcopy(kwargs)))
        _expect(ref, error_input, torch_cls.__name__)  # the oracle holds
        _expect(ours, error_input, ours_cls.__name__)
        # Construction is torch's own code: even the messages are the same.
        assert ours == ref
    else:
        for cls in (torch_cls, ours_cls):
            params = _error_params(optim_input)
            opt = cls(params, **copy.deepcopy(kwargs))
            for p in (p for g in opt.param_groups for p in g["params"]):
                if p.grad is None:  # as in training: the step has grads to apply
                    p.grad = _values(p.shape, p.dtype, 7)
            before = _snapshot(opt)
            _expect(_outcome(opt.step), error_input, cls.__name__)
            if cls is ours_cls:  # torch's loop may have created state; ours changes nothing
                _assert_same_snapshot(before, _snapshot(opt))


# ---- contracts: state_dict, hooks, state resets, hyper-parameter errors, refusals -------

PAIRS = [pytest.param(torch_cls, id=torch_cls.__name__) for torch_cls in OURS]
SHAPES = [(3, 4), (5,), ()]


def _params(dtype=torch.float32):
    return [_values(shape, dtype, seed) for seed, shape in enumerate(SHAPES)]


def _trained_reference(torch_cls, steps=3, **kwargs):
    """torch's for-loop optimizer after `steps` steps: (optimizer, params)."""
    params = _params()
    opt = torch_cls(params, foreach=False, **kwargs)
    for step in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = _values(p.shape, p.dtype, 1000 * step + i)
        opt.step()
    return opt, params


def _both_loaded(ours_cls, ref_cls, params, saved):
    """Ours and torch's class on copies of params, each loaded from its own copy of saved."""
    ours_params = [p.detach().clone() for p in params]
    ref_params = [p.detach().clone() for p in params]
    ours, ref = ours_cls(ours_params), ref_cls(ref_params)
    ours.load_state_dict(copy.deepcopy(saved))
    ref.load_state_dict(copy.deepcopy(saved))
    return SideBySide(ours, ref, ours_params, ref_params)


def _options(opt):
    return [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]


@pytest.mark.parametrize("number", [int, float], ids=["int", "float"])
def test_a_state_dict_with_python_number_steps(number):
    """torch < 1.12 saved each param's step as a Python number."""
    trained, params = _trained_reference(torch.optim.Adam, weight_decay=0.1, amsgrad=True)
    saved = trained.state_dict()
    for state in saved["state"].values():
        state["step"] = number(state["step"].item())
    run = _both_loaded(FusedAdam, torch.optim.Adam, params, saved)
    for p in run.ours_params:
        assert torch.is_tensor(run.ours.state[p]["step"]) and float(run.ours.state[p]["step"]) == 3
    assert _options(run.ours) == _options(run.ref)
    for step in range(4, 4 + STEPS):
        run.step(step)


def test_b_adam_state_dict_into_fused_adamw():
    trained, params = _trained_reference(torch.optim.Adam, weight_decay=0.1)
    saved = trained.state_dict()
    assert saved["param_groups"][0]["decoupled_weight_decay"] is False
    run = _both_loaded(FusedAdamW, torch.optim.AdamW, params, saved)
    assert run.ours.param_groups[0]["decoupled_weight_decay"] is True
    assert _options(run.ours) == _options(run.ref)
    for step in range(4, 4 + STEPS):
        run.step(step)  # AdamW's decoupled decay, on torch AdamW's trajectory


OPTION_KEYS = ("foreach", "fused", "capturable", "differentiable", "maximize",
               "decoupled_weight_decay")


@pytest.mark.parametrize("torch_cls", PAIRS)
def test_c_old_param_groups_get_missing_options(torch_cls):
    trained, params = _trained_reference(torch_cls, weight_decay=0.1)
    saved = trained.state_dict()
    for group in saved["param_groups"]:
        for key in OPTION_KEYS:
            del group[key]
    run = _both_loaded(OURS[torch_cls], torch_cls, params, saved)
    assert _options(run.ours) == _options(run.ref)
    assert all(key in group for group in run.ours.param_groups for key in OPTION_KEYS)
    for step in range(4, 4 + STEPS):
        run.step(step)


def _add_hooks(opt):
    """Hooks that store what is not a parameter's state dict, in the optimizer's
    state and in the saved dict."""
    def before_saving(o):
        o.state["saves"] = o.state.get("saves", 0) + 1  # an int next to the param states

    def after_saving(o, state_dict):
        state_dict["state"][0]["visits"] = 3  # a number inside a param's state
        state_dict["state"]["note"] = (1, 2)  # an entry keyed by a string
        return state_dict

    def before_loading(o, state_dict):
        return {**state_dict, "state": {**state_dict["state"], "loaded_from": 7}}

    def after_loading(o):
        o.state["loads"] = o.state.get("loads", 0) + 1

    opt.register_state_dict_pre_hook(before_saving)
    opt.register_state_dict_post_hook(after_saving)
    opt.register_load_state_dict_pre_hook(before_loading)
    opt.register_load_state_dict_post_hook(after_loading)
    return opt


def _assert_same_structure(ours, ref, where="state_dict"):
    """Same keys, same non-tensor values, tensors of the same dtype and shape, at every level."""
    assert type(ours) is type(ref) or (isinstance(ours, dict) and isinstance(ref, dict)), where
    if isinstance(ref, dict):
        assert ours.keys() == ref.keys(), (where, ours.keys(), ref.keys())
        for key in ref:
            _assert_same_structure(ours[key], ref[key], f"{where}[{key!r}]")
    elif isinstance(ref, (list, tuple)):
        assert len(ours) == len(ref), where
        for i, (x, y) in enumerate(zip(ours, ref)):
            _assert_same_structure(x, y, f"{where}[{i}]")
    elif torch.is_tensor(ref):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, where
    else:
        assert ours == ref, where


def _state_by_index(opt):
    params = [p for group in opt.param_groups for p in group["params"]]
    return {next((i for i, p in enumerate(params) if p is k), k) if torch.is_tensor(k) else k: v
            for k, v in opt.state.items()}


@pytest.mark.parametrize("torch_cls", PAIRS)
def test_d_state_dict_hooks_with_non_dict_values(torch_cls):
    ours_params, ref_params = _params(), _params()
    kwargs = dict(weight_decay=0.1, foreach=False)  # the same groups on both sides
    run = SideBySide(_add_hooks(OURS[torch_cls](ours_params, **kwargs)),
                     _add_hooks(torch_cls(ref_params, **kwargs)),
                     ours_params, ref_params)
    for step in range(1, 3):
        run.step(step)
    ours_saved, ref_saved = run.ours.state_dict(), run.ref.state_dict()
    _assert_same_structure(ours_saved, ref_saved)
    _assert_same_structure(_state_by_index(run.ours), _state_by_index(run.ref), "state")
    assert ours_saved["state"]["saves"] == 1 and ours_saved["state"][0]["visits"] == 3
    # Both saved dicts into fresh optimizers with the same hooks, and on from there.
    ours_params = [p.detach().clone() for p in run.ours_params]
    ref_params = [p.detach().clone() for p in run.ref_params]
    ours = _add_hooks(OURS[torch_cls](ours_params))
    ref = _add_hooks(torch_cls(ref_params))
    ours.load_state_dict(ours_saved)
    ref.load_state_dict(ref_saved)
    _assert_same_structure(_state_by_index(ours), _state_by_index(ref), "loaded state")
    assert ours.state["loaded_from"] == 7 and ours.state["loads"] == 1
    run = SideBySide(ours, ref, ours_params, ref_params)
    for step in range(3, 3 + STEPS):
        run.step(step)
    _assert_same_structure(ours.state_dict(), ref.state_dict())


@pytest.mark.parametrize("torch_cls", PAIRS)
def test_e_state_replaced_by_a_fresh_defaultdict(torch_cls):
    """A reset of the moments mid-training: steps restart from 1 on both sides."""
    ours_params, ref_params = _params(), _params()
    run = SideBySide(OURS[torch_cls](ours_params, weight_decay=0.1, amsgrad=True),
                     torch_cls(ref_params, weight_decay=0.1, amsgrad=True, foreach=False),
                     ours_params, ref_params)
    for step in range(1, 4):
        run.step(step)
    run.ours.state = collections.defaultdict(dict)
    run.ref.state = collections.defaultdict(dict)
    for step in range(4, 4 + STEPS):
        run.step(step)
    assert all(float(run.ours.state[p]["step"]) == STEPS for p in ours_params)


# (f) Hyper-parameter errors, compared with torch's: same type, same message.
HYPER_PARAMETER_CASES = {
    "lr Tensor of 2 elements": dict(lr=torch.tensor([1e-3, 1e-3])),
    "lr Tensor of shape (1,)": dict(lr=torch.tensor([1e-3])),  # accepted by both
    "betas (Tensor, float)": dict(betas=(torch.tensor(0.9), 0.999)),
    "betas (float, Tensor)": dict(betas=(0.9, torch.tensor(0.999))),
    "betas[0] Tensor of 2 elements": dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.999))),
    "betas[1] Tensor of 2 elements": dict(betas=(torch.tensor(0.9), torch.tensor([0.9, 0.9]))),
    "lr Tensor & foreach": dict(lr=torch.tensor(1e-3), foreach=True),
    "lr Tensor & foreach & capturable": dict(lr=torch.tensor(1e-3), foreach=True,
                                             capturable=True),  # accepted by both
    "betas Tensors & foreach": dict(betas=(torch.tensor(0.9), torch.tensor(0.999)),
                                    foreach=True),
    "lr Tensor of 2 elements & foreach": dict(lr=torch.tensor([1e-3, 1e-3]), foreach=True),
    "negative lr Tensor": dict(lr=torch.tensor(-1e-3)),
}


@pytest.mark.parametrize("kwargs", list(HYPER_PARAMETER_CASES.values()),
                         ids=[_slug(k) for k in HYPER_PARAMETER_CASES])
@pytest.mark.parametrize("torch_cls", PAIRS)
def test_f_hyper_parameter_errors_as_torch(torch_cls, kwargs):
    ours = _outcome(lambda: OURS[torch_cls](_params(), **copy.deepcopy(kwargs)))
    ref = _outcome(lambda: torch_cls(_params(), **copy.deepcopy(kwargs)))
    assert ours == ref


@pytest.mark.parametrize("torch_cls", PAIRS)
def test_f_lr_tensor_set_later_with_foreach_refuses_the_step_as_torch(torch_cls):
    """torch checks in step() too: lr made a Tensor after construction (as a scheduler
    might) with foreach=True and capturable=False."""
    outcomes = []
    for cls in (OURS[torch_cls], torch_cls):
        params = _params()
        opt = cls(params, foreach=True)
        for i, p in enumerate(params):
            p.grad = _values(p.shape, p.dtype, i)
        opt.param_groups[0]["lr"] = torch.tensor(1e-3)
        before = _snapshot(opt)
        outcomes.append(_outcome(opt.step)[:2])
        if cls is OURS[torch_cls]:
            _assert_same_snapshot(before, _snapshot(opt))
    assert outcomes[0] == outcomes[1] and outcomes[0][0] is RuntimeError


# (g) What ours refuses: differentiable=True (no autograd formula) and complex
# params, each with an error naming the option or tensor, before any state changes.
DIFFERENTIABLE_INPUTS = [
    pytest.param(info.optim_cls, optim_input, id=_case_id(info.optim_cls, optim_input))
    for info in INFOS
    for optim_input in _get_optim_inputs_including_global_cliquey_kwargs("cpu", None, info)
    if optim_input.kwargs.get("differentiable")]


@pytest.mark.parametrize("torch_cls, optim_input", DIFFERENTIABLE_INPUTS)
def test_g_differentiable_is_refused_by_name(torch_cls, optim_input):
    torch_cls(_params(), **copy.deepcopy(optim_input.kwargs))  # torch takes it
    with pytest.raises(ValueError, match="differentiable=True"):
        OURS[torch_cls](_params(), **copy.deepcopy(optim_input.kwargs))


@pytest.mark.parametrize("how", ["param group edit", "load_state_dict"], ids=_slug)
@pytest.mark.parametrize("torch_cls", PAIRS)
def test_g_differentiable_set_later_refuses_the_step(torch_cls, how):
    params = _params()
    opt = OURS[torch_cls]([{"params": params[:1]}, {"params": params[1:]}])
    for i, p in enumerate(params):
        p.grad = _values(p.shape, p.dtype, i)
    if how == "param group edit":
        opt.param_groups[1]["differentiable"] = True
    else:
        saved = opt.state_dict()
        saved["param_groups"][1]["differentiable"] = True
        opt.load_state_dict(saved)
    before = _snapshot(opt)
    with pytest.raises(RuntimeError, match=r"differentiable=True \(param group 1"):
        opt.step()
    _assert_same_snapshot(before, _snapshot(opt))


@pytest.mark.parametrize("torch_cls", PAIRS)
def test_h_state_copies_are_torchs(torch_cls):
    """optimizer.state.copy(), copy.copy and | give torch's defaultdict(dict),
    holding the same per-parameter dicts (shallow, as torch's copies)."""
    results = []
    for cls in (OURS[torch_cls], torch_cls):
        params = _params()
        opt = cls(params)
        for i, p in enumerate(params):
            p.grad = _values(p.shape, p.dtype, i)
        opt.step()
        copies = [opt.state.copy(), copy.copy(opt.state), opt.state | {}, {} | opt.state]
        for c in copies:
            assert type(c) is collections.defaultdict and c.default_factory is dict
            assert list(c) == list(opt.state)
            assert all(c[p] is opt.state[p] for p in params)
        results.append(sorted(copies[0][params[0]]))
    assert results[0] == results[1]


@pytest.mark.parametrize("where", ["same group", "second group"], ids=_slug)
@pytest.mark.parametrize("torch_cls", PAIRS)
def test_g_complex_params_are_refused_by_name(torch_cls, where):
    real, cplx = _values((3, 4), torch.float32, 0), torch.randn(3, 4, dtype=torch.complex64)
    params = [real, cplx] if where == "same group" else [{"params": [real]}, {"params": [cplx]}]
    opt = OURS[torch_cls](params)
    real.grad, cplx.grad = _values((3, 4), torch.float32, 1), torch.randn_like(cplx)
    before = _snapshot(opt)
    index = "parameter 1 of param group 0" if where == "same group" else (
        "parameter 0 of param group 1")
    named = rf"{index} \(shape \(3, 4\)\) has dtype torch.complex64"
    with pytest.raises(RuntimeError, match=named):
        opt.step()
    _assert_same_snapshot(before, _snapshot(opt))
    assert len(opt.state) == 0
