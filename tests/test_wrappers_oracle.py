"""pygan_optim's optimizer wrappers against MMEngine's own, in a GAN training loop.

Oracle
------
MMEngine 0.10.7's ``OptimWrapper`` / ``AmpOptimWrapper`` driving
``torch.optim.Adam(foreach=False)`` (torch's for-loop Adam). Every test runs
the same loop from the same initial weights and data on three set-ups:

* ``mm``: MMEngine's wrapper + torch Adam (the oracle),
* ``ours_torch``: ``pygan_optim.OptimWrapper`` / ``AmpOptimWrapper`` + torch
  Adam. With a torch optimizer inside, ours must *be* MMEngine's wrapper, so
  the results must be bit-identical (``torch.equal``),
* ``ours_fused``: ours + ``pygan_optim.FusedAdam`` (the fused step path).

The loop is GAN-style, as MMagic runs it: per iteration one discriminator
update (fakes detached) then one generator update (D frozen), each as
``with w.optim_context(net): loss = ...; w.update_params(loss)``.

Tolerance (fused vs oracle): ``rtol=1e-5, atol=1e-6``. FusedAdam computes
the same fp32 Adam update as torch's for-loop Adam up to a few fp32 ulps per
step (FMA contraction, vectorised sqrt/div; see test_fused_adam.py). The
wrappers add nothing of their own beyond that: unscaling multiplies by the
same power-of-two 1/scale, and the clip coefficient is torch's formula applied
to a norm that differs only by summation order. After ~10 coupled G/D steps
(each network's grads depend on the other's weights) these ulp differences
stay far below 1e-5 relative; an actual semantic difference (a missed or
extra step, a wrong loss factor, a missing clip, an unskipped inf step)
changes parameters by ~lr = 1e-3..4e-3, i.e. hundreds of times the tolerance.
Measured on this loop: the worst element sits at ~1.3 % of the tolerance.

AMP runs in lockstep. Under bf16 autocast an ulp of difference in a weight
can flip the rounding of a bf16 cast in the forward pass; the grads then
differ by a bf16 ulp (~4e-3 relative), Adam's normalised update passes that
on at ~lr scale and the runs drift apart chaotically. Whether a flip happens
within 10 iterations depends on which ulps each machine's kernels produce
(it did on an AVX2-only AMD EPYC and not on an AVX-512 host), so comparing
only the end of an AMP run tests luck. Instead the fused rig *follows* the
oracle (``Rig.follow``): after each wrapper call it is checked against the
oracle's parameters and buffers after the same call (the same tolerance),
then takes the oracle's values, so every call starts from bit-identical
weights, runs a bit-identical forward and backward, and what remains to
compare is exactly one wrapper step's arithmetic. A semantic difference
still shows at ~lr in the call where it happens.

MMEngine's ``AmpOptimWrapper`` refuses to be built on the CPU. For the AMP
oracle we lift exactly that assertion (``is_cuda_available`` in its module)
and give it ``torch.amp.GradScaler('cpu', <same args>)`` in place of the
CUDA scaler it would build; its step, backward, optim_context (mmengine's
``autocast``, bfloat16 on the CPU) and state_dict are its own code.
"""
import copy
import math
import warnings

import mmengine.optim as mmo
import mmengine.optim.optimizer.amp_optimizer_wrapper as mm_amp_module
import pytest
import torch
import torch.nn.functional as F
from mmengine.logging import MessageHub
from torch import nn
from torch.testing import assert_close

import pygan_optim
from pygan_optim import FusedAdam

N_ITERS = 10  # not divisible by 3 or 4
BATCH = 4
NZ = 8
RTOL, ATOL = 1e-5, 1e-6
# GAN-style hyper-parameters: G with beta1 = 0 (the MMagic configs), D with
# beta1 != 0 and weight decay so both of FusedAdam's update loops are covered.
G_HP = dict(lr=2e-3, betas=(0.0, 0.999), eps=1e-6)
D_HP = dict(lr=4e-3, betas=(0.5, 0.999), eps=1e-6, weight_decay=1e-3)
CLIP_NORM = 0.05  # the grad norms here are ~0.1..1, so this clips every step
KINDS = ("mm", "ours_torch", "ours_fused")


# ---- set-up -------------------------------------------------------------------

