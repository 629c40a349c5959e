"""The 1.x config and model a checkpoint is converted for (given, or from ``meta.config``)."""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..common import plain
from ..reader import read_config
from .report import CheckpointConversionError, CheckpointReport

#: The networks of a BigGAN-style GAN, as named in both versions, and its EMA copy.
NETWORKS = ("generator", "discriminator")
EMA = "generator_ema"


@dataclass
class Target:
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
    from .. import convert

    fd, path = tempfile.mkstemp(suffix=".py", prefix="mmgen_0x_config_")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        old_cfg = read_config(path)
        result = convert(old_cfg, source="meta.config")
    except (Exception, SystemExit) as e:  # unreadable, unconvertible, or it exits: fall back
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


def resolve_target(config: Any, meta: dict, report: CheckpointReport) -> Target:
    if config is not None:
        target = Target(cfg=_load_config(config), explicit=True)
        report.config_source = config if isinstance(config, str) else "the given config"
    else:
        target = Target(cfg=_config_from_meta(meta, report))
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
