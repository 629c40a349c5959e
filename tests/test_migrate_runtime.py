"""The runtime part of the 0.x -> 1.x config migration: ``checkpoint_config`` ->
``default_hooks.checkpoint``, ``log_config`` -> ``default_hooks.logger`` /
``log_processor`` / ``visualizer``, the ``evaluation`` interval -> ``train_cfg``, and the
``runner`` checks.

The 0.x configs under tests/migrate_data/runtime/ are fixtures written for these tests
with the values of MMGeneration 0.x configs (see the README there).
"""
import bisect
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mmengine import Config
from mmengine.runner import IterBasedTrainLoop, Runner
from mmengine.runner.utils import calc_dynamic_intervals

from pygan_optim import migrate_cli
from pygan_optim.migrate import MigrationError, check, convert, migrate, write

HERE = Path(__file__).parent
DATA = HERE / "migrate_data" / "runtime"
FAMILIES = HERE / "migrate_data" / "families"
TINY = HERE.parent / "configs" / "biggan_32x32_tiny.py"

LOGGER_100 = dict(type='LoggerHook', interval=100, log_metric_by_epoch=False)
LOG_PROCESSOR_100 = dict(type='LogProcessor', window_size=100, by_epoch=False)



# A run of the migrated tiny config (tiny_1x.py beside it) on synthetic data.
TINY_RUN_CFG = textwrap.dedent("""\
    _base_ = ['./tiny_1x.py']
    custom_imports = dict(imports=['pygan_optim'], allow_failed_imports=False)
    train_dataloader = dict(
        batch_size=4, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=True),
        dataset=dict(type='SyntheticImageDataset', num_samples=64, img_size=32,
                     num_classes=10))
    env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
    randomness = dict(seed=0)
    """)

def _small(**runtime):
    """A small 0.x SNGAN (a family pygan_optim builds too) plus runtime settings."""
    cfg = dict(
        model=dict(type='BasiccGAN', num_classes=10,
                   generator=dict(type='SNGANGenerator', output_scale=32, base_channels=32,
                                  num_classes=10),
                   discriminator=dict(type='ProjDiscriminator', input_scale=32,
                                      base_channels=32, num_classes=10),
                   gan_loss=dict(type='GANLoss', gan_type='hinge')),
        train_cfg=dict(disc_steps=5),
        optimizer=dict(generator=dict(type='Adam', lr=2e-4, betas=(0.5, 0.999)),
                       discriminator=dict(type='Adam', lr=2e-4, betas=(0.5, 0.999))),
        total_iters=1000)
    cfg.update(runtime)
    return cfg


def _paths(r):
    return [i.path for i in r.untranslated]


def _write_0x(path, cfg):
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.items()))
    return str(path)


def _written(r, tmp_path):
    return write(r, str(tmp_path / "new.py"))


# ----------------------------------------------------------------------------- real configs
def test_biggan_cifar10_hooks_logger_and_tensorboard(tmp_path):
    r = migrate(str(DATA / "biggan_cifar10.py"))
    c = r.config
    assert c["train_cfg"] == dict(by_epoch=False, max_iters=500000, val_interval=10000)
    assert c["default_hooks"] == dict(
        checkpoint=dict(type='CheckpointHook', interval=5000, by_epoch=False,
                        max_keep_ckpts=20),
        logger=LOGGER_100)
    assert c["log_processor"] == LOG_PROCESSOR_100
    # the text log's json needs the local backend next to TensorBoard
    assert c["visualizer"] == dict(type='Visualizer', vis_backends=[
        dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])
    assert r.warnings == []
    assert any("tf_logs" in n and "vis_data" in n for n in r.notes)
    assert any(n.startswith("runner type='DynamicIterBasedRunner'") for n in r.notes)
    assert any(n.startswith("runner.pass_training_status=True dropped") for n in r.notes)
    assert any("<work_dir>/ckpt/" in n for n in r.notes)
    assert "runner.is_dynamic_ddp" in _paths(r)
    for key in ("checkpoint_config", "log_config", "runner"):
        assert key not in _paths(r)
    kept = {i.path: i.value for i in r.untranslated}["evaluation"]
    assert kept == dict(
        type='GenerativeEvalHook',
        metrics=[dict(type='FID', num_images=50000, inception_pkl=None, bgr2rgb=True),
                 dict(type='IS', num_images=50000)],
        sample_kwargs=dict(sample_model='ema'), best_metric=['fid', 'is'])
    # rendered, loaded back, and the metrics stay a comment
    loaded = Config.fromfile(_written(r, tmp_path))
    assert loaded.to_dict() == c
    assert "# evaluation = dict(" in r.text and "\nevaluation" not in r.text


