"""pygan_optim inside a real MMagic 1.x install: MMEngine's Runner, default_scope='mmagic',
MMagic's own BigGAN, MultiOptimWrapperConstructor and ExponentialMovingAverage, on the CPU.

Skipped where MMagic is not installed (the project's CI does not install it).
``bash .ci/mmagic_check.sh`` builds a venv that runs it (mmcv-lite, no compiled mmcv ops,
PyPI's CUDA torchvision next to the CPU torch); stubs below make MMagic importable there:

- ``mmcv.ops`` (mmcv-lite has no ``mmcv._ext``): a module whose every name is a placeholder that
  raises when called or instantiated. MMagic's video and StyleGAN models import names from it at
  module level; BigGAN uses none of them.
- ``torchvision::nms``/``qnms`` op schemas (no kernels), defined only when torchvision fails to
  import because its compiled ops did not load: torchvision 0.28 then registers a fake
  implementation for an op that does not exist and its import fails. MMagic imports only
  torchvision's Python parts (make_grid, transforms, model definitions).
- an empty ``albumentations`` module when it is not installed (MMagic's datasets import it at
  module level and use it only inside two transforms that are not used here).

Each stub is installed only when the real import fails.
"""
import os
import sys
import types

import pytest
import torch

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # MMEngine < 1.0 with torch >= 2.6


