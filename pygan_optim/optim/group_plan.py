"""GroupPlan: one param group's tensors on one device, as the kernel takes them,
and the check that a cached plan still holds its group's parameters."""
from __future__ import annotations

import operator
from typing import List

import torch
from torch import Tensor

from .. import _ext


class GroupPlan:
    """The tensors of one param group on one device, held in C++ (_C.AdamPlan),
    or DTensors' in a ShardedAdamPlan (``sharded``). ``params``: in the plan's
    order. ``big``: (index in the plan, parameter, its state) of the parameters
    whose grad may be kept as exp_avg."""

    __slots__ = ("handle", "amsgrad", "device", "big", "params", "sharded")

    def __init__(self, handle, amsgrad: bool, device: torch.device, big: list,
                 params: List[Tensor], sharded: bool):
        self.handle, self.amsgrad, self.device, self.big = handle, amsgrad, device, big
        self.params, self.sharded = params, sharded


def same_objects(plan_params: List[Tensor], group_params) -> bool:
    """Whether the group holds exactly the plan's parameter objects, in order."""
    if type(group_params) is list:  # as torch's add_param_group makes it
        return _ext.same_objects(plan_params, group_params)
    return (len(plan_params) == len(group_params)
            and all(map(operator.is_, plan_params, group_params)))
