"""The wrapper step on a pygan_optim optimizer, in at most two passes over the grads.

Pass 1 (only when clipping by norm or AMP needs it) reads every grad once for
the global norm of the unscaled grads and the inf/NaN flag. Pass 2 is the
optimizer's update with the combined factor (1/loss scale x clip coefficient)
applied on the fly, skipped inside the kernel when the flag is set; it can
also zero the grads. Nothing comes back to the host except the norm MMEngine
logs.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..optim import FusedAdam
from ..sharded import all_reduce_over, is_dtensor, local, sharded_mesh_dims


def is_fused(optimizer) -> bool:
    return isinstance(optimizer, FusedAdam)


def clip_norm_args(clip_grad_kwargs: Optional[dict]) -> Optional[float]:
    """max_norm when the clip config can be folded into the update (L2 norm,
    no error on non-finite); None when there is no clipping.
    Raises LookupError for a clip the fused path cannot fold."""
    if not clip_grad_kwargs:
        return None
    kwargs = dict(clip_grad_kwargs)
    max_norm = kwargs.pop("max_norm", None)
    norm_type = float(kwargs.pop("norm_type", 2.0))
    error_if_nonfinite = kwargs.pop("error_if_nonfinite", False)
    kwargs.pop("foreach", None)
    if max_norm is None or norm_type != 2.0 or error_if_nonfinite or kwargs:
        raise LookupError("clip_grad needs the native path")
    return float(max_norm)


def split_grads(optimizer) -> Tuple[List[Tensor], List[Tensor], set]:
    """Grads of the optimizer's params: (of params that require grad, of the
    others, the dtypes of both). MMEngine clips only the first; GradScaler
    checks both for inf. A sparse grad is refused here, with the optimizer's
    own message, before the norm pass (which would only name its dispatch key);
    so is a meta one (the norm pass would run on it and fail at the logging)."""
    clipped, others, dtypes = [], [], set()
    for index, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or g.is_meta or p.is_meta:
                where = (f"{type(optimizer).__name__}: parameter {k} of param group {index} "
                         f"(shape {tuple(p.shape)})")
                if g.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please "
                                       f"consider SparseAdam instead ({where})")
                raise RuntimeError(f"{where} is a meta tensor, which has no data")
            (clipped if p.requires_grad else others).append(g)
            dtypes.add(g.dtype)
    return clipped, others, dtypes


def global_norm(grads: List[Tensor], scale: Optional[Tensor],
                found_inf: Optional[Tensor]) -> Tensor:
    """L2 norm of all grads x scale in one read per device; sets found_inf.

    DTensor grads (FSDP2) count with all their shards: each rank sums the
    squares of its local shards, and one all-reduce per sharded mesh dimension
    adds up those sums and the inf/NaN flags, so every rank clips with the same
    coefficient and skips the same steps as an unsharded run."""
    by_key: Dict[tuple, List[Tensor]] = defaultdict(list)
    for g in grads:
        mesh, dims = sharded_mesh_dims(g) if is_dtensor(g) else (None, ())
        # float64 grads apart: their norm is taken in float64 (below).
        by_key[g.device, mesh, dims, g.dtype == torch.float64].append(local(g))
    norms = []
    for (device, mesh, dims, wide), group in by_key.items():
        s = 1.0 if scale is None else scale.to(device, non_blocking=True)
        f = None if found_inf is None else (found_inf if found_inf.device == device and not dims
                                            else torch.zeros_like(found_inf, device=device))
        total, _ = ops.l2_norm(group, s, f)
        if wide:
            # The op's total is float32, which would round a float64 model's clip
            # coefficient (MMEngine's clip_grad_norm_ computes it in float64).
            scale64 = s.double().reshape(()) if torch.is_tensor(s) else s
            total = torch.linalg.vector_norm(
                torch.stack([n.double() for n in torch._foreach_norm(group)])) * scale64
        if dims:
            parts = torch.cat([total.double().square().reshape(1)] +
                              ([] if f is None else [f.double().reshape(1)]))
            all_reduce_over(parts, mesh, dims)
            total = parts[0].sqrt().to(total.dtype)
            if f is not None:
                f.copy_(parts[1:].clamp(max=1.0))
        if f is not None and f is not found_inf:
            found_inf.add_(f.to(found_inf.device, non_blocking=True)).clamp_(max=1.0)
        norms.append(total)
    if len(norms) == 1:
        return norms[0]
    first = norms[0].device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.stack([n.to(first).double() for n in norms]).norm().to(dtype)


def _inverse(loss_scale: Tensor) -> Tensor:
    """1/scale as GradScaler.unscale_ takes it (in float64, rounded to float32),
    or in float64 where float32 has no room for it (a scale at or below 2^-127,
    after some 144 skipped steps in a row: its float32 reciprocal is inf).
    No host synchronisation."""
    inverse = loss_scale.double().reciprocal()
    rounded = inverse.float().double()
    return torch.where(rounded.isinf(), inverse, rounded)


def _warn_if_fsdp1(optimizer) -> None:
    """FSDP1's parameters are plain tensors holding a slice of a flat shard:
    nothing in them names the process group, so the norm cannot be reduced."""
    if getattr(optimizer, "_warned_fsdp1", False):
        return
    if any(getattr(p, "_fsdp_flattened", False)
           for group in optimizer.param_groups for p in group["params"]):
        optimizer._warned_fsdp1 = True
        warnings.warn("clip_grad under FSDP1 (FullyShardedDataParallel) clips with the norm of "
                      "this rank's shards only, as MMEngine's OptimWrapper does, so ranks may clip "
                      "differently. With FSDP2 (torch.distributed.fsdp.fully_shard) the norm is "
                      "reduced over all shards.", stacklevel=3)


class NoGradsToUnscale(Exception):
    """An AMP step with no grad at all: GradScaler's own protocol has cases for
    it (a step that updates nothing, an update() that may refuse) that the
    caller leaves to GradScaler."""


def step(optimizer, *, max_norm: Optional[float], loss_scale: Optional[Tensor],
         zero_grads: bool, log_norm, step_kwargs: dict,
         release_grads: bool = False) -> Optional[Tensor]:
    """One fused wrapper step. ``loss_scale``: the AMP scale the grads carry
    (None without AMP). ``log_norm(norm)`` receives the pre-clip norm when
    clipping. ``zero_grads`` / ``release_grads``: the grads are zeroed in the
    update pass / set to None after it (FusedAdam.step_options). Returns the
    inf/NaN flag (AMP) or None; raises NoGradsToUnscale, having changed
    nothing, for an AMP step without grads."""
    found_inf = grad_mult = None
    if max_norm is not None or loss_scale is not None:
        clipped, others, dtypes = split_grads(optimizer)
        if loss_scale is not None and not clipped and not others:
            raise NoGradsToUnscale("an AMP step with no grads: left to GradScaler's own "
                                   "step and update()")  # before anything changed
        if loss_scale is not None and max_norm is not None and torch.float16 in dtypes:
            # MMEngine unscales before it clips, and GradScaler.unscale_ refuses.
            raise ValueError("Attempting to unscale FP16 gradients: AMP with clip_grad needs "
                             "float32 parameters (GradScaler.unscale_, which MMEngine's "
                             "AmpOptimWrapper calls before clipping, refuses float16 grads)")
        if max_norm is not None:
            _warn_if_fsdp1(optimizer)
        if loss_scale is not None:
            found_inf = torch.zeros(1, dtype=torch.float32, device=loss_scale.device)
        inv_scale = None if loss_scale is None else _inverse(loss_scale)
        if others and found_inf is not None:
            global_norm(others, None, found_inf)  # frozen params' grads: inf check only
        if clipped:
            norm = global_norm(clipped, inv_scale, found_inf)
            if max_norm is not None:
                log_norm(norm)
                # torch.nn.utils.clip_grad_norm_'s coefficient, kept on the device.
                grad_mult = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
                if others:
                    # The kernel scales every grad alike; here only some may be clipped
                    # (rare: a frozen param that still has a grad), so clip them apart.
                    torch._foreach_mul_([local(g) for g in clipped], grad_mult)
                    grad_mult = None
        # References to the grads would stop the update from keeping them
        # (FusedAdam.step_and_zero_grad).
        del clipped, others, dtypes
    with optimizer.step_options(grad_scale=loss_scale, found_inf=found_inf, grad_mult=grad_mult,
                                zero_grads=zero_grads, release_grads=release_grads):
        optimizer.step(**step_kwargs)
    return found_inf
