"""The beta1 == 0 loop that streams exp_avg out (float32 chunks of 1000 elements
or more whose grad is not kept): on AVX2/AVX-512 it runs adam_update on vector
registers and streams exp_avg straight from them, after plain stores up to
exp_avg's first vector boundary. Every option that loop specialises on, against
torch's fused Adam bit for bit (same FMA use), with exp_avg aligned and 4 bytes
off a vector boundary; and its in-pass EMA blend against ops.ema_ after the step.
"""
import pytest
import torch
from torch import nn

import pygan_optim
from pygan_optim import EmaBlend, FusedAdam, FusedAdamW

# Sizes: one vector body with a head and a tail; a size just over the streaming
# threshold; more than one chunk (65536) with an odd end. Multiples of 64 keep
# torch's own scalar tails (contracted differently) out of the comparison.
SIZES = [(1024,), (64, 65), (2 * 65536 + 192,)]

OPTIONS = {  # every op the loop leaves in or out (AdamOps), with beta1 == 0
    "plain": (FusedAdam, dict(betas=(0.0, 0.999), eps=1e-6)),
    "l2_decay": (FusedAdam, dict(betas=(0.0, 0.99), weight_decay=0.1)),
    "maximize": (FusedAdam, dict(betas=(0.0, 0.999), maximize=True)),
    "adamw": (FusedAdamW, dict(betas=(0.0, 0.999), weight_decay=0.05)),
}

# From step 16628 on, sqrt(1 - 0.999^step) rounds to 1 and the divide is left out.
LATE_STEP = 16625


def torch_uses_fma() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def params(seed):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SIZES]


def grads(step):
    g = torch.Generator().manual_seed(1000 + step)
    # ~10 orders of magnitude, many below eps
    return [torch.randn(s, generator=g) * torch.exp(torch.randn(s, generator=g) * 5)
            for s in SIZES]


def shift_exp_avgs(opt):
    """Moves each exp_avg to a copy 4 bytes past a 64-byte boundary (an edit
    between steps, which the step must see): its loop starts with a head."""
    for state in opt.state.values():
        state["exp_avg"] = exp_avg_at(state["exp_avg"], 1)


