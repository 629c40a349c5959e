"""0.x runtime keys -> 1.x: ``total_iters`` and ``runner`` (the train loop), the
``evaluation`` interval, the keys that mean the same in both, and the rest, listed (and
kept as comments) with a hint at their 1.x counterpart.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Dict, List, Optional, Tuple

from .common import Ctx, MigrationError, is_pos_int, type_of

# Top-level 0.x keys that mean the same thing in MMEngine 1.x and are copied.
PASSTHROUGH = ("work_dir", "load_from", "log_level")

# Hints for known 0.x keys that have no mechanical 1.x translation.
HINTS = {
    "data": "0.x data settings; 1.x uses train_dataloader / val_dataloader / test_dataloader",
    "dataset_type": "0.x data settings; 1.x uses train_dataloader.dataset",
    "img_norm_cfg": "0.x normalisation; 1.x normalises in model.data_preprocessor",
    "train_pipeline": "0.x pipeline; 1.x pipelines use different transforms",
    "test_pipeline": "0.x pipeline; 1.x pipelines use different transforms",
    "evaluation": "0.x evaluation hook; 1.x needs MMagic's metrics in val_evaluator, a "
                  "val_dataloader and val_cfg=dict(type='MultiValLoop')",
    "metrics": "0.x metrics; 1.x uses val_evaluator / test_evaluator metrics",
    "inception_pkl": "0.x metric setting; 1.x metrics take their own inception args",
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
    "custom_imports": "0.x project modules (not imported when reading the 0.x config); "
                      "list the 1.x project's own modules here",
    "momentum_config": "0.x momentum schedule; 1.x uses momentum schedulers in "
                       "param_scheduler",
}

#: Top-level 0.x keys that the translation steps consume.
CONSUMED = ("model", "train_cfg", "optimizer", "lr_config", "total_iters", "fp16", "apex_amp",
            "custom_hooks", "runner", "checkpoint_config", "log_config", "evaluation")

#: mmcv / mmgen runners that count iterations (the 1.x IterBasedTrainLoop does too).
ITER_RUNNERS = ("IterBasedRunner", "DynamicIterBasedRunner")

#: mmgen evaluation hooks whose ``interval`` (an int or milestones) is translated.
EVAL_HOOKS = ("GenerativeEvalHook", "TranslationEvalHook")


def translate_total_iters(total_iters: Any, factor: int, ctx: Ctx) -> Dict[str, Any]:
    """``train_cfg`` of the 1.x IterBasedTrainLoop ({} when 0.x gives no total_iters)."""
    if total_iters is None:
        ctx.warn("total_iters is missing; no train_cfg (max_iters) written")
        return {}
    if not is_pos_int(total_iters):
        raise MigrationError(f"total_iters must be a positive integer, got {total_iters!r}")
    return dict(by_epoch=False, max_iters=total_iters * factor)


def translate_runner(runner: Any, total_iters: Any, ctx: Ctx) -> Any:
    """Check the 0.x ``runner`` against the 1.x iteration loop; returns the iteration count
    (``total_iters``, or ``runner.max_iters`` when the config has no total_iters).

    ``fp16_loss_scaler`` is left to :func:`.optimizers.apply_amp`.
    """
    if "runner" not in ctx.present:
        return total_iters
    if runner is None:
        ctx.note("runner=None: 0.x trained with mmcv's IterBasedRunner, which 1.x's "
                 "iteration-based train_cfg replaces")
        return total_iters
    if not isinstance(runner, dict):
        ctx.keep("runner", runner, "not a dict")
        ctx.warn(f"runner={runner!r} is not converted (not a dict)")
        return total_iters
    rest = {k: v for k, v in runner.items() if k != "fp16_loss_scaler"}
    kind = rest.pop("type", None)
    if "max_epochs" in rest or (isinstance(kind, str) and "Epoch" in kind):
        ctx.refuse(f"the 0.x runner (type={kind!r}) counts epochs: mmgen's train.py passed "
                   f"total_iters to it as the number of epochs, and the EMA, lr and "
                   f"checkpoint settings would change meaning in 1.x's iteration loop",
                   "Translate this config by hand (1.x: train_cfg=dict(by_epoch=True, "
                   "max_epochs=...)) or use an iteration runner in the 0.x config")
    if kind is None or kind in ITER_RUNNERS:
        if kind is not None:
            ctx.note(f"runner type={kind!r} -> 1.x IterBasedTrainLoop (train_cfg "
                     f"by_epoch=False)")
    else:
        ctx.keep("runner.type", kind, "unknown 0.x runner")
        ctx.warn(f"runner type={kind!r} is not converted: the 1.x run uses MMEngine's "
                 f"IterBasedTrainLoop")
    if "max_iters" in rest:
        max_iters = rest.pop("max_iters")
        if total_iters is None:
            ctx.note(f"runner.max_iters={max_iters!r} used as total_iters (the config has "
                     f"none)")
            total_iters = max_iters
        elif max_iters != total_iters:
            ctx.note(f"runner.max_iters={max_iters!r} dropped: mmgen's train.py ran "
                     f"total_iters={total_iters!r} iterations")
    if "pass_training_status" in rest:
        ctx.note(f"runner.pass_training_status={rest.pop('pass_training_status')!r} "
                 f"dropped: 1.x models read the iteration from the runner")
    if "is_dynamic_ddp" in rest:
        ctx.keep("runner.is_dynamic_ddp", rest.pop("is_dynamic_ddp"),
                 "0.x DDP setting; 1.x uses model_wrapper_cfg (MMagic: "
                 "MMSeparateDistributedDataParallel)")
    for key, value in rest.items():
        ctx.keep(f"runner.{key}", value, "runner option with no 1.x counterpart")
        ctx.warn(f"runner.{key}={value!r} is not converted: no 1.x counterpart")
    return total_iters


def _interval_schedule(interval: Any) -> Optional[Tuple[List[int], List[int]]]:
    """(milestones, intervals) of a 0.x eval interval; None when 0.x would reject it."""
    if is_pos_int(interval):
        return [], [interval]
    if (not isinstance(interval, dict) or set(interval) != {"milestones", "interval"}
            or not all(isinstance(v, (list, tuple)) for v in interval.values())):
        return None
    ms, ns = list(interval["milestones"]), list(interval["interval"])
    if (len(ns) != len(ms) + 1 or not all(map(is_pos_int, ns + ms))
            or any(a >= b for a, b in zip(ms, ms[1:]))):
        return None
    return ms, ns


def translate_evaluation(value: Any, factor: int, max_iters: Optional[int], ctx: Ctx
                         ) -> Dict[str, Any]:
    """``train_cfg`` entries for the 0.x evaluation interval ({} when none); the rest of
    ``evaluation`` (the metrics) is kept as a comment.

    0.x evaluated after the c-th iteration when c % interval == 0, the interval chosen by
    ``bisect_right(milestones, c)``. MMEngine's loop takes ``val_interval`` and
    ``dynamic_intervals=[(milestone, interval), ...]`` but picks the interval with c + 1,
    so a milestone m (counted in 1.x iterations) matches 0.x unless iteration m - 1 would
    then be evaluated differently; there m + 1 is written.
    """
    if "evaluation" not in ctx.present:
        return {}
    if value is None:
        ctx.note("evaluation=None dropped (0.x did not evaluate)")
        return {}
    kind = type_of(value)
    if kind not in EVAL_HOOKS:
        what = f"a {kind!r} hook's interval is not translated" if kind else "not a hook dict"
        ctx.keep("evaluation", value, f"{HINTS['evaluation']}; {what}")
        return {}
    schedule = _interval_schedule(value.get("interval", 1))
    if schedule is None or max_iters is None:
        interval = value.get("interval", 1)
        why = ("no train_cfg is written (no total_iters)" if schedule is not None else
               "0.x never evaluated with it" if isinstance(interval, int) else
               "0.x rejects this interval")
        ctx.keep("evaluation", value, f"{HINTS['evaluation']}; its interval is not "
                                      f"translated: {why}")
        return {}
    ms, ns = schedule
    out: Dict[str, Any] = dict(val_interval=ns[0] * factor)
    dynamic = []
    for m, old, new in zip(ms, ns, ns[1:]):
        at = m * factor
        before = at - 1  # the one iteration where MMEngine's choice differs from 0.x's
        mm_evaluates = before % (new * factor) == 0
        old_evaluates = before % factor == 0 and (before // factor) % old == 0
        if mm_evaluates != old_evaluates:
            ctx.note(f"evaluation milestone {m} written as {at + 1}: MMEngine picks the "
                     f"interval one iteration ahead, so with {at} it would "
                     f"{'skip' if old_evaluates else 'add'} an evaluation at iteration "
                     f"{before}")
            at += 1
        dynamic.append((at, new * factor))
    if dynamic:
        out["dynamic_intervals"] = dynamic
    rest = {k: v for k, v in value.items() if k != "interval"}
    ctx.keep("evaluation", rest, HINTS["evaluation"] + " (its interval is translated to "
                                                      "train_cfg)")
    last = ns[bisect_right(ms, max_iters // factor)] * factor
    end = (f"; MMEngine also evaluates after the last iteration ({max_iters}), which 0.x "
           f"did not" if max_iters % last else "")
    ctx.note("evaluation.interval -> train_cfg " + ", ".join(
        f"{k}={v!r}" for k, v in out.items()) + " (counted in 1.x iterations); it takes effect "
        "once val_dataloader, val_evaluator and val_cfg are set" + end)
    return out


def keep_the_rest(cfg: Dict[str, Any], out: Dict[str, Any], ctx: Ctx) -> None:
    """Copy the pass-through keys into ``out``; list every other unconsumed key."""
    for key in PASSTHROUGH:
        if key in cfg:
            out[key] = cfg[key]
    for key, value in cfg.items():
        if key in CONSUMED or key in PASSTHROUGH:
            continue
        if key == "test_cfg" and value is None:
            ctx.note("test_cfg=None dropped (0.x model test settings; 1.x test_cfg is the "
                     "test loop)")
            continue
        ctx.keep(key, value, HINTS.get(key, "unknown 0.x key with no automatic 1.x equivalent"))
    # List the untranslated items in the order of the 0.x config's top-level keys.
    position = {k: i for i, k in enumerate(cfg)}
    ctx.untranslated.sort(
        key=lambda it: position.get(it.path.split(".")[0].split("[")[0], len(position)))

