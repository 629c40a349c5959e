"""EMA copy of the generator, updated through the fused multi-tensor EMA op."""
from __future__ import annotations

import warnings
from copy import deepcopy
from typing import List, Tuple

import torch
import torch.nn as nn

from .. import ops


class ExponentialMovingAverage(nn.Module):
    """An averaged copy of ``model`` with MMagic 1.x's semantics and arguments.

    ``momentum`` is the weight of the *new* parameters:
    ``avg = (1 - momentum) * avg + momentum * param`` (MMagic's convention; the
    0.x EMA hook's momentum m corresponds to ``1 - m``). The first update copies
    the model; later ones blend every ``interval``-th call. With
    ``update_buffers`` floating-point buffers (BN statistics, spectral-norm
    vectors) are averaged too, otherwise buffers are copied. One call of
    ``pygan_optim.ops.ema_`` blends all tensors. ``steps`` is a buffer, so it is
    saved and restored with checkpoints.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.0002, interval: int = 1,
                 device=None, update_buffers: bool = False):
        super().__init__()
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1), got {momentum}")
        if momentum > 0.5:
            warnings.warn(f"EMA momentum {momentum} is the weight of the NEW parameters "
                          "(MMagic's convention): the average will follow the model closely. "
                          f"A 0.x-style momentum m corresponds to {1 - momentum:g}.")
        self.module = deepcopy(model).requires_grad_(False)
        if device is not None:
            self.module.to(device)
        self.momentum = momentum
        self.interval = interval
        self.update_buffers = update_buffers
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _pairs(self, model: nn.Module, buffers: bool) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        mine = self.module.named_buffers() if buffers else self.module.named_parameters()
        theirs = dict(model.named_buffers() if buffers else model.named_parameters())
        # .to(): the average may live on another device (the `device` argument).
        return [(t, theirs[name].detach().to(t.device, non_blocking=True)) for name, t in mine]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        steps = int(self.steps)
        pairs = self._pairs(model, buffers=False)
        if self.update_buffers:
            pairs += self._pairs(model, buffers=True)
        if steps == 0:
            for avg, src in pairs:
                avg.copy_(src)
        elif steps % self.interval == 0:
            blend = [(a, s) for a, s in pairs if a.is_floating_point()]
            ops.ema_([a for a, _ in blend], [s for _, s in blend], 1.0 - self.momentum)
            for avg, src in pairs:
                if not avg.is_floating_point():
                    avg.copy_(src)
        if not self.update_buffers:
            self.sync_buffers(model)
        self.steps += 1

    @torch.no_grad()
    def sync_buffers(self, model: nn.Module) -> None:
        for avg, src in self._pairs(model, buffers=True):
            avg.copy_(src)

    @torch.no_grad()
    def sync_parameters(self, model: nn.Module) -> None:
        for avg, src in self._pairs(model, buffers=False) + self._pairs(model, buffers=True):
            avg.copy_(src)
