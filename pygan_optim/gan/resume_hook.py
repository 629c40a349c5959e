"""ExactResumeHook: resuming in the middle of an accumulation window continues
exactly as if training had not stopped.

MMEngine saves neither the gradients accumulated so far in a window nor the
wrappers' counters nor the random state, so a resumed run loses part of a
window and draws other noise. This hook adds them to each checkpoint under
``checkpoint['pygan_optim']`` and restores them at the first iteration after a
resume (after the train loop has re-read the data it skips). Loading a
checkpoint with ``load_from`` (no resume) restores none of it.
"""
from __future__ import annotations

import random
from typing import Dict, Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapperDict


def _wrappers(runner) -> Dict[str, object]:
    wrapper = runner.optim_wrapper
    if isinstance(wrapper, OptimWrapperDict):
        return dict(wrapper.items())
    return {"": wrapper}


def _params(wrapper):
    return [p for group in wrapper.optimizer.param_groups for p in group["params"]]


class ExactResumeHook(Hook):
    priority = "VERY_LOW"

    def __init__(self):
        self._pending: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        windows = {}
        for name, wrapper in _wrappers(runner).items():
            entry = dict(inner_count=wrapper._inner_count, max_counts=wrapper._max_counts,
                         remainder_counts=wrapper._remainder_counts)
            if wrapper._inner_count % wrapper._accumulative_counts != 0:  # mid-window
                entry["grads"] = [None if p.grad is None else p.grad.detach().cpu().clone()
                                  for p in _params(wrapper)]
            windows[name] = entry
        rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
                   numpy=np.random.get_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        # The iteration a resume starts at (the checkpoint's own count).
        checkpoint["pygan_optim"] = dict(windows=windows, rng=rng, iter=checkpoint["meta"]["iter"])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._pending = checkpoint.get("pygan_optim")

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        pending, self._pending = self._pending, None
        if pending is None or runner.iter != pending["iter"]:
            return  # not a resume at the saved iteration (e.g. load_from)
        wrappers = _wrappers(runner)
        for name, entry in pending["windows"].items():
            wrapper = wrappers.get(name)
            if wrapper is None:
                continue
            wrapper._inner_count = entry["inner_count"]
            wrapper._max_counts = entry["max_counts"]
            wrapper._remainder_counts = entry["remainder_counts"]
            for p, g in zip(_params(wrapper), entry.get("grads", ())):
                p.grad = None if g is None else g.to(p.device, p.dtype)
        rng = pending["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
