"""New optimizer state of small parameters, packed into shared buffers.

torch allocates each state tensor on its own. With thousands of small
parameters, their data and metadata then lie spread over the heap between the
parameters' own, and every pass of a step over them waits on a cache and TLB
miss per tensor (NOTES.md, "10k x 1k"). The state FusedAdam creates for the
small dense parameters of a plan instead goes into one zeroed buffer per kind
(exp_avg, exp_avg_sq, ...), device and dtype, each tensor at a 64-byte-aligned
offset, and their metadata is allocated one after the other.

They are ordinary tensors, not views: each has its own version counter and no
``_base``. ``state_dict()`` and ``torch.save`` of it keep the sharing (each
buffer is saved once); one such tensor saved alone (``torch.save(state["exp_avg"])``)
carries its whole buffer, so clone it first.
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
        storage = torch.zeros(total, dtype=dtype, device=device).untyped_storage()
        for i, offset in zip(members, offsets):
            out[i] = _tensor_at(storage, offset, likes[i].shape, dtype, device)
    return out


def scalar_zeros(devices: Sequence[torch.device]) -> List[Tensor]:
    """A 0-dim float32 zero per entry (step counters), one buffer per device."""
    out: List[Tensor] = [None] * len(devices)  # type: ignore[list-item]
    groups: Dict[torch.device, List[int]] = defaultdict(list)
    for i, d in enumerate(devices):
        groups[d].append(i)
    for device, members in groups.items():
        storage = torch.zeros(len(members), dtype=torch.float32, device=device).untyped_storage()
        for k, i in enumerate(members):
            out[i] = _tensor_at(storage, k, (), torch.float32, device)
    return out


def _tensor_at(storage, offset: int, shape, dtype: torch.dtype, device) -> Tensor:
    """A contiguous tensor over `storage` from element `offset`: its own tensor
    (version counter, no _base), sharing the memory."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    t = torch.empty(0, dtype=dtype, device=device)
    return t.set_(storage, offset, tuple(shape), tuple(reversed(strides)))
