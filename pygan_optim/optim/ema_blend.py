"""EmaBlend: EMA copies to blend inside an optimizer step (``FusedAdam.step(ema=...)``)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import _ext
from ..ops import _check_ema_new_weight, real_number
from ..sharded import is_dtensor

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class EmaBlend:
    """Averages to move toward their parameters' new values in the update pass.

    ``pairs``: (parameter, average) tensors; ``momentum``: the weight of the old
    average and ``new_weight`` that of the new parameters, as in
    ``pygan_optim.ops.ema_`` (``avg = avg * momentum + param * new_weight``,
    ``new_weight`` being ``1 - momentum`` when not given). For MMagic's config
    momentum m pass ``momentum=1 - m, new_weight=m``: its weights, bit for bit.

    ``FusedAdam.step(ema=blend)`` blends every pair whose parameter it owns and
    whose average has the parameter's device, dtype, shape and strides, in the
    same pass that updates the parameter (or toward the unchanged parameter when
    the step is skipped for inf/NaN grads, or has no grad), bit for bit what
    ``ops.ema_`` right after the step would give. It records them in ``done``
    (ids of the parameters); ``pending()`` lists the pairs it did not blend, which
    the caller blends itself: parameters of other optimizers, averages that
    cannot walk with their parameter, parameters that never had a grad (no
    optimizer state yet), and every pair when the optimizer has step post-hooks
    (they run after the update and may change the parameters). A step that never
    runs blends nothing.

    One blend serves one step of each optimizer: a second step of the same
    optimizer with it is refused (it would blend nothing, silently).
    """

    def __init__(self, pairs: Iterable[Tuple[Tensor, Tensor]], momentum: float,
                 new_weight: Optional[float] = None):
        momentum = real_number(momentum, "momentum", "EmaBlend")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EmaBlend momentum (the old average's weight) must be in [0, 1], "
                             f"got {momentum}")
        if new_weight is not None:
            new_weight = real_number(new_weight, "new_weight", "EmaBlend")
            _check_ema_new_weight("EmaBlend", momentum, new_weight, "momentum", "new_weight")
        self.momentum = momentum
        self.new_weight = new_weight  # None: 1 - momentum (in double, by the kernels)
        self._pairs: Dict[int, Tuple[Tensor, Tensor]] = {}
        for param, average in pairs:
            if id(param) in self._pairs:
                raise ValueError(f"EmaBlend: a parameter (shape {tuple(param.shape)}) appears in "
                                 "two pairs")
            self._pairs[id(param)] = (param, average)
        self.done: set = set()
        self._versions: Dict[int, int] = {}  # param id -> its version right after the blend
        self._steppers: set = set()  # ids of the optimizers whose step took this blend

    def claim(self, optimizer) -> None:
        """Called by an optimizer's step that takes this blend: a second step of
        the same optimizer is refused."""
        if id(optimizer) in self._steppers:
            raise RuntimeError(f"this EmaBlend was already used by a step of this "
                               f"{type(optimizer).__name__}: make a new EmaBlend for each step "
                               "that should blend")
        self._steppers.add(id(optimizer))

    def unclaim(self, optimizer) -> None:
        """A refused step (nothing changed) gives the blend back."""
        self._steppers.discard(id(optimizer))

    def __len__(self) -> int:
        return len(self._pairs)

    def average_for(self, param: Tensor) -> Optional[Tensor]:
        """The average to blend in the step that updates ``param``, or None when
        there is none or it cannot walk with the parameter (then it stays pending)."""
        pair = self._pairs.get(id(param))
        if pair is None or id(param) in self.done:
            return None
        average = pair[1]
        # Plain tensors only (no subclass, so no DTensor average either), laid
        # out as the parameter and not its memory: one extension call checks the
        # rest (layout, meta, neg/conj views, device, dtype, shape, strides).
        if (type(average) not in _PLAIN_TENSORS or is_dtensor(param)
                or not _ext.ema_walks_with(param, average)):
            return None
        return average

    def mark_done(self, params: Iterable[Tensor]) -> None:
        """Records that the step just blended these parameters' averages."""
        for p in params:
            self.done.add(id(p))
            self._versions[id(p)] = p._version

    def changed_since_blend(self) -> List[Tensor]:
        """Parameters written again after the step that blended their average:
        that blend did not take their final value."""
        return [self._pairs[key][0] for key, version in self._versions.items()
                if self._pairs[key][0]._version != version]

    def pending(self) -> List[Tuple[Tensor, Tensor]]:
        """The (parameter, average) pairs not blended by a step."""
        return [pair for key, pair in self._pairs.items() if key not in self.done]
