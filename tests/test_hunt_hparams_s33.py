"""Session 33 hunt: hyper-parameters that change during training, against
torch.optim.Adam/AdamW(fused=True) given the same values and the same sequence
of changes. Params and every state tensor are compared bit for bit after each
step (one thread, sizes in multiples of 64: off torch's scalar tails), with
beta1 going 0 -> non-zero -> 0 so that updates keep grads as exp_avg and then
read those exp_avgs. No bug was found; these pin the behaviour."""
import io

import pytest
import torch
import torch.nn as nn
import torch.optim.lr_scheduler as torch_sched
from mmengine.optim import OptimWrapper as MMOptimWrapper
from mmengine.optim.scheduler import (CosineAnnealingMomentum, LinearLR, MultiStepLR,
                                      MultiStepMomentum)

from pygan_optim import AmpOptimWrapper, FusedAdam, FusedAdamW, OptimWrapper

pytestmark = pytest.mark.usefixtures("keep_small_cpu_grads", "one_thread")
SHAPES = [(40000,), (256, 192), (64,)]  # the last too small to be kept


def make_params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def grads_for(step, inf=False):
    g = torch.Generator().manual_seed(1000 + step)
    out = [torch.randn(s, generator=g) * 10.0 ** (step % 3 - 1) for s in SHAPES]
    if inf:
        out[0][5] = float("inf")
    return out


def assert_same(ours, theirs, opt_a, opt_b, what):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"{what}: param {i}"
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert set(sa) == set(sb), f"{what}: state keys of param {i}"
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{what}: {key} of param {i}"


def set_grads(params, step):
    for p, g in zip(params, grads_for(step)):
        p.grad = g


def round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _resumed(A, wa, sa, ours_from):
    """Our wrapper, schedulers and parameters saved with torch.save and loaded into
    new objects, as a resume does."""
    ck = round_trip(dict(o=wa.state_dict(), s=[s.state_dict() for s in sa],
                         p=[p.detach() for p in A]))
    A = [nn.Parameter(t) for t in ck["p"]]
    wa, sa = ours_from(A)
    wa.load_state_dict(ck["o"])
    for s, d in zip(sa, ck["s"]):
        s.load_state_dict(d)
    return A, wa, sa


def mmengine_schedulers(w):
    # beta1: 0 at iterations 0-2, rising to 0.8 until 5, exactly 0 again from 6 on.
    return [CosineAnnealingMomentum(w, eta_min=0.8, begin=2, end=5, by_epoch=False),
            MultiStepMomentum(w, milestones=[6], gamma=0.0, by_epoch=False),
            LinearLR(w, start_factor=0.5, end=4, by_epoch=False),
            MultiStepLR(w, milestones=[5], gamma=0.3, by_epoch=False)]


def loss_of(params, step, inf=False):
    return sum((p * g).sum() for p, g in zip(params, grads_for(step, inf)))


@pytest.mark.parametrize("resume_at", [None, 3, 7])
@pytest.mark.parametrize("cls, ref", [(FusedAdam, torch.optim.Adam),
                                      (FusedAdamW, torch.optim.AdamW)])
def test_mmengine_momentum_schedulers_on_wrappers_with_resume(cls, ref, resume_at):
    """Our wrapper + FusedAdam against MMEngine's wrapper + torch's fused Adam,
    MMEngine's momentum and LR schedulers stepping both; optionally the wrapper
    and scheduler states round-trip through torch.save into new objects."""
    def ours_from(params):
        w = OptimWrapper(cls(params, lr=1e-2, betas=(0.0, 0.999)))
        return w, mmengine_schedulers(w)

    A, B = make_params(), make_params()
    wa, sa = ours_from(A)
    wb = MMOptimWrapper(ref(B, lr=1e-2, betas=(0.0, 0.999), fused=True))
    sb = mmengine_schedulers(wb)
    zero_beta1 = []
    for step in range(10):
        if step == resume_at:
            A, wa, sa = _resumed(A, wa, sa, ours_from)
        beta1 = wa.param_groups[0]["betas"][0]
        assert beta1 == wb.param_groups[0]["betas"][0]
        wb.update_params(loss_of(B, step))
        wa.update_params(loss_of(A, step))
        zero_beta1.append(beta1 == 0)
        for s in sa + sb:
            s.step()
        assert_same(A, B, wa.optimizer, wb.optimizer, f"step {step} beta1 {beta1}")
    assert zero_beta1 == [True] * 3 + [False] * 3 + [True] * 4


