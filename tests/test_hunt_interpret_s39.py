"""Session 39's seeded differential fuzz of the CUDA code in interpret mode.

The kernels of csrc/cuda/kernels.cu and the host code of host_launch.h, run on
the CPU (pygan_optim.cuda_interpret), against the CPU loops (csrc/cpu/) on the
same inputs, and FusedAdam/FusedAdamW in interpret mode against
torch.optim.Adam/AdamW(fused=True):

* adam_step_: bit for bit (NaN payloads aside) on every tensor it may write:
  params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, EMAs. Random
  dtypes (fp32, fp64, bf16, fp16, mixed in one list: one launch per dtype),
  sizes at the pack widths (16 bytes: 4/2/8 elements), the 512-thread sweep
  (2048/1024/4096 elements per packed sweep), the 64K-element chunks, 0 and 1,
  layouts (16-byte aligned, one element off, channels_last, transposed,
  strided: staged), state in another layout than its parameter (staged), up to
  ~120 tensors, None grads, amsgrad, maximize, L2 and decoupled decay, beta1 ==
  0, lr as a float or a float32/float64/bf16/fp16/integer tensor, grad_scale
  (also past float's range: 2^-130, 2^127), grad_mult, found_inf (float and
  integer tensors, 0 and 1), zeroed grads, EMAs blended in the step (walked or
  staged, or for parameters without a grad), float32/float64 steps (0, 2^24),
  inf/NaN/subnormal/overflowing values.
* scale_, scale, ema_: bit for bit; l2_norm to the summation's rounding (the
  two sum squares in different orders: float32 partial sums of at most 1024
  squares on the CPU, 128 per thread on CUDA, combined in double), found_inf
  equal.
* Refusals: the same error class and message on both paths, naming the
  tensor, and nothing written by a refused call.
* FusedAdam / FusedAdamW over three steps (kept grads with their size limit
  lowered, step_and_zero_grad both ways, EmaBlend, GradScaler's grad_scale and
  found_inf, a skipped step, None grads): interpret mode equal to the CPU path
  bit for bit and to torch's fused Adam bit for bit (one thread, sizes in
  multiples of 64: off torch's scalar tails, see test_fused_adam.py; with beta1
  == 0 the sign of a zero may differ by design, so values are compared there).

What the exploration ran (scratch harness, not committed): adam_step_ 1,160
cases (seeds 0-59, 100-699, 1000-1499), scale_/scale/l2_norm/ema_ 540 (seeds
0-39, 1000-1499), FusedAdam multi-step 320 (seeds 0-169, 200-349), 40 refusals
on three variants (fp32, bf16, two chunks), l2_norm over 511-1100 tensors,
int/bf16/fp16 step states loaded into FusedAdam, two Python threads in
interpret mode at once: no difference between the paths. This file keeps a
compact slice of it with the same generators.
"""
import math
import random

import pytest
import torch
from torch import nn

from pygan_optim import EmaBlend, FusedAdam, FusedAdamW, _ext, ops

pytestmark = pytest.mark.cuda_interpret

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [F32, F64, BF16, F16]
# Pack widths (4/2/8 elements), a 512-thread packed sweep (2048 fp32, 1024 fp64,
# 4096 bf16/fp16 elements), 64K-element chunks.
BOUNDARY = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 511, 512, 513, 1023, 1024, 1025, 2047, 2048,
            2049, 4095, 4096, 4097, 8191, 8193, 65535, 65536, 65537]

needs_fma = pytest.mark.skipif(_ext.cpu_capability() == "default",
                               reason="the default CPU loops round a*b+c twice; CUDA fuses it")


def _interpret(flag: bool) -> bool:
    return _ext._C.set_cuda_interpret(flag)


def _run(fn, mode: bool):
    previous = _interpret(mode)
    try:
        return None, fn()
    except Exception as e:  # noqa: BLE001 (compared between the paths)
        return e, None
    finally:
        _interpret(previous)


def same_bits(a, b, strides=True) -> bool:
    """Equal dtype, shape (and strides) and bits; any NaN equals any NaN."""
    if a is None or b is None:
        return a is b
    if a.dtype != b.dtype or a.shape != b.shape or (strides and a.stride() != b.stride()):
        return False
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {F32: torch.int32, F64: torch.int64, BF16: torch.int16, F16: torch.int16}[a.dtype]
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a].view(ints), b[~nan_b].view(ints))


