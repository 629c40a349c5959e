"""BigGAN-128 benchmark: pygan_optim's fused path against the native PyTorch/MMEngine path.

    python benchmarks/bench_biggan.py                 # everything, on the CPU
    python benchmarks/bench_biggan.py --parts adam ema --repeats 9
    python benchmarks/bench_biggan.py --quick         # small and short (CI smoke test)

Parts (all in one process, variants interleaved, medians and spread):
  roof       the machine's memory roof: read-modify-write stream over 2 x 512 MB, and the
             extension's probe for each kernel's stream mix (3r+2w, 3r+3w, 4r+3w, 2r+1w,
             1r+1w over 256 MB arrays, median and spread). 'of roof' sets each variant
             against the probe of its mix timed again in every round of its part (a
             median of per-round ratios): the VM's memory speed jumps between about 50
             and 95 GB/s within seconds
  adam       one optimizer update on the real BigGAN-128 G and D parameters, as
             MMEngine's update_params makes it after backward (step, then zero_grad();
             new grads are filled in untimed): FusedAdam.step_and_zero_grad vs
             torch.optim.Adam for-loop (the seed config on the CPU), foreach, fused;
             and ours from step 1 ("early steps": below step 16628 its fp32 loop also
             divides by sqrt(bias_correction2)). Every other optimizer, here and in the
             wrapper, update+ema and scaling parts, starts at step 20000, as in almost
             all of a GAN run (param_sets.STEADY_STEP)
  wrapper    whole wrapper step (AMP dynamic scale + clip_grad + Adam + zero_grad):
             FusedAmpOptimWrapper vs MMEngine's AmpOptimWrapper sequence on torch's GradScaler,
             grads released (MMEngine's default zero_grad) on both sides, and zeros
             written in place (zero_kwargs=dict(set_to_none=False)) on both sides
  ema        EMA update of G: fused op vs per-parameter loop (MMagic) vs torch._foreach_lerp_
  iteration  one period of the seed schedule (8 D passes + D step, 8 G passes + G step, EMA)
             at a small batch, both configs, with the optimizer's share of the time
             (a warm-up and 2 timed periods per config: about 5 minutes on 2 cores)
  scaling    step() time vs parameter count (1M..160M) and vs tensor count (10..10k x 1k)
Writes a table to stdout, raw samples + machine facts to JSON, and a PNG plot.

Runs with torch's CPU allocator on transparent huge pages (THP_MEM_ALLOC_ENABLE=1) unless
the environment sets THP_MEM_ALLOC_ENABLE itself (0: 4 KB pages). An update releases one
large tensor per parameter on both sides; on 4 KB pages those frees and the next backward's
page faults cost as much as a third of an update (README, "Results").
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import wrapper_step  # noqa: E402
from param_sets import (STEADY_STEP, at_step, grad_refill, make_params,  # noqa: E402
                        synthetic_sizes, update_call)

import pygan_optim  # noqa: E402
from pygan_optim.models import BigGANDiscriminator, BigGANGenerator  # noqa: E402
from pygan_optim.optim.adam import KEEP_GRAD_MIN_NUMEL  # noqa: E402

PARTS = ("roof", "adam", "wrapper", "ema", "iteration", "scaling")
SEED_HP = {"generator": dict(lr=1e-4, betas=(0.0, 0.999), eps=1e-6),
           "discriminator": dict(lr=4e-4, betas=(0.0, 0.999), eps=1e-6)}
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


def mix_label(mix) -> str:
    """A variant's stream mix as the table shows it: 3r+2w, or 3r+2w/3r+3w."""
    return "/".join(sorted(mix)) if isinstance(mix, dict) else mix


def model_cfgs(quick: bool) -> Dict[str, dict]:
    scale, ch = (32, 16) if quick else (128, 96)
    common = dict(num_classes=1000, base_channels=ch, sn_eps=1e-6, init_type="ortho",
                  act_cfg=dict(type="ReLU", inplace=True))
    return {"generator": dict(common, output_scale=scale, noise_size=120, shared_dim=128,
                              with_shared_embedding=True, split_noise=True, auto_sync_bn=False),
            "discriminator": dict(common, input_scale=scale, with_spectral_norm=True)}


def real_shapes(quick: bool) -> Dict[str, List[torch.Size]]:
    cfgs = model_cfgs(quick)
    return {"generator": [p.shape for p in BigGANGenerator(**cfgs["generator"]).parameters()],
            "discriminator": [p.shape for p in BigGANDiscriminator(**cfgs["discriminator"]).parameters()]}


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (sysfs), 0 when unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KM")) * mult)
    except (OSError, ValueError):
        pass
    return best


# The roof a variant without a stream mix of its own is set against: the
# read-modify-write stream (a += s * b: two reads, one write) timed at the start.
RMW_LABEL = "rmw (a += s * b, at the start)"

