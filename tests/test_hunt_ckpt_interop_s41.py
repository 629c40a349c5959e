"""Session 41 hunt: checkpoints moving both ways between pygan_optim and the native
optimizers and wrappers, mid-run, at every point a user can save.

What it hunts
-------------
``state_dict()`` taken from ours or from the native side at random points of a seeded
run (after plain steps, GradScaler steps that skip on inf, updates that keep a grad as
its exp_avg, in the middle of an accumulation window, after the loss scale moved),
sent through ``copy.deepcopy``, ``torch.save``/``torch.load`` (``weights_only`` True
and False) or handed over as is, and loaded into a fresh object of the other kind and of
the same kind (or into the live one of the other kind); then both sides continue and are
compared after every call. Also: checkpoints whose state is in another dtype than the
parameters, whose groups carry ``foreach``/``fused``/``capturable``/``differentiable``
set otherwise or lack keys (older torch, Python-number steps), with params that never
stepped, whose state tensors have another memory layout than their parameters, loaded
into FusedAdamW from Adam and back, a state_dict kept by the caller across loads and
updates that keep grads, and bad loads (wrong group count or size, broken state) that
must raise torch's error and leave ours as it was (a step updates every param or none).

Oracles
-------
* ``torch.optim.Adam/AdamW(fused=True)`` (after a load of a checkpoint whose groups say
  ``fused=None`` the test sets ``group['fused'] = True`` again, as README says);
  torch's for-loop Adam only as a source of checkpoints and for its load-time behaviour.
* MMEngine 0.10.7's ``OptimWrapper`` / ``AmpOptimWrapper`` / ``OptimWrapperDict`` holding
  ``torch.optim.Adam(fused=True)``; MMEngine's AmpOptimWrapper is built on the CPU with its
  CUDA check lifted and a ``torch.amp.GradScaler('cpu')`` (as tests/test_wrappers_oracle.py
  does). Ours: ``pygan_optim.OptimWrapper`` / ``AmpOptimWrapper`` over ``FusedAdam`` with
  ``keep_grad_min_bytes_cpu = 0`` (a 32768-element weight keeps its grad when beta1 = 0).

Tolerances
----------
* Bits (``torch.equal`` and equal dtypes; -0.0 == 0.0, which README allows with beta1 = 0)
  for parameters, every state tensor and the scaler state, everywhere except below: the
  README promises bit identity with ``Adam(fused=True)`` on the CPU away from torch's
  scalar tails. Torch runs on one thread and every tensor has a multiple of 128 elements,
  so no tail is hit; loss scales are powers of two (1/scale is exact either way).
* Wrapper runs with a clip use ``clip_grad=dict(max_norm=1e6)``, a threshold that does not
  bind: the coefficient clamps to exactly 1.0 on both sides, so parameters and state are
  still compared bitwise (README: a binding fused L2 clip differs from clip_grad_norm_ in
  the last bits; tests/test_hunt_stateful_wrappers_s40.py covers those with tolerances).
  Only the logged pre-clip norm is compared with a tolerance, 2^-8 relative:
  clip_grad_norm_ takes the bfloat16 gain's norm in bfloat16 (rounded to within 2^-9
  relative; README: "a logged norm up to 0.2%"), ours in float32, and the float32
  parts sum in another order (about 16 * 2^-24); 2^-8 is a 2x margin over 2^-9.
* Steps loaded as float64 keep or lose that dtype by the saved groups' ``fused`` flag
  (torch's load policy; ours save fused=None): after such a load steps are compared by
  value. An int64 step is refused by torch's fused Adam and read as float32 by ours
  (NOTES): tested against torch fused given float32 steps.
"""
import copy
import io
import itertools
import math
import random

import mmengine.optim as mmo
import mmengine.optim.optimizer.amp_optimizer_wrapper as mm_amp_module
import pytest
import torch
from mmengine.logging import MessageHub
from torch import nn

import pygan_optim
from pygan_optim import FusedAdam, FusedAdamW
# (the autouse fixture applies here too: one thread, MMEngine's logger quiet)
from test_hunt_stateful_wrappers_s40 import Mismatch, _quiet_one_thread  # noqa: F401

INF = float("inf")
_HUB_IDS = itertools.count()




# ---- comparisons -------------------------------------------------------------------

