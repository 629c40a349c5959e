"""The converted checkpoint checked against the 1.x model (or, without one, its own weights)."""
from __future__ import annotations

import copy
import re
from typing import List

import torch

from .optimizer_state import group_params, is_adam_state
from .report import CheckpointConversionError, CheckpointReport
from .target import Target

# Buffers of the BigGAN layers (spectral-norm vectors, batch-norm statistics): used to tell
# parameters from buffers in a state_dict when there is no model to ask.
_BUFFER_NAME = re.compile(r"^(u\d+|sv\d+|running_mean|running_var|num_batches_tracked|"
                          r"weight_u|weight_v)$")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def check(new_sd, new_optim, sd, tops, target: Target, report: CheckpointReport) -> None:
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
        _warn_lossy_casts([(k, new_sd[k], model_sd[k].dtype) for k in new_sd if k in model_sd],
                          "the weights", report)

        def params_of(name):
            module = getattr(target.model, name, None)
            return None if module is None else [tuple(p.shape) for p in module.parameters()]
    else:
        def params_of(name):  # the network's parameters, told from its buffers by name
            return [tuple(sd[k].shape) for k in tops.get(name, [])
                    if not _BUFFER_NAME.match(k.rsplit(".", 1)[-1])]

    for name, osd in new_optim.items():
        shapes = params_of(name)
        ids = group_params(osd)
        if shapes is None:
            problems.append(f"optimizer.{name}: the 1.x model has no module '{name}'")
            continue
        if len(ids) != len(shapes):
            problems.append(f"optimizer.{name} has {len(ids)} parameters but the "
                            f"{'1.x model' if target.model is not None else 'checkpoint'}'s "
                            f"{name} has {len(shapes)}")
            continue
        wcfg = (target.wrappers or {}).get(name, {})
        problems += _optimizer_type_problems(name, osd, wcfg)
        if target.cfg is not None and not wcfg.get("paramwise_cfg") and \
                len(osd["param_groups"]) != 1:
            problems.append(f"optimizer.{name} has {len(osd['param_groups'])} param groups; the "
                            "1.x wrapper (no paramwise_cfg) builds one, and torch would refuse "
                            "the state")
        elif target.model is not None and wcfg.get("paramwise_cfg"):
            problems += _paramwise_group_problems(name, osd, wcfg, target, report)
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
        if target.model is not None and not bad:
            module = getattr(target.model, name)
            dtypes = [p.dtype for p in module.parameters()]
            _warn_lossy_casts([(f"optimizer.{name} state {idx} {key}", t, dtypes[pos])
                               for pos, idx in enumerate(ids)
                               for key, t in (osd["state"].get(idx) or {}).items()
                               if key in _MOMENT_KEYS and isinstance(t, torch.Tensor)],
                              "the optimizer state", report)
    if problems:
        against = ("the 1.x model of " + str(report.config_source)
                   if target.model is not None else "its own weights")
        raise CheckpointConversionError(
            f"the checkpoint does not fit {against}: " + "; ".join(problems))


_ADAM_TYPES = ("Adam", "AdamW", "FusedAdam", "FusedAdamW")


def _optimizer_type_problems(name: str, osd: dict, wcfg: dict) -> List[str]:
    """Adam's state under a 1.x optimizer of another kind would be ignored (or
    make it fail at its first step)."""
    opt = wcfg.get("optimizer") if isinstance(wcfg, dict) else None
    kind = opt.get("type") if isinstance(opt, dict) else None
    kind = getattr(kind, "__name__", kind)
    if kind is None or not is_adam_state(osd) or str(kind).split(".")[-1] in _ADAM_TYPES:
        return []
    return [f"optimizer.{name} holds Adam's state (exp_avg, exp_avg_sq, betas), but the 1.x "
            f"config's {name} optimizer is {kind!r}, which would not resume from it"]


def _paramwise_group_problems(name: str, osd: dict, wcfg: dict, target: Target,
                              report: CheckpointReport) -> List[str]:
    """A paramwise_cfg makes MMEngine's constructor split the parameters into
    groups of its own: torch loads the state only into the same group sizes."""
    from mmengine.optim import build_optim_wrapper

    try:
        built = build_optim_wrapper(getattr(target.model, name), copy.deepcopy(wcfg))
    except Exception as e:  # the check is skipped, and said so
        report.notes.append(f"optimizer.{name}: the param groups of its paramwise_cfg were "
                            f"not checked ({type(e).__name__}: {e})")
        return []
    wanted = [len(g["params"]) for g in built.optimizer.param_groups]
    saved = [len(g["params"]) for g in osd["param_groups"]]
    if wanted == saved:
        return []
    return [f"optimizer.{name} has param groups of {saved} parameters, but the 1.x wrapper "
            f"(with its paramwise_cfg) builds groups of {wanted}; torch would refuse the state"]


def _warn_lossy_casts(items, what: str, report: CheckpointReport) -> None:
    """Loading casts each tensor to the 1.x model's dtype: a cast that changes a
    value, or turns integers into floats or back, is worth a warning (--strict
    refuses it)."""
    lossy = []
    for key, t, dtype in items:
        if t.dtype == dtype:
            continue
        if t.is_floating_point() != torch.empty((), dtype=dtype).is_floating_point() or \
                not _same(t.to(dtype).to(t.dtype), t):
            lossy.append(f"{key} ({t.dtype} -> {dtype})")
    if lossy:
        more = f" (and {len(lossy) - 3} more)" if len(lossy) > 3 else ""
        report.warnings.append(f"{len(lossy)} tensor(s) of {what} change values when loaded "
                               f"into the 1.x model's dtypes: {lossy[:3]}{more}")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
    return torch.equal(a, b)