def test_sngan_dynamic_evaluation_interval_as_mmagic_writes_it(tmp_path):
    r = migrate(str(DATA / "sngan_proj_imagenet.py"))
    # the same train_cfg as MMagic's 1.x SNGAN-projection ImageNet configs
    assert r.config["train_cfg"] == dict(by_epoch=False, max_iters=2500000,
                                         val_interval=10000,
                                         dynamic_intervals=[(800000, 4000)])
    assert r.config["default_hooks"] == dict(
        checkpoint=dict(type='CheckpointHook', interval=50000, by_epoch=False,
                        max_keep_ckpts=20),
        logger=LOGGER_100)
    assert "visualizer" not in r.config
    assert r.warnings == []
    assert Config.fromfile(_written(r, tmp_path)).to_dict() == r.config  # tuples survive


def _evaluated_0x(milestones, intervals, total, factor):
    """The 1.x iterations at which 0.x's GenerativeEvalHook evaluated."""
    done = set()
    for c in range(1, total + 1):
        n = intervals[bisect.bisect_right(milestones, c)]
        if c % n == 0:
            done.add(c * factor)
    return done


def _evaluated_mmengine(train_cfg, max_iters):
    """The iterations MMEngine's IterBasedTrainLoop validates at (its own code picks the
    interval), leaving out the extra one after the last iteration."""
    loop = IterBasedTrainLoop.__new__(IterBasedTrainLoop)
    loop.dynamic_milestones, loop.dynamic_intervals = calc_dynamic_intervals(
        train_cfg["val_interval"], train_cfg.get("dynamic_intervals"))
    done = set()
    for c in range(1, max_iters + 1):
        loop._iter = c
        loop._decide_current_val_interval()
        if c % loop.val_interval == 0:
            done.add(c)
    return done


@pytest.mark.parametrize("milestones, intervals, total", [
    ([10], [2, 3], 40),  # 9 is evaluated after the milestone's interval only
    ([10], [3, 9], 40),  # 9 is evaluated by both
    ([800], [100, 40], 1200),
    ([7, 20], [2, 5, 3], 50),
    ([6, 13], [3, 7, 2], 40),
])
@pytest.mark.parametrize("singan", [False, True])
def test_evaluation_schedule_matches_0x_iteration_for_iteration(milestones, intervals, total,
                                                               singan):
    evaluation = dict(type='GenerativeEvalHook', metrics=dict(type='FID', num_images=10),
                      interval=dict(milestones=milestones, interval=intervals))
    if singan:  # 3 D steps per 0.x iteration: 1.x counts 3 iterations for each
        cfg = Config.fromfile(str(FAMILIES / "singan.py")).to_dict()
        cfg.update(total_iters=total, evaluation=evaluation)
        factor = 3
    else:
        cfg, factor = _small(total_iters=total, evaluation=evaluation), 1
    r = convert(cfg)
    train_cfg = r.config["train_cfg"]
    assert train_cfg["max_iters"] == total * factor
    assert (_evaluated_mmengine(train_cfg, total * factor)
            == _evaluated_0x(milestones, intervals, total, factor))


def test_a_milestone_moves_by_one_only_where_mmengine_would_differ():
    ev = dict(type='GenerativeEvalHook', metrics=dict(type='FID', num_images=10),
              interval=dict(milestones=[10], interval=[2, 3]))
    assert convert(_small(evaluation=ev)).config["train_cfg"]["dynamic_intervals"] == [
        (11, 3)]
    ev["interval"] = dict(milestones=[10], interval=[3, 9])
    assert convert(_small(evaluation=ev)).config["train_cfg"]["dynamic_intervals"] == [
        (10, 9)]