def same_tensor(a, b):
    """Bits (values, -0.0 == 0.0), dtype, shape; NaN equal to NaN."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        return type(a) is type(b) and a == b
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def diff(a, b):
    try:
        return f"{a.dtype}/{b.dtype} max |d| {(a.double() - b.double()).abs().max().item():.3g}"
    except Exception:  # noqa: BLE001
        return f"{a!r} vs {b!r}"


GROUP_KEYS_SKIP = {"params", "fused"}  # 'fused': ours None, the oracle set to True


def compare_state_dicts(so, st, what, *, near=None, int_steps=None):
    """Two optimizer state_dicts: state keys, per-param keys, tensors (dtype and bits,
    or `near(key, a, b)`), param_groups but for 'fused'. `int_steps` 'value': an
    integer step was loaded, which ours holds as float32 (NOTES) where torch keeps the
    integer: steps compared by value; 'skip': not compared (a kept dict still holds the
    integer tensor ours replaced)."""
    if set(so["state"]) != set(st["state"]):
        raise Mismatch(f"{what}: state keys {sorted(so['state'])} vs {sorted(st['state'])}")
    for k in so["state"]:
        a, b = so["state"][k], st["state"][k]
        if set(a) != set(b):
            raise Mismatch(f"{what}: state[{k}] keys {sorted(a)} vs {sorted(b)}")
        for key in a:
            if key == "step" and int_steps == "skip":
                continue
            if key == "step" and int_steps == "value":
                ok = float(a[key]) == float(b[key])
            elif key == "step" and near is None:
                ok = same_tensor(a[key], b[key])
            elif near is not None:
                ok = near(key, a[key], b[key])
            else:
                ok = same_tensor(a[key], b[key])
            if not ok:
                raise Mismatch(f"{what}: state[{k}][{key}]: {diff(a[key], b[key])}")
    if len(so["param_groups"]) != len(st["param_groups"]):
        raise Mismatch(f"{what}: {len(so['param_groups'])} vs {len(st['param_groups'])} groups")
    for i, (ga, gb) in enumerate(zip(so["param_groups"], st["param_groups"])):
        if ga["params"] != gb["params"]:
            raise Mismatch(f"{what}: group {i} params {ga['params']} vs {gb['params']}")
        ka, kb = set(ga) - GROUP_KEYS_SKIP, set(gb) - GROUP_KEYS_SKIP
        if ka != kb or any(ga[k] != gb[k] for k in ka):
            raise Mismatch(f"{what}: group {i} {({k: ga.get(k) for k in ka | kb})} vs "
                           f"{({k: gb.get(k) for k in ka | kb})}")


def round_trip(sd, how):
    """A state_dict through one of the ways a user moves it."""
    if how == "as_is":
        return sd
    if how == "deepcopy":
        return copy.deepcopy(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=(how == "save_wo"))


HOWS = ("as_is", "deepcopy", "save_wo", "save_pickle")


# ---- optimizer level ------------------------------------------------------------------

# (shape, dtype): numel a multiple of 128; the first has 32768 elements (a kept grad).
SPECS = [((256, 128), torch.float32), ((4, 32), torch.float32), ((8, 4, 2, 2), torch.float32),
         ((128,), torch.float32), ((8, 16), torch.bfloat16), ((16, 16), torch.float64),
         ((2, 64), torch.float32)]


def draw_hparams(rng, beta1_zero):
    beta1 = 0.0 if beta1_zero else rng.choice([0.5, 0.9])
    return dict(lr=rng.choice([1e-3, 2e-3, 5e-2]), betas=(beta1, rng.choice([0.99, 0.999])),
                eps=rng.choice([1e-8, 1e-6]), weight_decay=rng.choice([0.0, 0.0, 0.01]),
                amsgrad=rng.random() < 0.3, maximize=rng.random() < 0.2)


def _cast_state(dtype):
    def edit(sd):
        for st in sd["state"].values():
            for k, v in st.items():
                if k != "step":
                    st[k] = v.to(dtype)
    return edit


def _set_groups(**kv):
    def edit(sd):
        for g in sd["param_groups"]:
            g.update(kv)
    return edit


def _old_torch(sd):
    """As torch < 1.12 saved it: no option keys added since, Python-number steps."""
    for g in sd["param_groups"]:
        for k in ("foreach", "capturable", "differentiable", "fused",
                  "decoupled_weight_decay"):
            g.pop(k, None)
    for st in sd["state"].values():
        if "step" in st:  # (an empty entry: a param whose state was only read)
            st["step"] = int(st["step"].item())


def _steps_as(dtype):
    def edit(sd):
        for st in sd["state"].values():
            if "step" in st:
                st["step"] = st["step"].to(dtype)
    return edit


def _renumber(sd):
    """Param ids as another saver may number them (torch maps them by position)."""
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    new = {i: 1000 - 7 * n for n, i in enumerate(ids)}
    for g in sd["param_groups"]:
        g["params"] = [new[i] for i in g["params"]]
    sd["state"] = {new.get(k, k): v for k, v in sd["state"].items()}


def _drop_first_state(sd):
    """A checkpoint without state for one param (it never stepped there)."""
    if sd["state"]:
        del sd["state"][min(sd["state"])]


# Edits a user's checkpoint may carry, applied alike to both sides' copies. (torch casts
# state to each parameter's dtype at load, 'step' apart.)
EDITS = {
    "none": lambda sd: None,
    "state_fp64": _cast_state(torch.float64),
    "state_bf16": _cast_state(torch.bfloat16),
    "state_fp32": _cast_state(torch.float32),
    "foreach_true": _set_groups(foreach=True),
    "foreach_false": _set_groups(foreach=False),
    "fused_true": _set_groups(fused=True),
    "capturable": _set_groups(capturable=True),  # NOTES: ours gives torch fused's bits
    "old_torch": _old_torch,
    "steps_fp64": _steps_as(torch.float64),
    "renumber": _renumber,
    "drop_first_state": _drop_first_state,
}


class OptPair:
    """FusedAdam(W) and torch's Adam(W)(fused=True) over equal parameters, in the same
    param groups, driven alike."""

    def __init__(self, seed, adamw=False):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.adamw = adamw
        torch.manual_seed(seed)
        self.po = [nn.Parameter(torch.randn(s, generator=self.gen).to(d)) for s, d in SPECS]
        self.pt = [nn.Parameter(p.detach().clone()) for p in self.po]
        n = len(SPECS)
        order = list(range(n))
        self.rng.shuffle(order)
        cut = sorted(self.rng.sample(range(1, n), self.rng.choice([0, 1, 2])))
        self.groups = [order[a:b] for a, b in zip([0] + cut, cut + [n])]
        beta1_zero = self.rng.random() < 0.6
        self.hps = [draw_hparams(self.rng, beta1_zero) for _ in self.groups]
        self.oo = self.new("o")
        self.ot = self.new("t")
        self.log = []
        self.held = None  # (ours' kept state_dict, torch's kept state_dict)
        self.int_steps = False  # an int64/float64 step was loaded (compare_state_dicts)

    def param_groups(self, params, hps=None):
        hps = hps or self.hps
        return [dict(params=[params[i] for i in g], **hp) for g, hp in zip(self.groups, hps)]

    def new(self, kind, hps=None):
        params = self.po if kind == "o" else self.pt
        if kind == "o":
            opt = (FusedAdamW if self.adamw else FusedAdam)(self.param_groups(params, hps))
            opt.keep_grad_min_bytes_cpu = 0
        else:
            opt = (torch.optim.AdamW if self.adamw else torch.optim.Adam)(
                self.param_groups(params, hps), fused=True)
        return opt

    def fail(self, msg):
        raise Mismatch(f"{msg}\ncalls (last 10): {self.log[-10:]}\ngroups={self.groups} "
                       f"hps={self.hps}")

    def check(self):
        for i, (a, b) in enumerate(zip(self.po, self.pt)):
            if not same_tensor(a.detach(), b.detach()):
                self.fail(f"param {i}: {diff(a, b)}")
        try:
            compare_state_dicts(self.oo.state_dict(), self.ot.state_dict(), "state_dict",
                                int_steps="value" if self.int_steps else None)
        except Mismatch as e:
            self.fail(str(e))
        for i, (a, b) in enumerate(zip(self.po, self.pt)):
            sa, sb = self.oo.state.get(a, {}), self.ot.state.get(b, {})
            if set(sa) != set(sb):
                self.fail(f"state of param {i}: keys {sorted(sa)} vs {sorted(sb)}")
        if self.held is not None:
            try:
                compare_state_dicts(self.held[0], self.held[1], "kept state_dict",
                                    int_steps="skip" if self.int_steps else None)
            except Mismatch as e:
                self.fail(str(e))

    def draw_grads(self):
        grads = []
        for p in self.po:
            if self.rng.random() < 0.15:
                grads.append(None)
            else:
                mag = self.rng.choice([1e-3, 1.0, 30.0])
                grads.append((torch.randn(p.shape, generator=self.gen) * mag).to(p.dtype))
        return grads

    def set_grads(self, grads, mult=1.0):
        for po, pt, g in zip(self.po, self.pt, grads):
            po.grad = None if g is None else (g * mult).to(po.dtype)
            pt.grad = None if g is None else (g * mult).to(pt.dtype)

    def op_step(self):
        grads = self.draw_grads()
        self.set_grads(grads)
        how = self.rng.choice(["step", "step_and_zero_grad", "step_then_zero"])
        self.log.append(("step", how, [g is None for g in grads]))
        if how == "step_and_zero_grad":
            self.oo.step_and_zero_grad()
        else:
            self.oo.step()
            if how == "step_then_zero":
                self.oo.zero_grad()
        self.ot.step()
        if how != "step":
            self.ot.zero_grad()

    def op_scaled_step(self):
        """GradScaler's protocol for optimizers that unscale themselves: grad_scale and
        found_inf set as attributes around step()."""
        grads = self.draw_grads()
        scale = 2.0 ** self.rng.choice([-3, 0, 7, 16])
        inf = self.rng.random() < 0.3
        self.set_grads(grads, scale)
        self.log.append(("scaled_step", scale, inf))
        for opt in (self.oo, self.ot):
            opt.grad_scale = torch.full((), scale)
            opt.found_inf = torch.full((), 1.0 if inf else 0.0)
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
            opt.zero_grad()  # the grads differ after the step (README): not compared

    def op_user_touches_grads(self):
        """Between steps: the user zeroes, scales or accumulates into the grads there are."""
        what = self.rng.choice(["zero_", "mul_", "add_"])
        self.log.append(("touch_grads", what))
        for po, pt in zip(self.po, self.pt):
            for p in (po, pt):
                if p.grad is not None:
                    if what == "zero_":
                        p.grad.zero_()
                    elif what == "mul_":
                        p.grad.mul_(3.0)
                    else:
                        p.grad.add_(1.0)

    def op_touch_state(self):
        """Reading opt.state[p] of a param that has no state leaves an empty entry
        (torch's defaultdict), which state_dict() then saves."""
        i = self.rng.randrange(len(self.po))
        self.log.append(("touch_state", i))
        self.oo.state[self.po[i]]
        self.ot.state[self.pt[i]]

    def op_hold(self):
        """The caller keeps a state_dict of each (values written in place are seen)."""
        self.log.append(("hold",))
        held = (self.oo.state_dict(), self.ot.state_dict())
        # An entry empty now (a state only read) is filled in later by torch's step, not
        # in ours' kept copy: documented (NOTES, Known gaps; strict xfail in
        # tests/test_hunt_stateful_adam_s40.py). Those entries are left out.
        for sd in held:
            sd["state"] = {k: v for k, v in sd["state"].items() if v}
        self.held = held

    def op_reload(self):
        src = self.rng.choice(["o", "t"])
        how = self.rng.choice(HOWS)
        target = self.rng.choice(["fresh", "fresh_other_hp", "live", "self"])
        edit = self.rng.choice(list(EDITS))
        keep_loaded = self.rng.random() < 0.5
        self.log.append(("reload", src, how, target, edit, keep_loaded))
        sd = (self.oo if src == "o" else self.ot).state_dict()
        # Each target loads its own copy unless one of them takes the dict as is.
        sds = {kind: round_trip(sd, how) if how != "as_is" else (
            sd if kind == src else copy.deepcopy(sd)) for kind in ("o", "t")}
        hps = None
        if target == "fresh_other_hp":
            hps = [draw_hparams(self.rng, False) for _ in self.groups]
        for kind in ("o", "t"):
            if target in ("fresh", "fresh_other_hp"):
                opt = self.new(kind, hps)
            else:
                opt = self.oo if kind == "o" else self.ot
                if target == "self":  # each side's own state dict loaded into itself
                    sds[kind] = opt.state_dict()
            EDITS[edit](sds[kind])
            opt.load_state_dict(sds[kind])
            if kind == "t":
                for g in opt.param_groups:
                    g["fused"] = True
            if kind == "o":
                self.oo = opt
            else:
                self.ot = opt
        # A load replaces the state: a kept state_dict is history. The loaded dicts,
        # kept by the caller, hold the live state tensors on both sides (torch casts
        # only what needs it): they must stay equal.
        self.held = (sds["o"], sds["t"]) if keep_loaded else None
        self.int_steps = self.int_steps or edit == "steps_fp64"

    def run(self, n_ops):
        ops = [self.op_step] * 5 + [self.op_scaled_step] * 2 + [self.op_reload] * 3 + [
            self.op_user_touches_grads, self.op_hold, self.op_touch_state]
        for _ in range(n_ops):
            self.rng.choice(ops)()
            self.check()


OPT_SEEDS = range(12)


@pytest.mark.parametrize("adamw", [False, True])
@pytest.mark.parametrize("seed", OPT_SEEDS)
def test_optimizer_checkpoints_both_ways(seed, adamw):
    OptPair(seed, adamw).run(40)


# ---- wrapper level ----------------------------------------------------------------------

def mm_amp_wrapper(loss_scale, **kw):
    """MMEngine's AmpOptimWrapper on the CPU (module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm_amp_module, "is_cuda_available", lambda: True)
        w = mmo.AmpOptimWrapper(loss_scale=copy.deepcopy(loss_scale), dtype="bfloat16", **kw)
    if loss_scale == "dynamic":
        w.loss_scaler = torch.amp.GradScaler("cpu")
    elif isinstance(loss_scale, float):
        w.loss_scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale)
    else:
        w.loss_scaler = torch.amp.GradScaler("cpu", **loss_scale)
    return w


class Net(nn.Module):
    """Linear(256, 128).weight: 32768 elements, a grad kept as exp_avg when beta1 = 0;
    two gains of 128 elements in bfloat16 and float64 (their grads take their dtype);
    every tensor's numel a multiple of 128."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 256, bias=False), nn.Tanh(),
                                  nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 128))
        self.gain16 = nn.Parameter(torch.ones(128, dtype=torch.bfloat16))
        self.gain64 = nn.Parameter(torch.ones(128, dtype=torch.float64))

    def forward(self, x):
        y = self.body(x)
        return y * self.gain16.to(y.dtype) + self.gain64.to(y.dtype)


