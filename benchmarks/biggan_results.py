"""The benchmark's results: each part's variants with their medians, speed-ups,
bandwidth and fraction of the roof, as table rows (Results.table) and as the JSON's
"parts" (Results.data), with notes on figures not to be read at face value."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import harness


def mix_label(mix) -> str:
    """A variant's stream mix as the table shows it: 3r+2w, or 3r+2w/3r+3w."""
    return "/".join(sorted(mix)) if isinstance(mix, dict) else mix


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
                              roof, min(len(xs), len(samples[reference])))
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

    def _note(self, speedup, spread, rate, working_set, ours_s, roof, samples) -> str:
        """Why a figure should not be read at face value, or why ours is slower.
        `samples`: the fewer of ours' and this variant's."""
        notes = []
        # Two samples (the iteration part's default periods) give a range but not
        # the machine's drift: session 39's 0.92x of two periods was 1.06x of four.
        few = speedup is not None and samples < 3
        if few:
            notes.append("one sample each: no spread to judge the difference by" if samples < 2
                         else f"{samples} samples each: too few to tell a difference from the "
                         "machine's drift")
        if not math.isnan(rate) and rate > roof:
            notes.append("above the roof: runs from cache" if self.cache and
                         0 < working_set <= self.cache else
                         "above the probes' median: the memory sped up between rounds")
        if speedup is None or few:
            pass
        elif abs(speedup - 1.0) < spread:
            notes.append("noise: spread larger than the difference")
        elif speedup < 1.0:
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
