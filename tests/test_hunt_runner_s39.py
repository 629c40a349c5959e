"""Session 39 hunt: MMEngine features used around the optimizer in a real Runner.

Every test runs the same training twice in MMEngine's Runner (or FlexibleRunner):
pygan_optim's wrappers with FusedAdam/FusedAdamW ("ours") against MMEngine's
native path, i.e. MMEngine's OptimWrapper with ``torch.optim.Adam/AdamW(fused=True)``
(for AMP: pygan_optim's AmpOptimWrapper with torch's fused Adam, which is
MMEngine's AmpOptimWrapper call for call on the CPU, where MMEngine's own refuses
to be built). On one thread with tensor sizes in multiples of 64 (off torch's
scalar tails) FusedAdam is bit-identical to torch's fused Adam, and what the
Runner adds around the optimizer (param schedulers, paramwise_cfg, accumulation
windows, loss scaling, clipping by value / another norm, EMAHook, checkpoints,
resume) is the same arithmetic on both sides, so the comparisons are bit for
bit (torch.equal). Clipping by L2 norm is left out of the bit-for-bit runs: the
fused path sums the norm in another order (an ulp in the clip coefficient),
which tests/test_wrappers_oracle.py checks call by call.

Nothing here failed: no bug was found in this area. The tests pin what was
checked and held (see each docstring).
"""
import copy
import itertools
import math
import warnings

import mmengine.optim as mmo
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MessageHub
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from mmengine.runner import FlexibleRunner, Runner
from torch.utils.data import DataLoader

import pygan_optim
from pygan_optim import FusedAdam

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ("ours", "mm")
_names = itertools.count()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    # MMEngine 0.10.7 cannot load its own checkpoints under torch's
    # weights_only=True default (see tests/test_gan.py).
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with warnings.catch_warnings():
        # "scheduler.step() before optimizer.step()" inside accumulation windows,
        # on both sides alike.
        warnings.simplefilter("ignore")
        yield


class Net(BaseModel):
    """Linear, BatchNorm, a depthwise conv and a Linear: every paramwise_cfg
    rule (bias, norm, dwconv, flat) has a parameter to act on."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.fc1 = nn.Linear(64, 128)
        self.bn = nn.BatchNorm1d(128)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.fc2 = nn.Linear(128, 64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        h = self.bn(torch.relu(self.fc1(inputs)))
        h = self.dw(h.view(-1, 64, 2, 1)).flatten(1)
        y = self.fc2(torch.tanh(h))
        return dict(loss=(y ** 2).mean()) if mode == "loss" else y


class TinyGAN(BaseModel):
    """MMagic-style train_step: one D update, then one G update with D frozen,
    each through its own wrapper of the OptimWrapperDict."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.generator = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))
        self.discriminator = nn.Sequential(nn.Linear(64, 128), nn.LeakyReLU(0.2),
                                           nn.Linear(128, 64))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        return self.generator(inputs)

    def train_step(self, data, optim_wrapper):
        real = data["inputs"]
        z = torch.flip(real, [1]) * 0.5
        dw, gw = optim_wrapper["discriminator"], optim_wrapper["generator"]
        with dw.optim_context(self.discriminator):
            fake = self.generator(z).detach()
            loss_d = (F.softplus(-self.discriminator(real).sum(1)).mean()
                      + F.softplus(self.discriminator(fake).sum(1)).mean())
        dw.update_params(loss_d)
        self.discriminator.requires_grad_(False)
        with gw.optim_context(self.generator):
            loss_g = F.softplus(-self.discriminator(self.generator(z)).sum(1)).mean()
        gw.update_params(loss_g)
        self.discriminator.requires_grad_(True)
        return dict(loss_d=loss_d.detach(), loss_g=loss_g.detach())


MODELS.register_module(name="S39RunnerNet", module=Net, force=True)
MODELS.register_module(name="S39RunnerTinyGAN", module=TinyGAN, force=True)


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return [dict(inputs=torch.randn(64, generator=g)) for _ in range(n)]


