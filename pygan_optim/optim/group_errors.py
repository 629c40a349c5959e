"""Refused steps in terms of the param groups: checks of a group before the
kernel call, and messages that name a parameter by its place in its group
(the kernel only knows its place in the plan's lists)."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor


# The dtypes the kernel takes, as FusedAdam._explain names them when it refuses one.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SUPPORTED_DTYPE_NAMES = "float32, float64, bfloat16, float16"


def place(k: int, index: int, p: Tensor) -> str:
    """Parameter `p`, number `k` of param group `index`, as messages name it."""
    return f"parameter {k} of param group {index} (shape {tuple(p.shape)})"


def _position(group: Dict[str, Any], p: Tensor) -> Optional[int]:
    """Where `p` (the object itself) is in the group's params."""
    return next((k for k, q in enumerate(group["params"]) if q is p), None)


_LIST_ENTRY = re.compile(r"\b(params|grads|exp_avgs|exp_avg_sqs|max_exp_avg_sqs|state_steps)"
                         r"\[(\d+)\]")


def in_group_terms(error: RuntimeError, index: int, group: Dict[str, Any],
                   params: List[Tensor]) -> Optional[RuntimeError]:
    """The op names tensors by their place in the plan's lists, which leave out
    parameters without grad or on another device: the same error, with the
    parameters its names refer to (None: nothing to add)."""
    if type(error) is not RuntimeError:
        return None
    named, seen = [], set()
    for match in _LIST_ENTRY.finditer(str(error)):
        i = int(match.group(2))  # the same i in every list: the same parameter, named once
        k = _position(group, params[i]) if 0 <= i < len(params) and i not in seen else None
        if k is not None:
            seen.add(i)
            named.append(f"{match.group(0)} is parameter {k} of param group {index}, "
                         f"shape {tuple(params[i].shape)}")
    if not named:
        return None
    return RuntimeError(f"{error} ({'; '.join(named)})")


def check_unshared(index: int, group: Dict[str, Any], params: List[Tensor],
                   states: List[Dict[str, Tensor]]) -> None:
    """One call writes every tensor of the plan once: a parameter given twice in
    its group (an edit of param_groups) or a state tensor that two parameters
    share (a state edit, or a checkpoint saved so) would be written twice, each
    backend in its own order (torch's implementations disagree too)."""
    owner: Dict[int, tuple] = {}  # id of a tensor -> (position in params, key)

    def where(p: Tensor) -> str:
        return place(_position(group, p), index, p)

    for i, (p, state) in enumerate(zip(params, states)):
        for key in ("param", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = p if key == "param" else state.get(key)
            if not isinstance(t, Tensor):
                continue
            seen = owner.setdefault(id(t), (i, key))
            if seen == (i, key):
                continue
            if key == seen[1] == "param":
                raise RuntimeError(f"{where(p)} appears twice in its param group; give each "
                                   "parameter once")

            def what(i: int, key: str) -> str:
                return where(params[i]) if key == "param" else \
                    f"the {key!r} state of {where(params[i])}"
            raise RuntimeError(f"{what(i, key)} and {what(*seen)} are one tensor; each "
                               "parameter needs state tensors of its own (was the state edited, "
                               "or loaded from a checkpoint that shares them?)")


TENSOR_LR_REFUSED = "lr as a Tensor is not supported for capturable=False and foreach=True"


def tensor_lr_refused(group: Dict[str, Any]) -> bool:
    """torch's Adam refuses a Tensor lr with foreach=True unless capturable."""
    return bool(group["foreach"]) and isinstance(group["lr"], Tensor) and not group["capturable"]
