"""The CUDA backend run on the CPU (interpret mode), for testing without a GPU.

``adam_step_``, ``scale_``, ``scale``, ``l2_norm`` and ``ema_`` have exactly the
signatures of :mod:`pygan_optim.ops` and take CPU tensors. They run what a call
on a GPU runs: the CUDA backend's host code (chunk tables, one launch per dtype,
the prepare kernel, scalar tensors, ``found_inf`` skips) and the kernels of
``csrc/cuda/kernels.cu``, compiled by the host compiler against an emulation
of CUDA's thread model (``csrc/cuda/emulation.h``): the blocks of a launch run
one after another, the threads of a block as real concurrent threads that meet
at every ``__syncthreads``. It is slow (a launch starts one thread per CUDA
thread) and meant for tests.

``enabled()`` is a context manager that routes every CPU op call on this
thread, FusedAdam's included, through interpret mode. ``capturing()`` makes
those calls behave as inside a CUDA graph capture (tables must be on the
"device" from an earlier call, nothing is uploaded), for tests of what a
capture allows.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager

from . import _ext, ops

__all__ = ["adam_step_", "scale_", "scale", "l2_norm", "ema_", "enabled", "capturing",
           "is_capturing"]

_thread = threading.local()


@contextmanager
def enabled():
    previous = _ext._C.set_cuda_interpret(True)
    try:
        yield
    finally:
        _ext._C.set_cuda_interpret(previous)


@contextmanager
def capturing():
    """Interpret mode as inside a CUDA graph capture, on this thread."""
    previous = _ext._C.set_cuda_interpret_capturing(True)
    was = is_capturing()
    _thread.capturing = True
    try:
        with enabled():
            yield
    finally:
        _thread.capturing = was
        _ext._C.set_cuda_interpret_capturing(previous)


def is_capturing() -> bool:
    """Whether this thread is inside ``capturing()``."""
    return getattr(_thread, "capturing", False)


def _interpreted(op):
    @functools.wraps(op)
    def run(*args, **kwargs):
        with enabled():
            return op(*args, **kwargs)
    return run


adam_step_ = _interpreted(ops.adam_step_)
scale_ = _interpreted(ops.scale_)
scale = _interpreted(ops.scale)
l2_norm = _interpreted(ops.l2_norm)
ema_ = _interpreted(ops.ema_)
