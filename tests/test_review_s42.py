"""Hostile review of session 42's library changes (``git diff c741a3c HEAD -- csrc
pygan_optim``): csrc/checks.h ``grad_held_elsewhere`` called from the check pass
(csrc/check_pass.cpp ``note_sharing``), the ``_C.shared_memory_checks_run``
counter, and the torch-version guard in pygan_optim/_ext.py.

Hunted:
1. False negatives: a grad that is another parameter, or another parameter's
   exp_avg / exp_avg_sq / max_exp_avg_sq (amsgrad) / step, as the very object or
   over the same memory, with packed (< 32768 elements, one arena storage) and
   unpacked state, state loaded from torch's checkpoint or set by hand, several
   param groups, grads kept as exp_avg, EMA blends in the step, amsgrad, the
   plain op, the parallel check pass (2048 parameters: two tasks) with one grad
   object shared across its threads; and that a refused step writes nothing.
2. False positives: training flows that would pay the exact shared-memory check
   on every step (counted with ``_C.shared_memory_checks_run()``).
3. The torch-version guard: version forms, PYGAN_OPTIM_EXTENSION at a directory,
   a missing or empty file, a post-load refusal, sys.modules after a refusal, a
   second import in the same interpreter (fresh interpreters via subprocess).

Oracles: torch.optim.Adam(fused=True) on the same tensors and aliasing (sizes
in multiples of 128 elements on 2 threads, where README promises bits; torch's
CPU fused Adam walks the tensors of a group one after the other, as its for-loop
does), followed by ``ops.ema_`` for EMA blends (README: "bit for bit what
ops.ema_ right after the step would give"). A refused step must leave params,
state, grads (the same objects, same values) and the EmaBlend unchanged.

Found (the two fixed ones are now plain tests; the strict xfail left is the second):
- BUG: the EMA of a step is checked against the other tensors of its own call
  only. With two param groups, a grad (group 1) that is the EMA average of a
  group-0 parameter, or an average that is a group-1 parameter, is blended by
  group 0's pass before group 1 reads or updates it: silently different from
  step-then-ema_ (within one group the same is refused). Fixed in session 42
  (FusedAdam._emas_share_memory: such pairs stay pending).
- BUG: a state tensor on memory from outside the allocator that aliases another
  parameter's grad (state set by hand over the grad's address) is not looked for:
  note_sharing asks the deleters of params and grads only, never of the state.
  The step runs, the two threads racing over the shared memory (on 2 threads p1
  usually ends 1.7e-2 away from torch's for-loop Adam; on 1 thread it matches).
- BUG (error type): PYGAN_OPTIM_EXTENSION naming a directory or a path without an
  extension-module suffix gives ``AttributeError: 'NoneType' object has no
  attribute 'loader'`` (spec_from_file_location returned None), not an
  ImportError naming the variable; ``except ImportError`` does not catch it.
  Fixed in session 42 (an ImportError naming the variable and its value).
Costs found (not bugs, pinned as they are; none from the new condition): grads
from ``torch.autograd.grad`` assigned to ``.grad`` (views whose ``_base`` shares
their storage: ``storage_shared``), grads with a numpy view kept over the step
(numpy's base is a second tensor on the storage) and parameters loaded with
``torch.load(mmap=True)`` + ``load_state_dict(assign=True)`` (the file's mapping:
``from_deleter``) pay the exact check on every step. Free: gradient
checkpointing, grad hooks keeping grads in lists, retain_grad,
clip_grad_norm_(foreach=True), clip_grad_value_, kept state_dicts, torch.save
every step, an R1 penalty, torch.compile'd forward/backward, the tiny BigGAN
through MMEngine's Runner, ZeRO-1 without parameter bucket views.
The rest (grad_held_elsewhere's conditions, thread safety, refusals, plain op,
the version guard's other paths) checked correct and pinned.
"""
from __future__ import annotations

import copy
import ctypes
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from pygan_optim import EmaBlend, FusedAdam, _ext, ops
from pygan_optim._ext import _C

pytestmark = pytest.mark.usefixtures("two_threads")

BIG = 32768  # >= KEEP_GRAD_MIN_NUMEL: state with storages of its own
SMALL = 256  # packed into the arena when FusedAdam creates the state
HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
SHARED = "share memory|shares memory"


def _checks() -> int:
    return _C.shared_memory_checks_run()


# ---------------------------------------------------------------------------
# Helpers: optimizers with a given kind of state, snapshots of everything
# ---------------------------------------------------------------------------