def test_mmengine_momentum_schedulers_keep_grads_when_beta1_returns_to_zero():
    w = OptimWrapper(FusedAdam(make_params(), lr=1e-2, betas=(0.0, 0.999)))
    scheds = mmengine_schedulers(w)
    p = w.param_groups[0]["params"][0]
    kept = []
    for step in range(9):
        w.optimizer.zero_grad()
        loss = loss_of(w.param_groups[0]["params"], step)
        loss.backward()
        ptr = p.grad.data_ptr()
        w.step_and_zero_grad(set_to_none=True)
        kept.append(w.optimizer.state[p]["exp_avg"].data_ptr() == ptr)
        for s in scheds:
            s.step()
    assert kept == [True] * 3 + [False] * 3 + [True] * 3


@pytest.mark.parametrize("resume_at", [None, 3, 7])
def test_cpu_amp_wrapper_with_skipped_steps_and_momentum_schedulers(resume_at):
    """Our AmpOptimWrapper on the CPU against torch's GradScaler('cpu') and fused
    Adam: inf grads (skipped steps) at beta1 == 0 and around its changes."""
    inf_at = {2, 6, 7}

    def ours_from(params):
        w = AmpOptimWrapper(optimizer=FusedAdam(params, lr=1e-2, betas=(0.0, 0.999)),
                            loss_scale=dict(init_scale=2.0 ** 10, growth_interval=2))
        return w, mmengine_schedulers(w)

    A, B = make_params(), make_params()
    wa, sa = ours_from(A)
    ob = torch.optim.Adam(B, lr=1e-2, betas=(0.0, 0.999), fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    sb = mmengine_schedulers(ob)
    for step in range(10):
        if step == resume_at:
            A, wa, sa = _resumed(A, wa, sa, ours_from)
        with wa.optim_context(nn.Module()):
            la = loss_of(A, step, step in inf_at)
        wa.update_params(la)
        scaler.scale(loss_of(B, step, step in inf_at)).backward()
        scaler.step(ob)
        scaler.update()
        ob.zero_grad()
        for s in sa + sb:
            s.step()
        assert wa.loss_scaler.get_scale() == scaler.get_scale()
        assert_same(A, B, wa.optimizer, ob, f"step {step}")


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("make", [
    lambda o: torch_sched.OneCycleLR(o, max_lr=1e-2, total_steps=12, base_momentum=0.0,
                                     max_momentum=0.9, pct_start=0.5,
                                     anneal_strategy="linear"),
    lambda o: torch_sched.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=2,
                                   base_momentum=0.0, max_momentum=0.9),
], ids=["onecycle", "cyclic"])
def test_torch_schedulers_cycling_lr_and_beta1(make, tensor_lr):
    lr = (lambda: torch.tensor(1e-2)) if tensor_lr else (lambda: 1e-2)
    A, B = make_params(), make_params()
    oa = FusedAdam(A, lr=lr(), betas=(0.0, 0.999))
    ob = torch.optim.Adam(B, lr=lr(), betas=(0.0, 0.999), fused=True)
    sa, sb = make(oa), make(ob)
    zeros = 0
    for step in range(12):
        zeros += oa.param_groups[0]["betas"][0] == 0
        set_grads(A, step)
        set_grads(B, step)
        oa.step_and_zero_grad()
        ob.step()
        ob.zero_grad()
        sa.step()
        sb.step()
        assert_same(A, B, oa, ob, f"step {step}")
    assert zeros > 0