def make_gan(bn=False):
    torch.manual_seed(1234)
    g_layers = [nn.Linear(NZ, 32), nn.LeakyReLU(0.2), nn.Unflatten(1, (2, 4, 4))]
    if bn:
        g_layers.append(nn.BatchNorm2d(2))
    g_layers += [nn.Conv2d(2, 3, 3, padding=1), nn.Tanh()]
    G = nn.Sequential(*g_layers)
    D = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(),
                      nn.Linear(64, 1))
    return G, D


def make_data(n=N_ITERS):
    gen = torch.Generator().manual_seed(99)
    real = torch.randn(n, BATCH, 3, 4, 4, generator=gen).clamp_(-1, 1)
    z = torch.randn(n, BATCH, NZ, generator=gen)
    return real, z


def param_groups(module, hp, multi_group):
    if not multi_group:
        return module.parameters()
    weights = [p for p in module.parameters() if p.ndim > 1]
    biases = [p for p in module.parameters() if p.ndim <= 1]
    return [{"params": weights}, {"params": biases, "lr": hp["lr"] * 0.5}]


def cpu_scaler(loss_scale):
    if loss_scale == "dynamic":
        return torch.amp.GradScaler("cpu")
    if isinstance(loss_scale, float):
        return torch.amp.GradScaler("cpu", init_scale=loss_scale)
    return torch.amp.GradScaler("cpu", **loss_scale)


def mm_amp_wrapper(loss_scale, **kwargs):
    """MMEngine's AmpOptimWrapper on the CPU (see the module docstring)."""
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.GradScaler on a CPU-only host
        mp.setattr(mm_amp_module, "is_cuda_available", lambda: True)
        w = mmo.AmpOptimWrapper(loss_scale=copy.deepcopy(loss_scale), **kwargs)
    w.loss_scaler = cpu_scaler(loss_scale)
    return w


def make_wrapper(kind, module, hp, *, accu=1, clip=None, amp=None, multi_group=False):
    params = param_groups(module, hp, multi_group)
    if kind == "ours_fused":
        optimizer = FusedAdam(params, **hp)
    else:
        optimizer = torch.optim.Adam(params, foreach=False, **hp)
    kw = dict(optimizer=optimizer, accumulative_counts=accu, clip_grad=copy.deepcopy(clip))
    if amp is None:
        cls = mmo.OptimWrapper if kind == "mm" else pygan_optim.OptimWrapper
        return cls(**kw)
    if kind == "mm":
        return mm_amp_wrapper(amp, dtype="bfloat16", **kw)
    return pygan_optim.AmpOptimWrapper(loss_scale=copy.deepcopy(amp), dtype="bfloat16", **kw)


class Rig:
    """A generator, a discriminator and their two wrappers of one kind."""

    def __init__(self, kind, gan, **wrapper_kw):
        self.kind = kind
        self.G, self.D = copy.deepcopy(gan)
        self.gw = make_wrapper(kind, self.G, G_HP, **wrapper_kw)
        self.dw = make_wrapper(kind, self.D, D_HP, **wrapper_kw)
        self.poison = None  # a value to write into D's first weight grad
        self.trace = []  # tensors() after each wrapper call (d_step, g_step, ...)
        self.leader, self._call = None, 0
        self.D[0].weight.register_hook(
            lambda g: torch.full_like(g, self.poison) if self.poison is not None else None)

    def follow(self, leader, from_iter=0):
        """Lockstep with ``leader`` (see the module docstring): the leader must
        run each call first; ``from_iter`` is where this rig's run starts."""
        self.leader, self._call = leader, 2 * from_iter

    def _end_of_call(self):
        now = self.tensors()
        if self.leader is not None:
            theirs = self.leader.trace[self._call]
            assert now.keys() == theirs.keys()
            for k, v in theirs.items():
                assert_close(now[k], v, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: (
                    f"{self.kind} vs {self.leader.kind} after call {self._call}: {k}: {m}"))
            with torch.no_grad():
                for k, v in theirs.items():
                    now[k].copy_(v)
        self.trace.append({k: v.detach().clone() for k, v in now.items()})
        self._call += 1

    def init_counts(self, start=0, stop=N_ITERS):
        self.gw.initialize_count_status(self.G, start, stop)
        self.dw.initialize_count_status(self.D, start, stop)

    def d_step(self, real, z, zero_kwargs=None):
        with self.dw.optim_context(self.D):
            fake = self.G(z).detach()
            loss = F.softplus(-self.D(real)).mean() + F.softplus(self.D(fake)).mean()
            self.dw.update_params(loss, zero_kwargs=zero_kwargs)
        self._end_of_call()

    def g_step(self, z, zero_kwargs=None):
        self.D.requires_grad_(False)
        try:
            with self.gw.optim_context(self.G):
                loss = F.softplus(-self.D(self.G(z))).mean()
                self.gw.update_params(loss, zero_kwargs=zero_kwargs)
        finally:
            self.D.requires_grad_(True)
        self._end_of_call()

    def run(self, data, start=0, stop=N_ITERS, zero_kwargs=None, after_iter=None):
        real, z = data
        for i in range(start, stop):
            self.d_step(real[i], z[i], zero_kwargs)
            self.g_step(z[i], zero_kwargs)
            if after_iter is not None:
                after_iter(i)
        return self

    def tensors(self):
        return {**{f"G.{k}": v for k, v in self.G.state_dict().items()},
                **{f"D.{k}": v for k, v in self.D.state_dict().items()}}