TABLE_LEGEND = """\
ms: median per call; ±: half the inter-quartile range of the repeats, over the median.
ours faster by: that variant's median over ours (below 1.00x: ours is slower).
GB/s: the bytes the variant moves by design over its median time.
of roof: against the extension's roof probe of its stream mix (3r+3w: 3 arrays read per element,
  3 written), timed in the same rounds of its part, a median of per-round ratios; several mixes:
  each one's bytes at its own roof; rmw: against the read-modify-write roof (a += s * b)
  measured at the start."""


class Results:
    def __init__(self, roof_bps: float, device: str, mix_roofs: Optional[dict] = None):
        self.roof = roof_bps
        self.mix_roofs = mix_roofs or {}  # stream mix -> harness.stream_roofs entry
        self.cache = last_level_cache_bytes() if device == "cpu" else 0
        self.rows: List[list] = []
        self.data: Dict[str, dict] = {}

    def add(self, part: str, samples: Dict[str, List[float]], reference: str,
            bytes_per_variant: Dict[str, float], natives: List[str],
            working_set: float = 0.0, numel: int = 0,
            mixes: Optional[Dict[str, object]] = None,
            part_roofs: Optional[dict] = None) -> None:
        """`mixes`: variant -> its kernel's stream mix, whose measured roof it is
        set against, or bytes per mix where its tensors or passes run several
        (they must add up to its bytes); the others are set against the
        read-modify-write roof.
        `part_roofs`: mix -> the probe's bandwidth measured within this part
        (harness.RoofProbe), preferred to the probe made at the start."""
        ref = harness.median(samples[reference])
        ref_spread = harness.spread(samples[reference])
        self.data[part] = {}
        for name, xs in samples.items():
            t = harness.median(xs)
            moved = bytes_per_variant.get(name)
            rate = moved / t if moved else float("nan")
            speedup = t / ref if name in natives else None
            mix = (mixes or {}).get(name)
            # Bytes per stream mix: a step whose tensors or passes run several
            # mixes is set against the sum of each part's time at its own roof.
            split = mix if isinstance(mix, dict) else ({mix: moved} if mix and moved else {})
            if isinstance(mix, dict) and sum(split.values()) != moved:
                raise ValueError(f"{part} / {name}: bytes per mix add up to "
                                 f"{sum(split.values())}, not its {moved} bytes")
            roof = self.split_roof(split, part_roofs) if split else self.roof
            in_part = bool(split) and all(m in (part_roofs or {}) for m in split)
            measured = in_part or (bool(split) and all(m in self.mix_roofs for m in split))
            note = self._note(speedup, harness.spread(xs) + ref_spread, rate, working_set, ref,
                              roof)
            # Against the probe of the same rounds where there is one.
            fraction = (harness.fraction_of_floor(split, xs, part_roofs)
                        if in_part and moved else rate / roof)
            entry = dict(median_s=t, spread=harness.spread(xs), samples=xs, bytes=moved, numel=numel,
                         bytes_per_s=rate, roof_fraction=fraction,
                         roof_mix=mix_label(mix) if measured else RMW_LABEL,
                         roof_split=split if measured else None,
                         roof_bytes_per_s=roof,
                         roof_measured="in this part" if in_part else "at the start",
                         speedup_of_ours=speedup, note=note)
            self.data[part][name] = entry
            self.rows.append([part, name, f"{t * 1e3:.2f} ±{entry['spread'] * 100:.0f}%",
                              f"{speedup:.2f}x" if speedup is not None else "-",
                              "-" if math.isnan(rate) else f"{rate / 1e9:.1f}",
                              "-" if math.isnan(rate) else
                              f"{100 * entry['roof_fraction']:.0f}% of "
                              f"{entry['roof_mix'].split(' ')[0]}",
                              note])

    def roof_for(self, mix: Optional[str], part_roofs: Optional[dict] = None) -> float:
        """The measured roof of a kernel's stream mix (within the part where
        measured there), else the read-modify-write roof."""
        for roofs in (part_roofs or {}, self.mix_roofs):
            if mix in roofs:
                return roofs[mix]["bytes_per_s"]
        return self.roof

    def split_roof(self, split: Dict[str, float], part_roofs: Optional[dict] = None) -> float:
        """The bandwidth of a step moving these bytes per stream mix, each part at
        its own mix's roof (roof_for): total bytes over the sum of the parts' times."""
        return sum(split.values()) / sum(b / self.roof_for(m, part_roofs)
                                         for m, b in split.items())

    def _note(self, speedup, spread, rate, working_set, ours_s, roof) -> str:
        """Why a figure should not be read at face value, or why ours is slower."""
        notes = []
        if speedup is not None and spread == 0.0:
            notes.append("one sample each: no spread to judge the difference by")
        if not math.isnan(rate) and rate > roof:
            notes.append("above the roof: runs from cache")
        if speedup is not None and spread == 0.0:
            pass
        elif speedup is not None and abs(speedup - 1.0) < spread:
            notes.append("noise: spread larger than the difference")
        elif speedup is not None and speedup < 1.0:
            if self.cache and 0 < working_set <= self.cache:
                notes.append(f"ours slower: {working_set / 2**20:.0f} MB fit in the "
                             f"{self.cache / 2**20:.0f} MB cache, where torch's one pass "
                             "wins on compute, not bytes")
            elif ours_s < 1e-3:
                notes.append("ours slower: a sub-millisecond step, per-call costs dominate")
            else:
                notes.append("ours slower")
        return "; ".join(notes)

    def table(self, title: str) -> str:
        return title + "\n" + harness.table(
            self.rows, ["part", "variant", "ms", "ours faster by", "GB/s", "of roof", "note"]) + (
            "\n" + TABLE_LEGEND if self.rows else "")


