"""Session 41 hunt: MMEngine's parameter schedulers and hyper-parameter changes driven
through pygan_optim's optimizers and wrappers.

What it hunts: a schedule (lr, beta1 as "momentum", weight_decay) applied by MMEngine
0.10.7's schedulers to our wrappers (``OptimWrapper``/``AmpOptimWrapper`` around
``FusedAdam``/``FusedAdamW``, an ``OptimWrapperDict`` of them) that ends up with other
parameters, optimizer state, step counts, ``get_lr()``/``get_momentum()`` values or
scheduler state than the same schedule on the native path; a resume (wrapper and
scheduler state dicts through ``torch.save``) that continues differently; a refused
step that half-updates.

Oracle: the same inputs and schedule on MMEngine's own ``OptimWrapper`` around
``torch.optim.Adam(fused=True)`` / ``AdamW(fused=True)`` (for the Runner runs:
``type='OptimWrapper', optimizer=dict(type='Adam', fused=True)`` against
``type='FusedOptimWrapper', optimizer=dict(type='FusedAdam')``).

Operations: LinearLR, MultiStepLR, CosineAnnealingLR, OneCycleLR (two and three
phases, cos and linear), PolyLR, ExponentialLR, ConstantLR, StepLR, CosineRestartLR,
ReduceOnPlateauLR (a fake metric), chains of them, by_epoch True/False and
``build_iter_from_epoch`` (convert_to_iter_based); LinearMomentum,
CosineAnnealingMomentum, MultiStepMomentum, StepMomentum, ConstantMomentum,
ReduceOnPlateauMomentum moving beta1 between 0 and non-zero with
``keep_grad_min_bytes_cpu=0`` (so our updates keep grads as exp_avg while beta1 == 0);
ParamSchedulers on ``weight_decay`` and ``eps``; accumulative_counts > 1 (schedulers
step per iteration, the optimizer per window); lr (and betas) as 0-d float32 / float64
Tensors; wrapper and scheduler state dicts saved and resumed; an OptimWrapperDict with
per-key schedulers; random scheduler chains with accumulation, CPU AMP with skipped
steps, Tensor lr and amsgrad (24 seeds here, 1000 run while hunting); Runner runs
(by_epoch=False, FusedOptimWrapper and FusedAmpOptimWrapper) saved at iter k and
resumed from our own and from the native run's checkpoint; out-of-range scheduled
values (beta1 >= 1, lr NaN), which our op refuses where torch runs them (NOTES.md):
the refusal must change nothing.

Result: no bug found; these tests pin what held.

Tolerances: none. Everything is compared bit for bit (torch.equal / ==): README promises
bit identity with torch's fused CPU Adam except torch's scalar tails (avoided: one
thread, every tensor a multiple of 128 elements), beta1 == 0 with non-finite values
(avoided: all grads finite) and non-power-of-two loss scales (avoided: no AMP here).
The schedules themselves are MMEngine's Python arithmetic on both sides, on identical
inputs, so they are equal exactly.
"""
import copy
import io
import itertools
import math
import random
import warnings

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper as MMOptimWrapper
from mmengine.optim import OptimWrapperDict
from mmengine.optim import scheduler as S
from mmengine.registry import MODELS, PARAM_SCHEDULERS
from mmengine.runner import Runner
from torch.utils.data import DataLoader

from pygan_optim import FusedAdam, FusedAdamW, OptimWrapper

pytestmark = pytest.mark.usefixtures("keep_small_cpu_grads", "one_thread")

# Multiples of 128 elements (off torch's scalar tails); the first is large enough
# (>= 32768 elements) for an update to keep its grad as exp_avg.
SHAPES = [(33024,), (128, 96), (256,)]
PAIRS = [(FusedAdam, torch.optim.Adam), (FusedAdamW, torch.optim.AdamW)]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # "scheduler.step() before optimizer.step()" and the like: both sides alike.
        warnings.simplefilter("ignore")
        yield


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def loss_of(params, step, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    # Grads of varied magnitude, finite.
    return sum((p * torch.randn(p.shape, generator=g) * 10.0 ** (step % 3 - 1)).sum()
               for p in params)


def assert_same(opt_a, opt_b, what):
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
        for a, b in zip(ga["params"], gb["params"], strict=True):
            assert torch.equal(a, b), f"{what}: param {tuple(a.shape)}"
            sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
            assert set(sa) == set(sb), f"{what}: state keys"
            for key in sa:
                assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), \
                    f"{what}: {key} of {tuple(a.shape)}"
        keys = set(ga) - {"params", "fused", "foreach"}
        assert keys == set(gb) - {"params", "fused", "foreach"}, what
        for k in keys:
            va, vb = ga[k], gb[k]
            if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
                assert type(va) is type(vb) and torch.equal(va, vb), f"{what}: group {k}"
            else:
                same = va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb))
                assert same and type(va) is type(vb), f"{what}: group {k} {va!r} {vb!r}"