def amp_rigs(gan, kinds=KINDS, **wrapper_kw):
    """Rigs for an AMP comparison: ``ours_fused`` follows ``mm`` in lockstep."""
    rigs = {k: Rig(k, gan, **wrapper_kw) for k in kinds}
    if "ours_fused" in rigs:
        rigs["ours_fused"].follow(rigs["mm"])
    return rigs


def assert_same(rig, ref):
    """Bit-identical parameters and buffers."""
    ours, theirs = rig.tensors(), ref.tensors()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), f"{rig.kind} vs {ref.kind}: {k} differs"


def assert_close_to(rig, ref):
    ours, theirs = rig.tensors(), ref.tensors()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert_close(ours[k], theirs[k], rtol=RTOL, atol=ATOL,
                     msg=lambda m, k=k: f"{rig.kind} vs {ref.kind}: {k}: {m}")


def assert_vs_oracle(rig, ref):
    (assert_same if rig.kind == "ours_torch" else assert_close_to)(rig, ref)


def assert_moved(rig, gan):
    """The loop really trained: every parameter changed."""
    G0, D0 = gan
    for (n, p0), p in zip(list(G0.named_parameters()) + list(D0.named_parameters()),
                          list(rig.G.parameters()) + list(rig.D.parameters())):
        assert not torch.equal(p0, p), f"{n} never moved"


def step_counts(wrapper):
    return sorted({int(s["step"]) for s in wrapper.optimizer.state.values()})


def grad_norm_log():
    hub = MessageHub.get_current_instance()
    try:
        return [float(v) for v in hub.get_scalar("train/grad_norm").data[0]]
    except KeyError:
        return []


def run_logged(rig, data, **kw):
    """Runs the rig and returns the grad norms its wrappers logged meanwhile."""
    assert rig.gw.message_hub is MessageHub.get_current_instance()
    before = len(grad_norm_log())
    rig.run(data, **kw)
    return grad_norm_log()[before:]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tensors here are tiny: intra-op threads only add overhead (and spin
    badly on a loaded 2-core host). Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def gan():
    return make_gan()


# ---- plain wrappers: accumulation --------------------------------------------------------

@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("init", [False, True], ids=["no_init", "init"])
@pytest.mark.parametrize("accu", [1, 3, 4])
def test_accumulation_matches_mmengine(accu, init, bn, data):
    gan = make_gan(bn)
    rigs = {k: Rig(k, gan, accu=accu) for k in KINDS}
    for rig in rigs.values():
        if init:
            rig.init_counts(0, N_ITERS)
        rig.run(data)
    ref = rigs["mm"]
    # With initialize_count_status the last, incomplete window steps too (with
    # its smaller loss divisor); without it, that window's grads never step.
    expected_steps = math.ceil(N_ITERS / accu) if init else N_ITERS // accu
    for rig in rigs.values():
        assert step_counts(rig.gw) == [expected_steps], rig.kind
        assert step_counts(rig.dw) == [expected_steps], rig.kind
    assert_same(rigs["ours_torch"], ref)
    assert_close_to(rigs["ours_fused"], ref)
    assert_moved(rigs["ours_fused"], gan)


def test_last_window_divisor_matters(data, gan):
    """Guards the accumulation test above: with init, the tail window's loss is
    divided by the remainder (10 % 4 = 2), not by accumulative_counts, and the
    result must differ visibly from dividing by 4."""
    ref = Rig("mm", gan, accu=4)
    ref.init_counts(0, N_ITERS)
    ref.run(data)
    ours = Rig("ours_fused", gan, accu=4)
    ours.init_counts(0, N_ITERS)
    ours.run(data, stop=8)
    # Finish as if never initialised: divisor 4 for the tail, and force the step.
    ours.gw._max_counts = ours.dw._max_counts = -1
    real, z = data
    for i in (8, 9):
        ours.d_step(real[i], z[i])
        ours.g_step(z[i])
    ours.gw.step(), ours.dw.step()
    with pytest.raises(AssertionError):
        assert_close_to(ours, ref)


