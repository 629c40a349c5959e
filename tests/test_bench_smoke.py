"""Smoke test of the main benchmark: it runs in --quick mode and writes a JSON of
the documented shape with finite figures. Never a speed threshold."""
import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.slow
def test_biggan_benchmark_quick(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import bench_biggan
    finally:
        sys.path.remove(BENCH)
    bench_biggan.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "biggan.json").read_text())
    assert (tmp_path / "biggan.png").stat().st_size > 0
    assert {"cpu", "torch", "threads", "commit"} <= set(data["machine"])
    assert data["roof"]["bytes_per_s"] > 0
    expected_parts = {"adam G", "adam D", "wrapper G", "wrapper D", "ema G", "iteration (8 reads)"}
    assert expected_parts <= set(data["parts"])
    for part, variants in data["parts"].items():
        assert len(variants) >= 2, part
        for name, e in variants.items():
            assert len(e["samples"]) >= 1 and all(s > 0 for s in e["samples"]), (part, name)
            assert math.isfinite(e["median_s"]) and e["median_s"] > 0
            if e["speedup_of_ours"] is not None:
                assert math.isfinite(e["speedup_of_ours"]) and e["speedup_of_ours"] > 0
    for axis in ("params", "tensors"):
        points = data["scaling"][axis]
        assert len(points) >= 2
        for p in points.values():
            assert all(math.isfinite(p[k]) and p[k] > 0 for k in
                       ("pygan_optim FusedAdam", "torch Adam fused", "floor_s"))