def values(d):
    """get_lr()/get_momentum() as plain lists (Tensor lrs as their float32/64 bits)."""
    return {k: [(v.dtype, v.item()) if isinstance(v, torch.Tensor) else (type(v), v)
                for v in vs] for k, vs in d.items()}


def round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def two_groups(params, **extra):
    return [dict(params=params[:2]), dict(params=params[2:], lr=3e-3, **extra)]


def pair(cls, ref, hp, groups=two_groups, wrapper=(OptimWrapper, MMOptimWrapper), wkw=None):
    A, B = make_params(), make_params()
    wa = wrapper[0](optimizer=cls(groups(A), **hp), **(wkw or {}))
    wb = wrapper[1](optimizer=ref(groups(B), fused=True, **hp), **(wkw or {}))
    return A, B, wa, wb


def run_pair(wa, wb, A, B, make, steps, *, resume_at=None, rebuild=None, metric=None,
             check_each=True):
    """Drives both wrappers and their schedulers for `steps` iterations."""
    sa, sb = make(wa), make(wb)
    for step in range(steps):
        if step == resume_at:
            ck = round_trip(dict(o=wa.state_dict(), s=[s.state_dict() for s in sa],
                                 p=[p.detach() for p in A]))
            A, wa = rebuild(ck["p"])
            sa = make(wa)
            wa.load_state_dict(ck["o"])
            for s, d in zip(sa, ck["s"], strict=True):
                s.load_state_dict(d)
        assert values(wa.get_lr()) == values(wb.get_lr()), f"get_lr at {step}"
        assert values(wa.get_momentum()) == values(wb.get_momentum()), f"momentum {step}"
        wa.update_params(loss_of(A, step))
        wb.update_params(loss_of(B, step))
        for s in sa + sb:
            if metric is not None and isinstance(s, S.ReduceOnPlateauParamScheduler):
                s.step(dict(loss=metric(step)))
            else:
                s.step()
        if check_each:
            assert_same(wa.optimizer, wb.optimizer, f"step {step}")
    assert_same(wa.optimizer, wb.optimizer, "end")
    for s, t in zip(sa, sb, strict=True):
        da, db = s.state_dict(), t.state_dict()
        assert da.keys() == db.keys()
        for k in da:
            if k in ("_last_value", "base_values"):
                assert values({k: da[k]}) == values({k: db[k]}), k
            else:
                assert da[k] == db[k], k
    return wa, wb


# ---- LR schedules, chained, by iteration and by epoch ------------------------------------

LR_SCHEDULES = {
    "linear_multistep": lambda w: [
        S.LinearLR(w, start_factor=0.1, end=4, by_epoch=False),
        S.MultiStepLR(w, milestones=[5, 8], gamma=0.3, by_epoch=False)],
    "cosine_to_zero_then_restart": lambda w: [
        S.CosineAnnealingLR(w, T_max=4, eta_min=0.0, by_epoch=False)],
    "cosine_eta_min_ratio": lambda w: [
        S.CosineAnnealingLR(w, T_max=5, eta_min_ratio=0.01, begin=2, end=9, by_epoch=False)],
    "onecycle_cos": lambda w: [S.OneCycleLR(w, eta_max=0.05, total_steps=13, by_epoch=False)],
    "onecycle_three_phase_linear": lambda w: [
        S.OneCycleLR(w, eta_max=[0.05, 0.02, 0.04], total_steps=13, three_phase=True,
                     anneal_strategy="linear", pct_start=0.4, by_epoch=False)],
    "onecycle_three_phase_cos": lambda w: [
        S.OneCycleLR(w, eta_max=0.05, total_steps=13, three_phase=True, by_epoch=False,
                     final_div_factor=1e3)],
    "poly_exponential": lambda w: [
        S.PolyLR(w, power=2.0, eta_min=1e-5, end=6, by_epoch=False),
        S.ExponentialLR(w, gamma=0.7, begin=6, by_epoch=False)],
    "constant_step_restart": lambda w: [
        S.ConstantLR(w, factor=0.25, end=3, by_epoch=False),
        S.StepLR(w, step_size=2, gamma=0.5, begin=3, end=7, by_epoch=False),
        S.CosineRestartLR(w, periods=[2, 3], restart_weights=[1, 0.5], eta_min=0.0,
                          begin=7, by_epoch=False)],
    # by_epoch schedulers converted to iterations (epochs of 3 iterations), as
    # convert_to_iter_based=True builds them.
    "iter_from_epoch": lambda w: [
        S.LinearLR.build_iter_from_epoch(w, start_factor=0.2, begin=0, end=2, by_epoch=True,
                                         epoch_length=3),
        S.CosineAnnealingLR.build_iter_from_epoch(w, T_max=2, begin=2, end=4, by_epoch=True,
                                                  epoch_length=3)],
}


