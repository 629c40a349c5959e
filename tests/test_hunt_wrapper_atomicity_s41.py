"""Session 41 hunt: failures injected at the wrapper level, ours against MMEngine's.

What it hunts
-------------
Exceptions in the middle of wrapper calls: whether ours raises when MMEngine's
raises (the same exception type; ours must name the tensor, dtype, shape), whether
a refused step changes nothing (every parameter or none), whether a failure leaves
ours in a state that poisons the following steps when MMEngine's is not poisoned,
and whether any input crashes the process.

Oracle
------
MMEngine 0.10.7's ``OptimWrapper`` / ``AmpOptimWrapper`` holding
``torch.optim.Adam(fused=True)``, driven in lockstep with ``pygan_optim.OptimWrapper``
/ ``AmpOptimWrapper`` holding ``pygan_optim.FusedAdam`` (``keep_grad_min_bytes_cpu =
0``, so that with beta1 = 0 the 32768-element weight's grad is kept as its exp_avg).
MMEngine's AMP wrapper refuses the CPU: it is built with its ``is_cuda_available``
check lifted and given ``torch.amp.GradScaler('cpu')`` of the same arguments
(``test_wrappers_oracle.mm_amp_wrapper``); autocast is bf16 on the CPU.

Operations
----------
A seeded random sequence over a random configuration (AMP off / dynamic scale /
a static power-of-two scale / a dict with a short growth interval; no clip / an
L2 clip that never binds / a clip by value; accumulative_counts 1-4; beta1 0 or
0.9; one or two param groups) of: ``update_params`` after a forward under
``optim_context`` (losses made inf/NaN under AMP), ``scale_loss`` + ``backward``,
bare ``step``, ``zero_grad``; and the injected failures:
a grad of another dtype (``grad_dtype = float64`` so that backward makes one, or a
bfloat16 ``.data``), of another shape (same numel), sparse; a param group with a
parameter and grad on the meta device; a step with no grads; a loss that does not
require grad; an exception (ValueError or KeyboardInterrupt) from a step pre-hook,
a step post-hook, a global step pre-hook, a grad hook during backward, or the
loss computation inside ``optim_context``; a parameter whose ``requires_grad`` is
toggled (before the forward, or between backward and step); an invalid
``clip_grad_kwargs``.
After every call both sides are compared (below); after a failure both recover
alike (the hook removed, the grad dtype or requires_grad given back,
``zero_grad``) and go on, compared again.

Comparisons and tolerances
--------------------------
* Bit for bit (``torch.equal``, NaN equal to NaN): parameters, optimizer state,
  grads, the wrappers' ``_inner_count`` / ``_max_counts`` / ``_remainder_counts``,
  the scaler's scale, growth tracker and per-optimizer stage (whether unscale_ was
  recorded), the loss. The README promises FusedAdam == ``Adam(fused=True)``
  bitwise on the CPU away from torch's scalar tails: every tensor here has a
  multiple of 128 elements and torch runs on one thread; every loss scale is a
  power of two (1/scale exact both ways); the L2 clip's max_norm (1e6) is never
  reached by these grads (norms below 1e3), so both sides multiply by exactly
  1.0; clips by value run MMEngine's own code on both sides.
* The logged L2 norm (``train/grad_norm``) differs in summation order (README):
  a float32 sum of n non-negative terms is within (n - 1) u of the exact sum
  (u = 2^-24), ours within its block length; the square root halves that. With
  n = 36992 elements per step: |ours - MMEngine's| <= 2 n u |norm| = 4.4e-3
  relative. A missing scale (2^8 and more) or a missing accumulation factor (>= 2)
  is far outside that.
* Grads are not compared between a step and the next ``zero_grad`` under AMP or
  a fused L2 clip (README: ours keep the scaled, unclipped values); before a call
  that uses them, ours take MMEngine's grads.
* README-documented differences allowed exactly: a step that ours refuses whole
  where torch's fused Adam half-updates (a grad of another dtype), or where torch
  accepts the grad as a flat buffer (another shape of the same numel): ours must
  then be unchanged and name the tensor, and the oracle takes ours' values.
* MMEngine+torch's own poisoning: ``GradScaler.step`` leaves ``optimizer.grad_scale``
  and ``found_inf`` behind when ``optimizer.step`` raises, and the next step
  multiplies the stale scale in (the update divided by scale^2); with a clip,
  ``unscale_`` before the failure leaves the stage UNSCALED, and the next step
  raises. Where ours took the fused path it must show neither; the oracle (and ours
  where it took MMEngine's path, which then must match MMEngine's) is then cleaned
  up (the attributes deleted, the scaler's per-optimizer state reset), so the rest
  of the sequence compares the steps, not torch's stale attributes.

Hunting campaign: 550 seeded sequences of 24 calls (about 3,500 injected failures)
matched MMEngine's outcome, with every refusal of ours whole. One bug (unclear
error, nothing changed), fixed: with a fused L2 clip or AMP a meta parameter failed in
the norm pass with torch's unnamed errors
(``test_meta_parameter_refused_by_name_on_fused_wrapper_path``).
"""
import copy
import gc
import math
import random
import signal
from collections import defaultdict

