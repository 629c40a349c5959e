"""The family table: every MMGeneration 0.x model family and what it becomes in 1.x.

One row per family. A row names the 0.x model it matches, the 1.x model type
(as MMagic 1.x registers it), the arguments that 1.x class accepts (read from
its ``__init__``: the tool never writes a model key outside this set), how the
0.x schedule keys translate (``schedule``), the optim_wrapper keys and
constructor, and who registers the 1.x model (``needs``: ``'pygan_optim'`` when
this package implements it, else ``'mmagic'``). A family that cannot be
migrated has ``refused`` set to the reason and what to do instead.

Schedules (what ``train_cfg`` means in 0.x and becomes in 1.x):

* ``conditional``  BasiccGAN: ``disc_steps`` counts iterations, ``gen_steps``
  and ``batch_accumulation_steps`` are honoured -> ``discriminator_steps =
  disc_steps // accumulation``, ``generator_steps``, ``accumulative_counts``.
* ``static``       StaticUnconditionalGAN (and MSPIE): ``gen_steps`` and the
  accumulation were ignored in 0.x -> ``discriminator_steps = disc_steps``.
* ``translation``  CycleGAN / Pix2Pix: ``disc_steps``, ``disc_init_steps``,
  ``real_img_key`` (CycleGAN: ``buffer_size``); the 1.x classes take
  ``discriminator_steps`` and no ``generator_steps``.
* ``progressive``  PGGAN / StyleGAN v1: no step keys; the optimizers live in
  ``train_cfg.optimizer_cfg`` with per-scale lrs (``g_lr_schedule``...).
* ``singan``       SinGAN: ``disc_steps`` D updates and ``generator_steps`` G
  updates inside ONE 0.x iteration; 1.x runs one D update per iteration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, FrozenSet, Optional, Tuple

from .common import type_of

_BASE_GAN = frozenset({"generator", "discriminator", "data_preprocessor", "generator_steps",
                       "discriminator_steps", "noise_size", "ema_config", "loss_config"})
_COND_GAN = frozenset({"generator", "discriminator", "data_preprocessor", "generator_steps",
                       "discriminator_steps", "noise_size", "num_classes", "ema_config"})
_STYLEGAN2 = frozenset({"generator", "discriminator", "data_preprocessor", "generator_steps",
                        "discriminator_steps", "ema_config", "loss_config"})
_PGGAN = frozenset({"generator", "discriminator", "data_preprocessor", "nkimgs_per_scale",
                    "noise_size", "interp_real", "transition_kimgs", "prev_stage", "ema_config"})
_SINGAN = frozenset({"generator", "discriminator", "data_preprocessor", "generator_steps",
                     "discriminator_steps", "num_scales", "iters_per_scale",
                     "noise_weight_init", "lr_scheduler_args", "test_pkl_data"})
_TRANSLATION = frozenset({"generator", "discriminator", "default_domain", "reachable_domains",
                          "related_domains", "data_preprocessor", "discriminator_steps",
                          "disc_init_steps", "real_img_key", "loss_config"})

_LOGISTIC = "wgan-logistic-ns"  # the non-saturating logistic loss of the StyleGANs
GD = ("generator", "discriminator")
GDS = ("generators", "discriminators")
MULTI = "MultiOptimWrapperConstructor"


@dataclass(frozen=True)
class Family:
    name: str  # what the README and the messages call it
    new_type: str  # the 1.x model type
    accepts: FrozenSet[str]  # the 1.x model's __init__ arguments
    schedule: str  # see the module docstring
    optim_keys: Tuple[str, ...] = GD
    constructor: str = MULTI
    needs: str = "mmagic"
    builtin_loss: Optional[str] = None  # the 0.x gan_type the 1.x class hard-codes
    loss: Optional[str] = None  # which 0.x loss settings become loss_config
    refused: Optional[str] = None
    # The 1.x class hard-codes auxiliary losses of its own (PGGAN, StyleGAN v1, SinGAN);
    # without them (and without ``loss``) a 0.x auxiliary loss is simply not reproduced.
    builtin_aux: bool = False


def _g(cfg) -> Optional[str]:
    return type_of(cfg.get("generator")) if isinstance(cfg, dict) else None


def _gan_type(cfg) -> Optional[str]:
    loss = cfg.get("gan_loss") if isinstance(cfg, dict) else None
    return loss.get("gan_type") if isinstance(loss, dict) else None


#: (row, matcher on the 0.x model dict). The first row whose matcher accepts wins.
TABLE: Tuple[Tuple[Family, Callable[[dict], bool]], ...] = (
    (Family("BigGAN", "BigGAN", _COND_GAN, "conditional", needs="pygan_optim",
            builtin_loss="hinge"),
     lambda m: m.get("type") == "BasiccGAN" and _g(m) == "BigGANGenerator"
     and type_of(m.get("discriminator")) == "BigGANDiscriminator"),
    (Family("BigGAN-deep", "BigGAN", _COND_GAN, "conditional", builtin_loss="hinge"),
     lambda m: m.get("type") == "BasiccGAN" and _g(m) in ("BigGANGenerator",
                                                          "BigGANDeepGenerator")),
    (Family("SNGAN (projection)", "SNGAN", _COND_GAN, "conditional", builtin_loss="hinge"),
     lambda m: m.get("type") == "BasiccGAN" and _g(m) == "SNGANGenerator"),
    (Family("SAGAN", "SAGAN", _COND_GAN, "conditional", builtin_loss="hinge"),
     lambda m: m.get("type") == "BasiccGAN" and _g(m) == "SAGANGenerator"),
    (Family("StyleGAN v2", "StyleGAN2", _STYLEGAN2, "static", builtin_loss=_LOGISTIC,
            loss="stylegan"),
     lambda m: m.get("type") == "StaticUnconditionalGAN" and _g(m) == "StyleGANv2Generator"),
    (Family("StyleGAN v3", "StyleGAN3", _STYLEGAN2 | {"forward_kwargs"}, "static",
            builtin_loss=_LOGISTIC, loss="stylegan"),
     lambda m: m.get("type") == "StaticUnconditionalGAN" and _g(m) == "StyleGANv3Generator"),
    (Family("MSPIE StyleGAN v2", "MSPIEStyleGAN2", _STYLEGAN2 | {"train_settings"}, "static",
            builtin_loss=_LOGISTIC, loss="stylegan"),
     lambda m: m.get("type") == "MSPIEStyleGAN2"),
    (Family("WGAN-GP", "WGANGP", _BASE_GAN, "static", builtin_loss="wgan", loss="wgangp"),
     lambda m: m.get("type") == "StaticUnconditionalGAN" and _gan_type(m) == "wgan"),
    (Family("DCGAN", "DCGAN", _BASE_GAN, "static", builtin_loss="vanilla"),
     lambda m: m.get("type") == "StaticUnconditionalGAN" and _gan_type(m) == "vanilla"),
    (Family("LSGAN", "LSGAN", _BASE_GAN, "static", builtin_loss="lsgan"),
     lambda m: m.get("type") == "StaticUnconditionalGAN" and _gan_type(m) == "lsgan"),
    (Family("GGAN", "GGAN", _BASE_GAN, "static", builtin_loss="hinge"),
     lambda m: m.get("type") == "StaticUnconditionalGAN" and _gan_type(m) == "hinge"),
    (Family("PGGAN", "ProgressiveGrowingGAN", _PGGAN, "progressive",
            constructor="PGGANOptimWrapperConstructor", builtin_loss="wgan", builtin_aux=True),
     lambda m: m.get("type") in ("ProgressiveGrowingGAN", "PGGAN")),
    (Family("StyleGAN v1", "StyleGANv1", (_PGGAN - {"noise_size"}) | {"style_channels"},
            "progressive", constructor="PGGANOptimWrapperConstructor",
            builtin_loss=_LOGISTIC, builtin_aux=True),
     lambda m: m.get("type") in ("StyleGANV1", "StyleGANv1")),
    (Family("SinGAN", "SinGAN", _SINGAN, "singan", constructor="SinGANOptimWrapperConstructor",
            builtin_loss="wgan", builtin_aux=True),
     lambda m: m.get("type") == "SinGAN"),
    (Family("SinGAN with positional encoding", "PESinGAN",
            _SINGAN | {"fixed_noise_with_pad", "first_fixed_noises_ch"}, "singan",
            constructor="SinGANOptimWrapperConstructor", builtin_loss="wgan", builtin_aux=True),
     lambda m: m.get("type") == "PESinGAN"),
    (Family("CycleGAN", "CycleGAN", _TRANSLATION | {"buffer_size"}, "translation", GDS,
            builtin_loss="lsgan", loss="cyclegan"),
     lambda m: m.get("type") == "CycleGAN"),
    (Family("Pix2Pix", "Pix2Pix", _TRANSLATION, "translation", GDS, builtin_loss="vanilla",
            loss="pix2pix"),
     lambda m: m.get("type") == "Pix2Pix"),
    (Family("Improved DDPM", "", frozenset(), "diffusion", refused=(
        "MMagic 1.x has no training model for MMGeneration's BasicGaussianDiffusion (its "
        "diffusion models are inference pipelines with a different UNet and scheduler "
        "API), so there is no 1.x config to translate to. Keep training it with "
        "MMGeneration 0.x, or write a 1.x config by hand around MMagic's DenoisingUnet "
        "and a diffusion scheduler")),
     lambda m: m.get("type") == "BasicGaussianDiffusion"),
)


def find_family(model: dict) -> Optional[Family]:
    """The table row for a 0.x model dict, or None when no family matches."""
    for family, matches in TABLE:
        if matches(model):
            return family
    return None


def families() -> Tuple[Family, ...]:
    return tuple(f for f, _ in TABLE)