@pytest.mark.parametrize("name", sorted(LR_SCHEDULES))
@pytest.mark.parametrize("cls, ref", PAIRS, ids=["adam", "adamw"])
def test_lr_schedules_on_our_wrapper_match_native_bit_for_bit(cls, ref, name):
    """Two param groups (one with its own lr), betas (0, 0.99) so the big tensor's
    updates keep its grad; params, state, groups (lr, initial_lr, ...), get_lr and
    the schedulers' state_dicts compared after every step."""
    A, B, wa, wb = pair(cls, ref, dict(lr=1e-2, betas=(0.0, 0.99), weight_decay=1e-2))
    run_pair(wa, wb, A, B, LR_SCHEDULES[name], 12)


@pytest.mark.parametrize("name", ["linear_multistep", "onecycle_three_phase_linear",
                                  "constant_step_restart"])
@pytest.mark.parametrize("resume_at", [3, 7])
def test_lr_schedules_resumed_from_state_dicts(name, resume_at):
    """Our wrapper and schedulers saved with torch.save at step k and loaded into
    new objects (new parameters from the saved values), against the straight
    native run."""
    A, B, wa, wb = pair(FusedAdam, torch.optim.Adam, dict(lr=1e-2, betas=(0.5, 0.99)))

    def rebuild(tensors):
        P = [nn.Parameter(t) for t in tensors]
        return P, OptimWrapper(optimizer=FusedAdam(two_groups(P), lr=1e-2, betas=(0.5, 0.99)))

    run_pair(wa, wb, A, B, LR_SCHEDULES[name], 11, resume_at=resume_at, rebuild=rebuild)


def test_by_epoch_schedulers_stepped_per_epoch():
    """by_epoch=True schedulers stepped once per 'epoch' of 3 iterations (as
    ParamSchedulerHook does), with a momentum scheduler by epoch too."""
    A, B, wa, wb = pair(FusedAdam, torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.99)))

    def make(w):
        return [S.LinearLR(w, start_factor=0.5, end=2), S.MultiStepLR(w, milestones=[3]),
                S.CosineAnnealingMomentum(w, T_max=3, eta_min=0.0)]

    sa, sb = make(wa), make(wb)
    for it in range(15):
        wa.update_params(loss_of(A, it))
        wb.update_params(loss_of(B, it))
        if it % 3 == 2:
            for s in sa + sb:
                s.step()
        assert values(wa.get_momentum()) == values(wb.get_momentum())
        assert_same(wa.optimizer, wb.optimizer, f"iter {it}")


# ---- beta1 schedules: 0 <-> non-zero, grads kept as exp_avg while 0 -------------------------

MOMENTUM_SCHEDULES = {
    # 0.9 linearly to exactly 0 at 4, cosine back up to 0.6 from 0 over 4..8, then
    # MultiStepMomentum with gamma 0 sends it to 0 again at 9.
    "linear_cosine_multistep": lambda w: [
        S.LinearMomentum(w, start_factor=1.0, end_factor=0.0, end=4, by_epoch=False),
        S.CosineAnnealingMomentum(w, T_max=4, eta_min=0.6, begin=4, end=8, by_epoch=False),
        S.MultiStepMomentum(w, milestones=[9], gamma=0.0, by_epoch=False)],
    # ConstantMomentum: beta1 * factor until 3, then divided back (0.9 * 0.5 / 0.5).
    "constant_then_multistep": lambda w: [
        S.ConstantMomentum(w, factor=0.5, end=3, by_epoch=False),
        S.MultiStepMomentum(w, milestones=[5, 7], gamma=0.0, by_epoch=False),
        S.LinearLR(w, start_factor=0.3, end=5, by_epoch=False)],
    "onecycle_with_momentum_steps": lambda w: [
        S.OneCycleLR(w, eta_max=0.03, total_steps=13, three_phase=True, by_epoch=False),
        S.StepMomentum(w, step_size=3, gamma=0.0, by_epoch=False),
        S.CosineAnnealingMomentum(w, T_max=2, eta_min=0.7, begin=6, end=8, by_epoch=False)],
}


@pytest.mark.parametrize("name", sorted(MOMENTUM_SCHEDULES))
@pytest.mark.parametrize("cls, ref", PAIRS, ids=["adam", "adamw"])
def test_momentum_schedules_move_beta1_through_zero(cls, ref, name):
    A, B, wa, wb = pair(cls, ref, dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2))
    wa, _ = run_pair(wa, wb, A, B, MOMENTUM_SCHEDULES[name], 12)
    # MMEngine's wrapper adds a third group (base_param_settings) to a multi-group
    # optimizer: the schedulers write it too.
    assert len(wa.param_groups) == 3


