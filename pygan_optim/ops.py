"""Typed entry points over the fused ops (``torch.ops.pygan_optim.*``).

Every op works in place on lists of tensors in one call, on the CPU or on a
CUDA device (all tensors of a call on one device). Scalars that change from
step to step (learning rate, loss scale, clip coefficient, the inf flag) may be
one-element tensors, so no value has to come back to the host.
``pygan_optim.reference`` has the same functions written in plain PyTorch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from . import _ext  # noqa: F401  (registers the ops)

_ops = torch.ops.pygan_optim


def adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    max_exp_avg_sqs: Optional[Sequence[Tensor]] = None,
    maximize: bool = False,
    decoupled: bool = False,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    grad_mult: Optional[Tensor] = None,
    zero_grads: bool = False,
    validate_only: bool = False,
    emas: Optional[Sequence[Optional[Tensor]]] = None,
    ema_momentum: float = 0.0,
    ema_new_weight: Optional[float] = None,
) -> None:
    """One Adam (``decoupled=False``) or AdamW step over all tensors, in place.

    Each grad is multiplied by ``grad_mult / grad_scale`` (when given) before the
    update, as ``torch.optim.Adam(fused=True)`` unscales by ``grad_scale``. When
    ``found_inf`` is non-zero nothing is updated and the step counts stay.
    ``state_steps`` are one-element float tensors, incremented by the step.
    ``zero_grads`` writes zeros into the grads in the same pass (also when the
    step is skipped). A parameter whose grad is None is skipped. Every input is
    checked before any tensor changes; ``validate_only`` stops after the checks.

    ``emas`` (one per parameter, None where there is none): after the step each
    is blended toward its parameter, ``ema = ema * ema_momentum + param *
    ema_new_weight`` (``ema_new_weight`` defaults to ``1 - ema_momentum``; see
    :func:`ema_`), bit for bit what ``ema_(..., ema_momentum, ema_new_weight)``
    called after the step gives, also for skipped updates and parameters
    without a grad. Where the update pass walks the parameter, the blend happens
    there while the new value is in registers (8 more bytes per fp32 parameter
    instead of a 12-byte pass). Each must have its parameter's dtype, device,
    shape and strides.
    """
    op_name = "pygan_optim.adam_step_"
    lr_tensor = lr if isinstance(lr, Tensor) else None
    emas = [] if emas is None else list(emas)
    if emas and len(emas) != len(params):
        raise RuntimeError(f"pygan_optim.adam_step_: expected {len(params)} tensors in emas "
                           f"(None where a parameter has no EMA), got {len(emas)}")
    ema_index = [i for i, e in enumerate(emas) if e is not None]
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps, max_exp_avg_sqs or [])
    if not any(len(x) for x in lists) and not any(
            isinstance(t, Tensor) for t in (lr_tensor, grad_scale, found_inf, grad_mult)):
        return  # nothing to update (and no tensor for the dispatcher to go by)
    if zero_grads or not torch.compiler.is_compiling():
        op, zeros = _ops.adam_step_, dict(zero_grads=zero_grads)
    else:  # traced, writing no grads: the twin whose grads are read only (see below)
        op, zeros = _ops.adam_step_read_grads_, {}
    op(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
        list(max_exp_avg_sqs) if amsgrad and max_exp_avg_sqs is not None else [],
        list(state_steps),
        lr=0.0 if lr_tensor is not None else real_number(lr, "lr", op_name),
        beta1=real_number(beta1, "beta1", op_name), beta2=real_number(beta2, "beta2", op_name),
        eps=real_number(eps, "eps", op_name),
        weight_decay=real_number(weight_decay, "weight_decay", op_name),
        amsgrad=amsgrad, maximize=maximize,
        decoupled=decoupled, lr_tensor=lr_tensor, grad_scale=grad_scale,
        found_inf=found_inf, grad_mult=grad_mult, validate_only=validate_only,
        emas=[emas[i] for i in ema_index], ema_index=ema_index,
        ema_momentum=real_number(ema_momentum, "ema_momentum", op_name),
        ema_new_weight=_optional_float(ema_new_weight, "ema_new_weight", op_name),
        **zeros)


def scale_(tensors: Sequence[Tensor], factor: Union[float, Tensor],
           found_inf: Tensor) -> None:
    """``t *= factor`` for every tensor; sets ``found_inf`` to 1 if an input was inf/NaN."""
    f, ft = _split(factor, "factor", "pygan_optim.scale_")
    tensors = list(tensors)
    _refuse_untracked_writes("pygan_optim.scale_", tensors=tensors, found_inf=[found_inf])
    _ops.scale_(tensors, f, ft, found_inf)


def scale(inputs: Sequence[Tensor], factor: Union[float, Tensor],
          found_inf: Tensor) -> list:
    """Returns ``[t * factor for t in inputs]``; sets ``found_inf`` like :func:`scale_`."""
    f, ft = _split(factor, "factor", "pygan_optim.scale")
    return _ops.scale(list(inputs), f, ft, found_inf)


def l2_norm(tensors: Sequence[Tensor], scale: Union[float, Tensor] = 1.0,
            found_inf: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """L2 norm of ``t * scale`` over all tensors and per tensor, in one read.

    Returns ``(total, per_tensor)`` as float32 tensors on the tensors' device.
    Squares are summed in fp32 blocks combined in fp64, over fixed chunks, so the
    result does not depend on the thread count. Sets ``found_inf`` to 1 (when
    given) if an element is inf or NaN.
    """
    s, st = _split(scale, "scale", "pygan_optim.l2_norm")
    tensors = list(tensors)
    if not tensors:  # as torch's clip_grad_norm_ without grads: 0
        device = next((t.device for t in (st, found_inf) if t is not None), None)
        return (torch.zeros((), dtype=torch.float32, device=device),
                torch.zeros(0, dtype=torch.float32, device=device))
    return _ops.l2_norm(tensors, s, st, found_inf)


def ema_(ema: Sequence[Tensor], params: Sequence[Tensor], momentum: float,
         new_weight: Optional[float] = None) -> None:
    """``ema = ema * momentum + param * new_weight`` for every pair, in place.

    ``momentum`` is the old average's weight, ``new_weight`` the new
    parameters' (``1 - momentum``, computed in double, when not given). Both are
    rounded to the tensors' op-math type (float32; float64 for float64 tensors).
    MMagic's ``avg.mul_(1 - m).add_(param, alpha=m)`` is ``momentum=1 - m,
    new_weight=m``: with both given, fp32 results equal it bit for bit; with
    ``new_weight`` left out, float32(1 - (1 - m)) differs from float32(m) by one
    ulp for some m. Both must be in [0, 1] and add up to 1 (but for rounding).
    """
    ema, params = list(ema), list(params)
    if not ema and not params:
        return  # (no tensor for the dispatcher to go by)
    _refuse_untracked_writes("pygan_optim.ema_", ema=ema)
    _ops.ema_(ema, params, real_number(momentum, "momentum", "pygan_optim.ema_"),
              _optional_float(new_weight, "new_weight", "pygan_optim.ema_"))


def real_number(value, name: str, where: str) -> float:
    """``float(value)``, refusing text: float("1e-4") would quietly run a
    hyper-parameter that torch's optimizers refuse (a YAML ``1e-4`` is a str)."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{where}: {name} must be a number, not {type(value).__name__} "
                        f"{value!r}")
    return float(value)