def _install_stubs():
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _install_stubs.torchvision_lib = lib  # keep the definitions alive
    try:
        import mmcv.ops  # noqa: F401
    except ImportError:
        for k in [k for k in sys.modules if k.startswith("mmcv.ops")]:
            del sys.modules[k]

        def make(name):
            def unavailable(*args, **kwargs):
                raise RuntimeError(f"mmcv.ops.{name} is a test stub (mmcv-lite has no compiled ops)")
            if name[:1].isupper():
                return type(name, (torch.nn.Module,), {"__init__": unavailable})
            return unavailable

        class StubOps(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                value = make(name)
                setattr(self, name, value)
                return value

        ops = StubOps("mmcv.ops")
        ops.__path__ = []
        sys.modules["mmcv.ops"] = ops
        for sub in ("fused_bias_leakyrelu", "upfirdn2d"):
            module = StubOps("mmcv.ops." + sub)
            sys.modules["mmcv.ops." + sub] = module
            setattr(ops, sub, module)
        import mmcv
        mmcv.ops = ops
    try:
        import albumentations  # noqa: F401
    except ImportError:
        sys.modules["albumentations"] = types.ModuleType("albumentations")


try:
    import mmcv  # noqa: F401
    import mmagic  # noqa: F401
except ImportError:
    pytest.skip("MMagic (and mmcv) not installed", allow_module_level=True)
_install_stubs()
mmagic = pytest.importorskip("mmagic")
pytest.importorskip("mmagic.models")

import numpy as np  # noqa: E402
from mmengine.dataset import BaseDataset  # noqa: E402
from mmengine.registry import DATASETS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import pygan_optim  # noqa: E402,F401

pytestmark = pytest.mark.slow

NUM_CLASSES = 3
SIZE = 32


class _TinyGanData(BaseDataset):
    """Deterministic random 32x32 images with labels, as MMagic's CIFAR10 gives them (`gt`,
    `gt_label`), packed by MMagic's PackInputs."""

    def __init__(self, num_samples=16, **kwargs):
        self.num_samples = num_samples
        super().__init__(serialize_data=False, **kwargs)

    def load_data_list(self):
        g = np.random.RandomState(1234)
        return [dict(gt=g.randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
                     gt_label=int(g.randint(NUM_CLASSES)), sample_idx=i)
                for i in range(self.num_samples)]


DATASETS.register_module(name="TinyGanDataS38", module=_TinyGanData, force=True)


def make_cfg(work_dir, *, fused, max_iters, torch_adam=None, blend_hook=False, accum=1,
             disc_steps=1, ema_interval=1, ema_start=2, ckpt_interval=None, resume=False,
             exact_resume=False, ema_type=None, wrapper_type=None):
    """A tiny MMagic BigGAN config. fused=False: MMagic's names with torch's Adam
    (``torch_adam`` extra kwargs, e.g. dict(fused=True)); fused=True: the README's renames."""
    adam = dict(type="FusedAdam" if fused else "Adam", lr=2e-3, betas=(0.0, 0.999))
    if not fused and torch_adam:
        adam.update(torch_adam)
    wrapper = dict(type=wrapper_type or ("FusedOptimWrapper" if fused else "OptimWrapper"))
    optim_wrapper = dict(
        constructor="MultiOptimWrapperConstructor",
        generator=dict(wrapper, optimizer=dict(adam), accumulative_counts=accum),
        discriminator=dict(wrapper, optimizer=dict(adam, lr=4e-3), accumulative_counts=accum))
    ema_type = ema_type or ("FusedExponentialMovingAverage" if fused else "ExponentialMovingAverage")
    ema_config = dict(type=ema_type,
                      momentum=0.1, interval=ema_interval, start_iter=ema_start)
    hooks = []
    if blend_hook:
        hooks.append(dict(type="BlendEmaInStepHook"))
    if exact_resume:
        hooks.append(dict(type="ExactResumeHook"))
    cfg = dict(
        work_dir=str(work_dir),
        default_scope="mmagic",
        randomness=dict(seed=2022),
        model=dict(
            type="BigGAN", num_classes=NUM_CLASSES,
            data_preprocessor=dict(type="DataPreprocessor", output_channel_order="BGR"),
            generator=dict(type="BigGANGenerator", output_scale=SIZE, noise_size=16,
                           num_classes=NUM_CLASSES, base_channels=4, with_shared_embedding=False,
                           sn_eps=1e-8, sn_style="torch", split_noise=False, auto_sync_bn=False,
                           init_cfg=dict(type="N02")),
            discriminator=dict(type="BigGANDiscriminator", input_scale=SIZE,
                               num_classes=NUM_CLASSES, base_channels=4, sn_eps=1e-8,
                               sn_style="torch", with_spectral_norm=True,
                               init_cfg=dict(type="N02")),
            generator_steps=1, discriminator_steps=disc_steps, ema_config=ema_config),
        train_dataloader=dict(
            batch_size=4, num_workers=0,
            sampler=dict(type="DefaultSampler", shuffle=True),
            dataset=dict(type="TinyGanDataS38", num_samples=16, pipeline=[dict(type="PackInputs")])),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=optim_wrapper,
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=1000),
            checkpoint=dict(type="CheckpointHook", by_epoch=False,
                            interval=ckpt_interval or 10 ** 6, save_optimizer=True,
                            save_last=False)),
        custom_hooks=hooks,
        custom_imports=dict(imports=["pygan_optim"], allow_failed_imports=False) if fused else None,
        log_level="WARNING",
        resume=resume,
    )
    if cfg["custom_imports"] is None:
        del cfg["custom_imports"]
    return cfg


_count = [0]


def train(cfg):
    """Trains and returns (runner, weights): {'generator', 'discriminator', 'generator_ema'}
    state dicts (parameters and buffers) cloned after training."""
    from mmengine.config import Config
    _count[0] += 1
    runner = Runner.from_cfg(Config(dict(cfg, experiment_name=f"s38_{os.getpid()}_{_count[0]}")))
    runner.train()
    model = runner.model
    out = {name: {k: v.detach().clone() for k, v in getattr(model, name).state_dict().items()}
           for name in ("generator", "discriminator", "generator_ema")}
    return runner, out


def diff(a, b):
    """{part: (#tensors that differ, max abs diff, max ulps)} between two weight dicts."""
    res = {}
    for part in a:
        n, mx, ulps = 0, 0.0, 0
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            x, y = a[part][k], b[part][k]
            if torch.equal(x, y):
                continue
            n += 1
            if x.is_floating_point():
                mx = max(mx, (x - y).abs().max().item())
                xi = x.float().view(torch.int32).long()
                yi = y.float().view(torch.int32).long()
                ulps = max(ulps, (xi - yi).abs().max().item())
        res[part] = (n, mx, ulps)
    return res


