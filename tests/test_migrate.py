"""MMGeneration 0.x -> MMEngine 1.x config migration (pygan_optim.migrate / migrate_cli).

The 0.x configs under tests/migrate_data/ are small fixtures written for these
tests, modelled on the structure of MMGeneration's BigGAN / SNGAN configs.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.nn as nn
from mmengine import Config

from pygan_optim import migrate_cli
from pygan_optim.migrate import MigrationError, convert, migrate, write

DATA = Path(__file__).parent / "migrate_data"
BIGGAN128 = DATA / "biggan128" / "biggan_ajbrock-sn_128x128_b32x8_1500k.py"
FIXTURES = [BIGGAN128, DATA / "disc_not_divisible.py",
            DATA / "ema_hook.py", DATA / "lr_config.py", DATA / "fp16.py"]

# The 1.x target for BigGAN-128 is the config this project ships (the seed's 1.x example);
# its model and optim_wrapper are what the 0.x example must convert to exactly.
_SHIPPED = Config.fromfile(str(Path(__file__).parent.parent / "configs" / "biggan_128x128.py"))
EXPECTED_MODEL = _SHIPPED.model.to_dict()
# The shipped config leaves the order at None, which is BGR too; the migration says it
# (its 0.x pipeline loads BGR and normalises with to_rgb=False).
EXPECTED_MODEL["data_preprocessor"] = dict(EXPECTED_MODEL["data_preprocessor"],
                                           output_channel_order="BGR")
EXPECTED_OPTIM_WRAPPER = _SHIPPED.optim_wrapper.to_dict()
EXPECTED_EMA = dict(type='ExponentialMovingAverage', interval=1, start_iter=20000,
                    momentum=0.0001, update_buffers=True)


def _write_cfg(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _small_gan(train_cfg="dict()", extra=""):
    return f"""
    model = dict(
        type='BasiccGAN',
        generator=dict(type='BigGANGenerator', output_scale=32, num_classes=10),
        discriminator=dict(type='BigGANDiscriminator', input_scale=32, num_classes=10),
        gan_loss=dict(type='GANLoss', gan_type='hinge'))
    train_cfg = {train_cfg}
    optimizer = dict(generator=dict(type='Adam', lr=0.0002),
                     discriminator=dict(type='Adam', lr=0.0002))
    total_iters = 1000
    {extra}
    """


class _TinyGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.fixture(scope="module")
def biggan():
    return migrate(str(BIGGAN128))


# ----------------------------------------------------------------------------- BigGAN-128
def test_biggan128_converts_to_the_1x_target(biggan):
    model = dict(biggan.config["model"])
    ema = model.pop("ema_config")
    assert model == EXPECTED_MODEL
    assert biggan.config["optim_wrapper"] == EXPECTED_OPTIM_WRAPPER
    assert ema == EXPECTED_EMA
    # evaluation.interval (10000) becomes val_interval, as in MMagic's 1.x configs
    assert biggan.config["train_cfg"] == dict(by_epoch=False, max_iters=1500000,
                                              val_interval=10000)
    # checkpoint_config (the experiment's, over the runtime file's) and log_config
    assert biggan.config["default_hooks"] == dict(
        checkpoint=dict(type='CheckpointHook', interval=5000, by_epoch=False,
                        max_keep_ckpts=10),
        logger=dict(type='LoggerHook', interval=100, log_metric_by_epoch=False))
    assert biggan.config["log_processor"] == dict(type='LogProcessor', window_size=100,
                                                  by_epoch=False)
    assert "visualizer" not in biggan.config  # TextLoggerHook only: MMEngine's default
    assert "param_scheduler" not in biggan.config  # lr_config = None
    assert biggan.warnings == []  # nothing lossy: D=8, A=8 divide; EMA representable
    assert any("gan_loss" in n and "hinge" in n for n in biggan.notes)


def test_biggan128_output_loads_and_matches(biggan, tmp_path):
    out = tmp_path / "biggan_1x.py"
    write(biggan, str(out))
    loaded = Config.fromfile(str(out)).to_dict()
    assert loaded == biggan.config
    model = dict(loaded["model"])
    assert model.pop("ema_config") == EXPECTED_EMA
    assert model == EXPECTED_MODEL
    assert loaded["optim_wrapper"] == EXPECTED_OPTIM_WRAPPER
    assert isinstance(loaded["optim_wrapper"]["generator"]["optimizer"]["betas"], tuple)


def test_biggan128_untranslated_listed_and_kept_as_comments(biggan):
    paths = [item.path for item in biggan.untranslated]
    for key in ("data", "evaluation", "runner.is_dynamic_ddp", "workflow", "custom_hooks[0]",
                "train_pipeline"):
        assert key in paths, key
    for key in ("log_config", "checkpoint_config", "runner"):  # translated
        assert not any(p.split(".")[0] == key for p in paths if p != "runner.is_dynamic_ddp")
    # the metrics are kept, the interval went to train_cfg
    evaluation = [i.value for i in biggan.untranslated if i.path == "evaluation"][0]
    assert "interval" not in evaluation and evaluation["type"] == "GenerativeEvalHook"
    # the EMA hook was translated, the visualisation hook was not
    hooks = [i.value for i in biggan.untranslated if i.path.startswith("custom_hooks")]
    assert [h["type"] for h in hooks] == ["VisualizeUnconditionalSamples"]
    text = biggan.text
    assert "# data = dict(" in text
    assert "# evaluation = dict(" in text
    assert "#     samples_per_gpu=32," in text
    assert "# custom_hooks[0] = dict(" in text
    # the commented-out section really is commented out
    tail = text[text.index("# NOT TRANSLATED:"):]
    assert all(ln.startswith("#") or not ln for ln in tail.splitlines())


def test_rendering_is_deterministic(biggan):
    again = migrate(str(BIGGAN128))
    assert again.text == biggan.text
    assert list(again.config) == ["model", "optim_wrapper", "train_cfg", "default_hooks",
                                  "log_processor", "load_from", "log_level"]
    assert list(again.config["model"])[:3] == ["type", "num_classes", "data_preprocessor"]


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_output_loads_with_config_fromfile(path, tmp_path):
    result = migrate(str(path))
    out = tmp_path / "new.py"
    write(result, str(out))
    assert Config.fromfile(str(out)).to_dict() == result.config


# ----------------------------------------------------------------------------- optimizers
def test_single_optimizer_is_refused():
    # 0.x BasiccGAN steps optimizer['generator'] / ['discriminator']: one optimizer over the
    # whole model never trained it, and a 1.x GAN model cannot train with it either.
    with pytest.raises(MigrationError, match=r"one optimizer for the whole model.*"
                                             r"Give one optimizer per network") as e:
        migrate(str(DATA / "single_optimizer.py"))
    assert e.value.warnings == []  # a refusal, not a --strict failure


def test_round_trip_builds_an_optim_wrapper_dict(biggan, tmp_path):
    import pygan_optim  # noqa: F401  registers MultiOptimWrapperConstructor in MMEngine
    from mmengine.optim import OptimWrapperDict, build_optim_wrapper

    out = tmp_path / "biggan_1x.py"
    write(biggan, str(out))
    cfg = Config.fromfile(str(out))
    model = _TinyGAN()
    wrappers = build_optim_wrapper(model, cfg.optim_wrapper)
    assert isinstance(wrappers, OptimWrapperDict)
    assert sorted(wrappers.keys()) == ["discriminator", "generator"]
    g, d = wrappers["generator"], wrappers["discriminator"]
    assert g._accumulative_counts == 8 and d._accumulative_counts == 8
    assert g.optimizer.param_groups[0]["lr"] == 0.0001
    assert d.optimizer.param_groups[0]["lr"] == 0.0004
    assert g.optimizer.param_groups[0]["betas"] == (0.0, 0.999)
    assert {id(p) for p in g.optimizer.param_groups[0]["params"]} == \
        {id(p) for p in model.generator.parameters()}



def test_converted_model_builds_with_the_project_registry():
    import pygan_optim  # noqa: F401  registers BigGAN, its networks and the constructor
    from mmengine.optim import OptimWrapperDict, build_optim_wrapper
    from mmengine.registry import MODELS

    if MODELS.get("BigGAN") is None or MODELS.get("BigGANGenerator") is None:
        pytest.skip("pygan_optim registers no BigGAN model")
    r = migrate(str(DATA / "ema_hook.py"))  # 32x32, init_type='N02', EMA, D steps 4
    model = MODELS.build(r.config["model"])
    assert model.discriminator_steps == 4 and model.generator_steps == 1
    assert model.generator_ema is not None
    wrappers = build_optim_wrapper(model, r.config["optim_wrapper"])
    assert isinstance(wrappers, OptimWrapperDict)
    assert sorted(wrappers.keys()) == ["discriminator", "generator"]


# ----------------------------------------------------------------------------- steps
def test_disc_steps_not_divisible_warns_with_values_and_rounding():
    r = migrate(str(DATA / "disc_not_divisible.py"))
    assert r.config["model"]["discriminator_steps"] == 1
    assert r.config["model"]["generator_steps"] == 2
    for key in ("generator", "discriminator"):
        assert r.config["optim_wrapper"][key]["accumulative_counts"] == 8
    assert len(r.warnings) == 1
    w = r.warnings[0]
    assert "disc_steps=12" in w and "batch_accumulation_steps=8" in w
    assert "12 // 8 = 1" in w and "every 8 iterations instead of every 12" in w
    assert "disc_steps=12" in r.text  # the warning is also in the file header


def test_disc_steps_not_divisible_is_an_error_in_strict_mode():
    with pytest.raises(MigrationError, match=r"disc_steps=12 .*batch_accumulation_steps=8"):
        migrate(str(DATA / "disc_not_divisible.py"), strict=True)
    migrate(str(BIGGAN128), strict=True)  # nothing lossy there


def test_disc_steps_smaller_than_accumulation_is_clamped(tmp_path):
    path = _write_cfg(tmp_path, "d1a8.py", _small_gan(
        "dict(disc_steps=1, batch_accumulation_steps=8)"))
    r = migrate(path)
    assert r.config["model"]["discriminator_steps"] == 1
    assert "1 // 8 = 0, raised to the minimum 1" in r.warnings[0]


def test_missing_train_cfg_keys_take_0x_defaults(tmp_path):
    r = migrate(_write_cfg(tmp_path, "defaults.py", _small_gan("None")))
    assert r.config["model"]["generator_steps"] == 1
    assert r.config["model"]["discriminator_steps"] == 1
    # A = 1: no accumulative_counts
    assert r.config["optim_wrapper"]["generator"] == dict(
        optimizer=dict(type='Adam', lr=0.0002))
    assert r.warnings == []


def test_invalid_steps_raise():
    with pytest.raises(MigrationError, match="disc_steps"):
        convert(dict(train_cfg=dict(disc_steps=0), model=dict(type='BasiccGAN')))


# ----------------------------------------------------------------------------- EMA
def test_ema_hook_becomes_ema_config():
    r = migrate(str(DATA / "ema_hook.py"))
    # I=4, S=4000, m=0.9999, mn=0 (default), D0=4, A=1
    assert r.config["model"]["ema_config"] == dict(
        type='ExponentialMovingAverage', interval=1, momentum=0.0001,
        update_buffers=False, start_iter=1000)
    assert r.config["model"]["discriminator_steps"] == 4
    assert not any(i.path.startswith("custom_hooks") for i in r.untranslated)
    assert r.warnings == []


def test_ema_interval_shorter_than_the_generator_phase(tmp_path):
    hook = ("custom_hooks = [dict(type='ExponentialMovingAverageHook', "
            "module_keys='generator_ema', interval=1, start_iter=10, "
            "interp_cfg=dict(momentum=0.9, momentum_nontrainable=0.9))]")
    r = migrate(_write_cfg(tmp_path, "ema1.py", _small_gan("dict(disc_steps=2)", hook)))
    ema = r.config["model"]["ema_config"]
    # two 0.x blends per 2-iteration phase -> one blend with momentum 1 - 0.9**2
    assert ema == dict(type='ExponentialMovingAverage', interval=1, momentum=0.19,
                       update_buffers=True, start_iter=5)


def test_use_ema_without_hook_warns(tmp_path):
    r = migrate(_write_cfg(tmp_path, "noema.py", _small_gan("dict(use_ema=True)")))
    assert "ema_config" not in r.config["model"]
    assert any("use_ema=True" in w for w in r.warnings)


# ----------------------------------------------------------------------------- lr / fp16
def test_linear_lr_config_becomes_per_optimizer_param_scheduler():
    r = migrate(str(DATA / "lr_config.py"))
    common = dict(type='LinearLrInterval', interval=1000, by_epoch=False, end_factor=0,
                  begin=100000, end=200000)
    assert r.config["param_scheduler"] == dict(
        generator=dict(common, start_factor=0.0002),
        discriminator=dict(common, start_factor=0.00005))
    assert r.config["model"]["type"] == "SNGAN"
    assert r.config["model"]["discriminator_steps"] == 5


def test_step_lr_config_with_warmup(tmp_path):
    extra = ("lr_config = dict(policy='Step', by_epoch=False, step=[600, 800], "
             "gamma=0.5, warmup='linear', warmup_iters=100, warmup_ratio=0.01)")
    r = migrate(_write_cfg(tmp_path, "step.py", _small_gan("dict()", extra)))
    assert r.config["param_scheduler"] == [
        dict(type='LinearLR', start_factor=0.01, end_factor=1.0, begin=0, end=100,
             by_epoch=False),
        dict(type='MultiStepLR', milestones=[600, 800], gamma=0.5, by_epoch=False)]


def test_fp16_becomes_amp_optim_wrapper():
    r = migrate(str(DATA / "fp16.py"))
    for key, lr in (("generator", 0.0001), ("discriminator", 0.0004)):
        assert r.config["optim_wrapper"][key] == dict(
            type='AmpOptimWrapper', loss_scale=dict(init_scale=512.0), accumulative_counts=2,
            optimizer=dict(type='Adam', lr=lr, betas=(0.0, 0.999)))
    # fp16_loss_scaler consumed, type and pass_training_status translated, the DDP flag kept
    assert [i.path for i in r.untranslated if i.path.startswith("runner")] == [
        "runner.is_dynamic_ddp"]
    assert any(i.path == "my_custom_setting" for i in r.untranslated)
    assert "# my_custom_setting = dict(answer=42)" in r.text


def test_bare_number_loss_scale_becomes_float(tmp_path):
    extra = "runner = dict(fp16_loss_scaler=512)"
    r = migrate(_write_cfg(tmp_path, "fp16n.py", _small_gan("dict()", extra)))
    ls = r.config["optim_wrapper"]["generator"]["loss_scale"]
    assert ls == 512.0 and isinstance(ls, float)


# ----------------------------------------------------------------------------- CLI
def test_cli_writes_and_reports_untranslated_on_stderr(tmp_path, capsys):
    out = tmp_path / "new.py"
    assert migrate_cli.main([str(BIGGAN128), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "untranslated" in err
    assert "  - data: " in err and "  - evaluation: " in err
    assert Config.fromfile(str(out)).model.type == "BigGAN"


def test_cli_accepts_the_subcommand_word(tmp_path, capsys):
    out = tmp_path / "new.py"
    assert migrate_cli.main(["migrate", str(DATA / "ema_hook.py"), "-o", str(out)]) == 0
    assert out.exists()


def test_cli_rounding_warning_and_strict_exit_code(tmp_path, capsys):
    out = tmp_path / "new.py"
    assert migrate_cli.main([str(DATA / "disc_not_divisible.py"), "-o", str(out)]) == 0
    assert "warning: train_cfg: disc_steps=12" in capsys.readouterr().err
    out.unlink()
    code = migrate_cli.main([str(DATA / "disc_not_divisible.py"), "-o", str(out), "--strict"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: strict migration" in err and "disc_steps=12" in err
    assert "nothing written" in err
    assert not out.exists()


def test_cli_missing_file(tmp_path, capsys):
    assert migrate_cli.main([str(tmp_path / "nope.py"), "-o", str(tmp_path / "x.py")]) == 1
    assert "error:" in capsys.readouterr().err


def test_cli_as_module(tmp_path):
    out = tmp_path / "new.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pygan_optim.migrate_cli", str(DATA / "fp16.py"), "-o",
         str(out)], capture_output=True, text=True, cwd=str(tmp_path),
        env=dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "my_custom_setting" in proc.stderr
    assert Config.fromfile(str(out)).optim_wrapper.generator.type == "AmpOptimWrapper"


# ----------------------------------------------------------------------------- self-checks
def test_cli_check_builds_the_biggan_model_and_its_optim_wrapper(tmp_path, capsys):
    out = tmp_path / "new.py"
    assert migrate_cli.main([str(DATA / "ema_hook.py"), "-o", str(out), "--check"]) == 0
    err = capsys.readouterr().err
    assert "checked: loads with mmengine Config.fromfile" in err
    assert "checked: --check built the 'BigGAN' model" in err
    assert "optim_wrapper ['discriminator', 'generator'] with pygan_optim" in err
    header = out.read_text().split("\n\n")[0]
    assert "Runs on plain MMEngine with pygan_optim" in header
    assert "default_scope" not in Config.fromfile(str(out))


def test_biggan_deep_needs_mmagic(tmp_path, capsys):
    path = _write_cfg(tmp_path, "deep.py", _small_gan("dict()").replace(
        "BigGANGenerator", "BigGANDeepGenerator").replace(
        "BigGANDiscriminator", "BigGANDeepDiscriminator"))
    r = migrate(path)
    assert r.family == "BigGAN-deep" and r.needs == "mmagic"
    assert r.config["model"]["type"] == "BigGAN" and r.config["default_scope"] == "mmagic"
    assert "NEEDS MMAGIC 1.x" in r.text
    out = tmp_path / "new.py"
    assert migrate_cli.main([path, "-o", str(out), "--check"]) == 0
    assert "--check did not build the 'BigGAN' model: it needs MMagic" in \
        capsys.readouterr().err


def test_check_rejects_a_config_that_does_not_load_back(biggan):
    import copy

    from pygan_optim.migrate import check
    broken = copy.copy(biggan)
    broken.text = biggan.text.replace("max_iters=1500000", "max_iters=15")
    with pytest.raises(MigrationError, match="loads with different values"):
        check(broken)


def test_refusal_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "new.py"
    assert migrate_cli.main([str(DATA / "single_optimizer.py"), "-o", str(out),
                             "--strict"]) == 1
    err = capsys.readouterr().err
    assert "one optimizer for the whole model" in err and "nothing written" in err
    assert not out.exists()