def make_net(seed):
    torch.manual_seed(seed)
    return Net()


NAMES = ("generator", "discriminator")


class WrapperRig:
    """For each name, a net and its wrapper; `kind` 'o' (pygan_optim's wrappers over
    FusedAdam) or 'm' (MMEngine's over torch's Adam(fused=True)); both in an
    OptimWrapperDict."""

    def __init__(self, kind, nets, cfg, max_iters):
        self.kind, self.nets, self.cfg, self.max_iters = kind, nets, cfg, max_iters
        self.ws = self.build()

    def groups(self, name, net, hps=None):
        hps = hps or self.cfg["hps"][name]
        ps = list(net.parameters())
        if len(hps) == 1:
            return [dict(params=ps, **hps[0])]
        return [dict(params=[p for p in ps if p.ndim > 1], **hps[0]),
                dict(params=[p for p in ps if p.ndim == 1], **hps[1])]

    def build(self, hps=None):
        cfg = self.cfg
        ws = {}
        for name in NAMES:
            net = self.nets[name]
            if self.kind == "o":
                opt = FusedAdam(self.groups(name, net, hps and hps[name]))
                opt.keep_grad_min_bytes_cpu = 0
            else:
                opt = torch.optim.Adam(self.groups(name, net, hps and hps[name]), fused=True)
            kw = dict(optimizer=opt, accumulative_counts=cfg["accu"][name],
                      clip_grad=copy.deepcopy(cfg["clip"]))
            if cfg["amp"] is None:
                w = (pygan_optim.OptimWrapper if self.kind == "o" else mmo.OptimWrapper)(**kw)
            elif self.kind == "o":
                w = pygan_optim.AmpOptimWrapper(loss_scale=copy.deepcopy(cfg["amp"]),
                                                dtype="bfloat16", **kw)
            else:
                w = mm_amp_wrapper(cfg["amp"], **kw)
            ws[name] = w
        return mmo.OptimWrapperDict(**ws)


