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
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .migrate import MigrationError
from .migrate.common import plain
from .migrate.reader import read_config

__all__ = ["CheckpointConversionError", "CheckpointReport", "convert_checkpoint",
           "load_checkpoint_file", "save_checkpoint_file", "migrate_checkpoint"]

#: The networks of a BigGAN-style GAN, as named in both versions.
NETWORKS = ("generator", "discriminator")
EMA = "generator_ema"
_AMP_WRAPPERS = ("AmpOptimWrapper", "FusedAmpOptimWrapper")
# Buffers of the BigGAN layers (spectral-norm vectors, batch-norm statistics): used to tell
# parameters from buffers in a state_dict when there is no model to ask.
_BUFFER_NAME = re.compile(r"^(u\d+|sv\d+|running_mean|running_var|num_batches_tracked|"
                          r"weight_u|weight_v)$")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
_GRAD_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval",
                     "_growth_tracker")


class CheckpointConversionError(MigrationError):
    """The checkpoint cannot be converted (always, or under ``strict=True``)."""


@dataclass
class CheckpointReport:
    """What :func:`convert_checkpoint` did.

    ``mapping``: ``(0.x key, 1.x key, detail)`` rows; ``warnings``: what was lost
    or approximated (``strict=True`` turns them into an error); ``notes``:
    informational; ``config_source``: where the 1.x config came from;
    ``checked_against_model``: whether the 1.x model itself was built and compared.
    """

    mapping: List[Tuple[str, str, str]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    config_source: Optional[str] = None
    checked_against_model: bool = False
    iter: Optional[int] = None
    ema_steps: Optional[int] = None

    def map(self, old: str, new: str, detail: str = "") -> None:
        self.mapping.append((old, new, detail))


# ----------------------------------------------------------------------------- the target
@dataclass
class _Target:
    """The 1.x config the checkpoint will be resumed with, as far as it is known."""

    cfg: Optional[dict] = None
    model: Any = None  # the model built on the meta device
    explicit: bool = False

    @property
    def model_cfg(self) -> dict:
        model = (self.cfg or {}).get("model")
        return model if isinstance(model, dict) else {}

    @property
    def wrappers(self) -> Optional[Dict[str, dict]]:
        """name -> wrapper config for a dict of wrappers; None if unknown or single."""
        ow = (self.cfg or {}).get("optim_wrapper")
        if not isinstance(ow, dict) or "optimizer" in ow:
            return None
        return {k: v for k, v in ow.items() if isinstance(v, dict) and "optimizer" in v}

    @property
    def single_wrapper(self) -> bool:
        ow = (self.cfg or {}).get("optim_wrapper")
        return isinstance(ow, dict) and "optimizer" in ow

    @property
    def has_ema(self) -> Optional[bool]:
        if self.cfg is None:
            return None
        return self.model_cfg.get("ema_config") is not None


def _load_config(config: Any) -> dict:
    from mmengine.config import Config

    if isinstance(config, (str, os.PathLike)):
        config = Config.fromfile(str(config))
    if isinstance(config, Config):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"config must be a path, a dict or an mmengine Config, got "
                        f"{type(config).__name__}")
    return plain(config)


def _config_from_meta(meta: dict, report: CheckpointReport) -> Optional[dict]:
    """The 0.x config text of ``meta['config']``, migrated to 1.x (None if impossible)."""
    text = meta.get("config")
    if not isinstance(text, str) or not text.strip():
        return None
    from .migrate import convert

    fd, path = tempfile.mkstemp(suffix=".py", prefix="mmgen_0x_config_")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        old_cfg = read_config(path)
        result = convert(old_cfg, source="meta.config")
    except Exception as e:  # an unreadable or unconvertible config: fall back
        report.notes.append(f"the 0.x config in meta.config could not be migrated "
                            f"({type(e).__name__}: {e}); the checkpoint is checked "
                            "against itself only")
        return None
    finally:
        os.unlink(path)
    gpu_ids = old_cfg.get("gpu_ids")
    if gpu_ids is not None:
        try:
            n = len(gpu_ids)
            report.notes.append(f"the 0.x run used {n} GPU(s) (gpu_ids); resume with the same "
                                "number of processes and batch size to keep its schedule")
        except TypeError:
            pass
    return result.config


