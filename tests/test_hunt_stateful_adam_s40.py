"""Session 40 hunt: a randomized STATEFUL differential test of FusedAdam/FusedAdamW.

One FusedAdam (FusedAdamW) and one torch.optim.Adam(fused=True) (AdamW) are driven
through the same seeded random sequence of user operations, and after every
operation the parameters, grads, every state tensor (values, dtype, strides),
state_dict(), param_groups, tensors the user holds (an exp_avg, a grad, the tensors
of a kept state_dict, a shared lr tensor) and what hooks saw are compared.

Operations mixed (see Driver.OPS): backward/assigned/None grads; step();
step_and_zero_grad(set_to_none=True/False) against torch's step then zero_grad; the
same with a closure; zero_grad; edits of lr (float, 0-d float32/float64/int Tensors,
one Tensor shared by every group), betas (floats and Tensors, beta1 = 0 and back),
eps, weight_decay, maximize, amsgrad (where torch allows), decoupled_weight_decay;
add_param_group; params reordered or moved between groups; state_dict round trips
(deepcopy, torch.save, each optimizer's checkpoint loaded into the other, a state_dict
loaded as it is); held references; state tensors replaced or written in place; a
parameter's state reset to {} or the whole state replaced; step pre/post hooks (that
record, clip params, replace or scale grads, release grads), state_dict and
load_state_dict hooks; sparse grads (both refuse); GradScaler's grad_scale/found_inf
(powers of two); EmaBlend against MMagic's mul_/add_; grads of other strides than
their parameter; one grad shared by two parameters; p.data / set_ / copy_ of params;
requires_grad toggled; float32/float64/bfloat16/float16 and non-contiguous params;
keep_grad_min_bytes_cpu = 0 with beta1 = 0, so released grads become exp_avg.

Tolerances. Bit equality everywhere, as README promises for the CPU, with sizes that
keep torch's scalar tails away (multiples of 128 elements, one or two threads: README's
1-ulp tail exception never applies) and these documented exceptions avoided or
allowed exactly:
- beta1 = 0: a zero exp_avg (and a param moved by it) may have the other sign
  (README): zeros of either sign compare equal for exp_avg and params; no grad is
  ever non-finite (the NaN case).
- loss scales are powers of two (no 2-ulp case); after a scaled step torch's grads
  are unscaled, ours keep the scaled values (README): ours are set to torch's after it.
- amsgrad is never turned on for a state without max_exp_avg_sq (ours creates zeros
  where torch raises KeyError, NOTES.md); no hyper-parameter is written out of range.
- a refused step: torch's fused Adam updates the groups before the refused one and
  creates zero state for the params before the refused grad; ours changes nothing
  (README). Sparse grads go into the first group, and torch's fresh zero states are
  dropped after the refusal.
- torch's state_dict() shares its per-parameter dicts with the optimizer, ours copies
  them (test_kept_state_dict_sees_replaced_entry): a kept state_dict is compared
  through the tensors it held when it was taken.
Not bugs of ours, kept out of the comparison: torch's fused CPU Adam reads a grad
whose strides differ from its parameter's as if they were the parameter's
(test_torch_fused_misreads_grad_strides): torch gets the grad with its param's
strides; and with one grad shared by two params torch unscales it in place twice.
"""
import copy
import io
import random
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn as nn

with warnings.catch_warnings():  # (torch.jit deprecation notes of imported packages)
    warnings.simplefilter("ignore", DeprecationWarning)
    from pygan_optim import EmaBlend, FusedAdam, FusedAdamW

pytestmark = pytest.mark.filterwarnings("ignore")

INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64,
          torch.bfloat16: torch.int16, torch.float16: torch.int16}


KEPT = []


class Mismatch(AssertionError):
    pass


def bits_equal(a, b, zero_sign_ok=False):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_sparse or b.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    if a.dtype not in INT_OF:
        return torch.equal(a, b)
    ia, ib = a.view(INT_OF[a.dtype]), b.view(INT_OF[b.dtype])
    same = ia == ib
    if zero_sign_ok:
        same |= (a == 0) & (b == 0)
    return bool(same.all())


# Sizes: multiples of 128 so that torch's fused loop has no scalar tail on one or two
# threads (README: its tails may differ by 1 ulp), some >= 32768 elements so that
# the grad-as-exp_avg path can run (with keep_grad_min_bytes_cpu = 0).
SHAPES = [(128,), (256,), (16, 8), (32768,), (256, 128)]
DTYPES = [torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16]


