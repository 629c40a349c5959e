"""0.x ``train_cfg`` -> the 1.x schedule: step counts, accumulation, schedule model args.

``translate_train_cfg`` returns a :class:`Steps`. Besides the step counts it
carries the 1.x model arguments that 0.x kept in ``train_cfg`` (``model_args``),
the per-network optimizers that PGGAN / StyleGAN v1 / SinGAN kept there
(``optimizers``, ``lr_schedule``) and the factor from 0.x ``total_iters`` to 1.x
``max_iters`` (``iter_factor``: SinGAN ran all its D and G steps in one 0.x
iteration, 1.x runs one D step per iteration).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .common import Ctx, MigrationError, is_pos_int
from .families import Family


@dataclass
class Steps:
    d0: int = 1  # 0.x disc_steps
    g0: int = 1  # 0.x gen_steps
    accu: int = 1  # accumulative_counts on the G and D wrappers
    disc_steps: int = 1  # 1.x model.discriminator_steps
    gen_steps: int = 1  # 1.x model.generator_steps
    use_ema: bool = False
    iter_factor: int = 1  # 1.x max_iters = 0.x total_iters * iter_factor
    model_args: Dict[str, Any] = field(default_factory=dict)  # 1.x model keys from train_cfg
    optimizers: Optional[Dict[str, dict]] = None  # optimizers 0.x kept in train_cfg
    lr_schedule: Optional[Dict[str, dict]] = None  # PGGAN per-scale lrs
    extra_optim: Dict[str, Any] = field(default_factory=dict)  # other optim_wrapper keys
    where: str = "train_cfg"  # the 0.x dict they come from (or model.train_cfg), for messages

    @property
    def phase(self) -> int:
        """Iterations per 1.x generator phase (discriminator_steps * accumulative_counts)."""
        return self.disc_steps * self.accu


def _pos_int(train_cfg: dict, key: str, where: str, default: int = 1) -> int:
    v = train_cfg.pop(key, default)
    if not is_pos_int(v):
        raise MigrationError(f"{where}.{key} must be a positive integer, got {v!r}")
    return v


def translate_train_cfg(train_cfg: Any, family: Optional[Family], ctx: Ctx,
                        where: str = "train_cfg") -> Steps:
    """``where``: the name of the 0.x dict, for messages (``model.train_cfg`` when
    the model dict has one: see core._effective_train_cfg)."""
    if train_cfg is None:
        train_cfg = {}
    if not isinstance(train_cfg, dict):
        ctx.refuse(f"{where}={train_cfg!r} is not a dict",
                   f"Write the 0.x {where} as dict(...) and rerun")
    cfg = dict(train_cfg)
    steps = Steps(use_ema=bool(cfg.pop("use_ema", False)), where=where)
    schedule = family.schedule if family is not None else "conditional"
    if schedule in ("conditional", "static", "translation"):
        steps.d0 = _pos_int(cfg, "disc_steps", where)
        steps.g0 = _pos_int(cfg, "gen_steps", where)
        steps.accu = _pos_int(cfg, "batch_accumulation_steps", where)
    if family is None:
        return steps
    _BY_SCHEDULE[schedule](cfg, steps, family, ctx)
    for key, value in cfg.items():
        ctx.keep(f"{where}.{key}", value,
                 f"0.x {family.name} training option with no 1.x {family.new_type} argument")
        ctx.warn(f"{where}.{key}={value!r} is not translated: the 1.x {family.new_type} "
                 f"model has no such argument")
    return steps


def _conditional(cfg: dict, steps: Steps, family: Family, ctx: Ctx) -> None:
    d0, accu = steps.d0, steps.accu
    steps.gen_steps = steps.g0
    ds = d0 // accu
    if d0 % accu:
        shown = f"{d0} // {accu} = {ds}"
        if ds < 1:
            shown += ", raised to the minimum 1"
            ds = 1
        ctx.warn(
            f"{steps.where}: disc_steps={d0} is not a multiple of batch_accumulation_steps={accu}. "
            f"0.x updated the generator every {d0} iterations; 1.x runs the generator phase "
            f"every discriminator_steps * accumulative_counts iterations, always a multiple of "
            f"{accu}. Rounded: model.discriminator_steps = {shown}, so the generator now "
            f"updates every {ds * accu} iterations instead of every {d0}.")
    steps.disc_steps = ds


def _drop_ignored(steps: Steps, family: Family, ctx: Ctx, keys=("gen_steps",
                                                                 "batch_accumulation_steps")):
    for key in keys:
        v = steps.g0 if key == "gen_steps" else steps.accu
        if v != 1:
            ctx.warn(f"{steps.where}.{key}={v} dropped: the 0.x {family.name} model ignored it, "
                     f"so the 1.x config does not use it either")
    steps.g0, steps.accu, steps.gen_steps = 1, 1, 1


def _static(cfg: dict, steps: Steps, family: Family, ctx: Ctx) -> None:
    _drop_ignored(steps, family, ctx)
    steps.disc_steps = steps.d0
    if family.new_type == "MSPIEStyleGAN2":
        settings = {k: cfg.pop(k) for k in ("num_upblocks", "multi_input_scales",
                                            "multi_scale_probability") if k in cfg}
        if settings:
            steps.model_args["train_settings"] = settings


def _translation(cfg: dict, steps: Steps, family: Family, ctx: Ctx) -> None:
    _drop_ignored(steps, family, ctx)
    steps.disc_steps = steps.d0
    if "disc_init_steps" in cfg:
        steps.model_args["disc_init_steps"] = cfg.pop("disc_init_steps")
    if "real_img_key" in cfg:
        steps.model_args["real_img_key"] = cfg.pop("real_img_key")
    if "buffer_size" in family.accepts and "buffer_size" in cfg:
        size = cfg.pop("buffer_size")
        if size != 50:  # the 1.x default, which MMagic's configs leave out
            steps.model_args["buffer_size"] = size


def _progressive(cfg: dict, steps: Steps, family: Family, ctx: Ctx) -> None:
    for key in ("disc_steps", "gen_steps", "batch_accumulation_steps"):
        if cfg.get(key, 1) != 1:
            ctx.refuse(f"{steps.where}.{key}={cfg[key]!r}: the 1.x {family.new_type} model takes "
                       f"no step counts (it trains one D and one G step per iteration)",
                       f"Remove {steps.where}.{key} from the 0.x config to migrate it with "
                       f"one step each")
        cfg.pop(key, None)
    opt = cfg.pop("optimizer_cfg", None)
    if not (isinstance(opt, dict) and all(isinstance(opt.get(k), dict) for k in
                                          ("generator", "discriminator"))):
        ctx.refuse(f"0.x {family.name} builds its optimizers from {steps.where}.optimizer_cfg, "
                   f"which is {opt!r}",
                   f"Give {steps.where}.optimizer_cfg=dict(generator=dict(type='Adam', ...), "
                   "discriminator=dict(...))")
    for key, value in opt.items():
        if not isinstance(value, dict):
            ctx.refuse(f"{steps.where}.optimizer_cfg.{key}={value!r} is not an optimizer dict",
                       "optimizer_cfg holds one optimizer dict per network (generator, "
                       "discriminator); remove the other entries")
    steps.optimizers = {k: dict(v) for k, v in opt.items()}
    for key, who in (("g_lr_base", "generator"), ("d_lr_base", "discriminator")):
        if key in cfg:
            base = cfg.pop(key)
            lr = steps.optimizers[who].get("lr")
            if base != lr:
                ctx.warn(f"{steps.where}.{key}={base} differs from optimizer_cfg.{who}.lr={lr}: "
                         f"0.x used {key} for the scales without a scheduled lr, 1.x uses the "
                         f"optimizer's lr; written as lr={base}")
                steps.optimizers[who]["lr"] = base
    schedule = {who: cfg.pop(key) for key, who in (("g_lr_schedule", "generator"),
                                                    ("d_lr_schedule", "discriminator"))
                if key in cfg}
    steps.lr_schedule = schedule or None
    if "reset_optim_for_new_scale" in cfg:
        steps.extra_optim["reset_optim_for_new_scale"] = cfg.pop("reset_optim_for_new_scale")
    for key in ("nkimgs_per_scale", "transition_kimgs", "prev_stage", "interp_real"):
        if key in cfg:
            steps.model_args[key] = cfg.pop(key)
    if "nkimgs_per_scale" not in steps.model_args:
        ctx.refuse(f"0.x {family.name} without {steps.where}.nkimgs_per_scale",
                   f"Add nkimgs_per_scale (kimgs per resolution) to {steps.where}")


def _singan(cfg: dict, steps: Steps, family: Family, ctx: Ctx) -> None:
    if "gen_steps" in cfg:
        ctx.warn(f"{steps.where}.gen_steps={cfg.pop('gen_steps')!r} dropped: 0.x SinGAN reads "
                 f"generator_steps, not gen_steps")
    for key in ("disc_steps", "generator_steps", "lr_g", "lr_d", "iters_per_scale"):
        if key not in cfg:
            ctx.refuse(f"0.x SinGAN needs {steps.where}.{key} (its train_step reads it) and the "
                       f"config has none", f"Add {steps.where}.{key} as the 0.x run used it")
    d0, g0 = _pos_int(cfg, "disc_steps", steps.where), _pos_int(cfg, "generator_steps", steps.where)
    if cfg.get("batch_accumulation_steps", 1) != 1:
        ctx.refuse(f"{steps.where}.batch_accumulation_steps with SinGAN: the 1.x SinGAN asserts "
                   "accumulative_counts == 1", "Remove batch_accumulation_steps")
    cfg.pop("batch_accumulation_steps", None)
    # 0.x: one iteration = d0 D updates then g0 G updates. 1.x: one D update per
    # iteration, g0 G updates every d0 iterations; a scale lasts iters_per_scale * d0
    # iterations and the lr scheduler steps every d0 iterations, so its milestones
    # (counted in 0.x iterations) keep their meaning.
    steps.d0, steps.g0 = d0, g0
    steps.disc_steps, steps.gen_steps, steps.iter_factor = d0, g0, d0
    curr = cfg.pop("curr_scale", -1)
    if curr != -1:
        ctx.refuse(f"{steps.where}.curr_scale={curr}: the 1.x SinGAN always starts at scale 0",
                   "Resume the 1.x run from a 1.x checkpoint instead, or set curr_scale=-1")
    steps.model_args["iters_per_scale"] = cfg.pop("iters_per_scale")
    for key in ("noise_weight_init", "lr_scheduler_args", "fixed_noise_with_pad",
                "first_fixed_noises_ch"):
        if key in cfg and key in family.accepts:
            steps.model_args[key] = cfg.pop(key)
    # 0.x SinGAN built Adam(lr, betas=(0.5, 0.999)) for each scale itself.
    steps.optimizers = {who: dict(type="Adam", lr=cfg.pop(key), betas=(0.5, 0.999))
                        for who, key in (("generator", "lr_g"), ("discriminator", "lr_d"))}
    ctx.note(f"0.x SinGAN ran disc_steps={d0} D and generator_steps={g0} G updates in each "
             f"iteration; 1.x runs one D update per iteration, so max_iters = total_iters * "
             f"{d0} and each scale lasts iters_per_scale * {d0} iterations")


_BY_SCHEDULE = dict(conditional=_conditional, static=_static, translation=_translation,
                    progressive=_progressive, singan=_singan)