class WrapperPair:
    def __init__(self, seed):
        rng = self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.hub = MessageHub.get_instance(f"s41_{seed}_{next(_HUB_IDS)}")
        beta1_zero = rng.random() < 0.6
        hps = {}
        for name in NAMES:
            n = rng.choice([1, 2])
            hps[name] = []
            for _ in range(n):
                hp = draw_hparams(rng, beta1_zero)
                hps[name].append(hp)
        amp = rng.choice([None, "dynamic", 2.0 ** rng.choice([4, 10]),
                          dict(init_scale=2.0 ** rng.choice([8, 16]), growth_interval=2)])
        # A clip whose threshold does not bind (coefficient exactly 1): bitwise compare.
        clip = rng.choice([None, dict(max_norm=1e6)])
        self.cfg = dict(hps=hps, amp=amp, clip=clip,
                        accu={name: rng.choice([1, 2, 3, 4]) for name in NAMES})
        self.max_iters = rng.choice([17, 24, 30])
        nets_o = {name: make_net(seed * 7 + i) for i, name in enumerate(NAMES)}
        nets_m = copy.deepcopy(nets_o)
        self.o = WrapperRig("o", nets_o, self.cfg, self.max_iters)
        self.m = WrapperRig("m", nets_m, self.cfg, self.max_iters)
        for rig in (self.o, self.m):
            for name in NAMES:
                rig.ws[name].initialize_count_status(rig.nets[name], 0, self.max_iters)
        self.log = []
        self.norms = {}

    def fail(self, msg):
        raise Mismatch(f"{msg}\ncalls (last 10): {self.log[-10:]}\ncfg={self.cfg}")

    def check(self):
        for name in NAMES:
            wo, wm = self.o.ws[name], self.m.ws[name]
            for i, (a, b) in enumerate(zip(self.o.nets[name].parameters(),
                                           self.m.nets[name].parameters())):
                if not same_tensor(a.detach(), b.detach()):
                    self.fail(f"{name} param {i}: {diff(a, b)}")
                if (a.grad is None) != (b.grad is None) or (
                        a.grad is not None and not same_tensor(a.grad, b.grad)):
                    self.fail(f"{name} grad {i}: {a.grad is None} {b.grad is None}")
            so, sm = wo.state_dict(), wm.state_dict()
            lo, lm = so.pop("loss_scaler", None), sm.pop("loss_scaler", None)
            if lo != lm:
                self.fail(f"{name} loss_scaler state {lo} vs {lm}")
            try:
                compare_state_dicts(so, sm, f"{name} wrapper state_dict")
            except Mismatch as e:
                self.fail(str(e))
            for attr in ("_inner_count", "_max_counts", "_remainder_counts"):
                if getattr(wo, attr) != getattr(wm, attr):
                    self.fail(f"{name} {attr}: {getattr(wo, attr)} vs {getattr(wm, attr)}")
            if self.cfg["amp"] is not None:
                if (wo.loss_scaler.get_scale() != wm.loss_scaler.get_scale()
                        or wo.loss_scaler._get_growth_tracker()
                        != wm.loss_scaler._get_growth_tracker()):
                    self.fail(f"{name} scaler {wo.loss_scaler.state_dict()} vs "
                              f"{wm.loss_scaler.state_dict()}")

    def loss(self, rig, name, x, mult):
        w, net = rig.ws[name], rig.nets[name]
        with w.optim_context(net):
            return net(x).float().pow(2).mean() * mult

    def op_train(self):
        names = [n for n in NAMES if self.o.ws[n]._inner_count < self.max_iters]
        if not names:
            return
        name = self.rng.choice(names)
        mult = 1.0
        if self.cfg["amp"] is not None and self.rng.random() < 0.2:
            mult = self.rng.choice([INF, float("nan")])
        zero = self.rng.choice([None, None, dict(set_to_none=False)])
        self.log.append(("train", name, mult, zero, self.o.ws[name]._inner_count))
        x = torch.randn(8, 32, generator=self.gen)
        norms = []
        for rig in (self.o, self.m):
            loss = self.loss(rig, name, x, mult)
            self.hub.update_scalar("train/grad_norm", -1.0)
            rig.ws[name].update_params(loss, zero_kwargs=copy.deepcopy(zero))
            norms.append(self.hub.get_scalar("train/grad_norm").current())
        no, nm = norms
        # The logged pre-clip norm. clip_grad_norm_ takes gain16's norm in bfloat16 (README:
        # ours in float32, "a logged norm up to 0.2% apart"): that part rounds to within
        # 2^-9 relative, so the total to within 2^-9 as well; the float32 parts' other
        # summation order adds about 16 * 2^-24. 2^-8 (0.4%) leaves a 2x margin.
        if not (no == nm or (math.isnan(no) and math.isnan(nm)) or math.isinf(nm)
                or abs(no - nm) <= 2.0 ** -8 * abs(nm)):
            self.fail(f"logged grad_norm {no} vs {nm}")

    def op_reload(self):
        src = self.rng.choice(["o", "m"])
        how = self.rng.choice(HOWS)
        target = self.rng.choice(["fresh", "fresh_other_hp", "live"])
        level = self.rng.choice(["dict", "wrapper"])
        self.log.append(("reload", src, how, target, level))
        sd = (self.o if src == "o" else self.m).ws.state_dict()
        other_hps = None
        if target == "fresh_other_hp":
            other_hps = {name: [draw_hparams(self.rng, False) for _ in self.cfg["hps"][name]]
                         for name in NAMES}
        # Each side loads its own copy (MMEngine's AmpOptimWrapper pops 'loss_scaler' from
        # the dict it loads); the side the dict came from may take it as is.
        copies = {kind: round_trip(sd, how) if how != "as_is" else (
            sd if kind == src else copy.deepcopy(sd)) for kind in ("m", "o")}
        for kind, rig in (("o", self.o), ("m", self.m)):
            mine = copies[kind]
            if target == "live":
                ws = rig.ws
            else:
                old = rig.ws
                ws = rig.build(other_hps)
                for name in NAMES:  # as the Runner does on resume, mid-window included
                    ws[name].initialize_count_status(rig.nets[name], old[name]._inner_count,
                                                     self.max_iters)
            if level == "dict":
                ws.load_state_dict(mine)
            else:
                for name in NAMES:
                    ws[name].load_state_dict(mine[name])
            if kind == "m":
                for name in NAMES:
                    for g in ws[name].param_groups:
                        g["fused"] = True
            rig.ws = ws

    def op_touch_grads(self):
        """Mid-window, before a save: the user zeroes (through the wrapper or in place)
        or scales the accumulated grads, memory an earlier update may have kept."""
        name = self.rng.choice(NAMES)
        what = self.rng.choice(["wrapper_zero_grad", "zero_", "mul_"])
        to_none = self.rng.random() < 0.5
        self.log.append(("touch_grads", name, what, to_none))
        for rig in (self.o, self.m):
            if what == "wrapper_zero_grad":
                rig.ws[name].zero_grad(set_to_none=to_none)
                continue
            for p in rig.nets[name].parameters():
                if p.grad is not None:
                    p.grad.zero_() if what == "zero_" else p.grad.mul_(2.0)

    def run(self, n_ops):
        ops = [self.op_train] * 4 + [self.op_reload, self.op_touch_grads]
        for _ in range(n_ops):
            self.rng.choice(ops)()
            self.check()