def _params(n, count=2, make=nn.Parameter, shape=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = (n,) if shape is None else shape
    return [make(torch.randn(size, generator=g)) for _ in range(count)]


def _new_grads(ps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def _fused_with_state(ps, state, amsgrad=False, groups=None, **hp):
    """A FusedAdam over `ps` after one step, its state of the given kind:
    "fresh" (made by FusedAdam: packed for small params, own storages for big),
    "loaded" (a deep copy of torch.optim.Adam's state_dict), "by_hand" (each
    state tensor replaced by a clone)."""
    hp = dict(HP, **hp)
    spec = ps if groups is None else [dict(params=[ps[i] for i in grp]) for grp in groups]
    opt = FusedAdam(spec, amsgrad=amsgrad, **hp)
    _new_grads(ps, seed=11)
    if state == "loaded":
        twins = [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in ps]
        tspec = twins if groups is None else [dict(params=[twins[i] for i in grp])
                                             for grp in groups]
        theirs = torch.optim.Adam(tspec, amsgrad=amsgrad, **hp)
        for t, p in zip(twins, ps):
            t.grad = p.grad.clone()
        theirs.step()
        opt.load_state_dict(copy.deepcopy(theirs.state_dict()))
        with torch.no_grad():
            for t, p in zip(twins, ps):
                p.copy_(t)
    else:
        opt.step()
    if state == "fresh" and ps[0].dim() == 1:  # the arena for small params, not for big
        packed = [opt.state[p]["exp_avg"].untyped_storage().nbytes() > p.nbytes for p in ps]
        assert packed == [p.numel() < BIG for p in ps]
    if state == "by_hand":
        for p in ps:
            for k in list(opt.state[p]):
                opt.state[p][k] = opt.state[p][k].clone()
    _new_grads(ps, seed=12)
    return opt


def _snapshot(opt, ps):
    return ([p.detach().clone() for p in ps],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in ps],
            [p.grad for p in ps],
            [None if p.grad is None else p.grad.clone() for p in ps])


def _assert_unchanged(opt, ps, snap):
    values, states, grad_objects, grad_values = snap
    for p, v in zip(ps, values):
        assert torch.equal(p.detach(), v)
    for p, st in zip(ps, states):
        assert opt.state[p].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v), k
    for p, g, gv in zip(ps, grad_objects, grad_values):
        assert p.grad is g
        if gv is not None:
            assert torch.equal(p.grad, gv)


def _tensor_of(opt, p, what):
    return p if what in ("param", "frozen_param") else opt.state[p][what]


# ---------------------------------------------------------------------------
# 1. False negatives: grads that are another parameter's tensors
# ---------------------------------------------------------------------------

CASES = ([(w, "fresh", n) for w in ("param", "frozen_param") for n in (SMALL, BIG)] +
         [(w, s, n) for w in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
          for s, n in (("fresh", SMALL), ("fresh", BIG), ("loaded", SMALL), ("loaded", BIG),
                       ("by_hand", SMALL))])


@pytest.mark.parametrize("reader", [1, 0], ids=["later-reads-earlier", "earlier-reads-later"])
@pytest.mark.parametrize("what, state, n", CASES, ids=[f"{w}-{s}-{n}" for w, s, n in CASES])
def test_grad_that_is_another_params_tensor_is_refused(what, state, n, reader):
    make = (lambda t: nn.Parameter(t, requires_grad=False)) if what == "frozen_param" \
        else nn.Parameter
    ps = _params(n, make=make)
    opt = _fused_with_state(ps, state, amsgrad=what == "max_exp_avg_sq")
    owner = 1 - reader
    ps[reader].grad = _tensor_of(opt, ps[owner], what)
    snap = _snapshot(opt, ps)
    before = _checks()
    with pytest.raises(RuntimeError, match=SHARED):
        opt.step()
    assert _checks() > before  # found by the exact check, not by luck elsewhere
    _assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("state", ["fresh", "loaded", "by_hand"])
def test_grad_that_is_another_params_step_is_refused(state):
    """0-dim parameters: a grad may be another parameter's step tensor (fresh
    steps are packed too; loaded ones are torch's CPU float32 tensors)."""
    ps = _params(None, count=3, shape=())
    opt = _fused_with_state(ps, state)
    ps[2].grad = opt.state[ps[0]]["step"]
    snap = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=SHARED):
        opt.step()
    _assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("where", [0, 2], ids=["first-call", "validated-later-call"])
def test_sharing_inside_one_of_three_groups_refuses_the_whole_step(where):
    """Three groups (three plan calls; the later ones validated before the first
    writes): the refusal in any of them leaves every group unchanged."""
    ps = _params(BIG, count=6)
    groups = [[0, 1], [2, 3], [4, 5]]
    opt = _fused_with_state(ps, "fresh", groups=groups)
    a, b = groups[where]
    ps[b].grad = opt.state[ps[a]]["exp_avg_sq"]
    snap = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=SHARED):
        opt.step()
    _assert_unchanged(opt, ps, snap)


def _torch_twin(ps, groups=None, amsgrad=False, state_from=None):
    twins = [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in ps]
    spec = twins if groups is None else [dict(params=[twins[i] for i in grp]) for grp in groups]
    theirs = torch.optim.Adam(spec, amsgrad=amsgrad, fused=True, **HP)
    if state_from is not None:
        theirs.load_state_dict(copy.deepcopy(state_from.state_dict()))
        for group in theirs.param_groups:  # the loaded groups say fused=None (FusedAdam's)
            group["fused"] = True
    return twins, theirs


