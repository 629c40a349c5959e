"""Migration bugs found by a bug hunt (silent wrong answers and crashes), one test each.

The 0.x configs under tests/migrate_data/hunt/ are small fixtures written for these
tests, with the structure and values of MMGeneration 0.x's SNGAN and BigGAN configs.
"""
import os
from pathlib import Path

import pytest
from mmengine import Config

from pygan_optim import migrate_cli
from pygan_optim.migrate import MigrationError, convert, migrate, write

DATA = Path(__file__).parent / "migrate_data" / "hunt"


def _cfg(name):
    return str(DATA / f"{name}.py")


def _wrappers(optim_wrapper):
    return {k: v for k, v in optim_wrapper.items() if isinstance(v, dict) and "optimizer" in v}


def _schedulers(param_scheduler):
    if isinstance(param_scheduler, dict) and "type" not in param_scheduler:  # per wrapper
        return [s for v in param_scheduler.values() for s in (v if isinstance(v, list) else [v])]
    return param_scheduler if isinstance(param_scheduler, list) else [param_scheduler]


def _small_biggan(**net):
    """A 0.x BigGAN config dict whose two networks get the keys ``net``."""
    return dict(
        model=dict(type='BasiccGAN',
                   generator=dict(type='BigGANGenerator', output_scale=32, num_classes=10,
                                  **net),
                   discriminator=dict(type='BigGANDiscriminator', input_scale=32,
                                      num_classes=10, **net),
                   gan_loss=dict(type='GANLoss', gan_type='hinge')),
        optimizer=dict(generator=dict(type='Adam', lr=2e-4),
                       discriminator=dict(type='Adam', lr=2e-4)),
        total_iters=1000)


# ----------------------------------------------------------------------------- 1. fp16
def test_toplevel_fp16_is_not_converted_because_0x_ignored_it():
    # 0.x GAN training ignored a top-level fp16 (only runner.fp16_loss_scaler turned on
    # mixed precision), so its run was fp32 and the 1.x one must not become AmpOptimWrapper.
    r = migrate(_cfg("fp16_toplevel"))
    for key, w in _wrappers(r.config["optim_wrapper"]).items():
        assert "type" not in w and "loss_scale" not in w, f"{key}: {w}"
    assert [i.path for i in r.untranslated if i.path.startswith("fp16")] == ["fp16"]
    warned = [w for w in r.warnings if w.startswith("fp16=")]
    assert len(warned) == 1 and "0.x ignored" in warned[0] and "fp32" in warned[0]
    with pytest.raises(MigrationError, match="fp16="):
        migrate(_cfg("fp16_toplevel"), strict=True)
    # Next to runner.fp16_loss_scaler, the scaler is what 0.x used and what is converted.
    cfg = convert(dict(_small_biggan(), fp16=dict(loss_scale=512.),
                       runner=dict(fp16_loss_scaler=dict(init_scale=16.))))
    gen = cfg.config["optim_wrapper"]["generator"]
    assert gen["type"] == "AmpOptimWrapper" and gen["loss_scale"] == dict(init_scale=16.)
    assert any(w.startswith("fp16=") and "fp16_loss_scaler is converted" in w
               for w in cfg.warnings)


# ----------------------------------------------------------------------------- 2. Linear + lr_mult
def test_linear_lr_policy_warns_that_paramwise_lr_mult_is_lost():
    # LinearLrInterval writes one absolute lr into every param group of the wrapper; 0.x
    # decayed each group from its own lr, so the 0.1x 'embedding' group would jump to 1x.
    r = migrate(_cfg("linear_lr_mult"))
    assert any(s["type"] == "LinearLrInterval" for s in _schedulers(r.config["param_scheduler"]))
    warned = [w for w in r.warnings if "lr multipliers" in w]
    assert len(warned) == 1, r.warnings
    assert "optim_wrapper.generator.paramwise_cfg" in warned[0]
    assert "custom_keys['embedding'].lr_mult=0.1" in warned[0]
    assert "LinearLrInterval" in warned[0] and "iteration 50000" in warned[0]
    # Multipliers of 1 change nothing; a bias_lr_mult does, on a single wrapper too.
    cfg = _small_biggan()
    cfg["optimizer"]["discriminator"]["paramwise_cfg"] = dict(
        bias_lr_mult=2.0, custom_keys={'conv': dict(lr_mult=1.0, decay_mult=0.5)})
    cfg["lr_config"] = dict(policy='Linear', by_epoch=False, target_lr=0, start=500)
    r = convert(cfg)
    assert len(r.warnings) == 1, r.warnings
    assert "optim_wrapper.discriminator.paramwise_cfg lr multipliers (bias_lr_mult=2.0)" \
        in r.warnings[0]


# ----------------------------------------------------------------------------- 3. Linear + warm-up
def test_linear_lr_policy_warns_when_it_overwrites_the_warmup():
    # The absolute LinearLrInterval steps after the multiplicative warm-up every iteration,
    # so from its begin to the warm-up's end the warm-up has no effect.
    r = migrate(_cfg("linear_warmup"))
    assert [s["type"] for s in r.config["param_scheduler"]] == ["LinearLR", "LinearLrInterval"]
    warned = [w for w in r.warnings if "warm-up" in w]
    assert len(warned) == 1, r.warnings
    assert "warmup_iters=1000" in warned[0] and "overlaps the 'Linear' policy (start=0)" \
        in warned[0]
    # A Linear policy that starts after the warm-up ends does not overlap it.
    cfg = _small_biggan()
    cfg["lr_config"] = dict(policy='Linear', by_epoch=False, target_lr=0, start=100,
                            warmup='linear', warmup_iters=100)
    assert convert(cfg).warnings == []