def hp_edits(step, opt):
    g = opt.param_groups[0]
    g["betas"] = (0.0 if step % 2 == 0 else 0.9, 0.99 if step % 3 else 0.999)
    g["weight_decay"] = 0.1 if step % 2 else 0.0
    g["maximize"] = bool((step // 2) % 2)
    g["eps"] = 10.0 ** -(step % 3 + 6)
    g["amsgrad"] = bool((step // 3) % 2 == 0)  # on first, as torch needs it
    if isinstance(g["lr"], torch.Tensor):
        g["lr"].fill_(1e-2 * 0.7 ** step)
    else:
        g["lr"] = torch.tensor(1e-2 * 0.7 ** step) if step % 4 == 3 else 1e-2 * 0.7 ** step


@pytest.mark.parametrize("cls, ref", [(FusedAdam, torch.optim.Adam),
                                      (FusedAdamW, torch.optim.AdamW)])
@pytest.mark.parametrize("update", [True, False], ids=["update", "step"])
def test_every_option_toggled_between_steps(cls, ref, update):
    A, B = make_params(), make_params()
    oa = cls(A, lr=1e-2, betas=(0.0, 0.999), amsgrad=True)
    ob = ref(B, lr=1e-2, betas=(0.0, 0.999), amsgrad=True, fused=True)
    for step in range(9):
        hp_edits(step, oa)
        hp_edits(step, ob)
        set_grads(A, step)
        set_grads(B, step)
        if update:
            oa.step_and_zero_grad()
        else:
            oa.step()
            oa.zero_grad()
        ob.step()
        ob.zero_grad()
        assert_same(A, B, oa, ob, f"step {step}")


def test_param_group_edits_and_a_foreign_checkpoint_with_other_options_mid_run():
    extra = torch.randn(33024)  # the parameter added mid-run
    A, B = (make_params() + [nn.Parameter(extra.clone())] for _ in range(2))
    oa = FusedAdam([dict(params=A[:2]), dict(params=A[2:3], betas=(0.9, 0.99))], lr=1e-2,
                   betas=(0.0, 0.999))
    ob = torch.optim.Adam([dict(params=B[:2]), dict(params=B[2:3], betas=(0.9, 0.99))],
                          lr=1e-2, betas=(0.0, 0.999), fused=True)

    def all_betas(beta1):
        def edit(opt, params):
            for g in opt.param_groups:
                g["betas"] = (beta1, 0.999)
        return edit

    events = {
        2: lambda o, P: o.add_param_group(dict(params=[P[3]], betas=(0.0, 0.9))),
        3: lambda o, P: o.param_groups[1]["params"].append(o.param_groups[0]["params"].pop(0)),
        4: all_betas(0.0),
        5: lambda o, P: o.param_groups.reverse(),
        7: all_betas(0.4),
        8: all_betas(0.0),
    }
    for step in range(10):
        if step == 6:  # each loads the other's checkpoint, with other options
            ca, cb = round_trip(oa.state_dict()), round_trip(ob.state_dict())
            for sd in (ca, cb):
                sd["param_groups"][0].update(betas=(0.5, 0.99), lr=3e-3, weight_decay=0.01)
            oa.load_state_dict(cb)
            ob.load_state_dict(ca)
            ob.param_groups[0]["fused"] = ob.param_groups[1]["fused"] = True
            ob.param_groups[2]["fused"] = True
            del ca, cb, sd
        for opt, params in ((oa, A), (ob, B)):
            if step in events:
                events[step](opt, params)
        gs = grads_for(step) + [torch.randn(33024, generator=torch.Generator().manual_seed(step))]
        for params in (A, B):
            for p, g in zip(params, gs):
                p.grad = g.clone()
        ptr = A[0].grad.data_ptr()
        oa.step_and_zero_grad()
        ob.step()
        ob.zero_grad()
        assert_same(A, B, oa, ob, f"step {step}")
        if step == 9:  # keeping goes on after the checkpoints were dropped
            assert oa.state[A[0]]["exp_avg"].data_ptr() == ptr
