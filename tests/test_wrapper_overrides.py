"""What MMEngine's wrappers let users override, and dtypes at the edges, against
MMEngine's own wrappers (session 29's bug hunt).

- update_params with the default zero_kwargs calls a bare zero_grad(), as
  MMEngine does: an optimizer or wrapper whose zero_grad keeps the grads (or
  takes no argument) is obeyed, with a torch optimizer or FusedAdam inside;
- a replaced clip_func, a subclass's _clip_grad and a loss scaler whose
  unscale_/step another class defines are called, as MMEngine calls them;
- float64 parameters are clipped with a float64 norm (MMEngine's sequence on
  torch's fused Adam to float64 rounding; a float32 norm was 1e-8 off);
- AMP + clip with float16 grads is refused as GradScaler.unscale_ refuses it;
- CPU autocast takes bfloat16 or float16 only; on GPUs the default dtype is the
  one torch's autocast is set to.

FusedAdam equals torch's fused Adam bit for bit except in torch's scalar tails
(up to 15 elements per thread, 1 ulp; README): these tensors of 1 to 30
elements are all tail, so runs of a few steps compare with test_fused_adam's
`close` (rtol 1e-5), far below what a skipped override changes."""
import pytest
import torch
from mmengine.logging import MessageHub
import mmengine.optim as mmo

import pygan_optim
from pygan_optim import FusedAdam
from test_fused_adam import close
from test_wrappers_oracle import mm_amp_wrapper


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1)).to(dtype)


def batch(i, dtype=torch.float32):
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(i), dtype=dtype)


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


class KeepsGradsAdam(torch.optim.Adam):
    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none=set_to_none)


class KeepsGradsFusedAdam(FusedAdam):
    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none=set_to_none)


class OldStyleAdam(torch.optim.Adam):
    def zero_grad(self):  # torch < 1.7's signature
        super().zero_grad()


def keeps_grads(wrapper_cls):
    class KeepsGrads(wrapper_cls):
        def zero_grad(self, **kwargs):
            super().zero_grad(**dict(kwargs, set_to_none=False))
    return KeepsGrads


def grads_after_update(wrapper_cls, optimizer_cls):
    model = net()
    wrapper = wrapper_cls(optimizer=optimizer_cls(model.parameters(), lr=1e-2))
    wrapper.update_params(model(batch(0)).sum())
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("case", ["optimizer keeps grads", "old-style zero_grad",
                                  "fused optimizer keeps grads", "wrapper keeps grads, torch",
                                  "wrapper keeps grads, fused"])
def test_default_zero_kwargs_call_a_bare_zero_grad_as_mmengine(case):
    wrap, ours_opt, mm_opt = {
        "optimizer keeps grads": (lambda w: w, KeepsGradsAdam, KeepsGradsAdam),
        "old-style zero_grad": (lambda w: w, OldStyleAdam, OldStyleAdam),
        "fused optimizer keeps grads": (lambda w: w, KeepsGradsFusedAdam, KeepsGradsAdam),
        "wrapper keeps grads, torch": (keeps_grads, torch.optim.Adam, torch.optim.Adam),
        "wrapper keeps grads, fused": (keeps_grads, FusedAdam, torch.optim.Adam),
    }[case]
    theirs = grads_after_update(wrap(mmo.OptimWrapper), mm_opt)
    ours = grads_after_update(wrap(pygan_optim.OptimWrapper), ours_opt)
    # Zeros kept where a zero_grad keeps them; None where torch's default releases them.
    assert all((g is None) == (case == "old-style zero_grad") for g in theirs)
    for a, b in zip(ours, theirs):
        assert (a is None and b is None) or torch.equal(a, b), case


def per_tensor_clip(params, max_norm, **_):
    """A clip_func of one's own: each grad clipped to max_norm by itself."""
    norms = []
    for p in params:
        norms.append(p.grad.norm())
        p.grad.mul_(torch.clamp(max_norm / (norms[-1] + 1e-6), max=1.0))
    return torch.stack(norms).norm()


def counting_clip(wrapper_cls, calls):
    class CountsClips(wrapper_cls):
        def _clip_grad(self):
            calls.append("_clip_grad")
            super()._clip_grad()
    return CountsClips


@pytest.mark.parametrize("how", ["clip_func", "_clip_grad"])
def test_a_replaced_clip_is_called_as_mmengine_calls_it(how):
    def run(wrapper_cls, optimizer_cls):
        model, calls = net(), []
        cls = counting_clip(wrapper_cls, calls) if how == "_clip_grad" else wrapper_cls
        wrapper = cls(optimizer=optimizer_cls(model.parameters(), lr=1e-1, fused=True)
                      if optimizer_cls is torch.optim.Adam
                      else optimizer_cls(model.parameters(), lr=1e-1),
                      clip_grad=dict(max_norm=1e-3))
        if how == "clip_func":
            wrapper.clip_func = per_tensor_clip
        for i in range(3):
            wrapper.update_params(model(batch(i)).pow(2).mean())
        return flat(model), calls

    theirs, their_calls = run(mmo.OptimWrapper, torch.optim.Adam)
    ours, our_calls = run(pygan_optim.OptimWrapper, FusedAdam)
    close(ours, theirs)  # a clip_func skipped for the fused global clip: 9e-2 off
    assert our_calls == their_calls