# ----------------------------------------------------------------------------- 4. init_type
def test_biggan_init_type_becomes_init_cfg_and_builds():
    # MMagic's 1.x BigGAN networks take init_cfg only; pygan_optim's take both spellings.
    r = migrate(_cfg("biggan_n02"))
    for net in ("generator", "discriminator"):
        cfg = r.config["model"][net]
        assert "init_type" not in cfg and cfg["init_cfg"] == dict(type="N02"), cfg
    assert all("init" not in w for w in r.warnings)
    import pygan_optim  # noqa: F401  registers BigGAN and its networks
    from mmengine.registry import MODELS
    model = MODELS.build(r.config["model"])
    assert model.generator.init_cfg == dict(type="N02")


def test_init_type_next_to_init_cfg_or_pretrained():
    # A user's own init_cfg wins and the init_type is kept with a warning.
    r = convert(_small_biggan(init_type='N02', init_cfg=dict(type='xavier')))
    gen = r.config["model"]["generator"]
    assert gen["init_cfg"] == dict(type='xavier') and "init_type" not in gen
    assert any(w.startswith("model.generator: init_type='N02' not converted") and
               "init_cfg is already set" in w for w in r.warnings)
    assert "model.generator.init_type" in [i.path for i in r.untranslated]
    # 0.x loaded pretrained weights instead of initialising: init_type is dropped.
    r = convert(_small_biggan(init_type='N02', pretrained='g.pth'))
    gen = r.config["model"]["generator"]
    assert gen["init_cfg"] == dict(type='Pretrained', checkpoint='g.pth')
    assert "init_type" not in gen and r.warnings == []


# ----------------------------------------------------------------------------- 5. CLI -o
@pytest.mark.parametrize("where", ["a directory", "below a file"])
def test_cli_unwritable_output_is_a_one_line_error(tmp_path, capsys, where):
    if where == "a directory":
        out = tmp_path / "existing_dir"
        out.mkdir()
    else:
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "new.py"
    assert migrate_cli.main([_cfg("sngan_base"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {out}: " in err and "nothing written" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["existing_dir"] if where == "a directory" else ["a_file"])
    assert (not out.is_dir()) or list(out.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    # Written through a temporary file and renamed: a failure leaves the old file whole.
    r = migrate(_cfg("sngan_base"))
    out = tmp_path / "new.py"
    write(r, str(out))
    good = out.read_text()
    assert Config.fromfile(str(out)).model.type == "SNGAN"
    r.text += "\ud800"  # not encodable as UTF-8: fails while writing
    with pytest.raises(UnicodeEncodeError):
        write(r, str(out))
    assert out.read_text() == good
    assert os.listdir(tmp_path) == ["new.py"]


# ----------------------------------------------------------------------------- 6. custom_imports
def test_custom_imports_of_the_0x_project_are_not_imported():
    # The 0.x project's modules are not installed next to the 1.x stack; reading the
    # config must not import (run) them.
    r = migrate(_cfg("custom_imports"))
    assert r.config["model"]["type"] == "SNGAN"
    kept = [i for i in r.untranslated if i.path == "custom_imports"]
    assert kept and kept[0].value["imports"] == ["mmgen_0x_private_ext.hooks"]
    assert "not imported" in kept[0].reason


# ---- the channel order the 0.x model saw (session 30 hunt) ----

@pytest.mark.parametrize("loader, dataset, to_rgb, expected", [
    (dict(type="LoadImageFromFile"), "mmcls.ImageNet", False, "BGR"),  # BigGAN ImageNet
    (dict(type="LoadImageFromFile", key="real_img"), "UnconditionalImageDataset", True, "RGB"),
    (dict(type="LoadImageFromFile", channel_order="rgb"), "UnconditionalImageDataset", False,
     "RGB"),
    (None, "mmcls.CIFAR10", True, "BGR"),  # RGB arrays swapped, as MMagic's CIFAR configs say
    (None, "SomeDataset", True, None),  # no loader, unknown arrays: not written
])
def test_the_channel_order_the_0x_model_saw_is_written(tmp_path, loader, dataset, to_rgb,
                                                        expected):
    from pygan_optim.migrate import migrate as run_migrate

    pipeline = ([loader] if loader else []) + [
        dict(type="Normalize", keys=["img"], mean=[127.5] * 3, std=[127.5] * 3, to_rgb=to_rgb)]
    src = tmp_path / "cfg.py"
    dcgan = Path(__file__).parent / "migrate_data" / "families" / "dcgan.py"
    src.write_text(
        dcgan.read_text() +
        f"data = dict(train=dict(type='RepeatDataset', times=10, dataset=dict("
        f"type={dataset!r}, pipeline={pipeline!r})))\n")
    model = run_migrate(str(src)).config["model"]
    if expected is None:
        assert "output_channel_order" not in model["data_preprocessor"]
    else:
        assert model["data_preprocessor"]["output_channel_order"] == expected