WRAPPER_SEEDS = range(10)


@pytest.mark.parametrize("seed", WRAPPER_SEEDS)
def test_wrapper_checkpoints_both_ways(seed):
    WrapperPair(seed).run(40)


# ---- targeted cases -------------------------------------------------------------------------

def _opt(kind, params, **kw):
    if kind == "o":
        opt = FusedAdam(params, **kw)
        opt.keep_grad_min_bytes_cpu = 0
        return opt
    return torch.optim.Adam(params, fused=True, **kw)


def _step(kind, opt, release=False):
    if kind == "o" and release:
        opt.step_and_zero_grad()
        return
    opt.step()
    if release:
        opt.zero_grad()


def _trained(kind, seed=0, steps=2, groups=None):
    """Three params in two groups, stepped `steps` times with seeded grads."""
    gen = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 32), (128,), (2, 64)]]
    opt = _opt(kind, groups(ps) if groups else [dict(params=ps[:2]),
                                                 dict(params=ps[2:], lr=1e-3, amsgrad=True)],
               lr=1e-2)
    for i in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        _step(kind, opt)
    return ps, opt


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())


def _assert_unchanged(before, ps, opt):
    for i, (a, b) in enumerate(zip(before[0], ps)):
        assert same_tensor(a, b.detach()), f"param {i} changed: {diff(a, b)}"
    compare_state_dicts(before[1], opt.state_dict(), "state_dict after the refusal")


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("direction", ["strided_state_into_contiguous_param",
                                       "contiguous_state_into_strided_param"])
