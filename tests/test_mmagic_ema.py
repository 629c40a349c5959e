"""pygan_optim's fused EMA inside MMagic 1.x: the name it is registered under, how
MMagic-style scoping resolves it, and the calls MMagic's BaseGAN makes.

MMagic itself is not installed here (it needs pinned mmcv ops), so the tests
build what it documents: a child of MMEngine's MODELS registry in scope
'mmagic' holding an ``ExponentialMovingAverage`` of its own, and, as the oracle
for the averaging, MMEngine's real ``BaseAveragedModel`` with MMagic's
``avg_func`` (``avg.mul_(1 - momentum).add_(src, alpha=momentum)``).
"""
import copy

import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseAveragedModel
from mmengine.registry import MODELS, DefaultScope, Registry

import pygan_optim  # noqa: F401  (registers FusedExponentialMovingAverage)
from pygan_optim.gan import FusedExponentialMovingAverage


class MMagicStyleEMA(BaseAveragedModel):
    """MMagic 1.x's documented EMA math on MMEngine's base class (the oracle)."""

    def __init__(self, model, momentum=0.0002, interval=1, device=None, update_buffers=False):
        super().__init__(model, interval, device, update_buffers)
        self.momentum = momentum

    def avg_func(self, averaged_param, source_param, steps):
        averaged_param.mul_(1 - self.momentum).add_(source_param, alpha=self.momentum)

    def sync_buffers(self, model):
        for a, b in zip(self.module.buffers(), model.buffers()):
            a.data.copy_(b.data)

    def sync_parameters(self, model):
        pairs = zip(list(self.module.parameters()) + list(self.module.buffers()),
                    list(model.parameters()) + list(model.buffers()))
        for a, b in pairs:
            a.data.copy_(b.data)


# What MMagic's registry does: a child of MMEngine's MODELS in its own scope.
MMAGIC_MODELS = Registry("model", parent=MODELS, scope="mmagic_like")
MMAGIC_MODELS.register_module(name="ExponentialMovingAverage", module=MMagicStyleEMA)


def generator():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def train_a_little(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    model(torch.randn(5, 8, generator=g))  # moves the BN statistics


def test_the_registered_name_resolves_to_ours_under_an_mmagic_style_scope():
    g = generator()
    with DefaultScope.overwrite_default_scope("mmagic_like"):
        ours = MMAGIC_MODELS.build(dict(type="FusedExponentialMovingAverage", momentum=0.01),
                                   default_args=dict(model=g))
        theirs = MMAGIC_MODELS.build(dict(type="ExponentialMovingAverage", momentum=0.01),
                                     default_args=dict(model=g))
    assert type(ours) is FusedExponentialMovingAverage
    assert type(theirs) is MMagicStyleEMA  # why the plain name cannot be ours there
    assert isinstance(ours, BaseAveragedModel)
    assert MODELS.get("FusedExponentialMovingAverage") is FusedExponentialMovingAverage


@pytest.mark.parametrize("update_buffers", [False, True])
@pytest.mark.parametrize("interval", [1, 3])
def test_base_gan_call_sequence_matches_mmagic(update_buffers, interval):
    """BaseGAN's calls per G phase: sync_parameters before ema_start, then
    update_parameters (+ sync_buffers when not update_buffers)."""
    model = generator()
    kw = dict(momentum=0.05, interval=interval, update_buffers=update_buffers)
    ours, ref = FusedExponentialMovingAverage(model, **kw), MMagicStyleEMA(model, **kw)
    ema_start = 2
    for phase in range(9):
        train_a_little(model, phase)
        for ema in (ours, ref):
            if phase + 1 >= ema_start:
                ema.update_parameters(model)
                if not ema.update_buffers:
                    ema.sync_buffers(model)
            else:
                ema.sync_parameters(model)
        assert int(ours.steps) == int(ref.steps)
        a, b = ours.state_dict(), ref.state_dict()
        assert list(a) == list(b)
        for key in b:
            # One rounding per element (FMA) where torch's mul_ then add_ rounds twice.
            torch.testing.assert_close(a[key], b[key], rtol=4e-7, atol=1e-7,
                                       msg=f"phase {phase}: {key}")


def test_state_dict_keys_and_mmagic_checkpoints_without_the_module_prefix():
    model = generator()
    ours = FusedExponentialMovingAverage(model, momentum=0.1)
    ours.update_parameters(model)
    ours.update_parameters(model)
    keys = list(ours.state_dict())
    assert "steps" in keys and "module.0.weight" in keys
    assert all(k == "steps" or k.startswith("module.") for k in keys)

    # An MMagic model's checkpoint, with the EMA's tensors saved without `module.`
    # and no `steps` (what MMagic's own loader accepts), inside a parent module.
    holder = nn.Module()
    holder.generator_ema = FusedExponentialMovingAverage(generator(), momentum=0.1)
    old_style = {"generator_ema." + k[len("module."):]: v.clone()
                 for k, v in ours.state_dict().items() if k != "steps"}
    holder.load_state_dict(old_style)
    for k, v in ours.state_dict().items():
        expected = torch.tensor(0) if k == "steps" else v
        assert torch.equal(holder.generator_ema.state_dict()[k], expected), k


def test_biggan_accepts_the_registered_name():
    from mmengine.config import Config

    cfg = Config.fromfile("configs/biggan_32x32_tiny.py")
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.ema_config["type"] = "FusedExponentialMovingAverage"
    model = MODELS.build(model_cfg)
    assert type(model.generator_ema) is FusedExponentialMovingAverage
