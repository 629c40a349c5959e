"""The fused wrapper step where the caller steps outside the plain update_params flow:
a manual ``loss_scaler.unscale_``, a closure, sparse grads, no grads at all; and the
EMA's handling of non-persistent buffers. Oracles: torch's GradScaler protocol with
torch's fused Adam, MMEngine's own OptimWrapper and ExponentialMovingAverage.

Tolerance where ours and the oracle run different kernels: ``rtol=1e-5,
atol=1e-6`` on values of order 1 after at most three steps, a few fp32 ulps per
step (test_wrappers_oracle.py derives it). The bugs these tests guard against
were off by the loss scale (65536x) or by the clip coefficient.
"""
import copy

import mmengine.optim as mmo
import pytest
import torch
from mmengine.model import ExponentialMovingAverage as MMEngineEMA

import pygan_optim
from pygan_optim.gan import ExponentialMovingAverage

SCALE = 2.0 ** 16
TOL = dict(rtol=1e-5, atol=1e-6)


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 6, generator=g)


def _amp(net, **kw):
    return pygan_optim.AmpOptimWrapper(optimizer=pygan_optim.FusedAdam(net.parameters(), lr=1e-2),
                                       loss_scale=dict(init_scale=SCALE), **kw)


def _state(opt):
    return [t.clone() for s in opt.state.values() for k, t in sorted(s.items()) if k != "step"]


def _snapshot(net, opt):
    return [p.detach().clone() for p in net.parameters()] + _state(opt)


def _assert_unchanged(before, net, opt):
    after = _snapshot(net, opt)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))


def test_manual_unscale_then_step_divides_once():
    """torch's documented pattern: unscale_, look at the grads, step. The step must
    not divide by the scale a second time."""
    net, ref = _net(), _net()
    w = _amp(net)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for i in range(3):
        w.backward(w.scale_loss(net(_batch(i)).square().mean()))
        w.loss_scaler.unscale_(w.optimizer)
        w.step()
        w.zero_grad()
        scaler.scale(ref(_batch(i)).square().mean()).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    for a, b in zip(list(net.parameters()) + _state(w.optimizer),
                    list(ref.parameters()) + _state(opt)):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)
    assert w.loss_scaler.get_scale() == scaler.get_scale()


def test_manual_unscale_then_clip_raises_as_mmengine():
    """MMEngine's clip unscales again, which GradScaler refuses: so do we, before
    any change."""
    net = _net()
    w = _amp(net, clip_grad=dict(max_norm=1.0))
    w.update_params(w.scale_loss(net(_batch(0)).square().mean()))  # state exists
    w.backward(w.scale_loss(net(_batch(1)).square().mean()))
    w.loss_scaler.unscale_(w.optimizer)
    before = _snapshot(net, w.optimizer)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        w.step()
    _assert_unchanged(before, net, w.optimizer)


def test_amp_step_with_closure_is_refused_as_by_gradscaler():
    net = _net()
    w = _amp(net)
    w.update_params(w.scale_loss(net(_batch(0)).square().mean()))
    w.backward(w.scale_loss(net(_batch(1)).square().mean()))
    before = _snapshot(net, w.optimizer)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        w.step(closure=lambda: net(_batch(2)).square().mean())
    _assert_unchanged(before, net, w.optimizer)


def test_clip_with_closure_matches_mmengine():
    """MMEngine clips the grads there are, then the closure makes new ones that
    Adam uses unclipped: the fused path must not apply the old clip to them."""
    results = []
    for ours in (True, False):
        net = _net()
        opt_cls = pygan_optim.FusedAdam if ours else torch.optim.Adam
        wrapper_cls = pygan_optim.OptimWrapper if ours else mmo.OptimWrapper
        w = wrapper_cls(optimizer=opt_cls(net.parameters(), lr=1e-2), clip_grad=dict(max_norm=0.1))

        def closure():
            w.optimizer.zero_grad()
            loss = net(_batch(7)).square().mean() * 10
            loss.backward()
            return loss
        for i in range(3):
            w.backward(net(_batch(i)).square().mean() * 10)
            w.step(closure=closure)
            w.zero_grad()
        results.append(list(net.parameters()) + _state(w.optimizer))
    for a, b in zip(*results):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)


@pytest.mark.parametrize("amp,clip", [(True, None), (False, dict(max_norm=1.0)),
                                      (True, dict(max_norm=1.0))])