def test_state_of_another_layout_than_its_param(layout, direction):
    """A checkpoint of a channels_last (or transposed) model loaded into a contiguous one
    and back (grads as backward of such a model may give them: contiguous): ours applies
    the state element by element. Oracle: torch fused Adam on the same values with every
    tensor contiguous (torch's fused kernel reads a state or grad of another layout than
    its parameter in memory order, its own bug: tests/test_hunt_stateful_adam_s40.py)."""
    gen = torch.Generator().manual_seed(3)
    shape = (8, 4, 4, 4) if layout == "channels_last" else (16, 32)

    def strided(t):
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        return t.t().contiguous().t()

    base = torch.randn(shape, generator=gen)
    src_p = nn.Parameter(strided(base.clone()) if direction.startswith("strided")
                         else base.clone())
    src = torch.optim.Adam([src_p], lr=1e-2, foreach=False)
    for _ in range(2):
        src_p.grad = torch.randn(shape, generator=gen)
        src.step()
    sd = src.state_dict()
    grads = [torch.randn(shape, generator=gen) for _ in range(3)]
    out = {}
    for kind in ("o", "t"):
        if kind == "o":
            p = nn.Parameter(base.clone() if direction.startswith("strided")
                             else strided(base.clone()))
        else:
            p = nn.Parameter(base.clone())
        opt = _opt(kind, [p], lr=1e-2)
        mine = copy.deepcopy(sd)
        if kind == "t":
            for st in mine["state"].values():
                for k, v in st.items():
                    st[k] = v.contiguous()
        opt.load_state_dict(mine)
        for g in opt.param_groups:
            g["fused"] = True
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[kind] = (p.detach().contiguous(),
                     {k: v.contiguous() for k, v in opt.state[p].items()})
    assert same_tensor(out["o"][0], out["t"][0]), diff(out["o"][0], out["t"][0])
    for k in out["t"][1]:
        assert same_tensor(out["o"][1][k], out["t"][1][k]), k


@pytest.mark.parametrize("bad", ["fewer_groups", "more_groups", "group_size"])
def test_bad_load_raises_torchs_error_and_changes_nothing(bad):
    def edit(sd):
        if bad == "fewer_groups":
            sd["param_groups"] = sd["param_groups"][:1]
        elif bad == "more_groups":
            sd["param_groups"].append(dict(sd["param_groups"][1], params=[99]))
        else:
            sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:1]

    errors, sides = {}, {}
    for kind in ("o", "t"):
        ps, opt = _trained(kind)
        other_ps, other = _trained("t" if kind == "o" else "o", seed=1)
        sd = round_trip(other.state_dict(), "save_wo")
        edit(sd)
        before = _snapshot(ps, opt)
        with pytest.raises(ValueError) as info:
            opt.load_state_dict(sd)
        errors[kind] = str(info.value)
        _assert_unchanged(before, ps, opt)
        sides[kind] = (ps, opt)
    assert errors["o"] == errors["t"]
    # ... and ours goes on as torch's does.
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in sides["o"][0]]
        for kind in ("o", "t"):
            for p, g in zip(sides[kind][0], grads):
                p.grad = g.clone()
            sides[kind][1].step()
    for a, b in zip(sides["o"][0], sides["t"][0]):
        assert same_tensor(a.detach(), b.detach())
    compare_state_dicts(sides["o"][1].state_dict(), sides["t"][1].state_dict(), "after")