def _optional_float(value, name: str, where: str) -> Optional[float]:
    return None if value is None else real_number(value, name, where)


def _split(value: Union[float, Tensor], name: str,
           where: str) -> Tuple[float, Optional[Tensor]]:
    if isinstance(value, Tensor):
        return 1.0, value
    return real_number(value, name, where), None


def _refuse_untracked_writes(op: str, **written: Sequence[Optional[Tensor]]) -> None:
    """The ops have no autograd formula: an in-place write into a tensor that
    requires grad, with grad mode on, would leave autograd's graph wrong
    (torch's foreach ops refuse writing such a leaf). Under no_grad, as in an
    optimizer step, nothing is looked at."""
    if not torch.is_grad_enabled():
        return
    for name, tensors in written.items():
        for i, t in enumerate(tensors):
            if isinstance(t, Tensor) and t.requires_grad:
                where = "found_inf" if name == "found_inf" else f"{name}[{i}]"
                raise RuntimeError(f"{op}: {where} requires grad and would be written in "
                                   "place with grad mode on, which autograd cannot follow; "
                                   "call it under torch.no_grad()")


# Fake (meta) implementations, for torch.compile / FakeTensor tracing and meta
# tensors. They refuse what the kernels refuse on structure (lengths, devices,
# shapes, dtypes, scalar sizes, written tensors that overlap themselves), so a
# traced or meta call fails where an eager one would. Values (lr, betas, eps,
# momentum) are the kernels' to check, at run time: Dynamo would turn a
# ValueError raised while tracing into its own exception type.
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_lists(op: str, lists, shapes_of: Optional[str] = None) -> None:
    """``lists``: (name, tensors) pairs; every tensor on the first one's device,
    of a supported dtype; with ``shapes_of``, each list pairwise shaped as that one."""
    named = dict(lists)
    first = next((t for _, ts in lists for t in ts if t is not None), None)
    if first is None:
        return
    ref = named.get(shapes_of, ())
    for name, tensors in lists:
        if shapes_of is not None and len(tensors) != len(ref):
            raise RuntimeError(f"{op}: expected {len(ref)} tensors in {name}, got {len(tensors)}")
        for i, t in enumerate(tensors):
            if t is None:
                continue
            if t.device != first.device:
                raise RuntimeError(f"{op}: {name}[{i}] is on {t.device} but the other tensors "
                                   f"are on {first.device}")
            if t.dtype not in _DTYPES:
                raise RuntimeError(f"{op}: {name}[{i}] has dtype {t.dtype}; supported are "
                                   "float32, float64, bfloat16 and float16")
            if shapes_of is not None and t.shape != ref[i].shape:
                raise RuntimeError(f"{op}: {name}[{i}] has shape {tuple(t.shape)} but "
                                   f"{shapes_of}[{i}] has shape {tuple(ref[i].shape)}")