# ---- clipping --------------------------------------------------------------------------

@pytest.mark.parametrize("accu", [1, 3])
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_clip_by_norm_matches_mmengine(accu, norm_type, data, gan):
    clip = dict(max_norm=CLIP_NORM) if norm_type == 2.0 else dict(max_norm=CLIP_NORM,
                                                                    norm_type=norm_type)
    logs, rigs = {}, {}
    for kind in KINDS:
        rigs[kind] = Rig(kind, gan, accu=accu, clip=clip)
        rigs[kind].init_counts(0, N_ITERS)
        logs[kind] = run_logged(rigs[kind], data)
    ref = rigs["mm"]
    n_steps = 2 * math.ceil(N_ITERS / accu)  # G and D both log, interleaved
    assert len(logs["mm"]) == n_steps
    # Clipping really happened: every logged (pre-clip) norm exceeds max_norm.
    assert min(logs["mm"]) > CLIP_NORM
    assert logs["ours_torch"] == logs["mm"]
    assert len(logs["ours_fused"]) == n_steps
    assert_close(logs["ours_fused"], logs["mm"], rtol=RTOL, atol=0)
    assert_same(rigs["ours_torch"], ref)
    assert_close_to(rigs["ours_fused"], ref)
    # ... and it mattered: without clipping the result is different.
    unclipped = Rig("ours_fused", gan, accu=accu)
    unclipped.init_counts(0, N_ITERS)
    unclipped.run(data)
    with pytest.raises(AssertionError):
        assert_close_to(unclipped, ref)


