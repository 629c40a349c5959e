"""EMA copy of the generator, updated through the fused multi-tensor EMA op.

Registered in MMEngine's MODELS as ``FusedExponentialMovingAverage``: under
MMagic's ``default_scope='mmagic'`` the name ``ExponentialMovingAverage``
resolves to MMagic's own class first, this name only to ours.
"""
from __future__ import annotations

import operator
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseAveragedModel

from .. import ops
from ..optim import EmaBlend


class ExponentialMovingAverage(BaseAveragedModel):
    """An averaged copy of ``model`` with MMagic 1.x's semantics and arguments.

    ``momentum`` is the weight of the *new* parameters:
    ``avg = (1 - momentum) * avg + momentum * param`` (MMagic's convention; the
    0.x EMA hook's momentum m corresponds to ``1 - m``). The first update copies
    the model; later ones blend every ``interval``-th call. With
    ``update_buffers`` floating-point buffers (BN statistics, spectral-norm
    vectors) are averaged too, integer ones keep their first copy and
    non-persistent ones (outside ``state_dict()``) their initial values, as in
    MMEngine's ``BaseAveragedModel``; otherwise buffers are copied. One call of
    ``pygan_optim.ops.ema_`` blends all tensors. ``steps`` is a buffer, so it is
    saved and restored with checkpoints.

    A drop-in for MMagic 1.x's ``ExponentialMovingAverage`` in
    ``ema_config=dict(type='FusedExponentialMovingAverage', ...)``: an MMEngine
    ``BaseAveragedModel`` with the calls MMagic's ``BaseGAN`` makes
    (``update_parameters``, ``sync_buffers``, ``sync_parameters``, ``steps``,
    ``update_buffers``), the same state_dict keys (``steps``, ``module.*``), and
    MMagic's loading of checkpoints whose EMA keys lack the ``module.`` prefix.

    Blending inside the generator's update (``blend_in_step=True``, the
    default): ``blend_in_step(model)``, called before the generator's last
    optimizer step of the window, returns an ``EmaBlend`` to pass as
    ``step(ema=...)`` (``update_params(loss, step_kwargs=dict(ema=...))``) when
    the next ``update_parameters(model)`` will blend. A ``FusedAdam`` step then
    blends the parameters' averages in its update pass (8 instead of 12 bytes
    per fp32 parameter), and ``update_parameters`` does only what it left: the
    buffers, averages it could not reach, everything if no step ran. The results
    are the same bits as without it. A parameter written again between that step
    and ``update_parameters`` (the step was not the last) is an error.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.0002, interval: int = 1,
                 device=None, update_buffers: bool = False, blend_in_step: bool = True):
        interval = _check_interval(interval)
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1), got {momentum}")
        if momentum > 0.5:
            warnings.warn(f"EMA momentum {momentum} is the weight of the NEW parameters "
                          "(MMagic's convention): the average will follow the model closely. "
                          f"A 0.x-style momentum m corresponds to {1 - momentum:g}.")
        super().__init__(model, interval, device, update_buffers)
        self.momentum = momentum
        self.blends_in_step = blend_in_step
        self._blend: Optional[EmaBlend] = None  # handed out for the next update

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _weights(self) -> Tuple[float, float]:
        """The old average's and the new parameters' weights, as MMagic's
        ``avg.mul_(1 - m).add_(param, alpha=m)`` takes them: 1 - m (in double)
        and m itself. (The ops' default new weight, 1 - (1 - m), is one float
        ulp away from float32(m) for some m.)"""
        m = ops.real_number(self.momentum, "momentum", type(self).__name__)
        return 1.0 - m, m

    def avg_func(self, averaged_param: torch.Tensor, source_param: torch.Tensor,
                 steps: int) -> None:
        """One tensor's blend (BaseAveragedModel's hook; update_parameters blends
        all tensors in one call instead)."""
        _blend([(averaged_param, _source_for(averaged_param, source_param))],
                *self._weights())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # MMagic 1.x checkpoints may store the EMA's tensors as `<prefix>name`
        # rather than `<prefix>module.name`, and may lack `steps`: read both.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if not rest.startswith("module.") and rest != "steps":
                state_dict[prefix + "module." + rest] = state_dict.pop(key)
        state_dict.setdefault(prefix + "steps", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _pairs(self, model: nn.Module, buffers: bool,
               persistent_only: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        mine = self.module.named_buffers() if buffers else self.module.named_parameters()
        if persistent_only:
            # What MMEngine's BaseAveragedModel averages: state_dict() entries,
            # which leave out buffers registered with persistent=False.
            saved = self.module.state_dict(keep_vars=True)
            mine = [(name, t) for name, t in mine if name in saved]
        theirs = dict(model.named_buffers() if buffers else model.named_parameters())
        return [(t, _source_for(t, theirs[name])) for name, t in mine]

    def blend_in_step(self, model: nn.Module) -> Optional[EmaBlend]:
        """An EmaBlend of ``model``'s parameters for the optimizer step just
        before the next ``update_parameters(model)``, or None when that call
        will not blend (the first one copies; interval-skipped calls) or
        ``blend_in_step`` is off."""
        if self._blend is not None and self._blend.done:
            raise RuntimeError(
                f"{type(self).__name__}: an optimizer step blended the EMA, but "
                "update_parameters() was not called after it; the average would be blended "
                "twice. Call update_parameters() after the step that got the EmaBlend.")
        self._blend = None
        steps = int(self.steps)
        if not self.blends_in_step or steps == 0 or steps % self.interval != 0:
            return None
        theirs = dict(model.named_parameters())
        mine = list(self.module.named_parameters())
        if any(name not in theirs for name, _ in mine):
            return None  # not the model this EMA averages
        self._blend = EmaBlend([(theirs[name], avg) for name, avg in mine], *self._weights())
        return self._blend

    def _finish_blend(self, model: nn.Module,
                      blend: EmaBlend) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(average, source) pairs of the parameters the step did not blend;
        refuses a blend taken from values that changed afterwards."""
        changed = blend.changed_since_blend()
        if changed:
            names = {id(p): name for name, p in model.named_parameters()}
            raise RuntimeError(
                f"{type(self).__name__}: parameter {names.get(id(changed[0]), '?')!r} (and "
                f"{len(changed) - 1} more) changed after the optimizer step that blended the EMA "
                "toward it, so that step was not the last one before update_parameters(); "
                "pass the EmaBlend to the last step only, or construct with blend_in_step=False")
        return [(avg, _source_for(avg, src)) for src, avg in blend.pending()]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        steps = int(self.steps)
        blend, self._blend = self._blend, None
        if blend is not None and steps > 0 and steps % self.interval == 0:
            pairs = self._finish_blend(model, blend)
        else:
            pairs = self._pairs(model, buffers=False)
        if self.update_buffers:
            # Non-persistent buffers are neither averaged nor copied then: they
            # keep the values they had when the EMA was made, as in MMEngine.
            pairs += self._pairs(model, buffers=True, persistent_only=True)
        if steps == 0:
            for avg, src in pairs:
                avg.copy_(src)
        elif steps % self.interval == 0:
            # As MMEngine's BaseAveragedModel (so MMagic): integer buffers such as
            # BN's num_batches_tracked keep their first copy when update_buffers.
            floating = [(a, s) for a, s in pairs if a.is_floating_point()]
            if floating:  # the optimizer step may have blended every parameter
                _blend(floating, *self._weights())
        if not self.update_buffers:
            self.sync_buffers(model)
        self.steps += 1

    @torch.no_grad()
    def sync_buffers(self, model: nn.Module) -> None:
        for avg, src in self._pairs(model, buffers=True):
            avg.copy_(src)

    @torch.no_grad()
    def sync_parameters(self, model: nn.Module) -> None:
        # A copy of everything: whatever a step blended is overwritten, so a
        # blend handed out for this phase is spent.
        self._blend = None
        for avg, src in self._pairs(model, buffers=False) + self._pairs(model, buffers=True):
            avg.copy_(src)


