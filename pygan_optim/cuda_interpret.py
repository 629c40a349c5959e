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
thread, FusedAdam's included, through interpret mode.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

from . import _ext, ops

__all__ = ["adam_step_", "scale_", "scale", "l2_norm", "ema_", "enabled"]


@contextmanager
def enabled():
    previous = _ext._C.set_cuda_interpret(True)
    try:
        yield
    finally:
        _ext._C.set_cuda_interpret(previous)


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