def test_kept_grads_follow_beta1_schedule():
    """Where a momentum scheduler sets beta1 to exactly 0, our update keeps the
    big tensor's grad as exp_avg (keep_grad_min_bytes_cpu=0); elsewhere it
    copies. The values stay the native path's (checked in the test above)."""
    A, _, wa, _ = pair(FusedAdam, torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.999)))
    scheds = MOMENTUM_SCHEDULES["linear_cosine_multistep"](wa)
    p = A[0]
    kept, beta1s = [], []
    for step in range(11):
        loss_of(A, step).backward()
        ptr = p.grad.data_ptr()
        beta1s.append(wa.param_groups[0]["betas"][0])
        wa.step_and_zero_grad(set_to_none=True)
        kept.append(wa.optimizer.state[p]["exp_avg"].data_ptr() == ptr)
        for s in scheds:
            s.step()
    assert kept == [b == 0 for b in beta1s]
    assert True in kept and False in kept


# ---- weight_decay schedules ----------------------------------------------------------------

@pytest.mark.parametrize("cls, ref", PAIRS, ids=["adam", "adamw"])
def test_weight_decay_param_schedulers(cls, ref):
    """ParamSchedulers with param_name='weight_decay' taking it 0 -> non-zero -> 0
    (L2 decay for Adam changes the effective grad of a kept-grad update), with
    beta1 0 and an lr schedule beside them."""
    A, B, wa, wb = pair(cls, ref, dict(lr=1e-2, betas=(0.0, 0.99), weight_decay=0.0),
                        groups=lambda P: [dict(params=P[:2]),
                                          dict(params=P[2:], weight_decay=0.05)])

    def make(w):
        return [
            S.ConstantParamScheduler(w, param_name="weight_decay", factor=0.5, end=2,
                                     by_epoch=False),
            S.CosineAnnealingParamScheduler(w, param_name="weight_decay", T_max=3,
                                            eta_min=0.1, begin=2, end=5, by_epoch=False),
            S.MultiStepParamScheduler(w, param_name="weight_decay", milestones=[7],
                                      gamma=0.0, by_epoch=False),
            S.LinearParamScheduler(w, param_name="eps", start_factor=1e-3, end=4,
                                   by_epoch=False),
            S.ExponentialLR(w, gamma=0.9, by_epoch=False)]

    wa, _ = run_pair(wa, wb, A, B, make, 10)
    assert [g["weight_decay"] for g in wa.param_groups] == [0.0] * 3


# ---- ReduceOnPlateau with a fake metric -----------------------------------------------------

@pytest.mark.parametrize("rule", ["less", "greater"])
def test_reduce_on_plateau_lr_and_momentum(rule):
    """ReduceOnPlateauLR/Momentum stepped with a fake metric every iteration;
    beta1 reduced by factor 0 reaches 0, and resuming their state mid-run."""
    A, B, wa, wb = pair(FusedAdam, torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.99)))

    def make(w):
        return [S.ReduceOnPlateauLR(w, monitor="loss", rule=rule, factor=0.5, patience=1,
                                    cooldown=1, min_value=1e-3),
                S.ReduceOnPlateauMomentum(w, monitor="loss", rule=rule, factor=0.0,
                                          patience=3)]

    def rebuild(tensors):
        P = [nn.Parameter(t) for t in tensors]
        return P, OptimWrapper(optimizer=FusedAdam(two_groups(P), lr=1e-2, betas=(0.9, 0.99)))

    metric = lambda step: [1.0, 0.9, 0.95, 0.97, 0.99, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0][step]
    wa, _ = run_pair(wa, wb, A, B, make, 11, metric=metric, resume_at=6, rebuild=rebuild)
    if rule == "less":
        assert wa.param_groups[0]["betas"][0] == 0.0


# ---- accumulation windows --------------------------------------------------------------------

@pytest.mark.parametrize("cls, ref", PAIRS, ids=["adam", "adamw"])
def test_schedulers_per_iteration_with_accumulation_windows(cls, ref):
    """accumulative_counts=3 over 10 iterations (last window of 1): schedulers step
    each iteration (beta1 moves inside windows), the optimizers at window ends."""
    A, B, wa, wb = pair(cls, ref, dict(lr=1e-2, betas=(0.0, 0.99)),
                        wkw=dict(accumulative_counts=3))
    model = nn.Module()
    for w in (wa, wb):
        w.initialize_count_status(model, 0, 10)

    def make(w):
        return [S.CosineAnnealingMomentum(w, T_max=3, eta_min=0.5, end=4, by_epoch=False),
                S.MultiStepMomentum(w, milestones=[5], gamma=0.0, by_epoch=False),
                S.OneCycleLR(w, eta_max=0.02, total_steps=11, three_phase=True,
                             by_epoch=False)]

    sa, sb = make(wa), make(wb)
    for it in range(10):
        with wa.optim_context(model):
            la = loss_of(A, it)
        with wb.optim_context(model):
            lb = loss_of(B, it)
        wa.update_params(la)
        wb.update_params(lb)
        for s in sa + sb:
            s.step()
        assert_same(wa.optimizer, wb.optimizer, f"iter {it}")
        assert wa._inner_count == wb._inner_count
        assert wa._global_step == wb._global_step
    assert {int(s["step"]) for s in wa.optimizer.state.values()} == {4}


