"""Review of session 40's fixes (git diff bf533d0 -- pygan_optim README.md).

Each finding has a minimal reproducer (all fixed in session 40; a comment above each
test says what was wrong). The plain tests at the end are paths the brief
asked about that were checked and hold (kept so that a later change does not undo them).
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pygan_optim import migrate_cli
from pygan_optim.gan.ema import ExponentialMovingAverage
from pygan_optim.migrate import migrate
from pygan_optim.optim import FusedAdam
from pygan_optim.wrappers import fused_step

DATA = Path(__file__).parent / "migrate_data"
SNGAN = DATA / "hunt" / "sngan_base.py"
STYLEGAN3 = DATA / "families" / "stylegan3.py"


def _run(argv):
    """(exit code, stderr) of the migrate CLI in-process; argparse's usage errors are 2,
    any other SystemExit escaping main is returned as ('escaped', code)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = migrate_cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = 2 if e.code == 2 and err.getvalue().startswith("usage:") else ("escaped", e.code)
    return rc, err.getvalue()


# ------------------------------------------------------------------ migrate: -o over a base
# migrate_cli._usage / reader.config_files: the _base_ list is read from the raw file, but
# MMEngine substitutes {{ fileDirname }} (and {{ $ENV:default }}) before it reads _base_:
# such a base is not listed, and -o naming it overwrites the 0.x base file (exit 0).
# Fixed in session 40, was: config_files reads _base_ before MMEngine's predefined/env-
# variable substitution: a '{{ fileDirname }}/base.py' base is not seen, and -o overwrites
# it
@pytest.mark.parametrize("base_ref", ["{{ fileDirname }}/base.py",
                                      "{{ $PYGAN_REVIEW_UNSET_VAR:base.py }}"])
def test_output_over_a_substituted_base_path_is_refused(tmp_path, base_ref, monkeypatch):
    monkeypatch.delenv("PYGAN_REVIEW_UNSET_VAR", raising=False)  # its default base.py is used
    base = tmp_path / "base.py"
    base.write_text(SNGAN.read_text(encoding="utf-8"), encoding="utf-8")
    child = tmp_path / "child.py"
    child.write_text(f"_base_ = ['{base_ref}']\ntotal_iters = 2000\n", encoding="utf-8")
    before = base.read_bytes()
    rc, err = _run([child, "-o", base])
    assert base.read_bytes() == before, "the 0.x _base_ file was overwritten"
    assert rc == 2, err


# --------------------------------------------------------- migrate: rampup EMA momentum check
# hooks._convert_ema: the new (0, 1) momentum check runs for momentum_policy='rampup' too,
# where 0.x replaced interp_cfg.momentum by the ramp every iteration (mmgen's
# after_train_iter: _interp_cfg.update(self.momentum_updater(...))) and the old code
# wrote RampUpEMA regardless. Now the EMA is dropped with a warning about a value 0.x
# never used.
# Fixed in session 40, was: the momentum range check also refuses a rampup EMA, whose
# interp_cfg.momentum 0.x overwrote with the ramp (regression: bf533d0 wrote RampUpEMA)
def test_rampup_ema_ignores_the_unused_interp_cfg_momentum(tmp_path):
    inp = tmp_path / "old.py"
    inp.write_text(
        f"_base_ = [{str(STYLEGAN3)!r}]\n"
        "custom_hooks = [dict(type='ExponentialMovingAverageHook', "
        "module_keys=('generator_ema',), interp_mode='lerp', interval=1, start_iter=0, "
        "momentum_policy='rampup', momentum_cfg=dict(ema_kimg=10, ema_rampup=0.05, "
        "batch_size=32, eps=1e-8), interp_cfg=dict(momentum=1.0), priority='VERY_HIGH')]\n",
        encoding="utf-8")
    r = migrate(str(inp))
    assert r.config["model"].get("ema_config", {}).get("type") == "RampUpEMA", r.warnings


