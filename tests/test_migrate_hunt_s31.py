"""Migration bugs found by the session-31 hunt over MMGeneration 0.x's own configs.

Fixtures in tests/migrate_data/hunt31/ are small 0.x configs written for these tests with
the structure and values of MMGeneration 0.7.3's configs (dcgan_mnist-64, sngan_proj 32x32).
"""
from pathlib import Path

import pytest

from pygan_optim import migrate_cli
from pygan_optim.migrate import MigrationError, convert, migrate

DATA = Path(__file__).parent / "migrate_data" / "hunt31"
FAMILIES = Path(__file__).parent / "migrate_data" / "families"


def _cfg(name):
    return str(DATA / f"{name}.py")


# --------------------------------------------------------------- 1. auxiliary losses dropped
def test_an_aux_loss_the_1x_class_does_not_have_is_a_warning():
    # 1.x SNGAN (like DCGAN, LSGAN, GGAN, SAGAN, BigGAN) computes only its GAN loss: an R1
    # penalty the 0.x run trained with is lost. That used to be a note saying the losses
    # were "built into the 1.x model", and --strict passed.
    r = migrate(_cfg("sngan_r1"))
    assert "loss_config" not in r.config["model"]
    assert any(i.path == "model.disc_auxiliary_loss" for i in r.untranslated)
    assert not any("built into" in n for n in r.notes), r.notes
    warned = [w for w in r.warnings if "model.disc_auxiliary_loss" in w]
    assert len(warned) == 1 and "R1GradientPenalty" in warned[0], r.warnings
    with pytest.raises(MigrationError, match="disc_auxiliary_loss"):
        migrate(_cfg("sngan_r1"), strict=True)


def test_families_with_built_in_aux_losses_keep_the_note():
    # PGGAN, StyleGAN v1 and SinGAN hard-code their auxiliary losses in 1.x (a known gap:
    # the weights are not compared); that stays a note.
    r = migrate(str(FAMILIES / "singan.py"))
    assert any("built into" in n for n in r.notes), r.notes
    assert not any("auxiliary_loss" in w for w in r.warnings), r.warnings


# --------------------------------------------------------------- 2. GANLoss settings dropped
def test_gan_loss_weight_is_not_dropped_silently():
    # The 1.x classes hard-code their GAN loss with weight 1; a 0.x
    # GANLoss(loss_weight=0.5) was dropped with a note "built in".
    r = migrate(_cfg("sngan_r1"))
    warned = [w for w in r.warnings if w.startswith("model.gan_loss")]
    assert len(warned) == 1 and "loss_weight=0.5" in warned[0], r.warnings
    assert any(i.path == "model.gan_loss" for i in r.untranslated)


def test_gan_loss_with_default_settings_is_still_a_note():
    cfg = dict(model=dict(type='BasiccGAN',
                          generator=dict(type='SNGANGenerator', output_scale=32),
                          discriminator=dict(type='ProjDiscriminator', input_scale=32),
                          gan_loss=dict(type='GANLoss', gan_type='hinge', loss_weight=1,
                                        real_label_val=1.0, fake_label_val=0.0)),
               optimizer=dict(generator=dict(type='Adam', lr=2e-4),
                              discriminator=dict(type='Adam', lr=2e-4)),
               total_iters=10)
    r = convert(cfg)
    assert not r.warnings, r.warnings
    assert any("model.gan_loss (hinge) dropped" in n for n in r.notes)


# --------------------------------------------------------------- 3. grey images called BGR
def test_grey_images_are_not_given_a_colour_order():
    # dcgan_mnist-64 loads flag='grayscale': one channel, no colour order. The migration
    # wrote output_channel_order='BGR' with a note "trained on BGR images".
    r = migrate(_cfg("dcgan_grey"))
    dp = r.config["model"]["data_preprocessor"]
    assert "output_channel_order" not in dp, dp
    assert not any("trained on BGR" in n for n in r.notes), r.notes
    assert any("grayscale" in n for n in r.notes), r.notes


# --------------------------------------------------------------- 4. unclear error
def test_a_gan_loss_that_is_not_a_dict_gives_a_clear_error(tmp_path, capsys):
    src = tmp_path / "bad.py"
    src.write_text(
        "model = dict(type='StaticUnconditionalGAN', generator=dict(type='DCGANGenerator'),"
        " discriminator=dict(type='DCGANDiscriminator'), gan_loss='vanilla')\n"
        "optimizer = dict(generator=dict(type='Adam'), discriminator=dict(type='Adam'))\n")
    assert migrate_cli.main([str(src)]) == 1
    err = capsys.readouterr().err
    assert "AttributeError" not in err and "no known 1.x model" in err, err
    assert "gan_loss" in err


# --------------------------------------------------------------- 5. ramp-up EMA buffers
def _stylegan3_with_hook(**interp_cfg):
    from mmengine import Config

    cfg = Config.fromfile(str(FAMILIES / "stylegan3.py")).to_dict()
    hook = next(h for h in cfg["custom_hooks"] if h["type"] == "ExponentialMovingAverageHook")
    assert hook["momentum_policy"] == "rampup"
    hook["interp_cfg"] = interp_cfg
    return cfg


def test_rampup_ema_with_buffer_momentum_warns():
    # Under 'rampup' 0.x ramped only the trainable momentum; buffers kept
    # momentum_nontrainable. A value equal to the (unused) fixed momentum 0.999 passed as
    # "update_buffers=True", which RampUpEMA was not even given: buffers copied, no warning.
    r = convert(_stylegan3_with_hook(momentum_nontrainable=0.999))
    ema = r.config["model"]["ema_config"]
    assert ema["type"] == "RampUpEMA" and not ema.get("update_buffers", False)
    assert any("momentum_nontrainable=0.999" in w and "rampup" in w for w in r.warnings), \
        r.warnings
    # The 0.x default (buffers copied) stays silent.
    r = convert(_stylegan3_with_hook())
    assert not any("momentum_nontrainable" in w for w in r.warnings), r.warnings


# --------------------------------------------------------------- 6. path regulariser settings
def test_path_regularizer_settings_1x_hard_codes_are_not_dropped_silently():
    from mmengine import Config

    cfg = Config.fromfile(str(FAMILIES / "stylegan2.py")).to_dict()
    cfg["model"]["gen_auxiliary_loss"].update(decay=0.05, sync_mean_buffer=True)
    r = convert(cfg)
    assert r.config["model"]["loss_config"]["g_reg_interval"] == \
        cfg["model"]["gen_auxiliary_loss"]["interval"]  # the rest still translated
    warned = [w for w in r.warnings if "gen_auxiliary_loss" in w]
    assert len(warned) == 1 and "decay=0.05" in warned[0] and "sync_mean_buffer=True" \
        in warned[0], r.warnings
    with pytest.raises(MigrationError, match="decay=0.05"):
        convert(cfg, strict=True)
