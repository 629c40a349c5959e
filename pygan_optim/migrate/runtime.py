"""0.x runtime keys -> 1.x: ``total_iters``, the keys that mean the same in both, and the
rest, listed (and kept as comments) with a hint at their 1.x counterpart.
"""
from __future__ import annotations

from typing import Any, Dict

from .common import Ctx, MigrationError, is_pos_int

# Top-level 0.x keys that mean the same thing in MMEngine 1.x and are copied.
PASSTHROUGH = ("work_dir", "load_from", "log_level")

# Hints for known 0.x keys that have no mechanical 1.x translation.
HINTS = {
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
    "custom_imports": "0.x project modules (not imported when reading the 0.x config); "
                      "list the 1.x project's own modules here",
    "momentum_config": "0.x momentum schedule; 1.x uses momentum schedulers in "
                       "param_scheduler",
}

#: Top-level 0.x keys that the translation steps consume.
CONSUMED = ("model", "train_cfg", "optimizer", "lr_config", "total_iters", "fp16", "apex_amp",
            "custom_hooks")


def translate_total_iters(total_iters: Any, factor: int, ctx: Ctx) -> Dict[str, Any]:
    """``train_cfg`` of the 1.x IterBasedTrainLoop ({} when 0.x gives no total_iters)."""
    if total_iters is None:
        ctx.warn("total_iters is missing; no train_cfg (max_iters) written")
        return {}
    if not is_pos_int(total_iters):
        raise MigrationError(f"total_iters must be a positive integer, got {total_iters!r}")
    return dict(by_epoch=False, max_iters=total_iters * factor)


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
        if key == "runner" and isinstance(value, dict):
            rest = {k: v for k, v in value.items() if k not in ("fp16_loss_scaler",)}
            if rest:
                ctx.keep("runner", rest, HINTS["runner"])
            continue
        ctx.keep(key, value, HINTS.get(key, "unknown 0.x key with no automatic 1.x equivalent"))
    # List the untranslated items in the order of the 0.x config's top-level keys.
    position = {k: i for i, k in enumerate(cfg)}
    ctx.untranslated.sort(
        key=lambda it: position.get(it.path.split(".")[0].split("[")[0], len(position)))

