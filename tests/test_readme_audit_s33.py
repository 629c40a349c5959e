"""README audit (session 33): claims checked against the code that needed a code fix.

README: "`pygan_optim.FusedAdam` / `FusedAdamW`: subclasses of `torch.optim.Adam`/`AdamW`
... Same arguments, defaults, error messages and `state_dict` layout"."""
import inspect

import pytest
import torch

from pygan_optim import FusedAdam, FusedAdamW


@pytest.mark.parametrize("ours, theirs", [(FusedAdam, torch.optim.Adam),
                                          (FusedAdamW, torch.optim.AdamW)])
def test_constructor_signature_has_torchs_arguments_kinds_and_defaults(ours, theirs):
    """What inspect.signature shows (config tools, docs, hparam loggers read it) is
    torch's: every argument, positional or keyword-only as there, with its default.
    FusedAdam's decoupled_weight_decay defaulted to None where torch's is False."""
    mine = inspect.signature(ours.__init__).parameters
    torchs = inspect.signature(theirs.__init__).parameters
    assert set(mine) == set(torchs), (list(mine), list(torchs))
    for name, p in torchs.items():
        assert mine[name].kind == p.kind, name
        assert mine[name].default == p.default, (name, mine[name].default, p.default)


@pytest.mark.parametrize("value, decoupled", [(None, False), (False, False), (True, True)])
def test_decoupled_weight_decay_values_as_torch_takes_them(value, decoupled):
    """None (which torch stores and treats as False) still means plain Adam; True is AdamW,
    bit for bit torch's fused AdamW step."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(257))
    theirs = torch.nn.Parameter(ours.detach().clone())
    o = FusedAdam([ours], weight_decay=0.1, decoupled_weight_decay=value)
    t = torch.optim.Adam([theirs], weight_decay=0.1, decoupled_weight_decay=decoupled, fused=True)
    assert o.param_groups[0]["decoupled_weight_decay"] is decoupled
    for _ in range(3):
        g = torch.randn(257)
        ours.grad, theirs.grad = g.clone(), g.clone()
        o.step()
        t.step()
    assert torch.equal(ours, theirs)


def test_fused_adamw_default_weight_decay_is_decoupled():
    p = torch.nn.Parameter(torch.randn(4))
    o = FusedAdamW([p])
    assert o.defaults == torch.optim.AdamW([torch.nn.Parameter(torch.randn(4))]).defaults
    assert o.param_groups[0]["decoupled_weight_decay"] is True