def make_runner(work_dir, optim_wrapper, *, max_iters=None, max_epochs=None, scheduler=None,
                hooks=(), resume_from=None, ckpt=None, model=None):
    kw = dict(resume=True, load_from=str(resume_from)) if resume_from else {}
    if max_epochs:
        train_cfg = dict(by_epoch=True, max_epochs=max_epochs)
    else:
        train_cfg = dict(by_epoch=False, max_iters=max_iters)
    checkpoint = dict(type="CheckpointHook", interval=10 ** 6, by_epoch=bool(max_epochs))
    checkpoint.update(ckpt or {})
    return Runner(
        model=model or Net(), work_dir=str(work_dir), experiment_name=f"s39_runner_{next(_names)}",
        train_dataloader=DataLoader(_data(), batch_size=4, shuffle=False),
        train_cfg=train_cfg, optim_wrapper=copy.deepcopy(optim_wrapper),
        param_scheduler=copy.deepcopy(scheduler), custom_hooks=copy.deepcopy(list(hooks)),
        default_hooks=dict(checkpoint=checkpoint, logger=dict(type="LoggerHook", interval=1000)),
        launcher="none", randomness=dict(seed=0), log_level="ERROR", **kw)


def wrapper_cfg(kind, opt="Adam", amp=None, **kw):
    """One wrapper config: ours (Fused* names) or MMEngine's native path."""
    hp = dict(lr=1e-2, betas=(0.5, 0.99), weight_decay=1e-2)
    hp.update(kw.pop("hp", {}))
    if kind == "ours":
        cfg = dict(type="FusedOptimWrapper", optimizer=dict(type="Fused" + opt, **hp))
    else:
        cfg = dict(type="OptimWrapper", optimizer=dict(type=opt, fused=True, **hp))
    if amp is not None:
        cfg["type"] = "FusedAmpOptimWrapper"  # with torch's Adam inside: MMEngine's path
        cfg.update(amp)
    cfg.update(kw)
    return cfg


def snapshot(runner):
    """Model tensors, EMAHook's average, every optimizer state tensor, the
    param groups' lr and betas and the loss scale (of each wrapper of a dict)."""
    out = {f"model.{k}": v.detach().clone() for k, v in runner.model.state_dict().items()}
    for hook in runner.hooks:
        if type(hook).__name__ == "EMAHook":
            out.update({f"ema.{k}": v.clone() for k, v in hook.ema_model.state_dict().items()})
    wrapper = runner.optim_wrapper
    sds = (wrapper.state_dict() if isinstance(wrapper, mmo.OptimWrapperDict)
           else {"": wrapper.state_dict()})
    for name, sd in sds.items():
        for i, state in sd["state"].items():
            out.update({f"{name}.opt.{i}.{k}": torch.as_tensor(v).clone()
                        for k, v in state.items()})
        groups = sd["param_groups"]
        out[f"{name}.lr"] = torch.tensor([g["lr"] for g in groups], dtype=torch.float64)
        out[f"{name}.betas"] = torch.tensor([list(g["betas"]) for g in groups],
                                            dtype=torch.float64)
        if "loss_scaler" in sd:
            out.update({f"{name}.scaler.{k}": torch.tensor(float(v))
                        for k, v in sd["loss_scaler"].items()})
    return out


def logged(runner, suffix="lr"):
    hub = runner.message_hub
    # NaN as a string, so that logs compare equal where both logged NaN.
    return {k: [float(v) if not math.isnan(v) else "nan" for v in hub.get_scalar(k).data[0]]
            for k in hub.log_scalars if k.endswith(suffix)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ


# ---- param schedulers and paramwise_cfg ------------------------------------------------------

PARAMWISE = {
    "mults": dict(bias_decay_mult=0.0, norm_decay_mult=0.5, dwconv_decay_mult=2.0,
                  bias_lr_mult=3.0, custom_keys={"fc2": dict(lr_mult=0.1, decay_mult=4.0)}),
    # custom_keys entries are copied into the groups whole: per-group betas, eps,
    # amsgrad and maximize; an lr_mult of 0; a key the optimizer does not know.
    "group_options": dict(flat_decay_mult=0.0, custom_keys={
        "fc2": dict(betas=(0.0, 0.9), eps=1e-3, lr_mult=2.0),
        "bn": dict(amsgrad=True, decay_mult=0.0),
        "dw": dict(maximize=True, lr_mult=0.5),
        "fc1.weight": dict(lr_mult=0.0, decay_mult=0.0, note="frozen by lr")}),
}
# Warm-up, cosine, then MultiStepLR with gamma 0: the last steps run at lr == 0.
LR_SCHEDULE = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, end=3),
               dict(type="CosineAnnealingLR", by_epoch=False, begin=3, end=7, eta_min=0.0),
               dict(type="MultiStepLR", by_epoch=False, milestones=[5], gamma=0.0)]