class Pair:
    def __init__(self, seed, adamw=False, keep_small=True, log=None):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.adamw = adamw
        self.log = [] if log is None else log
        self.ours_params, self.ref_params = [], []
        self.held = []  # (what, ours tensor, ref tensor)
        self.kept_sds = []  # (ours sd, ref sd)
        self.hook_records = ([], [])
        self.hook_handles = []
        self.grads_defined = True
        self.scaling = False
        kw = self.random_group_opts(first=True)
        # Every other sequence starts in the GAN setting (beta1 = 0, a large parameter),
        # where step_and_zero_grad keeps grads as exp_avg.
        self.gan = seed % 2 == 0
        if self.gan:
            kw["betas"] = (0.0, kw["betas"][1])
        params_a, params_b = self.new_params(self.rng.randint(1, 3), big_first=self.gan)
        groups_a, groups_b = [dict(params=params_a)], [dict(params=params_b)]
        cls_ours = FusedAdamW if adamw else FusedAdam
        cls_ref = torch.optim.AdamW if adamw else torch.optim.Adam
        ours_fused = self.rng.choice([None, True])
        self.ours = cls_ours(groups_a, fused=ours_fused, **kw)
        self.ref = cls_ref(groups_b, fused=True, **kw)
        self.fused_key_differs = ours_fused is None
        if keep_small:
            self.ours.keep_grad_min_bytes_cpu = 0
        self.log.append(f"init {cls_ours.__name__} fused={ours_fused} {kw} "
                        f"params={[(tuple(p.shape), p.dtype, p.stride()) for p in params_a]}")

    # ----- construction helpers
    def random_group_opts(self, first=False):
        r = self.rng
        kw = {}
        if first or r.random() < 0.5:
            kw["lr"] = r.choice([1e-3, 0.01, 0.1, 3e-4])
        if first or r.random() < 0.5:
            kw["betas"] = (r.choice([0.0, 0.0, 0.5, 0.9]), r.choice([0.99, 0.999]))
        if r.random() < 0.3:
            kw["eps"] = r.choice([1e-8, 1e-6, 1e-3])
        if r.random() < 0.3:
            kw["weight_decay"] = r.choice([0.0, 0.01, 0.1])
        if r.random() < 0.2:
            kw["maximize"] = True
        if r.random() < 0.2:
            kw["amsgrad"] = True
        return kw

    def new_params(self, n, big_first=False):
        a, b = [], []
        for k in range(n):
            i = self.rng.randrange(len(SHAPES))
            shape, dtype = SHAPES[i], self.rng.choice(DTYPES)
            if big_first and k == 0:
                shape, dtype = self.rng.choice(SHAPES[3:]), torch.float32
            noncontig = len(shape) == 2 and self.rng.random() < 0.5
            if noncontig:
                base = torch.randn(shape[::-1], generator=self.gen).to(dtype).t()
            else:
                base = torch.randn(shape, generator=self.gen).to(dtype)
            pa = nn.Parameter(base)
            pb = nn.Parameter(torch.empty_strided(base.shape, base.stride(), dtype=dtype))
            with torch.no_grad():
                pb.copy_(base)
            assert pa.stride() == pb.stride()
            a.append(pa)
            b.append(pb)
        self.ours_params += a
        self.ref_params += b
        return a, b

    # ----- checks
    def check(self, what):
        o, r = self.ours, self.ref
        assert len(o.param_groups) == len(r.param_groups)
        for gi, (ga, gb) in enumerate(zip(o.param_groups, r.param_groups)):
            ka, kb = set(ga) - {"params"}, set(gb) - {"params"}
            if ka != kb:
                raise Mismatch(f"{what}: group {gi} keys {ka ^ kb}")
            for k in ka:
                va, vb = ga[k], gb[k]
                if k == "fused" and self.fused_key_differs:
                    continue
                if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
                    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
                            and bits_equal(va, vb)):
                        raise Mismatch(f"{what}: group {gi} {k}: {va!r} vs {vb!r}")
                elif va != vb or type(va) is not type(vb):
                    raise Mismatch(f"{what}: group {gi} {k}: {va!r} vs {vb!r}")
            assert len(ga["params"]) == len(gb["params"])
        for i, (pa, pb) in enumerate(zip(self.ours_params, self.ref_params)):
            if not bits_equal(pa.detach(), pb.detach(), zero_sign_ok=True):
                d = (pa.detach().double() - pb.detach().double()).abs().max().item()
                raise Mismatch(f"{what}: param {i} {pa.dtype} {tuple(pa.shape)} differs, max {d}")
            if self.grads_defined:
                ga, gb = pa.grad, pb.grad
                if (ga is None) != (gb is None):
                    raise Mismatch(f"{what}: grad {i} None-ness {ga is None} vs {gb is None}")
                if ga is not None and not ga.is_sparse and not bits_equal(ga, gb):
                    raise Mismatch(f"{what}: grad {i} values")
            sa, sb = o.state.get(pa), r.state.get(pb)
            sa = {} if sa is None else sa
            sb = {} if sb is None else sb
            if set(sa) != set(sb):
                raise Mismatch(f"{what}: state keys of param {i}: {sorted(sa)} vs {sorted(sb)}")
            for k in sa:
                self.same_state_value(f"{what}: state {k} of param {i}", k, sa[k], sb[k])
        for j, (what_h, ta, tb) in enumerate(self.held):
            self.same_state_value(f"{what}: held #{j} {what_h}", what_h, ta, tb)
        self.same_sd(f"{what}: state_dict()", o.state_dict(), r.state_dict())
        ra, rb = self.hook_records
        if len(ra) != len(rb):
            raise Mismatch(f"{what}: hook records {len(ra)} vs {len(rb)}: {[x[0] for x in ra]} vs {[x[0] for x in rb]}")
        for (na, va), (nb, vb) in zip(ra, rb):
            if na != nb:
                raise Mismatch(f"{what}: hook record {na} vs {nb}")
            if isinstance(va, torch.Tensor):
                if not bits_equal(va, vb, zero_sign_ok=True):
                    raise Mismatch(f"{what}: hook record {na} value")
            elif va != vb:
                raise Mismatch(f"{what}: hook record {na}: {va!r} vs {vb!r}")

    def same_state_value(self, what, key, va, vb):
        if isinstance(va, torch.Tensor) != isinstance(vb, torch.Tensor):
            raise Mismatch(f"{what}: {type(va)} vs {type(vb)}")
        if not isinstance(va, torch.Tensor):
            if va != vb:
                raise Mismatch(f"{what}: {va!r} vs {vb!r}")
            return
        if va.dtype != vb.dtype or va.shape != vb.shape or va.device != vb.device:
            raise Mismatch(f"{what}: {va.dtype}{tuple(va.shape)} vs {vb.dtype}{tuple(vb.shape)}")
        if va.stride() != vb.stride() and key != "grad":
            raise Mismatch(f"{what}: strides {va.stride()} vs {vb.stride()}")
        # exp_avg: beta1 == 0 may give a zero of the other sign (documented).
        if not bits_equal(va, vb, zero_sign_ok=("exp_avg" in key)):
            d = (va.double() - vb.double()).abs().max().item()
            raise Mismatch(f"{what}: values differ (max {d})")

    def same_sd(self, what, sda, sdb):
        if set(sda) != set(sdb):
            raise Mismatch(f"{what}: top keys {set(sda)} vs {set(sdb)}")
        sta, stb = sda["state"], sdb["state"]
        if set(sta) != set(stb):
            raise Mismatch(f"{what}: state ids {sorted(sta)} vs {sorted(stb)}")
        for k in sta:
            if type(sta[k]) is not type(stb[k]):
                raise Mismatch(f"{what}: type of state {k}: {type(sta[k])} vs {type(stb[k])}")
            if set(sta[k]) != set(stb[k]):
                raise Mismatch(f"{what}: state {k} keys {sorted(sta[k])} vs {sorted(stb[k])}")
            for kk in sta[k]:
                self.same_state_value(f"{what}: state {k}.{kk}", kk, sta[k][kk], stb[k][kk])
        pga, pgb = sda["param_groups"], sdb["param_groups"]
        if len(pga) != len(pgb):
            raise Mismatch(f"{what}: groups")
        for ga, gb in zip(pga, pgb):
            if set(ga) != set(gb):
                raise Mismatch(f"{what}: sd group keys {set(ga) ^ set(gb)}")
            for k in ga:
                if k == "fused" and self.fused_key_differs:
                    continue
                va, vb = ga[k], gb[k]
                if isinstance(va, torch.Tensor):
                    if not (isinstance(vb, torch.Tensor) and bits_equal(va, vb)):
                        raise Mismatch(f"{what}: sd group {k}")
                elif va != vb:
                    raise Mismatch(f"{what}: sd group {k}: {va!r} vs {vb!r}")
        extra = set(sda) - {"state", "param_groups"}
        for k in extra:
            if repr(sda[k]) != repr(sdb[k]):
                raise Mismatch(f"{what}: sd extra {k}")

    # ----- operations
    def both(self, fa, fb, what):
        ea = eb = None
        try:
            ra = fa()
        except Exception as e:  # noqa
            ea = e
        try:
            rb = fb()
        except Exception as e:  # noqa
            eb = e
        if (ea is None) != (eb is None):
            raise Mismatch(f"{what}: ours raised {ea!r}, torch raised {eb!r}")
        if ea is not None:
            if type(ea) is not type(eb) and not isinstance(ea, type(eb)):
                raise Mismatch(f"{what}: ours raised {ea!r}, torch raised {eb!r}")
            return ("raised", ea, eb)
        return ("ok", ra, rb)


