"""The parts that time optimizer steps and EMA updates (adam, wrapper, ema with
update+ema, scaling), each variant interleaved with the roof probes of its stream mixes."""
from __future__ import annotations

import gc
import math
from typing import Callable, Dict

import torch

import harness
import wrapper_step
from biggan_bytes import (OURS_EARLY, STEP_ONLY, UPDATE_EMA_BYTES, adam_bytes, adam_mixes,
                          merged, mix_names, mmagic_ema_split, ours_adam_bytes, ours_adam_split)
from biggan_models import SEED_HP
from biggan_results import Results, summary
from param_sets import STEADY_STEP, at_step, grad_refill, make_params, synthetic_sizes, update_call

import pygan_optim


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