def summary(res: Results, part: str) -> str:
    """One line for the log: ours, and how each native variant compares."""
    entries = res.data[part]
    ours = next(e for n, e in entries.items() if e["speedup_of_ours"] is None)
    others = ", ".join(f"{n} {e['speedup_of_ours']:.2f}x" for n, e in entries.items()
                       if e["speedup_of_ours"] is not None)
    return f"ours {ours['median_s'] * 1e3:.1f} ms; ours faster than {others}"


def with_roofs(variants: Dict[str, Callable[[], object]], mixes: Dict[str, object], args, timer,
               show, warmup: int = 2, **kwargs):
    """harness.interleaved over the variants and, on the CPU, the roof probes of
    their stream mixes, one pass each per round, so each variant is set against
    the roof of the same rounds (harness.fraction_of_roof). Returns the
    variants' samples and the probes' roofs (harness.RoofProbe.roofs)."""
    probe = None
    if args.device == "cpu":
        probe = harness.RoofProbe(mix_names(mixes), megabytes=16 if args.quick else 256)
        variants = dict(variants, **probe.calls())
    samples = harness.interleaved(variants, args.repeats, warmup, timer, show, **kwargs)
    return samples, (probe.roofs(samples) if probe else {})


def part_adam(res: Results, shapes, args, timer) -> None:
    for key in ("generator", "discriminator"):
        hp = SEED_HP[key]
        numel = sum(math.prod(s) for s in shapes[key])
        def build(cls, step=STEADY_STEP, **kwargs):
            return at_step(cls(make_params(shapes[key], args.device), **hp, **kwargs), step)

        # Built in this order (a dict literal runs left to right): in fast-memory
        # phases the tensors allocated first stepped up to 10% slower than
        # identical ones allocated later (NOTES.md, "Allocation order"), so ours
        # goes after the early-step copy and the for-loop, and torch fused last.
        built = {OURS_EARLY: build(pygan_optim.FusedAdam, step=1),
                 "torch Adam for-loop": build(torch.optim.Adam, foreach=False),
                 "torch Adam foreach": build(torch.optim.Adam, foreach=True),
                 "pygan_optim FusedAdam": build(pygan_optim.FusedAdam),
                 STEP_ONLY + "pygan_optim FusedAdam": build(pygan_optim.FusedAdam),
                 STEP_ONLY + "torch Adam fused": build(torch.optim.Adam, fused=True),
                 "torch Adam fused": build(torch.optim.Adam, fused=True)}
        updates = [k for k in built if not k.startswith(STEP_ONLY)]
        # Updates (step, then zero_grad(): new grads filled in untimed before each)
        # and plain steps on grads that stay, in the same rounds.
        calls = {k: o.step if k.startswith(STEP_ONLY) else update_call(o)
                 for k, o in built.items()}
        refills = {k: grad_refill(built[k].param_groups[0]["params"]) for k in updates}
        show = harness.progress_printer(f"adam {key}")
        mixes = dict(adam_mixes(shapes[key], args.device),
                     **{STEP_ONLY + k: v for k, v in
                        adam_mixes(shapes[key], args.device, releases=False).items()})
        samples, roofs = with_roofs(calls, mixes, args, timer, show, setups=refills)
        order = ("pygan_optim FusedAdam", OURS_EARLY, "torch Adam for-loop",
                 "torch Adam foreach", "torch Adam fused")
        res.add(f"adam {key[0].upper()}", {k: samples[k] for k in order},
                "pygan_optim FusedAdam", adam_bytes(shapes[key], args.device),
                [k for k in order if k.startswith("torch")], working_set=16 * numel,
                numel=numel, mixes=mixes, part_roofs=roofs)
        show.done(summary(res, f"adam {key[0].upper()}"))
        step_bytes = adam_bytes(shapes[key], args.device, releases=False)
        res.add(f"step {key[0].upper()}",
                {k: samples[k] for k in calls if k.startswith(STEP_ONLY)},
                STEP_ONLY + "pygan_optim FusedAdam",
                {STEP_ONLY + k: v for k, v in step_bytes.items()},
                [STEP_ONLY + "torch Adam fused"], working_set=16 * numel, numel=numel,
                mixes=mixes, part_roofs=roofs)
        show.done(summary(res, f"step {key[0].upper()}"))
        del built, calls
        gc.collect()