def test_singan_intervals_count_1x_iterations():
    cfg = Config.fromfile(str(FAMILIES / "singan.py")).to_dict()
    cfg.update(checkpoint_config=dict(by_epoch=False, interval=2000, max_keep_ckpts=3),
               log_config=dict(interval=100, hooks=[dict(type='TextLoggerHook')]),
               evaluation=dict(type='GenerativeEvalHook', interval=1000,
                               metrics=dict(type='FID', num_images=10)))
    r = convert(cfg)
    assert r.config["train_cfg"] == dict(by_epoch=False, max_iters=54000, val_interval=3000)
    assert r.config["default_hooks"] == dict(
        checkpoint=dict(type='CheckpointHook', interval=6000, by_epoch=False,
                        max_keep_ckpts=3),
        logger=dict(LOGGER_100, interval=300))
    assert r.config["log_processor"] == dict(LOG_PROCESSOR_100, window_size=300)
    assert any("interval=2000 0.x iterations = 6000 1.x iterations" in n for n in r.notes)


# ----------------------------------------------------------------------------- checkpoint
def test_checkpoint_arguments_with_the_same_meaning_in_mmengine():
    r = convert(_small(checkpoint_config=dict(
        interval=10000, save_optimizer=True, by_epoch=False, out_dir='/data/ckpts',
        max_keep_ckpts=5, save_last=False, filename_tmpl='iter_{:08d}.pth',
        sync_buffer=False, create_symlink=False)))
    assert r.config["default_hooks"]["checkpoint"] == dict(
        type='CheckpointHook', interval=10000, by_epoch=False, out_dir='/data/ckpts',
        save_optimizer=True, max_keep_ckpts=5, save_last=False,
        filename_tmpl='iter_{:08d}.pth')
    assert r.warnings == []
    assert any("sync_buffer=False dropped" in n for n in r.notes)
    assert any("create_symlink=False dropped" in n and "last_checkpoint" in n
               for n in r.notes)
    assert not any("<work_dir>/ckpt/" in n for n in r.notes)  # out_dir given, absolute


def test_by_epoch_defaults_to_false_as_under_mmcvs_iteration_runner():
    r = convert(_small(checkpoint_config=dict(interval=2000)))
    assert r.config["default_hooks"]["checkpoint"] == dict(
        type='CheckpointHook', interval=2000, by_epoch=False)
    assert r.warnings == []


def test_untranslatable_checkpoint_settings_warn_and_stay_comments(tmp_path, capsys):
    cfg = _small(checkpoint_config=dict(interval=5000, by_epoch=False, out_dir='ckpt_copy',
                                        sync_buffer=True, meta=dict(note='x')))
    r = convert(cfg)
    assert r.config["default_hooks"]["checkpoint"] == dict(
        type='CheckpointHook', interval=5000, by_epoch=False)
    kept = {i.path: i.value for i in r.untranslated}
    assert kept["checkpoint_config.out_dir"] == 'ckpt_copy'
    assert kept["checkpoint_config.sync_buffer"] is True
    assert kept["checkpoint_config.meta"] == dict(note='x')
    assert [w.split(" is not")[0] for w in r.warnings] == [
        "checkpoint_config.out_dir='ckpt_copy'", "checkpoint_config.sync_buffer=True",
        "checkpoint_config.meta={'note': 'x'}"]
    assert "# checkpoint_config.meta = dict(note='x')" in r.text
    with pytest.raises(MigrationError) as e:
        convert(cfg, strict=True)
    assert len(e.value.warnings) == 3
    # the CLI: --strict exits 2 and writes nothing; without it the file is written
    src = _write_0x(tmp_path / "old.py", cfg)
    out = tmp_path / "new.py"
    assert migrate_cli.main([src, "-o", str(out), "--strict"]) == 2
    assert not out.exists()
    assert "checkpoint_config.sync_buffer=True" in capsys.readouterr().err
    assert migrate_cli.main([src, "-o", str(out)]) == 0
    assert Config.fromfile(str(out)).default_hooks.checkpoint.interval == 5000