def _build_model(model_cfg: dict):
    """The 1.x model, built on the meta device (no memory) for its names and shapes."""
    import pygan_optim  # noqa: F401  (registers the models)
    from mmengine.registry import MODELS

    cfg = copy.deepcopy(model_cfg)
    for net in NETWORKS:
        sub = cfg.get(net)
        if not isinstance(sub, dict):
            continue
        # Only names and shapes are needed: a cheap init that also runs on 'meta'
        # (an orthogonal init reads values back, which a meta tensor cannot).
        if "init_type" in sub:
            sub["init_type"] = "N02"
        if "init_cfg" in sub or str(sub.get("type", "")).startswith("BigGAN"):
            sub["init_cfg"] = dict(type="N02")
    try:
        with torch.device("meta"):
            return MODELS.build(cfg)
    except Exception:
        return MODELS.build(cfg)  # a model that cannot be built on 'meta': on the CPU


def _resolve_target(config: Any, meta: dict, report: CheckpointReport) -> _Target:
    if config is not None:
        target = _Target(cfg=_load_config(config), explicit=True)
        report.config_source = config if isinstance(config, str) else "the given config"
    else:
        target = _Target(cfg=_config_from_meta(meta, report))
        if target.cfg is not None:
            report.config_source = "meta.config (the 0.x config, migrated)"
    if target.cfg is None:
        report.warnings.append(
            "no 1.x config (no --config and no readable 0.x config in meta.config): keys "
            "and parameter counts are checked against the checkpoint itself, not against "
            "the 1.x model, and the EMA schedule is unknown")
        return target
    if not target.model_cfg:
        raise CheckpointConversionError(f"the 1.x config ({report.config_source}) has no model")
    try:
        target.model = _build_model(target.model_cfg)
    except Exception as e:
        if target.explicit:
            raise CheckpointConversionError(
                f"cannot build the model of the 1.x config to check the checkpoint "
                f"against: {type(e).__name__}: {e}") from e
        # Another family (its MMagic model is not installed here) or a broken
        # config: nothing checks the keys, so --strict refuses.
        report.warnings.append(f"the model of the migrated 0.x config could not be built "
                               f"({type(e).__name__}: {e}); checked against the checkpoint "
                               "itself only")
    report.checked_against_model = target.model is not None
    return target


# ----------------------------------------------------------------------------- helpers
def _fail(msg: str) -> None:
    raise CheckpointConversionError(msg)


def _safe(value: Any, path: str, report: CheckpointReport) -> Any:
    """``value`` made loadable with ``torch.load(weights_only=True)``."""
    if type(value).__module__.split(".")[0] == "numpy":  # before float: np.float64 is one
        if getattr(value, "shape", ()) != ():
            return torch.as_tensor(value)
        return value.item()
    if value is None or type(value) in (bool, int, float, str, bytes) or \
            isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {k: _safe(v, f"{path}.{k}", report) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_safe(v, f"{path}[{i}]", report) for i, v in enumerate(value))
    report.warnings.append(f"{path}: a {type(value).__name__} object is kept as its repr() "
                           "text (not loadable with weights_only=True)")
    return repr(value)


