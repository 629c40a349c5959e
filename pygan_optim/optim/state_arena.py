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
    """A zero tensor shaped like each of `likes` (same dtype and device,
    contiguous), those of one device and dtype in one buffer."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = defaultdict(list)
    for i, t in enumerate(likes):
        groups[t.device, t.dtype].append(i)
    out: List[Tensor] = [None] * len(likes)  # type: ignore[list-item]
    for (device, dtype), members in groups.items():
        align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        offsets, total = [], 0
        for i in members:
            offsets.append(total)
            total += -(-likes[i].numel() // align) * align
        buffer = torch.zeros(total, dtype=dtype, device=device)
        for i, offset in zip(members, offsets):
            out[i] = buffer.narrow(0, offset, likes[i].numel()).view(likes[i].shape)
    return out


def scalar_zeros(devices: Sequence[torch.device]) -> List[Tensor]:
    """A 0-dim float32 zero per entry (step counters), one buffer per device."""
    out: List[Tensor] = [None] * len(devices)  # type: ignore[list-item]
    groups: Dict[torch.device, List[int]] = defaultdict(list)
    for i, d in enumerate(devices):
        groups[d].append(i)
    for device, members in groups.items():
        buffer = torch.zeros(len(members), dtype=torch.float32, device=device)
        for k, i in enumerate(members):
            out[i] = buffer[k]
    return out