def values(rng: random.Random, n: int, dtype, specials: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    x = torch.randn(n, generator=g, dtype=F64) * (10 ** rng.uniform(-3, 2))
    if specials and n:
        sp = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-40, 6e4, 3e38],
                          dtype=F64)
        k = max(1, n // 50)
        # Unique indices: index_put_ with repeated ones picks a value nondeterministically.
        idx = torch.randperm(n, generator=g)[:k]
        x[idx] = sp[torch.randint(0, len(sp), (k,), generator=g)]
    return x.to(dtype)


def shape_for(n: int, kind: str):
    if kind == "channels_last":
        for c in (3, 2, 5, 7):
            if n > 0 and n % (c * 4) == 0:
                return (n // (c * 4), c, 2, 2)
        return None
    if kind == "transposed":
        for r in (3, 2, 5, 7, 4):
            if n >= 2 * r and n % r == 0:
                return (r, n // r)
        return None
    return (n,)


def laid_out(base: torch.Tensor, shape, kind: str) -> torch.Tensor:
    """base's values as a tensor of `shape` in layout `kind`."""
    dtype, n = base.dtype, base.numel()
    if kind == "contig":
        return base.reshape(shape).clone()
    if kind == "offset":  # one element into a larger storage: not 16-byte aligned
        t = torch.empty(n + 1, dtype=dtype)[1:].view(shape)
        return t.copy_(base.reshape(shape))
    if kind == "channels_last":
        return base.reshape(shape).clone().contiguous(memory_format=torch.channels_last)
    if kind == "transposed":  # dense, column-major
        return base.reshape(shape).t().contiguous().t()
    if kind == "strided":  # not dense: every other element of a larger buffer
        t = torch.empty(shape[:-1] + (shape[-1] * 2,), dtype=dtype)[..., ::2]
        return t.copy_(base.reshape(shape))
    raise ValueError(kind)


def pick_size(rng: random.Random, large: float = 0.1) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.choice(BOUNDARY)
    if r < 1 - large:
        return rng.randrange(0, 5000)
    return rng.randrange(65536, 3 * 65536)


# ---- adam_step_ --------------------------------------------------------------------


def adam_case(seed: int, large: float = 0.1):
    """(description, make): make() builds fresh inputs, ((lists), kwargs, watched)."""
    rng = random.Random(seed)
    many = rng.random() < 0.1
    nt = rng.randrange(20, 120) if many else rng.randrange(1, 6)
    specials = rng.random() < 0.3
    opts = dict(amsgrad=rng.random() < 0.3, maximize=rng.random() < 0.2,
                decoupled=rng.random() < 0.4, zero_grads=rng.random() < 0.3)
    beta1 = rng.choice([0.0, 0.0, 0.9, 0.5])
    beta2 = rng.choice([0.999, 0.99, 0.0, 0.9999999])
    eps = rng.choice([1e-8, 1e-6, 0.0])
    wd = rng.choice([0.0, 0.0, 0.1, 1e-2])
    lr_kind = rng.choice(["float", "f32", "f64", "bf16", "int", "f16"])
    lr_val = rng.choice([1e-3, 1e-2, 0.5])
    gs = rng.choice([None, None, 1024.0, 2.0 ** -130, 3.0, 65536.0, 2.0 ** 127])
    gs_dtype = rng.choice([F32, F32, F64, BF16])
    gm = rng.choice([None, None, 0.5, 0.3, 1e-30])
    fi = rng.choice([None, None, 0.0, 1.0])
    fi_dtype = rng.choice([F32, F32, F64, torch.int32])
    with_ema = rng.random() < 0.3
    ema_m = rng.choice([0.999, 0.9, 0.0, 1.0])
    ema_w = rng.choice([None, 1 - ema_m])
    step_dtype = rng.choice([F32, F32, F64])
    step0 = rng.choice([0.0, 0.0, 3.0, 2.0 ** 24, 16624.0])
    specs = []
    for _ in range(nt):
        dtype = rng.choice(DTYPES) if rng.random() < 0.7 else F32
        kind = rng.choice(["contig"] * 5 + ["offset", "channels_last", "transposed", "strided"])
        n = rng.randrange(1, 300) if many and rng.random() < 0.8 else pick_size(rng, large)
        shape = shape_for(n, kind)
        if shape is None:
            kind, shape = "contig", (n,)
        # The grad's layout: usually the parameter's, sometimes another (staged).
        other = kind if rng.random() < 0.8 else rng.choice(["contig", "offset", "strided"])
        specs.append(dict(dtype=dtype, kind=kind, other=other, shape=shape, n=n,
                          grad=rng.random() > 0.1, ema=with_ema and rng.random() < 0.7,
                          seeds=[rng.randrange(2 ** 31) for _ in range(6)]))
    desc = dict(seed=seed, nt=nt, opts=opts, beta1=beta1, beta2=beta2, eps=eps, wd=wd,
                lr=(lr_kind, lr_val), gs=gs, gm=gm, fi=fi, ema=(with_ema, ema_m, ema_w),
                step=(step_dtype, step0), specials=specials)

    def make():
        P, G, M, V, X, S, E = [], [], [], [], [], [], []
        for sp in specs:
            d, n, shape, kind = sp["dtype"], sp["n"], sp["shape"], sp["kind"]
            s = sp["seeds"]
            P.append(laid_out(values(random.Random(s[0]), n, d, specials), shape, kind))
            if sp["grad"]:
                g_kind = sp["other"]
                g_shape = shape if g_kind == kind else (n,)
                if g_kind == "strided" and len(shape) == 1:
                    g_shape = shape
                g = laid_out(values(random.Random(s[1]), n, d, specials), g_shape, g_kind)
                G.append(g if g.shape == shape else g.reshape(shape))
            else:
                G.append(None)
            M.append(laid_out(values(random.Random(s[2]), n, d, False) * 0.1, shape, kind))
            V.append(laid_out(values(random.Random(s[3]), n, d, False).abs() * 0.01, shape, kind))
            X.append(laid_out(values(random.Random(s[4]), n, d, False).abs() * 0.02, shape, kind))
            S.append(torch.tensor(step0, dtype=step_dtype))
            E.append(laid_out(values(random.Random(s[5]), n, d, False), shape, kind)
                     if sp["ema"] else None)
        lr = {"float": lambda: lr_val, "f32": lambda: torch.tensor(lr_val),
              "f64": lambda: torch.tensor(lr_val, dtype=F64),
              "bf16": lambda: torch.tensor(lr_val, dtype=BF16),
              "f16": lambda: torch.tensor(lr_val, dtype=F16),
              "int": lambda: torch.tensor(1 if lr_val == 0.5 else 0)}[lr_kind]()
        kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                  max_exp_avg_sqs=X if opts["amsgrad"] else None, **opts)
        if gs is not None:
            kw["grad_scale"] = torch.tensor(gs, dtype=gs_dtype)
        if gm is not None:
            kw["grad_mult"] = torch.tensor(gm)
        if fi is not None:
            kw["found_inf"] = torch.tensor(fi if fi_dtype.is_floating_point else int(fi),
                                           dtype=fi_dtype)
        if any(e is not None for e in E):
            kw.update(emas=E, ema_momentum=ema_m, ema_new_weight=ema_w)
        watched = P + G + M + V + X + S + E + [lr if torch.is_tensor(lr) else None]
        return (P, G, M, V, S), kw, watched

    return desc, make


def adam_differences(make):
    """What differs between the CPU path and interpret mode on one case."""
    runs = []
    for mode in (False, True):
        (P, G, M, V, S), kw, watched = make()
        before = [None if t is None else t.clone() for t in watched]
        err, _ = _run(lambda: ops.adam_step_(P, G, M, V, S, **kw), mode)
        runs.append((err, watched, before))
    (cpu_err, cpu, cpu_before), (int_err, itp, int_before) = runs
    if (cpu_err is None) != (int_err is None):
        return [f"one refused: cpu {cpu_err!r}, interpret {int_err!r}"]
    if cpu_err is not None:
        problems = []
        if type(cpu_err) is not type(int_err) or str(cpu_err) != str(int_err):
            problems.append(f"refusals differ: {cpu_err!r} / {int_err!r}")
        for after, before in ((cpu, cpu_before), (itp, int_before)):
            problems += [f"refused but wrote watched[{k}]"
                         for k, (a, b) in enumerate(zip(after, before)) if not same_bits(a, b)]
        return problems
    return [f"watched[{k}] differs" for k, (a, b) in enumerate(zip(cpu, itp))
            if not same_bits(a, b)]


ADAM_SEEDS = [0, 2, 5, 11, 17, 23, 29, 31, 32, 34, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73,
              79, 83, 89, 97, 101, 103, 107, 109, 113, 127]


@needs_fma
@pytest.mark.parametrize("chunk", range(3))
def test_adam_step_interpret_equals_cpu_seeded_fuzz(chunk):
    """30 seeded adam_step_ cases (10 per test): interpret mode's writes equal
    the CPU loops' bit for bit, and a refusal is the same on both paths."""
    for seed in ADAM_SEEDS[chunk * 10:(chunk + 1) * 10]:
        desc, make = adam_case(seed, large=0.03)
        problems = adam_differences(make)
        assert not problems, (desc, problems[:5])


@needs_fma
def test_adam_step_chunk_and_launch_boundaries():
    """Sizes either side of a 64K chunk (several blocks of one tensor advance its
    step once), with one-element and empty tensors around them, four dtypes in
    one list (four launches), found_inf read as 0, zeroed grads and EMAs."""
    sizes = [65535, 0, 65537, 1]
    for beta1, amsgrad in ((0.9, True), (0.0, False)):
        def make():
            P, G, M, V, S, E = [], [], [], [], [], []
            for i, n in enumerate(sizes):
                d = DTYPES[i % 4]
                r = random.Random(i)
                P.append(values(r, n, d, False))
                G.append(values(r, n, d, False))
                M.append(torch.zeros(n, dtype=d))
                V.append(torch.zeros(n, dtype=d))
                S.append(torch.tensor(float(i)))
                E.append(P[-1].clone())
            X = [torch.zeros_like(v) for v in V]
            kw = dict(lr=torch.tensor(1e-2), beta1=beta1, beta2=0.999, eps=1e-8,
                      weight_decay=0.1, amsgrad=amsgrad, max_exp_avg_sqs=X,
                      found_inf=torch.tensor(0.0), grad_scale=torch.tensor(8.0),
                      zero_grads=True, emas=E, ema_momentum=0.9)
            return (P, G, M, V, S), kw, P + G + M + V + X + S + E
        assert not adam_differences(make)
        (P, G, M, V, S), kw, _ = make()
        previous = _interpret(True)
        try:
            ops.adam_step_(P, G, M, V, S, **kw)
        finally:
            _interpret(previous)
        assert [float(s) for s in S] == [i + 1.0 for i in range(len(sizes))]


# ---- scale_, scale, l2_norm, ema_ ------------------------------------------------


def ops_case(seed: int):
    rng = random.Random(seed)
    op = rng.choice(["scale_", "scale", "l2_norm", "ema_"])
    specials = rng.random() < 0.3
    nt = rng.randrange(1, 6) if rng.random() > 0.1 else rng.randrange(20, 80)
    specs = []
    for _ in range(nt):
        d = rng.choice(DTYPES)
        kind = rng.choice(["contig"] * 4 + ["offset", "channels_last", "transposed", "strided"])
        n = pick_size(rng, 0.05) if nt < 10 else rng.randrange(0, 400)
        shape = shape_for(n, kind)
        if shape is None:
            kind, shape = "contig", (n,)
        specs.append((d, kind, shape, n, rng.randrange(2 ** 31)))
    factor = rng.choice([0.5, 3.0, 1e-30, 2.0 ** -140, 1e39, 65536.0, 1.0, 0.1, 2.0 ** 130])
    factor_kind = rng.choice(["float", "f32", "f64", "bf16", "int"])
    with_found_inf = rng.random() < 0.5
    found_inf0 = rng.choice([0.0, 1.0])
    momentum = rng.choice([0.999, 0.9, 0.0, 1.0, 0.5])
    new_weight = rng.choice([None, 1 - momentum])
    staged_params = [rng.random() < 0.2 for _ in specs]

    def tensors():
        return [laid_out(values(random.Random(s), n, d, specials), shape, kind)
                for d, kind, shape, n, s in specs]

    def make():
        ts = tensors()
        if factor_kind == "float":
            f = factor
        elif factor_kind == "int":
            f = torch.tensor(2 if factor != int(factor) or factor > 2 ** 62 else int(factor))
        else:
            f = torch.tensor(factor, dtype={"f32": F32, "f64": F64, "bf16": BF16}[factor_kind])
        fi = torch.tensor(found_inf0)
        if op == "scale_":
            return (lambda: ops.scale_(ts, f, fi)), ts + [fi]
        if op == "scale":
            return (lambda: ops.scale(ts, f, fi)), ts + [fi]
        if op == "l2_norm":
            return (lambda: ops.l2_norm(ts, f, fi if with_found_inf else None)), ts + [fi]
        ps = [p.contiguous() if s else p for p, s in zip(tensors(), staged_params)]
        return (lambda: ops.ema_(ts, ps, momentum, new_weight)), ts + ps

    return dict(seed=seed, op=op, specials=specials, factor=(factor_kind, factor),
                sizes=[s[3] for s in specs][:8]), make


# Two sums of the same float32 squares in different orders: each within
# kSumBlock (1024) float32 roundings of the exact sum, so the norms within that.
NORM_RTOL = 1024 * 2.0 ** -24


def norms_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    ok = (a.isnan() & b.isnan()) | (a == b) | \
        ((a - b).abs() <= NORM_RTOL * torch.maximum(a.abs(), b.abs()))
    return bool(ok.all())


def ops_differences(op: str, make):
    runs = []
    for mode in (False, True):
        fn, watched = make()
        before = [t.clone() for t in watched]
        err, result = _run(fn, mode)
        runs.append((err, result, watched, before))
    (ce, cr, cw, cb), (ie, ir, iw, ib) = runs
    if (ce is None) != (ie is None):
        return [f"one refused: cpu {ce!r}, interpret {ie!r}"]
    if ce is not None:
        problems = [] if type(ce) is type(ie) and str(ce) == str(ie) else [f"{ce!r} / {ie!r}"]
        for after, before in ((cw, cb), (iw, ib)):
            if not all(same_bits(a, b) for a, b in zip(after, before)):
                problems.append("a refused call wrote")
        return problems
    problems = [f"watched[{k}] differs" for k, (a, b) in enumerate(zip(cw, iw))
                if not same_bits(a, b)]
    if op == "scale":
        problems += [f"out[{k}] differs" for k, (a, b) in enumerate(zip(cr, ir))
                     if not same_bits(a, b)]
    if op == "l2_norm" and not (norms_close(cr[0], ir[0]) and norms_close(cr[1], ir[1])):
        problems.append(f"norms {cr} / {ir}")
    return problems


OPS_SEEDS = list(range(1000, 1030))


@needs_fma
@pytest.mark.parametrize("chunk", range(2))
def test_scale_l2_norm_ema_interpret_equals_cpu_seeded_fuzz(chunk):
    """30 seeded scale_/scale/l2_norm/ema_ cases (15 per test)."""
    for seed in OPS_SEEDS[chunk * 15:(chunk + 1) * 15]:
        desc, make = ops_case(seed)
        problems = ops_differences(desc["op"], make)
        assert not problems, (desc, problems[:5])


def test_l2_norm_of_more_tensors_than_threads(count=513):
    """norm_reduce gives each of its 512 threads every 512th tensor: per-tensor
    norms and the total past that, four dtypes interleaved (four launches whose
    partial sums land in dtype order), against float64."""
    ts = [torch.randn(1 + i % 3, generator=torch.Generator().manual_seed(i)).to(DTYPES[i % 4])
          for i in range(count)]
    expected = torch.stack([t.double().mul(2).norm() for t in ts])
    for mode in (False, True):
        err, (total, per_tensor) = _run(lambda: ops.l2_norm(ts, torch.tensor(2.0)), mode)
        assert err is None
        assert torch.allclose(per_tensor.double(), expected, rtol=1e-6, atol=0)
        assert math.isclose(float(total), float(expected.norm()), rel_tol=1e-6)


def test_l2_norm_of_empty_tensors_only():
    """No chunk at all: no sum_squares launch, the reduction reads no partial sum."""
    ts = [torch.empty(0), torch.empty(0, dtype=F16), torch.empty(0, 3, dtype=BF16)]
    for mode in (False, True):
        _, (total, per_tensor) = _run(lambda: ops.l2_norm(ts), mode)
        assert float(total) == 0.0 and per_tensor.tolist() == [0.0, 0.0, 0.0]


# ---- refusals -------------------------------------------------------------------------


def _base(n=5, dtype=F32):
    g = torch.Generator().manual_seed(0)
    P = [torch.randn(n + i, generator=g).to(dtype) for i in range(3)]
    G = [torch.randn(n + i, generator=g).to(dtype) for i in range(3)]
    M = [torch.zeros(n + i, dtype=dtype) for i in range(3)]
    V = [torch.zeros(n + i, dtype=dtype) for i in range(3)]
    X = [torch.zeros(n + i, dtype=dtype) for i in range(3)]
    S = [torch.zeros(()) for _ in range(3)]
    E = [p.clone() for p in P]
    return P, G, M, V, X, S, E, dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def _ema_strides(P, G, M, V, X, S, E, kw):
    P[0], G[0] = torch.randn(2, 2), torch.randn(2, 2)
    M[0], V[0], E[0] = torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2).t()
    kw.update(emas=E, ema_momentum=0.9)


def _inference_exp_avg(P, G, M, V, X, S, E, kw):
    with torch.inference_mode():
        M[2] = torch.zeros(M[2].shape, dtype=M[2].dtype)


# (name, mutation, the name the message must contain)
REFUSALS = [
    ("grad_dtype", lambda P, G, M, V, X, S, E, kw: G.__setitem__(1, G[1].double()), "grads[1]"),
    ("grad_shape", lambda P, G, M, V, X, S, E, kw: G.__setitem__(2, torch.zeros(3)), "grads[2]"),
    ("exp_avg_dtype", lambda P, G, M, V, X, S, E, kw: M.__setitem__(2, M[2].double()),
     "exp_avgs[2]"),
    ("step_int", lambda P, G, M, V, X, S, E, kw: S.__setitem__(1, torch.zeros((), dtype=torch.int64)),
     "state_steps[1]"),
    ("step_fp16", lambda P, G, M, V, X, S, E, kw: S.__setitem__(0, torch.zeros((), dtype=F16)),
     "state_steps[0]"),
    ("step_two_elements", lambda P, G, M, V, X, S, E, kw: S.__setitem__(2, torch.zeros(2)),
     "state_steps[2]"),
    ("lr_negative", lambda P, G, M, V, X, S, E, kw: kw.update(lr=-1.0), "learning rate"),
    ("lr_text", lambda P, G, M, V, X, S, E, kw: kw.update(lr="0.1"), "lr"),
    ("eps_bytes", lambda P, G, M, V, X, S, E, kw: kw.update(eps=b"1e-8"), "eps"),
    ("beta1_one", lambda P, G, M, V, X, S, E, kw: kw.update(beta1=1.0), "beta1"),
    ("beta2_nan", lambda P, G, M, V, X, S, E, kw: kw.update(beta2=float("nan")), "beta2"),
    ("lr_two_elements", lambda P, G, M, V, X, S, E, kw: kw.update(lr=torch.ones(2)), "lr"),
    ("lr_bool", lambda P, G, M, V, X, S, E, kw: kw.update(lr=torch.tensor(True)), "lr"),
    ("lr_complex", lambda P, G, M, V, X, S, E, kw: kw.update(lr=torch.tensor(1e-3 + 0j)), "lr"),
    ("lr_meta", lambda P, G, M, V, X, S, E, kw: kw.update(lr=torch.tensor(1e-3, device="meta")),
     "lr"),
    ("grad_scale_two", lambda P, G, M, V, X, S, E, kw: kw.update(grad_scale=torch.ones(2)),
     "grad_scale"),
    ("found_inf_bool", lambda P, G, M, V, X, S, E, kw: kw.update(found_inf=torch.tensor(False)),
     "found_inf"),
    ("grad_negative_view", lambda P, G, M, V, X, S, E, kw: G.__setitem__(1, G[1].clone()._neg_view()),
     "grads[1]"),
    ("param_int", lambda P, G, M, V, X, S, E, kw: P.__setitem__(1, torch.zeros(P[1].shape, dtype=torch.int32)),
     "params[1]"),
    ("param_meta", lambda P, G, M, V, X, S, E, kw: P.__setitem__(2, torch.empty(P[2].shape, device="meta")),
     "params[2]"),
    ("exp_avg_expanded", lambda P, G, M, V, X, S, E, kw: M.__setitem__(2, torch.zeros(1, dtype=M[2].dtype).expand(M[2].shape)),
     "exp_avgs[2]"),
    ("exp_avg_is_param", lambda P, G, M, V, X, S, E, kw: M.__setitem__(1, P[1]), "exp_avgs[1]"),
    ("exp_avg_sq_is_exp_avg", lambda P, G, M, V, X, S, E, kw: V.__setitem__(2, M[2]),
     "exp_avg_sqs[2]"),
    ("zeroed_grad_is_param", lambda P, G, M, V, X, S, E, kw: (G.__setitem__(2, P[2]), kw.update(zero_grads=True)),
     "grads[2]"),
    ("step_shared", lambda P, G, M, V, X, S, E, kw: S.__setitem__(2, S[1]), "state_steps[2]"),
    ("lengths", lambda P, G, M, V, X, S, E, kw: M.pop(), "exp_avgs"),
    ("amsgrad_short", lambda P, G, M, V, X, S, E, kw: kw.update(amsgrad=True, max_exp_avg_sqs=X[:2]),
     "max_exp_avg_sqs"),
    ("ema_strides", _ema_strides, "emas[0]"),
    ("ema_momentum", lambda P, G, M, V, X, S, E, kw: kw.update(emas=E, ema_momentum=1.5),
     "ema_momentum"),
    ("ema_weights_sum", lambda P, G, M, V, X, S, E, kw: kw.update(emas=E, ema_momentum=0.9, ema_new_weight=0.9),
     "ema_new_weight"),
    ("ema_is_param", lambda P, G, M, V, X, S, E, kw: (E.__setitem__(2, P[2]), kw.update(emas=E, ema_momentum=0.9)),
     "emas[2]"),
    ("ema_dtype", lambda P, G, M, V, X, S, E, kw: (E.__setitem__(2, E[2].double()), kw.update(emas=E, ema_momentum=0.9)),
     "emas[2]"),
    ("ema_count", lambda P, G, M, V, X, S, E, kw: kw.update(emas=E[:2], ema_momentum=0.9), "emas"),
    ("found_inf_in_param", lambda P, G, M, V, X, S, E, kw: kw.update(found_inf=P[0][:1].view(())),
     "found_inf"),
    ("lr_in_exp_avg", lambda P, G, M, V, X, S, E, kw: kw.update(lr=M[1][:1].view(())), "lr"),
    ("grad_scale_meta", lambda P, G, M, V, X, S, E, kw: kw.update(grad_scale=torch.tensor(1.0, device="meta")),
     "grad_scale"),
    ("inference_exp_avg", _inference_exp_avg, "exp_avgs[2]"),
]


@pytest.mark.parametrize("variant", [dict(), dict(dtype=BF16)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, mutation, named", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_the_same_on_both_paths_and_write_nothing(name, mutation, named, variant):
    errors = []
    for mode in (False, True):
        P, G, M, V, X, S, E, kw = _base(**variant)
        mutation(P, G, M, V, X, S, E, kw)
        watched = [t for t in P + G + M + V + X + S + E if t is not None and t.device.type == "cpu"]
        watched += [kw[k] for k in ("lr", "grad_scale", "found_inf", "grad_mult")
                    if torch.is_tensor(kw.get(k)) and kw[k].device.type == "cpu"]
        before = [t.clone() for t in watched]
        err, _ = _run(lambda: ops.adam_step_(P, G, M, V, S, **kw), mode)
        assert err is not None, "accepted"
        assert all(same_bits(a, b, strides=False) for a, b in zip(watched, before)), \
            f"refused ({err}) after writing"
        errors.append(err)
    cpu, itp = errors
    assert type(cpu) is type(itp) and str(cpu) == str(itp)
    assert named in str(cpu).splitlines()[0]


# ---- FusedAdam / FusedAdamW: interpret mode, CPU, torch fused -----------------------


def opt_case(seed: int):
    rng = random.Random(seed)
    kind = rng.choice(["adam", "adamw"])
    dtypes = rng.choice([[F32], [F64], [BF16], [F16], DTYPES])
    sizes = [64 * rng.choice([1, 2, 31, 32, 33, 1023, 1024, 1025]) for _ in range(rng.randrange(1, 5))]
    shapes = []
    for n in sizes:
        r = rng.random()
        shapes.append((n // 64, 4, 4, 4) if r < 0.2 else (n // 64, 64) if r < 0.4 else (n,))
    return dict(
        seed=seed, kind=kind, dtypes=dtypes, shapes=shapes, channels_last=rng.random() < 0.2,
        opts=dict(lr=rng.choice([1e-3, 1e-2]),
                  betas=(rng.choice([0.0, 0.9]), rng.choice([0.999, 0.99])),
                  eps=rng.choice([1e-8, 1e-6]), weight_decay=rng.choice([0.0, 0.1]),
                  amsgrad=rng.random() < 0.3, maximize=rng.random() < 0.2),
        lr_tensor=rng.random() < 0.3, amp=rng.random() < 0.4, skip_at=rng.choice([None, 1, 2]),
        release=rng.random() < 0.5, zero=rng.random() < 0.5, ema=rng.choice([None, 0.999, 0.9]),
        none_grad=rng.random() < 0.2)


def _params(c):
    ps = []
    for i, shape in enumerate(c["shapes"]):
        d = c["dtypes"][i % len(c["dtypes"])]
        t = values(random.Random(c["seed"] * 100 + i), math.prod(shape), d, False).reshape(shape)
        if c["channels_last"] and len(shape) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        ps.append(nn.Parameter(t))
    return ps


def _grads(c, ps, step):
    out = []
    for i, p in enumerate(ps):
        if c["none_grad"] and i == 0 and step % 2 == 1:
            out.append(None)
            continue
        g = values(random.Random(c["seed"] * 1000 + step * 10 + i), p.numel(), p.dtype, False)
        # Scaled by 16 (GradScaler's factor here): grads stay finite in fp16.
        out.append(torch.empty_like(p).copy_(g.reshape(p.shape)) * (16 if c["amp"] else 1))
    return out


def _amp(c, opt, step):
    opt.grad_scale = torch.tensor(16.0)
    opt.found_inf = torch.tensor(1.0 if step == c["skip_at"] else 0.0)


def run_ours(c, interpret: bool, steps: int = 3):
    ps = _params(c)
    kw = dict(c["opts"], lr=torch.tensor(c["opts"]["lr"]) if c["lr_tensor"] else c["opts"]["lr"])
    opt = (FusedAdamW if c["kind"] == "adamw" else FusedAdam)(ps, **kw)
    opt.keep_grad_min_bytes_cpu = 0  # keep grads from 32768 elements on, as on GPUs
    emas = [p.detach().clone() for p in ps] if c["ema"] else None
    previous = _interpret(interpret)
    try:
        for step in range(steps):
            for p, g in zip(ps, _grads(c, ps, step)):
                p.grad = g
            if c["amp"]:
                _amp(c, opt, step)
            blend = EmaBlend(list(zip(ps, emas)), momentum=1 - c["ema"],
                             new_weight=c["ema"]) if emas else None
            if c["release"]:
                opt.step_and_zero_grad(ema=blend)
            elif c["zero"]:
                opt.step_and_zero_grad(set_to_none=False, ema=blend)
            else:
                opt.step(ema=blend)
            for p, e in (blend.pending() if blend is not None else []):
                ops.ema_([e], [p], 1 - c["ema"], c["ema"])
            if c["amp"]:
                del opt.grad_scale, opt.found_inf
    finally:
        _interpret(previous)
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    return ([p.detach().clone() for p in ps], states, emas,
            [None if p.grad is None else p.grad.clone() for p in ps])


def run_torch(c, steps: int = 3):
    ps = _params(c)
    kw = dict(c["opts"], lr=torch.tensor(c["opts"]["lr"]) if c["lr_tensor"] else c["opts"]["lr"])
    opt = (torch.optim.AdamW if c["kind"] == "adamw" else torch.optim.Adam)(ps, fused=True, **kw)
    emas = [p.detach().clone() for p in ps] if c["ema"] else None
    for step in range(steps):
        for p, g in zip(ps, _grads(c, ps, step)):
            p.grad = g
        if c["amp"]:
            _amp(c, opt, step)
        opt.step()
        if emas:
            with torch.no_grad():  # MMagic's formula
                for p, e in zip(ps, emas):
                    e.mul_(1 - c["ema"]).add_(p, alpha=c["ema"])
        if c["release"] or c["zero"]:
            opt.zero_grad(set_to_none=c["release"])
        if c["amp"]:
            del opt.grad_scale, opt.found_inf
    return [p.detach().clone() for p in ps], [dict(opt.state[p]) for p in ps], emas


def fused_adam_differences(c):
    problems = []
    cpu, itp = run_ours(c, False), run_ours(c, True)
    for i in range(len(cpu[0])):
        if not same_bits(cpu[0][i], itp[0][i]):
            problems.append(f"param {i}: cpu / interpret")
        problems += [f"state {i} {k}: cpu / interpret" for k in cpu[1][i]
                     if not same_bits(cpu[1][i][k], itp[1][i][k])]
        if cpu[2] and not same_bits(cpu[2][i], itp[2][i]):
            problems.append(f"ema {i}: cpu / interpret")
        if not same_bits(cpu[3][i], itp[3][i]):
            problems.append(f"grad {i}: cpu / interpret")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's scalar tails (test_fused_adam.py)
    try:
        ref = run_torch(c)
    finally:
        torch.set_num_threads(threads)
    # With beta1 == 0 a zero's sign may differ from torch's lerp by design (math.h).
    equal = torch.equal if c["opts"]["betas"][0] == 0 else same_bits
    for i in range(len(ref[0])):
        if not equal(itp[0][i], ref[0][i]):
            problems.append(f"param {i}: interpret / torch")
        problems += [f"state {i} {k}: interpret / torch" for k, v in ref[1][i].items()
                     if not equal(itp[1][i][k], v)]
        # fp32/fp64 EMAs equal MMagic's formula when both weights are given (README).
        if ref[2] and ref[2][i].dtype in (F32, F64) and not equal(itp[2][i], ref[2][i]):
            problems.append(f"ema {i}: interpret / MMagic's formula")
    return problems


OPT_SEEDS = [3, 12, 40, 45, 56, 92, 112, 128]


@needs_fma
@pytest.mark.parametrize("seed", OPT_SEEDS)
def test_fused_adam_interpret_equals_cpu_and_torch_fused(seed):
    """Three steps of FusedAdam/FusedAdamW (seeded options, see opt_case)."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch's CPU loops without FMA differ from CUDA's math")
    c = opt_case(seed)
    problems = fused_adam_differences(c)
    assert not problems, (c, problems[:6])
