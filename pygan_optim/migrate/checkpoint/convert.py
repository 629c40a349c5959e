"""Convert an MMGeneration 0.x GAN checkpoint into one MMEngine 1.x's Runner resumes.

``pygan-optim migrate --checkpoint OLD.pth -o NEW.pth [--config NEW.py] [--strict]``
(CLI in :mod:`pygan_optim.migrate_cli`), or in Python
``new, report = convert_checkpoint(torch.load(OLD.pth))``. The result resumes with
``Runner(..., resume=True, load_from=NEW.pth)`` and the 1.x config that
``pygan-optim migrate OLD.py`` made from the run's 0.x config (the BigGAN
model with ``FusedAdam`` or ``torch.optim.Adam`` in the wrappers, our EMA).

What a 0.x checkpoint holds (``mmgen/core/runners/checkpoint.py`` and
``DynamicIterBasedRunner.save_checkpoint`` of MMGeneration 0.7.3): ``meta``
(``iter`` = iterations done, ``epoch``, ``mmcv_version``, ``time``,
``mmgen_version``, ``config`` = the 0.x config text, ``seed``, ``exp_name``,
``env_info``, maybe ``hook_msgs`` or ``fp16.loss_scaler``), ``state_dict``
(``generator.*``, ``discriminator.*``, ``generator_ema.*``: a plain copy of the
generator that ``ExponentialMovingAverageHook`` blends; wrappers already removed
by mmcv's ``get_state_dict``), ``optimizer`` = ``{name: torch optimizer
state_dict}`` and, with fp16, ``loss_scaler`` (a ``GradScaler`` state) or
``amp`` (apex).

The conversion, key by key (the report lists what happened to each):

=============================================  =============================================
0.x                                            1.x
=============================================  =============================================
``meta.iter``                                  ``meta.iter`` (Runner.resume sets runner.iter)
``meta.epoch`` (data passes, 1-based)          ``meta.epoch = 0`` (IterBasedTrainLoop's)
``meta.seed`` (an int)                         ``meta.seed`` (the resumed run re-seeds)
``meta.config``, other ``meta`` entries        ``meta.mmgen_0x.*`` (never ``meta.config``:
                                               Runner.resume would parse it as a 1.x config
                                               and compare its ``gpu_ids``)
``state_dict.generator.*``                     ``state_dict.generator.*``
``state_dict.discriminator.*``                 ``state_dict.discriminator.*``
``state_dict.generator_ema.*``                 ``state_dict.generator_ema.module.*``
(none)                                         ``state_dict.generator_ema.steps``
``module.`` prefixes (whole model or network)  removed
``optimizer.<name>`` (torch 1.x layout)        ``optimizer.<name>`` (OptimWrapperDict layout;
                                               Adam's ``step`` as a float32 tensor)
``loss_scaler`` / ``meta.fp16.loss_scaler``    ``optimizer.<name>.loss_scaler`` per Amp wrapper
(none)                                         ``message_hub`` (iter and epoch)
(none)                                         no ``param_schedulers``: reported when the
                                               1.x config has a ``param_scheduler``
``amp`` (apex), unknown keys                   not converted, reported
=============================================  =============================================

``generator_ema.steps`` is the number of ``update_parameters`` calls the 1.x
schedule makes in ``meta.iter`` iterations (the EMA start and interval are in
generator phases of ``discriminator_steps * accumulative_counts`` iterations),
so an EMA that was averaging keeps averaging (blend, not copy) at the next update.

Everything is checked against the 1.x model before anything is written: its
config (``config=``, or else the 0.x config in ``meta.config`` migrated with
:func:`pygan_optim.migrate.convert`) is built on the ``meta`` device (no memory,
under a second for BigGAN-128) and every key and shape, every optimizer's
parameter count and the shape of every moment must match; without a usable config
the checkpoint is checked against itself. Reading ``meta.config`` runs it as a Python
config file (as MMEngine's own ``Runner.resume`` does with a ``meta.config``); with
``config=`` given it is not read. A checkpoint that is not a GAN with
per-network optimizers, lacks ``meta.iter`` or an optimizer, is already a 1.x
checkpoint, or does not fit the model raises :class:`CheckpointConversionError`.

The output holds only tensors, numbers, strings and containers, so it loads with
``torch.load(weights_only=True)`` (the default since torch 2.6) and MMEngine
resumes it without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .check import check
from .ema import ema_steps_for
from .loadable import safe
from .loss_scaler import grad_scaler_state
from .optimizer_state import convert_optimizer_state, group_params, is_optimizer_state
from .report import CheckpointConversionError, CheckpointReport, fail
from .state_dict import strip_module
from .target import EMA, NETWORKS, Target, resolve_target

_AMP_WRAPPERS = ("AmpOptimWrapper", "FusedAmpOptimWrapper")


def convert_checkpoint(old: dict, config: Union[None, str, dict, Any] = None,
                       strict: bool = False) -> Tuple[dict, CheckpointReport]:
    """Convert a loaded MMGeneration 0.x checkpoint (see the module docstring).

    ``config``: the 1.x config the result will be resumed with (a path, a dict or an
    ``mmengine.Config``); by default the 0.x config stored in ``old['meta']['config']``,
    migrated. Returns ``(new_checkpoint, report)``; ``old`` is not modified (tensors
    are shared, not copied). Raises :class:`CheckpointConversionError` when the
    checkpoint cannot be converted, or with ``strict=True`` when anything would be
    lost or approximated (``report.warnings``).
    """
    report = CheckpointReport()
    meta, iters = _checked_input(old, report)
    sd, smeta, tops = _networks(old, report)
    optim_in = _checked_optimizers(old)

    target = resolve_target(config, meta, report)
    if target.cfg is not None and target.single_wrapper:
        fail("the 1.x config has a single optim_wrapper, but the checkpoint has one optimizer "
             "per network; use optim_wrapper=dict(constructor='MultiOptimWrapperConstructor', "
             "generator=..., discriminator=...)")

    keep_ema = EMA in tops and target.has_ema is not False
    new_sd, new_meta = _weights(sd, smeta, tops, keep_ema, target, report)
    if keep_ema or (EMA not in tops and target.has_ema):
        _add_ema(new_sd, new_meta, sd, smeta, tops, iters, target, report)

    wrappers = target.wrappers
    new_optim = _optimizers(optim_in, tops, wrappers, report)
    check(new_sd, new_optim, sd, tops, target, report)
    _add_loss_scaler(old, meta, new_optim, wrappers, report)
    _warn_unconverted(old, target, report)
    new_meta_dict, message_hub = _meta(meta, iters, report)

    if new_meta:
        new_sd._metadata = OrderedDict(new_meta)  # type: ignore[attr-defined]
    new = {"meta": new_meta_dict, "state_dict": new_sd, "optimizer": new_optim,
           "message_hub": message_hub}
    if strict and report.warnings:
        raise CheckpointConversionError(
            "strict conversion: " + "; ".join(report.warnings), report.warnings)
    return new, report


def _checked_input(old: Any, report: CheckpointReport) -> Tuple[dict, int]:
    """Refuse what is not a 0.x training checkpoint; return its ``meta`` and ``meta.iter``."""
    if not isinstance(old, dict):
        fail(f"not a checkpoint: expected a dict, got {type(old).__name__}")
    meta = old.get("meta")
    if "message_hub" in old or (isinstance(meta, dict) and (
            "mmengine_version" in meta or "cfg" in meta)):
        fail("this is already an MMEngine 1.x checkpoint (it has message_hub / "
             "meta.mmengine_version): resume from it directly")
    if "state_dict" not in old:
        if old and all(isinstance(v, torch.Tensor) for v in old.values()):
            fail("this is a bare model state_dict, not a 0.x training checkpoint (no 'meta', "
                 "'state_dict', 'optimizer'): it has no training state to resume")
        fail(f"not an MMGeneration 0.x checkpoint: no 'state_dict' (keys: {sorted(old)})")
    if not isinstance(meta, dict):
        fail("the checkpoint has no 'meta' dict, so the iteration to resume at is unknown")
    iters = meta.get("iter")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        fail(f"meta.iter must be a non-negative integer (the iterations done), got {iters!r}")
    report.iter = iters
    return meta, iters


def _networks(old: dict, report: CheckpointReport) -> Tuple[OrderedDict, dict, OrderedDict]:
    """``module.``-stripped state_dict, its ``_metadata`` and its keys by top-level module;
    refuses a model without both GAN networks."""
    sd_in = old["state_dict"]
    if not isinstance(sd_in, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in sd_in.values()):
        fail("state_dict must map names to tensors")
    sd, smeta = strip_module(OrderedDict(sd_in), dict(getattr(sd_in, "_metadata", {}) or {}),
                             report)
    tops = OrderedDict()
    for k in sd:
        tops.setdefault(k.split(".", 1)[0], []).append(k)
    missing_nets = [n for n in NETWORKS if n not in tops]
    if missing_nets:
        fail(f"not a BigGAN-style GAN checkpoint: state_dict has no {missing_nets} weights "
             f"(its modules: {list(tops)}); only GANs with 'generator' and 'discriminator' "
             "networks are converted")
    return sd, smeta, tops


def _checked_optimizers(old: dict) -> Dict[str, dict]:
    """The 0.x ``optimizer`` entry, once it is known to be one torch state per network."""
    if "optimizer" not in old or old["optimizer"] is None:
        fail("the checkpoint has no optimizer state (saved with save_optimizer=False?), so "
             "training cannot be resumed from it")
    optim_in = old["optimizer"]
    if is_optimizer_state(optim_in):
        fail("the checkpoint has a single optimizer over the whole model, not one per "
             "network ({'generator': ..., 'discriminator': ...}); it is not a 0.x GAN "
             "checkpoint this converter handles")
    if not isinstance(optim_in, dict) or not all(is_optimizer_state(v)
                                                 for v in optim_in.values()):
        fail("optimizer must be a dict of torch optimizer state_dicts, one per network")
    missing_opt = [n for n in NETWORKS if n not in optim_in]
    if missing_opt:
        fail(f"the checkpoint has no optimizer state for {missing_opt} (it has "
             f"{list(optim_in)}); training cannot be resumed")
    return optim_in


def _weights(sd: OrderedDict, smeta: dict, tops: OrderedDict, keep_ema: bool, target: Target,
             report: CheckpointReport) -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, Any]]:
    """The 1.x state_dict and its ``_metadata``: networks (EMA under ``.module``) kept, other
    modules kept only where the 1.x model has them."""
    new_sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    new_meta: Dict[str, Any] = {"": smeta.get("", {"version": 1})} if smeta else {}
    for top, keys in tops.items():
        if top in NETWORKS or (top == EMA and keep_ema):
            dst = f"{EMA}.module" if top == EMA else top
            for k in keys:
                new_sd[dst + k[len(top):]] = sd[k]
            for mk, mv in smeta.items():
                if mk == top or mk.startswith(top + "."):
                    new_meta[dst + mk[len(top):]] = mv
            report.map(f"state_dict.{top}.*", f"state_dict.{dst}.*", f"{len(keys)} tensors")
        elif top == EMA:
            report.warnings.append(f"state_dict.{EMA}.* ({len(keys)} tensors) dropped: the 1.x "
                                   "config has no model.ema_config")
        else:
            model_keys = set(target.model.state_dict()) if target.model is not None else set()
            if model_keys and all(k in model_keys for k in keys):
                for k in keys:
                    new_sd[k] = sd[k]
                report.map(f"state_dict.{top}.*", f"state_dict.{top}.*", f"{len(keys)} tensors")
            else:
                report.warnings.append(f"state_dict.{top}.* ({len(keys)} tensors) dropped: no "
                                       "such module in the 1.x BigGAN model")
    return new_sd, new_meta


def _add_ema(new_sd: "OrderedDict[str, torch.Tensor]", new_meta: Dict[str, Any], sd: OrderedDict,
             smeta: dict, tops: OrderedDict, iters: int, target: Target,
             report: CheckpointReport) -> None:
    """Add ``generator_ema.steps`` (a copy of the generator as the EMA if the 0.x run had none),
    so the resumed EMA blends or copies as the 1.x schedule would at ``iters``."""
    if EMA not in tops:  # the 1.x config adds an EMA the 0.x run did not have
        for k in tops["generator"]:
            new_sd[f"{EMA}.module" + k[len("generator"):]] = sd[k].clone()
        for mk, mv in smeta.items():
            if mk == "generator" or mk.startswith("generator."):
                new_meta[f"{EMA}.module" + mk[len("generator"):]] = mv
        report.map("state_dict.generator.*", f"state_dict.{EMA}.module.*",
                   "copied: the 0.x run had no EMA")
        report.warnings.append(f"the 0.x checkpoint has no {EMA}; the 1.x EMA starts as a "
                               "copy of the generator")
        steps = 0
    elif target.cfg is not None:
        steps = ema_steps_for(iters, target.model_cfg, target.wrappers)
        report.notes.append(f"{EMA}.steps = {steps}: the EMA updates the 1.x schedule makes "
                            f"in {iters} iterations, so the next one "
                            f"{'blends' if steps else 'copies, as 1.x does at its start'}")
    else:
        steps = 1 if iters > 0 else 0
        report.warnings.append(f"{EMA}.steps set to {steps} without knowing the EMA "
                               "schedule (pass --config): the next update blends; with "
                               "ema_config.interval > 1 its phase may differ")
    new_sd[f"{EMA}.steps"] = torch.tensor(steps, dtype=torch.long)
    if new_meta:
        new_meta[EMA] = {"version": 1}
    report.ema_steps = steps
    report.map("(none)", f"state_dict.{EMA}.steps", str(steps))


def _optimizers(optim_in: Dict[str, dict], tops: OrderedDict,
                wrappers: Optional[Dict[str, dict]], report: CheckpointReport) -> Dict[str, dict]:
    """Each 0.x optimizer state in the 1.x layout, for the wrappers the 1.x config has."""
    new_optim: Dict[str, dict] = {}
    for name, osd in optim_in.items():
        if wrappers is not None and name not in wrappers:
            report.warnings.append(f"optimizer.{name} dropped: the 1.x optim_wrapper has no "
                                   f"'{name}' entry (OptimWrapperDict would refuse it)")
            continue
        if name not in tops:
            fail(f"optimizer.{name} belongs to no network of the state_dict "
                 f"({list(tops)})")
        new_optim[name] = convert_optimizer_state(name, osd, report)
        report.map(f"optimizer.{name}", f"optimizer.{name}",
                   f"{len(group_params(osd))} params in {len(osd['param_groups'])} group(s), "
                   f"{len(osd['state'])} states")
    for name in (wrappers or {}):
        if name not in new_optim:
            report.warnings.append(f"the 1.x wrapper '{name}' has no 0.x optimizer state; it "
                                   "starts fresh")
    return new_optim


def _add_loss_scaler(old: dict, meta: dict, new_optim: Dict[str, dict],
                     wrappers: Optional[Dict[str, dict]], report: CheckpointReport) -> None:
    """Give the 0.x fp16 loss scaler to each 1.x Amp wrapper (to all when they are unknown)."""
    scaler = grad_scaler_state(old, meta, report)
    if scaler is not None:
        for name, osd in new_optim.items():
            wtype = (wrappers or {}).get(name, {}).get("type", "OptimWrapper")
            if wrappers is None or wtype in _AMP_WRAPPERS:
                osd["loss_scaler"] = copy.deepcopy(scaler)
            else:
                report.warnings.append(f"the fp16 loss scaler is not given to '{name}': its 1.x "
                                       f"wrapper is {wtype}, not AmpOptimWrapper")
        if wrappers is None:
            report.notes.append("the 0.x loss scaler (one, shared) is given to every wrapper; "
                                "a plain OptimWrapper ignores it")
    elif wrappers and any(w.get("type") in _AMP_WRAPPERS for w in wrappers.values()):
        report.notes.append("the 1.x config uses AmpOptimWrapper but the 0.x checkpoint has no "
                            "loss scaler state: the scale starts at its configured value")


def _warn_unconverted(old: dict, target: Target, report: CheckpointReport) -> None:
    """Warn about 0.x state the conversion drops or the 1.x run will count differently."""
    if "amp" in old:
        report.warnings.append("checkpoint['amp'] (apex.amp state) is not converted: an "
                               "ApexOptimWrapper's loss scale restarts at its initial value")
    for key in old:
        if key not in ("meta", "state_dict", "optimizer", "loss_scaler", "amp"):
            report.warnings.append(f"checkpoint[{key!r}] is not converted (unknown 0.x entry)")

    if target.cfg is not None and target.cfg.get("param_scheduler"):
        report.warnings.append(
            "the 1.x config has a param_scheduler, but a 0.x checkpoint holds no scheduler "
            "state (mmcv's LR hooks computed the LR from the iteration): the resumed "
            "schedulers count from step 0; the current LR itself is carried in param_groups")
    train_cfg = (target.cfg or {}).get("train_cfg") or {}
    if train_cfg.get("by_epoch"):
        report.warnings.append("the 1.x train_cfg is epoch based; 0.x GAN checkpoints count "
                               "iterations and the epoch is set to 0")


def _meta(meta: dict, iters: int, report: CheckpointReport) -> Tuple[Dict[str, Any], dict]:
    """The 1.x ``meta`` (0.x extras under ``mmgen_0x``) and ``message_hub``."""
    new_meta_dict: Dict[str, Any] = {"epoch": 0, "iter": iters}
    report.map("meta.iter", "meta.iter", str(iters))
    if "epoch" in meta:
        report.map("meta.epoch", "meta.epoch", f"{meta['epoch']} -> 0")
        report.notes.append(f"meta.epoch {meta['epoch']} (0.x data passes) -> 0, the epoch "
                            "MMEngine's IterBasedTrainLoop reports; the 0.x value is kept in "
                            "meta.mmgen_0x.epoch")
    seed = meta.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        new_meta_dict["seed"] = seed
        report.map("meta.seed", "meta.seed", f"{seed} (Runner.resume re-seeds with it)")
    extras = {k: v for k, v in meta.items() if k not in ("iter",)}
    if extras:
        new_meta_dict["mmgen_0x"] = safe(extras, "meta", report)
        report.map("meta.<others>", "meta.mmgen_0x.<others>", ", ".join(sorted(map(str, extras))))
    new_meta_dict["converted_by"] = "pygan_optim.migrate.checkpoint (MMGeneration 0.x -> 1.x)"
    message_hub = {"log_scalars": {}, "runtime_info": {"epoch": 0, "iter": iters},
                   "resumed_keys": {"epoch": True, "iter": True}}
    report.map("(none)", "message_hub", "runtime_info iter/epoch")
    return new_meta_dict, message_hub
