"""How FusedAdam's step meets the code around it: one step at a time per
optimizer (its lock), CUDA graph capture, and the callers' own zero_grad and
step wrappers, which must still see the grads as grads. (_step_wrapped, which
compares a step with FusedAdam's, stays beside the class in adam.py.)"""
from __future__ import annotations

import os
import threading

import torch

from .. import cuda_interpret

# Forks this process descends from. A fork copies only the thread that forks:
# a lock another thread held then stays held in the child, by no one.
_forks = 0
# Serialises the first check of each lock after a fork (_checked_after_fork).
_fork_check = threading.Lock()


def _count_fork() -> None:
    global _forks, _fork_check
    _forks += 1
    _fork_check = threading.Lock()  # the child has one thread yet: none holds it


os.register_at_fork(after_in_child=_count_fork)


def step_lock(optimizer) -> threading.RLock:
    """The optimizer's own lock, held by each eager step and step_options block.
    Steps of one optimizer from several threads are then one after another: the
    plans, the states they create and the options on the instance are not
    shared between threads (interleaved, a step refused in one thread undid
    states another thread's step had just updated). Made on first use, so
    unpickled, copied and subclassed optimizers have one too. In a forked
    child, a lock another thread held at the fork is refused with an error
    instead of waited on forever."""
    entry = optimizer.__dict__.get("_step_lock")  # (_forks when made or checked, lock)
    if entry is None:
        entry = optimizer.__dict__.setdefault("_step_lock", (_forks, threading.RLock()))
    elif entry[0] != _forks:
        entry = _checked_after_fork(optimizer)
    return entry[1]


def _checked_after_fork(optimizer) -> tuple:
    with _fork_check:
        entry = optimizer.__dict__["_step_lock"]
        if entry[0] == _forks:  # another thread of this child checked it meanwhile
            return entry
        # Free, or held by the thread that forked (it is this thread here): usable.
        lock = entry[1]
        if not lock.acquire(blocking=False):
            raise RuntimeError(
                f"{type(optimizer).__name__}: this process was forked while another thread "
                "was inside this optimizer's step() or step_options() block; that thread "
                "does not exist in the child, so its step can neither finish nor be undone "
                "here. Fork when no thread is stepping the optimizer, or build the optimizer "
                "in the child")
        lock.release()
        entry = (_forks, lock)
        optimizer.__dict__["_step_lock"] = entry
        return entry


def capture_active() -> bool:
    """Whether this thread's current CUDA stream is being captured into a graph
    (or, in interpret mode, cuda_interpret.capturing() is on)."""
    if cuda_interpret.is_capturing():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def has_own_zero_grad(optimizer) -> bool:
    """Whether ``optimizer.zero_grad`` is another than torch's (a subclass's, or one
    set on the instance): then it must run on the grads as they are."""
    return (type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad
            or "zero_grad" in vars(optimizer))


def innermost(fn):
    """`fn` under its decorators (functools.wraps chains)."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def counts_scheduler_steps(fn) -> bool:
    """A scheduler's step counter, known by its code: functools.wraps copies
    the flags the schedulers mark it with onto any wrapper made over it."""
    code = getattr(fn, "__code__", None)
    return code is not None and code.co_name == "wrapper" and code.co_filename.replace(
        "\\", "/").endswith(("torch/optim/lr_scheduler.py",
                             "mmengine/optim/scheduler/param_scheduler.py"))