def serialize(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _rand_like(p, gen, scale):
    g = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
    g.copy_(torch.randn(p.shape, generator=gen) * scale)
    return g


class Driver(Pair):
    OPS = ["grads", "grads", "grads", "step", "step", "step_and_zero", "step_and_zero",
           "zero_grad", "edit", "add_group", "sd_roundtrip", "hold", "keep_sd",
           "replace_state", "hook", "sparse", "scale", "ema", "reset_state",
           "drop_refs", "reorder", "reset_all", "closure_saz", "set_data", "requires_grad", "edit2", "share_grad", "hold_grad", "closure_step", "odd_grad"]

    def op_reorder(self, t):
        r = self.rng
        groups = list(zip(self.ours.param_groups, self.ref.param_groups))
        if len(groups) > 1 and r.random() < 0.5:
            (ga, gb), (ha, hb) = r.sample(groups, 2)
            if len(ga["params"]) < 2:
                return
            k = r.randrange(len(ga["params"]))
            st = self.ref.state.get(gb["params"][k])
            if hb["amsgrad"] and st and "max_exp_avg_sq" not in st:
                return  # amsgrad turned on for a state without max_exp_avg_sq: documented
            ha["params"].append(ga["params"].pop(k))
            hb["params"].append(gb["params"].pop(k))
            self.log.append(f"#{t} move a param between groups")
        else:
            ga, gb = r.choice(groups)
            ga["params"].reverse()
            gb["params"].reverse()
            self.log.append(f"#{t} reverse a group's params")

    def op_reset_all(self, t):
        self.ours.state = defaultdict(dict)
        self.ref.state = defaultdict(dict)
        self.log.append(f"#{t} state = defaultdict(dict)")

    def op_closure_saz(self, t):
        def closure_for(params):
            def closure():
                loss = sum((p.float() * 0.25).sum() for p in params if p.requires_grad)
                for p in params:
                    p.grad = None
                if isinstance(loss, torch.Tensor):
                    loss.backward()
                return loss
            return closure

        def ref():
            out = self.ref.step(closure_for(self.ref_params))
            self.ref.zero_grad()
            return out
        self.log.append(f"#{t} step_and_zero_grad(closure)")
        self.both(lambda: self.ours.step_and_zero_grad(closure_for(self.ours_params)), ref,
                  "closure step_and_zero_grad")

    def op_set_data(self, t):
        i = self.rng.randrange(len(self.ours_params))
        pa, pb = self.ours_params[i], self.ref_params[i]
        new = _rand_like(pa, self.gen, 1.0)
        how = self.rng.choice(["data", "copy", "set_"])
        with torch.no_grad():
            if how == "data":
                pa.data = new.clone(memory_format=torch.preserve_format)
                pb.data = new.clone(memory_format=torch.preserve_format)
            elif how == "copy":
                pa.copy_(new)
                pb.copy_(new)
            else:
                pa.set_(new.clone(memory_format=torch.preserve_format))
                pb.set_(new.clone(memory_format=torch.preserve_format))
        self.log.append(f"#{t} param {i} new values by {how}")

    def op_requires_grad(self, t):
        i = self.rng.randrange(len(self.ours_params))
        v = not self.ours_params[i].requires_grad
        self.ours_params[i].requires_grad_(v)
        self.ref_params[i].requires_grad_(v)
        self.log.append(f"#{t} param {i} requires_grad={v}")

    def op_edit2(self, t):
        r = self.rng
        gi = r.randrange(len(self.ours.param_groups))
        ga, gb = self.ours.param_groups[gi], self.ref.param_groups[gi]
        what = r.choice(["tensor_betas", "lr64", "lr_int", "decoupled", "lr_shared"])
        if what == "tensor_betas":
            b1, b2 = r.choice([0.0, 0.9]), r.choice([0.99, 0.999])
            ga["betas"] = (torch.tensor(b1), torch.tensor(b2))
            gb["betas"] = (torch.tensor(b1), torch.tensor(b2))
            v = (b1, b2)
        elif what == "lr64":
            v = r.choice([1e-3, 0.01])
            ga["lr"], gb["lr"] = torch.tensor(v, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
        elif what == "lr_int":
            v = 0
            ga["lr"], gb["lr"] = torch.tensor(0), torch.tensor(0)
        elif what == "lr_shared":
            # one lr tensor for every group, changed in place later
            v = r.choice([1e-3, 0.01])
            la, lb = torch.tensor(v), torch.tensor(v)
            for g in self.ours.param_groups:
                g["lr"] = la
            for g in self.ref.param_groups:
                g["lr"] = lb
            self.held.append(("lr", la, lb))
            self.lr_tensors = (la, lb)
        else:
            v = not ga["decoupled_weight_decay"]
            ga["decoupled_weight_decay"] = gb["decoupled_weight_decay"] = v
        self.log.append(f"#{t} edit group {gi} {what}={v}")

    def op_share_grad(self, t):
        # one grad tensor given to two parameters of the same shape and dtype
        pairs = [(i, j) for i in range(len(self.ours_params)) for j in range(len(self.ours_params))
                 if i < j and self.ours_params[i].shape == self.ours_params[j].shape
                 and self.ours_params[i].dtype == self.ours_params[j].dtype
                 and self.ours_params[i].stride() == self.ours_params[j].stride()]
        if not pairs:
            return
        i, j = self.rng.choice(pairs)
        g = _rand_like(self.ours_params[i], self.gen, 1.0)
        ga, gb = g.clone(), g.clone()
        self.ours_params[i].grad = self.ours_params[j].grad = ga
        self.ref_params[i].grad = self.ref_params[j].grad = gb
        self.log.append(f"#{t} share one grad between params {i} and {j}")

    def op_hold_grad(self, t):
        idx = [i for i, p in enumerate(self.ours_params) if p.grad is not None]
        if not idx:
            return
        i = self.rng.choice(idx)
        self.held.append(("grad", self.ours_params[i].grad, self.ref_params[i].grad))
        self.log.append(f"#{t} hold grad of param {i}")

    def op_closure_step(self, t):
        def closure_for(params):
            def closure():
                loss = sum((p.float() * 0.5).sum() for p in params)
                for p in params:
                    p.grad = None
                loss.backward()
                return loss
            return closure
        self.log.append(f"#{t} step(closure)")
        res = self.both(lambda: self.ours.step(closure_for(self.ours_params)),
                        lambda: self.ref.step(closure_for(self.ref_params)), "closure step")
        if res[0] == "ok" and not bits_equal(res[1].detach(), res[2].detach()):
            raise Mismatch("closure loss")

    def op_odd_grad(self, t):
        # a grad whose strides are not its parameter's
        idx = [i for i, p in enumerate(self.ours_params) if p.dim() == 2]
        if not idx:
            return
        i = self.rng.choice(idx)
        pa, pb = self.ours_params[i], self.ref_params[i]
        if pa.is_contiguous():
            g = torch.randn(pa.shape[::-1], generator=self.gen).to(pa.dtype).t()
        else:
            g = torch.randn(pa.shape, generator=self.gen).to(pa.dtype)
        # torch's fused CPU Adam reads a grad of other strides than its parameter's
        # as if it had the parameter's (wrong values: a torch bug, see
        # test_torch_fused_misreads_grad_strides): its grad gets the param's strides.
        pa.grad = g.clone(memory_format=torch.preserve_format)
        pb.grad = torch.empty_strided(pb.shape, pb.stride(), dtype=pb.dtype).copy_(g)
        assert pa.grad.stride() == g.stride() != pb.grad.stride()
        self.log.append(f"#{t} grad of other strides on param {i}")

    def run(self, n_ops):
        self.check("init")
        last = None
        for t in range(n_ops):
            op = self.rng.choice(self.OPS)
            if self.gan and self.rng.random() < 0.4:  # GAN updates: grads, then an update
                op = "step_and_zero" if last == "grads" else "grads"
            last = op
            getattr(self, "op_" + op)(t)
            self.check(f"after #{t} {op}")

    # grads as backward writes them (accumulating), or assigned
    def op_grads(self, t):
        scale = 10.0 ** self.rng.randint(-3, 2)
        desc = []
        for i, (pa, pb) in enumerate(zip(self.ours_params, self.ref_params)):
            c = self.rng.random()
            if c < 0.15:
                pa.grad = pb.grad = None
                desc.append("None")
            elif c < 0.25:
                desc.append("keep")
            elif c < 0.6 and pa.requires_grad:
                g = _rand_like(pa, self.gen, scale)
                pa.backward(g.clone())
                pb.backward(g.clone())
                desc.append("backward")
            else:
                g = _rand_like(pa, self.gen, scale)
                pa.grad = g.clone()
                pb.grad = g.clone()
                desc.append("assign")
        self.grads_defined = True
        self.log.append(f"#{t} grads x{scale} {desc}")

    def op_step(self, t):
        self.log.append(f"#{t} step")
        self.both(self.ours.step, self.ref.step, "step")

    def op_step_and_zero(self, t):
        stn = self.rng.random() < 0.8
        self.log.append(f"#{t} step_and_zero_grad(set_to_none={stn})")

        def ref():
            self.ref.step()
            self.ref.zero_grad(set_to_none=stn)
        ptrs = {i: p.grad.data_ptr() for i, p in enumerate(self.ours_params)
                if p.grad is not None and not p.grad.is_sparse}
        self.both(lambda: self.ours.step_and_zero_grad(set_to_none=stn), ref, "step_and_zero")
        for i, ptr in ptrs.items():
            st = self.ours.state.get(self.ours_params[i])
            if st and "exp_avg" in st and st["exp_avg"].data_ptr() == ptr:
                KEPT.append((self.ours_params[i].shape, self.ours_params[i].stride(),
                             st["exp_avg"].stride()))
                self.log.append(f"   kept grad of param {i} as exp_avg")

    def op_zero_grad(self, t):
        stn = self.rng.random() < 0.5
        self.log.append(f"#{t} zero_grad({stn})")
        self.ours.zero_grad(set_to_none=stn)
        self.ref.zero_grad(set_to_none=stn)

    def op_edit(self, t):
        r = self.rng
        gi = r.randrange(len(self.ours.param_groups))
        ga, gb = self.ours.param_groups[gi], self.ref.param_groups[gi]
        what = r.choice(["lr", "lr_tensor", "betas", "betas", "eps", "wd", "maximize",
                         "amsgrad"])
        if what == "lr":
            v = r.choice([1e-3, 0.01, 0.05, 0.0])
            ga["lr"] = gb["lr"] = v
        elif what == "lr_tensor":
            v = r.choice([1e-3, 0.01, 0.05])
            ga["lr"], gb["lr"] = torch.tensor(v), torch.tensor(v)
        elif what == "betas":
            v = (r.choice([0.0, 0.0, 0.5, 0.9]), r.choice([0.99, 0.999, 0.9]))
            ga["betas"] = gb["betas"] = v
        elif what == "eps":
            v = r.choice([1e-8, 1e-6, 1e-3])
            ga["eps"] = gb["eps"] = v
        elif what == "wd":
            v = r.choice([0.0, 0.01, 0.1])
            ga["weight_decay"] = gb["weight_decay"] = v
        elif what == "maximize":
            v = not ga["maximize"]
            ga["maximize"] = gb["maximize"] = v
        else:
            v = not ga["amsgrad"]
            if v:  # torch raises KeyError when a state lacks max_exp_avg_sq: documented
                if any(self.ref.state.get(p) and "max_exp_avg_sq" not in self.ref.state[p]
                       for p in gb["params"]):
                    v = False
            ga["amsgrad"] = gb["amsgrad"] = v
        self.log.append(f"#{t} edit group {gi} {what}={v}")

    def op_add_group(self, t):
        if len(self.ours.param_groups) >= 4:
            return
        kw = self.random_group_opts()
        a, b = self.new_params(self.rng.randint(1, 2))
        self.ours.add_param_group(dict(params=a, **kw))
        self.ref.add_param_group(dict(params=b, **kw))
        self.log.append(f"#{t} add_param_group {kw} {[(tuple(p.shape), p.dtype, p.stride()) for p in a]}")

    def op_sd_roundtrip(self, t):
        kind = self.rng.choice(["deepcopy", "serialize", "cross", "self_nocopy", "cross_nocopy_ref_into_ours"])
        self.log.append(f"#{t} sd {kind}")
        o, r = self.ours, self.ref
        if kind == "deepcopy":
            o.load_state_dict(copy.deepcopy(o.state_dict()))
            r.load_state_dict(copy.deepcopy(r.state_dict()))
        elif kind == "serialize":
            o.load_state_dict(serialize(o.state_dict()))
            r.load_state_dict(serialize(r.state_dict()))
        elif kind == "cross":
            sa, sb = serialize(o.state_dict()), serialize(r.state_dict())
            o.load_state_dict(sb)
            r.load_state_dict(sa)
            self._refuse_fused()
        elif kind == "self_nocopy":
            o.load_state_dict(o.state_dict())
            r.load_state_dict(r.state_dict())
        else:
            # torch's state_dict() loaded as it is, into ours (tensors shared with a
            # snapshot): the ref gets a serialized copy of its own (as a separate
            # optimizer loading it would share nothing with itself).
            sb = serialize(r.state_dict())
            o.state_dict(), o.state_dict()  # (state_dict hooks count calls)
            o.load_state_dict(r.state_dict())
            # ours now shares tensors with the ref; break that by copying state
            for p in o.state:
                st = o.state[p]
                for k in list(st):
                    if isinstance(st[k], torch.Tensor):
                        st[k] = st[k].clone()
            r.load_state_dict(sb)
            self._refuse_fused()

    def _refuse_fused(self):
        # a checkpoint's group options win (README): set fused back on the reference.
        for ga, gb in zip(self.ours.param_groups, self.ref.param_groups):
            gb["fused"] = True
            if not self.fused_key_differs:
                ga["fused"] = True
            else:
                ga["fused"] = None
            gb["foreach"] = ga["foreach"] = None

    def op_hold(self, t):
        cands = [(i, k) for i, (pa, pb) in enumerate(zip(self.ours_params, self.ref_params))
                 for k in (self.ref.state.get(pb) or {})]
        if not cands:
            return
        i, k = self.rng.choice(cands)
        self.held.append((k, self.ours.state[self.ours_params[i]][k],
                          self.ref.state[self.ref_params[i]][k]))
        self.log.append(f"#{t} hold state {k} of param {i}")

    def op_keep_sd(self, t):
        sda, sdb = self.ours.state_dict(), self.ref.state_dict()
        # torch's state_dict() holds the live per-parameter dicts (an entry replaced
        # or a state filled in later shows there); ours holds copies of them (see
        # test_kept_state_dict_sees_replaced_entry). Compare the tensors it held.
        self.same_sd("keep", sda, sdb)
        for k in sda["state"]:
            for kk in sda["state"][k]:
                self.held.append((kk, sda["state"][k][kk], sdb["state"][k][kk]))
        self.kept_sds.append((sda, sdb))
        self.log.append(f"#{t} keep state_dict")

    def op_drop_refs(self, t):
        self.held.clear()
        self.kept_sds.clear()
        self.log.append(f"#{t} drop refs")

    def op_replace_state(self, t):
        cands = [(i, k) for i, (pa, pb) in enumerate(zip(self.ours_params, self.ref_params))
                 for k in (self.ref.state.get(pb) or {})]
        if not cands:
            return
        i, k = self.rng.choice(cands)
        pa, pb = self.ours_params[i], self.ref_params[i]
        how = self.rng.choice(["replace", "inplace"])
        if k == "step":
            v = float(self.rng.randint(1, 50))
            if how == "replace":
                self.ours.state[pa][k] = torch.tensor(v)
                self.ref.state[pb][k] = torch.tensor(v)
            else:
                self.ours.state[pa][k].fill_(v)
                self.ref.state[pb][k].fill_(v)
        else:
            new = _rand_like(pa, self.gen, 0.01)
            if k != "exp_avg":
                new = new.abs() * 0.01
            if how == "replace":
                self.ours.state[pa][k] = new.clone()
                self.ref.state[pb][k] = new.clone()
            else:
                self.ours.state[pa][k].copy_(new)
                self.ref.state[pb][k].copy_(new)
        self.log.append(f"#{t} {how} state {k} of param {i}")

    def op_reset_state(self, t):
        i = self.rng.randrange(len(self.ours_params))
        pa, pb = self.ours_params[i], self.ref_params[i]
        self.ours.state[pa] = {}
        self.ref.state[pb] = {}
        self.log.append(f"#{t} reset state of param {i}")

    def op_hook(self, t):
        r = self.rng
        if self.hook_handles and r.random() < 0.3:
            ha, hb = self.hook_handles.pop(r.randrange(len(self.hook_handles)))
            ha.remove()
            hb.remove()
            self.log.append(f"#{t} remove hook")
            return
        kind = r.choice(["pre", "post", "post_clip", "pre_modify", "post_none", "sd_pre", "sd_post", "load_pre", "load_post"])
        handles = []
        for side, (opt, params) in enumerate(((self.ours, self.ours_params),
                                              (self.ref, self.ref_params))):
            rec = self.hook_records[side]

            if kind == "pre":
                def hook(o, args, kwargs, rec=rec, params=params):
                    rec.append(("pre_grads", sum(p.grad is not None for p in params)))
                    for j, p in enumerate(params):
                        if p.grad is not None:
                            rec.append((f"pre_grad{j}", p.grad.clone()))
                h = opt.register_step_pre_hook(hook)
            elif kind == "post":
                def hook(o, args, kwargs, rec=rec, params=params, d=self):
                    for j, p in enumerate(params):
                        # (under a loss scale torch's grads are unscaled, ours not: documented)
                        if p.grad is not None and not d.scaling:
                            rec.append((f"post_grad{j}", p.grad.clone()))
                        rec.append((f"post_param{j}", p.detach().clone()))
                h = opt.register_step_post_hook(hook)
            elif kind == "pre_modify":
                def hook(o, args, kwargs, params=params):
                    with torch.no_grad():
                        for j, p in enumerate(params):
                            if p.grad is not None and not p.grad.is_sparse:
                                if j % 3 == 0:
                                    p.grad = p.grad * 0.5
                                elif j % 3 == 1:
                                    p.grad.mul_(2.0)
                h = opt.register_step_pre_hook(hook)
            elif kind == "post_none":
                def hook(o, args, kwargs, params=params):
                    for j, p in enumerate(params):
                        if j % 2 == 0:
                            p.grad = None
                h = opt.register_step_post_hook(hook)
            elif kind == "post_clip":
                def hook(o, args, kwargs, params=params):
                    with torch.no_grad():
                        for p in params:
                            p.clamp_(-2.0, 2.0)
                h = opt.register_step_post_hook(hook)
            elif kind == "sd_pre":
                def hook(o, rec=rec):
                    rec.append(("sd_pre", 1))
                h = opt.register_state_dict_pre_hook(hook)
            elif kind == "sd_post":
                def hook(o, sd, rec=rec):
                    rec.append(("sd_post", sorted(sd["state"])))
                    sd["extra_key"] = "x"
                    return sd
                h = opt.register_state_dict_post_hook(hook)
            elif kind == "load_pre":
                def hook(o, sd, rec=rec):
                    rec.append(("load_pre", sorted(sd["state"])))
                    sd = dict(sd)
                    sd.pop("extra_key", None)
                    return sd
                h = opt.register_load_state_dict_pre_hook(hook)
            else:
                def hook(o, rec=rec):
                    rec.append(("load_post", sorted(len(s) for s in o.state.values())))
                h = opt.register_load_state_dict_post_hook(hook)
            handles.append(h)
        self.hook_handles.append(tuple(handles))
        self.log.append(f"#{t} hook {kind}")

    def op_sparse(self, t):
        # Only in the first group: torch's step updates the groups before the one it
        # refuses (ours refuses the whole step first, README).
        k = self.rng.randrange(len(self.ours.param_groups[0]["params"]))
        i = next(j for j, p in enumerate(self.ours_params)
                 if p is self.ours.param_groups[0]["params"][k])
        pa, pb = self.ours_params[i], self.ref_params[i]
        assert pb is self.ref.param_groups[0]["params"][k]
        if pa.dim() != 1:
            return
        old = (pa.grad, pb.grad)
        idx = torch.tensor([[0, 3]])
        val = torch.tensor([1.0, 2.0], dtype=pa.dtype)
        pa.grad = torch.sparse_coo_tensor(idx, val, pa.shape)
        pb.grad = torch.sparse_coo_tensor(idx, val, pb.shape)
        state_before = {j: (p in self.ref.state, set(self.ref.state.get(p) or {}))
                        for j, p in enumerate(self.ref_params)}
        res = self.both(self.ours.step, self.ref.step, "sparse step")
        self.log.append(f"#{t} sparse grad on param {i}: {res[0]}")
        if res[0] != "raised":
            raise Mismatch("sparse grad: neither raised")
        ea, eb = res[1], res[2]
        if not str(ea).startswith(str(eb)):
            raise Mismatch(f"sparse messages: {ea} / {eb}")
        # torch's _init_group creates fresh (zero, step 0) state for the parameters
        # before the sparse one; ours changes nothing. Drop torch's fresh ones.
        for j, p in enumerate(self.ref_params):
            st = self.ref.state.get(p)
            had_key, keys = state_before[j]
            if st and not keys:
                assert float(st["step"]) == 0
                if had_key:
                    st.clear()
                else:
                    del self.ref.state[p]
        # Known (test_refused_step_drops_empty_state_entry): ours' refused step drops
        # an empty state entry that existed before it.
        for qa, qb in zip(self.ours_params, self.ref_params):
            if qb in self.ref.state and not self.ref.state[qb] and qa not in self.ours.state:
                del self.ref.state[qb]
        pa.grad, pb.grad = old

    def op_scale(self, t):
        # GradScaler's protocol: grad_scale / found_inf attributes for one step.
        scale = 2.0 ** self.rng.randint(-4, 8)
        inf = self.rng.random() < 0.3
        grads = [p.grad for p in self.ref_params if p.grad is not None]
        if len({id(g) for g in grads}) != len(grads):
            # torch's fused Adam unscales a grad in place once per parameter holding
            # it (its write-back, a documented difference): not comparable.
            return
        self.scaling = True
        for o in (self.ours, self.ref):
            o.grad_scale = torch.tensor(scale)
            o.found_inf = torch.tensor(1.0 if inf else 0.0)
        self.log.append(f"#{t} scaled step {scale} inf={inf}")
        try:
            self.both(self.ours.step, self.ref.step, "scaled step")
        finally:
            self.scaling = False
            for o in (self.ours, self.ref):
                del o.grad_scale, o.found_inf
        # torch's fused Adam writes the grads back unscaled, ours leaves them
        # (documented): make ours' grads torch's again.
        for pa, pb in zip(self.ours_params, self.ref_params):
            if pa.grad is not None and pb.grad is not None:
                pa.grad.copy_(pb.grad)

    def op_ema(self, t):
        m = self.rng.choice([0.1, 0.01, 0.5])
        idx = [i for i, p in enumerate(self.ours_params) if p.dtype == torch.float32]
        if not idx:
            return
        avgs_a = [self.ours_params[i].detach().clone() * 0.5 for i in idx]
        avgs_b = [a.clone() for a in avgs_a]
        blend = EmaBlend([(self.ours_params[i], a) for i, a in zip(idx, avgs_a)], 1 - m,
                         new_weight=m)
        self.log.append(f"#{t} step(ema) m={m}")
        res = self.both(lambda: self.ours.step(ema=blend), self.ref.step, "ema step")
        if res[0] == "raised":
            return
        pending = {id(p) for p, _ in blend.pending()}
        with torch.no_grad():
            for i, a in zip(idx, avgs_a):
                if id(self.ours_params[i]) in pending:
                    a.mul_(1 - m).add_(self.ours_params[i], alpha=m)
            for i, b in zip(idx, avgs_b):
                b.mul_(1 - m).add_(self.ref_params[i], alpha=m)
        for i, a, b in zip(idx, avgs_a, avgs_b):
            if not bits_equal(a, b):
                raise Mismatch(f"ema of param {i} differs")


def run_one(seed, n_ops=40, adamw=False, threads=None):
    """Runs one random sequence; returns (the exception or None, the op log)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1 + seed % 2 if threads is None else threads)
    log = []
    try:
        Driver(seed, adamw=adamw, log=log).run(n_ops)
    except Exception as e:  # noqa: BLE001 - reported with the log
        return e, log
    finally:
        torch.set_num_threads(before)
    return None, log


# ---------------------------------------------------------------------------- tests

SEEDS = list(range(10))


@pytest.mark.parametrize("adamw", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequence_matches_torch_fused(seed, adamw):
    error, log = run_one(seed, n_ops=30, adamw=adamw)
    if error is not None:
        raise AssertionError(f"{error!r}\nops:\n" + "\n".join(log)) from error


def test_sequences_reach_the_kept_grad_path():
    """The keep path (a released grad becoming exp_avg) ran in the sequences above."""
    KEPT.clear()
    for seed in (0, 1, 2):
        error, log = run_one(seed, n_ops=30, adamw=False)
        assert error is None, "\n".join(log)
    assert KEPT, "no grad was kept as exp_avg: the sequences no longer cover that path"


@pytest.mark.usefixtures("one_thread")
def test_kept_grad_with_held_exp_avg_and_kept_state_dict():
    """beta1 = 0, keep_grad_min_bytes_cpu = 0: a user's exp_avg and a kept state_dict
    see each update, as torch's do; without them the grad is kept."""
    pa = nn.Parameter(torch.randn(32768))
    pb = nn.Parameter(pa.detach().clone())
    ours = FusedAdam([pa], lr=0.01, betas=(0.0, 0.999))
    ours.keep_grad_min_bytes_cpu = 0
    ref = torch.optim.Adam([pb], lr=0.01, betas=(0.0, 0.999), fused=True)
    gen = torch.Generator().manual_seed(0)
    held = sds = None
    for step in range(7):
        g = torch.randn(32768, generator=gen)
        pa.grad, pb.grad = g.clone(), g.clone()
        ptr = pa.grad.data_ptr()
        if step == 2:
            held = (ours.state[pa]["exp_avg"], ref.state[pb]["exp_avg"])
            sds = (ours.state_dict(), ref.state_dict())
        ours.step_and_zero_grad()
        ref.step()
        ref.zero_grad()
        assert torch.equal(pa, pb)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[pa][k], ref.state[pb][k])
        kept = ours.state[pa]["exp_avg"].data_ptr() == ptr
        if held is not None:
            assert not kept
            assert torch.equal(held[0], held[1])
            assert torch.equal(sds[0]["state"][0]["exp_avg"], sds[1]["state"][0]["exp_avg"])
        else:
            assert kept
        if step == 4:
            held = sds = None


@pytest.mark.usefixtures("one_thread")
def test_torch_fused_misreads_grad_strides():
    """Not a bug of ours: for a grad whose strides differ from its parameter's,
    ours equals torch's for-loop Adam (to fp32 rounding) and torch's fused Adam given
    the grad with the parameter's strides (bit for bit). (torch's fused CPU Adam given
    the transposed grad itself reads it in the parameter's memory order: that is why
    the sequences give torch the grad with its parameter's strides.)"""
    base = torch.randn(64, 32)
    g = torch.randn(32, 64).t()  # (64, 32), strides (1, 64)
    out = {}
    for name in ("ours", "fused", "forloop"):
        p = nn.Parameter(base.clone())
        if name == "fused":
            p.grad = g.contiguous()
            opt = torch.optim.Adam([p], lr=0.1, fused=True)
        else:
            p.grad = g.clone(memory_format=torch.preserve_format)
            opt = (FusedAdam([p], lr=0.1) if name == "ours"
                   else torch.optim.Adam([p], lr=0.1, foreach=False))
        opt.step()
        out[name] = (p.detach().clone(), opt.state[p]["exp_avg"].clone())
    assert torch.equal(out["ours"][0], out["fused"][0])
    assert torch.equal(out["ours"][1], out["fused"][1])
    torch.testing.assert_close(out["ours"][0], out["forloop"][0], rtol=1e-6, atol=1e-7)
    assert torch.equal(out["ours"][1], out["forloop"][1])


def test_documented_amsgrad_on_mid_run():
    """Documented deviation (NOTES.md): amsgrad turned on for a state without
    max_exp_avg_sq: torch raises KeyError, ours creates a zero one."""
    pa, pb = nn.Parameter(torch.ones(64)), nn.Parameter(torch.ones(64))
    ours, ref = FusedAdam([pa]), torch.optim.Adam([pb], fused=True)
    for p, o in ((pa, ours), (pb, ref)):
        p.grad = torch.ones(64)
        o.step()
        o.param_groups[0]["amsgrad"] = True
    ours.step()
    assert "max_exp_avg_sq" in ours.state[pa]
    with pytest.raises(KeyError):
        ref.step()


def _refused_sparse_step(cls, **kw):
    p = nn.Parameter(torch.randn(8))
    opt = cls([p], **kw)
    opt.state[p]  # reading it creates an empty entry, in torch's defaultdict and ours
    p.grad = torch.randn(8).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    return p in opt.state, list(opt.state_dict()["state"])


def test_refused_step_keeps_empty_state_entry_torch():
    assert _refused_sparse_step(torch.optim.Adam, fused=True) == (True, [0])


def test_refused_step_keeps_empty_state_entry():
    """Found by this hunt, fixed in session 40: a refused step popped a
    parameter's empty entry that existed before it (counted as fresh state)."""
    assert _refused_sparse_step(FusedAdam) == (True, [0])


def _given_empty_dict_refused_then_stepped(cls, **kw):
    p = nn.Parameter(torch.arange(8.0))
    opt = cls([p], lr=0.1, **kw)
    opt.state[p] = {}
    p.grad = torch.ones(8).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    kept = (p in opt.state, len(opt.state[p]), list(opt.state_dict()["state"]))
    p.grad = torch.ones(8)
    opt.step()
    return kept, p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}


