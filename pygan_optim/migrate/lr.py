"""0.x ``lr_config`` (mmcv LrUpdaterHook policies) -> 1.x ``param_scheduler``.

Iteration-based only (GAN runners count iterations). mmgen's ``Linear`` policy
becomes MMagic's ``LinearLrInterval`` with absolute learning rates, one per
optimizer when their base lrs differ (as MMagic's CycleGAN configs do); the
mmcv policies map to MMEngine's ``*LR`` schedulers; a warm-up is prepended.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .common import Ctx, is_pos_int
from .optimizers import named_wrappers


def _base_lrs(optim_wrapper: Optional[dict]) -> Dict[str, Any]:
    return {k: v["optimizer"].get("lr") for k, v in named_wrappers(optim_wrapper).items()}


def _lr_multipliers(optim_wrapper: Optional[dict]) -> Dict[str, List[str]]:
    """Per wrapper, the paramwise_cfg settings that give param groups their own lr."""
    found: Dict[str, List[str]] = {}
    for name, entry in named_wrappers(optim_wrapper).items():
        pw = entry.get("paramwise_cfg")
        if not isinstance(pw, dict):
            continue
        mults = [f"{k}={pw[k]!r}" for k in ("bias_lr_mult", "dcn_offset_lr_mult")
                 if pw.get(k, 1) != 1]
        for key, opts in (pw.get("custom_keys") or {}).items():
            if isinstance(opts, dict) and opts.get("lr_mult", 1) != 1:
                mults.append(f"custom_keys[{key!r}].lr_mult={opts['lr_mult']!r}")
        if mults:
            found[name] = mults
    return found


def translate_lr_config(lr_config: Any, optim_wrapper: Optional[dict],
                       total_iters: Any, ctx: Ctx) -> Any:
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
    # Unset, it is False: mmcv's IterBasedRunner (and mmgen's DynamicIterBasedRunner,
    # one of it) sets that default; an epoch runner is refused (runtime.py).
    by_epoch = cfg.pop("by_epoch", False)
    if by_epoch:
        ctx.keep("lr_config", orig, "epoch-based lr_config; 0.x GAN training is iteration-based")
        ctx.warn("lr_config.by_epoch=True is not converted")
        return None

    def need_total(what: str) -> bool:
        if is_pos_int(total_iters):
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

    def lacks(key: str) -> bool:
        # mmcv's hook has no default for it: the 0.x config could not have run.
        if key in cfg:
            return False
        ctx.keep("lr_config", orig, f"policy {policy!r} without its required {key!r}")
        ctx.warn(f"lr_config policy {policy!r} is not converted: it needs {key!r}, "
                 f"which the config lacks")
        return True

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
        # LinearLrInterval writes one absolute lr into every param group; 0.x scaled each
        # group from its own initial lr, so per-group multipliers would be lost.
        for name, mults in _lr_multipliers(optim_wrapper).items():
            where = f"optim_wrapper.{name}" if name else "optim_wrapper"
            ctx.warn(f"lr_config policy 'Linear' with {where}.paramwise_cfg lr multipliers "
                     f"({', '.join(mults)}): the 1.x LinearLrInterval sets the same absolute "
                     f"lr on every param group from iteration {start} on, so these groups "
                     f"lose their multiplier (0.x decayed each group from its own lr); use "
                     f"MMEngine's LinearLR(start_factor=1.0, end_factor=target/base) for "
                     f"this wrapper to keep them")
        ctx.note("lr_config policy 'Linear' -> mmagic's LinearLrInterval, whose start_factor/"
                 "end_factor are absolute learning rates (one scheduler per optimizer when "
                 "their base lrs differ). It is registered by mmagic, not plain MMEngine; "
                 "without mmagic use MMEngine's LinearLR(start_factor=1.0, "
                 "end_factor=target/base, ...), which loses the interval steps")
    elif policy == "Step":
        if lacks("step"):
            return None
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
        if lacks("gamma"):
            return None
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
    lin = main if "type" in main else next(iter(main.values()))
    warm_end = pre[0]["end"]
    if (lin.get("type") == "LinearLrInterval" and isinstance(warm_end, (int, float))
            and isinstance(lin.get("begin"), (int, float)) and lin["begin"] < warm_end):
        # Schedulers step in list order and LinearLrInterval writes absolute lrs, so it
        # overwrites the multiplicative warm-up wherever their ranges overlap.
        ctx.warn(f"lr_config: the {warmup!r} warm-up (warmup_iters={warm_end}) overlaps "
                 f"the 'Linear' policy (start={lin['begin']}): in 1.x LinearLrInterval sets "
                 f"absolute lrs after the warm-up scheduler every iteration, so the warm-up "
                 f"has no effect from iteration {lin['begin']} to {warm_end} (0.x "
                 f"multiplied the decayed lr by the warm-up factor)")
    if "type" not in main:  # per-optimizer dict: prepend the warm-up to each
        return {k: pre + [v] for k, v in main.items()}
    return pre + [main]

