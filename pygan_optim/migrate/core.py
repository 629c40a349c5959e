"""The driver: read the 0.x config, find its family, run each translation step.

Order matters: the family decides how ``train_cfg`` reads; the step counts
decide the EMA units and the accumulation on the wrappers; the wrappers'
learning rates feed the ``Linear`` lr policy; ``iter_factor`` scales the runtime
intervals (checkpoint, log, evaluation) as it scales ``max_iters``.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from .common import Ctx, MigrationError, MigrationResult, plain, type_of
from .default_hooks import translate_checkpoint_config, translate_log_config
from .families import find_family
from .hooks import translate_hooks
from .lr import translate_lr_config
from .model import translate_model
from .optimizers import apply_amp, translate_optimizer
from .output import render
from .pipeline import Preparation, read_preparation
from .reader import read_config
from .runtime import keep_the_rest, translate_evaluation, translate_runner, \
    translate_total_iters
from .schedule import translate_train_cfg


def _gan_loss_type(loss: Any) -> Any:
    """The 0.x gan_loss's gan_type, or the value itself when it is not a dict."""
    return loss.get("gan_type") if isinstance(loss, dict) else loss


def _write_preparation(prep: Preparation, preprocessor: Dict[str, Any], ctx: Ctx) -> None:
    """The 0.x pipeline's channel order and normalisation, in the 1.x
    data_preprocessor where the pipeline tells them (see pipeline.py)."""
    if prep.conflict is not None:
        ctx.warn(f"data_preprocessor left at 1.x's defaults: the 0.x pipeline prepares its "
                 f"image keys differently ({prep.conflict}), and one data_preprocessor "
                 "cannot; set its output_channel_order/mean/std by hand")
        return
    if prep.order is not None:
        preprocessor["output_channel_order"] = prep.order
        ctx.note(f"data_preprocessor.output_channel_order={prep.order!r}: the 0.x model was "
                 f"trained on {prep.order} images ({prep.order_why})")
    else:
        ctx.note(f"data_preprocessor.output_channel_order not written: the 0.x model's "
                 f"channel order is unknown ({prep.order_why})")
    if prep.normalization:
        preprocessor.update(prep.normalization)
        ctx.note(f"data_preprocessor mean/std written from the 0.x pipeline "
                 f"({prep.normalization_why})")
        uneven = any(len(set(v)) > 1 for v in prep.normalization.values())
        if prep.order is None and uneven:
            ctx.warn(f"the per-channel mean/std ({prep.normalization_why}) are in the channel "
                     f"order the 0.x model saw, which is unknown ({prep.order_why}): set "
                     "data_preprocessor.output_channel_order by hand")
    elif prep.normalization is None:
        ctx.note(f"data_preprocessor mean/std left at 1.x's default (127.5): the 0.x "
                 f"normalisation is unknown ({prep.normalization_why})")


def migrate(old_path: str, strict: bool = False) -> MigrationResult:
    """Convert the 0.x config at ``old_path`` (its ``_base_`` files resolved).

    With ``strict=True`` any lossy conversion (a warning) raises
    :class:`MigrationError` listing all of them. A config that cannot be migrated
    at all raises :class:`MigrationError` whatever ``strict`` is. Settings that are
    simply not translated (data pipelines, evaluation metrics, ...) never fail.
    """
    return convert(read_config(old_path), source=str(old_path), strict=strict)


def _effective_train_cfg(cfg: Dict[str, Any], model_cfg: Dict[str, Any], ctx: Ctx
                         ) -> Tuple[Any, str, Dict[str, Any]]:
    """(the train_cfg 0.x trained with, its name, the model dict without it).
    MMGeneration's build_model hands the top-level train_cfg over as a default
    argument only: a train_cfg inside the model dict wins over it."""
    if "train_cfg" not in model_cfg:
        return cfg.get("train_cfg"), "train_cfg", model_cfg
    model_cfg = dict(model_cfg)
    inner = model_cfg.pop("train_cfg")
    outer = cfg.get("train_cfg")
    if outer is not None and outer != inner:
        ctx.note(f"model.train_cfg={inner!r} is the one 0.x trained with; the top-level "
                 f"train_cfg={outer!r} was only its default and is ignored")
    return inner, "model.train_cfg", model_cfg


