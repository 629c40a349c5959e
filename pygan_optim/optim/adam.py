"""FusedAdam and FusedAdamW: torch.optim.Adam/AdamW with the whole step in one kernel call.

Drop-in replacements: same constructor arguments and defaults, param groups,
``state_dict`` layout (per parameter ``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``), so a checkpoint moves between torch's optimizer and
ours in both directions. Torch's GradScaler hands us ``grad_scale`` and
``found_inf`` (``_step_supports_amp_scaling``): unscaling and the skip on
inf/NaN happen inside the kernel, with no host synchronisation. The element
math is torch's fused CPU Adam's, in its order: on tensors of one layout the
results are bit-identical to ``torch.optim.Adam(fused=True)`` (NOTES.md).
"""
from __future__ import annotations

import operator
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from .. import _ext, ops
from ..sharded import ShardedAdamPlan, check_like, is_dtensor, local, sharded_mesh_dims
from .tracked_state import OptimizerState


class FusedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (or AdamW with ``decoupled_weight_decay=True``) whose step is
    one call of ``pygan_optim.ops.adam_step_`` per parameter group and device.

    It is a subclass of torch's Adam, so construction, argument checks and their
    error messages, ``state_dict``/``load_state_dict`` (including checkpoints of
    torch < 1.12, whose ``step`` is a Python number) and param-group defaults are
    torch's own. ``foreach``, ``fused`` and ``capturable`` are accepted and checked
    as torch checks them, and change nothing: the step never reads a value back to
    the host. Refused, with an error naming the option or tensor, before anything
    changes: ``differentiable=True``, complex and sparse tensors.
    """

    _step_supports_amp_scaling = True
    _default_decoupled = False
    _grad_mult: Optional[Tensor] = None  # set only inside step_options()
    _zero_grads: bool = False

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: Optional[bool] = None):
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True: "
                             "the fused kernel has no autograd formula")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._default_decoupled
        self._plans: Dict[int, Any] = {}
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)
        self.state = OptimizerState(self.state)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # torch's Adam fills in option keys an older dict lacks and turns
        # Python-number steps into tensors.
        super().__setstate__(state)
        for group in self.param_groups:
            if self._default_decoupled:
                group["decoupled_weight_decay"] = True  # as torch.optim.AdamW does
        self.state = OptimizerState(self.state)
        self._plans = {}

    def state_dict(self) -> Dict[str, Any]:
        state_dict = super().state_dict()
        # Plain dicts, exactly what torch.optim.Adam saves (entries that are not
        # a parameter's state, put there by hooks, stay as they are).
        state_dict["state"] = {k: dict(v) if isinstance(v, dict) else v
                               for k, v in state_dict["state"].items()}
        return state_dict

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._plans = {}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._traced_step()
            return loss
        # grad_scale and found_inf are set by torch.amp.GradScaler.step for
        # optimizers that unscale themselves; the others by step_options().
        extra = dict(grad_scale=getattr(self, "grad_scale", None),
                     found_inf=getattr(self, "found_inf", None),
                     grad_mult=self._grad_mult, zero_grads=self._zero_grads)
        if not isinstance(self.state, OptimizerState):
            # Replaced by the user (e.g. a reset to a fresh defaultdict(dict)).
            self.state = OptimizerState(self.state)
        for group in self.param_groups:
            if group["foreach"] and isinstance(group["lr"], Tensor) and not group["capturable"]:
                raise RuntimeError("lr as a Tensor is not supported for capturable=False "
                                   "and foreach=True")
        calls, fresh = [], []
        try:
            # Hyper-parameters changed after construction are checked by the op.
            for index, group in enumerate(self.param_groups):
                for plan in self._plans_for(index, group, fresh):
                    calls.append((index, group, plan))
            # Check every call before making any: a refused step changes nothing.
            # (The first call checks itself before it writes.)
            for index, group, plan in calls[1:]:
                self._run(index, group, plan, extra, validate_only=True)
            for index, group, plan in calls[:1]:
                self._run(index, group, plan, extra, validate_only=False)
        except Exception:
            # Refused before any update: undo the state this step created.
            for p in fresh:
                self.state.pop(p, None)
            raise
        for index, group, plan in calls[1:]:
            self._run(index, group, plan, extra, validate_only=False)
        return loss

    def _traced_step(self) -> None:
        """The step as torch.compile sees it: one registered op call per param
        group and device (their fake impls check structure at trace time), with
        the lists built by _init_group, which Dynamo runs outside the graph as it
        does for torch's own optimizers. The C++ plans are eager-only."""
        extra = dict(grad_scale=getattr(self, "grad_scale", None),
                     found_inf=getattr(self, "found_inf", None),
                     grad_mult=self._grad_mult, zero_grads=self._zero_grads)
        calls = []
        for group in self.param_groups:
            lists: List[List[Tensor]] = [[], [], [], [], [], []]
            self._init_group(group, *lists)
            for device in dict.fromkeys(p.device for p in lists[0]):
                keep = [i for i, p in enumerate(lists[0]) if p.device == device]
                calls.append((group, [[items[i] for i in keep] if items else items
                                      for items in lists]))
        # As in eager: every call is checked before the first one writes (the
        # first call checks itself).
        for group, lists in calls[1:]:
            self._call_op(group, lists, extra, validate_only=True)
        for group, lists in calls:
            self._call_op(group, lists, extra, validate_only=False)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    state_steps) -> bool:
        """Fills the lists with the group's parameters that have a grad and
        their state, created on first use (torch.optim.Adam's hook for Dynamo)."""
        amsgrad = group["amsgrad"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients, please consider "
                                   f"SparseAdam instead ({type(self).__name__}: a parameter "
                                   f"of shape {tuple(p.shape)})")
            if p.is_complex():
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters "
                                   f"(one of shape {tuple(p.shape)}, dtype {p.dtype})")
            state = self._init_state(p, amsgrad)
            if is_dtensor(p):
                where = f"DTensor parameter of shape {tuple(p.shape)}"
                sharded_mesh_dims(p)
                for name in ("grad", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad
                                                                 else ()):
                    check_like(name, p.grad if name == "grad" else state[name], p, where)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
        return False

    def _call_op(self, group, lists, extra, validate_only: bool) -> None:
        # DTensors (checked in _init_group) by their local shards, as in eager.
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = [
            [local(t) for t in ts] for ts in lists]
        beta1, beta2 = group["betas"]
        ops.adam_step_(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=group["lr"],
                       beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                       max_exp_avg_sqs=max_exp_avg_sqs, maximize=group["maximize"],
                       decoupled=group["decoupled_weight_decay"], validate_only=validate_only,
                       **extra)

    @contextmanager
    def step_options(self, *, grad_scale: Optional[Tensor] = None,
                     found_inf: Optional[Tensor] = None, grad_mult: Optional[Tensor] = None,
                     zero_grads: bool = False):
        """Options for the step() calls inside the block, for wrappers that fold
        their own work into the update pass: grads are divided by ``grad_scale``
        and multiplied by ``grad_mult`` (one-element tensors), nothing is updated
        while ``found_inf`` is non-zero, and ``zero_grads`` zeroes the grads in
        the same pass. Going through step() keeps schedulers' step counting intact."""
        self.grad_scale, self.found_inf = grad_scale, found_inf
        self._grad_mult, self._zero_grads = grad_mult, zero_grads
        try:
            yield self
        finally:
            del self.grad_scale, self.found_inf, self._grad_mult, self._zero_grads

    def _run(self, index: int, group: Dict[str, Any], plan: "_Plan", extra: Dict[str, Any],
             validate_only: bool) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        lr_tensor = lr if isinstance(lr, Tensor) else None
        if plan.device.type != "cpu":
            if lr_tensor is not None and lr_tensor.device.type != "cpu":
                lr_tensor = lr_tensor.to(plan.device, non_blocking=True)
            # One GradScaler tensor serves params on several GPUs; the op wants
            # scalars on its own device (or the CPU).
            extra = {k: v.to(plan.device, non_blocking=True) if isinstance(v, Tensor)
                     and v.device.type != "cpu" and v.device != plan.device else v
                     for k, v in extra.items()}
        try:
            plan.handle.step(
                lr=0.0 if lr_tensor is not None else float(lr), lr_tensor=lr_tensor,
                beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), amsgrad=plan.amsgrad,
                maximize=group["maximize"], decoupled=group["decoupled_weight_decay"],
                validate_only=validate_only, **extra)
        except RuntimeError as error:
            self._explain(index, group, error)
            raise

    def _explain(self, index: int, group: Dict[str, Any], error: Exception) -> None:
        """Turns a refused op call into a message naming the parameter by its
        place in the param groups."""
        for k, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            where = f"parameter {k} of param group {index} (shape {tuple(p.shape)})"
            if g.is_sparse:  # torch's Adam and AdamW message, and which parameter
                raise RuntimeError("Adam does not support sparse gradients, please consider "
                                   f"SparseAdam instead ({type(self).__name__}: {where})"
                                   ) from error
            if g.device != p.device:
                raise RuntimeError(f"grad of {where} is on {g.device} but the parameter is on "
                                   f"{p.device}") from error
            if g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(f"grad of {where} has dtype {g.dtype} and shape "
                                   f"{tuple(g.shape)}, expected {p.dtype} and {tuple(p.shape)}"
                                   ) from error
            if p.dtype not in _SUPPORTED:
                raise RuntimeError(f"{where} has dtype {p.dtype}; supported are "
                                   f"{_SUPPORTED_NAMES}") from error

    def _plans_for(self, index: int, group: Dict[str, Any], fresh: List[Tensor]) -> List["_Plan"]:
        """The group's tensors as flat lists per device, built once and reused:
        with thousands of parameters, rebuilding them each step would cost more
        than the update. Rebuilt when the state is edited (see tracked_state),
        the group's parameters change, or a parameter without state gets its
        first grad. Parameters whose state is created here go into `fresh`."""
        cached = self._plans.get(index)
        if cached is not None:
            state, version, params, amsgrad, built, pending = cached
            if (state is self.state and version == self.state.version
                    and amsgrad == group["amsgrad"] and len(params) == len(group["params"])
                    and all(map(operator.is_, params, group["params"]))
                    and not any(p.grad is not None for p in pending)):
                return built
        # DTensors (FSDP2) apart: their local shards go to the op through a
        # ShardedAdamPlan, the other tensors through the C++ plan.
        by_device: Dict[Any, List[Tensor]] = defaultdict(list)
        pending = []
        for p in group["params"]:
            if p.grad is None and not self.state.get(p):
                pending.append(p)  # no state until its first grad, as in torch
            else:
                by_device[p.device, is_dtensor(p)].append(p)
        fresh.extend(p for params in by_device.values() for p in params if not self.state.get(p))
        built = [self._build_plan(params, group["amsgrad"], sharded)
                 for (_, sharded), params in by_device.items()]
        self._plans[index] = (self.state, self.state.version, list(group["params"]),
                              group["amsgrad"], built, pending)
        return built

    def _build_plan(self, params: List[Tensor], amsgrad: bool, sharded: bool) -> "_Plan":
        states = [self._init_state(p, amsgrad) for p in params]
        plan_type = ShardedAdamPlan if sharded else _ext.AdamPlan
        handle = plan_type(params, [s["exp_avg"] for s in states],
                           [s["exp_avg_sq"] for s in states],
                           [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                           [s["step"] for s in states])
        return _Plan(handle, amsgrad, params[0].device)

    def _init_state(self, p: Tensor, amsgrad: bool) -> Dict[str, Tensor]:
        state = self.state[p]
        if len(state) == 0:
            # The step counter lives on the parameter's device so the kernel reads it there.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not isinstance(state["step"], Tensor):
            # Set as a Python number after loading (torch < 1.12 saved steps so).
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32,
                                         device=p.device)
        elif state["step"].device != p.device or not state["step"].is_floating_point():
            # A state dict from torch's for-loop Adam keeps the step on the CPU.
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


class _Plan:
    """The tensors of one param group on one device, held in C++ (_C.AdamPlan)."""

    __slots__ = ("handle", "amsgrad", "device")

    def __init__(self, handle, amsgrad: bool, device: torch.device):
        self.handle, self.amsgrad, self.device = handle, amsgrad, device


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay) with ``torch.optim.AdamW``'s arguments and defaults."""

    _default_decoupled = True

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)


_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_SUPPORTED_NAMES = "float32, float64, bfloat16, float16"
