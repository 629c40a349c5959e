"""The 0.x ``model`` dict -> the 1.x model dict of its family (see :mod:`.families`).

Only keys the 1.x class accepts are written (``Family.accepts``); everything
else is kept, commented out, with the reason. The 0.x ``gan_loss`` and the
auxiliary losses become the 1.x ``loss_config`` where the 1.x class takes one,
or are dropped when the 1.x class hard-codes the same loss.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .common import Ctx, type_of
from .families import Family
from .schedule import Steps


def _network(name: str, cfg: Any, ctx: Ctx) -> Any:
    if not isinstance(cfg, dict):
        return cfg
    cfg = dict(cfg)
    user_init_cfg = "init_cfg" in cfg
    if "pretrained" in cfg:
        p = cfg.pop("pretrained")
        if p is not None:
            if "init_cfg" in cfg:
                ctx.keep(f"model.{name}.pretrained", p,
                         "both pretrained and init_cfg are set; merge them by hand")
                ctx.warn(f"model.{name}: pretrained={p!r} not converted because init_cfg is "
                         f"already set")
            else:
                cfg["init_cfg"] = dict(type="Pretrained", checkpoint=p)
                ctx.note(f"model.{name}.pretrained -> init_cfg=dict(type='Pretrained', "
                         f"checkpoint={p!r})")
    if "init_type" in cfg:
        # 0.x BigGAN spelling; MMagic's 1.x networks take only init_cfg=dict(type=...).
        t = cfg.pop("init_type")
        if user_init_cfg:
            ctx.keep(f"model.{name}.init_type", t, "both init_type and init_cfg are set; "
                                                  "merge them by hand")
            ctx.warn(f"model.{name}: init_type={t!r} not converted because init_cfg is "
                     f"already set")
        elif "init_cfg" in cfg:  # from pretrained, which 0.x loaded instead of init_type
            ctx.note(f"model.{name}.init_type={t!r} dropped: 0.x loads the pretrained "
                     f"weights instead")
        elif isinstance(t, str):
            cfg["init_cfg"] = dict(type=t)
            ctx.note(f"model.{name}.init_type={t!r} -> init_cfg=dict(type={t!r})")
        else:
            ctx.keep(f"model.{name}.init_type", t, "not an init method name")
            ctx.warn(f"model.{name}: init_type={t!r} is not converted (not a string)")
    return cfg


def _num_classes(model: dict, gen: Any, disc: Any, ctx: Ctx) -> Optional[int]:
    found = [(where, c.get("num_classes")) for where, c in
             (("model.generator", gen), ("model", model), ("model.discriminator", disc))
             if isinstance(c, dict) and c.get("num_classes") is not None]
    if not found:
        return None
    where, n = found[0]
    others = {w: v for w, v in found[1:] if v != n}
    if others:
        ctx.warn(f"num_classes differs: {where}={n} but "
                 + ", ".join(f"{w}={v}" for w, v in others.items())
                 + f"; the 1.x model uses {n} (from {where})")
    return n


def _as_list(x: Any) -> List[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def translate_model(model: dict, family: Family, steps: Steps, ctx: Ctx) -> dict:
    model = dict(model)
    old_type = model.pop("type", None)
    gen = _network("generator", model.pop("generator", None), ctx)
    disc = _network("discriminator", model.pop("discriminator", None), ctx)
    if old_type != family.new_type:
        ctx.note(f"model.type {old_type!r} -> {family.new_type!r} ({family.name})")

    out: Dict[str, Any] = {"type": family.new_type}
    n = _num_classes(model, gen, disc, ctx)
    model.pop("num_classes", None)
    if n is not None and "num_classes" in family.accepts:
        out["num_classes"] = n
    if "data_preprocessor" in model:
        out["data_preprocessor"] = model.pop("data_preprocessor")
    elif family.schedule == "singan":
        out["data_preprocessor"] = dict(type="DataPreprocessor", non_image_keys=["input_sample"])
    elif family.schedule == "translation":
        domains = model.get("related_domains") or []
        out["data_preprocessor"] = dict(type="DataPreprocessor",
                                        data_keys=[f"img_{d}" for d in domains])
    else:
        out["data_preprocessor"] = dict(type="DataPreprocessor")
    if family.schedule == "translation":
        for key in ("default_domain", "reachable_domains", "related_domains"):
            if key not in model:
                ctx.refuse(f"0.x {family.name} without model.{key}",
                           f"Add model.{key}; the 1.x {family.new_type} requires it")
            out[key] = model.pop(key)
    if gen is not None:
        out["generator"] = gen
    if disc is not None:
        out["discriminator"] = disc

    # Arguments the 1.x class derives from the networks in 0.x.
    if family.schedule == "progressive":
        g = gen if isinstance(gen, dict) else {}
        if "noise_size" in family.accepts and g.get("noise_size") is not None:
            out["noise_size"] = g["noise_size"]
        if "style_channels" in family.accepts and g.get("style_channels") is not None:
            out["style_channels"] = g["style_channels"]
    if family.schedule == "singan":
        scales = gen.get("num_scales") if isinstance(gen, dict) else None
        if scales is None:
            ctx.refuse("0.x SinGAN without model.generator.num_scales",
                       "Set generator.num_scales; the 1.x SinGAN needs num_scales")
        out["num_scales"] = scales
    if "generator_steps" in family.accepts:
        out["generator_steps"] = steps.gen_steps
    if "discriminator_steps" in family.accepts:
        out["discriminator_steps"] = steps.disc_steps
    out.update(steps.model_args)

    _losses(model, family, out, ctx)
    for key, value in model.items():
        ctx.keep(f"model.{key}", value, f"0.x model option with no 1.x {family.new_type} "
                                        f"argument")
        ctx.warn(f"model.{key} is not translated: the 1.x {family.new_type} model has no "
                 f"such argument")
    bad = sorted(k for k in out if k != "type" and k not in family.accepts)
    if bad:  # a bug in a translation step, never a user error
        ctx.refuse(f"internal: the migrated model has {bad}, which the 1.x "
                   f"{family.new_type} does not accept", "Report this as a bug")
    return out


# ----------------------------------------------------------------------------- losses
#: MMGeneration 0.x GANLoss's settings besides gan_type, at their defaults.
_GAN_LOSS_DEFAULTS = dict(loss_weight=1.0, real_label_val=1.0, fake_label_val=0.0)

#: 0.x auxiliary-loss settings (at their 0.x defaults) that no 1.x loss_config key sets:
#: MMagic's StyleGAN2 calls gen_path_regularizer with these defaults.
_HARD_CODED = dict(
    GeneratorPathRegularizer=dict(decay=0.01, pl_batch_size=None, sync_mean_buffer=False),
    # MMagic's Pix2Pix and CycleGAN take the mean absolute error, weighted.
    L1Loss=dict(reduction="mean", avg_factor=None))


def _off_defaults(cfg: dict, defaults: dict) -> dict:
    """The settings of `cfg` that `defaults` lists, where they differ from it."""
    return {k: cfg[k] for k in defaults if k in cfg and cfg[k] != defaults[k]}


def _losses(model: dict, family: Family, out: dict, ctx: Ctx) -> None:
    if "gan_loss" in model:
        loss = model.pop("gan_loss")
        gan_type = loss.get("gan_type") if isinstance(loss, dict) else None
        # GANLoss's other settings at their defaults: the 1.x classes hard-code those too.
        changed = _off_defaults(loss, _GAN_LOSS_DEFAULTS) if isinstance(loss, dict) else {}
        if type_of(loss) != "GANLoss":  # a loss class of the project's own
            ctx.keep("model.gan_loss", loss, f"the 1.x {family.new_type} model always uses "
                                             f"its built-in {family.builtin_loss} GANLoss")
            ctx.warn(f"model.gan_loss is {type_of(loss)!r}, not MMGeneration's GANLoss, but "
                     f"the 1.x {family.new_type} model always uses its built-in "
                     f"{family.builtin_loss!r} loss; the 0.x loss is not reproduced")
        elif family.builtin_loss == gan_type and not changed:
            ctx.note(f"model.gan_loss ({gan_type}) dropped: the 1.x {family.new_type} model "
                     f"has it built in")
        elif family.builtin_loss == gan_type:
            ctx.keep("model.gan_loss", loss, f"the 1.x {family.new_type} model hard-codes the "
                                             f"{gan_type} loss with GANLoss's defaults")
            ctx.warn("model.gan_loss has " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
                     + f", but the 1.x {family.new_type} model hard-codes the {gan_type} loss "
                       f"with {', '.join(f'{k}={_GAN_LOSS_DEFAULTS[k]!r}' for k in changed)}; "
                       f"the 0.x setting is not reproduced")
        else:
            ctx.keep("model.gan_loss", loss, f"the 1.x {family.new_type} model always uses "
                                             f"the {family.builtin_loss} loss")
            ctx.warn(f"model.gan_loss has gan_type={gan_type!r}, but the 1.x "
                     f"{family.new_type} model always uses the {family.builtin_loss!r} loss; "
                     f"the 0.x loss is not reproduced")
    aux = []
    for key in ("disc_auxiliary_loss", "gen_auxiliary_loss"):
        value = model.pop(key, None)
        many = isinstance(value, (list, tuple))
        aux += [(f"model.{key}[{i}]" if many else f"model.{key}", cfg)
                for i, cfg in enumerate(_as_list(value))]
    if not aux:
        return
    if family.loss is None and family.builtin_aux:
        for path, cfg in aux:
            ctx.keep(path, cfg, f"the 1.x {family.new_type} model builds its auxiliary "
                                f"losses in and takes no loss_config")
        ctx.note(f"the 0.x auxiliary losses are built into the 1.x {family.new_type} model; "
                 f"compare their weights with the 0.x values kept at the end")
        return
    if family.loss is None:
        for path, cfg in aux:
            ctx.keep(path, cfg, f"the 1.x {family.new_type} model has no auxiliary losses "
                                f"and takes no loss_config")
            ctx.warn(f"{path} {type_of(cfg)!r} is not translated: the 1.x {family.new_type} "
                     f"model computes only its {family.builtin_loss} GAN loss, so the 0.x "
                     f"auxiliary loss is not reproduced")
        return
    loss_config: Dict[str, Any] = {}
    for path, cfg in aux:
        if not _LOSS_RULES[family.loss](cfg, loss_config):
            ctx.keep(path, cfg, f"no 1.x {family.new_type} loss_config key for it")
            ctx.warn(f"{path} {type_of(cfg)!r} is not translated: the 1.x {family.new_type} "
                     f"loss_config has no setting for it")
            continue
        # Settings of a translated loss that the 1.x class hard-codes.
        fixed = _HARD_CODED.get(type_of(cfg), {})
        changed = _off_defaults(cfg, fixed)
        if changed:
            ctx.keep(path, cfg, f"the 1.x {family.new_type} model hard-codes "
                                + ", ".join(f"{k}={fixed[k]!r}" for k in changed))
            ctx.warn(f"{path}: " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
                     + f" is not translated: the 1.x {family.new_type} model hard-codes "
                     + ", ".join(f"{k}={fixed[k]!r}" for k in changed))
    if family.loss == "cyclegan":
        loss_config.setdefault("id_loss_weight", 0.0)  # 0.x without an id loss
    if loss_config:
        out["loss_config"] = loss_config


def _wgangp(cfg: dict, lc: dict) -> bool:
    if type_of(cfg) != "GradientPenaltyLoss":
        return False
    lc["gp_norm_mode"] = cfg.get("norm_mode", "pixel")
    lc["gp_loss_weight"] = cfg.get("loss_weight", 1.0)
    return True


def _stylegan(cfg: dict, lc: dict) -> bool:
    t = type_of(cfg)
    if t == "R1GradientPenalty":
        lc["r1_loss_weight"] = cfg.get("loss_weight", 1.0)
        lc["r1_interval"] = cfg.get("interval", 1)
        lc["norm_mode"] = cfg.get("norm_mode", "pixel")
        if cfg.get("use_apex_amp"):
            lc["r1_use_apex_amp"] = True
        return True
    if t == "GeneratorPathRegularizer":
        lc["g_reg_interval"] = cfg.get("interval", 1)
        lc["g_reg_weight"] = cfg.get("loss_weight", 1.0)
        lc["pl_batch_shrink"] = cfg.get("pl_batch_shrink", 1)
        if cfg.get("use_apex_amp"):
            lc["g_reg_use_apex_amp"] = True
        return True
    return False


def _named_l1(cfg: dict, lc: dict, names: Dict[str, str]) -> bool:
    key = names.get(cfg.get("loss_name")) if type_of(cfg) == "L1Loss" else None
    if key is None:
        return False
    weight = float(cfg.get("loss_weight", 1.0))
    if lc.get(key, weight) != weight:
        return False  # two different weights for one 1.x setting
    lc[key] = weight
    return True


_LOSS_RULES = dict(
    wgangp=_wgangp, stylegan=_stylegan,
    cyclegan=lambda c, lc: _named_l1(c, lc, dict(cycle_loss="cycle_loss_weight",
                                                 id_loss="id_loss_weight")),
    pix2pix=lambda c, lc: _named_l1(c, lc, dict(pixel_loss="pixel_loss_weight")))