def test_refused_step_keeps_a_given_empty_dict_then_steps_as_torch():
    """A user's opt.state[p] = {} survives a refused step empty, and the next
    step fills it, as torch's does."""
    ours = _given_empty_dict_refused_then_stepped(FusedAdam)
    theirs = _given_empty_dict_refused_then_stepped(torch.optim.Adam, fused=True)
    assert ours[0] == theirs[0] == (True, 0, [0])
    assert torch.equal(ours[1], theirs[1])
    assert ours[2].keys() == theirs[2].keys()
    for k in ours[2]:
        assert torch.equal(ours[2][k], theirs[2][k]), k


@pytest.mark.xfail(strict=True, reason=(
    "FusedAdam.state_dict() copies each parameter's state dict (dict(v)), torch's "
    "returns the optimizer's own dicts: a state_dict kept by the caller does not see an "
    "entry replaced afterwards (opt.state[p]['exp_avg'] = t) or a state filled in later"))
def test_kept_state_dict_sees_replaced_entry():
    p = nn.Parameter(torch.ones(8))
    opt = FusedAdam([p])
    p.grad = torch.ones(8)
    opt.step()
    sd = opt.state_dict()
    opt.state[p]["exp_avg"] = torch.full((8,), 5.0)
    opt.step()
    assert torch.equal(sd["state"][0]["exp_avg"], opt.state[p]["exp_avg"])


def test_kept_state_dict_sees_replaced_entry_torch():
    p = nn.Parameter(torch.ones(8))
    opt = torch.optim.Adam([p], fused=True)
    p.grad = torch.ones(8)
    opt.step()
    sd = opt.state_dict()
    opt.state[p]["exp_avg"] = torch.full((8,), 5.0)
    opt.step()
    assert torch.equal(sd["state"][0]["exp_avg"], opt.state[p]["exp_avg"])
