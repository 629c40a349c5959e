"""Convert an MMGeneration 0.x GAN config into an MMEngine / MMagic 1.x config.

``migrate(old_path)`` reads the 0.x config with ``mmengine.Config.fromfile``
(so its ``_base_`` files are resolved), translates what has a 1.x equivalent
and returns a :class:`MigrationResult`: the new config as a plain dict, the
rendered Python source, the lossy-conversion warnings, informational notes
and the list of settings it could not translate. ``write(result, path)``
saves the source; the file loads with ``mmengine.Config.fromfile``.

What is translated (the rules of the reference spec, section 7.2):

* ``optimizer=dict(generator=dict(type=...), discriminator=dict(...))`` ->
  ``optim_wrapper`` with ``constructor='MultiOptimWrapperConstructor'`` and a
  ``dict(optimizer=...)`` per submodule (hyper-parameters kept verbatim; a
  per-optimizer ``paramwise_cfg`` moves to the wrapper). A single optimizer
  becomes ``optim_wrapper=dict(optimizer=...)``.
* ``train_cfg=dict(disc_steps=D, gen_steps=G, batch_accumulation_steps=A)``
  -> ``accumulative_counts=A`` on the generator and discriminator wrappers
  (only when A > 1), ``model.discriminator_steps = D // A`` and
  ``model.generator_steps = G``. Missing keys default to 1, as in 0.x. When A
  does not divide D, 1.x cannot express the 0.x schedule: a warning names the
  values and the rounding (``strict=True`` raises instead).
* The model: ``BasiccGAN`` with BigGAN (or SNGAN-projection) networks ->
  ``BigGAN`` (``SNGAN``) with ``num_classes`` taken from the generator,
  ``data_preprocessor=dict(type='DataPreprocessor')`` added, the hinge
  ``gan_loss`` dropped (it is built into those 1.x models). ``init_type`` is
  kept on the networks as written.
* The ``ExponentialMovingAverageHook`` on ``generator_ema`` ->
  ``model.ema_config`` (momentum ``1 - m``, interval and start in generator
  phases, ``update_buffers`` from ``momentum_nontrainable``).
* ``total_iters`` -> ``train_cfg=dict(by_epoch=False, max_iters=...)``.
* ``lr_config`` -> ``param_scheduler``; ``runner.fp16_loss_scaler`` / ``fp16``
  -> ``type='AmpOptimWrapper', loss_scale=...`` per wrapper; ``apex_amp`` ->
  ``ApexOptimWrapper``.

Everything else (data pipelines, evaluation, logging, checkpointing, the
runner, unknown keys, ...) is listed in ``result.untranslated`` and kept in
the output file as commented-out code, never dropped silently.
"""
from __future__ import annotations

import keyword
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["MigrationError", "MigrationResult", "UntranslatedItem", "migrate", "convert",
           "write", "render"]

#: Line width of the rendered config.
WIDTH = 79

_BIGGAN_G = ("BigGANGenerator", "BigGANDeepGenerator")
_BIGGAN_D = ("BigGANDiscriminator", "BigGANDeepDiscriminator")
_SNGAN_G = ("SNGANGenerator",)
_SNGAN_D = ("ProjDiscriminator",)
_CONDITIONAL = ("BasiccGAN",)
_STATIC = ("StaticUnconditionalGAN",)

# Top-level 0.x keys that mean the same thing in MMEngine 1.x and are copied.
_PASSTHROUGH = ("work_dir", "load_from", "log_level")

# Hints for known 0.x keys that have no mechanical 1.x translation.
_HINTS = {
    "data": "0.x data settings; 1.x uses train_dataloader / val_dataloader / test_dataloader",
    "dataset_type": "0.x data settings; 1.x uses train_dataloader.dataset",
    "img_norm_cfg": "0.x normalisation; 1.x normalises in model.data_preprocessor",
    "train_pipeline": "0.x pipeline; 1.x pipelines use different transforms",
    "test_pipeline": "0.x pipeline; 1.x pipelines use different transforms",
    "evaluation": "0.x GenerativeEvalHook; 1.x uses val_cfg / val_evaluator",
    "metrics": "0.x metrics; 1.x uses val_evaluator / test_evaluator metrics",
    "inception_pkl": "0.x metric setting; 1.x metrics take their own inception args",
    "log_config": "0.x logger hooks; 1.x uses default_hooks.logger and log_processor",
    "checkpoint_config": "0.x checkpoint hook; 1.x uses default_hooks.checkpoint",
    "runner": "0.x runner; 1.x runs an IterBasedTrainLoop built from train_cfg",
    "workflow": "0.x workflow; 1.x uses train_cfg / val_cfg loops",
    "custom_hooks": "0.x hook with no automatic 1.x equivalent",
    "dist_params": "1.x uses env_cfg.dist_cfg",
    "cudnn_benchmark": "1.x uses env_cfg.cudnn_benchmark",
    "mp_start_method": "1.x uses env_cfg.mp_cfg",
    "opencv_num_threads": "1.x uses env_cfg.mp_cfg",
    "resume_from": "1.x uses load_from=<checkpoint> with resume=True",
    "use_ddp_wrapper": "1.x uses model_wrapper_cfg",
    "find_unused_parameters": "1.x uses model_wrapper_cfg.find_unused_parameters",
    "optimizer_config": "0.x optimizer hook (0.x GAN models step their own optimizers); "
                        "1.x puts clip_grad on each optim_wrapper entry",
    "test_cfg": "0.x model test settings; 1.x test_cfg configures the test loop",
    "momentum_config": "0.x momentum schedule; 1.x uses momentum schedulers in "
                       "param_scheduler",
}


