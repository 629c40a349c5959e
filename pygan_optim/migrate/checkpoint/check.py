"""The converted checkpoint checked against the 1.x model (or, without one, its own weights)."""
from __future__ import annotations

import re
from typing import List

import torch

from .optimizer_state import group_params
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