@pytest.mark.parametrize("amp", [None, "dynamic"], ids=["plain", "amp"])
def test_step_pre_hooks_see_clipped_grads_as_with_mmengine(amp, data, gan):
    """MMEngine clips (and unscales) before optimizer.step(), so its pre-hooks see
    the clipped grads and what they add is not clipped again. Folding the clip
    into the update would hand them the raw grads: with pre-hooks the clip takes
    MMEngine's path."""
    seen = {}

    def hook(kind):
        def add_l2(opt, args, kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            seen.setdefault(kind, []).append(float(torch.cat([g.flatten() for g in grads]).norm()))
            for g in opt.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.add_(p.detach(), alpha=1e-2)
        return add_l2

    clip = dict(max_norm=CLIP_NORM)
    rigs = amp_rigs(gan, amp=amp, clip=clip) if amp else {k: Rig(k, gan, clip=clip)
                                                          for k in KINDS}
    for kind, rig in rigs.items():
        rig.gw.optimizer.register_step_pre_hook(hook(kind))
        rig.init_counts()
        rig.run(data)
    assert len(seen["ours_fused"]) == N_ITERS
    assert max(seen["ours_fused"]) <= CLIP_NORM * (1 + 1e-5)
    assert_close(seen["ours_fused"], seen["mm"], rtol=1e-4, atol=0)
    if amp is None:
        assert_close_to(rigs["ours_fused"], rigs["mm"])


def test_clip_by_value_matches_mmengine(data, gan):
    clip = dict(type="value", clip_value=0.01)
    rigs = {k: Rig(k, gan, clip=clip) for k in KINDS}
    for rig in rigs.values():
        assert rig.gw.clip_grad_kwargs == dict(clip_value=0.01)
        rig.run(data)
    ref = rigs["mm"]
    assert_same(rigs["ours_torch"], ref)
    assert_close_to(rigs["ours_fused"], ref)
    unclipped = Rig("mm", gan).run(data)
    with pytest.raises(AssertionError):
        assert_close_to(unclipped, ref)


# ---- zero_kwargs ---------------------------------------------------------------------

@pytest.mark.parametrize("clip", [None, dict(max_norm=CLIP_NORM)], ids=["noclip", "clip"])
@pytest.mark.parametrize("accu", [1, 3])
def test_zero_kwargs_set_to_none_false(accu, clip, data, gan):
    zk = dict(set_to_none=False)
    runs = {}
    for kind in KINDS:
        for zero in (None, zk):
            rig = Rig(kind, gan, accu=accu, clip=clip)
            rig.init_counts(0, N_ITERS)
            runs[kind, zero is not None] = rig.run(data, zero_kwargs=zero)
    ref = runs["mm", False]
    for kind in KINDS:
        # Same parameters as with the default zero_grad ...
        assert_same(runs[kind, True], runs[kind, False])
        assert_vs_oracle(runs[kind, True], ref)
        # ... and the grads are left as zero tensors, not None.
        rig = runs[kind, True]
        for n, p in list(rig.G.named_parameters()) + list(rig.D.named_parameters()):
            assert p.grad is not None, f"{kind}: {n}.grad is None"
            assert torch.count_nonzero(p.grad) == 0, f"{kind}: {n}.grad not zeroed"
        # The default sets them to None, as torch's zero_grad does.
        assert all(p.grad is None for p in runs[kind, False].G.parameters())


# ---- AMP (bf16 autocast on the CPU) -----------------------------------------------------

LOSS_SCALES = ["dynamic", 512.0, dict(init_scale=2.0 ** 10, growth_interval=3)]
LOSS_SCALE_IDS = ["dynamic", "static", "dict_growth3"]


def test_mm_amp_oracle_is_real():
    """The oracle set-up: on this CPU host MMEngine refuses without the lift,
    and with it the wrapper autocasts to bf16 on the CPU."""
    if not torch.cuda.is_available():
        with pytest.raises(AssertionError, match="only available"):
            mmo.AmpOptimWrapper(optimizer=torch.optim.Adam(nn.Linear(2, 2).parameters()))
    lin = nn.Linear(4, 4)
    w = mm_amp_wrapper("dynamic", dtype="bfloat16", optimizer=torch.optim.Adam(lin.parameters()))
    with w.optim_context(lin):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    ours = pygan_optim.AmpOptimWrapper(dtype="bfloat16",
                                       optimizer=FusedAdam(lin.parameters()))
    with ours.optim_context(lin):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16


@pytest.mark.parametrize("clip", [None, dict(max_norm=CLIP_NORM)], ids=["noclip", "clip"])
@pytest.mark.parametrize("loss_scale", LOSS_SCALES, ids=LOSS_SCALE_IDS)
def test_amp_matches_mmengine(loss_scale, clip, data, gan):
    logs, rigs = {}, amp_rigs(gan, amp=loss_scale, clip=clip)
    for kind, rig in rigs.items():
        logs[kind] = run_logged(rig, data)
    ref = rigs["mm"]
    assert_same(rigs["ours_torch"], ref)
    assert_close_to(rigs["ours_fused"], ref)
    assert_moved(rigs["ours_fused"], gan)
    for kind in ("ours_torch", "ours_fused"):
        for w, w_ref in ((rigs[kind].gw, ref.gw), (rigs[kind].dw, ref.dw)):
            assert w.loss_scaler.state_dict() == w_ref.loss_scaler.state_dict(), kind
            assert w.state_dict()["loss_scaler"] == w_ref.state_dict()["loss_scaler"], kind
            assert step_counts(w) == step_counts(w_ref) == [N_ITERS]
    if isinstance(loss_scale, dict):  # the scale grew every 3 steps: 2**10 -> 2**13
        assert ref.gw.loss_scaler.get_scale() == 2.0 ** 13
    if clip is not None:
        assert len(logs["mm"]) == 2 * N_ITERS and min(logs["mm"]) > CLIP_NORM
        assert logs["ours_torch"] == logs["mm"]
        assert_close(logs["ours_fused"], logs["mm"], rtol=RTOL, atol=0)


@pytest.mark.parametrize("accu", [3])
def test_amp_accumulation_matches_mmengine(accu, data, gan):
    rigs = amp_rigs(gan, amp="dynamic", accu=accu, clip=dict(max_norm=CLIP_NORM))
    for rig in rigs.values():
        rig.init_counts(0, N_ITERS)
        rig.run(data)
    ref = rigs["mm"]
    assert step_counts(ref.gw) == [math.ceil(N_ITERS / accu)]
    assert_same(rigs["ours_torch"], ref)
    assert_close_to(rigs["ours_fused"], ref)


def _snapshot(rig):
    return ({n: p.detach().clone() for n, p in rig.D.named_parameters()},
            copy.deepcopy(rig.dw.optimizer.state_dict()),
            rig.dw.loss_scaler.get_scale())


@pytest.mark.parametrize("zero_kwargs", [None, dict(set_to_none=False)], ids=["none", "zeros"])
@pytest.mark.parametrize("clip", [None, dict(max_norm=CLIP_NORM)], ids=["noclip", "clip"])
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("kind", ["ours_fused", "ours_torch"])
def test_amp_nonfinite_grad_skips_step(kind, bad, clip, zero_kwargs, data, gan):
    poisoned = 4
    rigs = amp_rigs(gan, ("mm", kind), amp="dynamic", clip=clip)
    real, z = data
    for i in range(N_ITERS):
        for name, rig in rigs.items():
            rig.poison = bad if i == poisoned else None
            before = _snapshot(rig)
            rig.d_step(real[i], z[i], zero_kwargs)
            params, opt_state, scale = _snapshot(rig)
            if i == poisoned:
                # Skipped: no parameter and no optimizer state changed, the scale backed off.
                for n, p in params.items():
                    assert torch.equal(p, before[0][n]), f"{name}: {n} changed"
                for idx, st in before[1]["state"].items():
                    for key, v in st.items():
                        assert torch.equal(opt_state["state"][idx][key], v), (name, idx, key)
                assert scale == before[2] * 0.5, name
                # The poisoned grads are gone: the next window starts clean.
                for n, p in rig.D.named_parameters():
                    assert p.grad is None or torch.count_nonzero(p.grad) == 0, (name, n)
            else:
                assert not torch.equal(params["0.weight"], before[0]["0.weight"]), (name, i)
            rig.poison = None
            rig.g_step(z[i], zero_kwargs)
    ref = rigs["mm"]
    (assert_same if kind == "ours_torch" else assert_close_to)(rigs[kind], ref)
    for w, w_ref in ((rigs[kind].gw, ref.gw), (rigs[kind].dw, ref.dw)):
        assert w.loss_scaler.state_dict() == w_ref.loss_scaler.state_dict()
    assert step_counts(rigs[kind].dw) == step_counts(ref.dw) == [N_ITERS - 1]


# ---- state_dict across implementations ------------------------------------------------

@pytest.mark.parametrize("multi_group", [False, True], ids=["1group", "2groups"])
@pytest.mark.parametrize("amp", [None, dict(init_scale=2.0 ** 10, growth_interval=3)],
                         ids=["fp32", "amp"])
@pytest.mark.parametrize("direction", ["mm_to_ours", "ours_to_mm"])
def test_state_dict_resume_across_implementations(direction, amp, multi_group, data, gan):
    resume_at = 5
    kw = dict(amp=amp, multi_group=multi_group)
    ref = Rig("mm", gan, **kw).run(data)  # uninterrupted
    src_kind, dst_kind = (("mm", "ours_fused") if direction == "mm_to_ours"
                          else ("ours_fused", "mm"))
    src = Rig(src_kind, gan, **kw)
    if amp is not None:  # lockstep with the uninterrupted oracle run
        src.follow(ref)
    src.run(data, stop=resume_at)
    sds = {"G": copy.deepcopy(src.gw.state_dict()), "D": copy.deepcopy(src.dw.state_dict())}
    for sd in sds.values():
        assert ("loss_scaler" in sd) == (amp is not None)
        assert ("base_param_settings" in sd) == multi_group
    dst = Rig(dst_kind, (src.G, src.D), **kw)
    dst.gw.load_state_dict(copy.deepcopy(sds["G"]))
    dst.dw.load_state_dict(copy.deepcopy(sds["D"]))
    if amp is not None:
        assert dst.gw.loss_scaler.state_dict() == src.gw.loss_scaler.state_dict()
        assert dst.gw.loss_scaler.state_dict()["_growth_tracker"] == resume_at % 3
    assert dst.gw.get_lr() == src.gw.get_lr()
    if amp is not None:
        dst.follow(ref, from_iter=resume_at)
    dst.run(data, start=resume_at)
    assert_close_to(dst, ref)
    if amp is not None:
        assert dst.dw.loss_scaler.state_dict() == ref.dw.loss_scaler.state_dict()
    assert step_counts(dst.gw) == [N_ITERS]
    # Without the optimizer state the continued run is visibly different.
    fresh = Rig(dst_kind, (src.G, src.D), **kw).run(data, start=resume_at)
    with pytest.raises(AssertionError):
        assert_close_to(fresh, ref)


def test_state_dict_layout_matches_mmengine(data, gan):
    """Ours saves what MMEngine saves: the same keys, groups and per-param state keys."""
    for amp in (None, "dynamic"):
        a = Rig("mm", gan, amp=amp, multi_group=True).run(data, stop=2)
        b = Rig("ours_fused", gan, amp=amp, multi_group=True).run(data, stop=2)
        sa, sb = a.dw.state_dict(), b.dw.state_dict()
        assert sa.keys() == sb.keys()
        assert sa["state"].keys() == sb["state"].keys()
        for idx in sa["state"]:
            assert sa["state"][idx].keys() == sb["state"][idx].keys()
            assert int(sa["state"][idx]["step"]) == int(sb["state"][idx]["step"]) == 2
        assert len(sa["param_groups"]) == len(sb["param_groups"]) == 2
        for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
            for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "params"):
                assert ga[key] == gb[key], key
        assert sa["base_param_settings"]["lr"] == sb["base_param_settings"]["lr"]