import mmengine.optim as mmo
import pytest
import torch
from mmengine.logging import MessageHub
from torch import nn
from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state

import pygan_optim
from pygan_optim import FusedAdam
from test_wrappers_oracle import mm_amp_wrapper
# (the autouse fixture applies here too: one thread, MMEngine's logger quiet)
from test_hunt_stateful_wrappers_s40 import Mismatch, _quiet_one_thread  # noqa: F401

N_ELEMENTS = 16 * 256 + 256 * 128 + 128  # 36992: every tensor a multiple of 128
NORM_RTOL = 2 * N_ELEMENTS * 2.0 ** -24




class Boom(ValueError):
    pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 256, bias=False)    # 4096
        self.l2 = nn.Linear(256, 128, bias=False)   # 32768: kept as exp_avg when beta1 = 0
        self.head = nn.Parameter(torch.randn(128) * 0.1)

    def forward(self, x, fail=None):
        y = self.l2(torch.tanh(self.l1(x))).float()
        if fail is not None:
            raise fail()  # a new exception each time: a kept traceback would keep the graph
        return y.pow(2).mean() + (y * self.head.float()).mean()


def eqz(a, b):
    """Bit equality up to the sign of zero, NaN equal to NaN, same layout."""
    if a is None or b is None:
        return a is None and b is None
    if a.layout != b.layout or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device != b.device:
        return False
    if a.is_meta:
        return True
    if a.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def outcome(fn):
    try:
        return ("ok", fn())
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - both must fail alike
        e.__traceback__ = None  # (its frames would keep autograd graphs alive)
        return ("err", type(e), str(e))


def stage(w):
    return w.loss_scaler._per_optimizer_states[id(w.optimizer)]["stage"]


