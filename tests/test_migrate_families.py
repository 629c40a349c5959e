"""Every MMGeneration 0.x family migrates to what MMagic 1.x's own config for it uses, or
is refused with a message. The fixtures under tests/migrate_data/families/ carry the
values of the real 0.x configs (written anew for these tests); the expected values below
are those of the matching MMagic 1.x configs, except where noted (MMagic's own config is
wrong there, and the 0.x behaviour is what is kept)."""
from pathlib import Path

import pytest
from mmengine import Config

from pygan_optim import migrate_cli
from pygan_optim.migrate import MigrationError, check, convert, families, migrate

DATA = Path(__file__).parent / "migrate_data" / "families"
ADAM = dict(type='Adam')
STYLE_G = dict(type='Adam', lr=0.0016, betas=(0, 0.9919919678228657))
STYLE_D = dict(type='Adam', lr=0.0018823529411764706, betas=(0, 0.9905854573074332))
STYLE_LOSS = dict(r1_loss_weight=80.0, r1_interval=16, norm_mode='HWC', g_reg_interval=4,
                  g_reg_weight=8.0, pl_batch_shrink=2)
STYLE_EMA_MOMENTUM = 1 - 0.5 ** (32. / (10 * 1000.))  # 0.0022156128761111615


def run(name, strict=False):
    r = migrate(str(DATA / f"{name}.py"), strict=strict)
    check(r)  # the text loads with Config.fromfile to exactly r.config
    return r


def gd(g, d, constructor='MultiOptimWrapperConstructor', keys=('generator', 'discriminator'),
       **extra):
    return dict(constructor=constructor, **{keys[0]: dict(optimizer=g)},
                **{keys[1]: dict(optimizer=d)}, **extra)


def schedule(model):
    return {k: v for k, v in model.items()
            if k not in ('generator', 'discriminator', 'data_preprocessor')}


# ----------------------------------------------------------------------------- GANs
def test_sngan():
    r = run("sngan")
    assert schedule(r.config["model"]) == dict(type='SNGAN', num_classes=10,
                                               generator_steps=1, discriminator_steps=5)
    adam = dict(type='Adam', lr=2e-4, betas=(0.5, 0.999))
    assert r.config["optim_wrapper"] == gd(adam, adam)
    assert r.config["train_cfg"] == dict(by_epoch=False, max_iters=500000)
    assert r.warnings == [] and r.needs == "mmagic"


def test_sagan_ema_momentum_is_inverted():
    r = run("sagan")
    m = r.config["model"]
    assert schedule(m) == dict(
        type='SAGAN', num_classes=1000, generator_steps=1, discriminator_steps=1,
        # MMagic's config writes momentum=0.999, the 0.x value, which 1.x reads as the
        # weight of the new parameters; 0.x kept 0.999 of the average: 1.x momentum 0.001.
        ema_config=dict(type='ExponentialMovingAverage', interval=1, momentum=0.001,
                        update_buffers=False, start_iter=2000))
    assert r.config["optim_wrapper"] == gd(dict(type='Adam', lr=1e-4, betas=(0.0, 0.999)),
                                           dict(type='Adam', lr=4e-4, betas=(0.0, 0.999)))


@pytest.mark.parametrize("name,new_type,g,d,iters", [
    ("dcgan", "DCGAN", dict(lr=4e-4, betas=(0.5, 0.999)), dict(lr=1e-4, betas=(0.5, 0.999)),
     5000),
    ("lsgan", "LSGAN", dict(lr=1e-3, betas=(0.5, 0.99)), dict(lr=1e-3, betas=(0.5, 0.99)),
     100000),
    ("ggan", "GGAN", dict(lr=1e-4, betas=(0.5, 0.99)), dict(lr=1e-4, betas=(0.5, 0.99)),
     160000),
])
def test_static_unconditional_gans_by_loss(name, new_type, g, d, iters):
    r = run(name)
    assert schedule(r.config["model"]) == dict(type=new_type, generator_steps=1,
                                               discriminator_steps=1)
    assert r.config["model"]["data_preprocessor"] == dict(type='DataPreprocessor')
    assert r.config["optim_wrapper"] == gd(dict(ADAM, **g), dict(ADAM, **d))
    assert r.config["train_cfg"]["max_iters"] == iters
    assert r.warnings == []
    assert any("gan_loss" in n and "built in" in n for n in r.notes)


