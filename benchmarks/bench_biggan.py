"""BigGAN-128 benchmark: pygan_optim's fused path against the native PyTorch/MMEngine path.

    python benchmarks/bench_biggan.py                 # everything, on the CPU
    python benchmarks/bench_biggan.py --parts adam ema --repeats 9
    python benchmarks/bench_biggan.py --quick         # small and short (CI smoke test)

Parts (all in one process, variants interleaved, medians and spread):
  roof       the machine's memory roof: read-modify-write stream over 2 x 512 MB
  adam       optimizer step alone on the real BigGAN-128 G and D parameters:
             FusedAdam vs torch.optim.Adam for-loop (the seed config on the CPU), foreach, fused
  wrapper    whole wrapper step (AMP dynamic scale + clip_grad + Adam + zero_grad):
             FusedAmpOptimWrapper vs MMEngine's AmpOptimWrapper sequence on torch's GradScaler
  ema        EMA update of G: fused op vs per-parameter loop (MMagic) vs torch._foreach_lerp_
  iteration  one period of the seed schedule (8 D passes + D step, 8 G passes + G step, EMA)
             at a small batch, both configs, with the optimizer's share of the time
  scaling    step time vs parameter count (1M..160M) and vs tensor count (10..10k x 1k)
Writes a table to stdout, raw samples + machine facts to JSON, and a PNG plot.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import wrapper_step  # noqa: E402
from param_sets import make_params, synthetic_sizes  # noqa: E402

import pygan_optim  # noqa: E402
from pygan_optim.models import BigGANDiscriminator, BigGANGenerator  # noqa: E402

PARTS = ("roof", "adam", "wrapper", "ema", "iteration", "scaling")
SEED_HP = {"generator": dict(lr=1e-4, betas=(0.0, 0.999), eps=1e-6),
           "discriminator": dict(lr=4e-4, betas=(0.0, 0.999), eps=1e-6)}
ADAM_BYTES = 24  # beta1 = 0: exp_avg is written, not read (the floor every variant is charged)


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


class Results:
    def __init__(self, roof_bps: float):
        self.roof = roof_bps
        self.rows: List[list] = []
        self.data: Dict[str, dict] = {}

    def add(self, part: str, samples: Dict[str, List[float]], reference: str,
            bytes_per_variant: Dict[str, float], natives: List[str]) -> None:
        ref = harness.median(samples[reference])
        self.data[part] = {}
        for name, xs in samples.items():
            t = harness.median(xs)
            moved = bytes_per_variant.get(name)
            rate = moved / t if moved else float("nan")
            entry = dict(median_s=t, spread=harness.spread(xs), samples=xs, bytes=moved,
                         bytes_per_s=rate, roof_fraction=rate / self.roof,
                         speedup_of_ours=(t / ref) if name in natives else None)
            self.data[part][name] = entry
            self.rows.append([part, name, f"{t * 1e3:.2f} ±{entry['spread'] * 100:.0f}%",
                              f"{t / ref:.2f}x" if name in natives else "-",
                              "-" if math.isnan(rate) else f"{rate / 1e9:.1f}",
                              "-" if math.isnan(rate) else f"{100 * rate / self.roof:.0f}%"])

    def table(self) -> str:
        return harness.table(self.rows, ["part", "variant", "ms", "ours faster by", "GB/s", "of roof"])


def part_adam(res: Results, shapes, args, timer) -> None:
    for key in ("generator", "discriminator"):
        hp = SEED_HP[key]
        numel = sum(math.prod(s) for s in shapes[key])
        variants = {
            "pygan_optim FusedAdam": pygan_optim.FusedAdam(make_params(shapes[key], args.device), **hp),
            "torch Adam for-loop": torch.optim.Adam(make_params(shapes[key], args.device), foreach=False, **hp),
            "torch Adam foreach": torch.optim.Adam(make_params(shapes[key], args.device), foreach=True, **hp),
            "torch Adam fused": torch.optim.Adam(make_params(shapes[key], args.device), fused=True, **hp),
        }
        samples = harness.interleaved({k: o.step for k, o in variants.items()}, args.repeats, 2, timer,
                                      harness.progress_printer(f"adam {key}"))
        harness.end_progress()
        res.add(f"adam {key[0].upper()}", samples, "pygan_optim FusedAdam",
                {k: ADAM_BYTES * numel for k in samples}, [k for k in samples if k.startswith("torch")])
        del variants
        gc.collect()


def part_wrapper(res: Results, shapes, args, timer) -> None:
    for key in ("generator", "discriminator"):
        numel = sum(math.prod(s) for s in shapes[key])
        steps, refills = wrapper_step.variants(shapes[key], SEED_HP[key], args.device)
        samples = harness.interleaved(steps, args.repeats, 2, timer,
                                      harness.progress_printer(f"wrapper {key}"), setups=refills)
        harness.end_progress()
        moved = wrapper_step.bytes_per_param(beta1_zero=True)
        res.add(f"wrapper {key[0].upper()}", samples, wrapper_step.OURS,
                {k: v * numel for k, v in moved.items()}, [k for k in samples if k.startswith("native")])
        del steps, refills
        gc.collect()


def part_ema(res: Results, shapes, args, timer) -> None:
    momentum = 1e-4  # MMagic convention: weight of the new parameters
    src = [p.detach() for p in make_params(shapes["generator"], args.device, seed=2)]
    avgs = {k: [s.clone() for s in src] for k in ("ours", "loop", "lerp")}

    def loop():  # MMagic's ExponentialMovingAverage: per tensor mul_ then add_
        for a, s in zip(avgs["loop"], src):
            a.mul_(1 - momentum).add_(s, alpha=momentum)

    variants = {"pygan_optim ops.ema_": lambda: pygan_optim.ops.ema_(avgs["ours"], src, 1 - momentum),
                "per-parameter loop (MMagic)": loop,
                "torch._foreach_lerp_": lambda: torch._foreach_lerp_(avgs["lerp"], src, momentum)}
    samples = harness.interleaved(variants, args.repeats, 2, timer, harness.progress_printer("ema"))
    harness.end_progress()
    numel = sum(s.numel() for s in src)
    res.add("ema G", samples, "pygan_optim ops.ema_",
            {"pygan_optim ops.ema_": 12 * numel, "per-parameter loop (MMagic)": 20 * numel,
             "torch._foreach_lerp_": 12 * numel}, [k for k in samples if not k.startswith("pygan")])


def part_iteration(res: Results, args, timer) -> Dict[str, dict]:
    """One period of the seed schedule, both configs, from MMEngine-built wrappers."""
    from mmengine.logging import MessageHub
    from mmengine.optim import build_optim_wrapper

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

    def period(name):
        model, wrappers, batch, spent = rigs[name]
        spent[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(accu):  # discriminator_steps (1) x accumulative_counts data reads
            model.train_step(batch, wrappers)
        total = time.perf_counter() - t0
        samples[name].append(total)
        share[name].append(spent[0] / total)

    MessageHub.get_instance("pygan_optim_bench")
    repeats = max(1, args.iteration_repeats)
    period_fns = {n: (lambda n=n: period(n)) for n in rigs}
    for n in rigs:  # warm-up: allocates optimizer state
        period_fns[n]()
        samples[n].clear()
        share[n].clear()
    for r in range(repeats):
        for n in (list(rigs) if r % 2 == 0 else list(rigs)[::-1]):
            period_fns[n]()
        harness.progress_printer("iteration")(f"round {r + 1}/{repeats}")
    harness.end_progress()
    res.add("iteration (8 reads)", samples, "pygan_optim (fused)", {}, ["native (seed config)"])
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
                "pygan_optim FusedAdam": pygan_optim.FusedAdam(make_params(sizes, args.device), **hp).step,
                "torch Adam fused": torch.optim.Adam(make_params(sizes, args.device), fused=True, **hp).step,
                "torch Adam foreach": torch.optim.Adam(make_params(sizes, args.device), foreach=True, **hp).step,
            }
            samples = harness.interleaved(variants, max(3, args.repeats // 2), 2, timer,
                                          harness.progress_printer(f"scaling {axis} {point}"))
            harness.end_progress()
            numel = sum(sizes)
            floor = ADAM_BYTES * numel / res.roof
            curves[axis][point] = dict(numel=numel, tensors=len(sizes), floor_s=floor,
                                       **{k: harness.median(v) for k, v in samples.items()},
                                       samples=samples)
            if axis == "tensors" and point == 10000 or axis == "params" and point == totals[-1]:
                res.add(f"scaling {len(sizes)} tensors, {numel / 1e6:.1f}M", samples,
                        "pygan_optim FusedAdam", {k: ADAM_BYTES * numel for k in samples},
                        [k for k in samples if k.startswith("torch")])
            del variants
            gc.collect()
    return curves


def plot(path: str, res: Results, curves) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bar_parts = [p for p in res.data if p.split()[0] in ("adam", "wrapper", "ema")]
    fig, axes = plt.subplots(1, 1 + (2 if curves else 0), figsize=(16 if curves else 8, 5))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    ax = axes[0]
    labels, values, colors = [], [], []
    for part in bar_parts:
        for name, e in res.data[part].items():
            labels.append(f"{part}: {name}")
            values.append(e["median_s"] * 1e3)
            colors.append("tab:green" if name.startswith("pygan") else "tab:gray")
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms (median)")
    ax.set_title("BigGAN-128: optimizer step, wrapper step, EMA")
    if curves:
        for ax, axis, xlabel in ((axes[1], "params", "parameters (M)"),
                                 (axes[2], "tensors", "tensors of 1k elements")):
            pts = sorted(curves[axis])
            for name in ("pygan_optim FusedAdam", "torch Adam fused", "torch Adam foreach"):
                ax.plot(pts, [curves[axis][p][name] * 1e3 for p in pts], marker="o", label=name)
            ax.plot(pts, [curves[axis][p]["floor_s"] * 1e3 for p in pts], "k--", label="bandwidth floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ms per step")
            ax.legend(fontsize=7)
            ax.set_title(f"step time vs {axis}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--batch", type=int, default=1, help="batch size of the iteration part")
    ap.add_argument("--iteration-repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small models, few repeats: a smoke test")
    ap.add_argument("--out", default="bench_out", help="folder for biggan.json and biggan.png")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.iteration_repeats = 3, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    timer = harness.Timer(args.device)
    started = time.time()
    print(f"BigGAN-128 benchmark ({'quick' if args.quick else 'full'}), device {args.device}, "
          f"{torch.get_num_threads()} threads, parts: {' '.join(args.parts)}")
    roof = harness.memory_roof(args.device, repeats=max(3, args.repeats // 2),
                               megabytes=32 if args.quick else 512)
    res = Results(roof["bytes_per_s"])
    shapes = real_shapes(args.quick)
    counts = {k: sum(math.prod(s) for s in v) for k, v in shapes.items()}
    print(f"params: G {counts['generator'] / 1e6:.2f}M in {len(shapes['generator'])} tensors, "
          f"D {counts['discriminator'] / 1e6:.2f}M in {len(shapes['discriminator'])} tensors; "
          f"roof {roof['bytes_per_s'] / 1e9:.1f} GB/s")
    extra = {}
    if "adam" in args.parts:
        part_adam(res, shapes, args, timer)
    if "wrapper" in args.parts:
        part_wrapper(res, shapes, args, timer)
    if "ema" in args.parts:
        part_ema(res, shapes, args, timer)
    if "iteration" in args.parts:
        extra["iteration"] = part_iteration(res, args, timer)
    curves = part_scaling(res, args, timer) if "scaling" in args.parts else None
    print(res.table())
    if "iteration" in extra:
        for name, e in extra["iteration"].items():
            print(f"iteration: optimizer share of the time, {name}: {100 * e['optimizer_share']:.1f}%")
    print(f"memory roof: {roof['bytes_per_s'] / 1e9:.1f} GB/s ({args.device}); "
          f"Adam floor {ADAM_BYTES} B/param (beta1 = 0)")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "biggan.json")
    payload = dict(benchmark="biggan128", machine=harness.machine(args.device), argv=sys.argv[1:],
                   quick=args.quick, param_counts=counts, roof=roof, parts=res.data,
                   scaling=curves, seconds=time.time() - started)
    harness.write_json(json_path, payload)
    png_path = os.path.join(args.out, "biggan.png")
    plot(png_path, res, curves)
    print(f"raw samples: {json_path}; plot: {png_path}; took {time.time() - started:.0f} s")
    return payload


if __name__ == "__main__":
    main()