def _check_scalars(op: str, lists, scalars, same_device=()) -> None:
    """One-element floating-point tensor arguments (``scalars``: name -> tensor or
    None) on the lists' device or the CPU, as the kernels take them (those named
    in ``same_device``, which the kernels write, on the lists' device). A meta
    scalar among real tensors sends the whole call here, so this is where it
    is refused: otherwise the call would do nothing and return garbage."""
    first = next((t for _, ts in lists for t in ts if t is not None), None)
    for name, t in scalars.items():
        if t is None:
            continue
        if t.numel() != 1:
            raise RuntimeError(f"{op}: {name} must have one element, not {t.numel()}")
        integral = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
        if not t.is_floating_point() and (name in same_device or not integral):
            kind = "floating-point" if name in same_device else "floating-point or integer"
            raise RuntimeError(f"{op}: {name} must be a {kind} tensor, not {t.dtype}")
        if first is not None and t.device != first.device and (
                name in same_device or t.device.type != "cpu"):
            raise RuntimeError(f"{op}: {name} is on {t.device} but the tensors are on "
                               f"{first.device}")


def _check_written(op: str, lists) -> None:
    """Written tensors whose elements share memory (expanded views) are refused."""
    for name, tensors in lists:
        for i, t in enumerate(tensors):
            if t is not None and torch._debug_has_internal_overlap(t) == 1:  # MemOverlap::Yes
                raise RuntimeError(f"{op}: {name}[{i}] has elements that share memory (an "
                                   "expanded or stride-0 view) and is written in place; "
                                   "clone() it first")