@pytest.mark.parametrize("what", ["param", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("reader_group", [1, 0])
def test_grad_from_another_group_steps_as_torch(what, reader_group):
    """Each plan call checks its own lists: a grad of group 1 that is a group-0
    tensor (or the other way) is not refused, and need not be: both run the
    groups one after the other, so the values are torch's, bit for bit."""
    ps = _params(BIG, count=2)
    groups = [[0], [1]]
    opt = _fused_with_state(ps, "fresh", groups=groups)
    twins, theirs = _torch_twin(ps, groups=groups, state_from=opt)
    reader, owner = (1, 0) if reader_group == 1 else (0, 1)
    for t, p in zip(twins, ps):
        t.grad = p.grad.clone()
    ps[reader].grad = _tensor_of(opt, ps[owner], what)
    twins[reader].grad = twins[owner] if what == "param" else theirs.state[twins[owner]][what]
    opt.step()
    theirs.step()
    for p, t in zip(ps, twins):
        assert torch.equal(p.detach(), t.detach())
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], theirs.state[t][k]), k


def test_grad_that_is_the_state_of_a_param_without_grad_steps_as_torch():
    """The owner has no grad: its state is not written, so reading it as another
    parameter's grad is fine. The exact check runs (the count gives it away),
    passes, and the step is torch's."""
    ps = _params(BIG, count=2)
    opt = _fused_with_state(ps, "fresh")
    twins, theirs = _torch_twin(ps, state_from=opt)
    ps[0].grad = None
    ps[1].grad = opt.state[ps[0]]["exp_avg"]
    twins[1].grad = theirs.state[twins[0]]["exp_avg"]
    before = _checks()
    opt.step()
    assert _checks() == before + 1
    theirs.step()
    for p, t in zip(ps, twins):
        assert torch.equal(p.detach(), t.detach())
        assert torch.equal(opt.state[p]["exp_avg_sq"], theirs.state[t]["exp_avg_sq"])


def test_grad_that_is_a_kept_exp_avg_is_refused_and_nothing_released():
    """Grads kept as exp_avg (beta1 = 0, step_and_zero_grad, threshold 0): the
    exp_avg object then holds the old grad's memory. Given as another
    parameter's grad it is refused; a refused step_and_zero_grad releases no
    grad and changes nothing."""
    ps = _params(BIG, count=2)
    opt = FusedAdam(ps, lr=1e-2, betas=(0.0, 0.999), eps=1e-6)
    opt.keep_grad_min_bytes_cpu = 0
    for seed in (3, 4):
        _new_grads(ps, seed=seed)
        addresses = [p.grad.data_ptr() for p in ps]
        opt.step_and_zero_grad()
        assert all(p.grad is None for p in ps)
    assert [opt.state[p]["exp_avg"].data_ptr() for p in ps] == addresses  # kept
    _new_grads(ps, seed=5)
    ps[1].grad = opt.state[ps[0]]["exp_avg"]
    snap = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=SHARED):
        opt.step_and_zero_grad()
    _assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("n", [SMALL, BIG])
def test_grad_that_is_another_params_state_with_an_ema_blend_is_refused(n):
    ps = _params(n, count=2)
    opt = _fused_with_state(ps, "fresh")
    averages = [p.detach().clone() for p in ps]
    ps[1].grad = opt.state[ps[0]]["exp_avg"]
    snap = _snapshot(opt, ps)
    blend = EmaBlend(list(zip(ps, averages)), 0.999)
    with pytest.raises(RuntimeError, match=SHARED):
        opt.step(ema=blend)
    _assert_unchanged(opt, ps, snap)
    assert all(torch.equal(a, p.detach()) for a, p in zip(averages, ps))
    assert len(blend.pending()) == 2
    ps[1].grad = torch.randn(n)
    opt.step(ema=blend)  # given back by the refusal: usable once
    assert not blend.pending()


def _ema_case(ours: bool, case: str):
    """Two groups; group 0's parameter has an EMA average. case "grad": group 1's
    grad is that average; case "param": the average is group 1's parameter."""
    ps = _params(BIG, count=2)
    g = torch.Generator().manual_seed(7)
    average = torch.randn(BIG, generator=g)
    groups = [dict(params=[ps[0]]), dict(params=[ps[1]])]
    opt = FusedAdam(groups, **HP) if ours else torch.optim.Adam(groups, fused=True, **HP)
    _new_grads(ps, seed=8)
    opt.step()
    _new_grads(ps, seed=9)
    if case == "grad":
        ps[1].grad = average
        pair = (ps[0], average)
    else:
        pair = (ps[0], ps[1])
    if ours:
        blend = EmaBlend([pair], 0.5)
        try:
            opt.step(ema=blend)
        except RuntimeError as error:
            return str(error)
        with torch.no_grad():  # the caller blends what the step left pending
            for param, avg in blend.pending():
                ops.ema_([avg], [param], 0.5)
    else:
        opt.step()
        with torch.no_grad():
            ops.ema_([pair[1]], [pair[0]], 0.5)
    return [t.detach().clone() for t in (ps[0], ps[1], average)]