# ---- lr as a 0-d Tensor ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["linear_multistep", "onecycle_three_phase_cos",
                                  "poly_exponential", "beta1_tensor"])
def test_tensor_lr_under_mmengine_schedulers(dtype, name):
    """lr given as a 0-d Tensor (torch's fused Adam takes it): MMEngine's schedulers
    keep the Tensor as initial_lr and write new Tensors (or floats) into lr. In
    "beta1_tensor" the betas are 0-d Tensors too, and momentum schedulers take
    the Tensor beta1 to 0 and back up."""
    def hp():
        betas = ((torch.tensor(0.9, dtype=dtype), torch.tensor(0.99, dtype=dtype))
                 if name == "beta1_tensor" else (0.0, 0.99))
        return dict(lr=torch.tensor(1e-2, dtype=dtype), betas=betas)

    make = LR_SCHEDULES.get(name) or (lambda w: [
        S.LinearMomentum(w, start_factor=1.0, end_factor=0.0, end=3, by_epoch=False),
        S.CosineAnnealingMomentum(w, T_max=3, eta_min=0.7, begin=3, end=6, by_epoch=False),
        S.ExponentialLR(w, gamma=0.9, by_epoch=False)])
    A, B = make_params(), make_params()
    wa = OptimWrapper(optimizer=FusedAdam(A, **hp()))
    wb = MMOptimWrapper(optimizer=torch.optim.Adam(B, fused=True, **hp()))
    run_pair(wa, wb, A, B, make, 11)


# ---- OptimWrapperDict ------------------------------------------------------------------------

def test_optim_wrapper_dict_with_per_key_schedulers_and_get_lr_momentum():
    """A GAN-style dict (D and G wrappers), schedulers built per key by MMEngine's
    Runner helper from one list, stepped as ParamSchedulerHook does; get_lr and
    get_momentum of the dicts; state dicts of dict and schedulers resumed."""
    cfg = [dict(type="LinearLR", start_factor=0.5, end=3, by_epoch=False),
           dict(type="CosineAnnealingMomentum", T_max=3, eta_min=0.0, by_epoch=False),
           dict(type="OneCycleLR", eta_max=0.05, total_steps=11, by_epoch=False,
                three_phase=True)]

    def build(kind, params):
        ws = {}
        for i, key in enumerate(("discriminator", "generator")):
            # The generator in two groups: its wrapper adds base_param_settings, and
            # the dict's get_lr() reports generator.base_lr.
            P = params[key] if key == "discriminator" else [dict(params=params[key][:1]),
                                                           dict(params=params[key][1:],
                                                                lr=2e-3)]
            if kind == "ours":
                ws[key] = OptimWrapper(optimizer=FusedAdam(P, lr=1e-2, betas=(0.5, 0.99)))
            else:
                ws[key] = MMOptimWrapper(optimizer=torch.optim.Adam(
                    P, lr=1e-2, betas=(0.5, 0.99), fused=True))
        d = OptimWrapperDict(**ws)
        # As Runner.build_param_scheduler does for a dict of wrappers: one list
        # of schedulers per key, built from the same configs.
        scheds = {k: [PARAM_SCHEDULERS.build(dict(c, optimizer=w)) for c in copy.deepcopy(cfg)]
                  for k, w in d.items()}
        return d, scheds

    PA = dict(discriminator=make_params(1)[:2], generator=make_params(2)[1:])
    PB = dict(discriminator=make_params(1)[:2], generator=make_params(2)[1:])
    da, sa = build("ours", PA)
    db, sb = build("mm", PB)
    for it in range(10):
        if it == 5:
            ck = round_trip(dict(o=da.state_dict(),
                                 s={k: [s.state_dict() for s in v] for k, v in sa.items()},
                                 p={k: [p.detach() for p in v] for k, v in PA.items()}))
            PA = {k: [nn.Parameter(t) for t in v] for k, v in ck["p"].items()}
            da, sa = build("ours", PA)
            da.load_state_dict(ck["o"])
            for k, v in sa.items():
                for s, d in zip(v, ck["s"][k], strict=True):
                    s.load_state_dict(d)
        assert values(da.get_lr()) == values(db.get_lr())
        assert "generator.base_lr" in da.get_lr()
        assert values(da.get_momentum()) == values(db.get_momentum())
        for key in ("discriminator", "generator"):
            da[key].update_params(loss_of(PA[key], it, seed=3))
            db[key].update_params(loss_of(PB[key], it, seed=3))
        for k in sa:
            for s in sa[k] + sb[k]:
                s.step()
        for key in ("discriminator", "generator"):
            assert_same(da[key].optimizer, db[key].optimizer, f"{key} {it}")


# ---- out-of-range scheduled values -----------------------------------------------------------