class Pair:
    """Ours (FusedAdam) and MMEngine's (torch fused Adam), driven alike."""

    def __init__(self, seed, cfg):
        self.cfg = cfg
        self.hub = MessageHub.get_instance(f"s41_{seed}_{random.random()}")
        torch.manual_seed(seed)
        self.mo = Net()
        self.mm = copy.deepcopy(self.mo)
        hp = dict(lr=1e-2, betas=(cfg["beta1"], 0.999), eps=1e-8)

        def groups(m):
            if not cfg["two_groups"]:
                return list(m.parameters())
            return [{"params": [m.l1.weight, m.head]}, {"params": [m.l2.weight], "lr": 5e-3}]

        oo = FusedAdam(groups(self.mo), **hp)
        oo.keep_grad_min_bytes_cpu = 0
        om = torch.optim.Adam(groups(self.mm), fused=True, **hp)
        # (MMEngine's __init__ pops 'type' from the dict it is given: one copy each)
        kw = lambda: dict(accumulative_counts=cfg["accu"],  # noqa: E731
                          clip_grad=copy.deepcopy(cfg["clip"]))
        if cfg["amp"] is None:
            self.wo = pygan_optim.OptimWrapper(oo, **kw())
            self.wm = mmo.OptimWrapper(om, **kw())
        else:
            self.wo = pygan_optim.AmpOptimWrapper(loss_scale=copy.deepcopy(cfg["amp"]),
                                                  dtype="bfloat16", optimizer=oo, **kw())
            self.wm = mm_amp_wrapper(cfg["amp"], dtype="bfloat16", optimizer=om, **kw())
        self.amp = cfg["amp"] is not None
        clip = cfg["clip"] or {}
        self.fused_norm = bool(clip) and clip.get("type", "norm") == "norm"
        self.data = torch.Generator().manual_seed(seed + 1)
        self.grads_diverged = False
        self.log = []
        self.events = defaultdict(int)

    # ---- helpers
    def P(self, which):
        return list((self.mo if which == "o" else self.mm).parameters())

    def named(self, which, name):
        return dict((self.mo if which == "o" else self.mm).named_parameters())[name]

    @staticmethod
    def opt_state(w):
        return [dict(w.optimizer.state.get(p, {}))
                for g in w.optimizer.param_groups for p in g["params"]]

    def fail(self, msg):
        raise Mismatch(f"{msg}\ncfg={self.cfg}\ncalls (last 10): {self.log[-10:]}")

    def snapshot(self, which):
        """What a refused step must leave as it was: parameters, optimizer state,
        the scale and growth tracker. (Counts and the scaler's stage are compared
        with the oracle: update_params' backward counts before the step refuses,
        and an unscale_ on MMEngine's path is recorded before it.)"""
        w = self.wo if which == "o" else self.wm
        snap = dict(params=[p.detach().clone() for p in self.P(which)],
                    state=[{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                           for s in self.opt_state(w)])
        if self.amp:
            snap["scaler"] = (w.loss_scaler.get_scale(), w.loss_scaler._get_growth_tracker())
        return snap

    def unchanged_since(self, snap, which, what):
        now = self.snapshot(which)
        for i, (a, b) in enumerate(zip(now["params"], snap["params"])):
            if not eqz(a, b):
                self.fail(f"{what}: ours raised but param {i} changed (half-updated step)")
        for i, (a, b) in enumerate(zip(now["state"], snap["state"])):
            if set(a) != set(b) or any(not eqz(a[k], b[k]) for k in a):
                self.fail(f"{what}: ours raised but the state of param {i} changed")
        if self.amp and now["scaler"] != snap["scaler"]:
            self.fail(f"{what}: ours raised but the scaler went {snap['scaler']} -> "
                      f"{now['scaler']}")

    def resync_oracle(self):
        """The oracle takes ours' parameters and state (after an allowed divergence)."""
        with torch.no_grad():
            for a, b in zip(self.P("o"), self.P("m")):
                b.copy_(a)
        om = self.wm.optimizer
        for g_o, g_m in zip(self.wo.optimizer.param_groups, om.param_groups):
            for po, pm in zip(g_o["params"], g_m["params"]):
                so = self.wo.optimizer.state.get(po)
                if so:
                    om.state[pm] = {k: v.clone() for k, v in so.items()}
                else:
                    om.state.pop(pm, None)

    def before_grad_use(self):
        if self.grads_diverged:  # README: ours keep scaled / unclipped grads until zero_grad
            for a, b in zip(self.P("o"), self.P("m")):
                a.grad = None if b.grad is None else b.grad.clone()
            self.grads_diverged = False

    def check(self, what):
        for i, (a, b) in enumerate(zip(self.P("o"), self.P("m"))):
            if not eqz(a.detach(), b.detach()):
                self.fail(f"{what}: param {i} differs: max {(a - b).abs().max().item()}")
            if a.requires_grad != b.requires_grad:
                self.fail(f"{what}: requires_grad of param {i}")
            if not self.grads_diverged:
                if (a.grad is None) != (b.grad is None):
                    self.fail(f"{what}: grad {i}: ours None={a.grad is None}, MMEngine's "
                              f"None={b.grad is None}")
                if a.grad is not None and not eqz(a.grad, b.grad):
                    self.fail(f"{what}: grad {i} differs")
        for i, (a, b) in enumerate(zip(self.opt_state(self.wo), self.opt_state(self.wm))):
            if set(a) != set(b):
                self.fail(f"{what}: state {i} keys {sorted(a)} vs {sorted(b)}")
            for k in a:
                if not eqz(a[k].float() if k == "step" else a[k],
                           b[k].float() if k == "step" else b[k]):
                    self.fail(f"{what}: state {i} {k} differs")
        for attr in ("_inner_count", "_max_counts", "_remainder_counts"):
            if getattr(self.wo, attr) != getattr(self.wm, attr):
                self.fail(f"{what}: {attr} {getattr(self.wo, attr)} vs {getattr(self.wm, attr)}")
        if self.amp:
            so, sm = self.wo.loss_scaler, self.wm.loss_scaler
            if so.get_scale() != sm.get_scale():
                self.fail(f"{what}: scale {so.get_scale()} vs {sm.get_scale()}")
            if so._get_growth_tracker() != sm._get_growth_tracker():
                self.fail(f"{what}: growth tracker {so._get_growth_tracker()} vs "
                          f"{sm._get_growth_tracker()}")
            if stage(self.wo) != stage(self.wm):
                self.fail(f"{what}: scaler stage {stage(self.wo)} vs {stage(self.wm)}")
        for name in ("grad_scale", "found_inf"):
            if (name in vars(self.wo.optimizer)) != (name in vars(self.wm.optimizer)):
                self.fail(f"{what}: optimizer attribute {name}: ours "
                          f"{name in vars(self.wo.optimizer)}, MMEngine's "
                          f"{name in vars(self.wm.optimizer)}")
        if torch.is_autocast_enabled("cpu"):
            self.fail(f"{what}: autocast left on")
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            self.fail(f"{what}: SIGINT handler left replaced")

    def after_failure(self, ours_fused_path, allowed):
        """MMEngine+torch's own poisoning (module docstring): must not show on
        ours where ours took the fused path; then cleaned up on both. (Where ours
        refused what torch accepts on MMEngine's path, GradScaler leaves on ours
        what it leaves on torch's Adam when that raises.)"""
        for name in ("grad_scale", "found_inf"):
            if name in vars(self.wo.optimizer) and ours_fused_path:
                self.fail(f"ours left optimizer.{name} behind after a failed fused step")
            if (name in vars(self.wo.optimizer) and name not in vars(self.wm.optimizer)
                    and not allowed):
                self.fail(f"ours left optimizer.{name} behind where MMEngine's did not")
            vars(self.wo.optimizer).pop(name, None)
            vars(self.wm.optimizer).pop(name, None)
        if self.amp:
            so, sm = stage(self.wo), stage(self.wm)
            if so is not OptState.READY and so is not sm and not allowed:
                self.fail(f"ours left the scaler stage {so} (MMEngine's {sm})")
            for w in (self.wo, self.wm):
                w.loss_scaler._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)

    def ours_fused_path(self):
        try:
            return self.wo._takes_fused_path({})
        except (TypeError, ValueError):  # an invalid clip_grad: ours raises before anything
            return True

    # ---- calls
    def losses(self, mult=1.0, fail=None, detach=False):
        x = torch.randn(4, 16, generator=self.data)
        out = []
        for m, w in ((self.mo, self.wo), (self.mm, self.wm)):
            r = outcome(lambda: self._forward(m, w, x, mult, fail))
            out.append(r)
        (ro, rm) = out
        if ro[0] != rm[0] or (ro[0] == "err" and ro[1] is not rm[1]):
            self.fail(f"forward: ours {ro} vs MMEngine's {rm}")
        if ro[0] == "err":
            return None
        lo, lm = ro[1], rm[1]
        if not eqz(lo.detach(), lm.detach()):
            self.fail(f"loss {lo.item()} vs {lm.item()}")
        if detach:
            return lo.detach(), lm.detach()
        return lo, lm

    @staticmethod
    def _forward(m, w, x, mult, fail):
        with w.optim_context(m):
            return m(x, fail) * mult

    def both(self, fo, fm, what, *, allow=None):
        """Runs fo and fm; returns (ours' outcome, MMEngine's outcome, norm ours, norm mm)."""
        snap = self.snapshot("o")
        fused = self.ours_fused_path()
        self.hub.update_scalar("train/grad_norm", -1.0)
        ro = outcome(fo)
        no = self.hub.get_scalar("train/grad_norm").current()
        self.hub.update_scalar("train/grad_norm", -1.0)
        rm = outcome(fm)
        nm = self.hub.get_scalar("train/grad_norm").current()
        self.log.append((what, ro[0], ro[1].__name__ if ro[0] == "err" else "",
                         rm[0], rm[1].__name__ if rm[0] == "err" else ""))
        if ro[0] == "err":
            self.events["ours_raised"] += 1
        allowed = allow(ro, rm) if allow is not None else False
        if allowed:
            self.events[f"allowed_{allowed}"] += 1
            # Ours refused whole: nothing of ours changed, and the message names it.
            self.unchanged_since(snap, "o", what)
            self.resync_oracle()
            self.grads_diverged = True
            if self.amp and rm[0] == "ok":  # the oracle stepped and updated its scale
                self.wm.loss_scaler.load_state_dict(self.wo.loss_scaler.state_dict())
        elif ro[0] != rm[0] or (ro[0] == "err" and ro[1] is not rm[1]):
            self.fail(f"{what}: ours {ro} vs MMEngine's {rm}")
        if ro[0] == "ok" and rm[0] == "ok":
            if not (no == nm or (math.isnan(no) and math.isnan(nm))
                    or abs(no - nm) <= NORM_RTOL * abs(nm)):
                self.fail(f"{what}: logged grad_norm {no} vs {nm}")
        if ro[0] == "err" or rm[0] == "err":
            self.after_failure(fused, allowed)
        return ro, rm

    def train(self, mult=1.0, zero_kwargs=None, fail=None, detach=False, allow=None,
              what="update_params"):
        self.before_grad_use()
        losses = self.losses(mult, fail, detach)
        if losses is None:
            self.check(f"{what} (forward raised)")
            return
        lo, lm = losses
        self.both(lambda: self.wo.update_params(lo, zero_kwargs=copy.deepcopy(zero_kwargs)),
                  lambda: self.wm.update_params(lm, zero_kwargs=copy.deepcopy(zero_kwargs)),
                  what, allow=allow)
        if self.amp or self.fused_norm:
            # a step that ran and raised after (a post-hook) leaves the grads differing
            self.grads_diverged = self.grads_diverged or self._some_grad_differs()
        self.check(what)

    def _some_grad_differs(self):
        return any(not eqz(a.grad, b.grad) for a, b in zip(self.P("o"), self.P("m")))

    def backward(self, mult=1.0, detach=False):
        self.before_grad_use()
        losses = self.losses(mult, None, detach)
        lo, lm = losses
        so, sm = self.wo.scale_loss(lo), self.wm.scale_loss(lm)
        self.both(lambda: self.wo.backward(so), lambda: self.wm.backward(sm), "backward")
        self.check("backward")

    def step(self, allow=None, what="step"):
        self.before_grad_use()
        self.both(self.wo.step, self.wm.step, what, allow=allow)
        if self.amp or self.fused_norm:
            self.grads_diverged = True
        self.check(what)

    def zero_grad(self, set_to_none=True):
        self.both(lambda: self.wo.zero_grad(set_to_none=set_to_none),
                  lambda: self.wm.zero_grad(set_to_none=set_to_none), "zero_grad")
        self.grads_diverged = False
        self.check("zero_grad")

    def ensure_grads(self):
        if all(p.grad is None for p in self.P("o")):
            self.backward()