# (Both found here as strict xfails; fixed in session 42: such pairs stay pending, and
# the caller's blend after the step gives torch's order.)
@pytest.mark.parametrize("case", ["grad", "param"])
def test_ema_average_another_group_reads_or_updates(case):
    """case "grad": a group-1 grad is group 0's EMA average; "param": the average
    is group 1's parameter."""
    ours, theirs = _ema_case(True, case), _ema_case(False, case)
    assert not isinstance(ours, str), ours
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over t's memory with a storage (and deleter) of its own, holding
    no reference to t: memory from elsewhere than the allocator, as a library
    that hands out raw pointers makes."""
    buffer = (ctypes.c_float * t.numel()).from_address(t.data_ptr())
    return torch.frombuffer(buffer, dtype=torch.float32)


def _foreign_state_case(ours: bool):
    ps = _params(BIG, count=2)
    opt = (FusedAdam(ps, **HP) if ours else torch.optim.Adam(ps, foreach=False, **HP))
    _new_grads(ps, seed=3)
    opt.step()
    _new_grads(ps, seed=4)
    alias = _alias(ps[1].grad)  # p0's exp_avg over p1's grad memory
    alias.copy_(opt.state[ps[0]]["exp_avg"])
    opt.state[ps[0]]["exp_avg"] = alias
    try:
        opt.step()
    except RuntimeError as error:
        return str(error)
    return [t.clone() for t in (ps[0].detach(), ps[1].detach(), alias)]


@pytest.mark.xfail(strict=True, reason=(
    "BUG: check_pass.cpp note_sharing asks from_deleter/storage_shared of the params and "
    "grads only: a state tensor (set by hand) on memory from outside the allocator that "
    "aliases another parameter's grad never triggers check_shared_memory, which would "
    "refuse it (exp_avgs[0] vs grads[1]). The step runs with one thread writing p0's "
    "exp_avg while the other reads it as p1's grad: a race. On 2 threads p1 usually differs "
    "from torch's for-loop Adam by 1.7e-2 (torch's fused Adam happens to agree with that "
    "outcome), on a loaded machine or 1 thread it matches. Expected: refused, as every other "
    "grad/state overlap. Fix idea: note at plan build whether any state tensor's memory is "
    "foreign (plans are rebuilt on every state edit) and then run the exact check every "
    "step"))
def test_state_over_foreign_memory_aliasing_a_grad_is_refused():
    ours = _foreign_state_case(True)
    assert isinstance(ours, str) and "share" in ours, "stepped: not refused"


def test_state_over_foreign_memory_aliasing_a_grad_one_thread_is_torchs_order():
    """What the race above hides: on one thread the fused pass walks p0, then p1,
    as torch's for-loop Adam does: refused, or torch's values."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours, theirs = _foreign_state_case(True), _foreign_state_case(False)
    finally:
        torch.set_num_threads(threads)
    if isinstance(ours, str):  # refused (the fix above): fine too
        assert "share" in ours
        return
    # Fused and for-loop Adam round differently: without the alias they differ by
    # 1.2e-7 here (an ulp or two of |p| < 5; ulp(4) = 4.8e-7). 1e-5 bounds that with
    # margin; the other order of the aliased writes moves p1 by about 1.7e-2.
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("what", ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step",
                                  "own-param", "own-exp_avg"])
def test_plain_op_checks_its_lists_whole(what):
    """ops.adam_step_ compares every list against every other (check_disjoint):
    another parameter's tensors and even the parameter's own are refused as a
    grad (stricter than FusedAdam, which allows a grad that is exactly its own
    parameter or state); it never runs the per-step exact check."""
    n = SMALL
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g) for _ in range(2)]
    m = [torch.zeros(n) for _ in range(2)]
    v = [torch.zeros(n) for _ in range(2)]
    vmax = [torch.zeros(n) for _ in range(2)]
    steps = [torch.zeros(()) for _ in range(2)]
    grads = [torch.randn(n, generator=g) for _ in range(2)]
    lists = dict(param=params, exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=vmax)
    if what == "step":
        grads[1] = steps[0].expand(n)  # a view of the step, layout of its own
    elif what.startswith("own-"):
        grads[1] = lists[what[4:]][1]
    else:
        grads[1] = lists[what][0]
    before_values = [t.clone() for t in params + m + v + vmax + steps]
    before = _checks()
    with pytest.raises(RuntimeError, match=SHARED):
        ops.adam_step_(params, grads, m, v, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6,
                       amsgrad=True, max_exp_avg_sqs=vmax)
    assert _checks() == before
    assert all(torch.equal(a, b) for a, b in zip(params + m + v + vmax + steps, before_values))


# The parallel check pass: kCheckGrain is 512 tensors per task (tensor_pass.h), so
# 2048 parameters give each of the 2 threads work; parameters i and i + HALF sit
# in different tasks.
MANY, HALF, PIECE = 2048, 1024, 128


def _many():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(PIECE, generator=g)) for _ in range(MANY)]