def part_wrapper(res: Results, shapes, args, timer) -> None:
    for key in ("generator", "discriminator"):
        numel = sum(math.prod(s) for s in shapes[key])
        steps, refills = wrapper_step.variants(shapes[key], SEED_HP[key], args.device)
        show = harness.progress_printer(f"wrapper {key}")
        # Several passes each: set against the read-modify-write roof.
        mixes = {k: "1r+1w" for k in steps}
        samples, roofs = with_roofs(steps, mixes, args, timer, show, setups=refills)
        moved = wrapper_step.bytes_per_param(beta1_zero=True)
        # Each of ours against the native sequences that leave the grads as it does:
        # released (MMEngine's default zero_grad), or zeros written in place.
        done = []
        for ours, natives in wrapper_step.pairs().items():
            part = f"wrapper {key[0].upper()}" + (", zeros" if ours == wrapper_step.OURS else "")
            res.add(part, {k: samples[k] for k in (ours, *natives)}, ours,
                    {k: v * numel for k, v in moved.items()}, list(natives),
                    working_set=16 * numel, numel=numel, mixes=mixes, part_roofs=roofs)
            done.append(f"{part}: {summary(res, part)}")
        show.done("; ".join(done))
        del steps, refills
        gc.collect()


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


def part_ema(res: Results, shapes, args, timer) -> None:
    momentum = 1e-4  # MMagic convention: weight of the new parameters
    src = [p.detach() for p in make_params(shapes["generator"], args.device, seed=2)]
    avgs = {k: [s.clone() for s in src] for k in ("ours", "loop", "lerp")}

    def loop():  # MMagic's ExponentialMovingAverage: per tensor mul_ then add_
        for a, s in zip(avgs["loop"], src):
            a.mul_(1 - momentum).add_(s, alpha=momentum)

    variants = {"pygan_optim ops.ema_":
                lambda: pygan_optim.ops.ema_(avgs["ours"], src, 1 - momentum, momentum),
                "per-parameter loop (MMagic)": loop,
                "torch._foreach_lerp_": lambda: torch._foreach_lerp_(avgs["lerp"], src, momentum)}
    show = harness.progress_printer("ema")
    numel = sum(s.numel() for s in src)
    mixes = {"pygan_optim ops.ema_": "2r+1w", "torch._foreach_lerp_": "2r+1w",
             "per-parameter loop (MMagic)": mmagic_ema_split(numel)}
    samples, roofs = with_roofs(variants, mixes, args, timer, show)
    res.add("ema G", samples, "pygan_optim ops.ema_",
            {"pygan_optim ops.ema_": 12 * numel, "per-parameter loop (MMagic)": 20 * numel,
             "torch._foreach_lerp_": 12 * numel}, [k for k in samples if not k.startswith("pygan")],
            working_set=8 * numel, numel=numel, mixes=mixes, part_roofs=roofs)
    show.done(summary(res, "ema G"))
    del avgs, src
    gc.collect()
    part_update_with_ema(res, shapes, args, timer, momentum)


# Bytes per fp32 parameter of G's update followed by its EMA (beta1 = 0): ours
# blends in the update pass (20 + 8: reads and writes the average), or runs
# ops.ema_ after it (20 + 12); torch fused Adam (28) with MMagic's loop (20) or
# _foreach_lerp_ (12).
UPDATE_EMA_BYTES = {"pygan_optim FusedAdam step(ema=...)": 8,
                    "pygan_optim FusedAdam, then ops.ema_": 12,
                    "native: torch fused Adam + per-parameter loop (MMagic)": 48,
                    "torch fused Adam + torch._foreach_lerp_": 40}


