"""Torch optimizer state_dicts: told apart, their parameters listed, put in torch 2.x's layout."""
from __future__ import annotations

from typing import Any, List

import torch

from .report import CheckpointReport, fail


def is_optimizer_state(sd: Any) -> bool:
    return isinstance(sd, dict) and "state" in sd and "param_groups" in sd


def group_params(osd: dict) -> List[Any]:
    return [i for g in osd["param_groups"] for i in g["params"]]


#: What torch's Adam reads from a saved param group and per-parameter state: a
#: checkpoint without them converts, then fails in the resumed run's first step.
ADAM_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad")
ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def is_adam_state(osd: dict) -> bool:
    """Adam's (or AdamW's): moments in some state, or betas in some group."""
    return (any(isinstance(s, dict) and ("exp_avg" in s or "exp_avg_sq" in s)
                for s in osd["state"].values())
            or any(isinstance(g, dict) and "betas" in g for g in osd["param_groups"]))


def check_layout(name: str, osd: dict) -> None:
    """Refuses, naming ``optimizer.<name>`` and the entry, a state_dict torch's
    load_state_dict would mis-map or the resumed optimizer could not step with."""
    where = f"optimizer.{name}"
    if not isinstance(osd["state"], dict):
        fail(f"{where}: 'state' is a {type(osd['state']).__name__}, not a dict of "
             "per-parameter states")
    groups = osd["param_groups"]
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups):
        fail(f"{where}: 'param_groups' must be a list of dicts")
    ids = []
    for i, group in enumerate(groups):
        params = group.get("params")
        if not isinstance(params, (list, tuple)) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in params):
            fail(f"{where}.param_groups[{i}]: 'params' must be a list of parameter ids, got "
                 f"{params!r}")
        ids += params
    known = set(ids)
    orphans = [k for k in osd["state"] if k not in known]
    if orphans:
        fail(f"{where}: state entries {orphans[:5]!r} belong to no parameter of its "
             f"param_groups (ids {ids[:5]!r}...): torch would load them onto nothing")
    if not is_adam_state(osd):
        return
    for i, group in enumerate(groups):
        missing = [k for k in ADAM_GROUP_KEYS if k not in group]
        if missing:
            fail(f"{where}.param_groups[{i}] lacks {missing}, which Adam reads at each step")
    amsgrad = {p: g.get("amsgrad") for g in groups for p in g["params"]}
    for idx, s in osd["state"].items():
        need = ADAM_STATE_KEYS + (("max_exp_avg_sq",) if amsgrad.get(idx) else ())
        missing = [k for k in need if not isinstance(s, dict) or k not in s]
        if missing:
            fail(f"{where}: the state of parameter {idx!r} lacks {missing} (Adam's state has "
                 f"{list(need)})")
        step = s["step"]
        number = (isinstance(step, torch.Tensor) and step.numel() == 1
                  or isinstance(step, (int, float)) and not isinstance(step, bool))
        if not number:
            fail(f"{where}: the 'step' of parameter {idx!r} is {step!r}, not a number")


def convert_optimizer_state(name: str, osd: dict, report: CheckpointReport) -> dict:
    """A torch 1.x optimizer state_dict in the layout torch 2.x saves (Adam: tensor
    steps), once check_layout accepts it."""
    check_layout(name, osd)
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