def _shared_grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(PIECE, generator=g) for _ in range(HALF)]
    for i, p in enumerate(ps):
        p.grad = grads[i % HALF]  # one object for parameters i and i + HALF


@pytest.mark.parametrize("zero", [False, True], ids=["step", "step_and_zero_grad(False)"])
def test_one_grad_object_for_params_on_both_threads(zero):
    """Reading use_count and the Python object on the pass's threads while the
    other thread copies the same grad: the count can only be higher, so every
    step asks for the exact check, which passes (grads are only read); the
    values are torch's, bit for bit, also when the grads are zeroed in the step."""
    ours, theirs = _many(), _many()
    opt = FusedAdam(ours, **HP)
    ref = torch.optim.Adam(theirs, fused=True, **HP)
    for seed in range(4):
        _shared_grads(ours, seed)
        _shared_grads(theirs, seed)
        before = _checks()
        if zero:
            opt.step_and_zero_grad(set_to_none=False)
            ref.step()
            ref.zero_grad(set_to_none=False)
            assert all(not p.grad.any() for p in ours)
        else:
            opt.step()
            ref.step()
        assert _checks() == before + 1
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ours, theirs))
    assert all(torch.equal(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])
               for a, b in zip(ours, theirs))


@pytest.mark.parametrize("what", ["param", "frozen_param", "exp_avg"])
def test_grad_of_another_threads_param_is_refused_every_time(what):
    ps = _many()
    if what == "frozen_param":
        for p in ps:
            p.requires_grad_(False)
    opt = FusedAdam(ps, **HP)
    _new_grads(ps, seed=1)
    opt.step()
    for attempt in range(10):
        _new_grads(ps, seed=2 + attempt)
        reader, owner = (HALF + 300, 100) if attempt % 2 else (100, HALF + 300)
        ps[reader].grad = _tensor_of(opt, ps[owner], what)
        snap = _snapshot(opt, ps[99:102] + ps[HALF + 299:HALF + 302])
        with pytest.raises(RuntimeError, match=SHARED):
            opt.step()
        _assert_unchanged(opt, ps[99:102] + ps[HALF + 299:HALF + 302], snap)


# ---------------------------------------------------------------------------
# 2. False positives: flows that should not pay the exact check
# ---------------------------------------------------------------------------

def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128))


def _x():
    return torch.randn(8, 64)


def _checkpointed(reentrant):
    def flow(net, opt, keep):
        x = _x().requires_grad_(reentrant)
        torch.utils.checkpoint.checkpoint(net, x, use_reentrant=reentrant).square().mean() \
            .backward()
        opt.step()
        opt.zero_grad()
    return flow


def _post_accumulate_hook(net, opt, keep):
    if "hooks" not in keep:
        keep["seen"] = []
        keep["hooks"] = [p.register_post_accumulate_grad_hook(
            lambda p: keep["seen"].append(p.grad)) for p in net.parameters()]
    net(_x()).square().mean().backward()
    opt.step()  # the hook's list still holds every grad
    keep["seen"].clear()
    opt.zero_grad()


def _tensor_hooks_into_a_list(net, opt, keep):
    if "hooks" not in keep:
        keep["seen"] = []
        keep["hooks"] = [p.register_hook(lambda g: keep["seen"].append(g))
                         for p in net.parameters()]
    net(_x()).square().mean().backward()
    opt.step()
    opt.zero_grad()  # the list keeps growing over steps, as a logging hook's may


def _retain_grad(net, opt, keep):
    hidden = net[0](_x())
    hidden.retain_grad()
    net[2](net[1](hidden)).square().mean().backward()
    keep["hidden"] = hidden
    opt.step()
    opt.zero_grad()


def _clip_norm_foreach(net, opt, keep):
    net(_x()).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1, foreach=True)
    opt.step()
    opt.zero_grad()


def _clip_value(foreach):
    def flow(net, opt, keep):
        net(_x()).square().mean().backward()
        torch.nn.utils.clip_grad_value_(net.parameters(), 1e-3, foreach=foreach)
        opt.step()
        opt.zero_grad()
    return flow


def _grads_and_state_dict_kept(net, opt, keep):
    net(_x()).square().mean().backward()
    keep["grads"] = [p.grad for p in net.parameters()]  # held over the step
    keep["state"] = opt.state_dict()
    opt.step()
    opt.zero_grad()


def _checkpoint_saved_every_step(net, opt, keep):
    net(_x()).square().mean().backward()
    opt.step()
    opt.zero_grad()
    torch.save(dict(model=net.state_dict(), optim=opt.state_dict()), io.BytesIO())


def _r1_penalty(net, opt, keep):
    """A gradient penalty on the input (create_graph for the input's grad only):
    the parameters' grads need no graph of their own."""
    x = _x().requires_grad_(True)
    out = net(x).sum()
    grad_x, = torch.autograd.grad(out, x, create_graph=True)
    (out * 1e-3 + grad_x.square().sum()).backward()
    opt.step()
    opt.zero_grad()


def _grads_kept_as_exp_avg_with_clip(net, opt, keep):
    opt.keep_grad_min_bytes_cpu = 0
    net(_x()).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
    opt.step_and_zero_grad()


