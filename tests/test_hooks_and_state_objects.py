"""Hooks, instance-wrapped steps and user-stored state dicts, against torch's
fused Adam and MMEngine's wrappers (found by the session-30 hunt; each test fails
on the code before its fix)."""
import pytest
import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper as MMEngineOptimWrapper
from mmengine.optim.scheduler import LinearLR

import pygan_optim
from pygan_optim import FusedAdam

N = 40000  # over the 32768 elements from which grads are kept (see the fixture)
pytestmark = pytest.mark.usefixtures("one_thread", "keep_small_cpu_grads")


def _pair(n=N, **kw):
    """Equal params under ours and torch's fused Adam. On one thread, with n a
    multiple of 64, the two are bit for bit (conftest's one_thread)."""
    ps = [nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(0)))
          for _ in range(2)]
    kw.setdefault("betas", (0.0, 0.999))
    return ps, FusedAdam([ps[0]], lr=1e-2, **kw), torch.optim.Adam([ps[1]], lr=1e-2, fused=True,
                                                                   **kw)


def _grad(step, n=N):
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + step))


def _assert_same(ps, opts):
    assert torch.equal(ps[0], ps[1])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opts[0].state[ps[0]][key], opts[1].state[ps[1]][key]), key


# ---- step post-hooks when the zeros are written in the step ----

@pytest.mark.parametrize("self_removing", [False, True])
def test_post_hooks_see_the_grads_when_the_step_writes_zeros(self_removing):
    ps, *opts = _pair()
    seen = [[], []]
    for p, opt, log in zip(ps, opts, seen):
        def hook(o, args, kwargs, p=p, log=log):
            log.append(float(p.grad.abs().sum()))
            if self_removing:
                handle.remove()
        handle = opt.register_step_post_hook(hook)
        for step in range(2):
            p.grad = _grad(step)
            if isinstance(opt, FusedAdam):
                opt.step_and_zero_grad(set_to_none=False)
            else:
                opt.step()
                opt.zero_grad(set_to_none=False)
            assert p.grad is not None and not p.grad.any()
    assert seen[0] == seen[1] and seen[0][0] > 0  # were zeros
    _assert_same(ps, opts)


def test_wrapper_update_params_with_zeros_lets_post_hooks_see_the_grads():
    seen = {}
    for wrapper_cls, opt_cls, kw in ((MMEngineOptimWrapper, torch.optim.Adam, dict(fused=True)),
                                     (pygan_optim.OptimWrapper, FusedAdam, {})):
        model = nn.Linear(64, 64)
        torch.nn.init.constant_(model.weight, 0.5)
        opt = opt_cls(model.parameters(), lr=1e-2, **kw)
        log = seen.setdefault(wrapper_cls, [])
        opt.register_step_post_hook(
            lambda o, a, k, m=model, log=log: log.append([float(p.grad.sum()) for p in m.parameters()]))
        wrapper = wrapper_cls(optimizer=opt)
        wrapper.update_params(model(torch.ones(3, 64)).sum(), zero_kwargs=dict(set_to_none=False))
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    ours, theirs = seen[pygan_optim.OptimWrapper], seen[MMEngineOptimWrapper]
    assert ours == theirs and theirs[0][1] == 3.0 * 64


# ---- state_dict post-hooks ----

def test_a_state_dict_post_hook_may_return_a_layout_of_its_own():
    ps, *opts = _pair()
    results = []
    for p, opt in zip(ps, opts):
        p.grad = _grad(0)
        opt.step()
        opt.register_state_dict_post_hook(lambda o, sd: {"optimizer": sd, "format": 2})
        results.append(opt.state_dict())
    assert results[0].keys() == results[1].keys() == {"optimizer", "format"}
    inner = results[0]["optimizer"]["state"][0]
    assert torch.equal(inner["exp_avg"], results[1]["optimizer"]["state"][0]["exp_avg"])


# ---- a step wrapped on the instance ----

