"""pygan_optim.AmpOptimWrapper (registered as ``FusedAmpOptimWrapper``)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Union

import torch
import torch.nn as nn
from torch.amp.grad_scaler import OptState
from mmengine.optim import AmpOptimWrapper as _MMAmpOptimWrapper
from mmengine.optim import OptimWrapper as _MMOptimWrapper

from . import fused_step
from .optim_wrapper import OptimWrapper


class AmpOptimWrapper(OptimWrapper, _MMAmpOptimWrapper):
    """MMEngine's ``AmpOptimWrapper``, call for call, that also runs on the CPU
    and takes the fused path with a pygan_optim optimizer.

    Same arguments (``loss_scale``: 'dynamic', a float for a static scale, or a
    dict of GradScaler arguments; ``dtype``: 'float16', 'bfloat16', ... or a
    torch dtype; ``use_fsdp``), same ``state_dict`` with its ``loss_scaler``
    entry. Differences from MMEngine, on purpose:

    - On the CPU it works instead of refusing: ``torch.amp.GradScaler('cpu')``
      and CPU autocast (bfloat16 by default, float16 allowed; other dtypes are
      refused when ``optim_context`` is entered, as MMEngine refuses them).
    - The scaler is ``torch.amp.GradScaler`` for the parameters' device type.
    - With ``FusedAdam``/``FusedAdamW`` the step is two passes over the grads:
      one read for the unscaled global norm and the inf/NaN flag, then the update
      with 1/scale x clip coefficient folded in and skipped inside the kernel on
      inf/NaN. The scale is then updated from that flag as GradScaler does.
      The grads themselves are left as backward made them (scaled, unclipped)
      until ``zero_grad``; MMEngine's path rewrites them in place.
    - ``use_fsdp=True`` keeps MMEngine's path (its scaler syncs the inf flag
      across ranks inside ``unscale_``), with an ``unscale_`` before the step
      when there is no clip: GradScaler would otherwise give an optimizer that
      unscales itself (FusedAdam, torch's fused Adam) each rank's own flag.
    """

    valid_dtypes = _MMAmpOptimWrapper.valid_dtypes

    def __init__(self, loss_scale: Union[str, float, dict] = "dynamic",
                 dtype: Union[str, torch.dtype, None] = None, use_fsdp: bool = False, **kwargs):
        # MMEngine's __init__ asserts a GPU-like device; everything else is as there.
        _MMOptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        # FSDP's scaler all-reduces its inf flag across ranks inside unscale_; the
        # fused step would decide per rank, so FSDP keeps MMEngine's path.
        self._use_fsdp = use_fsdp
        self.device_type = _device_type(self.optimizer)
        if use_fsdp:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler_cls = lambda **kw: ShardedGradScaler(device=self.device_type, **kw)  # noqa: E731
        else:
            scaler_cls = lambda **kw: torch.amp.GradScaler(self.device_type, **kw)  # noqa: E731
        if loss_scale == "dynamic":
            self.loss_scaler = scaler_cls()
        elif isinstance(loss_scale, float):
            self._scale_update_param = loss_scale
            self.loss_scaler = scaler_cls(init_scale=loss_scale)
        elif isinstance(loss_scale, dict):
            self.loss_scaler = scaler_cls(**loss_scale)
        else:
            raise TypeError("loss_scale must be of type float, dict, or "
                            f'"dynamic", but got {loss_scale}')
        if isinstance(dtype, str):
            assert dtype in self.valid_dtypes, (
                f"dtype should be any of {self.valid_dtypes}, got {dtype}")
            dtype = getattr(torch, dtype)
        assert dtype is None or isinstance(dtype, torch.dtype), (
            f"dtype should be None or instance of torch.dtype, got {dtype}")
        self.cast_dtype = dtype

    def step(self, **kwargs) -> None:
        max_norm = self._fused_max_norm(kwargs)
        if max_norm is False:
            if (self._use_fsdp and not self.clip_grad_kwargs and self._scaler_ready()
                    and getattr(self.optimizer, "_step_supports_amp_scaling", False)):
                # GradScaler.step hands an optimizer that unscales itself (FusedAdam,
                # torch's fused Adam) a flag found on this rank alone; ShardedGradScaler
                # agrees on one across ranks only in unscale_ (the clip branch calls it).
                self.loss_scaler.unscale_(self.optimizer)
            _MMAmpOptimWrapper.step(self, **kwargs)
            return
        scale = None
        if self.loss_scaler.is_enabled():
            # Raises, as GradScaler.step would, when no backward went through scale():
            # before any tensor changes.
            scale, _ = self.loss_scaler._check_scale_growth_tracker("step")
        try:
            found_inf = fused_step.step(self.optimizer, max_norm=max_norm, loss_scale=scale,
                                        zero_grads=self._zero_in_next_step,
                                        log_norm=self._log_norm, step_kwargs=kwargs,
                                        release_grads=self._release_in_next_step)
        except fused_step.NoGradsToUnscale:
            # Nothing to update: GradScaler's own step and update() decide what
            # happens (a static scale is reset; a dynamic one has no inf check
            # to grow or back off from, and update() says so).
            _MMAmpOptimWrapper.step(self, **kwargs)
            return
        if scale is not None:
            self._update_scale(found_inf)

    def _fused_max_norm(self, step_kwargs):
        """As OptimWrapper's; also False under use_fsdp, and when the scaler is
        not ready for a step of this optimizer: after a manual
        ``loss_scaler.unscale_(optimizer)`` the grads are already unscaled,
        and MMEngine's path does what GradScaler does then (the clip's second
        unscale_ raises; without clip the step divides by nothing more)."""
        if self._use_fsdp or not self._scaler_ready() or self._scaler_overridden():
            return False
        return super()._fused_max_norm(step_kwargs)

    def _scaler_overridden(self) -> bool:
        """Whether the loss scaler is something else than torch's GradScaler, or
        one whose unscale_ or step another class or the instance replaces: the
        fused path calls neither, and reads GradScaler's own state."""
        scaler = self.loss_scaler
        if not isinstance(scaler, torch.amp.GradScaler):
            return True
        return any(getattr(type(scaler), name) is not getattr(torch.amp.GradScaler, name)
                   or name in vars(scaler) for name in ("unscale_", "step"))

    def _scaler_ready(self) -> bool:
        """Whether the scaler (when enabled) has not unscaled this optimizer's
        grads since its last update()."""
        if not self.loss_scaler.is_enabled():
            return True
        stage = self.loss_scaler._per_optimizer_states[id(self.optimizer)]["stage"]
        return stage is OptState.READY

    def _update_scale(self, found_inf: torch.Tensor) -> None:
        """GradScaler.update() from our inf flag: record it as the scaler's own
        inf check of this optimizer, then let the scaler grow or back off (or
        reset a static scale) exactly as after its own step."""
        state = self.loss_scaler._per_optimizer_states[id(self.optimizer)]
        state["found_inf_per_device"] = {found_inf.device: found_inf}
        self.loss_scaler.update(self._scale_update_param)

    @contextmanager
    def optim_context(self, model: nn.Module):
        with _MMOptimWrapper.optim_context(self, model), torch.autocast(
                device_type=self.device_type, dtype=self._autocast_dtype()):
            yield

    def _autocast_dtype(self) -> torch.dtype:
        if self.device_type == "cpu":
            dtype = self.cast_dtype or torch.bfloat16
            if dtype not in (torch.bfloat16, torch.float16):
                # torch would only warn and run without autocast.
                raise ValueError(f"AmpOptimWrapper on the CPU: autocast supports bfloat16 "
                                 f"(the default) and float16, not {dtype}")
            return dtype
        # MMEngine's default on GPUs: the dtype torch's autocast is set to.
        return self.cast_dtype or torch.get_autocast_dtype(self.device_type)


def _device_type(optimizer) -> str:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device.type
    return "cuda" if torch.cuda.is_available() else "cpu"