OUT_OF_RANGE = {
    # ExponentialMomentum with gamma > 1 takes beta1 past 1.
    "beta1": (lambda w: [S.ExponentialMomentum(w, gamma=1.05, by_epoch=False)],
              lambda g: g["betas"][0] >= 1.0, "beta1",
              lambda g: g.update(betas=(0.0, g["betas"][1]))),
    # lr * inf, then * 0 in the same iteration: NaN (no step runs at lr = inf).
    "lr_nan": (lambda w: [S.ExponentialLR(w, gamma=math.inf, begin=4, end=6, by_epoch=False),
                          S.MultiStepLR(w, milestones=[5], gamma=0.0, by_epoch=False)],
               lambda g: math.isnan(g["lr"]), "learning rate",
               lambda g: g.update(lr=1e-3)),
}


@pytest.mark.parametrize("name", sorted(OUT_OF_RANGE))
@pytest.mark.parametrize("update", [True, False], ids=["update_params", "step"])
@pytest.mark.parametrize("where", [0, 1])
def test_scheduled_out_of_range_value_is_refused_whole(where, update, name):
    """A schedule that drives beta1 to >= 1 or lr to NaN (torch's fused Adam runs
    both; NOTES.md: a value out of range written after construction is refused
    by our op). The refusal must name the value and change nothing: no
    parameter, state, step count or grad of any group (the update_params path
    would release the grads). Put back in range, the next step equals torch's."""
    make, bad, message, fix = OUT_OF_RANGE[name]

    def groups(P):
        g = [dict(params=P[:2]), dict(params=P[2:], lr=3e-3)]
        g[where]["betas"] = (0.5, 0.99)
        return g

    A, B, wa, wb = pair(FusedAdam, torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.99)),
                        groups=groups)
    sa, sb = make(wa), make(wb)
    for step in range(12):
        if any(bad(g) for g in wa.param_groups[:2]):
            break
        wa.update_params(loss_of(A, step))
        wb.update_params(loss_of(B, step))
        for s in sa + sb:
            s.step()
    else:
        pytest.fail("the value never left its range")
    assert_same(wa.optimizer, wb.optimizer, "before the refusal")
    before = round_trip(wa.optimizer.state_dict())
    params = [p.detach().clone() for p in A]
    loss = loss_of(A, 99)
    with pytest.raises(ValueError, match=message):
        if update:
            wa.update_params(loss)
        else:
            loss.backward()
            wa.step()
    grads = [p.grad for p in A]
    assert all(g is not None for g in grads)
    for p, q in zip(A, params):
        assert torch.equal(p, q)
    after = wa.optimizer.state_dict()
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][i][k]), (i, k)
    # Back in range on both sides; the same grads: the same step as torch's.
    for g in wa.param_groups + wb.param_groups:
        if bad(g):
            fix(g)
    for p, q in zip(B, grads):
        p.grad = q.clone()
    wa.step()
    wb.step()
    assert_same(wa.optimizer, wb.optimizer, "after the refusal")


# ---- a small random campaign -----------------------------------------------------------------

def _random_scheduler(r, w, n):
    b = r.randrange(0, n - 1)
    e = r.randrange(b + 1, n + 2)
    ms = sorted(r.sample(range(1, n), 2))
    kinds = [
        lambda: S.LinearLR(w, start_factor=r.choice([0.1, 0.5, 1.0]),
                           end_factor=r.choice([0.0, 0.3, 1.0]), begin=b, end=e, by_epoch=False),
        lambda: S.MultiStepLR(w, milestones=ms, gamma=r.choice([0.0, 0.1, 0.5]), by_epoch=False),
        lambda: S.CosineAnnealingLR(w, T_max=r.randrange(1, 5), eta_min=r.choice([0.0, 1e-4]),
                                    begin=b, end=e, by_epoch=False),
        lambda: S.ExponentialLR(w, gamma=r.choice([0.5, 0.9, 1.1]), begin=b, end=e,
                                by_epoch=False),
        lambda: S.PolyLR(w, power=r.choice([0.5, 1.0, 2.0]), eta_min=r.choice([0.0, 1e-5]),
                         begin=b, end=e, by_epoch=False),
        lambda: S.ConstantLR(w, factor=r.choice([0.1, 0.5]), begin=b, end=e, by_epoch=False),
        lambda: S.OneCycleLR(w, eta_max=0.05, total_steps=n + 2, three_phase=r.random() < 0.5,
                             anneal_strategy=r.choice(["cos", "linear"]), by_epoch=False),
        lambda: S.LinearMomentum(w, start_factor=r.choice([0.1, 1.0]),
                                 end_factor=r.choice([0.0, 0.5]), begin=b, end=e, by_epoch=False),
        lambda: S.CosineAnnealingMomentum(w, T_max=r.randrange(1, 5),
                                          eta_min=r.choice([0.0, 0.5, 0.95]), begin=b, end=e,
                                          by_epoch=False),
        lambda: S.MultiStepMomentum(w, milestones=ms, gamma=r.choice([0.0, 0.5]),
                                    by_epoch=False),
        lambda: S.StepMomentum(w, step_size=r.randrange(1, 4), gamma=r.choice([0.0, 0.5]),
                               by_epoch=False),
        lambda: S.ConstantMomentum(w, factor=r.choice([0.5, 0.01]), begin=b, end=e,
                                   by_epoch=False),
        lambda: S.CosineAnnealingParamScheduler(w, param_name="weight_decay",
                                                T_max=r.randrange(1, 5),
                                                eta_min=r.choice([0.0, 0.2]), begin=b, end=e,
                                                by_epoch=False),
        lambda: S.MultiStepParamScheduler(w, param_name="weight_decay", milestones=ms,
                                          gamma=r.choice([0.0, 3.0]), by_epoch=False),
        lambda: S.LinearParamScheduler(w, param_name="eps", start_factor=r.choice([1e-3, 0.5]),
                                       begin=b, end=e, by_epoch=False),
        lambda: S.CosineRestartLR(w, periods=[2, 3], restart_weights=[1, 0.5], eta_min=0.0,
                                  begin=b, by_epoch=False),
    ]
    return r.choice(kinds)()


