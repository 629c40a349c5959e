"""When a released grad may become its parameter's exp_avg (see FusedAdam's
docstring): the size thresholds, and the reference counts that tell a grad or
an old exp_avg that nothing else holds."""
from __future__ import annotations

import sys
from typing import Dict, Optional

import torch
from torch import Tensor

from .. import _ext


# Below this many elements, the Python bookkeeping of keeping a grad as exp_avg
# (about a microsecond) costs more than the 4 bytes per element it saves.
KEEP_GRAD_MIN_NUMEL = 32768
# Keeping a grad frees the old exp_avg, an older block than the grad torch would
# free. glibc's malloc serves blocks under 32 MiB (the most its mmap threshold
# rises to) from its heaps, where those older holes fit the next backward's
# blocks badly: on 4 KB pages, keeping every grad of 32768 elements or more
# raised the peak RSS of a BigGAN-128 G iteration by 120-195 MB over torch's
# (NOTES.md, "Page size, frees and heap fragmentation"). Blocks of 32 MiB and
# more are mapped and unmapped whole.
KEEP_GRAD_MIN_BYTES_CPU = 32 << 20


def check_min_bytes(value, owner: str = "FusedAdam") -> None:
    """keep_grad_min_bytes_cpu is a user's knob: checked before any write."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}.keep_grad_min_bytes_cpu must be an integer >= 0, "
                         f"got {value!r}")


def grad_refcount(p: Tensor) -> int:
    g = p.grad
    return sys.getrefcount(g) if g is not None else sys.maxsize


def state_refcount(state: Dict[str, Tensor]) -> int:
    m = dict.get(state, "exp_avg")
    return sys.getrefcount(m)


def keepable(grad: Tensor) -> bool:
    """A grad that can become exp_avg as it is: not an inference tensor (no
    version counter), not part of an autograd graph (backward with
    create_graph). (The C++ side refuses one whose storage is larger.)"""
    return not grad.is_inference() and not grad.requires_grad


def unshared_refcounts() -> tuple:
    """For a grad referenced only by its parameter: its grad_refcount and
    _ext.grad_use_count; for an exp_avg referenced only by its state and a
    plan: its state_refcount and _ext.use_count. Measured once, in the order
    _keep_candidates takes them (reading a count can change the next)."""
    global _UNSHARED
    if _UNSHARED is None:
        p = torch.zeros(1, requires_grad=True)
        p.grad = torch.zeros(1)
        state = {"exp_avg": torch.zeros(1)}
        plan = _ext.AdamPlan([p], [state["exp_avg"]], [torch.zeros(1)], [], [torch.zeros(())])
        grad_refs = grad_refcount(p)
        grad_holders = _ext.grad_use_count(p)
        _UNSHARED = (grad_refs, grad_holders, state_refcount(state),
                     _ext.use_count(dict.get(state, "exp_avg")))
        del plan
    return _UNSHARED


_UNSHARED: Optional[tuple] = None
