"""Session 41's fixes of what its bug hunts found, each with a test that fails
on the code before it."""
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
