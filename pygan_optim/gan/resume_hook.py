"""ExactResumeHook: resuming in the middle of an accumulation window continues
exactly as if training had not stopped.

MMEngine saves neither the gradients accumulated so far in a window nor the
wrappers' counters nor the random state, so a resumed run loses part of a
window and draws other noise. This hook adds them to each checkpoint under
``checkpoint['pygan_optim']`` and restores them on resume: the random state
just before the train loop fetches its first new batch (after it has re-read
the batches it skips), so that an augmentation drawing from the global RNG in
the main process sees the same numbers; the counters and grads at the first
iteration. A resume is any checkpoint the runner's ``resume()`` loads: its own
(``resume=True``) or a manual ``runner.resume(path)`` before ``train()``.
Loading a checkpoint with ``load_from`` or ``runner.load_checkpoint`` (no
resume) restores none of it. Validation during training gets the random state
back when it ends (the checkpoint of its iteration was saved before it ran), so
that training draws the same numbers whether it validated there or resumed there.
"""
from __future__ import annotations

import random
import sys
import warnings
from typing import Dict, Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapperDict
from mmengine.runner import IterBasedTrainLoop


def _wrappers(runner) -> Dict[str, object]:
    wrapper = runner.optim_wrapper
    if isinstance(wrapper, OptimWrapperDict):
        return dict(wrapper.items())
    return {"": wrapper}


def _params(wrapper):
    return [p for group in wrapper.optimizer.param_groups for p in group["params"]]


def _rng_state() -> dict:
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
               numpy=np.random.get_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _resume_codes(runner) -> set:
    """The code objects of the ``resume`` methods of the runner's class and its
    bases (through decorators that keep ``__wrapped__``)."""
    codes = set()
    for klass in type(runner).__mro__:
        fn = vars(klass).get("resume")
        while fn is not None:
            code = getattr(fn, "__code__", None)
            if code is not None:
                codes.add(code)
            fn = getattr(fn, "__wrapped__", None)
    return codes


def _loaded_by_resume(runner) -> bool:
    """Whether the checkpoint being loaded is loaded by ``runner.resume()``.

    MMEngine's ``after_load_checkpoint`` does not say why a checkpoint is loaded,
    and ``runner._resume`` (the Runner's ``resume`` argument) tells neither a
    manual ``runner.resume(path)`` on a Runner built with resume=False nor a
    manual ``runner.load_checkpoint(path)`` (no resume) on one built with
    resume=True. A ``resume`` method of the runner's class (or a base class)
    with this runner as its ``self`` on the call stack does: Runner.resume and
    FlexibleRunner.resume both load the checkpoint from inside, the Runner's
    own resume at ``train()`` (``load_or_resume``) through the same method."""
    getframe = getattr(sys, "_getframe", None)
    if getframe is None:  # not CPython: the Runner's own resume only
        return bool(getattr(runner, "_resume", False))
    codes = _resume_codes(runner)
    frame = getframe(1)
    while frame is not None:
        code = frame.f_code
        if code in codes and code.co_argcount and \
                frame.f_locals.get(code.co_varnames[0]) is runner:
            return True
        frame = frame.f_back
    return False