# ---- allowances (module docstring) -----------------------------------------------

def refused_dtype(ro, rm):
    """A grad of another dtype: ours refuses by name, torch's fused Adam raises
    after updating the other parameters (README: a refused step changes nothing)."""
    if ro[0] == "err" and ro[1] is RuntimeError and "dtype" in ro[2] and "parameter" in ro[2]:
        return "dtype_refused"
    return False


def refused_shape(ro, rm):
    """A grad of another shape of the same numel: ours refuses by name; torch's
    fused Adam reads it as a flat buffer (and its clip and unscale accept it)."""
    if ro[0] == "err" and ro[1] is RuntimeError and "shape" in ro[2] and "parameter" in ro[2]:
        return "shape_refused"
    return False


def refused_sparse(ro, rm):
    """A sparse grad: ours refuses whole with torch's Adam message plus the
    parameter; torch's fused Adam raises the same after updating the groups before
    it, and MMEngine's L2 clip gets there first and raises NotImplementedError (a
    subclass of RuntimeError) from torch's norm, after unscale_."""
    if (ro[0] == "err" and ro[1] is RuntimeError and "sparse" in ro[2] and "parameter" in ro[2]
            and rm[0] == "err" and issubclass(rm[1], RuntimeError)):
        return "sparse_refused"
    return False


