"""Review of session 38's changes (5d38452..HEAD): each test showed one bug,
fixed since, but the last, which pins a documented behaviour.

Oracles: mmedit/mmgen 0.x's RescaleToZeroOne + mmcv's imnormalize for the
migrated pixels; MMEngine's ExponentialMovingAverage and the ops' own
``real_number`` for text EMA weights; the eager step's undo of its state edits
for a refused step (compiled, Dynamo's side of it is torch's).
"""
import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

import pygan_optim  # noqa: F401  (registers everything)
from pygan_optim import EmaBlend, FusedAdam
from pygan_optim.gan.ema import ExponentialMovingAverage
from pygan_optim.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
DCGAN = ROOT / "tests" / "migrate_data" / "families" / "dcgan.py"


# --- migrate: RescaleToZeroOne before Normalize -------------------------------

def test_normalize_after_rescale_to_zero_one_gives_the_0x_pixels(tmp_path):
    """MMGeneration 0.x's pix2pix/CycleGAN pipelines (from mmedit) run
    RescaleToZeroOne (img / 255 in float32) before Normalize(mean=0.5, std=0.5):
    the model saw (img / 255 - 0.5) / 0.5, i.e. [-1, 1]. migrate copies
    mean=[0.5]*3, std=[0.5]*3 into the 1.x data_preprocessor, which gets uint8
    pixels (0..255), so the migrated model trains on (img - 0.5) / 0.5, up to
    509. Right: the preprocessor must give 0.x's pixels (here the 1.x default
    127.5/127.5, or mean/std scaled by 255), or leave the default with a note."""
    loader = dict(type="LoadImageFromFile", key="real_img")
    pipeline = [loader, dict(type="RescaleToZeroOne", keys=["real_img"]),
                dict(type="Normalize", keys=["real_img"], mean=[0.5] * 3, std=[0.5] * 3,
                     to_rgb=True)]
    src = tmp_path / "cfg.py"
    src.write_text(DCGAN.read_text() + f"data = dict(train=dict(type='UnconditionalImageDataset', "
                                       f"pipeline={pipeline!r}))\n")
    cfg = migrate(str(src)).config["model"]["data_preprocessor"]

    rng = np.random.default_rng(0)
    bgr_hwc = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)  # as cv2 loads a file
    old = bgr_hwc[..., ::-1].astype(np.float32) / 255.0  # to_rgb, then RescaleToZeroOne
    old = (old - np.float32(0.5)) / np.float32(0.5)

    from mmengine.registry import MODELS
    preprocessor = MODELS.build(cfg)
    img = torch.from_numpy(np.ascontiguousarray(bgr_hwc.transpose(2, 0, 1)))
    new = preprocessor(dict(inputs=dict(img=[img])))["inputs"]["img"][0]
    np.testing.assert_allclose(new.numpy(), old.transpose(2, 0, 1), atol=1e-5)


# --- BigGAN: a refused batch counts as a train_step ---------------------------

def test_refused_labels_do_not_advance_the_train_step_count(tmp_path):
    """train_step increments self._calls (its D/G schedule counter without a
    Runner) before _check_labels refuses the batch, so a refused batch that
    changed nothing else still shifts the schedule (with discriminator_steps=2
    the generator then steps one batch early). Right: a refused call changes no
    state; the check belongs before the count."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS

    cfg = Config.fromfile(os.path.join(ROOT, "configs", "biggan_32x32_tiny.py"))
    cfg.work_dir = str(tmp_path)
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    calls = model._calls
    bad = dict(inputs=dict(img=torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
               data_samples=dict(gt_label=[0, model.num_classes]))
    with pytest.raises(ValueError, match="outside the model's num_classes"):
        model.train_step(bad, wrapper)
    assert model._calls == calls


# --- text EMA weights ---------------------------------------------------------

def test_ema_blend_refuses_text_momentum():
    """EmaBlend runs float(momentum): EmaBlend(pairs, "0.5") (and new_weight
    "0.5") is accepted and blended in FusedAdam.step(ema=...), while
    ops.ema_(..., "0.5") and ops.adam_step_(ema_momentum="0.5") now refuse text
    (session 38's real_number). Right: a TypeError naming momentum/new_weight."""
    p, avg = nn.Parameter(torch.ones(64)), torch.zeros(64)
    with pytest.raises(TypeError, match="momentum"):
        EmaBlend([(p, avg)], "0.5")
    with pytest.raises(TypeError, match="new_weight"):
        EmaBlend([(p, avg)], 0.5, "0.5")


def test_fused_ema_refuses_text_momentum_set_after_construction():
    """FusedExponentialMovingAverage._weights runs float(self.momentum): a
    momentum written as "0.5" after construction blends with 0.5, where
    MMEngine's (and MMagic's) ExponentialMovingAverage raise a TypeError.
    Right: a TypeError, nothing blended."""
    from mmengine.model import ExponentialMovingAverage as MMEngineEMA

    model = nn.Linear(4, 4)
    theirs = MMEngineEMA(model, momentum=0.1)
    theirs.update_parameters(model)
    theirs.momentum = "0.5"
    with pytest.raises(TypeError):
        theirs.update_parameters(model)

    ours = ExponentialMovingAverage(model, momentum=0.1)
    ours.update_parameters(model)  # the first update copies
    ours.momentum = "0.5"
    with torch.no_grad():
        for q in model.parameters():
            q.add_(1.0)
    before = copy.deepcopy(ours.module.state_dict())
    with pytest.raises(TypeError):
        ours.update_parameters(model)
    for key, value in before.items():
        assert torch.equal(ours.module.state_dict()[key], value), key


# --- a refused step and a half step, eager and compiled -------------------------

def test_refused_step_and_a_half_step_eager_and_compiled():
    """A float16 step (an edit of the state) is read as float32 since session 38.
    Eager, a step refused afterwards undoes that: the state keeps the user's
    tensor. Compiled, Dynamo runs _init_group while tracing, outside the step's
    undo, as it leaves a refused first step's fresh state (torch's Adam too;
    NOTES, "Bug hunts (session 32)"): the state then holds the same count as a
    float32 tensor, which later steps read alike."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(64, generator=g)) for _ in range(2)]
    for compiled in (False, True):
        opt = FusedAdam([{"params": params[:1]}, {"params": params[1:]}], lr=0.01)
        for p in params:
            p.grad = torch.ones(64)
        opt.step()
        half = opt.state[params[0]]["step"].half()
        opt.state[params[0]]["step"] = half
        opt.param_groups[1]["lr"] = -1.0  # refused by the op, at run time
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        with pytest.raises(ValueError, match="invalid learning rate"):
            step()
        now = opt.state[params[0]]["step"]
        if compiled:
            assert now.dtype == torch.float32 and float(now) == 1.0
        else:
            assert now is half
    torch._dynamo.reset()