@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_code_wrapped_around_step_sees_and_edits_only_the_grad(weight_decay):
    """Code run after the real step (logging, a clip of one's own) reads the
    grad and edits it in place: with the grad kept as exp_avg it read the
    effective grad and its edit reached the state."""
    ps, *opts = _pair(weight_decay=weight_decay)
    seen = [[], []]
    for p, opt, log in zip(ps, opts, seen):
        inner = opt.step

        def step(*args, inner=inner, p=p, log=log, **kwargs):
            out = inner(*args, **kwargs)
            log.append(float(p.grad.sum()))
            p.grad.mul_(0.0)
            return out
        opt.step = step
        for k in range(2):
            p.grad = _grad(k)
            if isinstance(opt, FusedAdam):
                opt.step_and_zero_grad()
            else:
                opt.step()
                opt.zero_grad()
            opt.param_groups[0]["betas"] = (0.9, 0.999)  # the next step reads exp_avg
    assert seen[0] == seen[1]
    if not weight_decay:
        _assert_same(ps, opts)
        return
    # L2: torch rounds weight_decay * param before adding the grad, ours rounds
    # once (FMA): up to half an ulp of the product plus one of the sum apart
    # (test_grad_as_exp_avg.Trio.check's bound), and the params by Trio's.
    product_ulp = 2.0 ** -23 * weight_decay * float(ps[1].detach().abs().max())
    torch.testing.assert_close(opts[0].state[ps[0]]["exp_avg"], opts[1].state[ps[1]]["exp_avg"],
                               rtol=2 ** -23, atol=product_ulp)
    torch.testing.assert_close(ps[0], ps[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["torch", "mmengine"])
def test_the_schedulers_step_counters_still_let_grads_be_kept(scheduler):
    """torch's and MMEngine's schedulers wrap step on the instance to count calls;
    those wrappers only call the step, so the grads are still kept."""
    p = nn.Parameter(torch.randn(N))
    opt = FusedAdam([p], lr=1e-2, betas=(0.0, 0.999))
    if scheduler == "torch":
        torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    else:
        LinearLR(opt, start_factor=0.5, by_epoch=False)
    assert "step" in vars(opt)
    for k in range(2):
        p.grad = _grad(k)
        given = p.grad.data_ptr()
        opt.step_and_zero_grad()
        assert opt.state[p]["exp_avg"].data_ptr() == given, k


@pytest.mark.parametrize("scheduler", ["torch", "mmengine"])
def test_a_wrapper_made_with_functools_wraps_over_a_schedulers_is_the_users(scheduler):
    """functools.wraps copies the flags the schedulers mark their counters with."""
    import functools

    ps, *opts = _pair(weight_decay=0.5)
    seen = [[], []]
    for p, opt, log in zip(ps, opts, seen):
        if scheduler == "torch":
            torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
        else:
            LinearLR(opt, start_factor=1.0, by_epoch=False)
        inner = opt.step

        @functools.wraps(inner)
        def step(*args, inner=inner, p=p, log=log, **kwargs):
            out = inner(*args, **kwargs)
            log.append(float(p.grad.sum()))
            return out
        opt.step = step
        p.grad = _grad(0)
        if isinstance(opt, FusedAdam):
            opt.step_and_zero_grad()
        else:
            opt.step()
            opt.zero_grad()
    assert seen[0] == seen[1]  # the raw grad, not the effective one written over it


def test_a_subclass_overriding_step_sees_and_edits_only_the_grad():
    class ClearsItsGrads(FusedAdam):
        def step(self, closure=None, **kwargs):
            out = super().step(closure, **kwargs)
            for group in self.param_groups:
                for q in group["params"]:
                    q.grad.mul_(0.0)
            return out

    p = nn.Parameter(torch.ones(N))
    opt = ClearsItsGrads([p], lr=1e-2, betas=(0.0, 0.999), weight_decay=0.5)
    p.grad = torch.ones(N)
    opt.step_and_zero_grad()
    assert float(opt.state[p]["exp_avg"][0]) == 1.5  # grad 1 + 0.5 * param 1


def test_a_compiled_step_with_post_hooks_still_zeroes_the_grads():
    p = nn.Parameter(torch.randn(64))
    opt = FusedAdam([p], lr=1e-2)
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append(float(p.grad.abs().sum())))

    @torch.compile(backend="eager")
    def update():
        opt.step_and_zero_grad(set_to_none=False)
    p.grad = torch.ones(64)
    update()
    assert seen == [64.0] and p.grad is not None and not p.grad.any()