def part_update_with_ema(res: Results, shapes, args, timer, momentum: float) -> None:
    """G's last update of a window and its EMA: in one pass, or as two."""
    hp = SEED_HP["generator"]
    names = list(UPDATE_EMA_BYTES)
    params = {k: make_params(shapes["generator"], args.device) for k in names}
    avgs = {k: [p.detach().clone() for p in ps] for k, ps in params.items()}
    opts = {k: at_step((pygan_optim.FusedAdam if k.startswith("pygan") else torch.optim.Adam)(
        ps, **hp, **({} if k.startswith("pygan") else dict(fused=True))))
        for k, ps in params.items()}
    # Updates as MMEngine's update_params makes them (step, then zero_grad()).
    updates = {k: update_call(o) for k, o in opts.items()}
    refills = {k: grad_refill(ps) for k, ps in params.items()}

    def fused():
        k = names[0]
        updates[k](ema=pygan_optim.EmaBlend(zip(params[k], avgs[k]), 1 - momentum, momentum))

    def separate():
        k = names[1]
        updates[k]()
        pygan_optim.ops.ema_(avgs[k], params[k], 1 - momentum, momentum)

    def native_loop():
        k = names[2]
        updates[k]()
        with torch.no_grad():
            for a, p in zip(avgs[k], params[k]):
                a.mul_(1 - momentum).add_(p, alpha=momentum)

    def native_lerp():
        k = names[3]
        updates[k]()
        with torch.no_grad():
            torch._foreach_lerp_(avgs[k], params[k], momentum)

    show = harness.progress_printer("G update + EMA")
    numel = sum(math.prod(s) for s in shapes["generator"])
    fused_adam = {"4r+3w": 28 * numel}
    mixes = dict(zip(names, (
        ours_adam_split(shapes["generator"], args.device, ema=True),
        merged(ours_adam_split(shapes["generator"], args.device), {"2r+1w": 12 * numel}),
        merged(fused_adam, mmagic_ema_split(numel)),
        merged(fused_adam, {"2r+1w": 12 * numel}))))
    samples, roofs = with_roofs(dict(zip(names, (fused, separate, native_loop, native_lerp))),
                                mixes, args, timer, show, setups=refills)
    adam = ours_adam_bytes(shapes["generator"], args.device)
    moved = {k: (adam if k.startswith("pygan") else 0) + v * numel
             for k, v in UPDATE_EMA_BYTES.items()}
    res.add("update+ema G", samples, names[0], moved, names[1:], working_set=24 * numel,
            numel=numel, mixes=mixes, part_roofs=roofs)
    show.done(summary(res, "update+ema G"))
    del opts, params, avgs
    gc.collect()


def part_iteration(res: Results, args, timer) -> Dict[str, dict]:
    """One period of the seed schedule, both configs, from MMEngine-built wrappers."""
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.optim import build_optim_wrapper

    from pygan_optim.console import QuietConsoleFilter, console_handlers

    # MMEngine's note on BatchNorm with gradient accumulation, once per G phase, says
    # nothing here: the seed schedule accumulates on purpose.
    for handler in console_handlers(MMLogger.get_current_instance()):
        handler.addFilter(QuietConsoleFilter(dumps=()))
    cfgs = model_cfgs(args.quick)
    accu = 8
    out = {}
    samples: Dict[str, List[float]] = {}
    share: Dict[str, List[float]] = {}
    rigs = {}
    for name, (wrapper_type, opt_type) in {"pygan_optim (fused)": ("FusedOptimWrapper", "FusedAdam"),
                                            "native (seed config)": ("OptimWrapper", "Adam")}.items():
        torch.manual_seed(0)
        model = pygan_optim.gan.BigGAN(
            generator=dict(type="BigGANGenerator", **cfgs["generator"]),
            discriminator=dict(type="BigGANDiscriminator", **cfgs["discriminator"]),
            num_classes=1000, ema_config=dict(momentum=1e-4, interval=1, update_buffers=True)
        ).to(args.device)
        optim_cfg = dict(constructor="MultiOptimWrapperConstructor", **{
            key: dict(type=wrapper_type, accumulative_counts=accu,
                      optimizer=dict(type=opt_type, **SEED_HP[key])) for key in SEED_HP})
        wrappers = build_optim_wrapper(model, optim_cfg)
        spent = [0.0]
        for w in wrappers.values():  # time spent in optimizer steps
            step = w.step

            def timed(*a, step=step, spent=spent, **kw):
                t0 = time.perf_counter()
                step(*a, **kw)
                spent[0] += time.perf_counter() - t0
            w.step = timed
        g = torch.Generator().manual_seed(0)
        size = cfgs["generator"]["output_scale"]
        batch = dict(inputs=dict(img=[torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
                                      for _ in range(args.batch)]),
                     data_samples=dict(gt_label=list(range(args.batch))))
        rigs[name] = (model, wrappers, batch, spent)
        samples[name], share[name] = [], []

    show = harness.progress_printer("iteration")
    where = [""]

    def period(name):
        model, wrappers, batch, spent = rigs[name]
        spent[0] = 0.0
        t0 = time.perf_counter()
        for k in range(accu):  # discriminator_steps (1) x accumulative_counts data reads
            show(f"{where[0]}, {name}: forward/backward {k + 1}/{accu}")
            model.train_step(batch, wrappers)
        total = time.perf_counter() - t0
        samples[name].append(total)
        share[name].append(spent[0] / total)

    MessageHub.get_instance("pygan_optim_bench")
    repeats = max(1, args.iteration_repeats)
    period_fns = {n: (lambda n=n: period(n)) for n in rigs}
    where[0] = "warm-up"
    for n in rigs:  # warm-up: allocates optimizer state
        period_fns[n]()
        samples[n].clear()
        share[n].clear()
    for r in range(repeats):
        where[0] = f"period {r + 1}/{repeats}"
        for n in (list(rigs) if r % 2 == 0 else list(rigs)[::-1]):
            period_fns[n]()
    res.add("iteration (8 reads)", samples, "pygan_optim (fused)", {}, ["native (seed config)"])
    show.done(summary(res, "iteration (8 reads)"))
    for n in rigs:
        res.data["iteration (8 reads)"][n]["optimizer_share"] = harness.median(share[n])
        out[n] = dict(optimizer_share=harness.median(share[n]))
    return out