def test_sparse_grad_is_refused_by_name_on_the_fused_path(amp, clip):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = pygan_optim.FusedAdam(emb.parameters(), lr=1e-2)
    w = (pygan_optim.AmpOptimWrapper(optimizer=opt, clip_grad=clip) if amp else
         pygan_optim.OptimWrapper(optimizer=opt, clip_grad=clip))
    w.backward(w.scale_loss(emb(torch.tensor([1, 2])).sum()))
    before = [p.detach().clone() for p in emb.parameters()]
    with pytest.raises(RuntimeError, match=r"sparse gradients.*parameter 0 of param group 0"):
        w.step()
    assert all(torch.equal(a, b) for a, b in zip(emb.parameters(), before))


def test_amp_step_without_any_grad_fails_as_gradscaler_does():
    net = _net()
    w = _amp(net)
    w.backward(torch.ones((), requires_grad=True))  # a loss no parameter's grad comes from
    with pytest.raises(AssertionError, match="No inf checks were recorded"):
        w.step()
    assert w.loss_scaler.get_scale() == SCALE  # not counted as a step towards growth


class _WithShift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("shift", torch.zeros(2), persistent=False)
        self.register_buffer("stat", torch.zeros(2))


def test_ema_update_buffers_leaves_non_persistent_buffers_as_mmengine():
    """MMEngine's BaseAveragedModel averages state_dict() entries: with
    update_buffers a non-persistent buffer keeps its initial value."""
    src = _WithShift()
    ours = ExponentialMovingAverage(src, momentum=0.5, update_buffers=True, blend_in_step=False)
    ref = MMEngineEMA(copy.deepcopy(src), momentum=0.5, update_buffers=True)
    for _ in range(3):
        src.shift += 1.0
        src.stat += 2.0
        with torch.no_grad():
            src.lin.weight.add_(1.0)
        ours.update_parameters(src)
        ref.update_parameters(src)
    for (name, a), (_, b) in zip(ours.module.named_buffers(), ref.module.named_buffers()):
        assert torch.equal(a, b), name
    assert torch.equal(ours.module.shift, torch.zeros(2))
    assert not torch.equal(ours.module.stat, torch.zeros(2))
    for a, b in zip(ours.module.parameters(), ref.module.parameters()):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("owner", ["wrapper", "optimizer", "optimizer instance"])
def test_a_zero_grad_of_its_own_is_called_as_mmengine_calls_it(owner):
    """update_params(zero_kwargs=dict(set_to_none=False)) writes the zeros in the
    update pass, unless the wrapper or the optimizer class has its own zero_grad:
    MMEngine calls that after each update, so ours does too."""
    calls = []

    class CountingWrapper(pygan_optim.OptimWrapper):
        def zero_grad(self, **kwargs):
            calls.append(kwargs)
            super().zero_grad(**kwargs)

    class CountingAdam(pygan_optim.FusedAdam):
        def zero_grad(self, set_to_none=True):
            calls.append(dict(set_to_none=set_to_none))
            super().zero_grad(set_to_none)

    results = []
    for wrapper_cls, opt_cls in ((mmo.OptimWrapper, torch.optim.Adam),
                                 (CountingWrapper if owner == "wrapper" else pygan_optim.OptimWrapper,
                                  CountingAdam if owner == "optimizer" else pygan_optim.FusedAdam)):
        net = _net()
        w = wrapper_cls(optimizer=opt_cls(net.parameters(), lr=1e-2), accumulative_counts=2)
        if owner == "optimizer instance" and opt_cls is pygan_optim.FusedAdam:
            def counting(set_to_none=True, opt=w.optimizer):
                calls.append(dict(set_to_none=set_to_none))
                pygan_optim.FusedAdam.zero_grad(opt, set_to_none)
            w.optimizer.zero_grad = counting
        for i in range(4):
            w.update_params(net(_batch(i)).pow(2).mean(), zero_kwargs=dict(set_to_none=False))
        results.append([p.detach().clone() for p in net.parameters()])
    assert calls == [dict(set_to_none=False)] * 2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


def test_zeros_in_the_update_detach_grads_that_carry_a_graph_as_zero_grad_does():
    """torch's zero_grad(set_to_none=False) detaches a grad made by
    backward(create_graph=True) before zeroing it (else its graph stays alive)."""
    outcomes = []
    for make in (lambda ps: pygan_optim.FusedAdam(ps, lr=1e-2),
                 lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True)):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 64))
        opt = make([w])
        (w ** 3).sum().backward(create_graph=True)
        assert w.grad.grad_fn is not None
        if isinstance(opt, pygan_optim.FusedAdam):
            opt.step_and_zero_grad(set_to_none=False)
        else:
            opt.step()
            opt.zero_grad(set_to_none=False)
        outcomes.append((w.grad.requires_grad, w.grad.grad_fn, float(w.grad.abs().sum()),
                         w.detach().clone()))
    assert outcomes[0][:3] == outcomes[1][:3] == (False, None, 0.0)
    torch.testing.assert_close(outcomes[0][3], outcomes[1][3], **TOL)