def convert(cfg: Dict[str, Any], source: str = "<dict>", strict: bool = False
            ) -> MigrationResult:
    """Convert an already-loaded 0.x config dict (``migrate`` without the file)."""
    cfg = plain(cfg)
    ctx = Ctx(source)
    ctx.present = set(cfg)
    if any(k in cfg for k in ("optim_wrapper", "param_scheduler", "train_dataloader")):
        ctx.warn("the input already has 1.x keys (optim_wrapper / param_scheduler / "
                 "train_dataloader); is it a 0.x config?")

    model_cfg = cfg.get("model")
    if not isinstance(model_cfg, dict):
        ctx.refuse(f"the 0.x config has no model dict (model={model_cfg!r})",
                   "Give the 0.x config a model=dict(type=..., generator=..., "
                   "discriminator=...)")
    train_cfg, where, model_cfg = _effective_train_cfg(cfg, model_cfg, ctx)
    family = find_family(model_cfg)
    translate_train_cfg(train_cfg, None, ctx, where)  # validate the step keys first
    if family is None:
        ctx.refuse(
            f"no known 1.x model for the 0.x model type={type_of(model_cfg)!r} with generator "
            f"{type_of(model_cfg.get('generator'))!r}, discriminator "
            f"{type_of(model_cfg.get('discriminator'))!r} and gan_loss "
            f"{_gan_loss_type(model_cfg.get('gan_loss'))!r}",
            "Translate this config by hand; the families this tool knows are listed in "
            "pygan_optim.migrate.families")
    if family.refused:
        ctx.refuse(f"the 0.x {family.name} model ({type_of(model_cfg)!r}) has no 1.x "
                   f"equivalent", family.refused)

    steps = translate_train_cfg(train_cfg, family, ctx, where)
    given_preprocessor = "data_preprocessor" in model_cfg
    model = translate_model(model_cfg, family, steps, ctx)
    if not given_preprocessor and isinstance(model.get("data_preprocessor"), dict):
        _write_preparation(read_preparation(cfg), model["data_preprocessor"], ctx)
    ema = translate_hooks(cfg.get("custom_hooks"), steps, ctx)
    if ema is not None:
        if "ema_config" in family.accepts:
            model["ema_config"] = ema
        else:
            ctx.keep("model.ema_config", ema, f"converted from the EMA hook, but the 1.x "
                                              f"{family.new_type} takes no ema_config")
            ctx.warn(f"the EMA hook is not translated: the 1.x {family.new_type} model "
                     f"takes no ema_config")
    optim_wrapper = translate_optimizer(cfg.get("optimizer"), family, steps, ctx)
    apply_amp(cfg, optim_wrapper, ctx)
    total_iters = translate_runner(cfg.get("runner"), cfg.get("total_iters"), ctx)
    if isinstance(total_iters, float) and total_iters.is_integer() and total_iters >= 1:
        # `total_iters = 1e6`: mmcv's runner compared iterations with it as it was.
        ctx.note(f"total_iters={total_iters!r} written as the integer {int(total_iters)}")
        total_iters = int(total_iters)
    param_scheduler = translate_lr_config(cfg.get("lr_config"), optim_wrapper, total_iters,
                                          ctx)

    out: Dict[str, Any] = {"model": model, "optim_wrapper": optim_wrapper}
    if param_scheduler is not None:
        out["param_scheduler"] = param_scheduler
    factor = steps.iter_factor
    train_cfg = translate_total_iters(total_iters, factor, ctx)
    train_cfg.update(translate_evaluation(cfg.get("evaluation"), factor,
                                          train_cfg.get("max_iters"), ctx))
    if train_cfg:
        out["train_cfg"] = train_cfg
    write_ckpt, ckpt_hook = translate_checkpoint_config(cfg.get("checkpoint_config"), factor,
                                                        ctx)
    log_out = translate_log_config(cfg.get("log_config"), factor, ctx)
    default_hooks = dict(log_out.pop("default_hooks", {}))
    if write_ckpt:
        default_hooks = dict(checkpoint=ckpt_hook, **default_hooks)
    if default_hooks:
        out["default_hooks"] = default_hooks
    out.update(log_out)  # log_processor, visualizer
    keep_the_rest(cfg, out, ctx)
    result = MigrationResult(source=source, config=out, warnings=ctx.warnings,
                             untranslated=ctx.untranslated, notes=ctx.notes,
                             family=family.name)
    from .output import mmagic_types
    result.needs = ("pygan_optim" if family.needs == "pygan_optim"
                    and not mmagic_types(out) else "mmagic")
    if result.needs == "mmagic":
        out["default_scope"] = "mmagic"
    if strict and ctx.warnings:
        raise MigrationError(
            f"strict migration of {source} failed: {len(ctx.warnings)} conversion(s) would "
            f"change the training behaviour:\n" + "\n".join(f"  - {w}" for w in ctx.warnings),
            ctx.warnings)
    result.text = render(result)
    return result