@pytest.mark.parametrize("pw", sorted(PARAMWISE))
@pytest.mark.parametrize("opt", ["Adam", "AdamW"])
def test_paramwise_cfg_and_lr_schedules_match_the_native_path_bit_for_bit(tmp_path, opt, pw):
    """One param group per parameter (MMEngine's DefaultOptimWrapperConstructor),
    with the base_param_settings group, schedulers writing every group's lr
    (down to 0, where the moments and step counts still advance), logged by
    RuntimeInfoHook as train/base_lr and train/lr."""
    runs = {}
    for kind in KINDS:
        runner = make_runner(tmp_path / kind, wrapper_cfg(kind, opt, paramwise_cfg=PARAMWISE[pw]),
                             max_iters=7, scheduler=LR_SCHEDULE)
        runner.train()
        groups = runner.optim_wrapper.optimizer.param_groups
        runs[kind] = (snapshot(runner), logged(runner),
                      [{k: v for k, v in g.items() if k not in ("params", "fused")}
                       for g in groups], runner.optim_wrapper.get_lr())
    (ours, lr_ours, groups_ours, get_lr_ours), (ref, lr_ref, groups_ref, get_lr_ref) = (
        runs["ours"], runs["mm"])
    assert_same(ours, ref)
    assert lr_ours == lr_ref and set(lr_ref) == {"train/lr", "train/base_lr"}
    assert groups_ours == groups_ref and len(groups_ref) == 8
    assert get_lr_ours == get_lr_ref and get_lr_ref["lr"] == [0.0] * 8


class TiedNet(Net):
    """Net plus a head that shares fc2's weight (one parameter, two modules)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.head = nn.Linear(128, 64)
        with torch.no_grad():
            self.head.bias.copy_(torch.randn(64, generator=g) * 0.1)
        self.head.weight = self.fc2.weight

    def forward(self, inputs, data_samples=None, mode="tensor"):
        y = super().forward(inputs) + self.head(torch.tanh(self.fc1(inputs)))
        return dict(loss=(y ** 2).mean()) if mode == "loss" else y


def test_tied_weights_with_bypass_duplicate_match_and_without_it_fail_alike(tmp_path):
    """paramwise_cfg over a model with a shared parameter: bypass_duplicate
    gives it one group (bit for bit as on the native path); without it both
    optimizers refuse the duplicate with torch's ValueError."""
    runs = {}
    for kind in KINDS:
        cfg = wrapper_cfg(kind, paramwise_cfg=dict(bypass_duplicate=True, bias_decay_mult=0.0))
        runner = make_runner(tmp_path / kind, cfg, max_iters=4, model=TiedNet())
        runner.train()
        assert len(runner.optim_wrapper.optimizer.param_groups) == 9
        runs[kind] = snapshot(runner)
        cfg = wrapper_cfg(kind, paramwise_cfg=dict(bias_decay_mult=0.0))
        runner = make_runner(tmp_path / f"{kind}_dup", cfg, max_iters=4, model=TiedNet())
        with pytest.raises(ValueError, match="more than one parameter group"):
            runner.train()
    assert_same(runs["ours"], runs["mm"])


