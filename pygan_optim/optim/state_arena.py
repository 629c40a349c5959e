"""New optimizer state of small parameters, packed into shared buffers.

torch allocates each state tensor on its own. With thousands of small
parameters, their data and metadata then lie spread over the heap between the
parameters' own, and every pass of a step over them waits on a cache and TLB
miss per tensor (NOTES.md, "10k x 1k"). The state FusedAdam creates for the
small dense parameters of a plan instead goes into one zeroed buffer per kind
(exp_avg, exp_avg_sq, ...), device and dtype, each tensor at a 64-byte-aligned
offset, and their metadata is allocated one after the other.

Each is a view of its buffer (``_base``), so they share one version counter:
a step tells autograd about a buffer's writes with one bump instead of one per
tensor. ``state_dict()`` and ``torch.save`` of it keep the sharing (each buffer
is saved once; loaded back, the tensors share memory but are no views); one
such tensor saved alone (``torch.save(state["exp_avg"])``) carries its whole
buffer, so clone it first.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

_ALIGN_BYTES = 64


def packable(p: Tensor, max_numel: int) -> bool:
    """Whether new state for `p` may be packed: a plain, contiguous, non-empty
    tensor of fewer than `max_numel` elements (bigger ones may free their
    exp_avg, which a shared buffer could not give back)."""
    return (type(p.data) is Tensor and p.layout == torch.strided and p.is_contiguous()
            and 0 < p.numel() < max_numel)


def zeros_like_each(likes: Sequence[Tensor]) -> List[Tensor]:
    """A zero tensor shaped like each of `likes` (contiguous ones: same dtype,
    device and strides, which for dims of size 1 may be any), those of one
    device and dtype in one buffer, 64-byte aligned."""
    return _packed([(t.device, t.dtype, t.shape, t.stride()) for t in likes], _ALIGN_BYTES)


def scalar_zeros(devices: Sequence[torch.device]) -> List[Tensor]:
    """A 0-dim float32 zero per entry (step counters), one buffer per device."""
    return _packed([(d, torch.float32, (), ()) for d in devices], align_bytes=4)


def _packed(specs: Sequence[Tuple[torch.device, torch.dtype, tuple, tuple]],
            align_bytes: int) -> List[Tensor]:
    """Zero views, one per (device, dtype, shape, contiguous strides), of one
    buffer per device and dtype, each starting at a multiple of `align_bytes`."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = defaultdict(list)
    for i, (device, dtype, _, _) in enumerate(specs):
        groups[device, dtype].append(i)
    out: List[Tensor] = [None] * len(specs)  # type: ignore[list-item]
    for (device, dtype), members in groups.items():
        align = max(1, align_bytes // torch.empty((), dtype=dtype).element_size())
        offsets, total = [], 0
        for i in members:
            offsets.append(total)
            total += -(-math.prod(specs[i][2]) // align) * align
        buffer = torch.zeros(total, dtype=dtype, device=device)
        for i, offset in zip(members, offsets):
            shape, strides = specs[i][2], specs[i][3]
            out[i] = buffer.narrow(0, offset, math.prod(shape)).as_strided(shape, strides)
    return out