@pytest.mark.parametrize("seed", range(24))
def test_random_scheduler_chains_with_accumulation_amp_and_tensor_lr(seed):
    """1-4 random schedulers chained on one wrapper, accumulative_counts 1-3,
    sometimes AMP (power-of-two scale, inf grads: skipped steps) on both sides
    (our AmpOptimWrapper with FusedAdam against it with torch's fused Adam: MMEngine's
    path), a Tensor lr, amsgrad, one or two groups. (1000 seeds were run while
    hunting.) A chain that takes beta1, lr or weight_decay out of range stops
    the case: our refusal there is documented (NOTES.md)."""
    from pygan_optim import AmpOptimWrapper

    r = random.Random(seed)
    n = r.randrange(4, 12)
    cls, ref = r.choice(PAIRS)
    beta1, wd = r.choice([0.0, 0.0, 0.5, 0.9]), r.choice([0.0, 1e-2])
    acc, amp, tensor_lr, amsgrad = (r.choice([1, 1, 2, 3]), r.random() < 0.25, r.random() < 0.2,
                                    r.random() < 0.2)

    def opt(c, P, **kw):
        return c(two_groups(P) if seed % 2 else P, lr=torch.tensor(1e-2) if tensor_lr else 1e-2,
                 betas=(beta1, 0.99), weight_decay=wd, amsgrad=amsgrad, **kw)

    A, B = make_params(seed), make_params(seed)
    if amp:
        kw = dict(loss_scale=dict(init_scale=2.0 ** r.randrange(0, 20), growth_interval=2),
                  accumulative_counts=acc)
        wa = AmpOptimWrapper(optimizer=opt(cls, A), **kw)
        wb = AmpOptimWrapper(optimizer=opt(ref, B, fused=True), **kw)
    else:
        wa = OptimWrapper(optimizer=opt(cls, A), accumulative_counts=acc)
        wb = MMOptimWrapper(optimizer=opt(ref, B, fused=True), accumulative_counts=acc)
    model = nn.Module()
    for w in (wa, wb):
        w.initialize_count_status(model, 0, n)
    k, state = r.randrange(1, 5), r.getstate()
    sa = [_random_scheduler(r, wa, n) for _ in range(k)]
    r.setstate(state)
    sb = [_random_scheduler(r, wb, n) for _ in range(k)]
    infs = {i for i in range(n) if r.random() < 0.2} if amp else set()
    for it in range(n):
        if any(not 0 <= float(g["betas"][0]) < 1 or float(g["lr"]) < 0 or g["weight_decay"] < 0
               for g in wa.param_groups):
            break
        for w, P in ((wa, A), (wb, B)):
            with w.optim_context(model):
                loss = loss_of(P, it, seed)
                if it in infs:
                    loss = loss + P[0][0] * math.inf
            w.update_params(loss)
        for s in sa + sb:
            s.step()
        assert values(wa.get_lr()) == values(wb.get_lr())
        assert values(wa.get_momentum()) == values(wb.get_momentum())
        assert_same(wa.optimizer, wb.optimizer, f"iter {it}")
        if amp:
            assert wa.loss_scaler.get_scale() == wb.loss_scaler.get_scale()


# ---- MMEngine's Runner -----------------------------------------------------------------------

_names = itertools.count()


class Net(BaseModel):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 256)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        y = self.fc2(torch.tanh(self.fc1(inputs)))
        return dict(loss=(y ** 2).mean()) if mode == "loss" else y


MODELS.register_module(name="S41SchedNet", module=Net, force=True)

