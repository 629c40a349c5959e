"""The main benchmark's command line and outputs as a user meets them: bad
arguments refused at once in one line, an interrupt at any point leaves a
message and a JSON that says so, and what it writes reads as it should. Each
test runs a tiny part (--quick) or stops before any work."""
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCH, "bench_biggan.py")


def run(*args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_usage_error(proc, words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and words in last, last
    # Refused before any measuring.
    assert "roof:" not in proc.stderr and proc.stdout == "", proc.stdout


@pytest.mark.parametrize("flag,value", [("--repeats", "0"), ("--repeats", "-1"),
                                        ("--threads", "0"), ("--threads", "-2"),
                                        ("--batch", "0"), ("--iteration-repeats", "0")])
def test_bad_counts_are_refused_in_one_line(tmp_path, flag, value):
    # --quick used to overwrite --repeats, and --threads 0 was ignored; --repeats 0
    # crashed with a StatisticsError after the roof, --batch 0 in the iteration part
    # after every other part, --threads -2 with set_num_threads' traceback.
    proc = run("--quick", "--parts", "roof", flag, value, "--out", str(tmp_path))
    assert_usage_error(proc, flag)


def test_out_that_is_a_file_is_refused_before_measuring(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    assert_usage_error(run("--quick", "--parts", "ema", "--out", str(target)), "--out")


def test_out_whose_json_cannot_be_written_is_refused_before_measuring(tmp_path):
    # The JSON was first written after the first part: a path that cannot take it
    # crashed there, after that part's work.
    (tmp_path / "biggan.json").mkdir()
    assert_usage_error(run("--quick", "--parts", "ema", "--out", str(tmp_path)), "--out")


def test_quick_keeps_explicit_repeats(tmp_path):
    proc = run("--quick", "--parts", "ema", "--repeats", "4", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "biggan.json").read_text())
    assert data["parts"]["ema G"], data["parts"]
    for name, e in data["parts"]["ema G"].items():
        assert len(e["samples"]) == 4, (name, len(e["samples"]))


def test_interrupt_before_the_first_part_is_a_message_not_a_traceback(tmp_path):
    """Ctrl-C while the models are built or the roof is measured (the first
    seconds of make bench): exit 130, a line saying so, and a JSON marked
    interrupted in place of whatever an earlier run left there."""
    (tmp_path / "biggan.json").write_text(json.dumps(dict(status="complete", parts={"adam G": {}})))
    proc = subprocess.Popen([sys.executable, SCRIPT, "--parts", "roof", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()  # printed (flushed) once the models are built
    assert first.startswith("BigGAN-128"), first
    proc.send_signal(signal.SIGINT)  # the roof (2 x 512 MB, then the probes) takes seconds
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "interrupted" in err
    data = json.loads((tmp_path / "biggan.json").read_text())
    assert data["status"] == "interrupted" and data["parts"] == {}


def test_a_run_without_a_plot_does_not_point_at_an_old_one(tmp_path):
    old = tmp_path / "biggan.png"
    old.write_bytes(b"an earlier run's plot")
    proc = run("--quick", "--parts", "roof", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    named = f"plot: {old}" in proc.stdout
    stale = old.exists() and old.read_bytes() == b"an earlier run's plot"
    assert not (named and stale), proc.stdout.splitlines()[-1]


@pytest.fixture(scope="module")
def quick_adam_iteration(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run("--quick", "--parts", "adam", "iteration", "--out", str(out), timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, (out / "biggan.json").read_text()


def test_json_is_strict_json(quick_adam_iteration):
    """NaN is not JSON (RFC 8259): strict readers (JSON.parse, serde_json, Go's
    encoding/json) refuse the file. The iteration rows have no bytes moved."""
    _, text = quick_adam_iteration

    def refuse(constant):
        raise ValueError(f"{constant} in the JSON")
    data = json.loads(text, parse_constant=refuse)
    assert data["parts"]["iteration (8 reads)"]


def test_roof_measured_at_the_start_is_not_named_as_a_probe_mix(quick_adam_iteration):
    """The for-loop and foreach rows are set against the read-modify-write roof
    of the start (a += s * b: two reads, one write), not against the 1r+1w probe
    that the wrapper rows use; their label must not say 1r+1w."""
    out, text = quick_adam_iteration
    entry = json.loads(text)["parts"]["adam G"]["torch Adam for-loop"]
    assert entry["roof_measured"] == "at the start"
    assert not entry["roof_mix"].startswith("1r+1w"), entry["roof_mix"]
    row = next(ln for ln in out.splitlines() if ln.startswith("adam G") and "for-loop" in ln)
    assert "of 1r+1w" not in row, row


def test_table_says_what_its_columns_mean(quick_adam_iteration):
    out, _ = quick_adam_iteration
    assert "inter-quartile" in out  # what the ± is
    assert "of roof" in out and "probe" in out  # what "42% of 3r+3w" is set against


def test_plot_says_slower_where_ours_is_slower(monkeypatch, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.axes

    sys.path.insert(0, BENCH)
    try:
        import bench_biggan
    finally:
        sys.path.remove(BENCH)
    texts = []
    real_text = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: texts.append(s) or real_text(self, x, y, s, *a, **k))
    res = bench_biggan.Results(1e10, "cpu")
    common = dict(spread=0.01, note="", bytes=None, numel=1, roof_fraction=float("nan"))
    res.data["ema G"] = {"ours": dict(common, median_s=0.010, speedup_of_ours=None),
                         "theirs": dict(common, median_s=0.005, speedup_of_ours=0.5)}
    bench_biggan.plot(str(tmp_path / "p.png"), res, None, "t")
    label = next(t for t in texts if t.startswith("ours"))
    assert "slower" in label and "faster" not in label, label


def test_readme_documents_every_json_field(quick_adam_iteration):
    _, text = quick_adam_iteration
    data = json.loads(text)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    fields = set(data) | {k for variants in data["parts"].values()
                          for e in variants.values() for k in e}
    missing = sorted(k for k in fields if f"`{k}`" not in readme)
    assert not missing, missing


def test_two_samples_each_give_no_verdict():
    """Session 39: the iteration part's two periods read "ours slower" (0.92x) where
    four periods gave 1.06x: two samples cannot tell a difference from drift."""
    sys.path.insert(0, BENCH)
    try:
        import bench_biggan
    finally:
        sys.path.remove(BENCH)
    res = bench_biggan.Results(1e10, "cpu")
    res.add("iteration", {"ours": [41.8, 42.6], "native": [41.0, 36.7]}, "ours",
            {}, ["native"])
    note = res.data["iteration"]["native"]["note"]
    assert note == "2 samples each: too few to tell a difference from the machine's drift"
    res.add("adam", {"ours": [1.0, 1.0, 1.01], "native": [0.5, 0.5, 0.51]}, "ours",
            {}, ["native"])
    assert res.data["adam"]["native"]["note"] == "ours slower"