def test_wgangp_gradient_penalty_becomes_loss_config():
    r = run("wgangp")
    assert schedule(r.config["model"]) == dict(
        type='WGANGP', generator_steps=1, discriminator_steps=5,
        loss_config=dict(gp_norm_mode='HWC', gp_loss_weight=50))
    adam = dict(type='Adam', lr=1e-4, betas=(0.5, 0.9))
    assert r.config["optim_wrapper"] == gd(adam, adam)
    assert r.warnings == []


def test_stylegan2_losses_ema_and_fp16():
    r = run("stylegan2")
    m = r.config["model"]
    ema = m.pop("ema_config")
    assert schedule(m) == dict(type='StyleGAN2', generator_steps=1, discriminator_steps=1,
                               loss_config=STYLE_LOSS)
    assert ema.pop("momentum") == pytest.approx(STYLE_EMA_MOMENTUM, rel=1e-9)
    assert ema == dict(type='ExponentialMovingAverage', interval=1, update_buffers=False,
                       start_iter=0)
    # 0.x fp16_loss_scaler=dict(init_scale=512) is a dynamic scaler starting at 512
    # (MMagic's config writes loss_scale=512, an int AmpOptimWrapper rejects).
    amp = dict(type='AmpOptimWrapper', loss_scale=dict(init_scale=512))
    assert r.config["optim_wrapper"] == dict(
        constructor='MultiOptimWrapperConstructor',
        generator=dict(amp, optimizer=STYLE_G), discriminator=dict(amp, optimizer=STYLE_D))
    assert r.config["train_cfg"]["max_iters"] == 800002
    assert r.warnings == []


def test_stylegan3_rampup_ema():
    r = run("stylegan3")
    m = r.config["model"]
    assert m["type"] == 'StyleGAN3'
    assert m["loss_config"] == dict(STYLE_LOSS, r1_loss_weight=16.0)
    assert m["ema_config"] == dict(type='RampUpEMA', interval=1, ema_kimg=10,
                                   ema_rampup=0.05, batch_size=32, eps=1e-8, start_iter=0)
    assert r.config["optim_wrapper"]["generator"]["optimizer"]["lr"] == pytest.approx(0.002)
    assert r.warnings == []


def test_mspie_train_settings():
    r = run("mspie")
    m = r.config["model"]
    assert m["type"] == 'MSPIEStyleGAN2'
    assert m["train_settings"] == dict(num_upblocks=6, multi_input_scales=[0, 2, 4],
                                       multi_scale_probability=[0.5, 0.25, 0.25])
    assert m["loss_config"] == STYLE_LOSS
    assert r.config["optim_wrapper"] == gd(STYLE_G, STYLE_D)
    assert r.config["train_cfg"]["max_iters"] == 1100002


# ----------------------------------------------------------------------------- progressive
def test_pggan_optimizers_from_train_cfg_with_per_scale_lr():
    r = run("pggan")
    m = r.config["model"]
    assert schedule(m) == dict(
        type='ProgressiveGrowingGAN', noise_size=512,
        nkimgs_per_scale={'4': 600, '8': 1200, '16': 1200, '32': 1200, '64': 1200,
                          '128': 12000},
        transition_kimgs=600,
        ema_config=dict(type='ExponentialMovingAverage', interval=1, momentum=0.001,
                        update_buffers=False, start_iter=0))
    adam = dict(type='Adam', lr=0.001, betas=(0.0, 0.99))
    assert r.config["optim_wrapper"] == gd(
        adam, adam, constructor='PGGANOptimWrapperConstructor',
        lr_schedule=dict(generator={'128': 0.0015}, discriminator={'128': 0.0015}))
    assert r.config["train_cfg"]["max_iters"] == 280000
    assert "generator_steps" not in m and "discriminator_steps" not in m  # not accepted
    assert r.warnings == []
    assert "PGGANOptimWrapperConstructor" in r.text.split("\n\n")[0]  # the header says so


