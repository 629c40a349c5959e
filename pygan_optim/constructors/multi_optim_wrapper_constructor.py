"""MultiOptimWrapperConstructor: one optimizer wrapper per submodule (MMagic's behaviour).

Registered in MMEngine's own ``OPTIM_WRAPPER_CONSTRUCTORS``, so GAN configs build
with plain MMEngine (no MMagic, no ``default_scope``).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper, OptimWrapperDict
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS


class MultiOptimWrapperConstructor:
    """Builds an ``OptimWrapperDict`` with one wrapper per config key.

    ``optim_wrapper_cfg`` maps a submodule name (a direct child of the model, or
    a regular expression over ``named_modules()``) to a wrapper config with an
    ``optimizer`` key and optional ``type`` (default ``'OptimWrapper'``),
    ``paramwise_cfg``, ``modules``, ``accumulative_counts``, ``clip_grad``,
    ``loss_scale``, ``dtype``. A config with a top-level ``optimizer`` key (and
    optional ``modules``) builds a single wrapper over those parameters
    instead. A model wrapped in (MM)DistributedDataParallel is unwrapped.

    Where MMagic fails obscurely, this raises an error that names the culprit:
    a key that matches no submodule, or an unknown optimizer type.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None):
        if not isinstance(optim_wrapper_cfg, dict):
            raise TypeError("optimizer_cfg should be a dict",
                            f"but got {type(optim_wrapper_cfg)}")
        assert paramwise_cfg is None, (
            "paramwise_cfg should be set in each optimizer separately")
        self.optim_cfg = optim_wrapper_cfg
        # A top-level 'modules' or 'optimizer' means one wrapper (MMagic: 'modules').
        self.single = "optimizer" in optim_wrapper_cfg or "modules" in optim_wrapper_cfg
        self.modules: Union[Dict[str, object], object] = {}
        if self.single:
            cfg = dict(optim_wrapper_cfg)
            self.modules = cfg.pop("modules", None)
            self.constructors = _constructor("optim_wrapper", cfg)
            return
        self.constructors = {}
        for key, cfg in optim_wrapper_cfg.items():
            if not isinstance(cfg, dict):
                raise TypeError(f"optim_wrapper.{key} must be a dict (a wrapper config with an "
                                f"'optimizer'), got {type(cfg).__name__}: {cfg!r}")
            cfg = dict(cfg)
            if "modules" in cfg:
                self.modules[key] = cfg.pop("modules")
            self.constructors[key] = _constructor(f"optim_wrapper.{key}", cfg)

    def __call__(self, module: nn.Module) -> Union[OptimWrapperDict, OptimWrapper]:
        if hasattr(module, "module"):
            module = module.module
        if self.single:
            if self.modules is None:
                return self.constructors(module)
            return self._build_over(module, self.modules, self.constructors, "optim_wrapper")
        wrappers = {}
        for key, constructor in self.constructors.items():
            names = self.modules.get(key, key)
            if isinstance(names, str) and names in module._modules:
                wrappers[key] = constructor(module._modules[names])
                print_log(f"Add to optimizer '{key}' ({constructor.optimizer_cfg}): '{names}'.",
                          "current")
            else:
                wrappers[key] = self._build_over(module, names, constructor, f"optim_wrapper.{key}")
        return OptimWrapperDict(**wrappers)

    @staticmethod
    def _build_over(module: nn.Module, names, constructor, where: str) -> OptimWrapper:
        """One wrapper over the parameters of every submodule `names` selects."""
        assert not constructor.paramwise_cfg, (
            f"{where}: paramwise_cfg is not supported for an optimizer over several modules")
        params, found = params_by_names(module, names)
        if not params:
            children = ", ".join(module._modules) or "none"
            raise KeyError(f"{where}: no submodule of {type(module).__name__} matches {names!r} "
                           f"(its direct children: {children})")
        for name in found:
            print_log(f"Add to optimizer '{where}' ({constructor.optimizer_cfg}): '{name}'.",
                      "current")
        optimizer_cfg = dict(constructor.optimizer_cfg, params=params)
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = dict(constructor.optim_wrapper_cfg)
        wrapper_cfg.setdefault("type", "OptimWrapper")
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))


def _constructor(where: str, cfg: dict) -> DefaultOptimWrapperConstructor:
    if "optimizer" not in cfg:
        raise KeyError(f"{where} has no 'optimizer' config (keys: {sorted(cfg)})")
    optimizer_type = cfg["optimizer"].get("type")
    # (An optimizer config's own '_scope_' is not looked at: MMEngine's
    # DefaultOptimWrapperConstructor builds optimizers in the default scope.)
    if isinstance(optimizer_type, str) and not _registered(OPTIMIZERS, optimizer_type):
        raise KeyError(f"{where}: unknown optimizer type {optimizer_type!r}; registered: "
                       f"{', '.join(sorted(OPTIMIZERS.module_dict))}")
    wrapper_type = cfg.get("type", "OptimWrapper")
    if isinstance(wrapper_type, str) and not _registered(OPTIM_WRAPPERS, wrapper_type,
                                                         cfg.get("_scope_")):
        raise KeyError(f"{where}: unknown optim wrapper type {wrapper_type!r}; registered: "
                       f"{', '.join(sorted(OPTIM_WRAPPERS.module_dict))}")
    paramwise_cfg = cfg.pop("paramwise_cfg", None)
    return DefaultOptimWrapperConstructor(cfg, paramwise_cfg)


def _registered(registry, name: str, scope: Optional[str] = None) -> bool:
    """Whether building `name` will find it: MMEngine builds in the registry of
    the config's '_scope_', else of the current default scope (a downstream
    project's child registry), which sees its own entries and its parents'."""
    with registry.switch_scope_and_registry(scope) as scoped:
        return scoped.get(name) is not None


def params_by_names(module: nn.Module, names: Union[str, Sequence[str]]) -> Tuple[List, List[str]]:
    """Parameters of the direct children named in `names`, or of every module
    whose dotted name fully matches one of them as a regular expression. Each
    parameter is given once, where first found: a regex such as 'disc.*' also
    matches the submodules of a match (MMagic gives their parameters again,
    which torch's Adam then updates more than once per step)."""
    if isinstance(names, str):
        names = [names]
    params, found, seen = [], [], set()

    def add(sub: nn.Module, sub_name: str) -> None:
        found.append(sub_name)
        for p in sub.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)

    for name in names:
        if name in module._modules:
            add(module._modules[name], name)
            continue
        for sub_name, sub in module.named_modules():
            if re.fullmatch(name, sub_name):
                add(sub, sub_name)
    return params, found
