"""The common-case checks of the Adam op (`plain_slot` in csrc/check_pass.cpp): each
parameter's tensors are read once and taken as they are when they are plain and
share the parameter's key set, dtype, device, sizes and strides; anything else
goes to the full checks. Here one parameter among plain ones differs from the
common case in one property at a time: the step must refuse exactly what it
refused before (with nothing written) and give torch.optim.Adam's numbers for
what it accepts."""
import pytest
import torch

from pygan_optim import ops
from test_fused_adam import _uses_fma

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
N = 6
ODD = 3  # the parameter whose tensors are twisted


def _setup(shape=(8, 16)):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen) for _ in range(N)]
    grads = [torch.randn(shape, generator=gen) for _ in range(N)]
    state = {k: [torch.rand(shape, generator=gen) for _ in range(N)]
             for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    steps = [torch.tensor(5.0) for _ in range(N)]
    return params, grads, state, steps


def _theirs(params, grads, state, steps, amsgrad):
    """torch.optim.Adam(fused=True) from the same values, contiguous."""
    ps = [torch.nn.Parameter(p.detach().clone().contiguous()) for p in params]
    opt = torch.optim.Adam(ps, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                           amsgrad=amsgrad, fused=True)
    for p, g, i in zip(ps, grads, range(N)):
        p.grad = g.detach().clone().contiguous()
        s = {"step": steps[i].detach().clone().float().reshape(()),
             "exp_avg": state["exp_avg"][i].detach().clone().contiguous(),
             "exp_avg_sq": state["exp_avg_sq"][i].detach().clone().contiguous()}
        if amsgrad:
            s["max_exp_avg_sq"] = state["max_exp_avg_sq"][i].detach().clone().contiguous()
        opt.state[p] = s
    opt.step()
    return [p.detach() for p in ps], opt


def _ours(params, grads, state, steps, amsgrad):
    ops.adam_step_(params, grads, state["exp_avg"], state["exp_avg_sq"], steps,
                   amsgrad=amsgrad, max_exp_avg_sqs=state["max_exp_avg_sq"] if amsgrad else None,
                   **HP)


def _transposed(t):
    return t.detach().clone().t().contiguous().t()  # same shape, other strides


ACCEPTED = {
    "step float64": lambda p, g, s, st: st.__setitem__(ODD, st[ODD].double()),
    "step of shape [1]": lambda p, g, s, st: st.__setitem__(ODD, st[ODD].reshape(1)),
    "step a view at an offset": lambda p, g, s, st: st.__setitem__(
        ODD, torch.tensor([0.0, 5.0])[1:].reshape(())),
    "exp_avg_sq with other strides": lambda p, g, s, st: s["exp_avg_sq"].__setitem__(
        ODD, _transposed(s["exp_avg_sq"][ODD])),
    "grad with other strides": lambda p, g, s, st: g.__setitem__(ODD, _transposed(g[ODD])),
    "param and its state transposed alike": lambda p, g, s, st: (
        p.__setitem__(ODD, _transposed(p[ODD])), g.__setitem__(ODD, _transposed(g[ODD])),
        [s[k].__setitem__(ODD, _transposed(s[k][ODD])) for k in s]),
    "grad a view at an offset": lambda p, g, s, st: g.__setitem__(
        ODD, torch.cat([torch.zeros(3), g[ODD].flatten()])[3:].view(g[ODD].shape)),
    "grad copy-on-write": lambda p, g, s, st: g.__setitem__(ODD, torch._lazy_clone(g[ODD])),
    "exp_avg copy-on-write": lambda p, g, s, st: s["exp_avg"].__setitem__(
        ODD, torch._lazy_clone(s["exp_avg"][ODD])),
    "param copy-on-write": lambda p, g, s, st: p.__setitem__(ODD, torch._lazy_clone(p[ODD])),
    "grad requiring grad": lambda p, g, s, st: g[ODD].requires_grad_(),
}


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("twist", sorted(ACCEPTED))
def test_a_twisted_parameter_is_updated_as_torch_does(twist, amsgrad, one_thread):
    params, grads, state, steps = _setup()
    ACCEPTED[twist](params, grads, state, steps)
    theirs, opt = _theirs(params, grads, state, steps, amsgrad)
    _ours(params, grads, state, steps, amsgrad)
    for i in range(N):
        ts = opt.state[opt.param_groups[0]["params"][i]]
        for a, b in ((params[i], theirs[i]), (state["exp_avg"][i], ts["exp_avg"]),
                     (state["exp_avg_sq"][i], ts["exp_avg_sq"])):
            _same(a, b)
        assert float(steps[i]) == 6.0


def _same(a, b):
    """Bit for bit as torch fused where both loops use FMA alike (the element math is
    torch's), else within the rounding of the one fused multiply-add (1 ulp of each
    of a few terms)."""
    if _uses_fma(ours=True) == _uses_fma(ours=False):
        assert torch.equal(a, b.view(a.shape))
    else:
        torch.testing.assert_close(a, b.view(a.shape), rtol=1e-6, atol=1e-7)


def _shrunk_storage(t):
    t = t.detach().clone()
    t.untyped_storage().resize_(t.numel() * t.element_size() // 2)
    return t


REFUSED = {
    "exp_avg float64": (lambda p, g, s, st: s["exp_avg"].__setitem__(
        ODD, s["exp_avg"][ODD].double()), "exp_avgs\\[3\\] has dtype"),
    "grad of another shape": (lambda p, g, s, st: g.__setitem__(ODD, g[ODD].flatten()),
                              "grads\\[3\\] has shape"),
    "step int64": (lambda p, g, s, st: st.__setitem__(ODD, torch.tensor(5)),
                   "state_steps\\[3\\] must be float32 or float64"),
    "step of two elements": (lambda p, g, s, st: st.__setitem__(ODD, torch.tensor([5.0, 5.0])),
                             "state_steps\\[3\\] must be a one-element tensor"),
    "exp_avg_sq's storage shrunk": (lambda p, g, s, st: s["exp_avg_sq"].__setitem__(
        ODD, _shrunk_storage(s["exp_avg_sq"][ODD])), "exp_avg_sqs\\[3\\].*past the end"),
    "exp_avg a negative view": (lambda p, g, s, st: s["exp_avg"].__setitem__(
        ODD, s["exp_avg"][ODD]._neg_view()), "negation"),  # torch's dispatcher refuses it
    "exp_avg on the meta device": (lambda p, g, s, st: s["exp_avg"].__setitem__(
        ODD, s["exp_avg"][ODD].to("meta")), "exp_avgs\\[3\\]"),
    "param an inference tensor": (lambda p, g, s, st: p.__setitem__(
        ODD, _inference_copy(p[ODD])), "params\\[3\\] is an inference tensor"),
    "step an inference tensor": (lambda p, g, s, st: st.__setitem__(
        ODD, _inference_copy(st[ODD])), "state_steps\\[3\\] is an inference tensor"),
}


def _inference_copy(t):
    with torch.inference_mode():
        return t.clone()


@pytest.mark.parametrize("twist", sorted(REFUSED))
def test_a_twisted_parameter_is_refused_and_nothing_changes(twist):
    params, grads, state, steps = _setup()
    change, message = REFUSED[twist]
    change(params, grads, state, steps)
    before = [t.clone() if t.device.type != "meta" else t
              for t in params + state["exp_avg"] + state["exp_avg_sq"] + steps]
    with pytest.raises((RuntimeError, ValueError), match=message):
        _ours(params, grads, state, steps, amsgrad=False)
    after = params + state["exp_avg"] + state["exp_avg_sq"] + steps
    for b, a in zip(before, after):
        if a.device.type != "meta" and a.untyped_storage().nbytes() >= a.numel() * a.element_size():
            assert torch.equal(b, a)


def test_an_empty_parameter_among_plain_ones_is_skipped_as_torch_does(one_thread):
    params, grads, state, steps = _setup()
    params[ODD], grads[ODD] = torch.zeros(0), torch.zeros(0)
    for k in state:
        state[k][ODD] = torch.zeros(0)
    theirs, _ = _theirs(params, grads, state, steps, amsgrad=False)
    _ours(params, grads, state, steps, amsgrad=False)
    for i in range(N):
        _same(params[i], theirs[i])
    assert [float(s) for s in steps] == [6.0] * N
