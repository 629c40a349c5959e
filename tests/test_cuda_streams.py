"""Checks only a real GPU can make (skipped without one; make gpu-check runs
them). Interpret mode has no streams, copies tables at once, runs one block at
a time and uses the host's libm.

- cached tables reused on another stream wait for their copy (session 29's
  CUDA review, F1: a second stream read a table before its copy had landed);
- the kernels' bits against the CPU backend's: float32 exactly; float64 within
  a few ulps (the device's pow may differ from glibc's by 2 ulp);
- a FusedAdam step on a side stream while the default one is busy;
- tensors on a device other than the current one (two GPUs).
Written by a review helper in session 29; never run on a GPU yet.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """A sticky CUDA error (illegal address) would poison this process: run apart."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))


# TableStore / DeviceTableCache handed a table uploaded on stream A to a call
# on stream B without ordering B after A's host-to-device copy.
F1_CODE = """
    import torch
    from pygan_optim import ops
    torch.manual_seed(0)
    xs = [torch.randn(n, device="cuda") for n in (5, 65537, 3)]  # new addresses: a new entry
    expect = torch.cat([x.double() for x in xs]).norm().item()
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    # Warm-up on other tensors of the same sizes: both streams' memory pools and a
    # pinned host block exist, so no cudaMalloc/cudaHostAlloc (which may
    # synchronize the device) happens between the sleep and the second call.
    for s in (a, b):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ops.l2_norm([torch.randn(n, device="cuda") for n in (5, 65537, 3)])
    torch.cuda.synchronize()
    with torch.cuda.stream(a):
        # Garbage where the table will be allocated on stream a (freed blocks keep it).
        junk = [torch.full((512,), 0xFF, dtype=torch.uint8, device="cuda") for _ in range(16)]
        del junk
        torch.cuda._sleep(400_000_000)          # ~0.2-0.3 s of work ahead of the copy
        ta, _ = ops.l2_norm(xs)                 # uploads: the copy waits behind the sleep
    with torch.cuda.stream(b):
        tb, _ = ops.l2_norm(xs)                 # same bytes: reuses the table at once
    torch.cuda.synchronize()
    print("a", ta.item(), "b", tb.item(), "expect", expect)
    assert abs(ta.item() - expect) < 1e-4 * expect
    assert abs(tb.item() - expect) < 1e-4 * expect, "stream b read the table before its copy"
    print("ok")
"""


def test_tables_reused_on_another_stream_wait_for_their_copy():
    """Two concurrent read-only l2_norm calls on two streams (legal in torch).
    Before session 29 the second call's kernel could read the table before the
    first call's copy had landed: a wrong norm or an illegal memory access."""
    result = _run_isolated(F1_CODE)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


def _one_element_case(dtype, steps, device):
    """One one-element tensor per step value: the coefficients of every step
    count in one call."""
    k = len(steps)
    gen = torch.Generator().manual_seed(5)
    mk = lambda: (torch.rand(k, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    p, g, m, v = mk(), mk(), mk(), mk()
    # Views of one buffer each (disjoint, so the op accepts them): few host ops.
    lists = [list(t.to(device).split(1)) for t in (p, g, m, v)]
    st = list(torch.tensor(steps, dtype=torch.float32, device=device).split(1))
    return lists + [st]


def _bits_mismatch(dtype, steps, **kw):
    from pygan_optim import _ext, ops
    if _ext.cpu_capability() == "default":
        pytest.skip("the default CPU loops round a*b+c twice; CUDA fuses it")
    out = {}
    for device in ("cuda", "cpu"):
        params, grads, m, v, st = _one_element_case(dtype, steps, device)
        ops.adam_step_(params, grads, m, v, st, **kw)
        out[device] = torch.cat([t.cpu() for t in params])
    int_t = torch.int64 if dtype == torch.float64 else torch.int32
    diff = (out["cuda"].view(int_t) - out["cpu"].view(int_t)).abs()
    return int((diff != 0).sum()), int(diff.max())


STEPS = list(range(0, 20000)) + list(range(20000, 1_000_000, 97))


def test_fp32_bits_equal_the_cpu_backend():
    """The float path: coefficients rounded to float32 hide pow's last bits."""
    n, worst = _bits_mismatch(torch.float32, STEPS, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)
    assert n == 0, f"{n} of {len(STEPS)} params differ (worst {worst} ulp)"


def test_fp64_bits_within_a_few_ulps_of_the_cpu_backend():
    """The double path uses the double coefficients as they are: CUDA's pow
    (up to 2 ulp off) against glibc's can move the last bits of the bias
    corrections, and through them of the update: a few ulps at most."""
    n, worst = _bits_mismatch(torch.float64, STEPS, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)
    assert worst <= 4, f"{n} of {len(STEPS)} params differ (worst {worst} ulp)"


def test_side_stream_step_matches_torch():
    """FusedAdam stepping on a non-default stream while the default one is busy:
    the zeroed counters, the table copy and the launch all go to that stream."""
    from pygan_optim.optim import FusedAdam
    torch.manual_seed(1)
    ours = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (3, 70000, 1000)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = FusedAdam(ours, lr=1e-2, betas=(0.0, 0.999))
    ref = torch.optim.Adam(theirs, lr=1e-2, betas=(0.0, 0.999), foreach=False)
    side = torch.cuda.Stream()
    for k in range(3):
        for p, q in zip(ours, theirs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        side.wait_stream(torch.cuda.current_stream())
        torch.cuda._sleep(50_000_000)  # the default stream is busy meanwhile
        with torch.cuda.stream(side):
            opt.step()
        torch.cuda.current_stream().wait_stream(side)
        ref.step()
    torch.cuda.synchronize()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_params_on_a_device_other_than_the_current_one():
    from pygan_optim import ops, reference
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    xs = [torch.randn(n, device=dev) for n in (5, 65537)]
    found = torch.zeros((), device=dev)
    total, _ = ops.l2_norm(xs, found_inf=found)
    torch.testing.assert_close(total, reference.l2_norm(xs)[0])
    ema = [x.clone() for x in xs]
    ops.ema_(ema, [x * 2 for x in xs], 0.5)
    steps = [torch.zeros((), device=dev) for _ in xs]
    ops.adam_step_(xs, [torch.randn_like(x) for x in xs], [torch.zeros_like(x) for x in xs],
                   [torch.zeros_like(x) for x in xs], steps, lr=1e-2, beta1=0.9, beta2=0.999,
                   eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)
    torch.cuda.synchronize(dev)
    assert all(s.item() == 1.0 for s in steps)