class _RestoreRngBeforeFetch:
    """Stands in for an IterBasedTrainLoop's ``dataloader_iterator`` on resume.

    The loop fetches a batch before ``before_train_iter`` runs, and on resume
    first fetches (and drops) the ``skip`` batches already trained, which in
    the main process draw from the global RNG too. The saved state belongs
    right before the first new fetch: this restores it there, then puts the
    loop's own iterator back."""

    def __init__(self, loop, skip: int, rng: dict):
        self._loop, self._inner = loop, loop.dataloader_iterator
        self._skip, self._rng = skip, rng

    def __iter__(self):
        return self

    def __next__(self):
        if self._skip > 0:
            self._skip -= 1
        else:
            _restore_rng(self._rng)
            self._loop.dataloader_iterator = self._inner
        return next(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def give_back(self) -> None:
        """Puts the loop's own iterator back (the restore did not happen)."""
        self._loop.dataloader_iterator = self._inner


class ExactResumeHook(Hook):
    priority = "VERY_LOW"

    def __init__(self):
        self._pending: Optional[dict] = None
        self._val_rng: Optional[dict] = None  # the random state before validation

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        windows = {}
        for name, wrapper in _wrappers(runner).items():
            entry = dict(inner_count=wrapper._inner_count, max_counts=wrapper._max_counts,
                         remainder_counts=wrapper._remainder_counts)
            if wrapper._inner_count % wrapper._accumulative_counts != 0:  # mid-window
                entry["grads"] = [None if p.grad is None else p.grad.detach().cpu().clone()
                                  for p in _params(wrapper)]
            windows[name] = entry
        # The iteration a resume starts at (the checkpoint's own count).
        checkpoint["pygan_optim"] = dict(windows=windows, rng=_rng_state(),
                                         iter=checkpoint["meta"]["iter"])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Only a resume continues the saved run. load_from (or a manual
        # load_checkpoint) starts a new one at iteration 0, which _resuming alone
        # cannot tell from the resume of a checkpoint saved at iteration 0 (the
        # random state would be the old run's).
        self._pending = checkpoint.get("pygan_optim") if _loaded_by_resume(runner) else None

    def _resuming(self, runner) -> Optional[dict]:
        """The saved state when this run resumes at the checkpoint's iteration
        (not after a load_from, which starts at 0)."""
        pending = self._pending
        if pending is None or runner.iter != pending["iter"]:
            return None
        return pending

    def before_train(self, runner) -> None:
        pending = self._resuming(runner)
        loop = runner.train_loop
        # Only MMEngine's own IterBasedTrainLoop.run is known to re-read loop.iter
        # batches after this hook and then fetch the first batch to train before
        # before_train_iter; other loops get the random state in before_train_iter.
        if pending is None or getattr(type(loop), "run", None) is not IterBasedTrainLoop.run:
            return
        loop.dataloader_iterator = _RestoreRngBeforeFetch(loop, loop.iter, pending["rng"])
        self._pending = dict(pending, rng=None)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        pending, self._pending = self._resuming(runner), None
        if pending is None:
            return
        stand_in = getattr(runner.train_loop, "dataloader_iterator", None)
        if isinstance(stand_in, _RestoreRngBeforeFetch):
            # The loop fetched fewer batches than it should have skipped: restore
            # here rather than rewind the random state later, mid-training.
            stand_in.give_back()
            pending = dict(pending, rng=stand_in._rng)
            warnings.warn("ExactResumeHook: the train loop did not re-read the batches "
                          "it skips; the random state is restored after the first batch "
                          "was fetched, so a random data pipeline may differ")
        wrappers = _wrappers(runner)
        for name, entry in pending["windows"].items():
            wrapper = wrappers.get(name)
            if wrapper is None:
                continue
            wrapper._inner_count = entry["inner_count"]
            if name:
                # Counts of an OptimWrapperDict's wrappers are the model's (the
                # Runner sets none). A single wrapper keeps what the Runner just
                # set from this run's max_iters: the saving run's may differ (a
                # resume that trains longer), and its last window's loss factor
                # and final step would then come from the old max_iters.
                wrapper._max_counts = entry["max_counts"]
                wrapper._remainder_counts = entry["remainder_counts"]
            for p, g in zip(_params(wrapper), entry.get("grads", ())):
                p.grad = None if g is None else g.to(p.device, p.dtype)
        if pending["rng"] is not None:  # not handed to the loop's iterator
            _restore_rng(pending["rng"])

    def before_val(self, runner) -> None:
        # Validation inside training runs after the checkpoint of its iteration
        # was written, and draws from the global random state too (the val
        # dataloader's seed, a GAN's noise); a resumed run does not validate
        # there again. Training therefore goes on from the state validation
        # started with, in the uninterrupted run as in the resumed one.
        self._val_rng = _rng_state()

    def after_val(self, runner) -> None:
        if self._val_rng is not None:
            _restore_rng(self._val_rng)
            self._val_rng = None