def _strip_module(sd: "OrderedDict[str, Any]", meta: Dict[str, Any],
                  report: CheckpointReport) -> Tuple["OrderedDict[str, Any]", Dict[str, Any]]:
    """Removes DDP-style ``module.`` prefixes: of the whole model, then of each network.

    mmcv's ``get_state_dict`` already unwraps module wrappers, so these appear only in
    checkpoints saved from a wrapped model's own ``state_dict()``. ``meta`` is the
    state_dict's ``_metadata`` (module prefix -> version), renamed alike.
    """
    def strip(name: str, wrapper: str) -> Optional[str]:
        # 'wrapper.module.x' -> 'wrapper.x'; 'wrapper.module' -> 'wrapper'; None: drop
        # the wrapper's own entry, which the unwrapped module's replaces.
        head = wrapper + "." if wrapper else ""
        if name == head + "module":
            return wrapper
        if name.startswith(head + "module."):
            return head + name[len(head + "module."):]
        return None if name == wrapper else name

    def apply(wrapper: str, what: str):
        nonlocal sd, meta
        sd = OrderedDict((strip(k, wrapper), v) for k, v in sd.items())
        renamed = {}
        for k, v in meta.items():
            n = strip(k, wrapper)
            if n is not None:
                renamed[n] = v
        meta = renamed
        report.notes.append(what)

    if sd and all(k.startswith("module.") for k in sd):
        apply("", "the 'module.' prefix of a wrapped model (DDP) was removed")
    for top in sorted({k.split(".", 1)[0] for k in sd}):
        own = [k for k in sd if k.startswith(top + ".")]
        if own and all(k.startswith(f"{top}.module.") for k in own):
            apply(top, f"the 'module.' prefix inside '{top}' (a per-network DDP wrapper) "
                       "was removed")
    return sd, meta


def _is_optimizer_state(sd: Any) -> bool:
    return isinstance(sd, dict) and "state" in sd and "param_groups" in sd


def _group_params(osd: dict) -> List[Any]:
    return [i for g in osd["param_groups"] for i in g["params"]]


def _convert_optimizer_state(name: str, osd: dict, report: CheckpointReport) -> dict:
    """A torch 1.x optimizer state_dict in the layout torch 2.x saves (Adam: tensor steps)."""
    state = {}
    converted = 0
    for idx, s in osd["state"].items():
        if not isinstance(s, dict):
            state[idx] = s
            continue
        s = dict(s)
        if "exp_avg" in s and "exp_avg_sq" in s and "step" in s:
            step = s["step"]
            value = float(step.item() if isinstance(step, torch.Tensor) else step)
            if not isinstance(step, torch.Tensor) or step.dtype != torch.float32 or step.dim():
                converted += 1
            s["step"] = torch.tensor(value, dtype=torch.float32)
        state[idx] = s
    groups = [dict(g, params=list(g["params"])) for g in osd["param_groups"]]
    missing = sorted({k for k in ("maximize", "foreach", "capturable", "differentiable",
                                  "fused") for g in groups if k not in g})
    if converted:
        report.notes.append(f"optimizer.{name}: {converted} per-parameter 'step' value(s) "
                            "stored as float32 tensors, as torch>=1.12 saves them")
    if missing:
        report.notes.append(f"optimizer.{name}: param_groups lack {missing} (keys newer than "
                            "the torch that saved them); the optimizer fills in its defaults "
                            "on load, as torch does for old checkpoints")
    return {"state": state, "param_groups": groups}


def _grad_scaler_state(old: dict, meta: dict, report: CheckpointReport) -> Optional[dict]:
    """The 0.x fp16 loss-scaler state as a ``torch.amp.GradScaler`` state_dict."""
    found = []
    if isinstance(old.get("loss_scaler"), dict):
        found.append(("loss_scaler", old["loss_scaler"]))
    fp16 = meta.get("fp16")
    if isinstance(fp16, dict) and isinstance(fp16.get("loss_scaler"), dict):
        found.append(("meta.fp16.loss_scaler", fp16["loss_scaler"]))
    if not found:
        return None
    where, sd = found[0]
    if all(k in sd for k in _GRAD_SCALER_KEYS):
        scaler = {k: sd[k] for k in _GRAD_SCALER_KEYS}
        report.map(where, "optimizer.<name>.loss_scaler", "torch GradScaler state")
        return _safe(scaler, where, report)
    if "cur_scale" in sd and "scale_window" in sd:  # mmcv's own LossScaler
        if sd.get("mode") == "static":
            report.warnings.append(f"{where}: a static mmcv loss scale ({sd['cur_scale']}) is "
                                   "no state; configure it as loss_scale=<float> in the 1.x "
                                   "AmpOptimWrapper")
            return None
        factor = float(sd.get("scale_factor", 2.0))
        window = int(sd["scale_window"])
        since = int(sd.get("cur_iter", 0)) - int(sd.get("last_overflow_iter", -1)) - 1
        scaler = dict(scale=float(sd["cur_scale"]), growth_factor=factor,
                      backoff_factor=1.0 / factor, growth_interval=window,
                      _growth_tracker=max(0, since) % max(window, 1))
        report.map(where, "optimizer.<name>.loss_scaler", "mmcv LossScaler -> GradScaler")
        report.warnings.append(f"{where}: mmcv's dynamic LossScaler translated to a GradScaler "
                               "state (scale, factor and window kept; the count since the last "
                               "overflow approximated)")
        return scaler
    report.warnings.append(f"{where}: unknown loss-scaler layout {sorted(sd)}; not converted "
                           "(the 1.x loss scale restarts at its initial value)")
    return None


