"""Session 41's fixes of what its bug hunts found, each with a test that fails
on the code before it."""
import copy

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