# ------------------------------------------------ migrate: addresses in warnings and notes
# output._fmt_scalar strips ' at 0x...' from kept values, but warnings and notes (written
# into NEW.py as comments) format values with !r themselves: the same input still gives
# different bytes from run to run.
# Fixed in session 40, was: warnings/notes are rendered into the output with the raw repr
# (memory address) of the value
def test_output_is_deterministic_with_a_lambda_in_a_warning(tmp_path):
    inp = tmp_path / "old.py"
    inp.write_text(SNGAN.read_text(encoding="utf-8")
                   + "train_cfg = dict(disc_steps=1, pick=lambda it: it % 2)\n",
                   encoding="utf-8")
    assert migrate(str(inp)).text == migrate(str(inp)).text


# ------------------------------------------------------ migrate: numpy arrays (not scalars)
# common.plain turns numpy scalars into Python numbers, but a numpy array (now reachable:
# configs run with lazy_import=False) in a translated value is written as `array([...])`
# and the self-check blames the tool ("internal: ... NameError: name 'array'").
# Fixed in session 40, was: plain() converts numpy scalars only: an ndarray in a
# translated value fails the self-check as an 'internal' error
def test_a_numpy_array_in_a_translated_value(tmp_path):
    inp = tmp_path / "old.py"
    inp.write_text(SNGAN.read_text(encoding="utf-8") + (
        "import numpy as np\n"
        "optimizer['generator']['betas'] = np.array([0.5, 0.999])\n"), encoding="utf-8")
    rc, err = _run([inp, "-o", tmp_path / "new.py"])
    assert "internal" not in err, err


# ----------------------------------------------- migrate: model.train_cfg named as train_cfg
# core._effective_train_cfg hands model.train_cfg to translate_train_cfg, whose errors,
# warnings and kept comments all say 'train_cfg.<key>': with train_cfg = None at the top
# level, the user is pointed at the wrong dict.
# Fixed in session 40, was: errors/warnings about model.train_cfg's keys name the top-
# level train_cfg
def test_model_train_cfg_errors_name_the_model_dict(tmp_path):
    inp = tmp_path / "old.py"
    inp.write_text(f"_base_ = [{str(SNGAN)!r}]\ntrain_cfg = None\n"
                   "model = dict(train_cfg=dict(disc_steps=0))\n", encoding="utf-8")
    rc, err = _run([inp, "-o", tmp_path / "new.py"])
    assert rc == 1
    assert "model.train_cfg.disc_steps" in err, err


# ------------------------------------------- migrate --checkpoint: a meta.config that exits
# The sys.exit() fix covers `migrate OLD.py` only: checkpoint/target._config_from_meta
# runs meta['config'] through read_config under `except Exception`, so SystemExit escapes
# `migrate --checkpoint` (exit 0, no message, nothing written).
# Fixed in session 40, was: SystemExit from meta.config escapes the checkpoint path (only
# the config path catches it)
def test_checkpoint_whose_meta_config_exits(tmp_path):
    groups = [dict(params=[0], lr=1e-3)]
    path = tmp_path / "old.pth"
    torch.save(dict(meta=dict(config="import sys\nsys.exit(0)\n", iter=1),
                    state_dict={"generator.w": torch.ones(1), "discriminator.w": torch.ones(1)},
                    optimizer={n: dict(state={}, param_groups=copy.deepcopy(groups))
                               for n in ("generator", "discriminator")}), str(path))
    rc, err = _run(["--checkpoint", path, "-o", tmp_path / "new.pth"])
    assert isinstance(rc, int), (rc, err)


# ------------------------------------------------- FusedAdam: found_inf=0 via step_options
# FusedAdam._found_inf reads any int 0 as GradScaler's sum([]): an int handed to
# step_options (documented as a one-element tensor) with a grad present is refused with a
# message about GradScaler and unscale_, which the caller never used.
# Fixed in session 40, was: step_options(found_inf=0) is taken for GradScaler's int and
# refused with a misleading GradScaler/unscale_ message
def test_step_options_found_inf_int_is_refused_as_not_a_tensor():
    p = nn.Parameter(torch.ones(16))
    p.grad = torch.ones(16)
    opt = FusedAdam([p])
    with pytest.raises(TypeError, match="found_inf must be a one-element tensor or None"):
        with opt.step_options(found_inf=0):
            opt.step()