def test_stylegan1():
    r = run("stylegan1")
    m = r.config["model"]
    assert m["type"] == 'StyleGANv1' and m["style_channels"] == 512
    assert m["ema_config"]["momentum"] == pytest.approx(STYLE_EMA_MOMENTUM, rel=1e-9)
    assert r.config["optim_wrapper"]["constructor"] == 'PGGANOptimWrapperConstructor'
    assert r.config["optim_wrapper"]["lr_schedule"]["generator"] == {'128': 0.0015,
                                                                   '256': 0.002}
    assert "noise_size" not in m


def test_pggan_without_optimizer_cfg_is_refused(tmp_path):
    cfg = Config.fromfile(str(DATA / "pggan.py")).to_dict()
    del cfg["train_cfg"]["optimizer_cfg"]
    with pytest.raises(MigrationError, match=r"train_cfg\.optimizer_cfg.*Give train_cfg"):
        convert(cfg)


# ----------------------------------------------------------------------------- SinGAN
def test_singan_counts_one_d_step_per_iteration():
    r = run("singan")
    m = r.config["model"]
    assert schedule(m) == dict(type='SinGAN', num_scales=8, generator_steps=3,
                               discriminator_steps=3, iters_per_scale=2000,
                               noise_weight_init=0.1,
                               lr_scheduler_args=dict(milestones=[1600], gamma=0.1))
    assert m["data_preprocessor"] == dict(type='DataPreprocessor',
                                          non_image_keys=['input_sample'])
    adam = dict(type='Adam', lr=0.0005, betas=(0.5, 0.999))
    assert r.config["optim_wrapper"] == gd(adam, adam,
                                           constructor='SinGANOptimWrapperConstructor')
    assert r.config["train_cfg"] == dict(by_epoch=False, max_iters=18000 * 3)
    assert r.warnings == []


def test_pesingan():
    r = run("pesingan")
    m = r.config["model"]
    assert m["type"] == 'PESinGAN' and m["first_fixed_noises_ch"] == 2
    assert m["num_scales"] == 10
    assert r.config["train_cfg"]["max_iters"] == 66000


def test_singan_gen_steps_is_not_its_key():
    cfg = Config.fromfile(str(DATA / "singan.py")).to_dict()
    cfg["train_cfg"]["gen_steps"] = 5
    r = convert(cfg)
    assert r.config["model"]["generator_steps"] == 3
    assert any("reads generator_steps, not gen_steps" in w for w in r.warnings)
    del cfg["train_cfg"]["generator_steps"]
    with pytest.raises(MigrationError, match="needs train_cfg.generator_steps"):
        convert(cfg)


# ----------------------------------------------------------------------------- translation
def test_cyclegan_takes_discriminator_steps_only():
    r = run("cyclegan")
    m = r.config["model"]
    assert schedule(m) == dict(
        type='CycleGAN', default_domain='photo', reachable_domains=['mask', 'photo'],
        related_domains=['mask', 'photo'], discriminator_steps=1,
        loss_config=dict(cycle_loss_weight=10.0, id_loss_weight=0.5))
    assert "generator_steps" not in m  # the 1.x class has no such argument, no **kwargs
    assert m["data_preprocessor"] == dict(type='DataPreprocessor',
                                          data_keys=['img_mask', 'img_photo'])
    adam = dict(type='Adam', lr=0.0002, betas=(0.5, 0.999))
    assert r.config["optim_wrapper"] == gd(adam, adam, keys=('generators', 'discriminators'))
    assert r.config["param_scheduler"] == dict(
        type='LinearLrInterval', interval=400, by_epoch=False, start_factor=0.0002,
        end_factor=0, begin=40000, end=80000)
    assert r.warnings == []


def test_pix2pix_with_train_cfg_none():
    r = run("pix2pix")
    m = r.config["model"]
    assert schedule(m) == dict(type='Pix2Pix', default_domain='photo',
                               reachable_domains=['photo'], related_domains=['photo', 'mask'],
                               discriminator_steps=1,
                               loss_config=dict(pixel_loss_weight=100.0))
    adam = dict(type='Adam', lr=2e-4, betas=(0.5, 0.999))
    assert r.config["optim_wrapper"] == gd(adam, adam, keys=('generators', 'discriminators'))
    assert "param_scheduler" not in r.config and r.warnings == []