# ---- lr / momentum / schedulers --------------------------------------------------------

@pytest.mark.parametrize("amp", [None, "dynamic"], ids=["fp32", "amp"])
@pytest.mark.parametrize("multi_group", [False, True], ids=["1group", "2groups"])
def test_get_lr_and_momentum_match_mmengine(multi_group, amp, gan):
    rigs = {k: Rig(k, gan, multi_group=multi_group, amp=amp) for k in KINDS}
    ref = rigs["mm"]
    for kind in ("ours_torch", "ours_fused"):
        for w, w_ref in ((rigs[kind].gw, ref.gw), (rigs[kind].dw, ref.dw)):
            assert w.get_lr() == w_ref.get_lr()
            assert w.get_momentum() == w_ref.get_momentum()
            assert len(w.param_groups) == len(w_ref.param_groups)
    if multi_group:
        assert ref.dw.get_lr() == {"base_lr": [4e-3], "lr": [4e-3, 2e-3]}
    assert ref.gw.get_momentum()["momentum"][0] == 0.0
    assert ref.dw.get_momentum()["momentum"][0] == 0.5


def make_schedulers(which, w):
    if which == "multistep":
        return [mmo.MultiStepLR(optimizer=w, milestones=[3, 6], gamma=0.5, by_epoch=False)]
    if which == "linear":
        return [mmo.LinearLR(optimizer=w, start_factor=0.2, end=5, by_epoch=False)]
    return [mmo.LinearLR(optimizer=w, start_factor=0.2, end=4, by_epoch=False),
            mmo.MultiStepLR(optimizer=w, milestones=[7], gamma=0.1, by_epoch=False)]