@pytest.mark.parametrize("loop", ["epochs", "iters"])
def test_accumulation_windows_and_iter_based_warmup_match_the_native_path(tmp_path, loop):
    """accumulative_counts=3 where the run is no multiple of it: an epoch loop
    of 2 x 10 iterations (windows straddle the epoch; by_epoch schedulers, one
    converted to iterations) and an iteration loop of 11 (MMEngine's last-window
    rule: a window of 2 iterations, its losses divided by 2)."""
    if loop == "epochs":
        run_kw = dict(max_epochs=2, scheduler=[
            dict(type="LinearLR", start_factor=0.1, by_epoch=True, begin=0, end=1,
                 convert_to_iter_based=True),
            dict(type="MultiStepLR", by_epoch=True, milestones=[1], gamma=0.5)])
        steps, max_counts = 7, 20
    else:
        run_kw = dict(max_iters=11, scheduler=[dict(type="CosineAnnealingLR", by_epoch=False,
                                                    T_max=11)])
        steps, max_counts = 4, 11
    runs = {}
    for kind in KINDS:
        runner = make_runner(tmp_path / kind, wrapper_cfg(kind, hp=dict(betas=(0.0, 0.99)),
                                                          accumulative_counts=3), **run_kw)
        runner.train()
        w = runner.optim_wrapper
        assert {int(s["step"]) for s in w.optimizer.state.values()} == {steps}
        assert (w._inner_count, w._max_counts, w._remainder_counts) == (
            max_counts, max_counts, max_counts % 3)
        runs[kind] = snapshot(runner), logged(runner)
    assert_same(runs["ours"][0], runs["mm"][0])
    assert runs["ours"][1] == runs["mm"][1]


def test_flexible_runner_with_accumulation_matches_the_native_path(tmp_path):
    """FlexibleRunner's SingleDeviceStrategy initialises the counts itself
    (accumulative_counts > 1, max_iters from dispatch_kwargs)."""
    runs = {}
    for kind in KINDS:
        runner = FlexibleRunner(
            model=Net(), work_dir=str(tmp_path / kind),
            train_dataloader=dict(dataset=_data(), batch_size=4,
                                  sampler=dict(type="DefaultSampler", shuffle=False),
                                  collate_fn=dict(type="default_collate")),
            train_cfg=dict(by_epoch=False, max_iters=11),
            optim_wrapper=wrapper_cfg(kind, accumulative_counts=3),
            param_scheduler=[dict(type="LinearLR", start_factor=0.5, by_epoch=False, end=6)],
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=10 ** 6,
                                               by_epoch=False)),
            strategy=dict(type="SingleDeviceStrategy"), randomness=dict(seed=0),
            log_level="ERROR")
        runner.train()
        assert {int(s["step"]) for s in runner.optim_wrapper.optimizer.state.values()} == {4}
        runs[kind] = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    assert_same(runs["ours"], runs["mm"])


# ---- AMP and clipping in the Runner ---------------------------------------------------------