# ------------------------------------------- fused_step.NoGradsToUnscale carries no message
# Fixed in session 40, was: NoGradsToUnscale is raised bare: a caller of fused_step.step
# other than AmpOptimWrapper sees an empty message
def test_no_grads_to_unscale_says_what_happened():
    opt = FusedAdam(nn.Linear(3, 3).parameters())
    with pytest.raises(fused_step.NoGradsToUnscale) as info:
        fused_step.step(opt, max_norm=None, loss_scale=torch.tensor(256.0), zero_grads=False,
                        log_norm=lambda norm: None, step_kwargs={})
    assert str(info.value)


# =========================================================== checked, and they hold
def test_narrow_ema_blended_through_blend_in_step_equals_mmagic():
    """An fp32 EMA of an fp64 model, with the in-step blend handed to FusedAdam: the
    narrower averages stay pending and take the two-op path (MMagic's bits)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32)).double()
    ema = ExponentialMovingAverage(model, momentum=0.1, update_buffers=True)
    ema.module.float()
    ref = copy.deepcopy(ema.module)
    opt = FusedAdam(model.parameters(), lr=1e-2)
    ema.update_parameters(model)
    with torch.no_grad():
        for r, s in zip(ref.state_dict().values(), model.state_dict().values()):
            r.copy_(s)
    for _ in range(3):
        model(torch.randn(8, 32, dtype=torch.float64)).square().sum().backward()
        opt.step(ema=ema.blend_in_step(model))
        opt.zero_grad()
        ema.update_parameters(model)
        with torch.no_grad():
            for r, s in zip(ref.state_dict().values(), model.state_dict().values()):
                if r.is_floating_point():
                    r.mul_(1 - 0.1).add_(s, alpha=0.1)
        for (name, r), a in zip(ref.state_dict().items(), ema.module.state_dict().values()):
            assert torch.equal(r, a), name


def test_compiled_step_after_an_empty_unscale_steps_nothing():
    """GradScaler's int found_inf on the torch.compile'd step (the traced path also goes
    through _step_extra): nothing changes, as in eager."""
    torch._dynamo.reset()
    try:
        p = nn.Parameter(torch.ones(16))
        opt = FusedAdam([p])
        opt.step = torch.compile(opt.step, backend="aot_eager")
        scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
        scaler.scale((p * torch.arange(16.0)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        before = p.detach().clone()
        state = {k: v.clone() for k, v in opt.state[p].items()}
        scaler.unscale_(opt)
        scaler.step(opt)
        assert torch.equal(p.detach(), before)
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v), k
    finally:
        torch._dynamo.reset()


def test_model_train_cfg_none_wins_over_the_top_level_one(tmp_path):
    """mmcv's build_from_cfg only setdefault()s the top-level train_cfg: an explicit
    model.train_cfg=None is what the 0.x model got (disc_steps 1)."""
    inp = tmp_path / "old.py"
    inp.write_text(f"_base_ = [{str(SNGAN)!r}]\ntrain_cfg = dict(disc_steps=5)\n"
                   "model = dict(train_cfg=None)\n", encoding="utf-8")
    r = migrate(str(inp))
    assert r.config["model"].get("discriminator_steps", 1) == 1
    assert any("model.train_cfg=None" in n for n in r.notes), r.notes


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_output_through_a_symlink_or_relative_path_to_a_base_is_refused(tmp_path,
                                                                        monkeypatch):
    (tmp_path / "cfgs").mkdir()
    base = tmp_path / "cfgs" / "base.py"
    base.write_text(SNGAN.read_text(encoding="utf-8"), encoding="utf-8")
    child = tmp_path / "cfgs" / "child.py"
    child.write_text("_base_ = ['./base.py']\ntotal_iters = 2000\n", encoding="utf-8")
    link = tmp_path / "link.py"
    link.symlink_to(base)
    before = base.read_bytes()
    monkeypatch.chdir(tmp_path)
    for target in (link, "cfgs/../cfgs/base.py"):
        rc, err = _run([child, "-o", target])
        assert rc == 2 and "_base_ file" in err, err
    assert base.read_bytes() == before
