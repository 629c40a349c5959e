"""BlendEmaInStepHook: a model with MMagic's BaseGAN flow (no step_kwargs of its
own) gets its EMA blended in the generator's last update, in MMEngine's Runner,
with the same bits as the EMA's own pass; wrong setups are refused at start."""
import os

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS
from mmengine.runner import Runner

import pygan_optim  # noqa: F401  (registers everything)
from pygan_optim.gan import BigGAN, ExponentialMovingAverage

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class MMagicFlowGAN(BigGAN):
    """BigGAN's train_step without its own EmaBlend: MMagic's BaseGAN flow."""

    blends_ema_in_step = False


MODELS.register_module(name="MMagicFlowGAN", module=MMagicFlowGAN, force=True)


@pytest.fixture(autouse=True)
def _count_blends(monkeypatch):
    """Counts the parameters each update_parameters found blended by the step."""
    counts = []
    finish = ExponentialMovingAverage._finish_blend

    def counted(self, model, blend):
        counts.append(len(blend.done))
        return finish(self, model, blend)
    monkeypatch.setattr(ExponentialMovingAverage, "_finish_blend", counted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return counts


GENERATOR_PARAMS = [0]  # of the last model train() built


def train(tmp_path, model_type, hook, amp=False, **ema):
    cfg = Config.fromfile(os.path.join(CONFIGS, "biggan_32x32_tiny.py"))
    cfg.work_dir = str(tmp_path / f"{model_type}-{hook}-{amp}")
    cfg.default_hooks.logger.interval = 1000
    cfg.model.type = model_type
    cfg.model.ema_config.update(type="FusedExponentialMovingAverage", **ema)
    cfg.train_cfg.max_iters = 8
    if amp:
        for key in ("generator", "discriminator"):
            cfg.optim_wrapper[key].update(type="FusedAmpOptimWrapper", dtype="bfloat16")
    if hook:
        cfg.custom_hooks = list(cfg.get("custom_hooks", [])) + [dict(type="BlendEmaInStepHook")]
    runner = Runner.from_cfg(cfg)
    GENERATOR_PARAMS[:] = [len(list(runner.model.generator.parameters()))]
    runner.train()
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


@pytest.mark.parametrize("amp", [False, True])
def test_hook_blends_in_step_with_the_same_bits(tmp_path, _count_blends, amp):
    with_hook = train(tmp_path, "MMagicFlowGAN", hook=True, amp=amp)
    blended = list(_count_blends)
    _count_blends.clear()
    without = train(tmp_path, "MMagicFlowGAN", hook=False, amp=amp)
    assert not _count_blends  # no blend was handed out without the hook
    # 8 iterations, D accumulation 2: 4 G phases; the EMA starts at the 2nd
    # (start_iter 2) with a copy, so 2 blends, each of every generator parameter.
    assert blended == [GENERATOR_PARAMS[0]] * 2
    assert with_hook.keys() == without.keys()
    for key in with_hook:
        assert torch.equal(with_hook[key], without[key]), key


def test_pygan_biggan_blends_itself_and_the_hook_leaves_it(tmp_path, _count_blends):
    own = train(tmp_path, "BigGAN", hook=True)
    assert _count_blends == [GENERATOR_PARAMS[0]] * 2
    off = train(tmp_path, "BigGAN", hook=False, blend_in_step=False)
    for key in own:
        assert torch.equal(own[key], off[key]), key


def test_hook_refuses_a_setup_it_cannot_fuse(tmp_path):
    with pytest.raises(ValueError, match="no generator_ema"):
        cfg = Config.fromfile(os.path.join(CONFIGS, "biggan_32x32_tiny.py"))
        cfg.work_dir = str(tmp_path / "no-ema")
        cfg.model.type = "MMagicFlowGAN"
        cfg.model.ema_config = None
        cfg.custom_hooks = [dict(type="BlendEmaInStepHook")]
        cfg.train_cfg.max_iters = 2
        Runner.from_cfg(cfg).train()
    with pytest.raises(ValueError, match="FusedAdam"):
        cfg = Config.fromfile(os.path.join(CONFIGS, "biggan_32x32_tiny.py"))
        cfg.work_dir = str(tmp_path / "torch-adam")
        cfg.model.type = "MMagicFlowGAN"
        cfg.model.ema_config.type = "FusedExponentialMovingAverage"
        cfg.optim_wrapper.generator.optimizer.type = "Adam"
        cfg.custom_hooks = [dict(type="BlendEmaInStepHook")]
        cfg.train_cfg.max_iters = 2
        Runner.from_cfg(cfg).train()
