"""Session 41 hunt: distributed training through the wrappers, stateful.

What it hunts: differences between pygan_optim's wrappers + ``FusedAdam`` and
MMEngine 0.10.7's wrappers + ``torch.optim.Adam(fused=True)`` when both run
under real ``torch.distributed`` (gloo on loopback, 2 processes, one
``mp.spawn`` for the whole file), and state that goes wrong across updates,
checkpoints and resumes.

Oracle: in the same two processes, the same model (same seed) wrapped twice,
once driven by MMEngine's ``OptimWrapper`` / ``AmpOptimWrapper`` (built on the
CPU as tests/test_hunt_stateful_wrappers_s40.py does: its GPU check lifted,
``torch.amp.GradScaler('cpu')``) with ``torch.optim.Adam(fused=True)``, the other
by ``pygan_optim.OptimWrapper`` / ``AmpOptimWrapper`` with ``pygan_optim.FusedAdam``
(``keep_grad_min_bytes_cpu = 0``, so a 32768-element grad may be kept as its
exp_avg when beta1 = 0), through the same seeded sequence of calls and data.

Operations (seeded draws per sequence):
* DDP (torch's, counting its ``no_sync`` forwards) or MMEngine's
  ``MMDistributedDataParallel.train_step``; ``gradient_as_bucket_view`` True /
  False, ``static_graph``, ``find_unused_parameters`` with a branch that is used
  on some iterations and ranks only, ``bucket_cap_mb`` small (several buckets);
* ``update_params`` with ``accumulative_counts`` 1-4 (``optim_context``'s
  ``no_sync`` on the non-update iterations), rank-dependent data, zero_kwargs
  ``set_to_none`` True/False drawn per iteration;
* beta1 0 (grads keepable as exp_avg; never where the grad is a bucket view)
  or 0.9;
* AMP on the CPU: bf16 autocast, GradScaler with power-of-two scales (static,
  dynamic with a short growth interval), losses made inf/NaN on one rank only;
* a resume at a window boundary: ours saves ``wrapper.state_dict()`` and the
  model's, a fresh DDP + FusedAdam + wrapper loads them and goes on, while the
  oracle runs on uninterrupted;
* a GAN as MMagic trains one: MMEngine's ``MMSeparateDistributedDataParallel``,
  an ``OptimWrapperDict`` (ours built by ``MultiOptimWrapperConstructor`` from
  ``FusedOptimWrapper`` / ``FusedAmpOptimWrapper`` + ``FusedAdam`` configs), D
  updated every iteration and G every other one with their own accumulation,
  then the dict's ``state_dict`` loaded into fresh objects;
* ``ZeroRedundancyOptimizer(optimizer_class=FusedAdam)`` against
  ``ZeroRedundancyOptimizer(optimizer_class=Adam, fused=True)``, inside the
  wrappers (AMP too): ``consolidate_state_dict`` + ``torch.save`` + load into a
  fresh ZeRO and into the running one (a rewind), and into ours from torch's
  checkpoint, then continue.

Compared after every iteration: parameters, every optimizer state tensor,
grads (None-ness and values; after ``update_params`` both sides hold zeros or
None), the loss scaler's scale and growth tracker, the ``no_sync`` pattern;
after every update both ranks' parameters are all-gathered and must be equal.

Tolerances: none. The README promises ``FusedAdam`` bit-identical to
``Adam(fused=True)`` on the CPU away from torch's scalar tails; every rank runs
torch with one thread and every tensor has a multiple of 128 elements, so no
tail is hit. Power-of-two loss scales make 1/scale exact on both sides, and the
grads both sides see are bit-identical (the same model, data, bucket layout and
gloo's two-operand sums). ``torch.equal`` is used, which also takes 0.0 ==
-0.0 (README: the sign of a zero exp_avg may differ when beta1 = 0). No clip by
norm is used (documented: ours sums the norm in another order). The grads are
not compared between a step and ``zero_grad`` (documented: ours leaves them
scaled); ``update_params`` zeroes or releases them right after on both sides.

Each worker collects mismatches instead of raising, so both ranks always make
the same collective calls; the parent's tests read each check's report.

Findings: no bug in pygan_optim. While hunting, 250+ drawn DDP configurations
(seeds 0-130 of ``_draw_cfg`` with every option, then 60 more before the dtype /
group / weight-decay / amsgrad draws were added) and 20 GAN configurations
agreed bit for bit. Traps of the set-up itself, kept out of the inputs: a
``set_to_none`` choice that differs between ranks makes DDP's own ranks diverge
(a globally unused branch keeps zeros on one rank and None on the other, and
Adam steps only the first); ZeRO's ``load_state_dict`` only assigns the entries
a checkpoint carries, so rewinding a running ZeRO to a checkpoint taken before
every parameter had state keeps the newer state (torch's Adam too); a DDP
forward whose backward reaches none of its parameters (a frozen D) leaves its
reducer unfinished and the next backward fails.
"""
import copy
import io
import json
import os
import random
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from spawned_worker import exit_after_success  # noqa: F401  (used via _finish)
from test_ddp import CountingDDP
from test_hunt_sharding_s39 import _finish, _init, _spawn