BROKEN = {
    # torch's fused Adam runs these on the flat memory; ours refuses them by name.
    "exp_avg_of_another_shape": (lambda sd: sd["state"][2].__setitem__(
        "exp_avg", torch.zeros(64, 2)), RuntimeError, "shape"),
    "exp_avg_of_another_numel": (lambda sd: sd["state"][2].__setitem__(
        "exp_avg", torch.zeros(256)), RuntimeError, "shape"),
    "exp_avg_sq_is_exp_avg": (lambda sd: sd["state"][2].__setitem__(
        "exp_avg_sq", sd["state"][2]["exp_avg"]), RuntimeError, "exp_avg"),
    # torch raises these after it updated group 0.
    "no_exp_avg_sq": (lambda sd: sd["state"][2].pop("exp_avg_sq"), KeyError, "exp_avg_sq"),
    "no_lr": (lambda sd: sd["param_groups"][1].pop("lr"), KeyError, "lr"),
    "lr_as_text": (lambda sd: sd["param_groups"][1].__setitem__("lr", "0.01"), TypeError, "lr"),
    "differentiable": (lambda sd: sd["param_groups"][1].__setitem__("differentiable", True),
                       RuntimeError, "differentiable"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_refused_whole_then_a_good_one_resumes(case):
    """A checkpoint that loads but cannot step: ours raises a clear error naming the
    problem and updates no parameter (torch's fused Adam updates group 0 first, or runs
    on mismatched memory); loading a good checkpoint then resumes as torch does."""
    edit, error, word = BROKEN[case]
    ps, opt = _trained("o")
    ref_ps, ref = _trained("t")
    good = round_trip(ref.state_dict(), "save_wo")
    bad = copy.deepcopy(good)
    edit(bad)
    opt.load_state_dict(bad)
    before = _snapshot(ps, opt)
    for p in ps:
        p.grad = torch.ones_like(p)
    with pytest.raises(error, match=word):
        opt.step()
    _assert_unchanged(before, ps, opt)
    opt.load_state_dict(copy.deepcopy(good))
    ref.load_state_dict(copy.deepcopy(good))
    for g in ref.param_groups:
        g["fused"] = True
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in ps]
        for side_ps, side in ((ps, opt), (ref_ps, ref)):
            for p, g in zip(side_ps, grads):
                p.grad = g.clone()
            side.step()
    for a, b in zip(ps, ref_ps):
        assert same_tensor(a.detach(), b.detach())
    compare_state_dicts(opt.state_dict(), ref.state_dict(), "after the good load")


def test_integer_steps_read_as_torch_fused_reads_float_ones():
    """torch's fused Adam refuses an int64 step that a for-loop Adam's checkpoint may carry
    (its groups say fused=None, so the load keeps it); ours reads it as float32 (NOTES):
    the same numbers as torch fused Adam given float32 steps."""
    ps0, src = _trained("t")
    sd = round_trip(src.state_dict(), "save_wo")
    ints, floats = copy.deepcopy(sd), copy.deepcopy(sd)
    for st in ints["state"].values():
        st["step"] = st["step"].to(torch.int64)
    for g in floats["param_groups"]:
        g["fused"] = None
    out = {}
    for kind, ck in (("o", ints), ("t", floats)):
        ps = [nn.Parameter(p.detach().clone()) for p in ps0]
        opt = _opt(kind, [dict(params=ps[:2]), dict(params=ps[2:])], lr=1e-2)
        opt.load_state_dict(ck)
        for g in opt.param_groups:
            g["fused"] = True
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out[kind] = (ps, opt.state_dict())
    for a, b in zip(out["o"][0], out["t"][0]):
        assert same_tensor(a.detach(), b.detach())
    compare_state_dicts(out["o"][1], out["t"][1], "int64 steps loaded")


ALIASES = {
    "none": None,  # control: the grad is kept
    "view": lambda g: g.view(-1),
    "detach": lambda g: g.detach(),
    "set_from_tensor": lambda g: torch.empty(0).set_(g),
    "set_from_storage": lambda g: torch.empty(0).set_(g.untyped_storage(), 0, g.shape,
                                                      g.stride()),
    "numpy": lambda g: torch.from_numpy(g.numpy()),
    "dlpack": lambda g: torch.from_dlpack(g),
}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_state_dict_after_kept_grad_with_user_alias_zeroed(alias):
    """beta1 = 0: an update that releases the grads may keep one as its exp_avg. A user
    who holds the grad's memory some other way (a view, a tensor set to its storage,
    numpy, dlpack) and zeroes or scales it before saving must not change the saved
    exp_avg: the checkpoint must hold torch's values, and so must the next step."""
    res = {}
    for kind in ("o", "t"):
        gen = torch.Generator().manual_seed(4)
        p = nn.Parameter(torch.randn(256, 128, generator=gen))
        opt = _opt(kind, [p], lr=1e-2, betas=(0.0, 0.999))
        p.grad = torch.randn(256, 128, generator=gen)
        _step(kind, opt, release=True)  # a state to start from
        p.grad = torch.randn(256, 128, generator=gen)
        ptr = p.grad.data_ptr()
        held = None if ALIASES[alias] is None else ALIASES[alias](p.grad)
        _step(kind, opt, release=True)
        kept = opt.state[p]["exp_avg"].data_ptr() == ptr
        if held is not None:
            held.zero_()
        ck = round_trip(opt.state_dict(), "save_wo")
        if held is not None:
            held.fill_(7.0)
        p.grad = torch.randn(256, 128, generator=gen)
        _step(kind, opt, release=True)
        res[kind] = (kept, ck, p.detach().clone(), opt.state_dict())
    if alias == "none":
        assert res["o"][0], "the control did not keep its grad: nothing tested"
    assert not res["t"][0]
    compare_state_dicts(res["o"][1], res["t"][1], "checkpoint")
    assert same_tensor(res["o"][2], res["t"][2])
    compare_state_dicts(res["o"][3], res["t"][3], "after the next update")


@pytest.mark.parametrize("how", ["deepcopy", "save_pickle"])
@pytest.mark.parametrize("adamw", [False, True])
def test_whole_optimizer_copied_with_its_params(how, adamw):
    """copy.deepcopy((params, opt)) and torch.save of both (weights_only=False) mid-run,
    packed and kept state included: the copy and the original go on as torch's do."""
    cls_o = FusedAdamW if adamw else FusedAdam
    cls_t = torch.optim.AdamW if adamw else torch.optim.Adam
    res = {}
    for kind in ("o", "t"):
        gen = torch.Generator().manual_seed(6)
        ps = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(256, 128), (4, 32)]]
        groups = [dict(params=ps[:1], betas=(0.0, 0.99)), dict(params=ps[1:], amsgrad=True)]
        if kind == "o":
            opt = cls_o(groups, lr=1e-2)
            opt.keep_grad_min_bytes_cpu = 0
        else:
            opt = cls_t(groups, lr=1e-2, fused=True)
        for i in range(2):
            for p in ps:
                p.grad = torch.full(p.shape, 0.5 * (i + 1))
            _step(kind, opt, release=True)
        if how == "deepcopy":
            ps2, opt2 = copy.deepcopy((ps, opt))
        else:
            buf = io.BytesIO()
            torch.save((ps, opt), buf)
            buf.seek(0)
            ps2, opt2 = torch.load(buf, weights_only=False)
        if kind == "o":
            opt2.keep_grad_min_bytes_cpu = 0
        for i in range(3):
            for side_ps, side in ((ps2, opt2), (ps, opt)):
                for p in side_ps:
                    p.grad = torch.randn(p.shape, generator=gen)
                _step(kind, side, release=True)
        res[kind] = (ps, ps2, opt.state_dict(), opt2.state_dict())
    for i in (0, 1):
        for a, b in zip(res["o"][i], res["t"][i]):
            assert same_tensor(a.detach(), b.detach())
    compare_state_dicts(res["o"][2], res["t"][2], "original")
    compare_state_dicts(res["o"][3], res["t"][3], "copy")


