"""Checkpoint save and resume end to end in MMEngine's Runner (session 32 hunt).

A tiny model trained for N iterations is compared with the same training saved
at iteration k and resumed in a fresh Runner: bit for bit where the arithmetic
is the same, and against MMEngine's own wrappers with torch's Adam (the
oracle) within a tolerance where the kernels differ (torch's scalar tails, bf16
autocast). Two bugs of ExactResumeHook have a test each (marked); the other
tests cover what was checked and held.
"""
import copy
import itertools
import os

import pytest
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import METRICS, MODELS
from mmengine.runner import Runner
from torch.utils.data import DataLoader

import pygan_optim
from pygan_optim import FusedAdam, FusedAdamW

N_DATA = 48


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    # MMEngine 0.10.7 cannot load its own checkpoints under torch's
    # weights_only=True default (see tests/test_gan.py).
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny(BaseModel):
    """Three linear layers; `b` has 32768 weights, so its grad can be kept as
    exp_avg (with keep_small_cpu_grads). `dropout` draws from the global RNG."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a, self.b, self.c = nn.Linear(16, 256), nn.Linear(256, 128), nn.Linear(128, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.dropout = dropout

    def forward(self, inputs, data_samples=None, mode="tensor"):
        x = nn.functional.dropout(inputs, self.dropout, training=True) if self.dropout else inputs
        y = self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return dict(loss=(y ** 2).mean()) if mode == "loss" else y


MODELS.register_module(name="ResumeHuntTiny", module=Tiny, force=True)


class CountSamples(BaseMetric):
    """A metric for a validation loop that only has to run."""

    def process(self, data_batch, data_samples):
        self.results.append(len(data_samples))

    def compute_metrics(self, results):
        return dict(samples=sum(results))


METRICS.register_module(name="ResumeHuntCountSamples", module=CountSamples, force=True)
_names = itertools.count()


def _data():
    g = torch.Generator().manual_seed(0)
    return [dict(inputs=torch.randn(16, generator=g)) for _ in range(N_DATA)]


def make_runner(work_dir, optim_wrapper, max_iters, ckpt_interval=1000, resume_from=None,
                load_from=None, hooks=(), scheduler=None, seed=0, dropout=0.0, val_interval=0):
    kw = dict(resume=True, load_from=str(resume_from)) if resume_from else {}
    if load_from:
        kw = dict(load_from=str(load_from))
    train_cfg = dict(by_epoch=False, max_iters=max_iters)
    if val_interval:
        train_cfg["val_interval"] = val_interval
        kw.update(val_dataloader=DataLoader(_data()[:8], batch_size=4), val_cfg=dict(),
                  val_evaluator=dict(type="ResumeHuntCountSamples"))
    return Runner(
        model=Tiny(dropout), work_dir=str(work_dir), experiment_name=f"resume_hunt_{next(_names)}",
        train_dataloader=DataLoader(_data(), batch_size=4, shuffle=False),
        train_cfg=train_cfg,
        optim_wrapper=copy.deepcopy(optim_wrapper), param_scheduler=copy.deepcopy(scheduler),
        custom_hooks=copy.deepcopy(list(hooks)),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=ckpt_interval,
                                           by_epoch=False),
                           logger=dict(type="LoggerHook", interval=1000)),
        launcher="none", randomness=dict(seed=seed), log_level="ERROR", **kw)


def trained(runner):
    """Parameters, EMA tensors (MMEngine's EMAHook), optimizer state and the
    loss scaler of a finished run."""
    runner.train()
    out = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    for hook in runner.hooks:
        if type(hook).__name__ == "EMAHook":
            out.update({f"ema.{k}": v.clone() for k, v in hook.ema_model.state_dict().items()})
    sd = copy.deepcopy(runner.optim_wrapper.state_dict())
    for i, state in sd["state"].items():
        out.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    if "loss_scaler" in sd:
        out.update({f"scaler.{k}": torch.tensor(float(v)) for k, v in sd["loss_scaler"].items()})
    out["betas"] = torch.tensor(sd["param_groups"][0]["betas"], dtype=torch.float64)
    return out


def assert_same(a, b, tol=0.0):
    assert a.keys() == b.keys()
    if tol == 0.0:
        differ = [k for k in a if not torch.equal(a[k], b[k])]
    else:
        differ = [k for k in a if not torch.allclose(a[k].double(), b[k].double(),
                                                     rtol=tol, atol=tol)]
    assert not differ, differ


def wrapper(opt="ours", amp=False, clip=False, accu=3, beta1=0.0):
    """pygan_optim's wrapper with FusedAdam ("ours"), or with torch's Adam
    (fused or for-loop) inside: then it is MMEngine's wrapper, call for call
    (MMEngine's own AmpOptimWrapper refuses the CPU)."""
    optimizer = dict(type="FusedAdam", lr=1e-2, betas=(beta1, 0.99))
    if opt != "ours":
        optimizer = dict(type="Adam", lr=1e-2, betas=(beta1, 0.99), fused=opt == "torch_fused")
    if amp:
        cfg = dict(type="FusedAmpOptimWrapper", dtype="bfloat16", loss_scale="dynamic")
    else:
        cfg = dict(type="FusedOptimWrapper" if opt == "ours" else "OptimWrapper")
    cfg.update(optimizer=optimizer, accumulative_counts=accu)
    if clip:
        cfg["clip_grad"] = dict(max_norm=0.5)
    return cfg


# Bug: ExactResumeHook restored a single wrapper's _max_counts and
# _remainder_counts from the checkpoint, i.e. from the saving run's max_iters.
# A resume that trains longer (max_iters raised) then failed with MMEngine's
# "loss_factor should be larger than zero" (saved at a window's end of a run
# whose max_iters the window divided), or scaled the last windows' losses by
# the old remainder and stepped at the old max_iters, silently.
@pytest.mark.parametrize("first_max, k", [(6, 6), (8, 4)])
def test_exact_resume_into_a_longer_run_matches_the_straight_run(tmp_path, first_max, k):
    hooks = [dict(type="ExactResumeHook")]
    straight = trained(make_runner(tmp_path / "straight", wrapper(), 9, hooks=hooks))
    make_runner(tmp_path / "first", wrapper(), first_max, ckpt_interval=k, hooks=hooks).train()
    resumed = trained(make_runner(tmp_path / "second", wrapper(), 9, hooks=hooks,
                                  resume_from=tmp_path / "first" / f"iter_{k}.pth"))
    assert_same(straight, resumed)


def test_mmengine_alone_resumes_into_a_longer_run(tmp_path):
    """What the test above expects: MMEngine's own wrapper and torch's Adam,
    without the hook, resumed at a window's end into a longer run."""
    cfg = wrapper("torch")
    straight = trained(make_runner(tmp_path / "straight", cfg, 9))
    make_runner(tmp_path / "first", cfg, 6, ckpt_interval=6).train()
    resumed = trained(make_runner(tmp_path / "second", cfg, 9,
                                  resume_from=tmp_path / "first" / "iter_6.pth"))
    assert_same(straight, resumed)


# Bug: ExactResumeHook restored its state after any checkpoint load whose
# iteration matched the Runner's: load_from (no resume) of a checkpoint saved at
# iteration 0 brought back the old run's random state (overriding this run's
# seed) and counters, where the hook's docstring says load_from restores none.
def test_load_from_an_iteration_0_checkpoint_restores_nothing(tmp_path):
    cfg = wrapper(accu=1)
    first = make_runner(tmp_path / "first", cfg, 0, hooks=[dict(type="ExactResumeHook")],
                        dropout=0.5)
    first.train()
    first.save_checkpoint(str(tmp_path / "first"), "iter_0.pth")
    runs = [trained(make_runner(tmp_path / f"new{hook}", cfg, 3, seed=123, dropout=0.5,
                                hooks=[dict(type="ExactResumeHook")] if hook else [],
                                load_from=tmp_path / "first" / "iter_0.pth"))
            for hook in (False, True)]
    assert_same(*runs)


# Bug: validation inside training runs after the checkpoint of its iteration
# was saved, and draws from the global random state (the val dataloader's base
# seed, a GAN's noise); the resumed run does not validate there, so it trained
# on other random numbers (dropout here, BigGAN's noise and labels) than the
# uninterrupted run: the hook's exact resume failed whenever val_interval and
# the checkpoint interval met (as in MMagic's configs).
def test_exact_resume_after_a_validation_at_the_checkpoint(tmp_path):
    kw = dict(hooks=[dict(type="ExactResumeHook")], dropout=0.5, val_interval=4)
    straight = trained(make_runner(tmp_path / "straight", wrapper(accu=1), 8, **kw))
    make_runner(tmp_path / "first", wrapper(accu=1), 8, ckpt_interval=4, **kw).train()
    resumed = trained(make_runner(tmp_path / "second", wrapper(accu=1), 8,
                                  resume_from=tmp_path / "first" / "iter_4.pth", **kw))
    assert_same(straight, resumed)


# ------------------------------------------------------------ checked and held

SCHEDULER = [dict(type="LinearLR", start_factor=0.5, by_epoch=False, begin=0, end=6),
             # beta1 from 0 (grads kept as exp_avg) to 0.88 from iteration 4 on
             dict(type="CosineAnnealingMomentum", eta_min=0.9, by_epoch=False, begin=4, end=12)]
EMA = dict(type="EMAHook", ema_type="FusedExponentialMovingAverage", momentum=0.1, begin_iter=3)


@pytest.mark.usefixtures("keep_small_cpu_grads")
@pytest.mark.parametrize("amp, clip", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("k", [4, 5])  # 5: mid accumulation window
def test_exact_resume_is_bit_identical_and_follows_torch(tmp_path, amp, clip, k):
    """Kept grads, beta1 moved by MMEngine's MomentumScheduler, an lr scheduler,
    AMP (loss scaler state), clipping, ExactResumeHook mid-window and MMEngine's
    EMAHook with the fused EMA: the resumed run equals the straight one bit for
    bit, and both follow torch's fused Adam in MMEngine's path."""
    hooks = [dict(type="ExactResumeHook"), EMA]
    runs = {}
    for opt in ("ours", "torch_fused"):
        cfg = wrapper(opt, amp=amp, clip=clip)
        make_runner(tmp_path / opt / "first", cfg, 12, ckpt_interval=k, hooks=hooks,
                    scheduler=SCHEDULER).train()
        straight = trained(make_runner(tmp_path / opt / "straight", cfg, 12, hooks=hooks,
                                       scheduler=SCHEDULER))
        resumed = trained(make_runner(tmp_path / opt / "second", cfg, 12, hooks=hooks,
                                      scheduler=SCHEDULER,
                                      resume_from=tmp_path / opt / "first" / f"iter_{k}.pth"))
        assert_same(straight, resumed)
        runs[opt] = straight
    assert runs["ours"]["betas"][0] > 0.8
    # torch's scalar tails (1 ulp per step) and, under AMP, bf16 roundings they flip.
    assert_same(runs["ours"], runs["torch_fused"], tol=1e-3 if amp else 2e-5)


@pytest.mark.parametrize("source, target", [("torch", "ours"), ("torch_fused", "ours"),
                                            ("ours", "torch")])
@pytest.mark.parametrize("amp", [False, True])
def test_checkpoints_resume_across_implementations(tmp_path, source, target, amp):
    """A checkpoint of one implementation resumed with the other at a window's
    end follows the target's own straight run (loss scaler included)."""
    straight = trained(make_runner(tmp_path / "straight", wrapper(target, amp=amp, accu=2), 8,
                                   scheduler=SCHEDULER))
    make_runner(tmp_path / "first", wrapper(source, amp=amp, accu=2), 8, ckpt_interval=4,
                scheduler=SCHEDULER).train()
    resumed = trained(make_runner(tmp_path / "second", wrapper(target, amp=amp, accu=2), 8,
                                  scheduler=SCHEDULER,
                                  resume_from=tmp_path / "first" / "iter_4.pth"))
    assert_same(straight, resumed, tol=1e-3 if amp else 2e-5)


@pytest.mark.parametrize("begin, interval, k", [(3, 1, 6), (5, 2, 6), (0, 3, 4)])
def test_fused_ema_in_mmengines_ema_hook_across_a_resume(tmp_path, begin, interval, k):
    """MMEngine's EMAHook (begin_iter, interval) with the fused EMA against
    MMEngine's own ExponentialMovingAverage, straight and resumed."""
    runs = {}
    for ema_type in ("FusedExponentialMovingAverage", "ExponentialMovingAverage"):
        hooks = [dict(EMA, ema_type=ema_type, begin_iter=begin, interval=interval)]
        cfg = wrapper(accu=1)
        straight = trained(make_runner(tmp_path / ema_type / "straight", cfg, 10, hooks=hooks))
        make_runner(tmp_path / ema_type / "first", cfg, 10, ckpt_interval=k, hooks=hooks).train()
        resumed = trained(make_runner(tmp_path / ema_type / "second", cfg, 10, hooks=hooks,
                                      resume_from=tmp_path / ema_type / "first" / f"iter_{k}.pth"))
        assert_same(straight, resumed)
        runs[ema_type] = straight
    assert_same(runs["FusedExponentialMovingAverage"], runs["ExponentialMovingAverage"], tol=1e-6)


SHAPES = [(40000,), (64, 3), (7,), (5, 5), (1,)]  # the first is kept, the others packed


def _grads(i):
    g = torch.Generator().manual_seed(100 + i)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _steps(opt, params, start, stop):
    for i in range(start, stop):
        for p, g in zip(params, _grads(i)):
            p.grad = g
        opt.step_and_zero_grad()


@pytest.mark.usefixtures("keep_small_cpu_grads")
@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW])
@pytest.mark.parametrize("load", ["weights_only", "mmap", "rollback"])
def test_state_dict_round_trips(tmp_path, cls, load):
    """Packed and kept state through torch.save / torch.load(weights_only=True,
    mmap too), and loaded back into the same optimizer after more steps."""
    def fresh():
        g = torch.Generator().manual_seed(0)
        return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]

    kw = dict(lr=1e-2, betas=(0.0, 0.99), weight_decay=0.1)
    ref = fresh()
    _steps(cls(ref, **kw), ref, 0, 8)
    params = fresh()
    opt = cls(params, **kw)
    _steps(opt, params, 0, 4)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    if load == "rollback":
        saved = [p.detach().clone() for p in params]
        _steps(opt, params, 4, 6)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    else:
        opt = cls(params, **kw)
    opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True,
                                   mmap=load == "mmap"))
    _steps(opt, params, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(ref, params))


def test_pygan_optim_is_what_the_runner_built(tmp_path):
    runner = make_runner(tmp_path, wrapper(amp=True), 1)
    runner.train()
    assert isinstance(runner.optim_wrapper, pygan_optim.AmpOptimWrapper)
    assert isinstance(runner.optim_wrapper.optimizer, FusedAdam)
