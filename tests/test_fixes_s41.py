"""Session 41's fixes of what its bug hunts found, each with a test that fails
on the code before it."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from pygan_optim import FusedAdam


@pytest.mark.parametrize("key, value, says", [
    ("betas", (1.05, 0.999), "invalid beta1 1.05"),
    ("lr", float("nan"), "invalid learning rate nan"),
])
def test_out_of_range_hyper_parameter_names_its_group(key, value, says):
    # A chain of MMEngine momentum schedulers can write beta1 >= 1 into one group
    # of several: the refusal says which, and nothing is updated.
    params = [nn.Parameter(torch.ones(4)) for _ in range(2)]
    opt = FusedAdam([{"params": [params[0]]}, {"params": [params[1]]}])
    for p in params:
        p.grad = torch.ones(4)
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=f"FusedAdam: param group 1: .*{says}"):
        opt.step()
    assert all(torch.equal(p, torch.ones(4)) for p in params)
    assert len(opt.state) == 0 or all(len(s) == 0 for s in opt.state.values())


@pytest.mark.parametrize("fused", [None, True])
def test_checkpoint_carries_the_fused_option_to_torch(fused):
    # README: torch's load_state_dict takes `fused` from the checkpoint's groups,
    # so a FusedAdam built with fused=True resumes on torch's fused kernel, bit
    # for bit with ours (sizes a multiple of 128: no scalar tails).
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(256))
    ours = FusedAdam([p], fused=fused, betas=(0.0, 0.999))
    for _ in range(2):
        p.grad = torch.randn(256)
        ours.step()
    q = nn.Parameter(p.detach().clone())
    native = torch.optim.Adam([q])
    # (a copy: torch would load the very state tensors, which both would step)
    native.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert native.param_groups[0]["fused"] is fused
    if fused:
        for _ in range(3):
            g = torch.randn(256)
            p.grad, q.grad = g.clone(), g.clone()
            ours.step()
            native.step()
            assert torch.equal(p, q)


def _flat_views(flat, sizes):
    out, at = [], 0
    for n in sizes:
        out.append(flat[at:at + n])
        at += n
    return out


@pytest.mark.parametrize("saved", [False, True])
def test_params_and_grads_viewing_one_buffer_disjointly_still_step(saved):
    # Storages shared by several tensors (params flattened into one buffer, as
    # FSDP's use_orig_params does; grads as views of one bucket, as DDP's
    # gradient_as_bucket_view does; Python storage objects made by torch.save)
    # send the step through the exact shared-memory check, which must let
    # disjoint views through: bit for bit torch's fused Adam (sizes multiples
    # of 128, so no scalar tails).
    sizes = [256, 384, 128]
    torch.manual_seed(0)
    init = torch.randn(sum(sizes))
    sides = []
    for make in (FusedAdam, lambda ps: torch.optim.Adam(ps, fused=True)):
        flat = init.clone()
        params = [nn.Parameter(v) for v in _flat_views(flat, sizes)]
        opt = make(params)
        if saved:
            torch.save(params, io.BytesIO())
        sides.append((params, opt))
    for step in range(3):
        grads = torch.randn(sum(sizes))
        for params, opt in sides:
            bucket = grads.clone()
            for p, g in zip(params, _flat_views(bucket, sizes)):
                p.grad = g
            opt.step()
    (ours, _), (native, _) = sides
    assert all(torch.equal(a, b) for a, b in zip(ours, native))