WORLD = 2
INF, NAN = float("inf"), float("nan")


# ------------------------------------------------------------------ model --

class Net(nn.Module):
    """Every tensor a multiple of 128 elements. ``mid.weight`` and
    ``branch.weight`` have 32768 (keepable as exp_avg with the threshold at 0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, 256)
        self.mid = nn.Linear(256, 128)
        self.branch = nn.Linear(256, 128)
        self.out = nn.Linear(128, 128)

    def forward(self, x, use_branch=True, factor=1.0):
        h = torch.tanh(self.inp(x))
        y = torch.tanh(self.mid(h))
        if use_branch:
            y = y + torch.tanh(self.branch(h))
        return self.out(y).float().pow(2).mean() * factor


def _mm_model_cls():
    from mmengine.model import BaseModel

    class MMNet(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, inputs, data_samples=None, mode="loss", use_branch=True, factor=1.0):
            return dict(loss=self.net(inputs, use_branch, factor))

    return MMNet


# ------------------------------------------------------------- wrappers --

def _mm_amp(loss_scale, **kw):
    from test_hunt_stateful_wrappers_s40 import mm_amp_wrapper
    return mm_amp_wrapper(copy.deepcopy(loss_scale), "bfloat16", **kw)


def _wrap(ours, optimizer, cfg):
    import mmengine.optim as mmo

    import pygan_optim

    kw = dict(optimizer=optimizer, accumulative_counts=cfg["accu"])
    if cfg["amp"] is None:
        return (pygan_optim.OptimWrapper if ours else mmo.OptimWrapper)(**kw)
    if ours:
        return pygan_optim.AmpOptimWrapper(loss_scale=copy.deepcopy(cfg["amp"]),
                                           dtype="bfloat16", **kw)
    return _mm_amp(cfg["amp"], **kw)


def _adam(ours, params, cfg):
    from pygan_optim import FusedAdam

    kw = dict(lr=cfg["lr"], betas=(cfg["beta1"], 0.999), eps=1e-6,
              weight_decay=cfg.get("wd", 0.0), amsgrad=cfg.get("amsgrad", False))
    if cfg.get("groups", 1) == 2:
        params = list(params)
        params = [dict(params=[p for p in params if p.ndim > 1]),
                  dict(params=[p for p in params if p.ndim == 1], lr=cfg["lr"] / 2)]
    if ours:
        opt = FusedAdam(params, **kw)
        opt.keep_grad_min_bytes_cpu = 0
        return opt
    return torch.optim.Adam(params, fused=True, **kw)


# ---------------------------------------------------------- comparisons --

class Report:
    def __init__(self, name):
        self.name = name
        self.problems = []
        self.notes = {}

    def check(self, ok, what):
        if not ok and len(self.problems) < 20:
            self.problems.append(what)
        return ok


def _same(a, b):
    """Equal values (0.0 == -0.0), NaN equal to NaN."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _compare_model(rep, where, mo, mm, opt_o, opt_m, grads=True):
    po, pm = list(mo.parameters()), list(mm.parameters())
    for i, (a, b) in enumerate(zip(po, pm)):
        rep.check(torch.equal(a.detach(), b.detach()), f"{where}: param {i} differs")
        if grads:
            rep.check(_same(a.grad, b.grad),
                      f"{where}: grad {i} differs ({_desc(a.grad)} vs {_desc(b.grad)})")
        so, sm = opt_o.state.get(a, {}), opt_m.state.get(b, {})
        rep.check(set(so) == set(sm), f"{where}: state keys {i} {sorted(so)} vs {sorted(sm)}")
        for k in set(so) & set(sm):
            x, y = so[k], sm[k]
            ok = (_same(x.float(), y.float()) if torch.is_tensor(x) and torch.is_tensor(y)
                  else x == y)
            rep.check(ok, f"{where}: state {k} of param {i} differs")