def _check_found_inf(op: str, found_inf) -> None:
    """A found_inf the kernels write: float32, as GradScaler's."""
    if found_inf is not None and found_inf.dtype != torch.float32:
        raise RuntimeError(f"{op}: found_inf must be float32, not {found_inf.dtype}")


@torch.library.register_fake("pygan_optim::adam_step_")
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                    amsgrad, emas=(), ema_index=(), ema_momentum=0.0, ema_new_weight=None,
                    lr_tensor=None, grad_scale=None, found_inf=None, grad_mult=None,
                    zero_grads=False, **_):
    op = "pygan_optim.adam_step_"
    if (len(emas) != len(ema_index) or len(set(ema_index)) != len(ema_index)
            or any(not 0 <= i < len(params) for i in ema_index)):
        raise RuntimeError("pygan_optim.adam_step_: emas and ema_index do not match the params")
    if emas and not 0.0 <= ema_momentum <= 1.0:
        raise ValueError(f"pygan_optim.adam_step_: ema_momentum must be in [0, 1], not "
                         f"{ema_momentum}")
    if emas and ema_new_weight is not None:
        _check_ema_new_weight(op, ema_momentum, ema_new_weight, "ema_momentum", "ema_new_weight")
    for i, e in zip(ema_index, emas):
        if e.dtype != params[i].dtype or e.stride() != params[i].stride():
            raise RuntimeError(f"pygan_optim.adam_step_: emas[{i}] must have params[{i}]'s "
                               "dtype and strides")
    slots = [None] * len(params)
    for i, e in zip(ema_index, emas):
        slots[i] = e
    lists = [("params", params), ("grads", grads), ("exp_avgs", exp_avgs),
             ("exp_avg_sqs", exp_avg_sqs)] + ([("max_exp_avg_sqs", max_exp_avg_sqs)]
                                              if amsgrad else []) + ([("emas", slots)] if emas
                                                                     else [])
    _check_lists("pygan_optim.adam_step_", lists, shapes_of="params")
    if len(state_steps) != len(params):
        raise RuntimeError(f"pygan_optim.adam_step_: expected {len(params)} tensors in "
                           f"state_steps, got {len(state_steps)}")
    steps = {f"state_steps[{i}]": s for i, s in enumerate(state_steps)}
    for name, s in steps.items():
        if s is not None and s.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"{op}: {name} must be float32 or float64, not {s.dtype}")
    _check_scalars(op, lists, dict(steps, lr=lr_tensor, grad_scale=grad_scale,
                                   found_inf=found_inf, grad_mult=grad_mult), same_device=steps)
    written = [("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
               ("emas", emas)] + ([("max_exp_avg_sqs", max_exp_avg_sqs)] if amsgrad else []) \
        + ([("grads", grads)] if zero_grads else [])
    _check_written(op, written)


# adam_step_'s schema declares the grads written (zero_grads writes them). Under
# torch.compile, Inductor then cannot decompose the call when grads are views of
# one buffer (DDP's gradient_as_bucket_view, FSDP2's reduce-scatter output): an
# InductorError (an assertion in its auto_functionalized pass) where torch's
# Adam compiles. A traced step that writes no grads calls this twin instead:
# the same schema without zero_grads, grads read only, the same kernel. Its
# schema is derived from the C++ one, so the two cannot drift apart.
def _read_grads_schema() -> str:
    schema = str(_ops.adam_step_.default._schema).split("::", 1)[1]
    twin = (schema.replace("adam_step_(", "adam_step_read_grads_(", 1)
            .replace("Tensor?(b!)[] grads", "Tensor?[] grads", 1)
            .replace(" bool zero_grads=False,", "", 1))
    if twin.count("zero_grads") or twin.count("(b!)") or twin == schema:
        raise RuntimeError(f"pygan_optim: unexpected adam_step_ schema {schema}")
    return twin


_lib = torch.library.Library("pygan_optim", "FRAGMENT")
_lib.define(_read_grads_schema())


def _adam_step_read_grads(*args, **kwargs):
    _ops.adam_step_(*args, zero_grads=False, **kwargs)


_lib.impl("adam_step_read_grads_", _adam_step_read_grads, "CompositeExplicitAutograd")


@torch.library.register_fake("pygan_optim::adam_step_read_grads_")
def _adam_step_read_grads_fake(*args, **kwargs):
    _adam_step_fake(*args, zero_grads=False, **kwargs)


@torch.library.register_fake("pygan_optim::scale_")
def _scale__fake(tensors, factor, factor_tensor, found_inf):
    _check_lists("pygan_optim.scale_", [("tensors", tensors)])
    _check_scalars("pygan_optim.scale_", [("tensors", tensors)],
                   dict(factor=factor_tensor, found_inf=found_inf), same_device={"found_inf"})
    _check_found_inf("pygan_optim.scale_", found_inf)
    _check_written("pygan_optim.scale_", [("tensors", tensors)])


@torch.library.register_fake("pygan_optim::scale")
def _scale_fake(inputs, factor, factor_tensor, found_inf):
    _check_lists("pygan_optim.scale", [("inputs", inputs)])
    _check_scalars("pygan_optim.scale", [("inputs", inputs)],
                   dict(factor=factor_tensor, found_inf=found_inf), same_device={"found_inf"})
    _check_found_inf("pygan_optim.scale", found_inf)
    # The kernel keeps a dense input's layout and makes any other contiguous.
    return [torch.empty_like(t) if is_non_overlapping_and_dense(t)
            else torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]


@torch.library.register_fake("pygan_optim::l2_norm")
def _l2_norm_fake(tensors, scale=1.0, scale_tensor=None, found_inf=None):
    _check_lists("pygan_optim.l2_norm", [("tensors", tensors)])
    if not tensors:
        raise RuntimeError("pygan_optim.l2_norm: expected a non-empty tensor list")
    _check_scalars("pygan_optim.l2_norm", [("tensors", tensors)],
                   dict(scale=scale_tensor, found_inf=found_inf), same_device={"found_inf"})
    _check_found_inf("pygan_optim.l2_norm", found_inf)
    device = tensors[0].device
    return (torch.empty((), dtype=torch.float32, device=device),
            torch.empty((len(tensors),), dtype=torch.float32, device=device))


# How far from 1 an EMA's two weights may add up (kEmaWeightSumSlack in ops.h).
_EMA_WEIGHT_SUM_SLACK = 1e-6


def _check_ema_new_weight(op: str, momentum: float, new_weight: float, momentum_name: str,
                          weight_name: str) -> None:
    """The kernels' check of an EMA's new-parameter weight (checks.cpp, ema_weights_of)."""
    if not 0.0 <= new_weight <= 1.0:
        raise ValueError(f"{op}: {weight_name} (the new parameters' weight) must be in [0, 1], "
                         f"not {new_weight}")
    if not abs(momentum + new_weight - 1.0) <= _EMA_WEIGHT_SUM_SLACK:
        raise ValueError(f"{op}: {momentum_name} (the old average's weight, {momentum}) and "
                         f"{weight_name} (the new parameters' weight, {new_weight}) must add "
                         f"up to 1; MMagic's momentum m is {momentum_name}=1-m, {weight_name}=m")


@torch.library.register_fake("pygan_optim::ema_")
def _ema__fake(ema, params, momentum, new_weight=None):
    op = "pygan_optim.ema_"
    if not ema and not params:
        return
    # The weights as the kernel checks them (ema_weights_of), so that a traced call
    # refuses what the real one would.
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must be in [0, 1], not {momentum}")
    if new_weight is not None:
        _check_ema_new_weight(op, momentum, new_weight, "momentum", "new_weight")
    _check_lists("pygan_optim.ema_", [("ema", ema), ("params", params)], shapes_of="ema")
    _check_written("pygan_optim.ema_", [("ema", ema)])