@pytest.mark.parametrize("multi_group", [False, True], ids=["1group", "2groups"])
@pytest.mark.parametrize("which", ["multistep", "linear", "chained"])
def test_param_schedulers_drive_ours_like_mmengine(which, multi_group, data, gan):
    runs = {}
    for kind in KINDS:
        rig = Rig(kind, gan, multi_group=multi_group)
        rig.init_counts(0, N_ITERS)
        scheds = make_schedulers(which, rig.gw) + make_schedulers(which, rig.dw)
        lrs = []

        def after_iter(i, rig=rig, scheds=scheds, lrs=lrs):
            for s in scheds:
                s.step()
            lrs.append((rig.gw.get_lr(), rig.dw.get_lr()))

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "scheduler.step() before optimizer.step()"
            rig.run(data, after_iter=after_iter)
        runs[kind] = rig, lrs
    ref, ref_lrs = runs["mm"]
    assert ref_lrs[0] != ref_lrs[-1]  # the schedule did change the lr
    for kind in ("ours_torch", "ours_fused"):
        rig, lrs = runs[kind]
        assert lrs == ref_lrs, kind
        # The schedulers count wrapper.step() calls; ours steps through it.
        assert rig.gw._global_step == ref.gw._global_step == N_ITERS - 1
        assert [g["lr"] for g in rig.dw.param_groups] == [g["lr"] for g in ref.dw.param_groups]
        assert_vs_oracle(rig, ref)


# ---- AMP: paths that fall back to MMEngine's step ------------------------------------------

@pytest.mark.parametrize("clip", [dict(type="value", clip_value=0.01),
                                  dict(max_norm=CLIP_NORM, norm_type=1.0)],
                         ids=["value", "norm_type1"])
