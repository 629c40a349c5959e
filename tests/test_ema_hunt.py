"""Bugs a hunt found in the generator EMA and ExactResumeHook: an fp32 average of a
bf16/fp16 generator (MMagic's mul_/add_ promote the source), the EMA's `interval`
checked at construction, and an exact resume when the data pipeline draws from
the global RNG in the main process."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import DATASETS, HOOKS, LOOPS, MODELS
from mmengine.runner import IterBasedTrainLoop, Runner

import pygan_optim  # noqa: F401  (registers everything)
from pygan_optim import FusedAdam
from pygan_optim.datasets import SyntheticImageDataset
from pygan_optim.gan import ExponentialMovingAverage

EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------- fp32 average, half-precision model
def _half_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).to(dtype)


def _oracle_blends(model, momentum, moves, update_buffers):
    """MMagic's EMA in float64: the first update copies, each later one does
    avg = (1 - m) * avg + m * src on every floating state_dict entry (the
    parameters only without update_buffers). Returns the averages and the
    largest magnitude any of them took."""
    keys = [k for k, v in model.state_dict().items() if v.is_floating_point()
            and (update_buffers or k in dict(model.named_parameters()))]
    avg, largest = None, 0.0
    for move in moves:
        move()
        src = {k: model.state_dict()[k].double() for k in keys}
        avg = ({k: v.clone() for k, v in src.items()} if avg is None else
               {k: (1 - momentum) * avg[k] + momentum * src[k] for k in keys})
        largest = max([largest] + [v.abs().max().item() for v in avg.values()])
    return avg, largest


def _moves(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)

    def move():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
            model.train()
            model(torch.randn(5, 4, generator=g).to(next(model.parameters()).dtype))
    return [move] * n


@pytest.mark.parametrize("update_buffers", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_average_of_a_half_precision_model(dtype, update_buffers):
    """ema.module.float() keeps the average in fp32 while the model trains in
    bf16/fp16; the old code refused the second update ('params[0] has dtype
    BFloat16 but ema[0] has dtype Float')."""
    model, momentum, n = _half_model(dtype), 0.25, 5
    ema = ExponentialMovingAverage(model, momentum=momentum, update_buffers=update_buffers)
    ema.module.float()
    moves = _moves(model, n)
    updates = [lambda: ema.update_parameters(model)] * n
    oracle, largest = _oracle_blends(model, momentum, [lambda m=m, u=u: (m(), u())
                                                       for m, u in zip(moves, updates)],
                                     update_buffers)
    # The half-precision sources are exact in fp32; each fp32 blend rounds at most
    # twice (avg * keep, then the sum), each error at most eps/2 of `largest`, and
    # (1 - m) < 1 does not grow earlier ones: n - 1 blends, 2 * eps/2 each.
    bound = (n - 1) * EPS32 * largest
    mine = ema.module.state_dict()
    for k, expected in oracle.items():
        assert mine[k].dtype == torch.float32, k
        diff = (mine[k].double() - expected).abs().max().item()
        assert diff <= bound, f"{k}: {diff:.3g} > {bound:.3g}"
    if not update_buffers:  # buffers are copied (widened, exactly)
        for (k, b), s in zip(ema.module.named_buffers(), model.buffers()):
            assert torch.equal(b, s.to(b.dtype)), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_avg_func_blends_a_half_precision_source_into_an_fp32_average(dtype):
    """BaseAveragedModel's per-tensor hook, as MMEngine's own update path calls it."""
    ema = ExponentialMovingAverage(nn.Linear(2, 2), momentum=0.25)
    g = torch.Generator().manual_seed(3)
    avg = torch.randn(64, generator=g)
    src = torch.randn(64, generator=g).to(dtype)
    expected = 0.75 * avg.double() + 0.25 * src.double()
    ema.avg_func(avg, src, steps=1)
    assert avg.dtype == torch.float32
    # One fp32 blend: two roundings of at most eps/2 of the largest value each.
    bound = EPS32 * max(avg.abs().max().item(), expected.abs().max().item())
    assert (avg.double() - expected).abs().max().item() <= bound


def test_a_pair_of_different_dtypes_is_left_to_update_parameters():
    """With blend_in_step, FusedAdam's step cannot blend a bf16 parameter into an
    fp32 average (its pass writes one dtype): the pair stays pending and
    update_parameters blends it from the widened source, the same bits as an EMA
    that never blends in the step."""
    model = _half_model(torch.bfloat16)
    fused = ExponentialMovingAverage(model, momentum=0.1)
    plain = ExponentialMovingAverage(model, momentum=0.1, blend_in_step=False)
    for ema in (fused, plain):
        ema.module.float()
    opt = FusedAdam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for it in range(4):
        model.zero_grad()
        x = torch.randn(8, 4, generator=g).to(torch.bfloat16)
        model.train()
        model(x).float().square().mean().backward()
        blend = fused.blend_in_step(model)
        assert (blend is None) == (it == 0)  # the first update copies
        assert plain.blend_in_step(model) is None
        opt.step(ema=blend)
        if blend is not None:
            assert not blend.done and len(blend.pending()) == len(list(model.parameters()))
        fused.update_parameters(model)
        plain.update_parameters(model)
    for (k, a), b in zip(fused.module.state_dict().items(), plain.module.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    # ...and it did average: the fp32 copy is not the model rounded up.
    w = next(fused.module.parameters())
    assert w.dtype == torch.float32 and not torch.equal(w, next(model.parameters()).float())


# ---------------------------------------------------------------------- interval
@pytest.mark.parametrize("interval", [0, -1, 1.5, 2.0, True, "2", None])
def test_an_interval_that_is_not_a_positive_integer_is_refused(interval):
    # 0 divided by zero at the 2nd update, -1 blended at every call, 1.5 every 3rd.
    with pytest.raises(ValueError, match="interval"):
        ExponentialMovingAverage(nn.Linear(2, 2), momentum=0.1, interval=interval)


@pytest.mark.parametrize("interval", [1, 3, np.int64(2)])
def test_a_positive_integer_interval_is_kept_as_an_int(interval):
    ema = ExponentialMovingAverage(nn.Linear(2, 2), momentum=0.1, interval=interval)
    assert ema.interval == int(interval) and type(ema.interval) is int


# ------------------------------------------------- resume with a random augmentation
NZ, NC = 8, 3


class _TinyG(nn.Module):
    def __init__(self, **unused):
        super().__init__()
        self.emb = nn.Embedding(NC, 4)
        self.fc = nn.Linear(NZ + 4, 12)
        self.out = nn.Linear(12, 12)

    def forward(self, z, label=None):
        h = torch.relu(self.fc(torch.cat([z, self.emb(label)], 1)))
        return torch.tanh(self.out(h)).view(-1, 3, 2, 2)


class _TinyD(nn.Module):
    def __init__(self, **unused):
        super().__init__()
        self.fc = nn.Linear(12, 8)
        self.out = nn.Linear(8, 1)
        self.proj = nn.Embedding(NC, 8)

    def forward(self, x, label=None):
        h = torch.relu(self.fc(x.flatten(1)))
        return self.out(h) + (self.proj(label) * h).sum(1, keepdim=True)


class _RandomFlipDataset(SyntheticImageDataset):
    """A random horizontal flip drawn from the global torch or numpy RNG, as an
    augmentation pipeline does in the main process with num_workers=0."""

    def __init__(self, rng="torch", **kwargs):
        super().__init__(**kwargs)
        self.rng = rng

    def __getitem__(self, index):
        item = super().__getitem__(index)
        coin = float(torch.rand(())) if self.rng == "torch" else float(np.random.rand())
        if coin < 0.5:
            item["inputs"]["img"] = item["inputs"]["img"].flip(-1)
        return item


DATASETS.register_module(name="EmaHuntRandomFlipDataset", module=_RandomFlipDataset, force=True)
MODELS.register_module(name="EmaHuntTinyG", module=_TinyG, force=True)
MODELS.register_module(name="EmaHuntTinyD", module=_TinyD, force=True)


class _NoSkipLoop(IterBasedTrainLoop):
    """An iteration loop of its own that resumes without re-reading the batches
    trained before the checkpoint."""

    def run(self):
        self.runner.call_hook("before_train")
        self.runner.call_hook("before_train_epoch")
        while self._iter < self._max_iters:
            self.runner.model.train()
            self.run_iter(next(self.dataloader_iterator))
        self.runner.call_hook("after_train_epoch")
        self.runner.call_hook("after_train")
        return self.runner.model


class _RngAtFirstIter(Hook):
    """Records the torch random state seen by the first before_train_iter,
    after ExactResumeHook's (it runs later: lower priority)."""
    priority = "LOWEST"
    seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if not _RngAtFirstIter.seen:
            _RngAtFirstIter.seen.append(torch.get_rng_state())


LOOPS.register_module(name="EmaHuntNoSkipLoop", module=_NoSkipLoop, force=True)
HOOKS.register_module(name="EmaHuntRngAtFirstIter", module=_RngAtFirstIter, force=True)


def _cfg(work_dir, max_iters, rng, ckpt_interval=1000, hook=True):
    def wrapper():
        return dict(type="FusedOptimWrapper", accumulative_counts=2,
                    optimizer=dict(type="FusedAdam", lr=1e-2, betas=(0.0, 0.999)))
    return Config(dict(
        model=dict(type="BigGAN", noise_size=NZ, num_classes=NC,
                   generator=dict(type="EmaHuntTinyG"), discriminator=dict(type="EmaHuntTinyD"),
                   ema_config=dict(momentum=0.3, interval=1)),
        optim_wrapper=dict(constructor="MultiOptimWrapperConstructor",
                           generator=wrapper(), discriminator=wrapper()),
        train_dataloader=dict(batch_size=4, num_workers=0,
                              sampler=dict(type="InfiniteSampler", shuffle=True),
                              dataset=dict(type="EmaHuntRandomFlipDataset", rng=rng,
                                           num_samples=16, img_size=2, num_classes=NC)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=ckpt_interval,
                                           by_epoch=False),
                           logger=dict(type="LoggerHook", interval=1000)),
        custom_hooks=[dict(type="ExactResumeHook")] if hook else [],
        randomness=dict(seed=0), work_dir=str(work_dir), log_level="WARNING"))


def _train(cfg, resume_from=None):
    if resume_from is not None:
        cfg.resume, cfg.load_from = True, str(resume_from)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


def _state(runner):
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


def _assert_same(straight, resumed):
    differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not differ, f"{len(differ)} of {len(straight)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("rng", ["torch", "numpy"])
def test_resume_is_exact_with_a_random_augmentation_in_the_main_process(tmp_path, monkeypatch,
                                                                         rng):
    """Resumed at 5 (mid accumulation window, accu 2), the run ends where an
    uninterrupted one does. The old hook restored the random state after the
    loop had fetched the first resumed batch, from a state saved before the
    uninterrupted run fetched it: other flips and other noise."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    straight = _state(_train(_cfg(tmp_path / "straight", 8, rng)))
    _train(_cfg(tmp_path / "resumed", 5, rng, ckpt_interval=5))
    resumed = _train(_cfg(tmp_path / "resumed", 8, rng), tmp_path / "resumed" / "iter_5.pth")
    _assert_same(straight, _state(resumed))
    # The hook's stand-in iterator restored the state and gave the loop its own back.
    assert type(resumed.train_loop.dataloader_iterator).__name__ == "_InfiniteDataloaderIterator"


def test_resume_at_iteration_0_is_exact(tmp_path, monkeypatch):
    """A checkpoint saved before any iteration: nothing to skip, the state is
    restored before the very first fetch."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    straight = _state(_train(_cfg(tmp_path / "straight", 3, "torch")))
    first = _train(_cfg(tmp_path / "resumed", 0, "torch"))
    first.save_checkpoint(str(tmp_path / "resumed"), "iter_0.pth")
    resumed = _train(_cfg(tmp_path / "resumed", 3, "torch"), tmp_path / "resumed" / "iter_0.pth")
    _assert_same(straight, _state(resumed))


def test_without_the_hook_the_augmented_resume_differs(tmp_path, monkeypatch):
    """Why the test above can fail: MMEngine alone does not restore the random
    state, so the same resume draws other flips and other noise."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    straight = _state(_train(_cfg(tmp_path / "straight", 8, "torch", hook=False)))
    _train(_cfg(tmp_path / "resumed", 5, "torch", ckpt_interval=5, hook=False))
    resumed = _state(_train(_cfg(tmp_path / "resumed", 8, "torch", hook=False),
                            tmp_path / "resumed" / "iter_5.pth"))
    assert any(not torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_loop_that_skips_otherwise_gets_the_random_state_at_the_first_iteration(
        tmp_path, monkeypatch):
    """The restore before the first new fetch relies on IterBasedTrainLoop.run's
    skipping; a loop with a run of its own (here: no skipping) gets the saved
    state at its first iteration instead, never later in the middle of training
    (counting its first batches as skipped ones would have rewound it there)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _train(_cfg(tmp_path, 5, "torch", ckpt_interval=5))
    cfg = _cfg(tmp_path, 8, "torch")
    cfg.train_cfg = dict(type="EmaHuntNoSkipLoop", max_iters=8)
    cfg.custom_hooks.append(dict(type="EmaHuntRngAtFirstIter"))
    _RngAtFirstIter.seen.clear()
    _train(cfg, tmp_path / "iter_5.pth")
    saved = torch.load(tmp_path / "iter_5.pth", weights_only=False)["pygan_optim"]["rng"]["torch"]
    assert torch.equal(_RngAtFirstIter.seen[0], saved)
