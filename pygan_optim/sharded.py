"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallel): every rank
updates its own local shards, in the same fused call as its other tensors.

The kernels work on plain tensors, so a DTensor is replaced by its local
tensor once its spec has been checked: the grad and the optimizer state must
be DTensors on the same mesh with the same placements as the parameter (the
local shapes then match). Reductions over the whole tensor (the L2 norm for
clipping, the inf/NaN flag) sum each rank's part over the mesh dimensions the
tensor is sharded on.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    dist = None
    DTensor = None


def is_dtensor(t: Optional[Tensor]) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor this rank holds: a DTensor's local shard, any other tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def describe(t: Tensor) -> str:
    return f"DTensor with placements {tuple(t.placements)} on {t.device_mesh}"


def check_like(name: str, t: Optional[Tensor], param: Tensor, param_name: str) -> None:
    """Refuses ``t`` (a grad or a state tensor of the DTensor ``param``) unless it
    is a DTensor laid out as the parameter is."""
    if t is None:
        return
    if not is_dtensor(t):
        raise RuntimeError(f"{name} of {param_name} is a plain tensor but the parameter is a "
                           f"{describe(param)}; expected the same placements")
    if t.device_mesh != param.device_mesh or tuple(t.placements) != tuple(param.placements):
        raise RuntimeError(f"{name} of {param_name} is a {describe(t)} but the parameter is a "
                           f"{describe(param)}; redistribute it to the parameter's placements")


def sharded_mesh_dims(t: Tensor) -> Tuple[object, Tuple[int, ...]]:
    """(mesh, the mesh dims that split ``t``) for a DTensor; refuses partial sums,
    whose local values have no norm of their own."""
    dims = []
    for dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise RuntimeError(f"a {describe(t)} holds partial sums; reduce it (e.g. "
                               "redistribute to Shard or Replicate) before the step")
        if not placement.is_replicate():
            dims.append(dim)
    return t.device_mesh, tuple(dims)


def all_reduce_over(values: Tensor, mesh, dims: Sequence[int]) -> Tensor:
    """Sums ``values`` over the ranks of each of the mesh's ``dims`` (in place)."""
    for dim in dims:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
    return values


class ShardedAdamPlan:
    """A param group's DTensor parameters on one device, with the interface of
    ``_C.AdamPlan``: each step hands their local shards (and those of their
    grads and state) to the registered op in one call."""

    def __init__(self, params: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                 max_exp_avg_sqs: List[Tensor], steps: List[Tensor]):
        for k, p in enumerate(params):
            where = f"DTensor parameter {k} of this group (shape {tuple(p.shape)})"
            sharded_mesh_dims(p)
            check_like("exp_avg", exp_avgs[k], p, where)
            check_like("exp_avg_sq", exp_avg_sqs[k], p, where)
            if max_exp_avg_sqs:
                check_like("max_exp_avg_sq", max_exp_avg_sqs[k], p, where)
        self.params = params
        self.tensors = [[local(t) for t in ts] for ts in (exp_avgs, exp_avg_sqs, max_exp_avg_sqs)]
        self.steps = steps

    def __len__(self) -> int:
        return len(self.params)

    def step(self, **options) -> None:
        grads = []
        for k, p in enumerate(self.params):
            check_like("grad", p.grad, p, f"DTensor parameter {k} of this group "
                                          f"(shape {tuple(p.shape)})")
            grads.append(local(p.grad))
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs = self.tensors
        # No EMA blended here: FusedAdam leaves DTensors' EMAs to their owner.
        torch.ops.pygan_optim.adam_step_([local(p) for p in self.params], grads, exp_avgs,
                                         exp_avg_sqs, max_exp_avg_sqs, self.steps, emas=[],
                                         ema_index=[], ema_momentum=0.0, **options)
