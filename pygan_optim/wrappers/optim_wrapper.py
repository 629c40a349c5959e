"""pygan_optim.OptimWrapper (registered as ``FusedOptimWrapper``)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper as _MMOptimWrapper

from ..optim.step_protocol import has_own_zero_grad
from . import fused_step


class OptimWrapper(_MMOptimWrapper):
    """MMEngine's ``OptimWrapper``, call for call, with a fused step.

    With a plain ``torch.optim`` optimizer inside it *is* MMEngine's wrapper.
    With a pygan_optim optimizer (``FusedAdam``/``FusedAdamW``) ``step`` does
    clipping by L2 norm and the update in two passes over the grads (one without
    clipping). In ``update_params`` the grads are released by the update call
    itself (``FusedAdam.step_and_zero_grad``), which lets beta1 == 0 keep them as
    exp_avg, or with ``zero_kwargs=dict(set_to_none=False)`` zeroed inside the
    update pass instead of a third pass (not when the wrapper or the optimizer
    has a zero_grad of its own: that is called instead).
    Clipping by value or by another norm type takes MMEngine's path, and so does
    any clip when the optimizer has step pre-hooks (they see clipped grads there)
    or when ``_clip_grad`` or ``clip_func`` is replaced (they are called there).

    ``blend_ema_in_step(ema)`` (what ``BlendEmaInStepHook`` sets up for MMagic's
    GAN models) folds an EMA of the model into the last update of each window.
    """

    _zero_in_next_step = False
    _release_in_next_step = False
    _ema = None        # asked for an EmaBlend at each window's start (blend_ema_in_step)
    _ema_blend = None  # that EmaBlend, for the window's last update

    def blend_ema_in_step(self, ema) -> None:
        """From now on, ``initialize_count_status(model, ...)`` (which MMagic's
        ``BaseGAN`` calls at the start of every generator phase) asks
        ``ema.blend_in_step(model)`` for an ``EmaBlend``, and the phase's last
        update passes it to ``FusedAdam.step(ema=...)``: the EMA is blended in
        the update pass, and ``ema.update_parameters`` finishes the rest. Needs a
        FusedAdam inside and an EMA with ``blend_in_step`` (pygan_optim's
        ``FusedExponentialMovingAverage``)."""
        if not fused_step.is_fused(self.optimizer):
            raise TypeError(f"blend_ema_in_step needs a pygan_optim FusedAdam/FusedAdamW inside "
                            f"the wrapper, not {type(self.optimizer).__name__}")
        if not callable(getattr(ema, "blend_in_step", None)):
            raise TypeError(f"blend_ema_in_step needs an EMA with blend_in_step() (pygan_optim's "
                            f"FusedExponentialMovingAverage), not {type(ema).__name__}")
        self._ema = ema

    def initialize_count_status(self, model, init_counts: int, max_counts: int) -> None:
        super().initialize_count_status(model, init_counts, max_counts)
        self._ema_blend = None
        if self._ema is not None:
            # None unless `model` is the EMA's source and its next update blends.
            self._ema_blend = self._ema.blend_in_step(
                model.module if is_model_wrapper(model) else model)

    def _with_ema_blend(self, step_kwargs: Optional[Dict]) -> Optional[Dict]:
        """step_kwargs with the window's EmaBlend when this is its last update."""
        blend = self._ema_blend
        if blend is None or self._inner_count != self._max_counts:
            return step_kwargs
        self._ema_blend = None
        if step_kwargs and step_kwargs.get("ema") is not None:
            # The EMA's own update expects this wrapper's blend: another one would
            # leave it thinking nothing was blended, and blend again.
            raise RuntimeError("this wrapper blends its EMA in the window's last step "
                               "(blend_ema_in_step); do not pass ema= to that step too")
        return dict(step_kwargs or {}, ema=blend)

    def update_params(self, loss: torch.Tensor, step_kwargs: Optional[Dict] = None,
                      zero_kwargs: Optional[Dict] = None) -> None:
        loss = self.scale_loss(loss)
        self.backward(loss)
        if self.should_update():
            step_kwargs = self._with_ema_blend(step_kwargs) or {}
            zero_kwargs = zero_kwargs or {}
            # A bare zero_grad() is torch's set_to_none=True unless something
            # overrides it; then it is called as MMEngine calls it.
            if (zero_kwargs in ({}, {"set_to_none": True}, {"set_to_none": False})
                    and self._zeroes_in_step(step_kwargs)):
                self.step_and_zero_grad(set_to_none=zero_kwargs.get("set_to_none", True),
                                        **step_kwargs)
            else:
                self.step(**step_kwargs)
                self.zero_grad(**zero_kwargs)

    def step_and_zero_grad(self, set_to_none: bool = False, **step_kwargs) -> None:
        """``step(**step_kwargs)`` then ``zero_grad(set_to_none=set_to_none)``. On
        the fused path the zeros are written in the update pass itself, or the
        grads are released by the update call (FusedAdam.step_and_zero_grad: with
        beta1 == 0 they may become exp_avg)."""
        if not self._zeroes_in_step(step_kwargs):
            self.step(**step_kwargs)
            self.zero_grad(set_to_none=set_to_none)
            return
        flag = "_release_in_next_step" if set_to_none else "_zero_in_next_step"
        setattr(self, flag, True)
        try:
            # Through self.step: MMEngine's schedulers count calls to it.
            self.step(**step_kwargs)
        finally:
            setattr(self, flag, False)
        if set_to_none:
            self.zero_grad(set_to_none=True)  # as MMEngine calls it; nothing is left to release

    def _zeroes_in_step(self, step_kwargs: Dict) -> bool:
        """Whether the step itself can zero or release the grads: it takes the
        fused path and no zero_grad of one's own must run instead."""
        return self._takes_fused_path(step_kwargs) and not self._zero_grad_overridden()

    def _zero_grad_overridden(self) -> bool:
        """Whether this wrapper or its optimizer has a zero_grad of its own (a
        subclass's or one set on the instance), which zeros written or grads
        released in the update pass would skip or pre-empt."""
        return (type(self).zero_grad is not _MMOptimWrapper.zero_grad
                or "zero_grad" in vars(self) or has_own_zero_grad(self.optimizer))

    def step(self, **kwargs) -> None:
        max_norm = self._fused_max_norm(kwargs)
        if max_norm is False:
            super().step(**kwargs)
            return
        fused_step.step(self.optimizer, max_norm=max_norm, loss_scale=None,
                        zero_grads=self._zero_in_next_step, log_norm=self._log_norm,
                        step_kwargs=kwargs, release_grads=self._release_in_next_step)

    def _takes_fused_path(self, step_kwargs: Dict) -> bool:
        """Whether step() takes the fused path, which can zero or release the grads
        itself."""
        return self._fused_max_norm(step_kwargs) is not False

    def _fused_max_norm(self, step_kwargs: Dict):
        """max_norm (or None: no clipping) on the fused path; False when the
        native path must run: a torch optimizer, a clip the kernel cannot fold,
        a clip with step pre-hooks (on MMEngine's path they see the clipped,
        unscaled grads and what they change is not clipped again), or a closure
        (its backward makes new grads after the norm pass; on MMEngine's path
        the clip sees the old grads, and GradScaler refuses it)."""
        if not fused_step.is_fused(self.optimizer) or "closure" in step_kwargs:
            return False
        try:
            max_norm = fused_step.clip_norm_args(self.clip_grad_kwargs)
        except LookupError:
            return False
        if max_norm is not None and (self.optimizer._has_step_pre_hooks()
                                     or self._clip_overridden()):
            return False
        return max_norm

    def _clip_overridden(self) -> bool:
        """Whether the clip is something else than MMEngine's _clip_grad calling
        clip_grad_norm_ (a subclass's _clip_grad, one set on the instance, or a
        replaced clip_func): the fused path would skip it."""
        return (type(self)._clip_grad is not _MMOptimWrapper._clip_grad
                or "_clip_grad" in vars(self)
                or getattr(self, "clip_func", None) is not torch.nn.utils.clip_grad_norm_)

    def _log_norm(self, norm: torch.Tensor) -> None:
        # The one host synchronisation: MMEngine logs the pre-clip norm as a float.
        self.message_hub.update_scalar(f"train/{self.grad_name}", float(norm))