def refused_meta(ro, rm):
    """A parameter (and grad) on the meta device: ours refuses whole, naming it;
    torch's fused Adam steps the meta tensor, leaving the others updated."""
    if ro[0] == "err" and ro[1] is RuntimeError and "meta" in ro[2] and "parameter" in ro[2]:
        return "meta_refused"
    return False


# ---- the injections ---------------------------------------------------------------

def inj_meta(pair, rng):
    """A param group holding a parameter on the meta device, with a meta grad,
    added to both optimizers for one step and removed after."""
    pair.ensure_grads()
    pair.before_grad_use()
    metas = []
    for w in (pair.wo, pair.wm):
        q = nn.Parameter(torch.empty(128, device="meta"))
        q.grad = torch.empty_like(q)
        w.optimizer.add_param_group({"params": [q]})
        metas.append(q)
    try:
        # (pair.step would compare the meta tensors too; the rest is compared below)
        pair.both(pair.wo.step, pair.wm.step, "step, a parameter on meta", allow=refused_meta)
    finally:
        for w, q in zip((pair.wo, pair.wm), metas):
            w.optimizer.param_groups.pop()
            w.optimizer.state.pop(q, None)
    pair.grads_diverged = True
    pair.zero_grad()


def op_step_without_grads(pair, rng):
    """A step with no grad at all (GradScaler: no inf checks recorded)."""
    pair.zero_grad(set_to_none=True)
    pair.step(what="step without grads")