class MigrationError(ValueError):
    """A conversion that cannot be done faithfully (always, or under ``strict=True``)."""

    def __init__(self, message: str, warnings: Optional[List[str]] = None):
        super().__init__(message)
        self.warnings = list(warnings or [])


@dataclass
class UntranslatedItem:
    """A 0.x setting the tool could not translate; it is kept as a comment."""

    path: str  # dotted location in the 0.x config, e.g. 'data' or 'runner'
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class MigrationResult:
    source: str  # the 0.x config file
    config: Dict[str, Any]  # the 1.x config, plain dicts/lists/tuples
    text: str = ""  # the rendered 1.x config file
    warnings: List[str] = field(default_factory=list)  # lossy conversions
    untranslated: List[UntranslatedItem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # informational


# ----------------------------------------------------------------------------- helpers
def _plain(value: Any) -> Any:
    """ConfigDicts -> dicts, recursively (lists and tuples keep their type)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _clean_float(x: float) -> float:
    """Drop binary noise from derived values: 1 - 0.9999 -> 0.0001."""
    return float(f"{x:.12g}")


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


class _Ctx:
    def __init__(self, source: str):
        self.source = source
        self.warnings: List[str] = []
        self.notes: List[str] = []
        self.untranslated: List[UntranslatedItem] = []
        self.present: set = set()  # top-level keys of the 0.x config

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def keep(self, path: str, value: Any, reason: str) -> None:
        self.untranslated.append(UntranslatedItem(path, value, reason))


def _type_of(cfg: Any) -> Optional[str]:
    return cfg.get("type") if isinstance(cfg, dict) else None


# ----------------------------------------------------------------------------- steps
@dataclass
class _Steps:
    d0: int = 1
    g0: int = 1
    accu: int = 1
    disc_steps: int = 1  # 1.x model.discriminator_steps
    gen_steps: int = 1  # 1.x model.generator_steps
    use_ema: bool = False

    @property
    def phase(self) -> int:
        """Iterations per 1.x generator phase (discriminator_steps * accumulative_counts)."""
        return self.disc_steps * self.accu


def _convert_train_cfg(train_cfg: Any, model_type: Optional[str], ctx: _Ctx) -> _Steps:
    steps = _Steps()
    if train_cfg is None:
        train_cfg = {}
    if not isinstance(train_cfg, dict):
        ctx.keep("train_cfg", train_cfg, "0.x train_cfg is not a dict")
        ctx.warn(f"train_cfg={train_cfg!r} is not a dict; 0.x defaults (1, 1, 1) assumed")
        train_cfg = {}
    train_cfg = dict(train_cfg)
    vals = {}
    for key in ("disc_steps", "gen_steps", "batch_accumulation_steps"):
        v = train_cfg.pop(key, 1)
        if not _is_pos_int(v):
            raise MigrationError(f"train_cfg.{key} must be a positive integer, got {v!r}")
        vals[key] = v
    d0, g0, accu = vals["disc_steps"], vals["gen_steps"], vals["batch_accumulation_steps"]
    steps.use_ema = bool(train_cfg.pop("use_ema", False))
    for key, value in train_cfg.items():
        ctx.keep(f"train_cfg.{key}", value, "0.x model training option with no 1.x equivalent")
    steps.d0, steps.g0 = d0, g0

    if model_type in _STATIC:
        # StaticUnconditionalGAN ignores gen_steps and batch_accumulation_steps.
        for key, v in (("gen_steps", g0), ("batch_accumulation_steps", accu)):
            if v != 1:
                ctx.warn(f"train_cfg.{key}={v} dropped: 0.x {model_type} ignores it, so the "
                         f"1.x config does not use it either")
        steps.accu, steps.g0 = 1, 1
        steps.disc_steps, steps.gen_steps = d0, 1
        return steps

    steps.accu = accu
    steps.gen_steps = g0
    ds = d0 // accu
    if d0 % accu:
        shown = f"{d0} // {accu} = {ds}"
        if ds < 1:
            shown += ", raised to the minimum 1"
            ds = 1
        ctx.warn(
            f"train_cfg: disc_steps={d0} is not a multiple of batch_accumulation_steps={accu}. "
            f"0.x updated the generator every {d0} iterations; 1.x runs the generator phase "
            f"every discriminator_steps * accumulative_counts iterations, always a multiple of "
            f"{accu}. Rounded: model.discriminator_steps = {shown}, so the generator now "
            f"updates every {ds * accu} iterations instead of every {d0}.")
    steps.disc_steps = ds
    return steps


# ----------------------------------------------------------------------------- model
def _convert_network(name: str, cfg: Any, ctx: _Ctx) -> Any:
    if not isinstance(cfg, dict):
        return cfg
    cfg = dict(cfg)
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
    return cfg


def _num_classes(model: dict, gen: Any, disc: Any, ctx: _Ctx) -> Optional[int]:
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


def _convert_model(model: Any, steps: _Steps, ctx: _Ctx) -> Optional[dict]:
    if model is None:
        ctx.warn("the 0.x config has no model; no 1.x model written")
        return None
    if not isinstance(model, dict):
        ctx.keep("model", model, "0.x model is not a dict")
        ctx.warn("model is not a dict; kept untranslated")
        return None
    model = dict(model)
    old_type = model.pop("type", None)
    gen = _convert_network("generator", model.pop("generator", None), ctx)
    disc = _convert_network("discriminator", model.pop("discriminator", None), ctx)
    g_type, d_type = _type_of(gen), _type_of(disc)

    new_type = old_type
    hinge_builtin = False
    if old_type in _CONDITIONAL and g_type in _BIGGAN_G and d_type in _BIGGAN_D:
        new_type, hinge_builtin = "BigGAN", True
    elif old_type in _CONDITIONAL and g_type in _SNGAN_G and d_type in _SNGAN_D:
        new_type, hinge_builtin = "SNGAN", True
    else:
        ctx.warn(f"no automatic 1.x model type for 0.x model type={old_type!r} with "
                 f"generator {g_type!r} and discriminator {d_type!r}: type kept as "
                 f"{old_type!r}; set model.type to the matching 1.x model by hand")
    if new_type != old_type:
        ctx.note(f"model.type {old_type!r} -> {new_type!r}")

    out: Dict[str, Any] = {"type": new_type}
    n = _num_classes(model, gen, disc, ctx)
    model.pop("num_classes", None)
    if n is not None and (hinge_builtin or old_type in _CONDITIONAL):
        out["num_classes"] = n
    if "data_preprocessor" in model:
        out["data_preprocessor"] = model.pop("data_preprocessor")
    else:
        out["data_preprocessor"] = dict(type="DataPreprocessor")
    if gen is not None:
        out["generator"] = gen
    if disc is not None:
        out["discriminator"] = disc
    out["generator_steps"] = steps.gen_steps
    out["discriminator_steps"] = steps.disc_steps

    if "gan_loss" in model:
        loss = model.pop("gan_loss")
        gan_type = loss.get("gan_type") if isinstance(loss, dict) else None
        if hinge_builtin and gan_type == "hinge":
            ctx.note(f"model.gan_loss (hinge) dropped: the hinge loss is built into the 1.x "
                     f"{new_type} model")
        elif hinge_builtin:
            ctx.keep("model.gan_loss", loss,
                     f"the 1.x {new_type} model has a built-in hinge loss and no loss option")
            ctx.warn(f"model.gan_loss has gan_type={gan_type!r}, but the 1.x {new_type} model "
                     f"always uses the hinge loss; the 0.x loss is not reproduced")
        else:
            ctx.keep("model.gan_loss", loss,
                     "1.x GAN models build their losses in; choose the matching model type")
    for key, value in model.items():
        ctx.keep(f"model.{key}", value, "0.x model option with no automatic 1.x equivalent")
    return out


# ----------------------------------------------------------------------------- EMA
def _is_ema_hook(hook: Any) -> bool:
    return _type_of(hook) == "ExponentialMovingAverageHook"


def _module_keys(hook: dict) -> Tuple[str, ...]:
    keys = hook.get("module_keys", ())
    return (keys,) if isinstance(keys, str) else tuple(keys)


def _convert_ema(hook: dict, steps: _Steps, ctx: _Ctx, index: int) -> Optional[dict]:
    path = f"custom_hooks[{index}]"
    hook = dict(hook)
    hook.pop("type")
    keys = _module_keys(hook)
    hook.pop("module_keys", None)
    other = [k for k in keys if k != "generator_ema"]
    if other:
        ctx.keep(f"{path}.module_keys", tuple(other),
                 "1.x model.ema_config only averages the generator")
        ctx.warn(f"{path}: EMA of {other} is not converted (only generator_ema is)")
    interp_mode = hook.pop("interp_mode", "lerp")
    policy = hook.pop("momentum_policy", "fixed")
    if interp_mode != "lerp" or policy != "fixed":
        ctx.keep(path, dict(hook, type="ExponentialMovingAverageHook", module_keys=keys,
                            interp_mode=interp_mode, momentum_policy=policy),
                 "only interp_mode='lerp' with momentum_policy='fixed' is converted "
                 "(rampup maps to mmagic's RampUpEMA and needs manual porting)")
        ctx.warn(f"{path}: EMA hook with interp_mode={interp_mode!r}, "
                 f"momentum_policy={policy!r} is not converted; no ema_config written")
        return None
    interp = dict(hook.pop("interp_cfg", None) or {})
    m = interp.pop("momentum", 0.999)
    mn = interp.pop("momentum_nontrainable", 0.0)
    for key, value in interp.items():
        ctx.keep(f"{path}.interp_cfg.{key}", value, "EMA interpolation option with no 1.x "
                                                    "equivalent")
    interval = hook.pop("interval", -1)
    start = hook.pop("start_iter", 0)
    if "priority" in hook:
        ctx.note(f"{path}.priority={hook.pop('priority')!r} dropped: 1.x EMA runs inside "
                 f"the model's train_step")
    for key, value in hook.items():
        ctx.keep(f"{path}.{key}", value, "EMA hook option with no 1.x equivalent")

    if not isinstance(interval, int) or interval <= 0:
        ctx.keep(path, dict(type="ExponentialMovingAverageHook", module_keys=keys,
                            interval=interval, start_iter=start),
                 "interval <= 0 never averages in 0.x; 1.x cannot express that")
        ctx.warn(f"{path}: EMA interval={interval} (never update) is not representable")
        return None

    phase = steps.phase  # iterations per 1.x generator phase
    momentum = 1.0 - m
    if interval % phase == 0:
        new_interval = interval // phase
    elif phase % interval == 0:
        k = phase // interval
        new_interval = 1
        momentum = 1.0 - m ** k
        ctx.note(f"{path}: 0.x blended every {interval} iterations, i.e. {k} times per "
                 f"{phase}-iteration generator phase; 1.x blends once per phase with "
                 f"momentum 1 - {m}**{k}")
    else:
        new_interval = max(1, round(interval / phase))
        ctx.warn(f"{path}: EMA interval={interval} iterations is not a multiple or divisor "
                 f"of the {phase}-iteration generator phase; 1.x ema_config.interval = "
                 f"round({interval} / {phase}) = {new_interval} phases")
    new_start = -(-start // phase)  # ceil
    if start % phase:
        ctx.warn(f"{path}: EMA start_iter={start} is not a multiple of the {phase}-iteration "
                 f"generator phase; ema_config.start_iter = ceil({start} / {phase}) = "
                 f"{new_start} phases (EMA starts at iteration {new_start * phase})")
    if mn == m:
        update_buffers = True
    elif mn == 0:
        update_buffers = False
    else:
        update_buffers = False
        ctx.warn(f"{path}: momentum_nontrainable={mn} (neither 0 nor momentum={m}) is not "
                 f"representable; buffers are copied (update_buffers=False)")
    if not steps.use_ema:
        ctx.note("train_cfg.use_ema is not set, but the EMA hook created generator_ema in "
                 "0.x; converted to model.ema_config")
    return dict(type="ExponentialMovingAverage", interval=new_interval,
                momentum=_clean_float(momentum), update_buffers=update_buffers,
                start_iter=new_start)


def _convert_hooks(hooks: Any, steps: _Steps, ctx: _Ctx) -> Optional[dict]:
    ema = None
    if hooks is None:
        hooks = []
    if not isinstance(hooks, (list, tuple)):
        ctx.keep("custom_hooks", hooks, _HINTS["custom_hooks"])
        hooks = []
    for i, hook in enumerate(hooks):
        if _is_ema_hook(hook) and "generator_ema" in _module_keys(hook):
            if ema is not None:
                ctx.keep(f"custom_hooks[{i}]", hook, "a second EMA hook on generator_ema")
                ctx.warn(f"custom_hooks[{i}]: a second EMA hook on generator_ema is not "
                         f"converted")
                continue
            ema = _convert_ema(hook, steps, ctx, i)
            if ema is None:
                ema = False  # handled (and reported); do not convert a later one
        else:
            hint = f"{_type_of(hook)}: {_HINTS['custom_hooks']}"
            ctx.keep(f"custom_hooks[{i}]", hook, hint)
    if ema is None and steps.use_ema:
        ctx.warn("train_cfg.use_ema=True without an ExponentialMovingAverageHook made a "
                 "frozen copy of the initial generator in 0.x; 1.x has no equivalent, so no "
                 "ema_config is written")
    return ema or None


# ----------------------------------------------------------------------------- optimizers
def _is_multi(optimizer: Any) -> bool:
    return (isinstance(optimizer, dict) and bool(optimizer)
            and all(isinstance(v, dict) for v in optimizer.values()))


def _convert_optimizer(optimizer: Any, steps: _Steps, ctx: _Ctx) -> Optional[dict]:
    if optimizer is None:
        ctx.note("no optimizer in the 0.x config; no optim_wrapper written")
        return None
    if not isinstance(optimizer, dict):
        ctx.keep("optimizer", optimizer, "0.x optimizer is not a dict")
        ctx.warn("optimizer is not a dict; no optim_wrapper written")
        return None
    accu = steps.accu
    if not _is_multi(optimizer):
        opt = dict(optimizer)
        wrapper: Dict[str, Any] = {}
        if accu > 1:
            wrapper["accumulative_counts"] = accu
        if "constructor" in opt:
            ctx.keep("optimizer.constructor", opt.pop("constructor"),
                     "mmcv optimizer constructors have no 1.x mapping; set "
                     "optim_wrapper.constructor by hand")
            ctx.warn("optimizer.constructor is not converted")
        paramwise = opt.pop("paramwise_cfg", None)
        wrapper["optimizer"] = opt
        if paramwise is not None:
            wrapper["paramwise_cfg"] = paramwise
        ctx.note("a single optimizer -> a plain optim_wrapper (no constructor); 1.x GAN "
                 "models expect optim_wrapper['generator'] and ['discriminator'], as 0.x GAN "
                 "models expected per-network optimizers")
        return wrapper

    out: Dict[str, Any] = {"constructor": "MultiOptimWrapperConstructor"}
    for key, sub in optimizer.items():
        sub = dict(sub)
        entry: Dict[str, Any] = {}
        if accu > 1 and key in ("generator", "discriminator"):
            entry["accumulative_counts"] = accu
        if "constructor" in sub:
            ctx.keep(f"optimizer.{key}.constructor", sub.pop("constructor"),
                     "a per-optimizer constructor has no 1.x per-key equivalent")
            ctx.warn(f"optimizer.{key}.constructor is not converted (no 1.x per-key "
                     f"constructor)")
        paramwise = sub.pop("paramwise_cfg", None)
        entry["optimizer"] = sub
        if paramwise is not None:
            entry["paramwise_cfg"] = paramwise
        out[key] = entry
        if key not in ("generator", "discriminator"):
            ctx.note(f"optim_wrapper.{key}: the 1.x constructor needs '{key}' to name a direct "
                     f"child module of the model (or be a regular expression)")
    if accu > 1:
        extra = [k for k in optimizer if k not in ("generator", "discriminator")]
        if extra:
            ctx.note(f"accumulative_counts={accu} set on generator and discriminator only, "
                     f"not on {extra}")
    return out


def _wrappers(optim_wrapper: dict) -> List[dict]:
    if "optimizer" in optim_wrapper:
        return [optim_wrapper]
    return [v for k, v in optim_wrapper.items() if k != "constructor"]


def _loss_scale(value: Any, path: str, ctx: _Ctx) -> Any:
    if isinstance(value, bool):
        raise MigrationError(f"{path}={value!r}: expected a number, 'dynamic' or a dict")
    if isinstance(value, (int, float)):
        return float(value)  # an int is a TypeError in AmpOptimWrapper
    if value == "dynamic" or isinstance(value, dict):
        return value
    raise MigrationError(f"{path}={value!r}: expected a number, 'dynamic' or a dict")


def _apply_amp(cfg: dict, optim_wrapper: Optional[dict], ctx: _Ctx) -> None:
    """fp16 (runner.fp16_loss_scaler / mmcv fp16) and apex -> wrapper types."""
    runner = cfg.get("runner")
    scaler, scaler_path = None, None
    if isinstance(runner, dict) and runner.get("fp16_loss_scaler") is not None:
        scaler, scaler_path = runner["fp16_loss_scaler"], "runner.fp16_loss_scaler"
    fp16 = cfg.get("fp16")
    if fp16 is not None:
        if scaler is not None:
            ctx.keep("fp16", fp16, "runner.fp16_loss_scaler is already converted")
            ctx.warn("both runner.fp16_loss_scaler and fp16 are set; fp16 is not converted")
        elif isinstance(fp16, dict):
            fp16 = dict(fp16)
            # mmcv's Fp16OptimizerHook defaults to a static scale of 512.
            scaler, scaler_path = fp16.pop("loss_scale", 512.0), "fp16.loss_scale"
            for key, value in fp16.items():
                ctx.keep(f"fp16.{key}", value, "fp16 option with no 1.x equivalent")
        else:
            ctx.keep("fp16", fp16, "fp16 is not a dict")
    apex = cfg.get("apex_amp")
    amp_kwargs: Optional[Dict[str, Any]] = None
    if scaler is not None:
        amp_kwargs = dict(type="AmpOptimWrapper",
                          loss_scale=_loss_scale(scaler, scaler_path, ctx))
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
    for wrapper in _wrappers(optim_wrapper):
        rest = dict(wrapper)
        wrapper.clear()
        wrapper.update(amp_kwargs)
        wrapper.update({k: v for k, v in rest.items() if k not in amp_kwargs})


# ----------------------------------------------------------------------------- lr_config
def _base_lrs(optim_wrapper: Optional[dict]) -> Dict[str, Any]:
    if optim_wrapper is None:
        return {}
    if "optimizer" in optim_wrapper:
        return {"": optim_wrapper["optimizer"].get("lr")}
    return {k: v["optimizer"].get("lr") for k, v in optim_wrapper.items()
            if k != "constructor"}


def _convert_lr_config(lr_config: Any, optim_wrapper: Optional[dict],
                       total_iters: Any, ctx: _Ctx) -> Any:
    if lr_config is None:
        if "lr_config" in ctx.present:
            ctx.note("lr_config=None: constant learning rates, no param_scheduler")
        return None
    if not isinstance(lr_config, dict) or "policy" not in lr_config:
        ctx.keep("lr_config", lr_config, "lr_config without a policy")
        ctx.warn("lr_config is not converted (no policy)")
        return None
    orig = lr_config
    cfg = dict(lr_config)
    policy = cfg.pop("policy")
    if isinstance(policy, str) and policy == policy.lower():
        policy = policy.title()  # as mmcv does: 'step' -> 'Step'
    if "by_epoch" not in cfg:
        ctx.warn("lr_config.by_epoch is not set (mmcv's default is True, epoch-based); "
                 "converted as iteration-based (by_epoch=False), as GAN runners count "
                 "iterations")
    by_epoch = cfg.pop("by_epoch", False)
    if by_epoch:
        ctx.keep("lr_config", orig, "epoch-based lr_config; 0.x GAN training is iteration-based")
        ctx.warn("lr_config.by_epoch=True is not converted")
        return None

    def need_total(what: str) -> bool:
        if _is_pos_int(total_iters):
            return True
        ctx.keep("lr_config", orig, f"{what} needs total_iters, which the config lacks")
        ctx.warn(f"lr_config policy {policy!r} is not converted: total_iters is missing")
        return False

    # Warm-up (mmcv LrUpdaterHook), multiplicative like the 0.x hook.
    warmup = cfg.pop("warmup", None)
    warmup_iters = cfg.pop("warmup_iters", 0)
    warmup_ratio = cfg.pop("warmup_ratio", 0.1)
    warmup_by_epoch = cfg.pop("warmup_by_epoch", False)
    pre: List[dict] = []
    if warmup is not None:
        if warmup_by_epoch:
            ctx.keep("lr_config.warmup", dict(warmup=warmup, warmup_iters=warmup_iters,
                                              warmup_by_epoch=True), "epoch-based warm-up")
            ctx.warn("lr_config: epoch-based warm-up is not converted")
        elif warmup == "linear":
            pre.append(dict(type="LinearLR", start_factor=warmup_ratio, end_factor=1.0,
                            begin=0, end=warmup_iters, by_epoch=False))
        elif warmup == "constant":
            pre.append(dict(type="ConstantLR", factor=warmup_ratio, begin=0,
                            end=warmup_iters, by_epoch=False))
        else:
            ctx.keep("lr_config.warmup", dict(warmup=warmup, warmup_iters=warmup_iters,
                                              warmup_ratio=warmup_ratio),
                     f"warm-up {warmup!r} has no MMEngine scheduler")
            ctx.warn(f"lr_config: warm-up {warmup!r} is not converted")

    main: Any = None
    if policy == "Linear":
        target = cfg.pop("target_lr", 0)
        start = cfg.pop("start", 0)
        interval = cfg.pop("interval", 1)
        if not need_total("policy 'Linear'"):
            return None
        lrs = _base_lrs(optim_wrapper)
        if not lrs or any(v is None for v in lrs.values()):
            ctx.keep("lr_config", orig, "policy 'Linear' needs each optimizer's base lr")
            ctx.warn("lr_config policy 'Linear' is not converted: an optimizer has no lr")
            return None

        def linear(lr):
            return dict(type="LinearLrInterval", interval=interval, by_epoch=False,
                        start_factor=lr, end_factor=target, begin=start, end=total_iters)
        if len(set(lrs.values())) == 1:
            main = linear(next(iter(lrs.values())))
        else:
            main = {k: linear(v) for k, v in lrs.items()}
        ctx.note("lr_config policy 'Linear' -> mmagic's LinearLrInterval, whose start_factor/"
                 "end_factor are absolute learning rates (one scheduler per optimizer when "
                 "their base lrs differ). It is registered by mmagic, not plain MMEngine; "
                 "without mmagic use MMEngine's LinearLR(start_factor=1.0, "
                 "end_factor=target/base, ...), which loses the interval steps")
    elif policy == "Step":
        step = cfg.pop("step")
        gamma = cfg.pop("gamma", 0.1)
        min_lr = cfg.pop("min_lr", None)
        if min_lr is not None:
            ctx.keep("lr_config.min_lr", min_lr, "MMEngine step schedulers have no lower bound")
            ctx.warn(f"lr_config.min_lr={min_lr} (Step) is not converted")
        if isinstance(step, int):
            main = dict(type="StepLR", step_size=step, gamma=gamma, by_epoch=False)
        else:
            main = dict(type="MultiStepLR", milestones=list(step), gamma=gamma,
                        by_epoch=False)
    elif policy == "Exp":
        main = dict(type="ExponentialLR", gamma=cfg.pop("gamma"), by_epoch=False)
    elif policy == "Poly":
        power = cfg.pop("power", 1.0)
        min_lr = cfg.pop("min_lr", 0.0)
        if not need_total("policy 'Poly'"):
            return None
        main = dict(type="PolyLR", eta_min=min_lr, power=power, begin=0, end=total_iters,
                    by_epoch=False)
    elif policy == "CosineAnnealing":
        min_lr = cfg.pop("min_lr", None)
        ratio = cfg.pop("min_lr_ratio", None)
        if not need_total("policy 'CosineAnnealing'"):
            return None
        main = dict(type="CosineAnnealingLR", T_max=total_iters, begin=0, end=total_iters,
                    by_epoch=False)
        if ratio is not None:
            main["eta_min_ratio"] = ratio
        else:
            main["eta_min"] = 0.0 if min_lr is None else min_lr
    elif policy == "Fixed":
        ctx.note("lr_config policy 'Fixed': constant learning rates")
    else:
        ctx.keep("lr_config", orig, f"lr policy {policy!r} has no automatic mapping")
        ctx.warn(f"lr_config policy {policy!r} is not converted")
        return None
    for key, value in cfg.items():
        ctx.keep(f"lr_config.{key}", value, f"option of lr policy {policy!r} with no 1.x "
                                            f"equivalent")
    if main is None:
        return pre[0] if len(pre) == 1 else (pre or None)
    if not pre:
        return main
    if "type" not in main:  # per-optimizer dict: prepend the warm-up to each
        return {k: pre + [v] for k, v in main.items()}
    return pre + [main]


# ----------------------------------------------------------------------------- driver
_CONSUMED = ("model", "train_cfg", "optimizer", "lr_config", "total_iters", "fp16",
             "apex_amp")


def migrate(old_path: str, strict: bool = False) -> MigrationResult:
    """Convert the 0.x config at ``old_path``; see the module docstring.

    With ``strict=True`` any lossy conversion (a warning) raises
    :class:`MigrationError` listing all of them. Settings that are simply not
    translated (data pipelines, evaluation, ...) never fail.
    """
    from mmengine import Config

    cfg = _plain(Config.fromfile(old_path).to_dict())
    return convert(cfg, source=str(old_path), strict=strict)


def convert(cfg: Dict[str, Any], source: str = "<dict>", strict: bool = False
            ) -> MigrationResult:
    """Convert an already-loaded 0.x config dict (``migrate`` without the file)."""
    cfg = _plain(cfg)
    ctx = _Ctx(source)
    ctx.present = set(cfg)
    if any(k in cfg for k in ("optim_wrapper", "param_scheduler", "train_dataloader")):
        ctx.warn("the input already has 1.x keys (optim_wrapper / param_scheduler / "
                 "train_dataloader); is it a 0.x config?")

    model_cfg = cfg.get("model")
    model_type = _type_of(model_cfg)
    steps = _convert_train_cfg(cfg.get("train_cfg"), model_type, ctx)
    model = _convert_model(model_cfg, steps, ctx)
    ema = _convert_hooks(cfg.get("custom_hooks"), steps, ctx)
    if model is not None and ema is not None:
        model["ema_config"] = ema
    elif ema is not None:
        ctx.keep("model.ema_config", ema, "converted from the EMA hook, but there is no model")

    optim_wrapper = _convert_optimizer(cfg.get("optimizer"), steps, ctx)
    _apply_amp(cfg, optim_wrapper, ctx)
    total_iters = cfg.get("total_iters")
    param_scheduler = _convert_lr_config(cfg.get("lr_config"), optim_wrapper, total_iters, ctx)

    out: Dict[str, Any] = {}
    if model is not None:
        out["model"] = model
    if optim_wrapper is not None:
        out["optim_wrapper"] = optim_wrapper
    if param_scheduler is not None:
        out["param_scheduler"] = param_scheduler
    if total_iters is not None:
        if not _is_pos_int(total_iters):
            raise MigrationError(f"total_iters must be a positive integer, got {total_iters!r}")
        out["train_cfg"] = dict(by_epoch=False, max_iters=total_iters)
    else:
        ctx.warn("total_iters is missing; no train_cfg (max_iters) written")
    for key in _PASSTHROUGH:
        if key in cfg:
            out[key] = cfg[key]

    # Everything not consumed above is listed and kept as a comment.
    for key, value in cfg.items():
        if key in _CONSUMED or key in _PASSTHROUGH or key == "custom_hooks":
            continue
        if key == "test_cfg" and value is None:
            ctx.note("test_cfg=None dropped (0.x model test settings; 1.x test_cfg is the "
                     "test loop)")
            continue
        if key == "runner" and isinstance(value, dict):
            rest = {k: v for k, v in value.items() if k not in ("fp16_loss_scaler",)}
            if rest:
                ctx.keep("runner", rest, _HINTS["runner"])
            continue
        ctx.keep(key, value, _HINTS.get(key, "unknown 0.x key with no automatic 1.x equivalent"))

    # List the untranslated items in the order of the 0.x config's top-level keys.
    position = {k: i for i, k in enumerate(cfg)}
    ctx.untranslated.sort(
        key=lambda it: position.get(it.path.split(".")[0].split("[")[0], len(position)))

    if strict and ctx.warnings:
        raise MigrationError(
            f"strict migration of {source} failed: {len(ctx.warnings)} conversion(s) would "
            f"change the training behaviour:\n" + "\n".join(f"  - {w}" for w in ctx.warnings),
            ctx.warnings)
    result = MigrationResult(source=source, config=out, warnings=ctx.warnings,
                             untranslated=ctx.untranslated, notes=ctx.notes)
    result.text = render(result)
    return result


def write(result: MigrationResult, new_path: str) -> str:
    """Write ``result.text`` to ``new_path`` (parent folders are created)."""
    parent = os.path.dirname(os.path.abspath(new_path))
    os.makedirs(parent, exist_ok=True)
    with open(new_path, "w", encoding="utf-8") as f:
        f.write(result.text)
    return new_path


# ----------------------------------------------------------------------------- rendering
def _key_ok(k: Any) -> bool:
    return isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k)


def _fmt_scalar(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "float('nan')"
        if math.isinf(v):
            return "float('inf')" if v > 0 else "float('-inf')"
    return repr(v)


def _fmt(v: Any, indent: int, lead: int) -> str:
    """Python source for ``v``; ``lead`` = columns already used on the first line."""
    flat = _flat(v)
    if lead + len(flat) <= WIDTH or not isinstance(v, (dict, list, tuple)) or not v:
        return flat
    pad = " " * (indent + 4)
    if isinstance(v, dict):
        use_kw = all(_key_ok(k) for k in v)
        parts = []
        for k, x in v.items():
            head = f"{k}=" if use_kw else f"{k!r}: "
            parts.append(pad + head + _fmt(x, indent + 4, indent + 4 + len(head)))
        open_, close = ("dict(", ")") if use_kw else ("{", "}")
    else:
        parts = [pad + _fmt(x, indent + 4, indent + 4) for x in v]
        open_, close = ("[", "]") if isinstance(v, list) else ("(", ")")
        if isinstance(v, tuple) and len(v) == 1:
            close = ",)"
    return open_ + "\n" + ",\n".join(parts) + close


def _flat(v: Any) -> str:
    if isinstance(v, dict):
        if all(_key_ok(k) for k in v):
            return "dict(" + ", ".join(f"{k}={_flat(x)}" for k, x in v.items()) + ")"
        return "{" + ", ".join(f"{k!r}: {_flat(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_flat(x) for x in v) + "]"
    if isinstance(v, tuple):
        if len(v) == 1:
            return f"({_flat(v[0])},)"
        return "(" + ", ".join(_flat(x) for x in v) + ")"
    return _fmt_scalar(v)


def _assign(name: str, value: Any) -> str:
    return f"{name} = " + _fmt(value, 0, len(name) + 3)


def _comment_block(lines: List[str], bullet: str = "") -> List[str]:
    out = []
    for line in lines:
        wrapped = textwrap.wrap(line, WIDTH - 6) or [""]
        out.append(f"#{bullet}{wrapped[0]}")
        out.extend(f"#{' ' * len(bullet)}{w}" for w in wrapped[1:])
    return out


def render(result: MigrationResult) -> str:
    """The 1.x config file for ``result`` (deterministic for a given input)."""
    src = os.path.basename(result.source)
    lines = ["# MMEngine 1.x config converted from an MMGeneration 0.x config",
             f"# ({src!r}) by `pygan-optim migrate` (pygan_optim.migrate).",
             "# Review the warnings and the NOT TRANSLATED section at the end before",
             "# training."]
    if result.warnings:
        lines += ["#", "# WARNINGS (lossy conversions):"]
        lines += _comment_block(result.warnings, "   - ")
    if result.notes:
        lines += ["#", "# Notes:"]
        lines += _comment_block(result.notes, "   - ")
    for name, value in result.config.items():
        lines += ["", _assign(name, value)]
    if result.untranslated:
        lines += ["", "", "# " + "=" * (WIDTH - 2),
                  "# NOT TRANSLATED: these 0.x settings have no automatic 1.x equivalent.",
                  "# They are kept here, commented out, so that nothing is lost; port them",
                  "# to their 1.x counterparts by hand.",
                  "# " + "=" * (WIDTH - 2)]
        for item in result.untranslated:
            lines.append("")
            lines += _comment_block([f"{item.path}: {item.reason}"], " [0.x] ")
            code = _assign(item.path, item.value)
            lines += ["# " + ln if ln else "#" for ln in code.split("\n")]
    return "\n".join(lines) + "\n"