def _check_interval(interval) -> int:
    # update_parameters blends when steps % interval == 0: 0 would divide by
    # zero at the second update, a negative or fractional one would silently
    # give another schedule. Integer-likes (numpy ints) pass; bools do not.
    try:
        value = None if isinstance(interval, bool) else operator.index(interval)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"EMA interval must be an integer >= 1 (blend at every interval-th "
                         f"update), got {interval!r}")
    return value


def _source_for(average: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The model's tensor as the average reads it: detached, on the average's
    device (the EMA's `device` argument may put it elsewhere) and in its dtype
    when that holds the source's values (e.g. an fp32 average of a bf16/fp16
    model, made with `ema.module.float()`: the widening is exact). A source
    whose values the average's dtype does not hold (an fp32 average of an fp64
    model) keeps its own: MMagic's arithmetic adds it in the wider dtype and
    rounds once (see _blend). A source already on the average's device and in
    that dtype is the model's tensor itself, not a copy."""
    dtype = average.dtype
    if torch.promote_types(dtype, source.dtype) != dtype:
        dtype = source.dtype
    # A copy to the CPU must be complete before the CPU blend reads it.
    return source.detach().to(device=average.device, dtype=dtype,
                              non_blocking=average.device.type != "cpu")


def _blend(pairs: List[Tuple[torch.Tensor, torch.Tensor]], old_weight: float,
           new_weight: float) -> None:
    """avg = old_weight * avg + new_weight * src for (avg, src) pairs: one
    ops.ema_ call for the pairs of one dtype; a source wider than its average
    (rare) by MMagic's own two ops, which round the sum once from the wider
    dtype where rounding the source first could differ by an ulp."""
    fused = [(a, s) for a, s in pairs if a.dtype == s.dtype]
    if fused:
        ops.ema_([a for a, _ in fused], [s for _, s in fused], old_weight, new_weight)
    for avg, src in pairs:
        if avg.dtype != src.dtype:
            avg.mul_(old_weight).add_(src, alpha=new_weight)
