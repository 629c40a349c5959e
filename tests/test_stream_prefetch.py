"""The CPU loops' software prefetch (PYGAN_OPTIM_STREAM_PREFETCH) changes no bit.

The setting is read once per process, so each distance runs in a process of its
own, which writes its results to a file; the test compares them bit for bit
with the run without prefetches, and that one with torch's fused Adam.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pygan_optim import _ext

# Sizes around the 1 KB blocks of each element size (256 fp32, 512 fp16/bf16,
# 128 fp64), the streamed loop's 1000-element threshold and a 64K chunk; those
# from 32768 elements get state of their own, so their grads can be kept.
SIZES = (1, 15, 127, 128, 129, 255, 256, 257, 511, 512, 513, 999, 1000, 1025, 32768 + 255,
         65536 + 17)

RUN = r"""
import sys, torch, pygan_optim
from pygan_optim import _ext, ops
torch.manual_seed(0)
sizes, out = eval(sys.argv[1]), sys.argv[2]
results = {"ahead": _ext.stream_prefetch_bytes()}
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    # keep: updates that keep the grads as exp_avgs, decay 0 (the loop that reads
    # and writes no exp_avg) and 0.01 (the effective grad written over the grad).
    for betas, amsgrad, ema, keep, decay in (((0.0, 0.999), False, False, False, 0.01),
                                             ((0.0, 0.999), False, True, False, 0.01),
                                             ((0.0, 0.999), False, False, True, 0.0),
                                             ((0.0, 0.999), False, True, True, 0.01),
                                             ((0.9, 0.99), True, False, False, 0.01),
                                             ((0.5, 0.999), False, True, False, 0.01)):
        params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in sizes]
        averages = [p.detach().clone() for p in params]
        opt = pygan_optim.FusedAdam(params, lr=1e-2, betas=betas, amsgrad=amsgrad,
                                    weight_decay=decay)
        opt.keep_grad_min_bytes_cpu = 0  # keep whatever has state of its own
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            grads = [p.grad.data_ptr() for p in params]
            blend = pygan_optim.EmaBlend(zip(params, averages), 0.9) if ema else None
            if keep:
                opt.step_and_zero_grad(ema=blend)
                # The grads with state of their own became the exp_avgs.
                kept = [opt.state[p]["exp_avg"].data_ptr() == g for p, g in zip(params, grads)]
                assert kept == [n >= 32768 for n in sizes], (dtype, kept)
            else:
                opt.step(ema=blend) if blend else opt.step()
        key = f"{dtype} {betas} {amsgrad} {ema} {keep} {decay}"
        results[key] = ([p.detach().clone() for p in params], averages,
                        [{k: v.clone() for k, v in opt.state[p].items()} for p in params])
    moved = [torch.randn(n, dtype=dtype) for n in sizes]
    ops.ema_(moved, [torch.randn(n, dtype=dtype) for n in sizes], 0.75)
    results[f"{dtype} ema_"] = moved
torch.save(results, out)
"""


def bits(t):
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def run(tmp_path, ahead):
    out = tmp_path / f"ahead_{ahead}.pt"
    env = dict(os.environ, PYGAN_OPTIM_STREAM_PREFETCH=str(ahead), OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, "-c", RUN, repr(SIZES), str(out)], env=env, check=True,
                   timeout=600)
    return torch.load(out, weights_only=True)


def test_setting_in_range():
    assert 0 <= _ext.stream_prefetch_bytes() <= 65536


@pytest.mark.parametrize("value", ["abc", "-1", "65537", "", "2k"])
def test_bad_setting_fails_the_import_by_name(value):
    env = dict(os.environ, PYGAN_OPTIM_STREAM_PREFETCH=value)
    done = subprocess.run([sys.executable, "-c", "import pygan_optim"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"PYGAN_OPTIM_STREAM_PREFETCH='{value}'" in done.stderr
    assert "from 0 to 65536" in done.stderr


def test_prefetch_distances_change_no_bit(tmp_path):
    off = run(tmp_path, 0)
    assert off["ahead"] == 0
    # 64: the next line; 2048: the default on Intel; 4000: not a multiple of a line.
    for ahead in (64, 2048, 4000):
        on = run(tmp_path, ahead)
        assert on["ahead"] == ahead
        for key in off:
            if key == "ahead":
                continue
            flat_off = torch.utils._pytree.tree_leaves(off[key])
            flat_on = torch.utils._pytree.tree_leaves(on[key])
            assert len(flat_off) == len(flat_on)
            for a, b in zip(flat_off, flat_on):
                assert torch.equal(bits(a), bits(b)), (key, ahead)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="bit-for-bit against torch fused needs the FMA loops")
def test_without_prefetch_still_torch_fused_bit_for_bit(tmp_path):
    # The distance-0 process against torch's fused Adam in this one (the other
    # suites check the default distance against it). Only sizes without a tail
    # in torch's one-thread loop: its scalar tail may round differently (NOTES,
    # "Numerics").
    off = run(tmp_path, 0)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01, fused=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    finally:
        torch.set_num_threads(threads)
    ours = off[f"{torch.float32} (0.0, 0.999) False False False 0.01"][0]
    compared = 0
    for n, a, b in zip(SIZES, ours, params):
        if n % 64 == 0:
            assert torch.equal(a, b.detach()), n
            compared += 1
    assert compared == 3


def test_roof_probe_sums_alike_at_every_distance():
    n = 70000 + 13  # a vector tail and a partial block
    inputs = [torch.randn(n) for _ in range(3)]
    want = inputs[0] + inputs[1] + inputs[2]
    for ahead in (None, 0, 64, 2048, 4000):
        written_back = inputs[0].clone()
        fresh = torch.empty(n)
        _ext.stream_pass([written_back, inputs[1], inputs[2]], [written_back, fresh], ahead)
        # Summed left to right in float32, as the reference.
        assert torch.equal(written_back, want) and torch.equal(fresh, want), ahead


@pytest.mark.parametrize("ahead", [-1, 65537])
def test_roof_probe_refuses_a_distance_out_of_range(ahead):
    x = torch.zeros(100)
    with pytest.raises(RuntimeError, match="ahead must be a byte count from 0 to 65536"):
        _ext.stream_pass([x], [torch.empty(100)], ahead)
