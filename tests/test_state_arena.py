"""FusedAdam's packed state for small parameters (pygan_optim/optim/state_arena.py):
one buffer per kind, yet each state tensor behaves as torch's own would."""
import io

import torch
from torch import nn

import pygan_optim
from pygan_optim import _ext
from pygan_optim.optim.adam import KEEP_GRAD_MIN_NUMEL
from test_fused_adam import close


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


SHAPES = [(7,), (3, 5), (KEEP_GRAD_MIN_NUMEL,), (1,), (40, 40)]


def test_small_dense_parameters_share_one_aligned_buffer_per_kind():
    params = _params(SHAPES)
    params.append(nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)))
    params[-1].grad = torch.randn_like(params[-1])
    opt = pygan_optim.FusedAdam(params, amsgrad=True)
    opt.step()
    small = [p for p in params if p.numel() < KEEP_GRAD_MIN_NUMEL and p.is_contiguous()]
    assert len(small) == 4
    for kind in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
        tensors = [opt.state[p][kind] for p in small]
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1, kind
        for t, p in zip(tensors, small):
            assert t._base is not None  # a view: one version counter per buffer
            if kind != "step":
                assert t.shape == p.shape and t.is_contiguous()
                assert t.data_ptr() % 64 == 0
    others = [opt.state[p]["exp_avg_sq"] for p in params if not any(p is s for s in small)]
    shared = opt.state[small[0]]["exp_avg_sq"].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != shared for t in others)
    # channels_last keeps its layout, as torch's zeros_like(preserve_format) does
    assert opt.state[params[-1]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


def test_packed_tensors_keep_their_own_values_and_each_step_bumps_their_version():
    """Views of one buffer share a version counter; the step bumps it (once for
    all of them), so autograd sees every packed state tensor written."""
    params = _params([(4,), (4,), (4,)])
    opt = pygan_optim.FusedAdam(params)
    opt.step()
    a, b, _ = (opt.state[p]["exp_avg"] for p in params)
    before = b.clone()
    a.add_(1.0)
    assert torch.equal(b, before)
    for kind in ("exp_avg", "exp_avg_sq", "step"):
        versions = [opt.state[p][kind]._version for p in params]
        opt.step()
        assert all(opt.state[p][kind]._version > v for p, v in zip(params, versions)), kind


def test_packed_state_matches_torch_and_survives_a_checkpoint_both_ways():
    """Step, save, load into torch's Adam and into a fresh FusedAdam: all three
    continue alike. The saved file holds each buffer once, not once per tensor."""
    ours, ref = _params(SHAPES), _params(SHAPES)
    hp = dict(lr=1e-2, betas=(0.0, 0.999), weight_decay=0.1)
    o, t = pygan_optim.FusedAdam(ours, **hp), torch.optim.Adam(ref, foreach=False, **hp)
    o.step()
    t.step()
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    state_bytes = sum(v.numel() * v.element_size() for s in o.state.values() for v in s.values())
    assert buf.tell() < state_bytes + 64 * 1024  # shared buffers stored once

    copies = [_params(SHAPES) for _ in range(2)]
    resumed = [pygan_optim.FusedAdam(copies[0], **hp),
               torch.optim.Adam(copies[1], foreach=False, **hp)]
    for opt, params in zip(resumed, copies):
        with torch.no_grad():
            for p, q in zip(params, ours):
                p.copy_(q)
        buf.seek(0)
        opt.load_state_dict(torch.load(buf))  # its own tensors (loading does not copy)
    for step in range(3):
        gen = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for params in [ours, ref] + copies:
            for p, g in zip(params, grads):
                p.grad = g.clone()
        for opt in [o, t] + resumed:
            opt.step()
    # The resumed FusedAdam runs the same kernels on the same values: bit for bit.
    assert all(torch.equal(p, q) for p, q in zip(copies[0], ours))
    # torch's for-loop: the multi-step fp32 bound of test_fused_adam's docstring.
    for params in (ref, copies[1]):
        for p, q in zip(params, ours):
            close(q.detach(), p.detach())


def test_packed_state_takes_the_parameters_strides_on_dims_of_size_one():
    """A (1, C, 1, 1) parameter in channels_last is contiguous with strides
    (C, 1, C, C): its state has them too, as torch's zeros_like gives, so the
    step walks the three as one flat array (default strides sent it down the
    checked, staged path; found by the session-30 hunt)."""
    p = nn.Parameter(torch.randn(1, 5, 1, 1).to(memory_format=torch.channels_last))
    ref = nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
    ours, torchs = pygan_optim.FusedAdam([p], lr=1e-2), torch.optim.Adam([ref], lr=1e-2)
    for step in range(2):
        g = torch.randn(1, 5, 1, 1).to(memory_format=torch.channels_last)
        p.grad, ref.grad = g.clone(memory_format=torch.preserve_format), g.clone(
            memory_format=torch.preserve_format)
        ours.step()
        torchs.step()
    for key in ("exp_avg", "exp_avg_sq"):
        assert ours.state[p][key].stride() == torchs.state[ref][key].stride() == p.stride()
        assert ours.state[p][key]._base is not None  # still packed
    assert _ext.ema_walks_with(p, ours.state[p]["exp_avg"])  # the op's fast-path test
    close(p, ref)