@pytest.mark.parametrize("ckpt, kept", [
    (dict(interval=5000, by_epoch=True), "checkpoint_config"),
    (dict(type='PetrelCheckpointHook', interval=5000), "checkpoint_config"),
])
def test_epoch_based_or_other_checkpoint_hooks_are_not_converted(ckpt, kept):
    r = convert(_small(checkpoint_config=ckpt))
    assert "default_hooks" not in r.config
    assert kept in _paths(r) and len(r.warnings) == 1


def test_none_disables_the_hooks_and_the_runner_agrees(tmp_path):
    r = convert(_small(checkpoint_config=None, log_config=None))
    assert r.config["default_hooks"] == dict(checkpoint=None, logger=None)
    assert "log_processor" not in r.config and r.warnings == []
    runner = _runner(r.config, tmp_path)
    names = [type(h).__name__ for h in runner.hooks]
    assert "CheckpointHook" not in names and "LoggerHook" not in names
    assert "IterTimerHook" in names  # MMEngine's other defaults stay


# ----------------------------------------------------------------------------- logger
def test_text_logger_options_go_to_logger_hook():
    r = convert(_small(log_config=dict(interval=50, hooks=[dict(
        type='TextLoggerHook', ignore_last=False, interval_exp_name=500,
        out_dir='/shared/logs', keep_local=False, reset_flag=True)])))
    assert r.config["default_hooks"]["logger"] == dict(
        type='LoggerHook', interval=50, ignore_last=False, interval_exp_name=500,
        out_dir='/shared/logs', keep_local=False, log_metric_by_epoch=False)
    assert r.config["log_processor"] == dict(LOG_PROCESSOR_100, window_size=50)
    assert r.warnings == [] and any("reset_flag dropped" in n for n in r.notes)


def test_one_logger_hook_for_all_the_0x_logger_hooks():
    r = convert(_small(log_config=dict(interval=100, hooks=[
        dict(type='TextLoggerHook', ignore_last=False), dict(type='TensorboardLoggerHook')])))
    assert r.config["default_hooks"]["logger"]["ignore_last"] is False
    assert r.warnings == ["log_config.hooks[1] had ignore_last=True; 1.x's single "
                          "LoggerHook takes ignore_last=False (that of log_config.hooks[0])"]
    r = convert(_small(log_config=dict(interval=100, hooks=[])))
    assert r.config["default_hooks"] == dict(logger=None) and r.warnings == []


def test_a_hook_interval_overrides_log_config_interval():
    r = convert(_small(log_config=dict(interval=100, hooks=[
        dict(type='TextLoggerHook', interval=20)])))
    assert r.config["default_hooks"]["logger"]["interval"] == 20
    assert r.config["log_processor"]["window_size"] == 20


def test_tensorboard_log_dir_becomes_the_backends_save_dir():
    r = convert(_small(log_config=dict(interval=100, hooks=[
        dict(type='TensorboardLoggerHook', log_dir='/runs/sngan')])))
    assert r.config["visualizer"] == dict(
        type='Visualizer', vis_backends=[dict(type='TensorboardVisBackend',
                                              save_dir='/runs/sngan')])
    assert r.config["default_hooks"]["logger"] == LOGGER_100
    assert r.warnings == []
    assert any("no TextLoggerHook" in n for n in r.notes)


def test_wandb_is_converted_with_warnings_for_what_mmengine_does_not_do(tmp_path):
    cfg = _small(log_config=dict(interval=100, hooks=[
        dict(type='TextLoggerHook'),
        dict(type='WandbLoggerHook', init_kwargs=dict(project='mmgen', name='sngan'),
             commit=True)]))
    r = convert(cfg)
    assert r.config["visualizer"] == dict(type='Visualizer', vis_backends=[
        dict(type='LocalVisBackend'),
        dict(type='WandbVisBackend', init_kwargs=dict(project='mmgen', name='sngan'),
             commit=True)])
    assert len(r.warnings) == 2
    assert "step=" in r.warnings[0] and "log_artifact=True" in r.warnings[1]
    r = convert(copy.deepcopy(cfg) | dict(log_config=dict(interval=100, hooks=[
        dict(type='WandbLoggerHook', with_step=False, log_artifact=False)])))
    assert len(r.warnings) == 1 and "global_step" in r.warnings[0]