def inj_grad_dtype(pair, rng):
    """backward makes a float64 grad for one parameter (torch's grad_dtype)."""
    name = rng.choice(["l1.weight", "l2.weight", "head"])
    for which in "om":
        p = pair.named(which, name)
        p.grad = None
        p.grad_dtype = torch.float64
    try:
        pair.train(allow=refused_dtype, what=f"update_params, {name} grad float64")
        if pair.wo._inner_count % pair.wo._accumulative_counts:  # not stepped yet
            pair.step(allow=refused_dtype, what=f"step, {name} grad float64")
    finally:
        for which in "om":
            p = pair.named(which, name)
            p.grad = None
            p.grad_dtype = None
    pair.zero_grad()


def inj_grad_edit(pair, rng):
    """A grad edited behind autograd's back: bfloat16 data, another shape, sparse."""
    pair.ensure_grads()
    pair.before_grad_use()
    name = rng.choice(["l1.weight", "l2.weight", "head"])
    kind = rng.choice(["bf16", "shape", "sparse"])
    for which in "om":
        p = pair.named(which, name)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        if kind == "bf16":
            g.data = g.bfloat16()
        elif kind == "shape":
            g.data = g.reshape(-1, 2) if g.ndim == 1 else g.t().contiguous()
        else:
            p.grad = g.to_sparse()
    allow = dict(bf16=refused_dtype, shape=refused_shape, sparse=refused_sparse)[kind]
    if rng.random() < 0.5 or pair.wo._accumulative_counts == 1:
        pair.step(allow=allow, what=f"step, {name} grad {kind}")
    else:
        pair.train(allow=allow, what=f"update_params, {name} grad {kind}")
    pair.zero_grad(set_to_none=True)


def inj_no_grad_loss(pair, rng):
    pair.train(detach=True, what="update_params(loss without grad)")


def inj_loss_raises(pair, rng):
    exc = rng.choice([Boom, KeyboardInterrupt])
    pair.train(fail=exc, what=f"loss raises {exc.__name__}")


def _hook_raiser(exc_type, msg, count=1):
    left = [count]

    def hook(*args):
        left[0] -= 1
        if left[0] <= 0:
            raise exc_type(msg)
    return hook