def part_scaling(res: Results, args, timer) -> Dict[str, dict]:
    curves: Dict[str, dict] = {"params": {}, "tensors": {}}
    totals = [1, 4] if args.quick else [1, 4, 16, 64, 160]
    counts = [10, 100, 1000] if args.quick else [10, 100, 1000, 10000]
    hp = SEED_HP["generator"]
    for axis, points in (("params", totals), ("tensors", counts)):
        for point in points:
            sizes = synthetic_sizes(point) if axis == "params" else [1000] * point
            variants = {
                "pygan_optim FusedAdam": at_step(pygan_optim.FusedAdam(make_params(sizes, args.device), **hp)).step,
                "torch Adam fused": at_step(torch.optim.Adam(make_params(sizes, args.device), fused=True, **hp)).step,
                "torch Adam foreach": at_step(torch.optim.Adam(make_params(sizes, args.device), foreach=True, **hp)).step,
            }
            # Cheap points get more rounds: half a second of timed calls at least.
            # The first rounds after building the state run slower: 3 warm-ups.
            show = harness.progress_printer(f"scaling {axis} {point}")
            # The floor: our bytes at the roof of our kernel's stream mix, probed
            # in every round (the time budget counts the probe's passes too).
            mixes = adam_mixes(sizes, args.device, releases=False)
            samples, roofs = with_roofs(variants, mixes, args, timer, show, warmup=3,
                                        min_seconds=0.5)
            numel = sum(sizes)
            split = mixes["pygan_optim FusedAdam"]
            moved = sum(split.values())
            ours_roof = res.split_roof(split, roofs)
            floor = moved / ours_roof
            ours = harness.median(samples["pygan_optim FusedAdam"])
            # Per round against that round's probe, where there is one.
            times_floor = (1 / harness.fraction_of_floor(split, samples["pygan_optim FusedAdam"],
                                                         roofs)
                           if all(m in roofs for m in split) else ours / floor)
            show.done(f"{len(samples['pygan_optim FusedAdam'])} rounds; ours {ours * 1e3:.2f} ms "
                      f"= {times_floor:.2f}x its floor ({floor * 1e3:.2f} ms at "
                      f"{ours_roof / 1e9:.1f} GB/s)")
            curves[axis][point] = dict(numel=numel, tensors=len(sizes), floor_s=floor,
                                       roof_bytes_per_s=ours_roof, times_floor=times_floor,
                                       **{k: harness.median(v) for k, v in samples.items()},
                                       spread={k: harness.spread(v) for k, v in samples.items()},
                                       samples=samples)
            if axis == "tensors" and point == 10000 or axis == "params" and point == totals[-1]:
                res.add(f"scaling {len(sizes)} tensors, {numel / 1e6:.1f}M", samples,
                        "pygan_optim FusedAdam", adam_bytes(sizes, args.device, releases=False),
                        [k for k in samples if k.startswith("torch")], working_set=16 * numel,
                        numel=numel, mixes=mixes, part_roofs=roofs)
            del variants
            gc.collect()
    return curves