@pytest.mark.parametrize("src_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("adamw", [False, True])
def test_adam_and_adamw_checkpoints_crossed(src_cls, adamw):
    """torch Adam's checkpoint into AdamW and back (AdamW's __setstate__ forces decoupled
    decay; Adam keeps what the checkpoint says): ours as torch's same class."""
    gen = torch.Generator().manual_seed(8)
    p0 = nn.Parameter(torch.randn(16, 16, generator=gen))
    src = src_cls([p0], lr=1e-2, weight_decay=0.1, fused=True)
    p0.grad = torch.randn(16, 16, generator=gen)
    src.step()
    sd = round_trip(src.state_dict(), "save_wo")
    out = {}
    for kind, cls in (("o", FusedAdamW if adamw else FusedAdam),
                      ("t", torch.optim.AdamW if adamw else torch.optim.Adam)):
        p = nn.Parameter(p0.detach().clone())
        opt = cls([p], lr=1e-3) if kind == "o" else cls([p], lr=1e-3, fused=True)
        opt.load_state_dict(copy.deepcopy(sd))
        for g in opt.param_groups:
            g["fused"] = True
        p.grad = torch.ones_like(p)
        opt.step()
        out[kind] = (p.detach().clone(), opt.state_dict())
    assert same_tensor(out["o"][0], out["t"][0])
    compare_state_dicts(out["o"][1], out["t"][1], "crossed")


@pytest.mark.parametrize("foreach", [False, True])
def test_default_adam_checkpoints_both_ways(foreach):
    """torch's default Adam (for-loop or foreach) mid-run -> ours and torch fused, which
    then agree bit for bit; and ours' checkpoint -> torch's default Adam gives what torch
    fused's own checkpoint gives it."""
    ps0, _ = _trained("t", steps=0)
    seq = torch.Generator().manual_seed(12)
    grads = [[torch.randn(p.shape, generator=seq) for p in ps0] for _ in range(6)]

    def run(opt, ps, gs, release=False, kind="t"):
        for step_grads in gs:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            _step(kind, opt, release)

    src_ps = [nn.Parameter(p.detach().clone()) for p in ps0]
    src = torch.optim.Adam([dict(params=src_ps[:2]), dict(params=src_ps[2:], amsgrad=True)],
                           lr=1e-2, foreach=foreach)
    run(src, src_ps, grads[:3])
    ck = round_trip(src.state_dict(), "save_wo")
    out = {}
    for kind in ("o", "t"):
        ps = [nn.Parameter(p.detach().clone()) for p in src_ps]
        opt = _opt(kind, [dict(params=ps[:2]), dict(params=ps[2:])], lr=1e-3)
        opt.load_state_dict(copy.deepcopy(ck))
        for g in opt.param_groups:
            g["fused"] = True
        run(opt, ps, grads[3:], release=True, kind=kind)
        out[kind] = (ps, opt)
    for a, b in zip(out["o"][0], out["t"][0]):
        assert same_tensor(a.detach(), b.detach())
    compare_state_dicts(out["o"][1].state_dict(), out["t"][1].state_dict(), "from default")
    # back into torch's default Adam, from each side's checkpoint
    back = {}
    for kind in ("o", "t"):
        ps = [nn.Parameter(p.detach().clone()) for p in out[kind][0]]
        opt = torch.optim.Adam([dict(params=ps[:2]), dict(params=ps[2:])], lr=1e-3,
                               foreach=foreach)
        sd = round_trip(out[kind][1].state_dict(), "save_pickle")
        for g in sd["param_groups"]:
            g["fused"], g["foreach"] = None, foreach
        opt.load_state_dict(sd)
        run(opt, ps, grads[:2])
        back[kind] = (ps, opt.state_dict())
    for a, b in zip(back["o"][0], back["t"][0]):
        assert same_tensor(a.detach(), b.detach())
    compare_state_dicts(back["o"][1], back["t"][1], "back into default")