@pytest.mark.parametrize("clip", [None, dict(type="value", clip_value=1e-3),
                                  dict(max_norm=0.05, norm_type=1.0)],
                         ids=["noclip", "value", "norm1"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("loss_scale", ["dynamic", 512.0, dict(init_scale=2.0 ** 10,
                                                               growth_interval=2)],
                         ids=["dynamic", "static", "dict"])
def test_cpu_amp_loss_scales_and_native_clips_match_mmengines_path(tmp_path, loss_scale,
                                                                    dtype, clip):
    """CPU autocast with every loss_scale form; float16 overflows in the first
    steps here, so the dynamic scale backs off and those steps are skipped. The
    loss scaler's state and the parameters are the native path's bit for bit,
    and so is the logged grad_norm of an L1 clip."""
    runs = {}
    for kind in KINDS:
        amp = dict(loss_scale=copy.deepcopy(loss_scale), dtype=dtype)
        runner = make_runner(tmp_path / kind, wrapper_cfg(kind, amp=amp,
                                                          clip_grad=copy.deepcopy(clip)),
                             max_iters=6)
        runner.train()
        runs[kind] = snapshot(runner), logged(runner, "grad_norm")
    assert_same(runs["ours"][0], runs["mm"][0])
    assert runs["ours"][1] == runs["mm"][1]
    assert bool(runs["mm"][1]) == (clip is not None and clip.get("type") != "value")


@pytest.mark.parametrize("clip", [dict(type="value", clip_value=1e-3),
                                  dict(max_norm=0.05, norm_type=math.inf),
                                  dict(max_norm=0.05, norm_type=1.0),
                                  dict(max_norm=0.05, error_if_nonfinite=True)],
                         ids=["value", "norm_inf", "norm1", "error_if_nonfinite"])
def test_clips_on_mmengines_path_match_bit_for_bit_in_the_runner(tmp_path, clip):
    """Clips the fused step does not fold run MMEngine's _clip_grad, then FusedAdam."""
    runs = {}
    for kind in KINDS:
        runner = make_runner(tmp_path / kind, wrapper_cfg(kind, clip_grad=copy.deepcopy(clip),
                                                          accumulative_counts=2), max_iters=7)
        runner.train()
        runs[kind] = snapshot(runner), logged(runner, "grad_norm")
    assert_same(runs["ours"][0], runs["mm"][0])
    assert runs["ours"][1] == runs["mm"][1]


@pytest.mark.parametrize("amp", [None, "dynamic"], ids=["fp32", "amp"])
@pytest.mark.parametrize("clip", [dict(max_norm=1.0), dict(max_norm=1.0, norm_type=math.inf),
                                  dict(max_norm=1.0, error_if_nonfinite=True)],
                         ids=["norm2", "norm_inf", "error_if_nonfinite"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 1e30])
def test_non_finite_grads_log_and_fail_as_mmengine(bad, clip, amp):
    """A non-finite grad (or one whose square overflows): the logged
    train/grad_norm is MMEngine's (inf or nan), error_if_nonfinite raises the
    same error type, and under AMP the step is skipped alike."""
    results = {}
    hub = MessageHub.get_current_instance()
    for kind in KINDS:
        hub.log_scalars.pop("train/grad_norm", None)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
        opt = (FusedAdam(net.parameters(), lr=1e-2, betas=(0.5, 0.99)) if kind == "ours"
               else torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.5, 0.99), fused=True))
        kw = dict(optimizer=opt, clip_grad=copy.deepcopy(clip))
        w = (pygan_optim.AmpOptimWrapper(loss_scale=amp, **kw) if amp
             else pygan_optim.OptimWrapper(**kw))

        def poison(g):
            g = g.clone()
            g[0, 0] = bad
            return g

        net[2].weight.register_hook(poison)
        with w.optim_context(net):
            loss = net(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)))
            loss = loss.float().pow(2).mean()
        try:
            w.update_params(loss)
            error = None
        except RuntimeError as e:
            error = type(e)
        norm = hub.log_scalars.pop("train/grad_norm", None)
        results[kind] = (error, norm and repr(float(norm.current())),
                         [p.detach().clone() for p in net.parameters()],
                         w.loss_scaler.get_scale() if amp else None)
    ours, ref = results["ours"], results["mm"]
    assert ours[0] == ref[0] and ours[1] == ref[1] and ours[3] == ref[3]
    if "error_if_nonfinite" in clip:  # 1e30 too: its square overflows float32
        assert ref[0] is RuntimeError and ref[1] is None  # raised before logging
    else:
        assert ref[0] is None and ref[1] is not None
    for a, b in zip(ours[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---- OptimWrapperDict: per-key schedulers, momentum on beta1 == 0, resume --------------------

def gan_cfg(kind):
    fused = kind == "ours"

    def opt(**hp):
        return dict(type="FusedAdam", **hp) if fused else dict(type="Adam", fused=True, **hp)

    g = dict(type="FusedOptimWrapper" if fused else "OptimWrapper",
             optimizer=opt(lr=2e-3, betas=(0.0, 0.99)))
    d = dict(type="FusedAmpOptimWrapper", loss_scale=dict(init_scale=2.0 ** 12, growth_interval=3),
             dtype="bfloat16", optimizer=opt(lr=4e-3, betas=(0.5, 0.99), weight_decay=1e-3))
    return dict(constructor="MultiOptimWrapperConstructor", generator=g, discriminator=d)


GAN_SCHEDULE = dict(
    # beta1 from 0 up to 0.9 on G, from 0.5 down to exactly 0 on D.
    generator=[dict(type="LinearLR", start_factor=0.25, by_epoch=False, end=4),
               dict(type="CosineAnnealingMomentum", eta_min=0.9, by_epoch=False, begin=3, end=10)],
    discriminator=[dict(type="MultiStepLR", milestones=[2, 5], gamma=0.5, by_epoch=False),
                   dict(type="LinearMomentum", start_factor=1.0, end_factor=0.0, by_epoch=False,
                        begin=4, end=8)])


def test_gan_dict_with_per_key_schedulers_resumes_like_the_native_path(tmp_path):
    """MultiOptimWrapperConstructor's OptimWrapperDict (G plain, D AMP), a
    scheduler list per key, momentum schedulers moving beta1 through 0, a
    checkpoint at iteration 5 and a resume from it: straight and resumed runs
    are equal, and equal to the native path's, bit for bit; so are the lr and
    momentum that RuntimeInfoHook and get_momentum report."""
    runs = {}
    for kind in KINDS:
        first = make_runner(tmp_path / kind / "first", gan_cfg(kind), max_iters=10,
                            scheduler=GAN_SCHEDULE, model=TinyGAN(), ckpt=dict(interval=5))
        first.train()
        assert isinstance(first.optim_wrapper, mmo.OptimWrapperDict)
        straight = snapshot(first)
        resumed = make_runner(tmp_path / kind / "second", gan_cfg(kind), max_iters=10,
                              scheduler=GAN_SCHEDULE, model=TinyGAN(),
                              resume_from=tmp_path / kind / "first" / "iter_5.pth")
        resumed.train()
        assert_same(straight, snapshot(resumed))
        runs[kind] = (straight, logged(first), first.optim_wrapper.get_momentum(),
                      first.optim_wrapper.get_lr())
    ours, ref = runs["ours"], runs["mm"]
    assert_same(ours[0], ref[0])
    assert ours[1:] == ref[1:]
    assert ref[2]["discriminator.momentum"] == [0.0] and ref[2]["generator.momentum"][0] > 0.8
    assert set(ours[1]) == {"train/generator.lr", "train/discriminator.lr"}


def test_optim_wrapper_dict_api_with_our_wrappers_is_mmengines():
    """OptimWrapperDict (MMEngine's class) over our wrappers answers as over
    MMEngine's: get_lr/get_momentum (base_lr for a multi-group child),
    membership, keys, state_dict both ways, the refusals, zero_grad dropping
    its kwargs, and initialize_count_status doing nothing."""
    dicts = {}
    for kind in KINDS:
        torch.manual_seed(0)
        gen, disc = nn.Linear(64, 64), nn.Linear(64, 64)
        if kind == "ours":
            g_opt = FusedAdam([{"params": [gen.weight]}, {"params": [gen.bias], "lr": 1e-3}],
                              lr=2e-3, betas=(0.0, 0.99))
            gw = pygan_optim.OptimWrapper(optimizer=g_opt)
            dw = pygan_optim.AmpOptimWrapper(optimizer=FusedAdam(disc.parameters(), lr=4e-3),
                                             loss_scale=dict(init_scale=64.0))
        else:
            g_opt = torch.optim.Adam([{"params": [gen.weight]}, {"params": [gen.bias], "lr": 1e-3}],
                                     lr=2e-3, betas=(0.0, 0.99), fused=True)
            gw = mmo.OptimWrapper(optimizer=g_opt)
            dw = pygan_optim.AmpOptimWrapper(
                optimizer=torch.optim.Adam(disc.parameters(), lr=4e-3, fused=True),
                loss_scale=dict(init_scale=64.0))
        wd = mmo.OptimWrapperDict(generator=gw, discriminator=dw)
        for net, w in ((gen, gw), (disc, dw)):
            with w.optim_context(net):
                loss = net(torch.randn(4, 64)).float().pow(2).mean()
            w.update_params(loss)
        dicts[kind] = wd, gen, disc
    ours, ref = dicts["ours"][0], dicts["mm"][0]
    assert ours.get_lr() == ref.get_lr() == {
        "generator.base_lr": [2e-3], "generator.lr": [2e-3, 1e-3], "discriminator.lr": [4e-3]}
    assert ours.get_momentum() == ref.get_momentum()
    assert list(ours.keys()) == list(ref.keys()) == ["generator", "discriminator"]
    assert "generator" in ours and "ema" not in ours and len(ours) == 2
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert sd_ours.keys() == sd_ref.keys()
    for key in sd_ref:
        assert sd_ours[key].keys() == sd_ref[key].keys(), key
    assert sd_ours["discriminator"]["loss_scaler"] == sd_ref["discriminator"]["loss_scaler"]
    # Across implementations, both ways (the native dict loads ours and goes on).
    ours.load_state_dict(copy.deepcopy(sd_ref))
    ref.load_state_dict(copy.deepcopy(sd_ours))
    with pytest.raises(AssertionError, match="Mismatched"):
        ours.load_state_dict(dict(ema=sd_ref["generator"]))
    for name in ("update_params", "backward", "step"):
        with pytest.raises(NotImplementedError, match=f"`{name}` should be called"):
            getattr(ours, name)(torch.zeros(())) if name != "step" else ours.step()
    with pytest.raises(NotImplementedError):
        ours.optim_context(dicts["ours"][1])
    ours.initialize_count_status(dicts["ours"][1], 3, 10)  # a no-op, as in MMEngine
    assert ours["generator"]._max_counts == -1
    for net in dicts["ours"][1:]:
        net(torch.randn(4, 64)).sum().backward()
    ours.zero_grad(set_to_none=False)  # kwargs dropped: torch's default releases
    assert all(p.grad is None for net in dicts["ours"][1:] for p in net.parameters())


# ---- hooks that touch the optimizer; resume with another config -----------------------------

def test_ema_hook_checkpoint_without_optimizer_and_resume_with_a_changed_lr(tmp_path):
    """MMEngine's EMAHook (its own ExponentialMovingAverage) beside an lr
    schedule and accumulation; CheckpointHook(save_optimizer=False), resumed
    with another lr in the config (fresh optimizer state at the config's lr,
    the scheduler's state from the checkpoint); and a full checkpoint resumed
    with another lr (the checkpoint's lr wins): all as on the native path."""
    ema = [dict(type="EMAHook", momentum=0.1, begin_iter=2)]
    sched = [dict(type="LinearLR", start_factor=0.5, by_epoch=False, end=6)]
    runs = {}
    for kind in KINDS:
        base = wrapper_cfg(kind, hp=dict(betas=(0.0, 0.99)), accumulative_counts=2)
        changed = wrapper_cfg(kind, hp=dict(betas=(0.0, 0.99), lr=5e-3), accumulative_counts=2)
        out = []
        for save_optimizer in (False, True):
            first_dir = tmp_path / kind / f"first_{save_optimizer}"
            first = make_runner(first_dir, base, max_iters=9, hooks=ema, scheduler=sched,
                                ckpt=dict(interval=3, save_optimizer=save_optimizer))
            first.train()
            ckpt = torch.load(first_dir / "iter_3.pth", weights_only=False)
            assert ("optimizer" in ckpt) == save_optimizer
            second = make_runner(tmp_path / kind / f"second_{save_optimizer}", changed,
                                 max_iters=9, hooks=ema, scheduler=sched,
                                 resume_from=first_dir / "iter_3.pth")
            second.train()
            out += [snapshot(first), snapshot(second)]
        runs[kind] = out
        # The full checkpoint carries the first run's lr, the other one does not.
        assert out[3][".lr"].item() == pytest.approx(1e-2)
        # Without it the fresh groups start at the config's 5e-3, and MMEngine's
        # chained LinearLR goes on multiplying from there.
        assert out[1][".lr"].item() < 5e-3
    for a, b in zip(runs["ours"], runs["mm"]):
        assert_same(a, b)


def test_exact_resume_in_an_epoch_loop_mid_window_matches_the_straight_run(tmp_path):
    """ExactResumeHook in an EpochBasedTrainLoop whose epochs (10 iterations)
    end inside accumulation windows of 3: resumed at an epoch checkpoint the
    run equals the straight one bit for bit, on both paths."""
    hooks = [dict(type="ExactResumeHook")]
    sched = [dict(type="LinearLR", start_factor=0.5, by_epoch=True, end=2,
                  convert_to_iter_based=True)]
    runs = {}
    for kind in KINDS:
        cfg = wrapper_cfg(kind, hp=dict(betas=(0.0, 0.99)), accumulative_counts=3)
        first = make_runner(tmp_path / kind / "first", cfg, max_epochs=3, hooks=hooks,
                            scheduler=sched, ckpt=dict(interval=1))
        first.train()
        resumed = make_runner(tmp_path / kind / "second", cfg, max_epochs=3, hooks=hooks,
                              scheduler=sched,
                              resume_from=tmp_path / kind / "first" / "epoch_1.pth")
        resumed.train()
        straight = snapshot(first)
        assert_same(straight, snapshot(resumed))
        runs[kind] = straight
    assert_same(runs["ours"], runs["mm"])