def plot(path: str, res: Results, curves, title: str) -> None:
    """Bars per part with spread and speed-ups, a roofline-style panel (time per
    parameter against bytes per parameter, the measured roof drawn), and the
    scaling curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bar_parts = [p for p in res.data if p.split()[0] in ("adam", "wrapper", "ema", "update+ema")]
    rows = 2 if curves else 1
    fig, grid = plt.subplots(rows, 2, figsize=(15, 6.5 * rows), squeeze=False)
    axes = [a for row in grid for a in row]
    fig.suptitle(title)
    ax = axes[0]
    y, ticks, labels = 0, [], []
    for part in bar_parts:
        for name, e in res.data[part].items():
            ours = e["speedup_of_ours"] is None
            noisy = "noise" in e["note"]
            ms = e["median_s"] * 1e3
            ax.barh(y, ms, xerr=ms * e["spread"], capsize=2, hatch="//" if noisy else None,
                    color="tab:green" if ours else "tab:gray", edgecolor="black", linewidth=0.4)
            if not ours:
                s = e["speedup_of_ours"]
                ax.text(ms * (1 + e["spread"]) * 1.03, y,
                        (f"ours {s:.2f}x faster" if s >= 1 else f"ours {1 / s:.2f}x slower")
                        + (" (noise)" if noisy else ""), va="center", fontsize=7)
            ticks.append(y)
            labels.append(f"{part}: {name}")
            y += 1
        y += 0.6
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
    ax.set_xlabel("ms per call (median, bars: half the inter-quartile range)")
    ax.set_title("optimizer step, wrapper step, EMA")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:green", label="pygan_optim"),
                       plt.Rectangle((0, 0), 1, 1, color="tab:gray", label="native"),
                       plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black",
                                     hatch="//", label="spread > difference")],
              fontsize=7, loc="lower right")

    ax = axes[1]  # roofline-style: what each Adam variant moves against how long it takes
    colors = {"pygan_optim FusedAdam": "tab:green", "torch Adam fused": "tab:orange",
              "torch Adam foreach": "tab:blue", "torch Adam for-loop": "tab:purple"}
    markers = {"adam G": "o", "adam D": "s"}
    for part in (p for p in res.data if p in markers):
        for name, e in res.data[part].items():
            x, t = e["bytes"] / e["numel"], e["median_s"] / e["numel"] * 1e9
            ax.scatter(x, t, s=45, marker=markers[part], color=colors.get(name, "tab:gray"),
                       edgecolor="black", linewidth=0.4, zorder=3, label=f"{part}: {name}")
            ax.annotate(f"{100 * e['roof_fraction']:.0f}%", (x, t), fontsize=7,
                        xytext=(5, -3), textcoords="offset points")
    xs = [16, 100]
    ax.plot(xs, [x / res.roof * 1e9 for x in xs], "k--",
            label=f"memory roof {res.roof / 1e9:.1f} GB/s (the limit)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([20, 24, 28, 72], ["20", "24", "28", "72"])
    ax.set_xlim(18, 110)
    ax.minorticks_off()
    ax.set_xlabel("bytes moved per parameter, by design (beta1 = 0):\n"
                  "20-24 ours, 28 torch fused, 72 foreach and for-loop")
    ax.set_ylabel("ns per parameter (median)")
    ax.set_title("Adam step against the memory roof (labels: % of the roof reached)")
    ax.legend(fontsize=7, loc="upper left")

    if curves:
        for ax, axis, xlabel in ((axes[2], "params", "parameters (M)"),
                                 (axes[3], "tensors", "tensors of 1k elements")):
            pts = sorted(curves[axis])
            for name in ("pygan_optim FusedAdam", "torch Adam fused", "torch Adam foreach"):
                ms = [curves[axis][p][name] * 1e3 for p in pts]
                err = [m * curves[axis][p].get("spread", {}).get(name, 0) for m, p in zip(ms, pts)]
                ax.errorbar(pts, ms, yerr=err, marker="o", capsize=2, label=name)
            ax.plot(pts, [curves[axis][p]["floor_s"] * 1e3 for p in pts], "k--",
                    label="roof floor for ours (20-24 B/param)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ms per step")
            ax.legend(fontsize=7)
            ax.set_title(f"Adam step time vs {axis}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_label(quick: bool, counts: Dict[str, int]) -> str:
    size = "BigGAN-32 (--quick: small models)" if quick else "BigGAN-128"
    return (f"{size}: G {counts['generator'] / 1e6:.2f}M, D {counts['discriminator'] / 1e6:.2f}M "
            "params, seed config betas (0, 0.999)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds per part (default 11; 3 with --quick)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--batch", type=int, default=1, help="batch size of the iteration part")
    # A period of BigGAN-128 at batch 1 takes about 50 s per config on 2 cores: a
    # warm-up and 2 timed periods of each keep the default run under 10 minutes.
    ap.add_argument("--iteration-repeats", type=int, default=None,
                    help="timed periods per config in the iteration part (default 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small models, few repeats: a smoke test")
    ap.add_argument("--out", default="bench_out", help="folder for biggan.json and biggan.png")
    args = ap.parse_args(argv)
    # --quick sets the counts the command line leaves unset.
    if args.repeats is None:
        args.repeats = 3 if args.quick else 11
    if args.iteration_repeats is None:
        args.iteration_repeats = 1 if args.quick else 2
    # Refused here, before minutes of work, not where the count is first used.
    for flag in ("threads", "repeats", "batch", "iteration_repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    json_path = os.path.join(args.out, "biggan.json")
    png_path = os.path.join(args.out, "biggan.png")
    check_out_folder(ap, args.out, json_path, png_path)
    # Read by torch's CPU allocator at its first block of 2 MB or more, so here in main():
    # the other benchmarks import this module for its helpers and keep their own setting.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    saved = [False]  # whether this run wrote the JSON yet
    try:
        return run_parts(args, argv, json_path, png_path, started, saved)
    except KeyboardInterrupt:  # outside the parts' own handler
        if saved[0]:  # a second Ctrl-C while the results were written out
            print(f"\ninterrupted; the parts that finished are in {json_path}", file=sys.stderr)
        else:  # before any part finished: no earlier run's files left to pass for this one's
            harness.write_json(json_path, dict(benchmark="biggan128", status="interrupted",
                                               argv=argv, quick=args.quick, parts={},
                                               seconds=time.time() - started))
            drop_stale(png_path)
            print(f"\ninterrupted before any part finished: nothing measured; {json_path} "
                  "says so", file=sys.stderr)
        sys.exit(130)


def check_out_folder(ap, out: str, json_path: str, png_path: str) -> None:
    """--out must be a folder that takes biggan.json and biggan.png: refused at
    once, not after the first part's minutes."""
    if os.path.exists(out) and not os.path.isdir(out):
        ap.error(f"--out {out}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
        for path in (json_path, png_path):
            if os.path.isdir(path):
                raise IsADirectoryError(f"{path} is a folder")
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        ap.error(f"--out {out}: cannot write there ({e})")


def drop_stale(png_path: str) -> None:
    """Removes the plot an earlier run left, where this run makes none."""
    if os.path.exists(png_path):
        os.remove(png_path)


def run_parts(args, argv, json_path: str, png_path: str, started: float, saved: list) -> dict:
    timer = harness.Timer(args.device)
    shapes = real_shapes(args.quick)
    counts = {k: sum(math.prod(s) for s in v) for k, v in shapes.items()}
    label = run_label(args.quick, counts)
    print(f"{label}; device {args.device}, {torch.get_num_threads()} threads, "
          f"parts: {' '.join(args.parts)}; {harness.huge_pages()}", flush=True)
    show = harness.progress_printer("roof")
    roof = harness.memory_roof(args.device, repeats=max(3, args.repeats // 2),
                               megabytes=32 if args.quick else 512)
    show.done(f"{roof['bytes_per_s'] / 1e9:.1f} GB/s")
    mix_roofs = {}
    if args.device == "cpu":  # the probe is a CPU kernel
        show = harness.progress_printer("roof per stream mix")
        mix_roofs = harness.stream_roofs(repeats=max(5, args.repeats // 2),
                                         megabytes=16 if args.quick else 256)
        show.done(", ".join(f"{k} {v['bytes_per_s'] / 1e9:.1f} GB/s ±{100 * v['spread']:.0f}%"
                            for k, v in mix_roofs.items()))
        roof["per_stream_mix"] = mix_roofs
    res = Results(roof["bytes_per_s"], args.device, mix_roofs)
    print(f"G {len(shapes['generator'])} tensors, D {len(shapes['discriminator'])} tensors; "
          f"roof {roof['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    extra: Dict[str, object] = {}
    curves = None
    payload = dict(benchmark="biggan128", label=label, machine=harness.machine(args.device),
                   argv=argv, quick=args.quick,
                   param_counts=counts, roof=roof)

    def save(status: str) -> None:
        # Rewritten after every part: an interrupted run keeps what it measured.
        payload.update(status=status, parts=res.data, scaling=curves,
                       iteration=extra.get("iteration"), seconds=time.time() - started)
        harness.write_json(json_path, payload)
        saved[0] = True

    runs = {"adam": lambda: part_adam(res, shapes, args, timer),
            "wrapper": lambda: part_wrapper(res, shapes, args, timer),
            "ema": lambda: part_ema(res, shapes, args, timer),
            "iteration": lambda: extra.__setitem__("iteration", part_iteration(res, args, timer)),
            "scaling": lambda: part_scaling(res, args, timer)}
    status = "complete"
    try:
        for part in (p for p in PARTS if p in args.parts and p != "roof"):
            t0 = time.time()
            result = runs[part]()
            if part == "scaling":
                curves = result
            save(f"running: {part} done")
            print(f"[{part}: {time.time() - t0:.0f} s, {time.time() - started:.0f} s so far; "
                  f"saved {json_path}]", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        status = "interrupted"
        print("\ninterrupted: results of the parts that finished", file=sys.stderr)
    print(res.table(label))
    if extra.get("iteration"):
        for name, e in extra["iteration"].items():
            print(f"iteration: optimizer share of the time, {name}: {100 * e['optimizer_share']:.1f}%")
    print(f"memory roof: {roof['bytes_per_s'] / 1e9:.1f} GB/s ({args.device}); "
          "ours moves 20 B/param in an update (beta1 = 0; 24 for tensors under "
          f"{KEEP_GRAD_MIN_NUMEL} elements, on the CPU under "
          f"{pygan_optim.FusedAdam.keep_grad_min_bytes_cpu / 2**20:g} MiB, and in a plain step()), "
          "torch fused 28, foreach/for-loop 72")
    save(status)
    if res.data or curves:
        plot(png_path, res, curves, label)
        plotted = f"plot: {png_path}"
    else:
        drop_stale(png_path)
        plotted = "no plot (no part measured)"
    print(f"raw samples: {json_path}; {plotted}; {status}, took "
          f"{time.time() - started:.0f} s")
    if status == "interrupted":
        sys.exit(130)
    return payload


if __name__ == "__main__":
    main()
