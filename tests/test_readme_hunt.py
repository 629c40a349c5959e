"""README claims checked by a hunt (session 31): each test failed on the code before its fix."""
import copy

import torch

import pygan_optim
from test_fused_adam import _uses_fma


def test_fused_adamw_is_a_torch_adamw_subclass():
    # README: "`pygan_optim.FusedAdam` / `FusedAdamW`: subclasses of `torch.optim.Adam`/`AdamW`".
    assert issubclass(pygan_optim.FusedAdam, torch.optim.Adam)
    assert issubclass(pygan_optim.FusedAdamW, torch.optim.AdamW)
    assert issubclass(pygan_optim.FusedAdamW, pygan_optim.FusedAdam)
    torch.manual_seed(0)
    ours_model, torch_model = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    torch_model.load_state_dict(ours_model.state_dict())
    ours = pygan_optim.FusedAdamW(ours_model.parameters(), lr=0.1)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=0.1, fused=True)
    assert isinstance(ours, torch.optim.AdamW)
    assert ours.defaults == {**theirs.defaults, "fused": None}
    x = torch.randn(3, 8)
    for model, opt in ((ours_model, ours), (torch_model, theirs)):
        model(x).sum().backward()
        opt.step()
    # Bit for bit where both kernels use FMA alike (as test_fused_adam's parity tests).
    if _uses_fma(ours=True) == _uses_fma(ours=False):
        for a, b in zip(ours_model.parameters(), torch_model.parameters()):
            assert torch.equal(a, b)
    # __setstate__ (deepcopy/pickle) keeps AdamW's decoupled weight decay.
    assert copy.deepcopy(ours).param_groups[0]["decoupled_weight_decay"] is True