def _desc(g):
    if g is None:
        return "None"
    return f"{tuple(g.shape)} sum {g.double().sum().item():.6g}"


def _ranks_equal(rep, where, tensors):
    flat = torch.cat([t.detach().float().flatten() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    rep.check(torch.equal(gathered[0], gathered[1]), f"{where}: ranks disagree")


def _scaler_state(w):
    s = getattr(w, "loss_scaler", None)
    if s is None:
        return None
    return {k: (float(v) if torch.is_tensor(v) else v) for k, v in s.state_dict().items()}


# ------------------------------------------------ DDP wrapper sequences --

def _draw_cfg(seed):
    r = random.Random(seed)
    engine = r.choice(["ddp", "ddp", "mmddp"])
    static = engine == "ddp" and r.random() < 0.25
    find_unused = (not static) and r.random() < 0.6
    amp = r.choice([None, None, 2.0 ** r.randint(-2, 12), "dynamic",
                    dict(init_scale=2.0 ** r.randint(4, 16), growth_interval=2)])
    return dict(seed=seed, engine=engine, static=static, find_unused=find_unused,
                bucket_view=r.random() < 0.5, bucket_cap_mb=r.choice([0.02, 0.05, 0.2]),
                accu=1 if static else r.randint(1, 4), beta1=r.choice([0.0, 0.0, 0.9]),
                amp=amp, lr=r.choice([1e-3, 1e-2]), iters=r.randint(6, 10),
                resume_at=r.choice([None, 2, 4]), groups=r.choice([1, 1, 2]),
                wd=r.choice([0.0, 0.0, 1e-2]), amsgrad=r.random() < 0.25,
                dtype=r.choice([torch.float32, torch.float32, torch.bfloat16]))


def _build(ours, cfg, state=None):
    """(ddp model, inner module, optimizer, wrapper); `state` (model sd, wrapper
    sd) to resume from."""
    kw = dict(gradient_as_bucket_view=cfg["bucket_view"], bucket_cap_mb=cfg["bucket_cap_mb"],
              find_unused_parameters=cfg["find_unused"], static_graph=cfg["static"])
    if cfg["engine"] == "mmddp":
        from mmengine.model import MMDistributedDataParallel
        module = _mm_model_cls()().to(cfg["dtype"])
        if state is not None:
            module.load_state_dict(state[0])
        model = MMDistributedDataParallel(module=module, **kw)
    else:
        module = Net().to(cfg["dtype"])
        if state is not None:
            module.load_state_dict(state[0])
        model = CountingDDP(module, **kw)
    opt = _adam(ours, model.parameters(), cfg)
    w = _wrap(ours, opt, cfg)
    if state is not None:
        w.load_state_dict(copy.deepcopy(state[1]))
    return model, module, opt, w


def _watch_backward(w, param, ptrs):
    """Records the grad address of `param` after each backward (before the
    step): an exp_avg at that address after the update means the grad was kept."""
    backward = w.backward

    def watched(loss, **kwargs):
        backward(loss, **kwargs)
        ptrs.append(None if param().grad is None else param().grad.data_ptr())
    w.backward = watched


def _one_iteration(model, module, w, cfg, x, use_branch, factor, zero_kwargs):
    if cfg["engine"] == "mmddp":
        # MMEngine's train_step calls update_params(loss) with no zero_kwargs.
        model.train_step(dict(inputs=x, use_branch=use_branch, factor=factor), w)
        return
    with w.optim_context(model):
        loss = model(x, use_branch, factor)
    w.update_params(loss, zero_kwargs=zero_kwargs)


def _ddp_sequence(rank, cfg, rep):
    from mmengine.logging import MessageHub

    tag = f"cfg {cfg['seed']}"
    MessageHub.get_instance(f"s41-{cfg['seed']}")
    sides = {ours: _build(ours, cfg) for ours in (True, False)}
    start = [p.detach().clone() for p in sides[False][1].parameters()]
    for ours, (model, module, opt, w) in sides.items():
        w.initialize_count_status(model, 0, cfg["iters"])
    data = random.Random(1000 * cfg["seed"] + rank)  # rank-dependent draws
    shared = random.Random(cfg["seed"])  # the same on both ranks (a DDP run's own choice)
    gen = torch.Generator().manual_seed(1000 * cfg["seed"] + rank)
    ptrs, kept = [], []
    net_o = lambda: sides[True][1].net if cfg["engine"] == "mmddp" else sides[True][1]  # noqa
    _watch_backward(sides[True][3], lambda: net_o().mid.weight, ptrs)
    ddp_logs = {True: [], False: []}
    for it in range(cfg["iters"]):
        where = f"{tag} iter {it}"
        x = torch.randn(4, 16, generator=gen).to(cfg["dtype"])
        use_branch = (not cfg["find_unused"]) or data.random() < 0.5
        factor = 1.0
        if cfg["amp"] is not None and data.random() < 0.15:
            factor = data.choice([INF, NAN])
        # Rank-dependent zero_grad choices would make ranks diverge under DDP itself
        # (grads None on one rank, zeros on the other, of a globally unused branch).
        zero_kwargs = dict(set_to_none=shared.random() < 0.5)
        if it + 1 == cfg["resume_at"]:
            # A resumed run starts with grads None: so must the oracle's here.
            zero_kwargs = dict(set_to_none=True)
        for ours in (True, False):
            model, module, opt, w = sides[ours]
            _one_iteration(model, module, w, cfg, x, use_branch, factor, zero_kwargs)
        updated = sides[False][3].should_update()  # the oracle's: this iteration updated
        mo, mm = sides[True][1], sides[False][1]
        _compare_model(rep, where, mo, mm, sides[True][2], sides[False][2])
        rep.check(_scaler_state(sides[True][3]) == _scaler_state(sides[False][3]),
                  f"{where}: scaler {_scaler_state(sides[True][3])} vs "
                  f"{_scaler_state(sides[False][3])}")
        rep.check(sides[True][3]._inner_count == sides[False][3]._inner_count,
                  f"{where}: inner counts differ")
        if updated:
            big = net_o().mid.weight
            st = sides[True][2].state.get(big, {})
            if "exp_avg" in st and ptrs and ptrs[-1] is not None:
                kept.append(st["exp_avg"].data_ptr() == ptrs[-1])
            _ranks_equal(rep, where, list(mo.parameters()))
        if cfg["resume_at"] is not None and it + 1 == cfg["resume_at"] and updated:
            # Ours saves and resumes in fresh objects; the oracle goes on.
            model, module, opt, w = sides[True]
            buf = io.BytesIO()
            torch.save((module.state_dict(), w.state_dict()), buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=False)
            logs = getattr(model, "no_sync_log", [])
            ddp_logs[True] += logs
            sides[True] = _build(True, cfg, state)
            sides[True][3].initialize_count_status(sides[True][0], it + 1, cfg["iters"])
            _watch_backward(sides[True][3], lambda: net_o().mid.weight, ptrs)
            # (The fresh model's grads are None where the oracle's may be zeros.)
            _compare_model(rep, where + " after resume", sides[True][1], mm,
                           sides[True][2], sides[False][2], grads=False)
    ddp_logs[True] += getattr(sides[True][0], "no_sync_log", [])
    ddp_logs[False] += getattr(sides[False][0], "no_sync_log", [])
    rep.check(ddp_logs[True] == ddp_logs[False], f"{tag}: no_sync {ddp_logs}")
    rep.check(any(not torch.equal(a, b.detach()) for a, b in
                  zip(start, sides[False][1].parameters())), f"{tag}: nothing was updated")
    if cfg["bucket_view"]:
        rep.check(not any(kept), f"{tag}: a bucket-view grad kept as exp_avg: {kept}")
    return kept


def check_ddp_wrapper_sequences(rank, rep):  # noqa: D103
    kept_total = []
    for seed in range(8):
        cfg = _draw_cfg(seed)
        kept = _ddp_sequence(rank, cfg, rep)
        if cfg["beta1"] == 0.0 and not cfg["bucket_view"]:
            kept_total += kept
    rep.notes["kept"] = kept_total
    # The sequences must reach the kept-grad path somewhere (else the beta1 = 0
    # draws tested only the copy).
    rep.check(any(kept_total), f"kept-grad path never reached: {kept_total}")


# ------------------------------------------- GAN: separate DDP, wrapper dict --

def _gan_model_cls():
    from mmengine.model import BaseModel

    class TinyGAN(BaseModel):
        """D updates every iteration, G every other one (D frozen meanwhile, as
        MMagic's GANs do); hinge losses; sizes multiples of 128, D's first
        weight 32768 elements (keepable)."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.generator = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128))
            self.discriminator = nn.Sequential(nn.Linear(128, 256), nn.Tanh(),
                                               nn.Linear(256, 128))
            self.iteration = 0

        def forward(self, *args, **kwargs):
            raise NotImplementedError

        def train_step(self, data, optim_wrapper):
            z, real, factor = data["z"], data["real"], data["factor"]
            dw = optim_wrapper["discriminator"]
            with torch.no_grad():
                fake = self.generator(z)
            with dw.optim_context(self.discriminator):
                # One D forward per backward (DDP): real and fake together.
                out = self.discriminator(torch.cat([real, fake])).float()
                loss_d = (torch.relu(1 - out[:len(real)]).mean()
                          + torch.relu(1 + out[len(real):]).mean()) * factor
            dw.update_params(loss_d, zero_kwargs=data["zero_kwargs"])
            if self.iteration % 2 == 1:
                gw = optim_wrapper["generator"]
                for p in self.discriminator.parameters():
                    p.requires_grad_(False)
                # D frozen and outside its DDP (a DDP forward whose backward
                # reaches none of its parameters never finalises its reducer).
                disc = getattr(self.discriminator, "module", self.discriminator)
                with gw.optim_context(self.generator):
                    loss_g = -disc(self.generator(z)).float().mean()
                gw.update_params(loss_g, zero_kwargs=data["zero_kwargs"])
                for p in self.discriminator.parameters():
                    p.requires_grad_(True)
            self.iteration += 1

    return TinyGAN


def _gan_side(ours, cfg):
    from mmengine.model import MMSeparateDistributedDataParallel
    from mmengine.optim import OptimWrapperDict

    model = _gan_model_cls()()
    ddp = MMSeparateDistributedDataParallel(
        module=model, find_unused_parameters=True, broadcast_buffers=False,
        gradient_as_bucket_view=cfg["bucket_view"], bucket_cap_mb=0.05)
    accu = dict(generator=cfg["accu_g"], discriminator=cfg["accu_d"])
    if ours:
        from pygan_optim import MultiOptimWrapperConstructor

        amp = (dict(type="FusedOptimWrapper") if cfg["amp"] is None else
               dict(type="FusedAmpOptimWrapper", dtype="bfloat16",
                    loss_scale=copy.deepcopy(cfg["amp"])))
        wrappers = MultiOptimWrapperConstructor({
            k: dict(amp, accumulative_counts=accu[k],
                    optimizer=dict(type="FusedAdam", lr=cfg["lr"], betas=(cfg["beta1"], 0.999),
                                   eps=1e-6)) for k in accu})(ddp)
        for w in wrappers.values():
            w.optimizer.keep_grad_min_bytes_cpu = 0
    else:
        wrappers = OptimWrapperDict(**{
            k: _wrap(False, _adam(False, getattr(model, k).parameters(), cfg),
                     dict(cfg, accu=accu[k])) for k in accu})
    for k, w in wrappers.items():
        w.initialize_count_status(getattr(ddp.module, k), 0, cfg["iters"])
    return ddp, model, wrappers


def _gan_sequence(rank, cfg, rep):
    from mmengine.logging import MessageHub

    tag = f"GAN {cfg}"
    MessageHub.get_instance(f"s41-gan-{cfg['seed']}")
    sides = {ours: _gan_side(ours, cfg) for ours in (True, False)}
    start = [p.detach().clone() for p in sides[False][1].parameters()]
    gen = torch.Generator().manual_seed(2000 + cfg["seed"] * 10 + rank)
    shared = random.Random(cfg["seed"])
    for it in range(cfg["iters"]):
        factor = INF if (cfg["amp"] is not None and (it, rank) in cfg["infs"]) else 1.0
        data = dict(z=torch.randn(4, 16, generator=gen), real=torch.randn(4, 128, generator=gen),
                    factor=factor, zero_kwargs=dict(set_to_none=shared.random() < 0.5))
        for ddp, model, wrappers in sides.values():
            ddp.train_step(data, wrappers)
        mo, mm = sides[True][1], sides[False][1]
        for k in ("generator", "discriminator"):
            wo, wm = sides[True][2][k], sides[False][2][k]
            _compare_model(rep, f"{tag} iter {it} {k}", getattr(mo, k), getattr(mm, k),
                           wo.optimizer, wm.optimizer)
            rep.check(_scaler_state(wo) == _scaler_state(wm), f"{tag} iter {it} {k}: scaler")
        _ranks_equal(rep, f"{tag} iter {it}", list(mo.parameters()))
    rep.check(any(not torch.equal(a, b.detach()) for a, b in
                  zip(start, sides[False][1].parameters())), f"{tag}: nothing was updated")
    # A resume from the dict's state_dict: fresh objects continue as the oracle does.
    sd = copy.deepcopy(sides[True][2].state_dict())
    msd = copy.deepcopy(sides[True][1].state_dict())
    ddp, model, wrappers = _gan_side(True, cfg)
    model.load_state_dict(msd)
    wrappers.load_state_dict(sd)
    for k in ("generator", "discriminator"):
        _compare_model(rep, f"{tag} resumed {k}", getattr(model, k),
                       getattr(sides[False][1], k), wrappers[k].optimizer,
                       sides[False][2][k].optimizer, grads=False)
        rep.check(_scaler_state(wrappers[k]) == _scaler_state(sides[False][2][k]),
                  f"{tag} resumed {k}: scaler")


def check_gan_separate_ddp(rank, rep):  # noqa: D103
    for seed, (accu_d, accu_g, amp, beta1, bucket_view) in enumerate([
            (2, 1, None, 0.0, False), (1, 2, "dynamic", 0.0, True),
            (3, 2, 2.0 ** 6, 0.0, False), (2, 3, dict(init_scale=2.0 ** 10, growth_interval=2),
                                           0.9, True)]):
        cfg = dict(seed=seed, accu_d=accu_d, accu_g=accu_g, amp=amp, beta1=beta1,
                   bucket_view=bucket_view, lr=1e-2, iters=8, infs={(3, 1), (5, 0)})
        _gan_sequence(rank, cfg, rep)


# ---------------------------------------------------- a refused step --

def check_refused_step_under_ddp(rank, rep):  # noqa: D103
    """A checkpoint whose state entries are in another parameter order (README:
    old BigGAN checkpoints) loaded on both ranks: the wrapper's update (AMP,
    beta1 = 0, grads released, bucket views or not) is refused on both ranks
    with an error naming exp_avgs, and nothing changes: parameters, state, the
    grads (not released) and the loss scale."""
    from mmengine.logging import MessageHub

    for bucket_view in (False, True):
        cfg = dict(seed=900, engine="ddp", static=False, find_unused=False,
                   bucket_view=bucket_view, bucket_cap_mb=0.05, accu=1, beta1=0.0,
                   amp=2.0 ** 4, lr=1e-2, dtype=torch.float32)
        MessageHub.get_instance(f"s41-refused-{bucket_view}")
        model, module, opt, w = _build(True, cfg)
        w.initialize_count_status(model, 0, 10)
        gen = torch.Generator().manual_seed(900 + rank)
        for _ in range(2):
            with w.optim_context(model):
                loss = model(torch.randn(4, 16, generator=gen))
            w.update_params(loss)
        sd = copy.deepcopy(w.state_dict())
        sd["state"][0], sd["state"][6] = sd["state"][6], sd["state"][0]  # (256, 16) / (128, 128)
        w.load_state_dict(sd)
        before = [p.detach().clone() for p in module.parameters()]
        state = {i: {k: v.clone() for k, v in opt.state[p].items()}
                 for i, p in enumerate(module.parameters())}
        scale = _scaler_state(w)
        with w.optim_context(model):
            loss = model(torch.randn(4, 16, generator=gen))
        try:
            w.update_params(loss)
            rep.check(False, f"bucket_view {bucket_view}: a step with mis-shaped state ran")
        except RuntimeError as e:
            rep.check("exp_avg" in str(e), f"bucket_view {bucket_view}: the error does not "
                                           f"name the state: {str(e)[:300]}")
        where = f"refused step, bucket_view {bucket_view}"
        for i, p in enumerate(module.parameters()):
            rep.check(torch.equal(p.detach(), before[i]), f"{where}: param {i} changed")
            rep.check(p.grad is not None, f"{where}: grad {i} released by a refused step")
            for k, v in state[i].items():
                rep.check(torch.equal(opt.state[p][k], v), f"{where}: state {k} of {i} changed")
        rep.check(_scaler_state(w) == scale, f"{where}: the loss scale changed")
        _ranks_equal(rep, where, list(module.parameters()))


# ------------------------------------------------------------------ ZeRO --

def _zero(ours, params, cfg):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from pygan_optim import FusedAdam

    kw = dict(lr=cfg["lr"], betas=(cfg["beta1"], 0.999), eps=1e-6)
    if ours:
        z = ZeroRedundancyOptimizer(params, optimizer_class=FusedAdam, **kw)
        z.optim.keep_grad_min_bytes_cpu = 0
    else:
        z = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.Adam, fused=True, **kw)
    return z


def _zero_build(ours, cfg, module_sd=None):
    module = Net()
    if module_sd is not None:
        module.load_state_dict(module_sd)
    model = CountingDDP(module, gradient_as_bucket_view=cfg["bucket_view"], bucket_cap_mb=0.05)
    z = _zero(ours, model.parameters(), cfg)
    return [model, module, z, _wrap(ours, z, cfg)]


def _zero_compare(rep, where, so, sm):
    _compare_model(rep, where, so[1], sm[1], so[2].optim, sm[2].optim)
    rep.check(_scaler_state(so[3]) == _scaler_state(sm[3]), f"{where}: scaler differs")


def _zero_train(sides, cfg, xs, start, stop, rep, tag):
    for it in range(start, stop):
        x, factor, zk = xs[it]
        for s in sides.values():
            model, module, z, w = s
            with w.optim_context(model):
                loss = model(x, True, factor)
            w.update_params(loss, zero_kwargs=zk)
        _zero_compare(rep, f"{tag} iter {it}", sides[True], sides[False])
        if (it + 1) % cfg["accu"] == 0:
            _ranks_equal(rep, f"{tag} iter {it}", list(sides[True][1].parameters()))


def _zero_save(sides, path_for):
    """consolidate_state_dict on rank 0 for both sides; rank 0 saves the
    wrappers' state dicts (the ZeRO's full state + the loss scaler)."""
    for ours, s in sides.items():
        s[2].consolidate_state_dict(to=0)
        if dist.get_rank() == 0:
            torch.save((s[1].state_dict(), s[3].state_dict()), path_for(ours))
    dist.barrier()


def check_zero_checkpoints(rank, rep, out_dir):
    from mmengine.logging import MessageHub

    for seed, (beta1, amp, accu, bucket_view) in enumerate([
            (0.0, None, 2, False), (0.9, dict(init_scale=2.0 ** 8, growth_interval=2), 1, True),
            (0.0, 2.0 ** 5, 3, False)]):
        cfg = dict(lr=1e-2, beta1=beta1, amp=amp, accu=accu, bucket_view=bucket_view)
        tag = f"ZeRO {cfg}"
        MessageHub.get_instance(f"s41-zero-{seed}")
        gen = torch.Generator().manual_seed(500 + 10 * seed + rank)
        shared = random.Random(seed)
        n1, n2 = 2 * accu, 3 * accu
        # Under AMP one inf loss on one rank, in each part after the first update:
        # a checkpoint must hold state for every parameter, as ZeRO's
        # load_state_dict leaves alone any entry that it does not carry.
        infs = {(accu + 1, 0), (n1 + accu, 1)} if amp is not None else set()
        xs = []
        for it in range(n1 + n2):
            factor = INF if (it, rank) in infs else 1.0
            xs.append((torch.randn(4, 16, generator=gen), factor,
                       dict(set_to_none=shared.random() < 0.5)))
        sides = {ours: _zero_build(ours, cfg) for ours in (True, False)}
        for s in sides.values():
            s[3].initialize_count_status(s[0], 0, n1 + n2)
        _zero_train(sides, cfg, xs, 0, n1, rep, tag)
        path_for = lambda ours: os.path.join(out_dir, f"zero{seed}_{int(ours)}.pt")  # noqa
        _zero_save(sides, path_for)
        saved = {ours: torch.load(path_for(ours), weights_only=False) for ours in (True, False)}
        for ours in (True, False):
            rep.check(len([v for v in saved[ours][1]["state"].values() if v]) == 8,
                      f"{tag}: the checkpoint (ours={ours}) lacks state")
        # 1. Continue the running ones.
        _zero_train(sides, cfg, xs, n1, n1 + n2, rep, tag + " run on")
        final = {ours: [p.detach().clone() for p in sides[ours][1].parameters()]
                 for ours in (True, False)}
        final_state = {ours: {i: {k: v.clone() for k, v in sides[ours][2].optim.state[p].items()}
                              for i, p in enumerate(sides[ours][1].parameters())
                              if p in sides[ours][2].optim.state} for ours in (True, False)}
        # 2. Fresh objects loading the checkpoints (ours also from torch's).
        for label, src in (("own", {True: True, False: False}), ("torch's", {True: False,
                                                                              False: False})):
            fresh = {}
            for ours in (True, False):
                msd, wsd = copy.deepcopy(saved[src[ours]])
                s = _zero_build(ours, cfg, msd)
                s[3].load_state_dict(wsd)
                if not ours:
                    for g in s[2].optim.param_groups:
                        g["fused"] = True  # README: torch takes the checkpoint's options
                s[3].initialize_count_status(s[0], n1, n1 + n2)
                fresh[ours] = s
            _zero_compare(rep, f"{tag} fresh from {label} after load", fresh[True], fresh[False])
            _zero_train(fresh, cfg, xs, n1, n1 + n2, rep, f"{tag} fresh from {label}")
            for a, b in zip(fresh[True][1].parameters(), final[True]):
                rep.check(torch.equal(a.detach(), b), f"{tag} fresh from {label}: final params "
                                                      "differ from the uninterrupted run")
        # 3. Rewind the running ones: load the checkpoint into the same objects.
        for ours in (True, False):
            msd, wsd = copy.deepcopy(saved[ours])
            s = sides[ours]
            s[1].load_state_dict(msd)
            s[3].load_state_dict(wsd)
            if not ours:
                for g in s[2].optim.param_groups:
                    g["fused"] = True
            s[3].initialize_count_status(s[0], n1, n1 + n2)
        _zero_compare(rep, f"{tag} rewound", sides[True], sides[False])
        _zero_train(sides, cfg, xs, n1, n1 + n2, rep, f"{tag} rewound")
        for ours in (True, False):
            for i, (a, b) in enumerate(zip(sides[ours][1].parameters(), final[ours])):
                rep.check(torch.equal(a.detach(), b),
                          f"{tag} rewound (ours={ours}): param {i} differs from the first run on")
            z = sides[ours][2]
            for i, p in enumerate(sides[ours][1].parameters()):
                if p in z.optim.state:
                    for k, v in z.optim.state[p].items():
                        rep.check(torch.equal(v, final_state[ours][i][k]),
                                  f"{tag} rewound (ours={ours}): state {k} of {i} differs")


# ------------------------------------------------------------- the worker --

CHECKS = ["ddp_wrapper_sequences", "gan_separate_ddp", "refused_step_under_ddp",
          "zero_checkpoints"]


def _worker(rank, out_dir):
    _init(rank, out_dir)
    import logging
    logging.getLogger("mmengine").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    reports = {}
    for name in CHECKS:
        rep = Report(name)
        try:
            fn = globals()["check_" + name]
            if name == "zero_checkpoints":
                fn(rank, rep, out_dir)
            else:
                fn(rank, rep)
        except Exception:  # noqa: BLE001 - reported to the parent
            rep.problems.append("raised: " + traceback.format_exc()[-3000:])
        reports[name] = dict(problems=rep.problems, notes=rep.notes)
    with open(os.path.join(out_dir, f"report{rank}.json"), "w") as f:
        json.dump(reports, f, default=str)
    _finish()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("s41")
    _spawn(_worker, out)
    return [json.loads((out / f"report{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKS)
def test_two_ranks_gloo(reports, name):
    problems = [f"rank {r}: {p}" for r in range(WORLD) for p in reports[r][name]["problems"]]
    assert not problems, "\n".join(problems)