def test_amp_native_clip_paths_match_mmengine(clip, data, gan):
    """Clips the fused step cannot fold: MMEngine's unscale_/clip/scaler.step
    sequence, with FusedAdam taking GradScaler's found_inf itself."""
    rigs = amp_rigs(gan, amp="dynamic", clip=clip)
    for rig in rigs.values():
        rig.run(data)
    ref = rigs["mm"]
    assert_same(rigs["ours_torch"], ref)
    assert_close_to(rigs["ours_fused"], ref)
    for w, w_ref in ((rigs["ours_fused"].gw, ref.gw), (rigs["ours_fused"].dw, ref.dw)):
        assert w.loss_scaler.state_dict() == w_ref.loss_scaler.state_dict()


@pytest.mark.parametrize("zero_kwargs", [None, dict(set_to_none=False)], ids=["none", "zeros"])
def test_amp_with_disabled_loss_scaler_matches_mmengine(zero_kwargs, data, gan):
    """bf16 autocast without loss scaling (GradScaler(enabled=False))."""
    rigs = amp_rigs(gan, amp=dict(enabled=False))
    for rig in rigs.values():
        assert not rig.gw.loss_scaler.is_enabled()
        rig.run(data, zero_kwargs=zero_kwargs)
    ref = rigs["mm"]
    assert_same(rigs["ours_torch"], ref)
    for n, p in rigs["ours_fused"].G.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"{n}.grad not zeroed"
    assert_close_to(rigs["ours_fused"], ref)


# ---- parameters that are in the optimizer but frozen (requires_grad=False) -------------------


def _two_layer_net():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))


@pytest.mark.parametrize("kind", ["ours_torch", "ours_fused"])
def test_clip_by_norm_with_frozen_param_holding_grad(kind):
    """A layer frozen in the middle of an accumulation window keeps its grad,
    which the optimizer still applies; MMEngine leaves it out of the clipping."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    nets = {}
    for k in ("mm", kind):
        net = _two_layer_net()
        w = make_wrapper(k, net, G_HP, accu=2, clip=dict(max_norm=CLIP_NORM))
        for _ in range(3):  # one full window, then the first half of the next
            w.update_params(net(x).pow(2).mean())
        net[0].requires_grad_(False)
        w.update_params(net(x).pow(2).mean())
        assert step_counts(w) == [2]
        nets[k] = net
    for (n, p), q in zip(nets["mm"].named_parameters(), nets[kind].parameters()):
        assert_close(q, p, rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["ours_torch", "ours_fused"])
def test_amp_inf_in_frozen_param_grad_skips_step(kind):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    results = {}
    for k in ("mm", kind):
        net = _two_layer_net()
        w = make_wrapper(k, net, G_HP, accu=2, amp="dynamic")
        with w.optim_context(net):
            w.update_params(net(x).float().pow(2).mean())
        net[0].requires_grad_(False)
        net[0].bias.grad[0] = math.inf
        before = copy.deepcopy(net.state_dict())
        with w.optim_context(net):
            w.update_params(net(x).float().pow(2).mean())
        changed = [n for n, v in net.state_dict().items() if not torch.equal(v, before[n])]
        results[k] = changed, w.loss_scaler.get_scale()
    assert results["mm"] == ([], 2.0 ** 15)  # the oracle skipped and backed off
    assert results[kind] == results["mm"]


# ---- construction: same checks and errors as MMEngine -------------------------------------

def test_construction_errors_match_mmengine():
    def opt():
        return torch.optim.Adam(nn.Linear(2, 2).parameters())

    cases = [
        (dict(accumulative_counts=0), AssertionError),
        (dict(clip_grad={}), AssertionError),
        (dict(clip_grad=dict(type="norm")), AssertionError),
        (dict(clip_grad=dict(type="l1", max_norm=1.0)), ValueError),
    ]
    for kw, exc in cases:
        for cls in (mmo.OptimWrapper, pygan_optim.OptimWrapper):
            with pytest.raises(exc):
                cls(optimizer=opt(), **copy.deepcopy(kw))  # MMEngine pops clip_grad['type']
    amp_cases = [(dict(loss_scale=512), TypeError), (dict(loss_scale="static"), TypeError),
                 (dict(dtype="bf16"), AssertionError), (dict(dtype="fp16"), AssertionError)]
    for kw, exc in amp_cases:
        mm_kw = dict(kw)
        with pytest.raises(exc):
            mm_amp_wrapper(mm_kw.pop("loss_scale", "dynamic"), optimizer=opt(), **mm_kw)
        with pytest.raises(exc):
            pygan_optim.AmpOptimWrapper(optimizer=opt(), **kw)
