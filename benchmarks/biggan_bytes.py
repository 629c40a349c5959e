"""Bytes each benchmarked variant moves by design, and per stream mix of its kernels
(harness.STREAM_MIXES): what "GB/s" and "of roof" in the table are computed from."""
from __future__ import annotations

import math
from typing import Dict, List

import pygan_optim
from pygan_optim.optim.adam import KEEP_GRAD_MIN_NUMEL


# Bytes per fp32 parameter each variant moves by design with beta1 = 0, no weight decay:
# ours reads g, p, v and writes p, v (20) where an update that releases the grads
# (step_and_zero_grad) keeps the grad tensor as exp_avg (tensors of KEEP_GRAD_MIN_NUMEL
# elements or more, on the CPU of 32 MiB or more: FusedAdam.keep_grad_min_bytes_cpu),
# else also writes exp_avg (24); torch's fused kernel reads and writes p, m, v and reads
# g (28); the for-loop and foreach paths make 7 passes (lerp 12, mul 8, addcmul 12,
# sqrt 8, div 8, add 8, addcdiv 16).
ADAM_VARIANT_BYTES = {"torch Adam fused": 28, "torch Adam foreach": 72, "torch Adam for-loop": 72}


def ours_adam_split(sizes, device: str, releases: bool = True, ema: bool = False) -> Dict[str, int]:
    """Bytes our Adam step moves for fp32 tensors of these sizes (shapes or numels),
    per stream mix of the kernel each tensor runs (harness.STREAM_MIXES): an update
    that releases the grads (`releases`) or a plain step(); `ema`: with the EMA
    blended in the same pass (+8 B/param)."""
    numels = [s if isinstance(s, int) else math.prod(s) for s in sizes]
    min_bytes = pygan_optim.FusedAdam.keep_grad_min_bytes_cpu if device == "cpu" else 0
    split: Dict[str, int] = {}
    for n in numels:
        kept = releases and n >= KEEP_GRAD_MIN_NUMEL and 4 * n >= min_bytes
        mix = ("4r+3w" if kept else "4r+4w") if ema else ("3r+2w" if kept else "3r+3w")
        split[mix] = split.get(mix, 0) + n * ((20 if kept else 24) + (8 if ema else 0))
    return split


def ours_adam_bytes(sizes, device: str, releases: bool = True) -> int:
    """Bytes our Adam step moves for fp32 tensors of these sizes (ours_adam_split)."""
    return sum(ours_adam_split(sizes, device, releases).values())


# Plain step() calls on grads that stay (the adam part's second table): ours copies
# the grad into exp_avg then (24 B/param).
STEP_ONLY = "step() only: "

# Ours again, from step 1: under step 16628 (beta2 0.999) its loop also divides by
# sqrt(bias_correction2), which is no longer 1.
OURS_EARLY = "pygan_optim FusedAdam, early steps"


def adam_bytes(sizes, device: str, releases: bool = True) -> Dict[str, int]:
    numel = sum(s if isinstance(s, int) else math.prod(s) for s in sizes)
    ours = ours_adam_bytes(sizes, device, releases)
    return dict({k: v * numel for k, v in ADAM_VARIANT_BYTES.items()},
                **{"pygan_optim FusedAdam": ours, OURS_EARLY: ours})


def adam_mixes(sizes, device: str, releases: bool = True) -> Dict[str, object]:
    """The stream mix of each Adam variant that has one pass (harness.STREAM_MIXES);
    ours, whose tensors may run kernels of two mixes: bytes per mix (ours_adam_split)."""
    ours = ours_adam_split(sizes, device, releases)
    return {"pygan_optim FusedAdam": ours, OURS_EARLY: ours, "torch Adam fused": "4r+3w"}


def mix_names(mixes: Dict[str, object]) -> List[str]:
    """Every stream mix the variants' kernels run (a mix, or bytes per mix)."""
    return sorted({m for mix in mixes.values() for m in (mix if isinstance(mix, dict) else [mix])})


def mmagic_ema_split(numel: int) -> Dict[str, int]:
    """Bytes per stream mix of MMagic's EMA loop: mul_ (1r+1w), then add_ (2r+1w)."""
    return {"1r+1w": 8 * numel, "2r+1w": 12 * numel}


def merged(*splits: Dict[str, int]) -> Dict[str, int]:
    """Bytes per stream mix of passes run one after the other."""
    out: Dict[str, int] = {}
    for split in splits:
        for mix, moved in split.items():
            out[mix] = out.get(mix, 0) + moved
    return out


# Bytes per fp32 parameter of G's update followed by its EMA (beta1 = 0): ours
# blends in the update pass (20 + 8: reads and writes the average), or runs
# ops.ema_ after it (20 + 12); torch fused Adam (28) with MMagic's loop (20) or
# _foreach_lerp_ (12).
UPDATE_EMA_BYTES = {"pygan_optim FusedAdam step(ema=...)": 8,
                    "pygan_optim FusedAdam, then ops.ema_": 12,
                    "native: torch fused Adam + per-parameter loop (MMagic)": 48,
                    "torch fused Adam + torch._foreach_lerp_": 40}