def inj_step_hook(pair, rng):
    where = rng.choice(["pre", "post", "global_pre"])
    exc_type = rng.choice([Boom, KeyboardInterrupt])
    handles = []
    if where == "global_pre":
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        flag = {"on": True}

        def ghook(opt, args, kwargs):
            if flag["on"]:
                raise exc_type("global pre-hook")
        handles.append(register_optimizer_step_pre_hook(ghook))
    else:
        for w in (pair.wo, pair.wm):
            reg = (w.optimizer.register_step_pre_hook if where == "pre"
                   else w.optimizer.register_step_post_hook)
            handles.append(reg(_hook_raiser(exc_type, f"{where}-hook")))
    try:
        call = rng.choice(["train", "step"])
        if call == "train":
            pair.train(mult=rng.choice([1.0, 1.0, math.inf]) if pair.amp else 1.0,
                       zero_kwargs=rng.choice([None, dict(set_to_none=False)]),
                       what=f"update_params, {where} hook raises {exc_type.__name__}")
        else:
            pair.ensure_grads()
            pair.step(what=f"step, {where} hook raises {exc_type.__name__}")
    finally:
        for h in handles:
            h.remove()
    if rng.random() < 0.7:
        pair.zero_grad(set_to_none=rng.random() < 0.5)


def inj_grad_hook(pair, rng):
    """A tensor hook that raises during backward: some grads are accumulated,
    _inner_count is not counted (both sides run the same autograd)."""
    name = rng.choice(["l1.weight", "l2.weight", "head"])
    exc_type = rng.choice([Boom, KeyboardInterrupt])
    handles = [pair.named(w, name).register_hook(_hook_raiser(exc_type, "grad hook"))
               for w in "om"]
    try:
        pair.train(what=f"update_params, grad hook on {name} raises {exc_type.__name__}")
    finally:
        for h in handles:
            h.remove()


def inj_toggle_requires_grad(pair, rng):
    name = rng.choice(["l1.weight", "l2.weight", "head"])
    when = rng.choice(["before_forward", "before_step"])
    ps = [pair.named(w, name) for w in "om"]
    if when == "before_forward":
        for p in ps:
            p.requires_grad_(False)
        pair.train(what=f"update_params, {name} frozen")
        pair.train(what=f"update_params, {name} frozen")
    else:
        pair.backward()
        for p in ps:
            p.requires_grad_(False)
        pair.step(what=f"step, {name} frozen with a grad")
    for p in ps:
        p.requires_grad_(True)
    pair.zero_grad()


BAD_CLIPS = [dict(max_norm="abc"), dict(max_norm=None), dict(max_norm=1e6, bogus=1),
             dict(norm_type=2.0), dict(max_norm=[1.0]), dict(max_norm=1e6, norm_type="two"),
             dict(max_norm=1e6, error_if_nonfinite="yes"), dict(max_norm=1e6, foreach="x"),
             dict(type="value", clip_value="x"), dict(type="value", max_norm=1e6)]


def inj_bad_clip(pair, rng):
    """A clip_grad that MMEngine's __init__ takes and its step refuses: set as
    __init__ sets it (clip_func from 'type', the rest as clip_grad_kwargs)."""
    bad = copy.deepcopy(rng.choice(BAD_CLIPS))
    clip_type = bad.pop("type", "norm")
    func = dict(norm=torch.nn.utils.clip_grad_norm_, value=torch.nn.utils.clip_grad_value_)
    names = ("clip_grad_kwargs", "clip_func", "grad_name")
    absent = object()
    saved = [{n: vars(w).get(n, absent) for n in names} for w in (pair.wo, pair.wm)]
    for w in (pair.wo, pair.wm):
        w.clip_grad_kwargs = copy.deepcopy(bad)
        w.clip_func = func[clip_type]
        w.grad_name = f"grad_{clip_type}"
    try:
        if rng.random() < 0.5:
            pair.ensure_grads()  # (with no grad, GradScaler's own refusal comes first)
            pair.step(what=f"step, clip_grad {clip_type} {bad}")
        else:
            pair.train(what=f"update_params, clip_grad {clip_type} {bad}")
    finally:
        for w, old in zip((pair.wo, pair.wm), saved):
            for n in names:
                if old[n] is absent:
                    vars(w).pop(n, None)
                else:
                    setattr(w, n, old[n])
    pair.zero_grad()


# ---- plain calls --------------------------------------------------------------------

def op_train(pair, rng):
    mult = 1.0
    if pair.amp and rng.random() < 0.25:
        mult = rng.choice([math.inf, math.nan])
    pair.train(mult=mult, zero_kwargs=rng.choice([None, None, dict(set_to_none=False)]))


def op_backward(pair, rng):
    pair.backward()


def op_step(pair, rng):
    pair.ensure_grads()
    pair.step()


def op_zero(pair, rng):
    pair.zero_grad(set_to_none=rng.random() < 0.5)


