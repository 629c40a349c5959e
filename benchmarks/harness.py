"""Shared benchmark plumbing: interleaved timing, the memory roof, machine facts, output.

Every figure a benchmark prints is a median over repeats in which all variants
run in turn (rotated each round), so drift in the machine's speed hits them all
alike. The roof is measured in the same process: a read-modify-write stream
(a += s * b) over buffers far larger than the caches.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOF_BYTES_PER_ELEMENT = 12  # read a, read b, write a


class Timer:
    """Times callables on the CPU (perf_counter) or on CUDA (events)."""

    def __init__(self, device: str):
        self.device = torch.device(device)

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def interleaved(variants: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                timer: Timer, progress: Optional[Callable[[str], None]] = None,
                setups: Optional[Dict[str, Callable[[], object]]] = None,
                min_seconds: float = 0.0, max_rounds: int = 400) -> Dict[str, List[float]]:
    """Runs each variant `warmup` times, then rounds of all variants in rotating
    order: at least `repeats` rounds, and more (up to `max_rounds`) until the
    timed calls have taken `min_seconds`, so cheap cases get enough samples for a
    stable median. ``setups[name]``, if given, runs untimed before each call.
    Returns the timed samples (seconds) per variant."""
    names = list(variants)
    setups = setups or {}

    def once(name: str) -> float:
        if name in setups:
            setups[name]()
        return timer(variants[name])

    for name in names:
        for _ in range(warmup):
            once(name)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    spent, r = 0.0, 0
    while r < repeats or (spent < min_seconds and r < max_rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t = once(name)
            samples[name].append(t)
            spent += t
        r += 1
        if progress:
            progress(f"round {r}" + (f"/{repeats}" if spent >= min_seconds else ""))
    return samples


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def spread(xs: List[float]) -> float:
    """Half the inter-quartile range relative to the median: the +/- shown in tables."""
    if len(xs) < 4:
        return (max(xs) - min(xs)) / 2 / median(xs)
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / 2 / median(xs)


def memory_roof(device: str, repeats: int, megabytes: int = 512) -> Dict[str, object]:
    """Best read-modify-write bandwidth (bytes/s) of torch's add_ and pygan_optim's
    ema_ over two buffers of `megabytes` each; the faster of the two is the roof."""
    from pygan_optim import ops

    n = megabytes * (1 << 20) // 4
    a = torch.ones(n, device=device)
    b = torch.full((n,), 2.0, device=device)
    timer = Timer(device)
    samples = interleaved({
        "torch add_": lambda: a.add_(b, alpha=1e-3),
        "pygan ema_": lambda: ops.ema_([a], [b], 0.999),
    }, repeats=repeats, warmup=1, timer=timer)
    rates = {k: ROOF_BYTES_PER_ELEMENT * n / median(v) for k, v in samples.items()}
    del a, b
    return {"bytes_per_s": max(rates.values()), "per_probe": rates, "samples": samples,
            "buffer_mb": megabytes}


# Stream mixes of the kernels, as (arrays read, of them written back, arrays
# only written) in one pass: a write to an array just read costs no extra read
# for ownership; the probe writes a write-only one with streaming stores, which
# read nothing either (a plain store would read each line first).
STREAM_MIXES = {"3r+2w": (3, 2, 0),  # our Adam, grad kept as exp_avg: g, p, v in; p, v out
                "3r+3w": (3, 2, 1),  # our Adam writing exp_avg (beta1 = 0: not read)
                "4r+3w": (4, 3, 0),  # torch's fused Adam: g, p, m, v in; p, m, v out;
                                     # ours kept + EMA blend: g, p, v, e in; p, v, e out
                "4r+4w": (4, 3, 1),  # ours writing exp_avg + EMA blend
                "2r+1w": (2, 1, 0),  # EMA: ema, param in; ema out
                "1r+1w": (1, 1, 0)}  # read-modify-write (a scale or zeroing pass)


class RoofProbe:
    """The extension's roof probe (one pass over float32 arrays of `megabytes`
    each, on all threads) for some stream mixes (STREAM_MIXES), to be timed in
    the same rounds as the kernels it is set against: on these shared VMs the
    memory's speed jumps between about 50 and 95 GB/s within seconds, so a roof
    measured once at the start can be far from the one a later part ran under.

    calls() are variants to add to a part's interleaved rounds; roofs() takes
    their samples back out and turns them into bandwidths.

    Each mix is probed with and without software prefetches (PREFETCHES, and
    the kernels' own distance), and each round's roof is the faster of them:
    on an Intel Xeon (session 37) the kernels, which prefetch there, beat the
    probe that did not, while the probe itself ran faster without."""

    PREFIX = "roof probe "
    PREFETCHES = (0, 2048)

    def __init__(self, mixes, megabytes: int = 256):
        from pygan_optim import _ext

        self.mixes = sorted(set(mixes))
        self.n = megabytes * (1 << 20) // 4
        self.aheads = sorted(set(self.PREFETCHES) | {_ext.stream_prefetch_bytes()})
        count = max(STREAM_MIXES[m][0] + STREAM_MIXES[m][2] for m in self.mixes)
        # Written once (full, not zeros, whose untouched pages all map to one
        # zero page); zeros stay zeros, so repeated passes compute nothing new.
        self._arrays = [torch.full((self.n,), 0.0) for _ in range(count)]
        self._calls = {}
        for mix in self.mixes:
            reads, back, fresh = STREAM_MIXES[mix]
            ins = self._arrays[:reads]
            outs = self._arrays[reads - back:reads] + self._arrays[reads:reads + fresh]
            for ahead in self.aheads:
                self._calls[self._key(mix, ahead)] = (
                    lambda i=ins, o=outs, a=ahead: _ext.stream_pass(i, o, a))

    def _key(self, mix: str, ahead: int) -> str:
        return f"{self.PREFIX}{mix}" + (f" prefetching {ahead} B" if ahead else "")

    def calls(self) -> Dict[str, Callable[[], object]]:
        return dict(self._calls)

    def sample(self, repeats: int) -> Dict[str, List[float]]:
        """`repeats` interleaved rounds of the probes alone."""
        return interleaved(self.calls(), repeats=repeats, warmup=1, timer=Timer("cpu"))

    def roofs(self, samples: Dict[str, List[float]]) -> Dict[str, Dict[str, object]]:
        """Removes the probes' samples from `samples`; per mix, over each
        round's faster probe: the median bandwidth, its spread and the best,
        and each prefetch distance's median bandwidth."""
        out = {}
        for mix in self.mixes:
            by_ahead = {a: samples.pop(self._key(mix, a)) for a in self.aheads}
            xs = [min(round_) for round_ in zip(*by_ahead.values())]
            reads, back, fresh = STREAM_MIXES[mix]
            moved = 4 * self.n * (reads + back + fresh)
            out[mix] = dict(bytes_per_s=moved / median(xs), spread=spread(xs),
                            best_bytes_per_s=moved / min(xs), samples=xs, bytes=moved,
                            by_prefetch={a: moved / median(ts) for a, ts in by_ahead.items()})
        return out


def fraction_of_roof(moved: float, xs: List[float], roof: Dict[str, object]) -> float:
    """Median over rounds of a kernel's bandwidth (`moved` bytes in xs[r]
    seconds) over the probe's in the same round (`roof`: a RoofProbe.roofs
    entry whose samples were taken in the same interleaved rounds as xs): the
    memory's speed can change from one second to the next on these VMs."""
    return fraction_of_floor({"": moved}, xs, {"": roof})


def fraction_of_floor(split: Dict[str, float], xs: List[float],
                      roofs: Dict[str, Dict[str, object]]) -> float:
    """fraction_of_roof for a step whose tensors run kernels of different stream
    mixes (`split`: mix -> bytes moved in it): per round, its floor is the sum of
    each part's bytes at its own mix's roof in that round, over the time taken."""
    for mix in split:
        if len(roofs[mix]["samples"]) != len(xs):
            raise ValueError(f"{len(xs)} kernel samples but {len(roofs[mix]['samples'])} of "
                             f"the {mix or 'roof'} probe: they were not timed in the same rounds")
    floors = [sum(moved * roofs[mix]["samples"][r] / roofs[mix]["bytes"]
                  for mix, moved in split.items()) for r in range(len(xs))]
    return median([floor / x for floor, x in zip(floors, xs)])


def stream_roofs(repeats: int, megabytes: int = 256) -> Dict[str, Dict[str, object]]:
    """Per stream mix, the bandwidth of the extension's roof probe: median and
    spread over `repeats` interleaved rounds, so each kernel can be set against
    the roof of its own mix."""
    probe = RoofProbe(STREAM_MIXES, megabytes)
    return probe.roofs(probe.sample(repeats))


def child_argv(script: str, rounds: int, threads: int, quick: bool) -> List[str]:
    """The command that reruns `script` as a child of settings_in_processes."""
    return ([sys.executable, script, "--child", "--rounds", str(rounds), "--threads",
             str(threads)] + ["--quick"] * quick)


def settings_in_processes(argv: List[str], envs: Dict[str, Dict[str, str]],
                          processes: int) -> Dict[str, List[Dict[str, float]]]:
    """Runs `argv` (a child that prints a JSON object as its last line) in a
    process of its own per setting (`envs`: name -> environment added), for
    settings read once per process; `processes` per setting, their order
    reversed every other time (ABBA...). Returns name -> the children's objects."""
    out: Dict[str, List[Dict[str, float]]] = {name: [] for name in envs}
    for p in range(processes):
        for name in (list(envs) if p % 2 == 0 else list(envs)[::-1]):
            done = subprocess.run(argv, env=dict(os.environ, **envs[name]), check=True,
                                  capture_output=True, text=True)
            out[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def process_table(results: Dict[str, List[Dict[str, float]]], rows, width: int) -> str:
    """One line per row, one column per setting: the median over the processes
    of their values (seconds, shown in ms) and their range."""
    lines = [f"{'ms (median of process medians, range)':{width}s}" +
             "".join(f"{name:>24s}" for name in results)]
    for row in rows:
        cells = []
        for runs in results.values():
            ms = [run[row] * 1e3 for run in runs]
            cells.append(f"{statistics.median(ms):7.2f} ({min(ms):.2f}-{max(ms):.2f})")
        lines.append(f"{row:{width}s}" + "".join(f"{c:>24s}" for c in cells))
    return "\n".join(lines)


def machine(device: str) -> Dict[str, object]:
    import pygan_optim

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_kernels": pygan_optim.cpu_capability(),
        "cpu_prefetch_bytes": pygan_optim._ext.stream_prefetch_bytes(),
        "device": device,
        "commit": _commit(),
        "huge_pages": huge_pages(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def huge_pages() -> str:
    """Whether torch's CPU allocator asks for transparent huge pages, and the
    kernel's mode (which decides whether it gets them)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "unknown"
    return (f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, "
            f"kernel THP mode {mode}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10,
                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Progress:
    """Progress lines on stderr: one line rewritten in place on a terminal; in a
    log (stderr not a TTY), a plain line at most every `every` seconds and at the
    end, so a log shows steady progress without one endless line."""

    def __init__(self, prefix: str, every: float = 10.0):
        self.prefix, self.every = prefix, every
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.message = ""

    def __call__(self, message: str) -> None:
        self.message = message
        if self.tty:
            print(f"\r  {self.prefix}: {message}   ", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(f"  {self.prefix}: {message}", file=sys.stderr, flush=True)

    def done(self, message: str = "done") -> None:
        if self.tty:
            print("\r" + " " * 78 + "\r", end="", file=sys.stderr, flush=True)
        print(f"  {self.prefix}: {message}", file=sys.stderr, flush=True)


def progress_printer(prefix: str) -> Progress:
    return Progress(prefix)


def end_progress() -> None:
    """Kept for the other benchmarks: ends a terminal progress line."""
    if sys.stderr.isatty():
        print("\r" + " " * 78 + "\r", end="", file=sys.stderr, flush=True)


def strict_json(value):
    """`value` with every NaN or infinity as None (null): JSON (RFC 8259) has no
    NaN, and strict readers (JavaScript's JSON.parse, serde_json, Go) refuse one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str, payload: Dict[str, object]) -> None:
    """Writes `payload` as strict JSON: a figure that has no value (NaN) is null."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(strict_json(payload), f, indent=1, default=str, allow_nan=False)


def table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def synthetic_set_args(doc: str, default_json: str, repeats: int,
                       extra: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                       argv=None) -> argparse.Namespace:
    """Command line of the benchmarks over a synthetic parameter set: parses it,
    applies --threads and shrinks the run for --quick."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--params", type=float, default=70.0, help="millions of parameters")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--quick", action="store_true", help="small and short: a smoke test")
    ap.add_argument("--json", default=default_json)
    if extra:
        extra(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.params, args.repeats = min(args.params, 4.0), 3
    return args
