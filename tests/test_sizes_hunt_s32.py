"""Sizes and index arithmetic that only large or odd inputs reach (session 32 hunt).

Every element of an Adam step is computed on its own, so a tensor's results may not
depend on where it lies or how it is cut: at an offset past 2^31 elements (byte
offsets past 2^32), in a permuted or offset view, beside empty tensors or tensors
of other dtypes. The tests compare such tensors with small contiguous copies run
through the same op (bit for bit), on the CPU backend and in CUDA interpret mode.

Huge inputs are reached cheaply through anonymous memory maps: their pages cost
nothing until written, and read as zeros. The one Adam step over a tensor of
2^31 + 1000 elements writes three of them (12 GiB in bf16) and runs only with
PYGAN_OPTIM_HUGE_TESTS=1 (PYGAN_OPTIM_HUGE_TESTS=interpret adds interpret mode,
about 5 minutes on 2 cores).
"""
import mmap
import os

import pytest
import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from pygan_optim import FusedAdam, _ext, cuda_interpret, ops
from pygan_optim.optim import EmaBlend, state_arena

BACKENDS = ["cpu", "interpret"]
ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def _run(backend, fn, *args, **kwargs):
    if backend == "interpret":
        with cuda_interpret.enabled():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def _lazy(numel, dtype):
    """A zero tensor of `numel` elements over an anonymous map: pages cost memory
    only once written (reads map the shared zero page). Skips where the address
    space cannot be had."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    try:
        # Private: a shared anonymous map is shmem, whose reads allocate pages.
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError, ValueError) as e:  # overcommit refused, 32-bit
        pytest.skip(f"no {nbytes / 2**30:.1f} GiB of address space: {e}")
    return torch.frombuffer(region, dtype=dtype, count=numel)


def _mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


# ---- chunk planning -------------------------------------------------------------


@pytest.mark.parametrize("numels", [[2**31 + 1000], [0, 2**31, 0, 1], [2**32 + 1, 3, 0],
                                    [2**31 - 1], [65536 * 3, 0, 65535, 65537]])
@pytest.mark.parametrize("tasks", [1, 2, 3, 64])
def test_chunks_cover_every_tensor_exactly_past_2_31_elements(numels, tasks):
    size = _ext.DEFAULT_CHUNK_SIZE
    chunks = _ext.plan_chunks(numels)
    for t, n in enumerate(numels):
        mine = [(b, e) for owner, b, e in chunks if owner == t]
        assert all(0 < e - b <= size for b, e in mine)  # no empty or oversized chunk
        assert [b for b, _ in mine] == list(range(0, n, size))
        assert (mine[-1][1] if mine else 0) == n
    offsets = _ext.partition_chunks(numels, size, tasks)
    assert len(offsets) == tasks + 1 and offsets[0] == 0 and offsets[-1] == len(chunks)
    assert all(a <= b for a, b in zip(offsets, offsets[1:]))


# ---- offsets past 2^31 elements (byte offsets past 2^32), no memory cost ----------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_on_views_at_offsets_past_2_31_elements_match_small_copies(backend):
    n = 70000  # two chunks and a tail
    buf = _lazy(2**31 + 400000, torch.bfloat16)
    # Odd offsets: the views start at a 2-byte, not 16-byte, boundary, except one.
    offsets = [2**31 - 20000 + 3, 2**31 + 60001, 2**31 + 150000, 2**31 + 230000 + 1]
    p, g, m, v = (buf[o:o + n] for o in offsets)
    gen = torch.Generator().manual_seed(0)
    for t in (p, g, m, v):
        t.copy_(torch.randn(n, generator=gen).bfloat16())
    v.abs_()
    small = [t.clone() for t in (p, g, m, v)]
    big_step, small_step = torch.tensor(2.0), torch.tensor(2.0)
    _run(backend, ops.adam_step_, [p], [g], [m], [v], [big_step], **ADAM)
    _run(backend, ops.adam_step_, [small[0]], [small[1]], [small[2]], [small[3]],
         [small_step], **ADAM)
    for big, copy in zip((p, g, m, v), small):
        assert torch.equal(big, copy)
    assert big_step.item() == small_step.item() == 3.0

    found_inf = torch.zeros(1)
    _run(backend, ops.scale_, [g], 0.5, found_inf)
    _run(backend, ops.scale_, [small[1]], 0.5, found_inf)
    _run(backend, ops.ema_, [m], [p], 0.9)
    _run(backend, ops.ema_, [small[2]], [small[0]], 0.9)
    assert torch.equal(g, small[1]) and torch.equal(m, small[2])
    norms = _run(backend, ops.l2_norm, [p, g], 1.0)[1]
    assert torch.equal(norms, _run(backend, ops.l2_norm, small[:2], 1.0)[1])
    assert found_inf.item() == 0.0


def test_l2_norm_of_a_tensor_of_2_31_plus_1000_elements():
    """Read only, so its untouched pages cost nothing: the elements around the
    2^31 boundary and the last one count once each (CPU; ~2 s)."""
    n = 2**31 + 1000
    x = _lazy(n, torch.bfloat16)
    for index, value in ((0, 1.0), (2**31 - 1, 2.0), (2**31, 4.0), (n - 1, 8.0)):
        x[index] = value
    found_inf = torch.zeros(1)
    total, per_tensor = ops.l2_norm([torch.ones(3), x], 1.0, found_inf)
    assert per_tensor.tolist() == [pytest.approx(3**0.5), pytest.approx(85**0.5)]
    assert total.item() == pytest.approx(88**0.5)
    assert found_inf.item() == 0.0
    x[2**31 + 999] = float("inf")
    ops.l2_norm([x], 1.0, found_inf)
    assert found_inf.item() == 1.0


# ---- odd layouts and empty tensors: the same bits as contiguous copies -------------


def _relaid(t, layout):
    """t's values in a permuted dense view, or in a view at an odd storage offset."""
    if layout == "permuted" and t.dim() > 1:
        dims = list(range(t.dim()))[::-1]
        out = torch.empty([t.shape[d] for d in dims], dtype=t.dtype).permute(
            *[dims.index(d) for d in range(t.dim())])
    elif layout == "offset":
        out = torch.empty(t.numel() + 8, dtype=t.dtype)[3:3 + t.numel()].view(t.shape)
    else:
        out = torch.empty_like(t)
    return out.copy_(t)