def test_unconvertible_logger_hooks_warn_and_stay_comments():
    r = convert(_small(log_config=dict(interval=100, hooks=[
        dict(type='TextLoggerHook', out_suffix=('.log.json', '.log')),
        dict(type='PaviLoggerHook', init_kwargs=dict(project='x')),
        dict(type='TensorboardLoggerHook', interval=500),
        dict(type='TextLoggerHook', by_epoch=True)])))
    assert r.config["default_hooks"]["logger"] == LOGGER_100
    assert r.config["visualizer"]["vis_backends"][1] == dict(type='TensorboardVisBackend')
    kept = _paths(r)
    assert {"log_config.hooks[0].out_suffix", "log_config.hooks[1]",
            "log_config.hooks[3]"} <= set(kept)
    assert len(r.warnings) == 4
    assert any("hooks[2] logged every 500 iterations" in w for w in r.warnings)
    with pytest.raises(MigrationError):
        convert(_small(log_config=dict(interval=100, hooks=[dict(type='PaviLoggerHook')])),
                strict=True)


# ----------------------------------------------------------------------------- runner
def test_epoch_based_runner_is_refused(tmp_path, capsys):
    with pytest.raises(MigrationError, match="counts epochs") as e:
        convert(_small(runner=dict(type='EpochBasedRunner', max_epochs=100)))
    assert e.value.warnings == []  # a refusal, not a strict failure
    src = _write_0x(tmp_path / "old.py", _small(runner=dict(type='EpochBasedRunner')))
    out = tmp_path / "new.py"
    assert migrate_cli.main([src, "-o", str(out)]) == 1
    assert not out.exists() and "nothing written" in capsys.readouterr().err


def test_runner_settings_are_translated_noted_or_warned():
    r = convert(_small(runner=None))
    assert r.warnings == [] and "runner" not in _paths(r)
    assert any(n.startswith("runner=None") for n in r.notes)

    cfg = _small(runner=dict(type='IterBasedRunner', max_iters=4000))
    del cfg["total_iters"]
    r = convert(cfg)
    assert r.config["train_cfg"]["max_iters"] == 4000 and r.warnings == []

    r = convert(_small(runner=dict(type='IterBasedRunner', max_iters=4000)))
    assert r.config["train_cfg"]["max_iters"] == 1000  # total_iters overrode it in 0.x
    assert any("runner.max_iters=4000 dropped" in n for n in r.notes)

    r = convert(_small(runner=dict(type='MyRunner', my_flag=True)))
    assert {"runner.type", "runner.my_flag"} <= set(_paths(r))
    assert len(r.warnings) == 2


# ----------------------------------------------------------------------------- MMEngine
def _runner(config, work_dir, **extra):
    tiny = Config.fromfile(str(TINY))
    cfg = dict(
        model=tiny.model.to_dict(), optim_wrapper=tiny.optim_wrapper.to_dict(),
        train_dataloader=tiny.train_dataloader.to_dict(), train_cfg=dict(
            tiny.train_cfg.to_dict(), **config.get("train_cfg", {})),
        default_scope=None, env_cfg=tiny.env_cfg.to_dict(), randomness=dict(seed=0),
        work_dir=str(work_dir), log_level="WARNING")
    cfg["train_cfg"]["max_iters"] = 4
    for key in ("default_hooks", "log_processor", "visualizer"):
        if key in config:
            cfg[key] = copy.deepcopy(config[key])
    cfg.update(extra)
    return Runner.from_cfg(Config(cfg))


