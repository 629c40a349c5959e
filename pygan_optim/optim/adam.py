"""FusedAdam and FusedAdamW: torch.optim.Adam/AdamW with the whole step in one kernel call.

Drop-in replacements: same constructor arguments and defaults, param groups,
``state_dict`` layout (per parameter ``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``), so a checkpoint moves between torch's optimizer and
ours in both directions. Torch's GradScaler hands us ``grad_scale`` and
``found_inf`` (``_step_supports_amp_scaling``): unscaling and the skip on
inf/NaN happen inside the kernel, with no host synchronisation. The element
math is torch's fused CPU Adam's, in its order: on tensors of one layout the
results are bit-identical to ``torch.optim.Adam(fused=True)`` (NOTES.md), except
with beta1 == 0 where the stored exp_avg is not finite (torch: NaN, ours: the
grad) and in the sign of a zero exp_avg (torch's lerp can turn -0.0 into 0.0).
"""
from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .. import _ext, ops
from ..sharded import ShardedAdamPlan, check_like, is_dtensor, local, sharded_mesh_dims
from . import state_arena
from .ctrl_c import ctrl_c_held
from .ema_blend import EmaBlend
from .group_errors import (SUPPORTED_DTYPE_NAMES, SUPPORTED_DTYPES, TENSOR_LR_REFUSED,
                           check_unshared, in_group_terms, place, tensor_lr_refused)
from .group_plan import GroupPlan, same_objects
from .kept_grads import (KEEP_GRAD_MIN_BYTES_CPU, KEEP_GRAD_MIN_NUMEL, check_min_bytes,
                         grad_refcount, keepable, state_refcount, unshared_refcounts)
from .step_protocol import (capture_active, counts_scheduler_steps, has_own_zero_grad,
                            innermost, step_lock)
from .tracked_state import OptimizerState


class FusedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (or AdamW with ``decoupled_weight_decay=True``) whose step is
    one call of ``pygan_optim.ops.adam_step_`` per parameter group and device.

    It is a subclass of torch's Adam, so construction, argument checks and their
    error messages, ``state_dict``/``load_state_dict`` (including checkpoints of
    torch < 1.12, whose ``step`` is a Python number) and param-group defaults are
    torch's own. ``foreach`` and ``fused`` are accepted and checked as torch
    checks them, and change nothing. Refused, with an error naming the option or
    tensor, before anything changes: ``differentiable=True``, complex and sparse
    tensors.

    The step never reads a value back to the host: lr (as a tensor), the steps,
    ``grad_scale``, ``found_inf`` and ``grad_mult`` are read by the kernel on the
    device, so a step can be captured in a CUDA graph (``torch.cuda.graph``) and
    replayed. As with torch, warm up first (steps outside the capture create the
    state and put the tensor tables on the device), keep grads at fixed
    addresses (``zero_grad(set_to_none=False)``) and give lr as a tensor on the
    parameters' device to change it between replays. What a captured step uses
    on the device is kept for the optimizer's lifetime.

    ``step_and_zero_grad()`` is ``step()`` then ``zero_grad()`` in one call (what
    MMEngine's ``update_params`` does; pygan_optim's wrappers call it). With
    ``beta1 == 0`` (the GAN setting) and a plain step (no AMP scale, clip
    multiplier, L2 weight decay or ``maximize``), torch's new ``exp_avg`` is a
    copy of the grad, and the grad is released right after: so the ``exp_avg``
    tensor (the state's own object) takes the grad's memory. Nothing is written
    for ``exp_avg`` (20 instead of 24 bytes per fp32 parameter) and its old
    memory is freed during the update (on the CPU by one thread while the
    others run the loops), so memory stays what torch's path holds. On the CPU
    the same holds for an update whose effective grad differs (the wrappers'
    AMP unscale and clip, ``step_options``, L2 weight decay, ``maximize``): the
    effective grad is written over the grad in the pass (24 bytes per parameter,
    as the copy), and the frees beside the loops replace those of the grads
    after it; not for a step that AMP skips (``found_inf`` set), which keeps the
    old ``exp_avg``. As the grad
    is released in the same call, nothing can reach the tensor as a grad
    afterwards: ``state_dict()`` shows torch's values at every point. (One
    visible difference: a Python object of the old storage,
    ``exp_avg.untyped_storage()`` kept by the caller, keeps the old values.)
    It falls back to the copy for a grad
    that something else holds (a user's variable, another parameter's
    ``.grad``, an autograd graph that saved it, a view such as DDP's
    ``gradient_as_bucket_view`` or FSDP1's), a grad that needs its own tensor
    (one with ``requires_grad`` from ``backward(create_graph=True)``, one whose
    storage is larger than itself, an inference tensor), an old ``exp_avg``
    held elsewhere (a kept ``state_dict()``: written in place, as torch does),
    optimizers with step post-hooks (they see the grads before the release) or
    a ``step`` or ``zero_grad`` of their own (a subclass's override, a wrapper
    set on the instance other than torch's and MMEngine's schedulers' step
    counters: their code may use the grads),
    DTensors, tensors under 32768 elements (not worth the bookkeeping), CPU
    tensors under ``optimizer.keep_grad_min_bytes_cpu`` (32 MiB: keeping a grad
    frees the older of two blocks, which fragments glibc's heaps, see
    ``KEEP_GRAD_MIN_BYTES_CPU``; lower it where the allocator copes, and measure
    the RSS), memory that is not the device allocator's own (a grad from numpy,
    a state in shared memory after ``share_memory_()``, pinned memory) or a grad
    whose ``untyped_storage()`` object exists, torch.compile'd steps,
    ``capturable=True`` and optimizers whose step was ever captured in a CUDA
    graph. A plain ``step()`` always copies: the grad stays the caller's.
    ``optimizer.grad_as_exp_avg = False`` always copies.

    ``step(ema=EmaBlend(pairs, momentum))`` also moves EMA copies toward the new
    parameter values in the same pass (8 more bytes per fp32 parameter instead
    of a separate 12-byte EMA pass); see ``EmaBlend``. Pairs it cannot blend
    there (averages on another device or of another layout, DTensors,
    torch.compile'd steps, every pair when the optimizer has step post-hooks or
    when, in a step of several param groups or devices, an average shares memory
    with another average or a tensor of the step) stay in ``blend.pending()`` for
    the caller.

    The state FusedAdam creates for small contiguous parameters (under 32768
    elements) is packed: views of one buffer per kind, device and dtype (see
    ``pygan_optim.optim.state_arena``), which keeps a step over thousands of
    them from waiting on scattered memory. ``state_dict()`` and checkpoints
    are torch's; one such tensor saved on its own carries its whole buffer
    (``clone()`` it first).
    """

    _step_supports_amp_scaling = True
    _default_decoupled = False
    _grad_mult: Optional[Tensor] = None  # set only inside step_options()
    _zero_grads: bool = False
    _zeros_after_hooks: bool = False  # see _zeros_in_pass
    _release_grads: bool = False  # step_and_zero_grad(): grads released after the update
    grad_as_exp_avg: bool = True  # see the class docstring
    keep_grad_min_bytes_cpu: int = KEEP_GRAD_MIN_BYTES_CPU  # see the class docstring

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: Optional[bool] = False):
        # torch.optim.Adam's default (False), so the signatures agree; None (accepted,
        # as torch accepts it) means the class's own: AdamW's True for FusedAdamW.
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True: "
                             "the fused kernel has no autograd formula")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._default_decoupled
        self._plans: Dict[int, Any] = {}
        self._captured_plans: Dict[int, Any] = {}  # see _hold_if_captured
        # FusedAdamW's MRO puts torch's AdamW next, whose __init__ takes no
        # decoupled_weight_decay (it passes True on to Adam's itself).
        decoupled = ({} if isinstance(self, torch.optim.AdamW)
                     else dict(decoupled_weight_decay=decoupled_weight_decay))
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused, **decoupled)
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
        self._captured_plans = {}

    def state_dict(self) -> Dict[str, Any]:
        state_dict = super().state_dict()
        # Plain dicts, exactly what torch.optim.Adam saves (entries that are not
        # a parameter's state, put there by hooks, stay as they are; so does a
        # layout of a post-hook's own).
        state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if isinstance(state, dict):
            state_dict["state"] = {k: dict(v) if isinstance(v, dict) else v
                                   for k, v in state.items()}
        return state_dict

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._plans = {}

    def step_and_zero_grad(self, closure: Optional[Callable[[], float]] = None, *,
                           set_to_none: bool = True, ema: Optional[EmaBlend] = None):
        """``step(closure, ema=ema)`` then ``zero_grad(set_to_none)``, in fewer
        bytes: with ``set_to_none`` (torch's default) grads released right after
        the update may be kept as exp_avg (see the class docstring); without, the
        zeros are written in the update pass (after it, as zero_grad writes them,
        when the step makes more than one pass: several param groups or devices).
        A refused step releases nothing."""
        if not set_to_none and has_own_zero_grad(self):
            # A zero_grad of its own (a subclass's or the instance's): call it, as
            # step() then zero_grad() would.
            loss = self.step(closure, ema=ema)
            self.zero_grad(set_to_none=False)
            return loss
        options = dict(release_grads=True) if set_to_none else dict(zero_grads=True)
        with self.step_options(**options):
            loss = self.step(closure, ema=ema)
        return loss

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, *,
             ema: Optional[EmaBlend] = None):
        if ema is not None and not isinstance(ema, EmaBlend):
            raise TypeError(f"{type(self).__name__}.step: ema must be a pygan_optim.EmaBlend, "
                            f"not {type(ema).__name__}")
        if ema is not None and capture_active():
            # A replay would blend again while the EMA's own bookkeeping stays put.
            raise RuntimeError(f"{type(self).__name__}.step(ema=...) inside a CUDA graph "
                               "capture: replays could not keep the EMA's step count; blend "
                               "outside the graph (ops.ema_ after the replay)")
        for index, group in enumerate(self.param_groups):
            if group.get("differentiable"):  # refused at construction; may come back later
                raise RuntimeError(f"{type(self).__name__} does not support differentiable=True "
                                   f"(param group {index}, set after construction or by "
                                   "load_state_dict): the fused kernel has no autograd formula")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._traced_step()  # an EmaBlend's pairs stay pending
            return loss
        with step_lock(self):
            self._eager_step(ema)
        return loss

    def _eager_step(self, ema: Optional[EmaBlend]) -> None:
        extra = self._step_extra()
        if not isinstance(self.state, OptimizerState):
            # Replaced by the user (e.g. a reset to a fresh defaultdict(dict)).
            self.state = OptimizerState(self.state, given=True)
        given = self.state.adopt_given()  # dicts the user stored (tracked_state)
        for group in self.param_groups:
            if tensor_lr_refused(group):
                raise RuntimeError(TENSOR_LR_REFUSED)
        capturing = capture_active()
        post_hooks = self._has_step_post_hooks()
        # Only a step whose grads are released right after it may keep them; step
        # post-hooks run in between, and must see grads that are only grads. A
        # captured graph replays on the state's addresses: they must stay.
        # A zero_grad of the caller's own runs on the grads when step_options
        # releases them: they must still be grads then, not the state's exp_avgs;
        # so does code of a step wrapped on the instance, after this step.
        may_keep = (self._release_grads and not capturing and not post_hooks
                    and not self._captured_plans and not has_own_zero_grad(self)
                    and not _step_wrapped(self))
        if may_keep:
            check_min_bytes(self.keep_grad_min_bytes_cpu, type(self).__name__)
        blended: List[Tensor] = []  # params whose EMA the calls blended
        calls, fresh, edits = [], [], []
        if ema is not None:
            ema.claim(self)
        # Post-hooks may still change the parameters (weight clipping): the EMA
        # must take their final values, so every pair stays pending.
        blend = None if post_hooks else ema
        try:
            # Hyper-parameters changed after construction are checked by the op.
            for index, group in enumerate(self.param_groups):
                for plan in self._plans_for(index, group, fresh, edits):
                    calls.append((index, group, plan))
            if blend is not None and len(calls) > 1 and self._emas_share_memory(blend, calls):
                blend = None  # every pair stays pending: the caller blends after the step
            if extra["zero_grads"] and len(calls) > 1:
                # Zeros written in one call's pass could reach a later call that
                # reads the same grad memory (a grad given to parameters of two
                # groups, a parameter in two groups; finding out would cost a
                # look at every grad in Python): with several calls step_options
                # zeroes after the whole step instead, as torch's zero_grad does.
                extra = dict(extra, zero_grads=False)
                self._zeros_after_hooks = True
            # Check every call before making any: a refused step changes nothing.
            # (The first call checks itself before it writes.)
            for index, group, plan in calls[1:]:
                self._run(index, group, plan, extra, validate_only=True, ema=blend)
        except BaseException:  # a refusal, or a Ctrl-C: nothing is updated yet
            self._undo_refused(edits, fresh, given, ema)
            raise
        # A Ctrl-C from the first update on waits for the step's end (see ctrl_c).
        with ctrl_c_held():
            try:
                for index, group, plan in calls[:1]:
                    self._run(index, group, plan, extra, validate_only=False,
                              may_keep=may_keep, ema=blend, blended=blended)
            except Exception:
                self._undo_refused(edits, fresh, given, ema)
                raise
            for index, group, plan in calls[1:]:
                self._run(index, group, plan, extra, validate_only=False,
                          may_keep=may_keep, ema=blend, blended=blended)
            if blended:
                # After all calls: parameters may share a version counter (views of
                # one buffer) across groups, so versions are read once all are done.
                ema.mark_done(blended)
            self.state.mirror_given(given)

    def _emas_share_memory(self, blend: EmaBlend, calls: list) -> bool:
        """Whether an average blended in one call's pass shares memory with
        another average or with a tensor of the step (each call checks only its
        own): a later call would read or update what an earlier pass blended,
        unlike blending after the step. Several calls only (param groups,
        devices), so the common one-group step pays nothing."""
        averages, others = [], []
        for _, _, plan in calls:
            for p in plan.params:
                average = None if plan.sharded else blend.average_for(p)
                if average is not None:
                    averages.append(average)
                others.append(p)
                if p.grad is not None:
                    others.append(p.grad)
                others.extend(v for v in (self.state.get(p) or {}).values()
                              if isinstance(v, Tensor))
        return bool(averages) and _ext.written_shares_memory(averages, others)

    def _undo_refused(self, edits: list, fresh: List[Tuple[Tensor, bool]], given: list,
                      ema: Optional[EmaBlend]) -> None:
        """A step refused (or interrupted) before any update: undoes the state it
        created or edited, and gives back the EMA blend it claimed."""
        for state, key, before in reversed(edits):
            if before is _ABSENT:
                state.pop(key, None)
            else:
                state[key] = before
        for p, had_entry in fresh:
            if had_entry:
                self.state[p].clear()
            else:
                self.state.pop(p, None)
        self.state.restore_given(given)
        if ema is not None:
            ema.unclaim(self)

    def _step_extra(self) -> Dict[str, Any]:
        """The step's options: grad_scale and found_inf as torch.amp.GradScaler.step
        sets them for optimizers that unscale themselves (or step_options), the
        others from step_options."""
        return dict(grad_scale=getattr(self, "grad_scale", None),
                    found_inf=self._found_inf(), grad_mult=self._grad_mult,
                    zero_grads=self._zeros_in_pass())

    def _found_inf(self) -> Optional[Tensor]:
        """GradScaler.step hands over the sum of its unscale_'s per-device flags:
        the int 0 when that unscale_ found no grad (step_options takes tensors
        only). Then no parameter may have one now: torch's fused Adam steps
        nothing."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None or isinstance(found_inf, Tensor):
            return found_inf
        if type(found_inf) is not int or found_inf != 0:
            raise TypeError(f"{type(self).__name__}.step: found_inf must be a float32 tensor, "
                            f"None, or GradScaler's int 0 (no grads unscaled), not "
                            f"{found_inf!r}")
        self._refuse_grads_made_after_unscale()
        return None

    def _refuse_grads_made_after_unscale(self) -> None:
        """After an unscale_ that found no grad, a grad made since is still
        scaled: updating with it would be silently wrong."""
        for index, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    raise RuntimeError(
                        f"{type(self).__name__}.step: GradScaler found no grads to unscale "
                        f"(found_inf is the int 0), but param group {index}'s params[{i}] "
                        "has one now: a backward after scaler.unscale_(optimizer) leaves it "
                        "scaled; call unscale_ after the backward")

    def _has_step_post_hooks(self) -> bool:
        return bool(self._optimizer_step_post_hooks) or bool(_global_optimizer_post_hooks)

    def _zeros_in_pass(self) -> bool:
        """Whether this step writes step_options' zeros in its update pass. Step
        post-hooks run between step() and zero_grad(), and must see the grads:
        with them, step_options zeroes after the step instead."""
        if not self._zero_grads:
            return False
        if self._has_step_post_hooks():
            self._zeros_after_hooks = True
            return False
        return True

    def _has_step_pre_hooks(self) -> bool:
        return bool(self._optimizer_step_pre_hooks) or bool(_global_optimizer_pre_hooks)

    def _keeps_grads(self, group: Dict[str, Any], extra: Dict[str, Any],
                     device: torch.device) -> bool:
        """Whether this step of `group` on `device` (a step that releases its
        grads) may keep grads as exp_avg: beta1 == 0, no zeros written, and on
        other devices than the CPU an effective grad that is the raw one (ops.h,
        grad_as_exp_avg; the op decides for each parameter)."""
        raw = (not group["maximize"]
               and (group["decoupled_weight_decay"] or group["weight_decay"] == 0)
               and all(extra[k] is None for k in ("grad_scale", "found_inf", "grad_mult")))
        return (self.grad_as_exp_avg and not group["capturable"] and group["betas"][0] == 0
                and not extra["zero_grads"] and (raw or device.type == "cpu"))

    def _hold_if_captured(self, plan: "GroupPlan") -> None:
        """A captured graph keeps the device addresses of the plan's tables:
        the plan (which holds them) lives as long as the optimizer, even when
        an edit of the state or the param groups replaces it."""
        if capture_active():
            self._captured_plans.setdefault(id(plan.handle), plan.handle)

    def _keep_candidates(self, plan: "GroupPlan") -> List[int]:
        """The plan's parameters whose grad may become exp_avg this step; the
        C++ side refuses those whose tensors share storage (ops.h)."""
        unshared_grad, held_grad, unshared_exp_avg, held_exp_avg = unshared_refcounts()
        min_bytes = self.keep_grad_min_bytes_cpu if plan.device.type == "cpu" else 0
        out = []
        for i, p, state in plan.big:
            if p.numel() * p.element_size() < min_bytes:
                continue
            # A grad held elsewhere (a user's list, another parameter's .grad, an
            # autograd graph) stays that holder's grad, untouched.
            if (grad_refcount(p) > unshared_grad or _ext.grad_use_count(p) > held_grad
                    or not keepable(p.grad)):
                continue
            # A reference to the old exp_avg held elsewhere (a kept state_dict, a
            # user's variable, a tensor's .grad) must see the new values, as with
            # torch: write them into it.
            if (state_refcount(state) <= unshared_exp_avg
                    and _ext.use_count(dict.get(state, "exp_avg")) <= held_exp_avg):
                out.append(i)
        return out

    def _traced_step(self) -> None:
        """The step as torch.compile sees it: one registered op call per param
        group and device (their fake impls check structure at trace time), with
        the lists built by _init_group, which Dynamo runs outside the graph as it
        does for torch's own optimizers. The C++ plans are eager-only."""
        extra = self._step_extra()
        calls, grad_views = [], False
        for group in self.param_groups:
            lists: List[List[Tensor]] = [[], [], [], [], [], []]
            grad_views |= self._init_group(group, *lists)
            for device in dict.fromkeys(p.device for p in lists[0]):
                keep = [i for i, p in enumerate(lists[0]) if p.device == device]
                calls.append((group, [[items[i] for i in keep] if items else items
                                      for items in lists]))
        # As in eager, several calls zero the grads after all of them (one call's
        # zeros could reach a later call reading the same grad memory); here in
        # the trace, which step_options' flag for that would not outlive. So do
        # grads that are views (of DDP's buckets, say): Inductor fails to compile
        # the op's write into them (see ops._adam_step_read_grads), not torch's
        # zero op. The checking calls take the same options (as in eager).
        zero_after = extra["zero_grads"] and (len(calls) > 1 or grad_views)
        if zero_after:
            extra = dict(extra, zero_grads=False)
        # As in eager: every call is checked before the first one writes (the
        # first call checks itself).
        for group, lists in calls[1:]:
            self._call_op(group, lists, extra, validate_only=True)
        for group, lists in calls:
            self._call_op(group, lists, extra, validate_only=False)
        if zero_after:
            torch._foreach_zero_([local(g) for _, lists in calls for g in lists[1]])

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    state_steps) -> bool:
        """Fills the lists with the group's parameters that have a grad and
        their state, created on first use (torch.optim.Adam's hook for Dynamo).
        Returns whether a grad is a view (for _traced_step)."""
        if tensor_lr_refused(group):
            # Checked here, on the real group: in the traced code Dynamo shows every
            # group with capturable=True (as torch's Adam checks it in _init_group).
            raise RuntimeError(TENSOR_LR_REFUSED)
        amsgrad = group["amsgrad"]
        grad_views = False
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
            grad_views = grad_views or local(p.grad)._is_view()
        return grad_views

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
                     zero_grads: bool = False, release_grads: bool = False):
        """Options for the step() calls inside the block, for wrappers that fold
        their own work into the update pass: grads are divided by ``grad_scale``
        and multiplied by ``grad_mult`` (one-element tensors), nothing is updated
        while ``found_inf`` is non-zero, ``zero_grads`` zeroes the grads in the
        same pass (after the step when there are step post-hooks, which must see
        them), and ``release_grads`` sets them to None when the block ends
        without an error (see step_and_zero_grad; with it a step may keep grads
        as exp_avg, so nothing may use the grads between that step and the
        block's end). Going through step() keeps schedulers' step counting
        intact."""
        if zero_grads and release_grads:
            raise ValueError("step_options: zero_grads and release_grads exclude each other")
        for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf),
                            ("grad_mult", grad_mult)):
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"step_options: {name} must be a one-element tensor or None, "
                                f"not {value!r}")
        # The options live on the instance: another thread's step must not run
        # with them, nor another block replace them (see step_lock).
        with nullcontext() if torch.compiler.is_compiling() else step_lock(self):
            # grad_scale and found_inf are GradScaler's attributes too: set only when
            # given, so that a scaler.step() inside the block composes with them (it
            # multiplies an existing grad_scale, and deletes both after its step).
            amp_names = ("grad_scale", "found_inf")
            # A block inside another one (same thread: the lock is re-entrant) runs
            # with its own options and gives the enclosing block's back when it ends;
            # a grad_mult it is not given stays the enclosing block's, as grad_scale.
            option_names = ("_grad_mult", "_zero_grads", "_release_grads", "_zeros_after_hooks")
            before = {name: self.__dict__[name] for name in amp_names + option_names
                      if name in self.__dict__}
            for name, value in zip(amp_names, (grad_scale, found_inf)):
                if value is not None:
                    setattr(self, name, value)
            if grad_mult is not None:
                self._grad_mult = grad_mult
            self._zero_grads = zero_grads
            self._release_grads, self._zeros_after_hooks = release_grads, False
            hooks_at_start = self._has_step_post_hooks()
            try:
                yield self
                # After the step and its post-hooks, before anything else. (A compiled
                # step's flag is lost with the trace: the hooks are looked at again;
                # zeroing grads the pass zeroed already changes nothing.)
                if release_grads:
                    self.zero_grad(set_to_none=True)
                elif zero_grads and (self._zeros_after_hooks or hooks_at_start
                                     or self._has_step_post_hooks()):
                    self.zero_grad(set_to_none=False)
            except BaseException:
                if release_grads:
                    self._release_kept_grads()
                raise
            finally:
                for name in amp_names + option_names:
                    self.__dict__.pop(name, None)
                self.__dict__.update(before)

    def _release_kept_grads(self) -> None:
        """Releases the grads that a step kept as exp_avg when the block that
        was to release them ends by an exception instead: a Ctrl-C during the
        step (which holds the GIL) is raised as soon as it returns. Their memory
        is the state's now, so a grad left in place would write exp_avg when it
        is zeroed or accumulated into. The other grads stay, as torch's step
        then zero_grad would leave them; a refused step kept none."""
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                # A kept grad is a plain strided tensor; any other (a sparse grad the
                # step refused) has no data pointer to ask, and asking would hide
                # the step's own error behind torch's.
                if (g is None or g.numel() == 0 or is_dtensor(p)
                        or g.layout != torch.strided):
                    continue
                state = self.state.get(p)
                m = state.get("exp_avg") if isinstance(state, dict) else None
                if (isinstance(m, Tensor) and m.layout == torch.strided
                        and m.device == g.device and m.data_ptr() == g.data_ptr()):
                    p.grad = None

    def _run(self, index: int, group: Dict[str, Any], plan: "GroupPlan", extra: Dict[str, Any],
             validate_only: bool, may_keep: bool = False,
             ema: Optional[EmaBlend] = None, blended: Optional[List[Tensor]] = None) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        lr_tensor = lr if isinstance(lr, Tensor) else None
        # (Before anything that compares them: a str such as "0" is refused.)
        where = f"{type(self).__name__}: param group {index}"
        beta1, beta2, eps, weight_decay = (ops.real_number(value, key, where) for key, value in (
            ("beta1", beta1), ("beta2", beta2), ("eps", group["eps"]),
            ("weight_decay", group["weight_decay"])))
        lr_number = 0.0 if lr_tensor is not None else ops.real_number(lr, "lr", where)
        if plan.device.type != "cpu":
            if lr_tensor is not None and lr_tensor.device.type != "cpu":
                lr_tensor = lr_tensor.to(plan.device, non_blocking=True)
            # One GradScaler tensor serves params on several GPUs; the op wants
            # scalars on its own device (or the CPU).
            extra = {k: v.to(plan.device, non_blocking=True) if isinstance(v, Tensor)
                     and v.device.type != "cpu" and v.device != plan.device else v
                     for k, v in extra.items()}
        candidates = (self._keep_candidates(plan) if may_keep and plan.big
                      and self._keeps_grads(group, extra, plan.device) else [])
        if candidates:
            extra = dict(extra, keep_grads=candidates)
        # The EMAs this plan's update pass blends (DTensor plans leave theirs pending).
        emas = []
        if ema is not None and not plan.sharded:
            emas = [ema.average_for(p) for p in plan.params]
            if any(e is not None for e in emas):
                extra = dict(extra, emas=emas, ema_momentum=ema.momentum,
                             ema_new_weight=ema.new_weight)
            else:
                emas = []
        try:
            plan.handle.step(
                lr=lr_number, lr_tensor=lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, amsgrad=plan.amsgrad,
                maximize=group["maximize"], decoupled=group["decoupled_weight_decay"],
                validate_only=validate_only, **extra)
        except ValueError as error:
            # A hyper-parameter out of range: torch checks them at construction
            # only, so it was written later (by hand, a scheduler or a load).
            later = (" (set after construction: by a scheduler, by hand or by "
                     "load_state_dict)" if _HYPER_PARAMETER_REFUSED.search(str(error)) else "")
            raise ValueError(f"{where}: {error}{later}") from error
        except RuntimeError as error:
            self._explain(index, group, error)
            renamed = in_group_terms(error, index, group, plan.params)
            if renamed is None:
                raise
            raise renamed from error
        if not validate_only:
            self._hold_if_captured(plan)
            if emas:
                blended.extend(p for p, e in zip(plan.params, emas) if e is not None)

    def _explain(self, index: int, group: Dict[str, Any], error: Exception) -> None:
        """Turns a refused op call into a message naming the parameter by its
        place in the param groups."""
        for k, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            where = place(k, index, p)
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
            if p.dtype not in SUPPORTED_DTYPES:
                raise RuntimeError(f"{where} has dtype {p.dtype}; supported are "
                                   f"{SUPPORTED_DTYPE_NAMES}") from error

    def _plans_for(self, index: int, group: Dict[str, Any], fresh: List[Tuple[Tensor, bool]],
                   edits: list) -> List["GroupPlan"]:
        """The group's tensors as flat lists per device, built once and reused:
        with thousands of parameters, rebuilding them each step would cost more
        than the update. Rebuilt when the state is edited (see tracked_state),
        the group's parameters change, or a parameter without state gets its
        first grad. Parameters whose state is created here go into `fresh` (with
        whether an empty entry was there before),
        changes to existing states into `edits` (see _init_state)."""
        cached = self._plans.get(index)
        if cached is not None:
            state, version, params, amsgrad, built, pending = cached
            if (state is self.state and version == self.state.version
                    and amsgrad == group["amsgrad"] and same_objects(params, group["params"])
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
        # (An empty entry that exists, from a read of opt.state[p] or a user's {},
        # stays on a refusal, emptied again.)
        fresh.extend((p, dict.__contains__(self.state, p))
                     for params in by_device.values() for p in params if not self.state.get(p))
        built = [self._build_plan(index, group, params, sharded, edits)
                 for (_, sharded), params in by_device.items()]
        self._plans[index] = (self.state, self.state.version, list(group["params"]),
                              group["amsgrad"], built, pending)
        return built

    def _build_plan(self, index: int, group: Dict[str, Any], params: List[Tensor],
                    sharded: bool, edits: list) -> "GroupPlan":
        amsgrad = group["amsgrad"]
        if not sharded:
            self._pack_new_state(params, amsgrad)
        states = [self._init_state(p, amsgrad, edits) for p in params]
        check_unshared(index, group, params, states)
        plan_type = ShardedAdamPlan if sharded else _ext.AdamPlan
        try:  # (the C++ plan refuses state tensors that share memory)
            handle = plan_type(params, [s["exp_avg"] for s in states],
                               [s["exp_avg_sq"] for s in states],
                               [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                               [s["step"] for s in states])
        except RuntimeError as error:
            renamed = in_group_terms(error, index, group, params)
            if renamed is None:
                raise
            raise renamed from error
        big = [] if sharded else [(i, p, s) for i, (p, s) in enumerate(zip(params, states))
                                  if p.numel() >= KEEP_GRAD_MIN_NUMEL]
        return GroupPlan(handle, amsgrad, params[0].device, big, params, sharded)

    def _pack_new_state(self, params: List[Tensor], amsgrad: bool) -> None:
        """Creates the missing state of small dense parameters in shared
        buffers (see state_arena); _init_state creates the others'."""
        new = [p for p in params if not self.state.get(p)
               and state_arena.packable(p, KEEP_GRAD_MIN_NUMEL)]
        if not new:
            return
        kinds = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        packed = {kind: state_arena.zeros_like_each(new) for kind in kinds}
        steps = state_arena.scalar_zeros([p.device for p in new])
        for i, p in enumerate(new):
            self.state[p].update(step=steps[i], **{kind: packed[kind][i] for kind in kinds})

    def _init_state(self, p: Tensor, amsgrad: bool,
                    edits: Optional[list] = None) -> Dict[str, Tensor]:
        """The state of `p`, created or completed. Changes to a state that
        existed are appended to `edits` as (state, key, value before or _ABSENT),
        for a refused step to undo."""
        state = self.state[p]
        existed = len(state) > 0

        def put(key, value):
            if existed and edits is not None:
                edits.append((state, key, state.get(key, _ABSENT)))
            state[key] = value

        if not existed:
            # The step counter lives on the parameter's device so the kernel reads it there.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not isinstance(state["step"], Tensor):
            # Set as a Python number after loading (torch < 1.12 saved steps so).
            put("step", torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device))
        elif (state["step"].device != p.device
              or state["step"].dtype not in (torch.float32, torch.float64)):
            # A state dict from torch's for-loop Adam keeps the step on the CPU; one
            # may hold it as an integer or a half (torch's fused Adam loads both as
            # float32 too).
            put("step", state["step"].to(device=p.device, dtype=torch.float32))
        if amsgrad and "max_exp_avg_sq" not in state:
            # (torch's Adam raises a KeyError when amsgrad is switched on later)
            put("max_exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
        return state



def _step_wrapped(optimizer) -> bool:
    """Whether ``optimizer.step`` runs code of its own around FusedAdam's (a
    subclass's override, or a wrapper set on the instance other than torch's
    and MMEngine's schedulers' step counters, which only count): that code may
    use the grads after the step."""
    if innermost(type(optimizer).step) is not innermost(FusedAdam.step):
        return True
    step = vars(optimizer).get("step")
    while step is not None and counts_scheduler_steps(step):
        step = getattr(step, "__wrapped__", None)
        if step is type(optimizer).step:
            return False
    return step is not None


_ABSENT = object()  # a state key that was not there (_init_state's edits)
# The op's refusals of the group's own hyper-parameters (adam_step.cpp).
_HYPER_PARAMETER_REFUSED = re.compile(r"invalid (learning rate|beta1|beta2|eps|weight_decay) ")


class FusedAdamW(FusedAdam, torch.optim.AdamW):
    """AdamW (decoupled weight decay) with ``torch.optim.AdamW``'s arguments and defaults;
    a subclass of both ``FusedAdam`` and ``torch.optim.AdamW``."""

    _default_decoupled = True

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)