SHAPES = [(3, 5, 7), (0,), (65536 + 9,), (2, 0, 3), (33, 2049), (), (7, 1, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["permuted", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_permuted_offset_and_empty_tensors_step_as_contiguous_copies(backend, layout, dtype,
                                                                     beta1):
    gen = torch.Generator().manual_seed(1)
    lists = {k: [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
             for k in ("p", "g", "m", "v", "e")}
    lists["v"] = [t.abs() for t in lists["v"]]
    odd = {k: [_relaid(t, layout) for t in ts] for k, ts in lists.items()}
    if layout == "permuted":
        assert not odd["p"][0].is_contiguous() and is_non_overlapping_and_dense(odd["p"][0])
    else:
        assert odd["p"][0].storage_offset() == 3
    results = []
    for tensors in (lists, odd):
        steps = [torch.tensor(4.0) for _ in SHAPES]
        _run(backend, ops.adam_step_, tensors["p"], tensors["g"], tensors["m"], tensors["v"],
             steps, **dict(ADAM, beta1=beta1), zero_grads=True, emas=tensors["e"],
             ema_momentum=0.9)
        results.append((tensors, steps))
    (a, sa), (b, sb) = results
    for k in a:
        for i, (x, y) in enumerate(zip(a[k], b[k])):
            assert torch.equal(x, y), (k, i)
    assert [s.item() for s in sa] == [s.item() for s in sb] == [5.0] * len(SHAPES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_norm_with_empty_tensors_between_dtypes(backend):
    """Each tensor's chunk sums land at its own place in the partial sums, with
    empty tensors (no chunk) between tensors of other dtypes."""
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.empty(0), torch.randn(70000, generator=gen).bfloat16(), torch.empty(3, 0),
               torch.randn(131073, generator=gen), torch.empty(0, dtype=torch.float64),
               torch.randn(5, generator=gen).double(), torch.randn(65536, generator=gen).half(),
               torch.empty(0, dtype=torch.half)]
    total, per_tensor = _run(backend, ops.l2_norm, tensors, 1.0)
    expected = torch.stack([t.double().norm() for t in tensors])
    torch.testing.assert_close(per_tensor.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(total.double(), expected.norm(), rtol=1e-5, atol=0)


# ---- FusedAdam over odd parameters, against torch.optim.Adam ------------------------


def _odd_params():
    shared = torch.zeros(40000 + 1000 + 64)
    params = [
        torch.randn(70, 1100).t(),  # permuted dense, big enough to keep its grad
        torch.randn(33, 17).t(),  # permuted dense, small: not packed
        torch.randn(0, 5),  # empty
        torch.randn(()),  # 0-dim: packed
        torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last),
        torch.randn(1, 7, 1, 1).to(memory_format=torch.channels_last),  # packed, odd strides
        shared[3:40003].view(200, 200).normal_(),  # a view at an odd offset
        shared[40008:41008].normal_(),  # another view of the same buffer
        torch.randn(65536 * 2 + 5),  # two chunks and a tail
    ]
    return [torch.nn.Parameter(p.detach() if i in (6, 7) else p.detach().clone())
            for i, p in enumerate(params)]


def _like(p):
    return torch.empty_strided(p.shape, p.stride(), dtype=p.dtype).copy_(p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta1,how", [(0.0, "release"), (0.9, "zero"), (0.0, "step")])
def test_fused_adam_with_odd_parameters_matches_torch(backend, beta1, how, keep_small_cpu_grads):
    ours = _odd_params()
    theirs = [torch.nn.Parameter(_like(p.detach())) for p in ours]
    emas = [p.detach().clone() for p in ours]
    their_emas = [p.detach().clone() for p in ours]
    opt = FusedAdam(ours, lr=1e-2, betas=(beta1, 0.99), weight_decay=0.1)
    ref = torch.optim.Adam(theirs, lr=1e-2, betas=(beta1, 0.99), weight_decay=0.1,
                           foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad = torch.empty_strided(p.shape, p.stride()).copy_(g)  # the param's layout
            q.grad = _like(p.grad)
        blend = EmaBlend(list(zip(ours, emas)), 0.9)
        if how == "step":
            _run(backend, opt.step, ema=blend)
        else:
            _run(backend, opt.step_and_zero_grad, set_to_none=how == "release", ema=blend)
        for param, average in blend.pending():  # only the empty parameter's
            assert average.numel() == 0
            ops.ema_([average], [param.detach()], 0.9)
        ref.step()
        if how != "step":
            ref.zero_grad(set_to_none=how == "release")
        ops.ema_(their_emas, [q.detach() for q in theirs], 0.9)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert p.stride() == q.stride(), i
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(emas[i], their_emas[i], rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5,
                                       atol=1e-6)
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 3.0
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)


# ---- the packed state arena ----------------------------------------------------------


def test_arena_views_are_aligned_disjoint_and_shaped_as_their_params():
    likes = [torch.empty(s, dtype=d) for s, d in
             [((3,), torch.float32), ((), torch.float32), ((17, 5), torch.bfloat16),
              ((1, 7, 1, 1), torch.float64), ((32767,), torch.float32), ((1,), torch.bfloat16),
              ((16,), torch.float32), ((2, 3, 5), torch.half)]]
    likes[3] = likes[3].to(memory_format=torch.channels_last)
    out = state_arena.zeros_like_each(likes)
    spans = {}
    for like, t in zip(likes, out):
        assert t.shape == like.shape and t.dtype == like.dtype and t.stride() == like.stride()
        assert t.data_ptr() % 64 == 0 and bool((t == 0).all())
        base = t._base
        assert base is not None and base.dim() == 1
        spans.setdefault(base.data_ptr(), []).append(
            (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
        end = t.storage_offset() + t.numel()
        assert end <= base.numel()
    for ranges in spans.values():
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    steps = state_arena.scalar_zeros([torch.device("cpu")] * 5)
    assert len({s.data_ptr() for s in steps}) == 5 and all(s.dim() == 0 for s in steps)


# ---- huge: an Adam step over 2^31 + 1000 elements (12 GiB), on request ---------------

_HUGE = os.environ.get("PYGAN_OPTIM_HUGE_TESTS", "")


@pytest.mark.skipif(not _HUGE, reason="set PYGAN_OPTIM_HUGE_TESTS=1 (12 GiB, ~1 min on 2 "
                                      "cores; =interpret adds interpret mode, ~5 min more)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_step_over_2_31_plus_1000_elements(backend):
    if backend == "interpret" and _HUGE != "interpret":
        pytest.skip("PYGAN_OPTIM_HUGE_TESTS=interpret runs interpret mode too")
    if _mem_available_gib() < 14:
        pytest.skip("needs 14 GiB of available memory")
    n = 2**31 + 1000
    windows = [(0, 5000), (2**31 - 70000, 2**31 - 60000), (2**31 - 4000, n)]
    # The grad is only read: its untouched pages stay free.
    p, g, m, v = (_lazy(n, torch.bfloat16) for _ in range(4))
    gen = torch.Generator().manual_seed(0)
    for a, b in windows:
        for t in (p, g, m, v):
            t[a:b] = torch.randn(b - a, generator=gen).bfloat16()
        v[a:b].abs_()
    small = [[t[a:b].clone() for t in (p, g, m, v)] for a, b in windows]
    step = torch.tensor(5.0)
    _run(backend, ops.adam_step_, [p], [g], [m], [v], [step], **ADAM)
    assert step.item() == 6.0
    for (a, b), (sp, sg, sm, sv) in zip(windows, small):
        tp, tm, tv = sp.clone().requires_grad_(True), sm.clone(), sv.clone()
        ops.adam_step_([sp], [sg], [sm], [sv], [torch.tensor(5.0)], **ADAM)
        assert torch.equal(p[a:b], sp) and torch.equal(m[a:b], sm) and torch.equal(v[a:b], sv)
        tp.grad = sg
        torch_adam = torch.optim.Adam([tp], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.01, fused=True)
        torch_adam.state[tp] = dict(step=torch.tensor(5.0), exp_avg=tm, exp_avg_sq=tv)
        torch_adam.step()
        for ours, theirs in ((p[a:b], tp.detach()), (m[a:b], tm), (v[a:b], tv)):
            ulps = (ours.view(torch.int16).int() - theirs.view(torch.int16).int()).abs()
            assert ulps.max().item() <= 1