def _two_groups_zeroed_in_step(net, opt, keep):
    if len(opt.param_groups) == 1:
        params = opt.param_groups[0]["params"]
        opt.param_groups[0]["params"] = params[:2]
        opt.add_param_group(dict(params=params[2:], lr=2e-3))
    net(_x()).square().mean().backward()
    opt.step_and_zero_grad(set_to_none=False)


FREE_FLOWS = {
    "checkpoint-reentrant": _checkpointed(True),
    "checkpoint-non-reentrant": _checkpointed(False),
    "post-accumulate-grad-hook-list": _post_accumulate_hook,
    "tensor-hooks-list": _tensor_hooks_into_a_list,
    "retain-grad": _retain_grad,
    "clip-grad-norm-foreach": _clip_norm_foreach,
    "clip-grad-value": _clip_value(False),
    "clip-grad-value-foreach": _clip_value(True),
    "grads-and-state-dict-kept": _grads_and_state_dict_kept,
    "checkpoint-saved-every-step": _checkpoint_saved_every_step,
    "r1-penalty": _r1_penalty,
    "kept-as-exp-avg-with-clip": _grads_kept_as_exp_avg_with_clip,
    "two-groups-zeroed-in-step": _two_groups_zeroed_in_step,
}


@pytest.mark.parametrize("flow", list(FREE_FLOWS.values()), ids=list(FREE_FLOWS))
def test_flows_that_skip_the_exact_check(flow):
    net = _net()
    opt = FusedAdam(net.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-6)
    keep = {}
    flow(net, opt, keep)  # first step: state made
    before = _checks()
    for _ in range(3):
        flow(net, opt, keep)
    assert all(float(opt.state[p]["step"]) == 4 for p in net.parameters())
    assert _checks() == before


def _autograd_grad_assigned(net, opt):
    params = list(net.parameters())
    grads = torch.autograd.grad(net(_x()).square().mean(), params)
    for p, g in zip(params, grads):
        p.grad = g


def _numpy_view_held(net, opt):
    net(_x()).square().mean().backward()
    return [p.grad.numpy() for p in net.parameters()]


@pytest.mark.parametrize("flow", [_autograd_grad_assigned, _numpy_view_held],
                         ids=["autograd-grad-assigned", "numpy-view-held"])