def test_translation_gen_steps_dropped_with_warning_and_strict_fails():
    cfg = Config.fromfile(str(DATA / "pix2pix.py")).to_dict()
    cfg["train_cfg"] = dict(disc_steps=2, gen_steps=3)
    r = convert(cfg)
    assert r.config["model"]["discriminator_steps"] == 2
    assert "generator_steps" not in r.config["model"]
    assert any("gen_steps=3 dropped" in w for w in r.warnings)
    with pytest.raises(MigrationError) as e:
        convert(cfg, strict=True)
    assert e.value.warnings


def test_translation_singular_optimizer_keys_are_refused():
    cfg = Config.fromfile(str(DATA / "cyclegan.py")).to_dict()
    cfg["optimizer"] = dict(generator=cfg["optimizer"]["generators"],
                            discriminator=cfg["optimizer"]["discriminators"])
    with pytest.raises(MigrationError, match=r"needs optim_wrapper entries "
                                             r"\['generators', 'discriminators'\]"):
        convert(cfg)


# ----------------------------------------------------------------------------- refused
def test_improved_ddpm_is_refused(tmp_path, capsys):
    out = tmp_path / "ddpm_1x.py"
    assert migrate_cli.main([str(DATA / "improved_ddpm.py"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Improved DDPM" in err and "no training model" in err
    assert "Keep training it with MMGeneration 0.x" in err and "nothing written" in err
    assert not out.exists()


def test_unknown_model_type_is_refused():
    with pytest.raises(MigrationError, match=r"no known 1.x model for the 0.x model "
                                             r"type='MyGAN'.*by hand"):
        convert(dict(model=dict(type='MyGAN', generator=dict(type='G')),
                     optimizer=dict(generator=dict(type='Adam'))))


def test_missing_optimizer_is_refused():
    cfg = Config.fromfile(str(DATA / "dcgan.py")).to_dict()
    cfg["optimizer"] = None
    with pytest.raises(MigrationError, match=r"has no optimizer.*Add optimizer=dict"):
        convert(cfg)


def test_unaccepted_model_key_is_never_written():
    cfg = Config.fromfile(str(DATA / "sngan.py")).to_dict()
    cfg["model"]["my_option"] = 3
    cfg["train_cfg"]["my_schedule"] = 4
    r = convert(cfg)
    assert "my_option" not in r.config["model"] and "my_schedule" not in r.config["model"]
    assert {i.path for i in r.untranslated} >= {"model.my_option", "train_cfg.my_schedule"}
    with pytest.raises(MigrationError, match="my_option"):
        convert(cfg, strict=True)


# ----------------------------------------------------------------------------- every family
FIXTURES = sorted(p.stem for p in DATA.glob("*.py") if p.stem != "improved_ddpm")


@pytest.mark.parametrize("name", FIXTURES)
def test_every_family_output_is_complete_and_loads(name, tmp_path, capsys):
    r = run(name)
    fam = {f.name: f for f in families()}[r.family]
    model = r.config["model"]
    assert model["type"] == fam.new_type
    assert set(model) - {"type"} <= fam.accepts  # only keys the 1.x class takes
    wrapper = r.config["optim_wrapper"]
    assert wrapper["constructor"] == fam.constructor
    assert all(k in wrapper for k in fam.optim_keys)
    out = tmp_path / "new.py"
    assert migrate_cli.main([str(DATA / f"{name}.py"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "checked: loads with mmengine Config.fromfile" in err
    loaded = Config.fromfile(str(out))
    assert loaded.to_dict() == r.config
    assert loaded.default_scope == "mmagic"
    assert "NEEDS MMAGIC 1.x" in out.read_text().split("\n\n")[0]


def test_every_family_in_the_table_has_a_fixture():
    have = {migrate(str(DATA / f"{n}.py")).family for n in FIXTURES}
    wanted = {f.name for f in families() if not f.refused} - {"BigGAN", "BigGAN-deep"}
    assert wanted <= have
