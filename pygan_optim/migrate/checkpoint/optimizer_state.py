"""Torch optimizer state_dicts: told apart, their parameters listed, put in torch 2.x's layout."""
from __future__ import annotations

from typing import Any, List

import torch

from .report import CheckpointReport


def is_optimizer_state(sd: Any) -> bool:
    return isinstance(sd, dict) and "state" in sd and "param_groups" in sd


def group_params(osd: dict) -> List[Any]:
    return [i for g in osd["param_groups"] for i in g["params"]]


def convert_optimizer_state(name: str, osd: dict, report: CheckpointReport) -> dict:
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