PLAIN = [op_train, op_train, op_train, op_backward, op_step, op_zero]
INJECTIONS = [inj_meta, op_step_without_grads, inj_grad_dtype, inj_grad_edit, inj_no_grad_loss, inj_loss_raises, inj_step_hook,
              inj_grad_hook, inj_toggle_requires_grad, inj_bad_clip]


def draw_config(rng):
    return dict(
        amp=rng.choice([None, None, "dynamic", 2.0 ** rng.randint(4, 12),
                        dict(init_scale=2.0 ** 10, growth_interval=2)]),
        clip=rng.choice([None, dict(max_norm=1e6), dict(type="value", clip_value=1e6),
                         dict(type="value", clip_value=1e-3)]),
        accu=rng.randint(1, 4), beta1=rng.choice([0.0, 0.9]),
        two_groups=rng.random() < 0.5)


def run_sequence(seed, n_ops=24, injections=INJECTIONS):
    rng = random.Random(seed)
    cfg = draw_config(rng)
    pair = Pair(seed, cfg)
    for _ in range(n_ops):
        op = rng.choice(injections) if rng.random() < 0.4 else rng.choice(PLAIN)
        op(pair, rng)
        pair.check(f"after {op.__name__}")
    # A failure must not poison the next steps: a few clean updates, compared bitwise.
    pair.zero_grad()
    for _ in range(pair.wo._accumulative_counts + 1):
        pair.train()
    return pair


@pytest.mark.parametrize("seed", range(40))
def test_injected_failures_match_mmengine(seed):
    run_sequence(seed)


def test_fused_amp_step_failure_leaves_no_stale_scale():
    """A step pre-hook that raises under AMP: GradScaler.step leaves
    torch fused Adam's grad_scale behind, and MMEngine's next step divides by
    scale^2 (torch's own poisoning); ours' fused path leaves nothing, and its next
    step equals a clean run's."""
    pair = Pair(0, dict(amp="dynamic", clip=None, accu=1, beta1=0.9, two_groups=False))
    pair.train()
    handles = [w.optimizer.register_step_pre_hook(_hook_raiser(Boom, "pre-hook"))
               for w in (pair.wo, pair.wm)]
    pair.backward()
    snap = pair.snapshot("o")
    r = outcome(pair.wo.step)
    assert r[0] == "err" and r[1] is Boom
    rm = outcome(pair.wm.step)  # the oracle fails alike, and keeps torch's stale attributes
    assert rm[0] == "err" and rm[1] is Boom and "grad_scale" in vars(pair.wm.optimizer)
    for h in handles:
        h.remove()
    pair.unchanged_since(snap, "o", "pre-hook raised")
    assert "grad_scale" not in vars(pair.wo.optimizer)
    assert "found_inf" not in vars(pair.wo.optimizer)
    assert stage(pair.wo) is OptState.READY
    pair.after_failure(True, False)
    pair.zero_grad()
    for _ in range(3):
        pair.train()


# ---- bugs found (fixed in session 41) --------------------------------------------------

@pytest.mark.parametrize("amp,clip", [(False, dict(max_norm=1e6)), (True, None),
                                      (True, dict(max_norm=1e6))])
def test_meta_parameter_refused_by_name_on_fused_wrapper_path(amp, clip):
    q = nn.Parameter(torch.empty(128, device="meta"))
    q.grad = torch.empty_like(q)
    p = nn.Parameter(torch.ones(128))
    p.grad = torch.ones(128)
    opt = FusedAdam([q, p])
    if amp:
        w = pygan_optim.AmpOptimWrapper(optimizer=opt, clip_grad=copy.deepcopy(clip))
        w.loss_scaler.scale(torch.ones((), requires_grad=True))  # the scale is made lazily
    else:
        w = pygan_optim.OptimWrapper(opt, clip_grad=copy.deepcopy(clip))
    with pytest.raises(RuntimeError) as info:
        w.step()
    # Nothing changed (this part holds today).
    assert torch.equal(p.detach(), torch.ones(128)) and len(opt.state) == 0
    # As the plain step's refusal: "params[0] is a meta tensor ... parameter 0 of param group 0".
    assert "meta" in str(info.value) and "parameter 0 of param group 0" in str(info.value)
