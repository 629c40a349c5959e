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
import math
import os
import sys
import tempfile
import time
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
# The parts, their bytes and the report live in biggan_*.py; SEED_HP, model_cfgs,
# real_shapes and ours_adam_split stay importable from here for the other benchmarks.
from biggan_bytes import ours_adam_split  # noqa: E402,F401
from biggan_iteration import part_iteration  # noqa: E402
from biggan_models import SEED_HP, model_cfgs, real_shapes  # noqa: E402,F401
from biggan_plot import plot  # noqa: E402
from biggan_results import Results  # noqa: E402
from biggan_step_parts import part_adam, part_ema, part_scaling, part_wrapper  # noqa: E402

import pygan_optim  # noqa: E402
from pygan_optim.optim.adam import KEEP_GRAD_MIN_NUMEL  # noqa: E402

PARTS = ("roof", "adam", "wrapper", "ema", "iteration", "scaling")


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
          f"parts: {' '.join(args.parts)}; {harness.huge_pages()}; CPU loops "
          f"{pygan_optim.cpu_capability()}, prefetching {pygan_optim._ext.stream_prefetch_bytes()} "
          "bytes ahead", flush=True)
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
