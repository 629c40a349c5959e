"""FusedAdamW(FusedAdam, torch.optim.AdamW) MRO hunt (session 31): each test failed before its fix."""
import pytest
import torch

from pygan_optim import FusedAdam, FusedAdamW


def test_fused_adam_mixin_init_still_runs():
    # FusedAdam.__init__ called torch.optim.Adam.__init__ by name to skip AdamW's in
    # FusedAdamW's MRO; that also skipped the __init__ of any other class after FusedAdam
    # (a subclass's Adam mixin), while its __setstate__ etc. were still reached by super().
    calls = []

    class Mid(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            calls.append("__init__")
            super().__init__(*args, **kwargs)

    class Mixed(FusedAdam, Mid):
        pass

    opt = Mixed(torch.nn.Linear(2, 2).parameters(), lr=0.1, weight_decay=0.1)
    assert calls == ["__init__"]
    assert opt.param_groups[0]["decoupled_weight_decay"] is False
    # FusedAdamW still goes past torch AdamW's __init__ and keeps decoupled decay.
    w = FusedAdamW(torch.nn.Linear(2, 2).parameters())
    assert [c.__name__ for c in FusedAdamW.__mro__[:4]] == ["FusedAdamW", "FusedAdam", "AdamW", "Adam"]
    assert w.defaults == torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).defaults
    assert FusedAdam.__mro__ == (FusedAdam, torch.optim.Adam, torch.optim.Optimizer, object)


def test_keep_grad_min_bytes_error_names_fused_adamw():
    model = torch.nn.Linear(2, 2)
    opt = FusedAdamW(model.parameters())
    opt.keep_grad_min_bytes_cpu = -1
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match=r"^FusedAdamW\.keep_grad_min_bytes_cpu must be"):
        opt.step_and_zero_grad()