def assert_same(a, b):
    d = diff(a, b)
    assert all(v[0] == 0 for v in d.values()), d


def _types(runner):
    wd = runner.optim_wrapper
    return (type(runner.model).__module__, type(wd["generator"]).__module__,
            type(wd["generator"].optimizer).__module__, type(runner.model.generator_ema).__module__)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_names_resolve_to_mmagic_and_ours(tmp_path):
    runner, _ = train(make_cfg(tmp_path / "a", fused=False, max_iters=1))
    model_mod, wrap_mod, opt_mod, ema_mod = _types(runner)
    assert model_mod.startswith("mmagic.") and wrap_mod.startswith("mmengine.")
    assert opt_mod.startswith("torch.") and ema_mod.startswith("mmagic.")
    runner, _ = train(make_cfg(tmp_path / "b", fused=True, max_iters=1))
    model_mod, wrap_mod, opt_mod, ema_mod = _types(runner)
    assert model_mod.startswith("mmagic.")  # BigGAN stays MMagic's
    assert wrap_mod.startswith("pygan_optim.") and opt_mod.startswith("pygan_optim.")
    assert ema_mod.startswith("pygan_optim.")


def test_fused_adam_equals_torch_fused_adam(tmp_path):
    """FusedAdam + FusedOptimWrapper + FusedExponentialMovingAverage against MMagic's config
    with torch's Adam(fused=True), MMEngine's OptimWrapper and MMagic's EMA, one iteration
    (a D update, then G's): bit for bit but torch's scalar tail (README), which here is the
    discriminator's 1-element ``decision.bias`` (1 ulp of its update). The generator's grads
    do not depend on that bias (it adds a constant to D's output), so G and its EMA must be
    the same bits. Later iterations are not compared bit for bit: the ulp changes which
    samples sit in the hinge loss's active region, and this BigGAN's BatchNorm-fed conv
    biases (rounding-noise grads that Adam scales to +-lr) then spread it, by amounts that
    depend on the machine's rounding."""
    _, torch_fused = train(make_cfg(tmp_path / "t", fused=False, torch_adam=dict(fused=True),
                                    max_iters=1))
    _, ours = train(make_cfg(tmp_path / "ours", fused=True, max_iters=1))
    assert_same({k: ours[k] for k in ("generator", "generator_ema")},
                {k: torch_fused[k] for k in ("generator", "generator_ema")})
    for k, x in ours["discriminator"].items():
        y = torch_fused["discriminator"][k]
        if not torch.equal(x, y):
            assert x.numel() < 16, k  # a scalar tail only (one thread: numel % 16 elements)
            # One ulp of an update of at most lr (at step 1 with beta1 = 0, |m| = sqrt(v) after
            # bias correction): lr * 2**-23 at most, plus the parameter's
            # own rounding, one ulp of it.
            lr = 4e-3  # the discriminator's (make_cfg)
            torch.testing.assert_close(x, y, rtol=2 ** -23, atol=lr * 2 ** -23)


@pytest.mark.parametrize("accum,disc_steps,iters,interval", [(1, 1, 6, 1), (1, 2, 8, 1),
                                                             (2, 2, 16, 1), (1, 1, 7, 2)])
def test_fused_ema_equals_mmagic_ema(tmp_path, accum, disc_steps, iters, interval):
    """Only the EMA class differs: FusedExponentialMovingAverage against MMagic's
    ExponentialMovingAverage (start_iter=2, so sync_parameters runs first), bit for bit."""
    kw = dict(fused=True, max_iters=iters, accum=accum, disc_steps=disc_steps,
              ema_interval=interval)
    runner, theirs = train(make_cfg(tmp_path / "m", ema_type="ExponentialMovingAverage", **kw))
    assert type(runner.model.generator_ema).__module__.startswith("mmagic.")
    _, ours = train(make_cfg(tmp_path / "f", **kw))
    assert_same(ours, theirs)