class CountingScaler(torch.amp.GradScaler):
    def __init__(self, calls):
        super().__init__("cpu")
        self.calls = calls

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        return super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):
        self.calls.append("step")
        return super().step(optimizer, *args, **kwargs)


@pytest.mark.parametrize("clip", [None, dict(max_norm=1e-3)])
def test_a_loss_scaler_of_ones_own_is_called_as_mmengine_calls_it(clip):
    def run(make):
        model, calls = net(), []
        wrapper = make(model, clip)
        wrapper.loss_scaler = CountingScaler(calls)
        for i in range(2):
            with wrapper.optim_context(model):
                loss = model(batch(i)).pow(2).mean()
            wrapper.update_params(loss)
        return flat(model), calls

    theirs, their_calls = run(lambda m, c: mm_amp_wrapper(
        "dynamic", dtype="bfloat16", clip_grad=c,
        optimizer=torch.optim.Adam(m.parameters(), lr=1e-2, fused=True)))
    ours, our_calls = run(lambda m, c: pygan_optim.AmpOptimWrapper(
        dtype="bfloat16", clip_grad=c, optimizer=FusedAdam(m.parameters(), lr=1e-2)))
    assert our_calls == their_calls and "step" in our_calls
    close(ours, theirs)


@pytest.mark.parametrize("amp", [False, True])
def test_float64_params_are_clipped_in_float64_as_by_mmengine(amp):
    hub = MessageHub.get_current_instance()

    def run(kind):
        model = net(torch.float64)
        if kind == "mmengine":
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
            wrapper = (mm_amp_wrapper("dynamic", dtype="bfloat16", optimizer=optimizer,
                                      clip_grad=dict(max_norm=0.05)) if amp else
                       mmo.OptimWrapper(optimizer=optimizer, clip_grad=dict(max_norm=0.05)))
        else:
            optimizer = FusedAdam(model.parameters(), lr=1e-2)
            cls = pygan_optim.AmpOptimWrapper if amp else pygan_optim.OptimWrapper
            kw = dict(dtype="bfloat16") if amp else {}
            wrapper = cls(optimizer=optimizer, clip_grad=dict(max_norm=0.05), **kw)
        norms = []
        for i in range(4):
            # float64 layers stay float64 under CPU autocast: the loss scale is
            # what AMP adds here.
            wrapper.update_params(model(batch(i, torch.float64)).pow(2).mean())
            norms.append(hub.get_scalar("train/grad_norm").current())
        return flat(model), norms

    theirs, their_norms = run("mmengine")
    ours, our_norms = run("ours")
    # The power-of-two loss scale makes unscaling exact on both sides, and the
    # norm and coefficient are float64 on both; what may differ are float64 ulps
    # of the scalar tails, compounded over 4 steps (rtol 1e-12). A float32 norm
    # or coefficient puts the norms 1e-8 and the params 2e-9 apart.
    torch.testing.assert_close(torch.tensor(our_norms), torch.tensor(their_norms),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_amp_clip_with_float16_grads_is_refused_as_by_gradscaler():
    model = net(torch.float16)
    wrapper = pygan_optim.AmpOptimWrapper(optimizer=FusedAdam(model.parameters(), eps=1e-4),
                                          dtype="float16", clip_grad=dict(max_norm=1.0))
    before = flat(model).clone()
    loss = model(batch(0, torch.float16)).float().pow(2).mean()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        wrapper.update_params(loss)
    assert torch.equal(flat(model), before)
    # MMEngine's sequence (unscale_ before the clip) refuses the same grads.
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(wrapper.optimizer)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_autocast_refuses_what_it_cannot_cast_to(dtype):
    model = net()
    wrapper = pygan_optim.AmpOptimWrapper(optimizer=FusedAdam(model.parameters()), dtype=dtype)
    with pytest.raises(ValueError, match=f"bfloat16 .* and float16, not torch.{dtype}"):
        with wrapper.optim_context(model):
            pass


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"])
def test_cpu_autocast_dtypes_that_work(dtype):
    model = net()
    wrapper = pygan_optim.AmpOptimWrapper(optimizer=FusedAdam(model.parameters()), dtype=dtype)
    with wrapper.optim_context(model):
        assert torch.get_autocast_dtype("cpu") == getattr(torch, dtype or "bfloat16")
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("torch_default", [torch.float16, torch.bfloat16])
def test_gpu_autocast_default_is_torchs_setting_as_in_mmengine(torch_default):
    # Only the dtype choice: no GPU is needed to ask for it.
    wrapper = pygan_optim.AmpOptimWrapper(optimizer=FusedAdam(net().parameters()))
    wrapper.device_type = "cuda"
    before = torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", torch_default)
    try:
        assert wrapper._autocast_dtype() == torch_default
    finally:
        torch.set_autocast_dtype("cuda", before)