def test_flows_that_pay_the_exact_check_and_step_as_torch(flow):
    """Costs, not errors, and not the new condition: grads from
    torch.autograd.grad are views (``g._base``) of the backward's outputs, and a
    numpy view's base is a second tensor on the grad's storage: storage_shared
    (session 41) asks for the exact check every step. It passes; values are
    torch's, bit for bit."""
    nets = [_net(), _net()]
    ours = FusedAdam(nets[0].parameters(), **HP)
    theirs = torch.optim.Adam(nets[1].parameters(), fused=True, **HP)
    for step in range(3):
        torch.manual_seed(step)
        held = flow(nets[0], ours)
        torch.manual_seed(step)
        nets[1](_x()).square().mean().backward()
        if flow is _autograd_grad_assigned:
            assert all(p.grad._base is not None for p in nets[0].parameters())
            assert all(_C.grad_use_count(p) == 3 for p in nets[0].parameters())  # no extra holder
        before = _checks()
        ours.step()
        assert _checks() == before + 1
        theirs.step()
        del held
        ours.zero_grad()
        theirs.zero_grad()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def test_params_loaded_with_mmap_and_assign_pay_the_exact_check(tmp_path):
    """A checkpoint loaded with torch.load(mmap=True) into the model with
    load_state_dict(assign=True) leaves the parameters on the file's mapping
    (memory from elsewhere than the allocator: from_deleter, session 41): every
    step pays the exact check for as long as they live there. It passes; the
    values are torch's, bit for bit."""
    path = tmp_path / "model.pt"
    torch.save(_net().state_dict(), path)
    mapped = _net()
    mapped.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    plain = _net()
    ours = FusedAdam(mapped.parameters(), **HP)
    theirs = torch.optim.Adam(plain.parameters(), fused=True, **HP)
    for step in range(3):
        for net in (mapped, plain):
            torch.manual_seed(step)
            net(_x()).square().mean().backward()
        before = _checks()
        ours.step()
        assert _checks() == before + 1
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
    for a, b in zip(mapped.parameters(), plain.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_forward_backward_and_module_skip_the_exact_check():
    """torch.compile'd forward and backward (a compiled function that calls
    backward, and a compiled module) around an eager FusedAdam step."""
    for how in ("function", "module"):
        net = _net()
        opt = FusedAdam(net.parameters(), lr=1e-3, betas=(0.0, 0.999))
        if how == "function":
            def train(x):
                loss = net(x).square().mean()
                loss.backward()
                return loss
            compiled = torch.compile(train)
        else:
            compiled_net = torch.compile(net)

            def compiled(x):
                compiled_net(x).square().mean().backward()
        compiled(_x())
        opt.step()
        opt.zero_grad()
        before = _checks()
        for _ in range(3):
            compiled(_x())
            opt.step()
            opt.zero_grad()
        assert _checks() == before, how


@pytest.mark.slow
def test_tiny_biggan_training_skips_the_exact_check(tmp_path, monkeypatch):
    """The repo's BigGAN (spectral norm) through MMEngine's Runner with our
    FusedOptimWrapper, accumulation 2, the EMA blended in the generator's step
    from iteration 2 and a checkpoint saved mid-run (torch.save gives the
    storages Python objects)."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = Config.fromfile(os.path.join(root, "configs", "biggan_32x32_tiny.py"))
    cfg.work_dir = str(tmp_path)
    cfg.merge_from_dict({"train_cfg.max_iters": 8, "default_hooks.logger.interval": 1000,
                         "default_hooks.checkpoint.interval": 4})
    runner = Runner.from_cfg(cfg)
    before = _checks()
    runner.train()
    assert _checks() == before
    for name in ("generator", "discriminator"):
        opt = runner.optim_wrapper[name].optimizer
        assert isinstance(opt, FusedAdam)
        assert {float(s["step"]) for s in opt.state.values()} == {4.0}, name


def _zero_worker(rank, out_dir):
    from test_hunt_sharding_s39 import _finish, _init
    from torch.distributed.optim import ZeroRedundancyOptimizer

    _init(rank, out_dir)
    result = {}
    try:
        for as_view in (False, True):
            net = nn.parallel.DistributedDataParallel(_net())
            opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=FusedAdam,
                                          lr=1e-3, betas=(0.0, 0.999),
                                          parameters_as_bucket_view=as_view)
            net(_x()).square().mean().backward()
            opt.step()
            opt.zero_grad()
            before = _checks()
            for _ in range(3):
                net(_x()).square().mean().backward()
                opt.step()
                opt.zero_grad()
            result[str(as_view)] = [_checks() - before, len(opt.optim.state)]
    except BaseException as error:  # noqa: BLE001 - written for the parent
        result["error"] = repr(error)
    with open(os.path.join(out_dir, f"result{rank}.json"), "w") as f:
        json.dump(result, f)
    _finish()


@pytest.mark.slow
def test_zero_redundancy_optimizer_with_fused_adam(tmp_path):
    """ZeRO-1 (2 ranks, gloo) with FusedAdam as the local optimizer: no exact
    check with plain parameters; with parameters_as_bucket_view every local step
    pays it (the parameters view one bucket: storage_shared), and passes."""
    from test_hunt_sharding_s39 import _spawn

    _spawn(_zero_worker, tmp_path)
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert "error" not in result, result
        assert result["False"][0] == 0 and result["False"][1] > 0
        assert result["True"][0] == 3 and result["True"][1] > 0


# ---------------------------------------------------------------------------
# 3. The torch-version guard (pygan_optim/_ext.py)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version, release", [
    ("2.13.0", "2.13.0"), ("2.13.0rc2", "2.13.0"), ("2.13.0.post1", "2.13.0"),
    ("2.13.10+cu130", "2.13.10"), ("12.3.4", "12.3.4"), ("2.13", "2.13"), ("main", "main")])
def test_release_forms(version, release):
    """The numeric X.Y.Z prefix; a form without one is compared as it is (so
    refused against any build)."""
    assert _ext._torch_release(version) == release
    assert _ext._torch_release(torch.torch_version.TorchVersion(version)) == release


def test_built_with_reads_only_the_marker(tmp_path):
    assert _ext._built_with(_C.__file__) == _C.built_with_torch
    for name, data in (("empty", b""), ("no-marker", b"\x7fELF" + b"\0" * 64),
                       ("bad-digits", b"xxPYGAN_OPTIM_BUILT_WITH_TORCH=2.1a.0;yy")):
        path = tmp_path / name
        path.write_bytes(data)
        assert _ext._built_with(str(path)) is None, name
    assert _ext._built_with(str(tmp_path)) is None  # a directory
    assert _ext._built_with(str(tmp_path / "missing")) is None
    assert _ext._built_with(None) is None


def _run(code: str, extension=None) -> dict:
    env = dict(os.environ)
    env.pop("PYGAN_OPTIM_EXTENSION", None)
    if extension is not None:
        env["PYGAN_OPTIM_EXTENSION"] = extension
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_ATTEMPT = """
    import json, os, sys, torch
    out = []
    def attempt(extension=None):
        if extension is None:
            os.environ.pop("PYGAN_OPTIM_EXTENSION", None)
        else:
            os.environ["PYGAN_OPTIM_EXTENSION"] = extension
        try:
            import pygan_optim
            got = dict(ok=pygan_optim._ext._C.built_with_torch)
        except BaseException as error:
            got = dict(type=type(error).__name__, message=str(error))
        got["modules"] = sorted(m for m in sys.modules if m.startswith("pygan_optim"))
        got["ops"] = hasattr(torch.ops.pygan_optim, "adam_step_")
        out.append(got)
"""


@pytest.fixture(scope="module")
def override_attempts(tmp_path_factory):
    """One interpreter importing pygan_optim again and again, with
    PYGAN_OPTIM_EXTENSION at: a directory, a missing file without a module
    suffix, a missing .so, an empty .so, a copy of the module whose written
    torch version is another, then the real module (the default) again."""
    tmp = tmp_path_factory.mktemp("guard")
    data = open(_C.__file__, "rb").read()
    marker = b"PYGAN_OPTIM_BUILT_WITH_TORCH="
    at = data.index(marker) + len(marker)
    built = _C.built_with_torch.encode()
    suffix = os.path.basename(_C.__file__)[len("_C"):]
    paths = {}
    for name, content in (("other", data[:at] + b"1" + built[1:] + data[at + len(built):]),
                          ("empty", b"")):
        folder = tmp / name
        folder.mkdir()
        paths[name] = str(folder / ("_C" + suffix))
        open(paths[name], "wb").write(content)
    paths["directory"] = str(tmp)
    paths["no-suffix"] = str(tmp / "_C")
    paths["missing"] = str(tmp / ("missing_C" + suffix))
    order = ["directory", "no-suffix", "missing", "empty", "other", None]
    calls = "\n".join(f"attempt({None if k is None else repr(paths[k])})" for k in order)
    results = _run(_ATTEMPT + textwrap.indent(calls, "    ") + "\n    print(json.dumps(out))")
    return dict(zip([k or "default" for k in order], results)), paths


# (Found here as a strict xfail, fixed in session 42: an ImportError naming the variable.)
@pytest.mark.parametrize("case", ["directory", "no-suffix"])
def test_extension_override_that_is_no_module_file(override_attempts, case):
    results, paths = override_attempts
    got = results[case]
    assert got["type"] == "ImportError", got
    assert "PYGAN_OPTIM_EXTENSION" in got["message"] and paths[case] in got["message"], got


def test_extension_override_refusals_leave_the_interpreter_usable(override_attempts):
    results, paths = override_attempts
    # No module file: nothing loaded, nothing registered.
    for case in ("directory", "no-suffix", "missing", "empty"):
        got = results[case]
        assert "ok" not in got, (case, got)
        assert got["modules"] == ["pygan_optim._interrupt"] and not got["ops"], (case, got)
    for case in ("missing", "empty"):  # the loader's own error, naming the file
        assert results[case]["type"] == "ImportError", results[case]
        assert paths[case] in results[case]["message"]
        assert "built against" not in results[case]["message"]
    # Another torch written in the file: refused before loading.
    other = results["other"]
    assert other["type"] == "ImportError" and not other["ops"], other
    assert f"({paths['other']}) was built against torch 1{_C.built_with_torch[1:]}" \
        in other["message"] and "make build" in other["message"]
    assert "pygan_optim._C" not in other["modules"]
    # After all that, the default module imports in the same interpreter.
    assert results["default"]["ok"] == _C.built_with_torch and results["default"]["ops"]


def test_marker_that_does_not_parse_in_a_fresh_interpreter(tmp_path):
    """Alone, the unparsable marker is refused by the attribute check after
    loading (the ops stay registered: a loaded library cannot be unloaded), and
    a second import attempt is refused the same way."""
    data = open(_C.__file__, "rb").read()
    marker = b"PYGAN_OPTIM_BUILT_WITH_TORCH="
    at = data.index(marker) + len(marker)
    built = _C.built_with_torch.encode()
    path = tmp_path / os.path.basename(_C.__file__)
    path.write_bytes(data[:at] + b"2.1a.0"[:len(built)] + data[at + len(built):])
    got = _run(_ATTEMPT + f"    attempt({str(path)!r})\n    attempt({str(path)!r})\n"
               "    print(json.dumps(out))")
    for attempt in got:
        assert attempt["type"] == "ImportError", attempt
        assert "built against torch 2.1a.0" in attempt["message"], attempt
        assert "pygan_optim" not in attempt["modules"]


def test_faked_torch_version_refused_twice_then_imports():
    """A refused import leaves no pygan_optim package, _ext or _C in sys.modules
    and registers no op; a second attempt is refused the same way; with torch's
    own version back the package imports and steps."""
    got = _run(_ATTEMPT + """
    real = torch.__version__
    torch.__version__ = "2.12.1+cpu"
    attempt()
    attempt()
    torch.__version__ = real
    attempt()
    import pygan_optim
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    pygan_optim.FusedAdam([p], lr=0.5).step()
    out.append(dict(value=p.detach().tolist()))
    print(json.dumps(out))
    """)
    first, second, third, stepped = got
    for refused in (first, second):
        assert refused["type"] == "ImportError", refused
        assert "runs torch 2.12.1+cpu" in refused["message"]
        assert refused["modules"] == ["pygan_optim._interrupt"] and not refused["ops"]
    assert third["ok"] == _C.built_with_torch and third["ops"]
    # Adam's first step moves by lr * g / (|g| + eps): 0.5, within fp32 rounding (6e-8 at 0.5).
    assert all(abs(v - 0.5) < 1e-6 for v in stepped["value"])
