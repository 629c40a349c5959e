"""0.x ``checkpoint_config`` / ``log_config`` -> 1.x ``default_hooks.checkpoint`` /
``default_hooks.logger``, ``log_processor`` and ``visualizer``.

mmcv's iteration runner built a ``CheckpointHook`` from ``checkpoint_config`` and one
logger hook per ``log_config.hooks`` entry, each taking ``log_config.interval`` unless it
set its own; both defaulted ``by_epoch`` to False. MMEngine's ``CheckpointHook`` takes
the same arguments under the same names; one ``LoggerHook`` prints the text log and hands
the scalars to the visualizer's backends, which stand in for the 0.x TensorBoard and
wandb hooks. The 0.x text log averaged each value over the logging interval, so
``log_processor.window_size`` is that interval.

Intervals count 0.x iterations; ``factor`` (``Steps.iter_factor``) turns them into 1.x
iterations, as it does for ``max_iters``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from .common import Ctx, is_pos_int, type_of

#: CheckpointHook arguments with the same name and meaning in mmcv and MMEngine.
CHECKPOINT_SAME = ("save_optimizer", "max_keep_ckpts", "save_last", "file_client_args",
                   "filename_tmpl")
#: TextLoggerHook arguments that MMEngine's LoggerHook takes under the same name.
TEXT_SAME = ("out_dir", "keep_local", "file_client_args")

_TEXT = "TextLoggerHook"
_TENSORBOARD = "TensorboardLoggerHook"
_WANDB = "WandbLoggerHook"


def _scaled(n: int, factor: int) -> int:
    return n * factor if n > 0 else n


def translate_checkpoint_config(value: Any, factor: int, ctx: Ctx
                                ) -> Tuple[bool, Optional[dict]]:
    """(write it, ``default_hooks.checkpoint``); None written means no checkpoints."""
    if "checkpoint_config" not in ctx.present:
        return False, None
    if value is None:
        ctx.note("checkpoint_config=None: 0.x saved no checkpoints; written as "
                 "default_hooks.checkpoint=None (no CheckpointHook)")
        return True, None
    if not isinstance(value, dict):
        ctx.keep("checkpoint_config", value, "not a dict")
        ctx.warn(f"checkpoint_config={value!r} is not converted (not a dict)")
        return False, None
    cfg = dict(value)
    kind = cfg.pop("type", "CheckpointHook")
    if kind != "CheckpointHook":
        ctx.keep("checkpoint_config", value, f"{kind}: only mmcv's CheckpointHook has a 1.x "
                                             f"counterpart here")
        ctx.warn(f"checkpoint_config type={kind!r} is not converted; the 1.x run uses "
                 f"MMEngine's default CheckpointHook")
        return False, None
    if cfg.pop("by_epoch", False) is not False:
        ctx.keep("checkpoint_config", value, "epoch-based; 0.x GAN training counts iterations")
        ctx.warn("checkpoint_config.by_epoch=True is not converted (0.x's iteration runner "
                 "never ended an epoch for it); the 1.x run uses MMEngine's default "
                 "CheckpointHook")
        return False, None
    interval = cfg.pop("interval", -1)
    if not isinstance(interval, int) or isinstance(interval, bool):
        ctx.keep("checkpoint_config", value, "interval is not an integer")
        ctx.warn(f"checkpoint_config.interval={interval!r} is not converted (not an integer)")
        return False, None
    hook: Dict[str, Any] = dict(type="CheckpointHook", interval=_scaled(interval, factor),
                                by_epoch=False)
    if factor != 1 and interval > 0:
        ctx.note(f"checkpoint_config.interval={interval} 0.x iterations = {interval * factor} "
                 f"1.x iterations")
    out_dir = cfg.pop("out_dir", None)
    # mmgen's train.py set out_dir = join(work_dir, out_dir or 'ckpt'); mmcv's hook then
    # appended the work_dir's name. MMEngine appends the name too, but its out_dir is not
    # relative to work_dir.
    if out_dir is None:
        ctx.note("checkpoints: 0.x saved them in <work_dir>/ckpt/<work_dir's name>/, 1.x "
                 "saves them in work_dir")
    elif isinstance(out_dir, str) and os.path.isabs(out_dir):
        hook["out_dir"] = out_dir
    else:
        ctx.keep("checkpoint_config.out_dir", out_dir, "0.x put it under work_dir, which a "
                                                       "1.x out_dir cannot express")
        ctx.warn(f"checkpoint_config.out_dir={out_dir!r} is not converted: 0.x saved into "
                 f"<work_dir>/{out_dir}/<work_dir's name>/, a 1.x out_dir is not relative "
                 f"to work_dir; checkpoints go to work_dir")
    for key in list(cfg):
        if key in CHECKPOINT_SAME:
            hook[key] = cfg.pop(key)
    if "sync_buffer" in cfg:
        sync = cfg.pop("sync_buffer")
        if sync:
            ctx.keep("checkpoint_config.sync_buffer", sync, "MMEngine's CheckpointHook does "
                                                            "not all-reduce buffers")
            ctx.warn("checkpoint_config.sync_buffer=True is not converted: MMEngine's "
                     "CheckpointHook saves the buffers without all-reducing them first")
        else:
            ctx.note("checkpoint_config.sync_buffer=False dropped (MMEngine never syncs)")
    if "create_symlink" in cfg:
        ctx.note(f"checkpoint_config.create_symlink={cfg.pop('create_symlink')!r} dropped: "
                 f"MMEngine makes no latest.pth link; work_dir/last_checkpoint names the "
                 f"last checkpoint")
    for key, v in cfg.items():
        ctx.keep(f"checkpoint_config.{key}", v, "CheckpointHook option with no MMEngine "
                                                "argument")
        ctx.warn(f"checkpoint_config.{key}={v!r} is not converted: MMEngine's "
                 f"CheckpointHook has no such argument")
    return True, hook


def _hook_interval(hook: dict, default: Any, path: str, ctx: Ctx) -> Optional[int]:
    every = hook.pop("interval", default)
    if not is_pos_int(every):
        ctx.warn(f"{path}: interval={every!r} is not converted (1.x needs a positive "
                 f"integer)")
        return None
    return every


def _text_options(hook: dict, path: str, factor: int, logger: dict, ctx: Ctx) -> None:
    for key in list(hook):
        if key in TEXT_SAME:
            logger[key] = hook.pop(key)
    if "interval_exp_name" in hook:
        logger["interval_exp_name"] = _scaled(hook.pop("interval_exp_name"), factor)
    if "out_suffix" in hook:
        v = hook.pop("out_suffix")
        ctx.keep(f"{path}.out_suffix", v, "1.x log files have other names (.json)")
        ctx.warn(f"{path}.out_suffix={v!r} is not converted: 1.x names its log files "
                 f"differently; LoggerHook's default suffixes are used")


def _tensorboard(hook: dict, path: str, ctx: Ctx) -> dict:
    backend = dict(type="TensorboardVisBackend")
    if hook.get("log_dir") is not None:
        backend["save_dir"] = hook.pop("log_dir")
    else:
        hook.pop("log_dir", None)
        ctx.note(f"{path}: TensorBoard writes to <work_dir>/<timestamp>/vis_data in 1.x "
                 f"(0.x: <work_dir>/tf_logs)")
    ctx.note(f"{path}: the 1.x TensorBoard scalars carry MMEngine's log names (no 'train/' "
             f"prefix)")
    return backend


def _wandb(hook: dict, path: str, ctx: Ctx) -> dict:
    backend = dict(type="WandbVisBackend")
    for key in ("init_kwargs", "commit", "define_metric_cfg"):
        if key in hook:
            backend[key] = hook.pop(key)
    with_step = hook.pop("with_step", True)
    ctx.warn(f"{path}: 0.x logged the iteration with each wandb entry "
             f"({'step=' if with_step else 'a global_step value'}); MMEngine's "
             f"WandbVisBackend does not, so wandb counts its own steps")
    artifact = hook.pop("log_artifact", True)
    suffix = hook.pop("out_suffix", None)
    if artifact:
        ctx.warn(f"{path}: log_artifact=True (0.x uploaded the log files as a wandb artifact "
                 f"after the run) is not converted: MMEngine's WandbVisBackend uploads none")
    elif suffix is not None:
        ctx.note(f"{path}.out_suffix dropped (used only for the artifact, which was off)")
    return backend


def translate_log_config(value: Any, factor: int, ctx: Ctx) -> Dict[str, Any]:
    """Top-level 1.x entries: ``default_hooks`` (its ``logger``), ``log_processor`` and
    ``visualizer``, as far as they can be translated ({} when nothing is written)."""
    if "log_config" not in ctx.present:
        return {}
    if value is None:
        ctx.note("log_config=None: 0.x registered no logger hook; written as "
                 "default_hooks.logger=None")
        return dict(default_hooks=dict(logger=None))
    if not isinstance(value, dict) or not isinstance(value.get("hooks"), (list, tuple)):
        ctx.keep("log_config", value, "no hooks list")
        ctx.warn("log_config is not converted: it has no hooks list (0.x reads "
                 "log_config.hooks)")
        return {}
    cfg = dict(value)
    hooks = cfg.pop("hooks")
    base = cfg.pop("interval", None)
    for key, v in cfg.items():
        ctx.keep(f"log_config.{key}", v, "0.x's runner read only interval and hooks")
        ctx.note(f"log_config.{key} is not translated: 0.x's runner ignored it")
    if not hooks:
        ctx.note("log_config.hooks is empty: 0.x registered no logger hook; written as "
                 "default_hooks.logger=None")
        return dict(default_hooks=dict(logger=None))

    logger: Dict[str, Any] = dict(type="LoggerHook")
    backends: List[dict] = []
    intervals: List[Tuple[str, int]] = []  # (path, interval) of each converted hook
    ignore_last: Dict[str, Any] = {}  # path -> ignore_last of each converted hook
    text_at = 0  # index in intervals of the TextLoggerHook's interval
    has_text = False
    for i, hook in enumerate(hooks):
        path = f"log_config.hooks[{i}]"
        kind = type_of(hook)
        if kind not in (_TEXT, _TENSORBOARD, _WANDB):
            ctx.keep(path, hook, f"{kind}: no faithful 1.x counterpart here")
            ctx.warn(f"{path}: {kind} is not converted (only {_TEXT}, {_TENSORBOARD} and "
                     f"{_WANDB} are)")
            continue
        if kind == _TEXT and has_text:
            ctx.keep(path, hook, "a second TextLoggerHook")
            ctx.warn(f"{path}: a second TextLoggerHook is not converted")
            continue
        h = dict(hook)
        h.pop("type")
        if h.pop("by_epoch", False) is not False:
            ctx.keep(path, hook, "epoch-based; 0.x GAN training counts iterations")
            ctx.warn(f"{path}: {kind} with by_epoch=True is not converted")
            continue
        every = _hook_interval(h, base, path, ctx)
        if every is None:
            ctx.keep(path, hook, "interval is not a positive integer")
            continue
        intervals.append((path, every))
        ignore_last[path] = h.pop("ignore_last", True)  # mmcv's default, MMEngine's too
        if "reset_flag" in h:
            ctx.note(f"{path}.reset_flag dropped (1.x's log processor averages over a window)")
            h.pop("reset_flag")
        if kind == _TEXT:
            has_text, text_at = True, len(intervals) - 1
            _text_options(h, path, factor, logger, ctx)
        elif kind == _TENSORBOARD:
            backends.append(_tensorboard(h, path, ctx))
        else:
            backends.append(_wandb(h, path, ctx))
        for key, v in h.items():
            ctx.keep(f"{path}.{key}", v, f"{kind} option with no 1.x counterpart")
            ctx.warn(f"{path}.{key}={v!r} is not converted: no 1.x counterpart")
    if not intervals:
        return {}

    # One LoggerHook logs the text and the backends' scalars: the text hook's interval.
    path0, every = intervals[text_at]
    for path, n in intervals:
        if n != every:
            ctx.warn(f"{path} logged every {n} iterations; 1.x's single LoggerHook logs "
                     f"everything every {every} (the interval of {path0})")
    for path, v in ignore_last.items():
        if v != ignore_last[path0]:
            ctx.warn(f"{path} had ignore_last={v!r}; 1.x's single LoggerHook takes "
                     f"ignore_last={ignore_last[path0]!r} (that of {path0})")
    if ignore_last[path0] is not True:
        logger["ignore_last"] = ignore_last[path0]
    n = every * factor
    if factor != 1:
        ctx.note(f"log_config interval={every} 0.x iterations = {n} 1.x iterations")
    logger = dict(type="LoggerHook", interval=n, **{k: v for k, v in logger.items()
                                                    if k != "type"},
                  log_metric_by_epoch=False)
    out: Dict[str, Any] = dict(default_hooks=dict(logger=logger),
                               log_processor=dict(type="LogProcessor", window_size=n,
                                                  by_epoch=False))
    if not has_text:
        ctx.note("log_config has no TextLoggerHook: 1.x's LoggerHook prints the text log "
                 "anyway")
    if backends:
        local = [dict(type="LocalVisBackend")] if has_text else []
        out["visualizer"] = dict(type="Visualizer", vis_backends=local + backends)
    return out
