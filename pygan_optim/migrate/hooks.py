"""0.x hooks -> 1.x: the ``ExponentialMovingAverageHook`` on ``generator_ema`` becomes
``model.ema_config``; every other hook is kept, commented out.

Units change: 0.x counts the hook's ``interval`` and ``start_iter`` in
iterations, 1.x counts ``ema_config.interval`` / ``start_iter`` in generator
phases of ``discriminator_steps * accumulative_counts`` iterations, and its
``momentum`` is the weight of the new parameters (``1 - m`` of 0.x).
``momentum_policy='rampup'`` becomes MMagic's ``RampUpEMA`` with the same
``momentum_cfg`` values.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from .common import Ctx, clean_float, is_int, is_real, type_of
from .schedule import Steps

HOOK_HINT = "0.x hook with no automatic 1.x equivalent"


def _is_ema_hook(hook: Any) -> bool:
    return type_of(hook) == "ExponentialMovingAverageHook"


def _module_keys(hook: dict) -> Tuple[str, ...]:
    keys = hook.get("module_keys", ())
    return (keys,) if isinstance(keys, str) else tuple(keys)


def _integral(value: Any, what: str, ctx: Ctx) -> Any:
    """An integral float as the int it stands for (noted); anything else as it is."""
    if isinstance(value, float) and value.is_integer():
        ctx.note(f"{what}={value!r} read as the integer {int(value)}")
        return int(value)
    return value


def _convert_ema(hook: dict, steps: Steps, ctx: Ctx, index: int) -> Optional[dict]:
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
    if interp_mode != "lerp" or policy not in ("fixed", "rampup"):
        ctx.keep(path, dict(hook, type="ExponentialMovingAverageHook", module_keys=keys,
                            interp_mode=interp_mode, momentum_policy=policy),
                 "only interp_mode='lerp' with momentum_policy 'fixed' or 'rampup' is "
                 "converted")
        ctx.warn(f"{path}: EMA hook with interp_mode={interp_mode!r}, "
                 f"momentum_policy={policy!r} is not converted; no ema_config written")
        return None
    rampup = dict(hook.pop("momentum_cfg", None) or {}) if policy == "rampup" else None
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

    # mmcv compared iterations with an integral float (interval=8.0) as with the int.
    interval = _integral(interval, f"{path}: EMA interval", ctx)
    start = _integral(start, f"{path}: EMA start_iter", ctx)

    def keep_hook(why: str, **more: Any) -> None:
        ctx.keep(path, dict(type="ExponentialMovingAverageHook", module_keys=keys,
                            interval=interval, start_iter=start, **more), why)

    for name, value in (("start_iter", start), ("interval", interval)):
        if not is_int(value):
            keep_hook(f"{name} must be an integer number of iterations")
            ctx.warn(f"{path}: EMA {name}={value!r} is not an integer; no ema_config written")
            return None
    if interval <= 0:
        keep_hook("interval <= 0 never averages in 0.x; 1.x cannot express that")
        ctx.warn(f"{path}: EMA interval={interval} (never update) is not representable")
        return None
    if rampup is None and (not is_real(m) or not 0.0 < m < 1.0):
        # 1.x's ExponentialMovingAverage takes a weight of the new values in (0, 1):
        # 0.x's momentum 1 (a frozen average) or 0 (a copy) has no 1.x form. (A
        # ramp-up replaced this momentum by its ramped one: it was never used.)
        keep_hook("1.x EMA momentum (1 - the 0.x momentum) must be in (0, 1)",
                  interp_cfg=dict(momentum=m, momentum_nontrainable=mn))
        ctx.warn(f"{path}: EMA momentum={m!r} is not converted (1.x needs a number in (0, 1), "
                 f"for 1 - momentum); no ema_config written")
        return None

    phase = steps.phase  # iterations per 1.x generator phase
    momentum = 1.0 - m if rampup is None else None  # (RampUpEMA ramps its own)
    if interval % phase == 0:
        new_interval = interval // phase
    elif phase % interval == 0:
        k = phase // interval
        new_interval = 1
        if momentum is not None:
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
    if rampup is not None and mn != 0:
        # The ramped momentum replaces only the trainable one in 0.x: buffers kept a
        # constant weight, which neither of RampUpEMA's buffer modes gives.
        update_buffers = False
        ctx.warn(f"{path}: momentum_nontrainable={mn} with momentum_policy='rampup' is not "
                 f"representable (0.x blended buffers with that constant weight; 1.x "
                 f"RampUpEMA copies them or blends them with the ramped momentum); buffers "
                 f"are copied (update_buffers=False)")
    elif mn == m:
        update_buffers = True
    elif mn == 0:
        update_buffers = False
    else:
        update_buffers = False
        ctx.warn(f"{path}: momentum_nontrainable={mn} (neither 0 nor momentum={m}) is not "
                 f"representable; buffers are copied (update_buffers=False)")
    if rampup is not None:
        if new_interval != 1 or phase != 1:
            ctx.warn(f"{path}: the ramp-up EMA counts generator updates; with a "
                     f"{phase}-iteration generator phase its ramp-up is reached later")
        return dict(type="RampUpEMA", interval=new_interval, **rampup, start_iter=new_start)
    if not steps.use_ema:
        ctx.note("train_cfg.use_ema is not set, but the EMA hook created generator_ema in "
                 "0.x; converted to model.ema_config")
    return dict(type="ExponentialMovingAverage", interval=new_interval,
                momentum=clean_float(momentum), update_buffers=update_buffers,
                start_iter=new_start)


def translate_hooks(hooks: Any, steps: Steps, ctx: Ctx) -> Optional[dict]:
    ema = None
    if hooks is None:
        hooks = []
    if not isinstance(hooks, (list, tuple)):
        ctx.keep("custom_hooks", hooks, HOOK_HINT)
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
            hint = f"{type_of(hook)}: {HOOK_HINT}"
            ctx.keep(f"custom_hooks[{i}]", hook, hint)
    if ema is None and steps.use_ema:
        ctx.warn("train_cfg.use_ema=True without an ExponentialMovingAverageHook made a "
                 "frozen copy of the initial generator in 0.x; 1.x has no equivalent, so no "
                 "ema_config is written")
    return ema or None


