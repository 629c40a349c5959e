"""0.x optimizers -> 1.x ``optim_wrapper``; 0.x mixed precision -> the wrapper types.

The optimizer of each network becomes one wrapper entry under the constructor
the family names (``MultiOptimWrapperConstructor``; PGGAN / StyleGAN v1 and
SinGAN use MMagic's own constructors, which build one optimizer per scale).
Hyper-parameters are kept verbatim; a per-optimizer ``paramwise_cfg`` moves to
its wrapper; ``accumulative_counts`` goes on both networks' wrappers.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from .common import Ctx, MigrationError
from .families import Family
from .schedule import Steps


def _is_multi(optimizer: Any) -> bool:
    return (isinstance(optimizer, dict) and bool(optimizer)
            and all(isinstance(v, dict) for v in optimizer.values()))


def translate_optimizer(optimizer: Any, family: Family, steps: Steps, ctx: Ctx) -> dict:
    """The 1.x optim_wrapper; refuses when 0.x gives nothing a 1.x GAN can train with."""
    if steps.optimizers is not None:  # PGGAN / StyleGAN v1 / SinGAN: from train_cfg
        if optimizer is not None:
            ctx.keep("optimizer", optimizer, f"0.x {family.name} ignores the top-level "
                                             f"optimizer (it builds its own from train_cfg)")
            ctx.note(f"the top-level optimizer is not used: 0.x {family.name} built its "
                     f"optimizers from train_cfg, and so does this translation")
        source = "train_cfg"
        optimizer = steps.optimizers
    else:
        source = "optimizer"
    keys = family.optim_keys
    if optimizer is None:
        ctx.refuse(f"the 0.x config has no optimizer, and the 1.x {family.new_type} model "
                   f"needs optim_wrapper entries {list(keys)}",
                   f"Add optimizer=dict({keys[0]}=dict(type='Adam', ...), "
                   f"{keys[1]}=dict(...)) to the 0.x config")
    if not _is_multi(optimizer):
        ctx.refuse(f"{source} is one optimizer for the whole model, but the 0.x "
                   f"{family.name} model (like the 1.x {family.new_type}) steps "
                   f"optimizer[{keys[0]!r}] and optimizer[{keys[1]!r}] separately",
                   f"Give one optimizer per network: optimizer=dict({keys[0]}=..., "
                   f"{keys[1]}=...)")
    missing = [k for k in keys if k not in optimizer]
    if missing:
        ctx.refuse(f"{source} has keys {list(optimizer)}, but the 1.x {family.new_type} "
                   f"model needs optim_wrapper entries {list(keys)} (missing {missing})",
                   f"Name the per-network optimizers {list(keys)} in the 0.x config")
    accu = steps.accu
    out: Dict[str, Any] = {"constructor": family.constructor}
    for key, sub in optimizer.items():
        sub = dict(sub)
        entry: Dict[str, Any] = {}
        if accu > 1 and key in keys:
            entry["accumulative_counts"] = accu
        if "constructor" in sub:
            ctx.keep(f"{source}.{key}.constructor", sub.pop("constructor"),
                     "a per-optimizer constructor has no 1.x per-key equivalent")
            ctx.warn(f"{source}.{key}.constructor is not converted (no 1.x per-key "
                     f"constructor)")
        paramwise = sub.pop("paramwise_cfg", None)
        entry["optimizer"] = sub
        if paramwise is not None:
            entry["paramwise_cfg"] = paramwise
        out[key] = entry
        if key not in keys:
            ctx.note(f"optim_wrapper.{key}: the 1.x constructor needs '{key}' to name a direct "
                     f"child module of the model (or be a regular expression)")
    if accu > 1:
        extra = [k for k in optimizer if k not in keys]
        if extra:
            ctx.note(f"accumulative_counts={accu} set on {list(keys)} only, not on {extra}")
    if steps.lr_schedule:
        out["lr_schedule"] = steps.lr_schedule
    out.update(steps.extra_optim)
    return out


def named_wrappers(optim_wrapper: Optional[dict]) -> Dict[str, dict]:
    """The wrapper entries of an optim_wrapper (not its constructor or lr_schedule)
    by name; a single wrapper for the whole model is named ''."""
    if optim_wrapper is None:
        return {}
    if "optimizer" in optim_wrapper:
        return {"": optim_wrapper}
    return {k: v for k, v in optim_wrapper.items() if isinstance(v, dict) and "optimizer" in v}


def loss_scale_value(value: Any, path: str, ctx: Ctx) -> Any:
    if isinstance(value, bool):
        raise MigrationError(f"{path}={value!r}: expected a number, 'dynamic' or a dict")
    if isinstance(value, (int, float)):
        return float(value)  # an int is a TypeError in AmpOptimWrapper
    if value == "dynamic" or isinstance(value, dict):
        return value
    raise MigrationError(f"{path}={value!r}: expected a number, 'dynamic' or a dict")


def apply_amp(cfg: dict, optim_wrapper: Optional[dict], ctx: Ctx) -> None:
    """runner.fp16_loss_scaler and apex_amp -> wrapper types (a top-level fp16 is not)."""
    runner = cfg.get("runner")
    scaler, scaler_path = None, None
    if isinstance(runner, dict) and runner.get("fp16_loss_scaler") is not None:
        scaler, scaler_path = runner["fp16_loss_scaler"], "runner.fp16_loss_scaler"
    fp16 = cfg.get("fp16")
    if fp16 is not None:
        # 0.x GAN training never used a top-level fp16 (mmgen's train.py reads it only
        # next to optimizer_cfg, and then refuses); runner.fp16_loss_scaler was the switch.
        # Converting it would turn an fp32 0.x run into a mixed-precision 1.x one.
        ctx.keep("fp16", fp16, "MMGeneration 0.x ignored a top-level fp16 for GAN training")
        what = ("runner.fp16_loss_scaler is converted instead" if scaler is not None else
                "the 0.x run trained in fp32; for mixed precision in 1.x set "
                "type='AmpOptimWrapper' on the optim_wrapper entries by hand")
        ctx.warn(f"fp16={fp16!r} is not converted: MMGeneration 0.x ignored a top-level fp16 "
                 f"(only runner.fp16_loss_scaler enabled mixed precision), so {what}")
    apex = cfg.get("apex_amp")
    amp_kwargs: Optional[Dict[str, Any]] = None
    if scaler is not None:
        amp_kwargs = dict(type="AmpOptimWrapper",
                          loss_scale=loss_scale_value(scaler, scaler_path, ctx))
        ctx.note(f"{scaler_path} -> type='AmpOptimWrapper' on every optim_wrapper entry; 0.x "
                 f"shared one loss scaler between the networks, 1.x keeps one per wrapper")
        if apex is not None:
            ctx.keep("apex_amp", apex, "fp16 (AmpOptimWrapper) is already converted")
            ctx.warn("both native fp16 and apex_amp are set; apex_amp is not converted")
    elif apex is not None:
        if isinstance(apex, dict):
            apex = dict(apex)
            init_args = dict(apex.pop("init_args", None) or {})
            amp_kwargs = dict(type="ApexOptimWrapper",
                              opt_level=init_args.pop("opt_level", "O1"))
            if "loss_scale" in init_args:
                amp_kwargs["loss_scale"] = init_args.pop("loss_scale")
            for key, value in init_args.items():
                ctx.keep(f"apex_amp.init_args.{key}", value,
                         "apex.amp.initialize option with no ApexOptimWrapper argument")
            for key, value in apex.items():
                ctx.keep(f"apex_amp.{key}", value, "apex option with no 1.x equivalent")
            ctx.note("apex_amp -> type='ApexOptimWrapper' on every optim_wrapper entry")
        else:
            ctx.keep("apex_amp", apex, "apex_amp is not a dict")
    if amp_kwargs is None:
        return
    if optim_wrapper is None:
        ctx.warn("mixed precision is configured but there is no optimizer to attach it to")
        return
    for wrapper in named_wrappers(optim_wrapper).values():
        rest = dict(wrapper)
        wrapper.clear()
        wrapper.update(amp_kwargs)
        wrapper.update({k: v for k, v in rest.items() if k not in amp_kwargs})