def test_mmengine_runner_builds_what_migrate_writes(tmp_path):
    r = migrate(str(DATA / "sngan_proj_imagenet.py"))
    runner = _runner(r.config, tmp_path / "w")
    hooks = {type(h).__name__: h for h in runner.hooks}
    ckpt, logger = hooks["CheckpointHook"], hooks["LoggerHook"]
    assert (ckpt.interval, ckpt.by_epoch, ckpt.max_keep_ckpts) == (50000, False, 20)
    assert (logger.interval, logger.log_metric_by_epoch) == (100, False)
    assert runner.log_processor.window_size == 100 and not runner.log_processor.by_epoch
    loop = runner.train_loop  # val_interval without a val loop is accepted
    assert (loop.val_interval, loop.dynamic_milestones) == (10000, [0, 800000])


def test_check_builds_the_runtime_entries_even_without_tensorboard_or_wandb():
    r = convert(_small(log_config=dict(interval=100, hooks=[
        dict(type='TextLoggerHook'), dict(type='TensorboardLoggerHook'),
        dict(type='WandbLoggerHook', init_kwargs=dict(project='p'))]),
        checkpoint_config=dict(interval=10, by_epoch=False)))
    done = check(r, build=True)
    assert done[-1] == ("--check built default_hooks.checkpoint, default_hooks.logger, "
                        "log_processor, visualizer with MMEngine")


def test_check_names_a_runtime_entry_that_does_not_build():
    from pygan_optim.migrate.output import render
    r = convert(_small(checkpoint_config=dict(interval=10, by_epoch=False)))
    r.config["default_hooks"]["logger"] = dict(type='LoggerHook', interval=0)  # as if
    r.text = render(r)  # translated wrongly
    with pytest.raises(MigrationError, match="default_hooks.logger does not build"):
        check(r, build=True)


def test_migrated_biggan_trains_with_pygan_optim_train(tmp_path, capsys):
    """The migrated tiny BigGAN, given a dataloader, trains with `pygan-optim train`: the
    translated checkpoint and logger settings run as 0.x ran them."""
    new = tmp_path / "tiny_1x.py"
    assert migrate_cli.main([str(DATA / "tiny_biggan.py"), "-o", str(new), "--check"]) == 0
    err = capsys.readouterr().err
    assert "warning:" not in err
    migrated = Config.fromfile(str(new))
    assert migrated.default_hooks.to_dict() == dict(
        checkpoint=dict(type='CheckpointHook', interval=4, by_epoch=False, max_keep_ckpts=1),
        logger=dict(type='LoggerHook', interval=2, log_metric_by_epoch=False))
    assert migrated.train_cfg.to_dict() == dict(by_epoch=False, max_iters=8, val_interval=4)
    run_cfg = tmp_path / "run.py"
    run_cfg.write_text(TINY_RUN_CFG)
    work = tmp_path / "work"
    # a real `pygan-optim train` process, as a user runs it (tests/test_cli.py does too)
    script = Path(sys.executable).with_name("pygan-optim")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "pygan_optim.cli"]
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # the CLI sets it itself
    p = subprocess.run(cmd + ["train", str(run_cfg), "--work-dir", str(work), "--quiet"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    # every 4 iterations, one kept (iter_4 removed when iter_8 was saved)
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_8.pth"]
    assert (work / "last_checkpoint").read_text().endswith("iter_8.pth")
    logs = list(work.glob("*/*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    for i in (2, 4, 6, 8):
        assert f"Iter(train) [{i}/8]" in text
    assert "Iter(train) [1/8]" not in text and "Iter(train) [3/8]" not in text


def test_an_lr_config_without_by_epoch_is_iteration_based_without_a_warning():
    """mmcv's IterBasedRunner (and mmgen's DynamicIterBasedRunner, a subclass) makes
    lr_config's by_epoch False when it is unset, so leaving it out loses nothing: no
    warning, and --strict does not refuse it (it did before session 33)."""
    r = convert(_small(lr_config=dict(policy='Linear', target_lr=0, start=0,
                                      interval=10)))
    assert r.warnings == []
    assert r.config["param_scheduler"]["by_epoch"] is False