# ---- a state dict stored by the user ----

def test_a_state_dict_the_user_stores_is_read_at_the_next_step():
    """Filled in after it was stored, it is what the next step reads (a copy was
    taken when it was stored, and the state restarted); afterwards it holds the
    state's tensors, which later steps update in place."""
    ps, *opts = _pair(betas=(0.9, 0.999))
    stored = []
    for p, opt in zip(ps, opts):
        d = {}
        opt.state[p] = d  # filled in afterwards
        d.update(step=torch.tensor(100.0), exp_avg=torch.full((N,), 0.5),
                 exp_avg_sq=torch.full((N,), 4.0))
        p.grad = _grad(0)
        opt.step()
        stored.append(d)
    _assert_same(ps, opts)
    assert all(stored[0][k] is opts[0].state[ps[0]][k] for k in ("step", "exp_avg"))
    for p, opt, d in zip(ps, opts, stored):  # edited in place after a step: seen
        d["exp_avg"].fill_(-1.0)
        p.grad = _grad(1)
        opt.step()
    _assert_same(ps, opts)
    assert float(stored[0]["step"]) == 102.0


def test_a_container_the_user_assigns_is_read_at_the_next_step():
    ps, *opts = _pair(betas=(0.9, 0.999))
    for p, opt in zip(ps, opts):
        d = {}
        opt.state = {p: d}
        d.update(step=torch.tensor(7.0), exp_avg=torch.full((N,), 0.5),
                 exp_avg_sq=torch.full((N,), 4.0))
        p.grad = _grad(0)
        opt.step()
        assert d["exp_avg"] is opt.state[p]["exp_avg"]
    _assert_same(ps, opts)


def test_resetting_each_state_with_an_empty_dict_keeps_grads_after_it():
    """opt.state[p] = {}, a common reset: the next steps start afresh, as torch's,
    and updates go on keeping grads as exp_avg."""
    ps, *opts = _pair()
    for p, opt in zip(ps, opts):
        p.grad = _grad(0)
        opt.step()
        opt.state[p] = {}
    for k in range(1, 3):
        given = []
        for p, opt in zip(ps, opts):
            p.grad = _grad(k)
            given.append(p.grad.data_ptr())
            if isinstance(opt, FusedAdam):
                opt.step_and_zero_grad()
            else:
                opt.step()
                opt.zero_grad()
        assert opts[0].state[ps[0]]["exp_avg"].data_ptr() == given[0], k
        _assert_same(ps, opts)


def test_a_refused_step_leaves_a_stored_empty_state_as_it_was():
    p, q = nn.Parameter(torch.randn(N)), nn.Parameter(torch.randn(64))
    opt = FusedAdam([p, q], lr=1e-2)
    d = {}
    opt.state[p] = d
    opt.state[q].update(step=torch.tensor(3.0), exp_avg=torch.zeros(65),  # a wrong shape
                        exp_avg_sq=torch.zeros(64))
    p.grad, q.grad = _grad(0), torch.ones(64)
    with pytest.raises(RuntimeError, match="exp_avg"):
        opt.step()
    assert opt.state[p] is d and d == {}
    opt.state[q]["exp_avg"] = torch.zeros(64)
    opt.step()
    assert float(d["step"]) == 1.0 and d["exp_avg"] is opt.state[p]["exp_avg"]