RUNNER_SCHEDULE = [
    dict(type="LinearLR", start_factor=0.2, end=3, by_epoch=False),
    dict(type="OneCycleLR", eta_max=0.03, total_steps=9, three_phase=True, begin=3, end=12,
         by_epoch=False),
    dict(type="LinearMomentum", start_factor=1.0, end_factor=0.0, end=4, by_epoch=False),
    dict(type="CosineAnnealingMomentum", T_max=3, eta_min=0.6, begin=5, end=8,
         by_epoch=False),
    dict(type="MultiStepMomentum", milestones=[9], gamma=0.0, by_epoch=False),
    dict(type="CosineAnnealingParamScheduler", param_name="weight_decay", T_max=6,
         eta_min=0.0, by_epoch=False),
]


def make_runner(work_dir, kind, max_iters, resume_from=None, opt="Adam", acc=1, amp=False):
    hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2)
    if kind == "ours":
        ow = dict(type="FusedOptimWrapper", optimizer=dict(type="Fused" + opt, **hp))
    else:
        ow = dict(type="OptimWrapper", optimizer=dict(type=opt, fused=True, **hp))
    if acc > 1:
        ow["accumulative_counts"] = acc
    if amp:
        ow.update(type="FusedAmpOptimWrapper", dtype="bfloat16")
    g = torch.Generator().manual_seed(0)
    data = [dict(inputs=torch.randn(64, generator=g)) for _ in range(48)]
    kw = dict(resume=True, load_from=str(resume_from)) if resume_from else {}
    return Runner(
        model=dict(type="S41SchedNet"), work_dir=str(work_dir),
        experiment_name=f"s41_sched_{next(_names)}",
        train_dataloader=DataLoader(data, batch_size=4, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters), optim_wrapper=ow,
        param_scheduler=copy.deepcopy(RUNNER_SCHEDULE),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=5, by_epoch=False),
                           logger=dict(type="LoggerHook", interval=1000)),
        launcher="none", randomness=dict(seed=0), log_level="ERROR", **kw)


def runner_result(runner):
    w = runner.optim_wrapper
    sd = w.state_dict()
    out = {f"model.{k}": v.detach().clone() for k, v in runner.model.state_dict().items()}
    for i, st in sd["state"].items():
        out.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    hub = runner.message_hub
    logs = {k: list(hub.get_scalar(k).data[0]) for k in hub.log_scalars
            if k in ("train/lr", "train/base_lr")}
    groups = [{k: v for k, v in g.items() if k not in ("params", "fused")}
              for g in sd["param_groups"]]
    if "loss_scaler" in sd:
        out.update({f"scaler.{k}": torch.tensor(float(v)) for k, v in sd["loss_scaler"].items()})
    return out, logs, groups, values(w.get_lr()), values(w.get_momentum())


@pytest.mark.parametrize("opt, acc, resume_at, amp", [("Adam", 1, 5, False),
                                                     ("AdamW", 2, 5, False),
                                                     ("AdamW", 2, 10, False),
                                                     ("Adam", 1, 5, True)])
def test_runner_schedule_with_save_and_resume_matches_native(tmp_path, monkeypatch, opt, acc,
                                                             resume_at, amp):
    """12 iterations in MMEngine's Runner, lr/momentum/weight_decay schedules
    (beta1 through 0 and back), straight and saved at iter k then resumed in a
    fresh Runner, for both kinds: ours equals the native run in each case, and
    (resumed at a window's end) the resumed run equals the straight one. With
    accumulative_counts=2 a resume at iter 5 is mid-window, where MMEngine itself
    drops the window's first grads: both kinds alike. Ours also resumes from the
    native run's checkpoint as the native run does. AMP: FusedAmpOptimWrapper
    (bf16 autocast, dynamic scale 2^16) with FusedAdam against the same wrapper
    with torch's fused Adam (MMEngine's path; MMEngine's own refuses the CPU)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    res = {}
    runs = [("ours", "ours", "ours"), ("mm", "mm", "mm"), ("ours_from_mm", "ours", "mm")]
    for name, kind, ck in runs:
        if name == kind:
            r = make_runner(tmp_path / kind, kind, 12, opt=opt, acc=acc, amp=amp)
            r.train()
            res[kind] = runner_result(r)
        r = make_runner(tmp_path / f"{name}_resumed", kind, 12, opt=opt, acc=acc, amp=amp,
                        resume_from=tmp_path / ck / f"iter_{resume_at}.pth")
        r.train()
        res[f"{name}_resumed"] = runner_result(r)
    pairs = [("ours", "mm"), ("ours_resumed", "mm_resumed"), ("ours_from_mm_resumed", "mm_resumed")]
    if resume_at % acc == 0:
        pairs.append(("ours_resumed", "mm"))
    for a, b in pairs:
        got, ref = res[a], res[b]
        assert got[0].keys() == ref[0].keys()
        differ = [k for k in ref[0] if not torch.equal(got[0][k], ref[0][k])]
        assert not differ, (a, b, differ)
        assert got[1] == ref[1], (a, b)
        assert got[2] == ref[2], (a, b)
        assert got[3] == ref[3] and got[4] == ref[4], (a, b)
    assert res["mm"][2][0]["betas"][0] == 0.0 and res["mm"][1]["train/lr"]