def exp_avg_at(old, floats_past_boundary):
    """A copy of `old` starting that many floats past a 64-byte boundary."""
    buf = torch.empty(old.numel() + 32)
    start = (-(buf.data_ptr() // 4)) % 16 + floats_past_boundary
    moved = buf[start:start + old.numel()].view_as(old)
    moved.copy_(old)
    assert moved.data_ptr() % 64 == 4 * floats_past_boundary
    return moved


@pytest.mark.parametrize("shifted", [False, True], ids=["aligned", "shifted"])
@pytest.mark.parametrize("late", [False, True], ids=["early", "late"])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "grad_scale"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_streamed_loop_equals_torch_fused_bit_for_bit(options, scaled, late, shifted, one_thread):
    if (pygan_optim.cpu_capability() != "default") != torch_uses_fma():
        pytest.skip("torch's CPU capability and ours differ in FMA use")
    cls, kw = OPTIONS[options]
    ours, ref = params(0), params(0)
    o = cls(ours, lr=1e-3, **kw)
    t = (torch.optim.AdamW if cls is FusedAdamW else torch.optim.Adam)(ref, lr=1e-3, fused=True,
                                                                       **kw)
    for step in range(4):
        for a, b, g in zip(ours, ref, grads(step)):
            a.grad = g * (1024 if scaled else 1)
            b.grad = a.grad.clone()
        if scaled:
            for opt in (o, t):
                opt.grad_scale = torch.tensor(1024.0)
                opt.found_inf = torch.tensor(0.0)
        o.step()  # a plain step: the grads stay, exp_avg is written (streamed)
        t.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), (step, tuple(a.shape))
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(o.state[a][key], t.state[b][key]), (step, key, tuple(a.shape))
        if step == 0:
            if late:
                for opt in (o, t):
                    for state in opt.state.values():
                        state["step"].fill_(LATE_STEP)
            if shifted:
                shift_exp_avgs(o)


@pytest.mark.parametrize("shifted", [False, True], ids=["aligned", "shifted"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_streamed_loop_blends_the_ema_as_ema_after_the_step(options, shifted):
    """The EMA blended in the streamed pass equals ops.ema_ run after the step,
    bit for bit, and the update itself is unchanged by the blend."""
    cls, kw = OPTIONS[options]
    ours, twin = params(1), params(1)
    avg_ours = [p.detach().clone() for p in ours]
    avg_twin = [p.detach().clone() for p in twin]
    o, t = cls(ours, lr=1e-3, **kw), cls(twin, lr=1e-3, **kw)
    for step in range(3):
        for a, b, g in zip(ours, twin, grads(step)):
            a.grad, b.grad = g, g.clone()
        o.step(ema=EmaBlend(zip(ours, avg_ours), 0.999))
        t.step()
        pygan_optim.ops.ema_(avg_twin, twin, 0.999)
        for a, b, ea, eb in zip(ours, twin, avg_ours, avg_twin):
            assert torch.equal(a, b) and torch.equal(ea, eb), (step, tuple(a.shape))
            assert torch.equal(o.state[a]["exp_avg"], t.state[b]["exp_avg"])
        if step == 0 and shifted:
            shift_exp_avgs(o)
            shift_exp_avgs(t)


PIECE = 999  # the plain loop's tensors: under the 1000 elements streaming starts at


def special_grads(n, step):
    """Wide-range grads with signed zeros, subnormals, infinities and NaNs."""
    g = torch.Generator().manual_seed(7000 + step)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 8)
    x[::97], x[1::97] = 0.0, -0.0
    x[2::211], x[3::211] = 1e-42, -1e-41
    x[5::1009], x[6::1013], x[7::1019] = float("inf"), float("nan"), -float("inf")
    return x


def run_in(pieces, n, offset, cls, kw, ema, late):
    """Three plain steps over n elements: one tensor (the streamed loop; exp_avg
    moved `offset` floats past a boundary after the first step) or tensors of
    PIECE elements (the plain loop). Returns every result, flattened."""
    start = torch.randn(n, generator=torch.Generator().manual_seed(n))
    sizes = [n]
    if pieces:
        sizes = [PIECE] * (n // PIECE) + ([n % PIECE] if n % PIECE else [])
    ps = [nn.Parameter(x.clone()) for x in start.split(sizes)]
    avgs = [p.detach() * 0.5 for p in ps]
    opt = cls(ps, lr=1e-3, **kw)
    for step in range(3):
        for p, g in zip(ps, special_grads(n, step).split(sizes)):
            p.grad = g.clone()
        opt.step(**(dict(ema=EmaBlend(zip(ps, avgs), 0.999)) if ema else {}))
        if step == 0:
            for state in opt.state.values():
                if late:
                    state["step"].fill_(LATE_STEP)
                if not pieces:
                    state["exp_avg"] = exp_avg_at(state["exp_avg"], offset)
    flat = lambda ts: torch.cat([t.detach().reshape(-1) for t in ts]).view(torch.int32)
    return [flat(ps), flat([opt.state[p]["exp_avg"] for p in ps]),
            flat([opt.state[p]["exp_avg_sq"] for p in ps]), flat(avgs)]


@pytest.mark.parametrize("late", [False, True], ids=["early", "late"])
@pytest.mark.parametrize("ema", [False, True], ids=["", "ema"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_streamed_loop_equals_the_plain_loop_at_every_offset(options, ema, late):
    """The streamed loop's head (plain stores up to exp_avg's vector boundary),
    vector body and tail give the bits of the plain loop of the same instruction
    set, for every offset of exp_avg within 64 bytes, odd sizes and special
    values (NaN bits included)."""
    cls, kw = OPTIONS[options]
    for n in (3073, 4099):
        expected = run_in(True, n, 0, cls, kw, ema, late)
        for offset in range(16):
            got = run_in(False, n, offset, cls, kw, ema, late)
            for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "ema"), got, expected):
                assert torch.equal(a, b), (n, offset, name)
