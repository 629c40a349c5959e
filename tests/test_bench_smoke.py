"""Smoke test of the main benchmark: it runs in --quick mode and writes a JSON of
the documented shape with finite figures. Never a speed threshold."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.slow
def test_biggan_benchmark_quick(tmp_path, monkeypatch):
    # main() sets THP_MEM_ALLOC_ENABLE when unset: undone after the test, so the
    # processes later tests spawn keep the environment they were given.
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    sys.path.insert(0, BENCH)
    try:
        import bench_biggan
    finally:
        sys.path.remove(BENCH)
    bench_biggan.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "biggan.json").read_text())
    assert (tmp_path / "biggan.png").stat().st_size > 0
    assert data["status"] == "complete"
    assert data["label"].startswith("BigGAN-32 (--quick")  # never labelled BigGAN-128
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
    # Our Adam is set against the roof probed in its own part's rounds (CPU).
    for part in ("adam G", "adam D", "ema G", "update+ema G"):
        ours = next(e for e in data["parts"][part].values() if e["speedup_of_ours"] is None)
        assert ours["roof_measured"] == "in this part", part
        assert ours["roof_bytes_per_s"] > 0
        assert math.isfinite(ours["roof_fraction"]) and ours["roof_fraction"] > 0, part
    for axis in ("params", "tensors"):
        points = data["scaling"][axis]
        assert len(points) >= 2
        for p in points.values():
            assert all(math.isfinite(p[k]) and p[k] > 0 for k in
                       ("pygan_optim FusedAdam", "torch Adam fused", "floor_s", "times_floor",
                        "roof_bytes_per_s"))


def test_fraction_of_roof_pairs_each_round_with_its_probe():
    """Each round's kernel bandwidth over the probe's of the same round, then the
    median: a slow probe round must not make a fast kernel round look better."""
    sys.path.insert(0, BENCH)
    try:
        import harness
    finally:
        sys.path.remove(BENCH)
    # Kernel: 100 bytes in 1 s, 2 s, 4 s (100, 50, 25 B/s). Probe: 200 bytes in 1 s, 4 s,
    # 1 s (200, 50, 200 B/s). Per round 0.5, 1.0, 0.125: median 0.5. Against the probe's
    # median alone (200 B/s) the kernel's median (50 B/s) would give 0.25.
    roof = dict(samples=[1.0, 4.0, 1.0], bytes=200.0)
    assert harness.fraction_of_roof(100.0, [1.0, 2.0, 4.0], roof) == 0.5
    with pytest.raises(ValueError, match="same rounds"):
        harness.fraction_of_roof(100.0, [1.0, 2.0], roof)  # not the same rounds


def test_fraction_of_floor_sets_each_part_against_its_own_mix():
    """A step whose tensors run two kernels: its floor in a round is each part's
    bytes at its own mix's roof in that round, summed."""
    sys.path.insert(0, BENCH)
    try:
        import harness
    finally:
        sys.path.remove(BENCH)
    # Round 0: 300 B at 300 B/s (1 s) + 100 B at 100 B/s (1 s) = a 2 s floor, taken in
    # 4 s: 0.5. Round 1: both probes twice as fast, 1 s floor in 1 s: 1.0. Round 2:
    # 1 s + 0.5 s = 1.5 s floor in 1.5 s: 1.0. Median 1.0; against the faster mix's
    # roof alone, 400 B at 300 B/s would give 1.33 s in round 0.
    roofs = {"fast": dict(samples=[1.0, 0.5, 1.0], bytes=300.0),
             "slow": dict(samples=[1.0, 0.5, 0.5], bytes=100.0)}
    split = {"fast": 300.0, "slow": 100.0}
    assert harness.fraction_of_floor(split, [4.0, 1.0, 1.5], roofs) == 1.0
    assert harness.fraction_of_floor(split, [4.0, 4.0, 3.0], roofs) == 0.5
    with pytest.raises(ValueError, match="slow probe"):
        harness.fraction_of_floor(split, [1.0, 2.0, 3.0],
                                  dict(roofs, slow=dict(samples=[1.0], bytes=100.0)))


@pytest.mark.slow
def test_interrupted_run_keeps_what_it_measured(tmp_path):
    """Ctrl-C after the first part: the JSON written after that part stays, is
    marked interrupted, and the table of the finished parts is printed."""
    json_path = tmp_path / "biggan.json"
    # SIGINT back to its default in the child: a shell that runs this suite in the
    # background hands SIGINT down ignored, and Python then installs no handler.
    proc = subprocess.Popen([sys.executable, os.path.join(BENCH, "bench_biggan.py"), "--quick",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not json_path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert json_path.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    data = json.loads(json_path.read_text())
    assert data["status"] == "interrupted"
    assert {"adam G", "adam D"} <= set(data["parts"])
    assert "iteration (8 reads)" not in data["parts"]
    assert "adam G" in out and "interrupted" in err


@pytest.mark.slow
def test_release_benchmark_quick():
    """bench_release.py runs each page-size setting in its own processes and
    prints a row per timed phase with a finite time for both."""
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_release.py"), "--quick",
                          "--processes", "1", "--rounds", "2"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    assert "kernel THP mode" in out
    for row in ("new grads", "release grads", "pygan_optim update", "torch fused update"):
        line = next(ln for ln in out.splitlines() if ln.startswith(row))
        medians = [float(cell.split(" (")[0]) for cell in line[40:].split(")")[:2]]
        assert len(medians) == 2 and all(math.isfinite(m) and m >= 0 for m in medians), line


@pytest.mark.slow
def test_prefetch_benchmark_quick():
    """bench_prefetch.py runs each distance in processes of its own (which
    report the distance they ran at) and prints a finite time per row and
    distance."""
    out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_prefetch.py"), "--quick",
                          "--processes", "1", "--rounds", "2", "--aheads", "0", "64"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    assert "0 B ahead" in out and "64 B ahead" in out
    for row in ("G update", "G plain step", "G update + EMA", "10k x 1k plain step"):
        line = next(ln for ln in out.splitlines() if ln.startswith(row + " "))
        medians = [float(cell.split(" (")[0]) for cell in line[38:].split(")")[:2]]
        assert len(medians) == 2 and all(math.isfinite(m) and m > 0 for m in medians), line