@pytest.mark.parametrize("accum,disc_steps,iters,interval", [(1, 1, 6, 1), (1, 2, 8, 1),
                                                             (2, 2, 16, 1), (1, 1, 7, 2)])
def test_blend_hook_same_bits(tmp_path, monkeypatch, accum, disc_steps, iters, interval):
    """custom_hooks=[dict(type='BlendEmaInStepHook')] on MMagic's BigGAN: the same bits as
    without it (README), and the EMA's own pass (ops.ema_) then blends nothing: the
    generator's last update of each phase did it."""
    kw = dict(max_iters=iters, accum=accum, disc_steps=disc_steps, ema_interval=interval)
    from pygan_optim import ops
    real_ema, blended = ops.ema_, []

    def spy(ema, params, *args, **kwargs):
        blended.append(len(ema))
        return real_ema(ema, params, *args, **kwargs)

    monkeypatch.setattr(ops, "ema_", spy)
    _, plain = train(make_cfg(tmp_path / "plain", fused=True, **kw))
    assert sum(blended) > 0
    blended.clear()
    runner, hooked = train(make_cfg(tmp_path / "hook", fused=True, blend_hook=True, **kw))
    assert blended == []
    assert runner.optim_wrapper["generator"]._ema is runner.model.generator_ema
    assert_same(hooked, plain)
    # the EMA really moved away from the generator
    gen, ema = hooked["generator"], hooked["generator_ema"]
    assert any(not torch.equal(ema["module." + k], v) for k, v in gen.items()
               if v.is_floating_point())


def test_blend_hook_refuses_mmagic_ema(tmp_path):
    cfg = make_cfg(tmp_path, fused=True, max_iters=1, blend_hook=True)
    cfg["model"]["ema_config"]["type"] = "ExponentialMovingAverage"
    with pytest.raises(ValueError, match="FusedExponentialMovingAverage"):
        train(cfg)


@pytest.mark.parametrize("blend_hook", [False, True])
@pytest.mark.parametrize("accum,disc_steps,iters,stop", [(1, 1, 8, 4), (2, 2, 16, 5)])
def test_resume_continues_exactly(tmp_path, blend_hook, accum, disc_steps, iters, stop):
    kw = dict(fused=True, accum=accum, disc_steps=disc_steps, blend_hook=blend_hook,
              exact_resume=True)
    _, whole = train(make_cfg(tmp_path / "whole", max_iters=iters, **kw))
    work = tmp_path / "parts"
    train(make_cfg(work, max_iters=stop, ckpt_interval=stop, **kw))
    assert (work / f"iter_{stop}.pth").exists()
    _, resumed = train(make_cfg(work, max_iters=iters, resume=True, **kw))
    assert_same(resumed, whole)


def test_resume_mmagic_checkpoint_with_fused_classes(tmp_path):
    """A checkpoint written by MMEngine's OptimWrapper and MMagic's ExponentialMovingAverage
    (FusedAdam inside, so the optimizer's rounding is the same), resumed with
    FusedOptimWrapper + FusedExponentialMovingAverage + BlendEmaInStepHook: the same bits as
    the fused setup trained without a stop. (A checkpoint of torch's Adam(fused=True) resumed
    with FusedAdam continues equally but for torch's scalar tails, which this BigGAN's
    BatchNorm-fed conv biases amplify: not checked bit for bit.)"""
    kw = dict(fused=True, exact_resume=True)
    _, whole = train(make_cfg(tmp_path / "whole", max_iters=8, blend_hook=True, **kw))
    work = tmp_path / "parts"
    train(make_cfg(work, max_iters=4, ckpt_interval=4, wrapper_type="OptimWrapper",
                   ema_type="ExponentialMovingAverage", **kw))
    runner, resumed = train(make_cfg(work, max_iters=8, resume=True, blend_hook=True, **kw))
    assert type(runner.model.generator_ema).__module__.startswith("pygan_optim.")
    assert_same(resumed, whole)