def ema_steps_for(iters: int, model_cfg: dict, wrappers: Optional[Dict[str, dict]]) -> int:
    """The EMA's ``steps`` after ``iters`` iterations, for a resumed run that blends
    where the 0.x run would have. BigGAN's 1.x schedule (``biggan.py``, MMagic's
    BaseGAN) calls ``update_parameters`` once per generator phase
    (``discriminator_steps * D accumulative_counts`` iterations) from phase
    ``ema_config.start_iter`` on; the first call copies, a call whose ``steps`` is a
    multiple of ``interval`` blends. 0.x blends at iteration ``it`` when
    ``(it + 1 - start) % interval == 0``: with a start of 1 phase or more that is the
    1.x count of calls. With start 0 the 0.x average is a copy from iteration 0 on,
    as if phase 0 had made the copying call (1.x's first call comes at phase 1):
    one more."""
    ema = model_cfg.get("ema_config") or {}
    d_accu = int(((wrappers or {}).get("discriminator") or {}).get("accumulative_counts", 1))
    phase = int(model_cfg.get("discriminator_steps", 1)) * d_accu
    start = int(ema.get("start_iter", 0))
    return max(0, iters // phase - start + 1)


# ----------------------------------------------------------------------------- conversion
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
    if not isinstance(old, dict):
        _fail(f"not a checkpoint: expected a dict, got {type(old).__name__}")
    meta = old.get("meta")
    if "message_hub" in old or (isinstance(meta, dict) and (
            "mmengine_version" in meta or "cfg" in meta)):
        _fail("this is already an MMEngine 1.x checkpoint (it has message_hub / "
              "meta.mmengine_version): resume from it directly")
    if "state_dict" not in old:
        if old and all(isinstance(v, torch.Tensor) for v in old.values()):
            _fail("this is a bare model state_dict, not a 0.x training checkpoint (no 'meta', "
                  "'state_dict', 'optimizer'): it has no training state to resume")
        _fail(f"not an MMGeneration 0.x checkpoint: no 'state_dict' (keys: {sorted(old)})")
    if not isinstance(meta, dict):
        _fail("the checkpoint has no 'meta' dict, so the iteration to resume at is unknown")
    iters = meta.get("iter")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        _fail(f"meta.iter must be a non-negative integer (the iterations done), got {iters!r}")
    report.iter = iters

    # --- state_dict: prefixes, networks -------------------------------------------------
    sd_in = old["state_dict"]
    if not isinstance(sd_in, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in sd_in.values()):
        _fail("state_dict must map names to tensors")
    sd, smeta = _strip_module(OrderedDict(sd_in), dict(getattr(sd_in, "_metadata", {}) or {}),
                              report)
    tops = OrderedDict()
    for k in sd:
        tops.setdefault(k.split(".", 1)[0], []).append(k)
    missing_nets = [n for n in NETWORKS if n not in tops]
    if missing_nets:
        _fail(f"not a BigGAN-style GAN checkpoint: state_dict has no {missing_nets} weights "
              f"(its modules: {list(tops)}); only GANs with 'generator' and 'discriminator' "
              "networks are converted")

    # --- optimizers ----------------------------------------------------------------------
    if "optimizer" not in old or old["optimizer"] is None:
        _fail("the checkpoint has no optimizer state (saved with save_optimizer=False?), so "
              "training cannot be resumed from it")
    optim_in = old["optimizer"]
    if _is_optimizer_state(optim_in):
        _fail("the checkpoint has a single optimizer over the whole model, not one per "
              "network ({'generator': ..., 'discriminator': ...}); it is not a 0.x GAN "
              "checkpoint this converter handles")
    if not isinstance(optim_in, dict) or not all(_is_optimizer_state(v)
                                                 for v in optim_in.values()):
        _fail("optimizer must be a dict of torch optimizer state_dicts, one per network")
    missing_opt = [n for n in NETWORKS if n not in optim_in]
    if missing_opt:
        _fail(f"the checkpoint has no optimizer state for {missing_opt} (it has "
              f"{list(optim_in)}); training cannot be resumed")

    target = _resolve_target(config, meta, report)
    if target.cfg is not None and target.single_wrapper:
        _fail("the 1.x config has a single optim_wrapper, but the checkpoint has one optimizer "
              "per network; use optim_wrapper=dict(constructor='MultiOptimWrapperConstructor', "
              "generator=..., discriminator=...)")

    # --- model weights -------------------------------------------------------------------
    new_sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    new_meta: Dict[str, Any] = {"": smeta.get("", {"version": 1})} if smeta else {}
    keep_ema = EMA in tops and target.has_ema is not False
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

    if keep_ema or (EMA not in tops and target.has_ema):
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

    # --- optimizer state --------------------------------------------------------------------
    wrappers = target.wrappers
    new_optim: Dict[str, dict] = {}
    for name, osd in optim_in.items():
        if wrappers is not None and name not in wrappers:
            report.warnings.append(f"optimizer.{name} dropped: the 1.x optim_wrapper has no "
                                   f"'{name}' entry (OptimWrapperDict would refuse it)")
            continue
        if name not in tops:
            _fail(f"optimizer.{name} belongs to no network of the state_dict "
                  f"({list(tops)})")
        new_optim[name] = _convert_optimizer_state(name, osd, report)
        report.map(f"optimizer.{name}", f"optimizer.{name}",
                   f"{len(_group_params(osd))} params in {len(osd['param_groups'])} group(s), "
                   f"{len(osd['state'])} states")
    for name in (wrappers or {}):
        if name not in new_optim:
            report.warnings.append(f"the 1.x wrapper '{name}' has no 0.x optimizer state; it "
                                   "starts fresh")

    _check(new_sd, new_optim, sd, tops, target, report)

    scaler = _grad_scaler_state(old, meta, report)
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

    # --- meta, message hub ----------------------------------------------------------------
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
        new_meta_dict["mmgen_0x"] = _safe(extras, "meta", report)
        report.map("meta.<others>", "meta.mmgen_0x.<others>", ", ".join(sorted(map(str, extras))))
    new_meta_dict["converted_by"] = "pygan_optim.migrate_checkpoint (MMGeneration 0.x -> 1.x)"
    message_hub = {"log_scalars": {}, "runtime_info": {"epoch": 0, "iter": iters},
                   "resumed_keys": {"epoch": True, "iter": True}}
    report.map("(none)", "message_hub", "runtime_info iter/epoch")

    if new_meta:
        new_sd._metadata = OrderedDict(new_meta)  # type: ignore[attr-defined]
    new = {"meta": new_meta_dict, "state_dict": new_sd, "optimizer": new_optim,
           "message_hub": message_hub}
    if strict and report.warnings:
        raise CheckpointConversionError(
            "strict conversion: " + "; ".join(report.warnings), report.warnings)
    return new, report


def _check(new_sd, new_optim, sd, tops, target: _Target, report: CheckpointReport) -> None:
    """Keys, shapes, parameter counts and moment shapes, against the 1.x model if known."""
    problems: List[str] = []
    if target.model is not None:
        model_sd = target.model.state_dict()
        missing = [k for k in model_sd if k not in new_sd]
        unexpected = [k for k in new_sd if k not in model_sd]
        shapes = [f"{k}: {tuple(new_sd[k].shape)} vs {tuple(model_sd[k].shape)}"
                  for k in new_sd if k in model_sd and new_sd[k].shape != model_sd[k].shape]
        for what, items in (("missing in the checkpoint", missing),
                            ("not in the 1.x model", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
                problems.append(f"{len(items)} key(s) {what}: {items[:5]}{more}")

        def params_of(name):
            module = getattr(target.model, name, None)
            return None if module is None else [tuple(p.shape) for p in module.parameters()]
    else:
        def params_of(name):  # the network's parameters, told from its buffers by name
            return [tuple(sd[k].shape) for k in tops.get(name, [])
                    if not _BUFFER_NAME.match(k.rsplit(".", 1)[-1])]

    for name, osd in new_optim.items():
        shapes = params_of(name)
        ids = _group_params(osd)
        if shapes is None:
            problems.append(f"optimizer.{name}: the 1.x model has no module '{name}'")
            continue
        if len(ids) != len(shapes):
            problems.append(f"optimizer.{name} has {len(ids)} parameters but the "
                            f"{'1.x model' if target.model is not None else 'checkpoint'}'s "
                            f"{name} has {len(shapes)}")
            continue
        wcfg = (target.wrappers or {}).get(name, {})
        if target.cfg is not None and not wcfg.get("paramwise_cfg") and \
                len(osd["param_groups"]) != 1:
            problems.append(f"optimizer.{name} has {len(osd['param_groups'])} param groups; the "
                            "1.x wrapper (no paramwise_cfg) builds one, and torch would refuse "
                            "the state")
        bad = []
        for pos, idx in enumerate(ids):
            state = osd["state"].get(idx)
            if not isinstance(state, dict):
                continue
            for key in _MOMENT_KEYS:
                t = state.get(key)
                if isinstance(t, torch.Tensor) and tuple(t.shape) != shapes[pos]:
                    bad.append(f"param {pos} {key} {tuple(t.shape)} vs {shapes[pos]}")
        if bad:
            problems.append(f"optimizer.{name}: moments do not fit the parameters in order: "
                            f"{bad[:3]}{' ...' if len(bad) > 3 else ''}")
    if problems:
        against = ("the 1.x model of " + str(report.config_source)
                   if target.model is not None else "its own weights")
        raise CheckpointConversionError(
            f"the checkpoint does not fit {against}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- files
def load_checkpoint_file(path: str) -> Tuple[dict, Optional[str]]:
    """``torch.load`` on the CPU; returns ``(checkpoint, note)``.

    Tries ``weights_only=True`` first. A 0.x checkpoint can hold other pickled
    objects (numpy scores in ``meta.hook_msgs``, ...): it is then loaded fully, and
    the note says so (convert only checkpoints you trust, as with any torch.load).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as e:
        # torch's message is long; its "Unsupported global: GLOBAL x.y" line names the object
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        first = f"e.g. {found.group(1)}" if found else "objects weights_only refuses"
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        return ckpt, (f"{path} holds pickled objects besides tensors ({first}); it was loaded "
                      "with weights_only=False: convert only checkpoints you trust")


def save_checkpoint_file(checkpoint: dict, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed: all or nothing."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def migrate_checkpoint(old_path: str, new_path: str, config: Any = None,
                       strict: bool = False) -> CheckpointReport:
    """Load ``old_path``, convert it, save ``new_path``; nothing is written on error."""
    old, note = load_checkpoint_file(old_path)
    new, report = convert_checkpoint(old, config=config, strict=strict)
    if note:
        report.notes.insert(0, note)
    save_checkpoint_file(new, new_path)
    return report
