"""torch.compile against eager FusedAdam and torch's Adam (session 32 bug hunt).

Compiled steps must give eager FusedAdam's bits (the same kernel on the same
tensors) and refuse what eager steps and torch's Adam refuse. Two bugs:

- grads that are views of one buffer (DDP's ``gradient_as_bucket_view``,
  FSDP2's reduce-scatter output) made Inductor fail to compile the step
  (InductorError from its auto_functionalized pass): adam_step_'s schema
  declares the grads written, for zero_grads. A traced step that writes no grads
  now calls ``adam_step_read_grads_`` (grads read only), and grads that are
  views are zeroed after the update by torch's zero op.
- ``foreach=True`` with a Tensor lr (set after construction) was refused by
  eager steps and by torch's Adam, eager and compiled, but a compiled FusedAdam
  step took it: Dynamo shows the traced code every group with capturable=True,
  so the check now runs in ``_init_group``, on the real group, as torch's does.

The rest checks what held: mixed compiled and eager steps, hyper-parameters,
groups and state changed between compiled steps, step_options, recompiles.
"""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from pygan_optim.optim import EmaBlend, FusedAdam
from pygan_optim.wrappers import fused_step


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def give_grads(model, seed, skip=()):
    torch.manual_seed(seed)
    for i, p in enumerate(model.parameters()):
        g = torch.randn_like(p)
        p.grad = None if i in skip else g


def give_view_grads(params, buf, seed):
    """Grads that are views of one flat buffer, as DDP's bucket views."""
    torch.manual_seed(seed)
    buf.copy_(torch.randn(buf.numel()))
    offset = 0
    for p in params:
        p.grad = buf[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def assert_same(params_a, opt_a, params_b, opt_b):
    for k, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a, b), f"param {k} differs"
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sa.keys() == sb.keys(), f"state keys of param {k}"
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"state {key} of param {k} differs"


# ---- bug 1: grads that are views of one buffer, under Inductor ---------------------

def _two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.1}]


@pytest.mark.parametrize("mode", ["step", "zeros_in_step", "two_groups_zeros"])
def test_inductor_compiles_a_step_whose_grads_are_views_of_one_buffer(mode):
    eager_model, compiled_model = small_model(), small_model()
    numel = sum(p.numel() for p in eager_model.parameters())
    opts, bufs = [], []
    for model in (eager_model, compiled_model):
        ps = list(model.parameters())
        opts.append(FusedAdam(_two_groups(ps) if mode == "two_groups_zeros" else ps, lr=1e-2,
                              betas=(0.5, 0.9)))
        bufs.append(torch.zeros(numel))

    def step(opt):
        if mode == "step":
            opt.step()
        else:
            opt.step_and_zero_grad(set_to_none=False)

    compiled = torch.compile(step, backend="inductor")
    for seed in range(3):
        for model, buf in zip((eager_model, compiled_model), bufs):
            give_view_grads(list(model.parameters()), buf, seed)
        step(opts[0])
        compiled(opts[1])  # InductorError before the fix
        assert_same(list(eager_model.parameters()), opts[0],
                    list(compiled_model.parameters()), opts[1])
        assert torch.equal(bufs[0], bufs[1])
        assert mode == "step" or not bufs[1].any()


def test_inductor_fused_wrapper_step_with_grads_as_views():
    """Clip + AMP (with an overflow) + zeros in the step, two groups."""
    eager_model, compiled_model = small_model(), small_model()
    numel = sum(p.numel() for p in eager_model.parameters())
    opts = [FusedAdam(_two_groups(list(m.parameters())), lr=1e-2, betas=(0.0, 0.999))
            for m in (eager_model, compiled_model)]
    bufs = [torch.zeros(numel), torch.zeros(numel)]
    scale = torch.tensor(256.0)

    def wrapper_step(opt):
        return fused_step.step(opt, max_norm=0.5, loss_scale=scale, zero_grads=True,
                               log_norm=lambda norm: None, step_kwargs={})

    compiled = torch.compile(wrapper_step, backend="inductor")
    for seed in range(3):
        for model, buf in zip((eager_model, compiled_model), bufs):
            give_view_grads(list(model.parameters()), buf, seed)
            buf.mul_(256.0)
            if seed == 1:
                buf[3] = float("inf")
        found = [wrapper_step(opts[0]), compiled(opts[1])]
        assert torch.equal(found[0], found[1]) and found[1].item() == float(seed == 1)
        assert_same(list(eager_model.parameters()), opts[0],
                    list(compiled_model.parameters()), opts[1])
        assert not bufs[1].any()


def test_read_grads_twin_passes_opcheck():
    from torch.library import opcheck

    torch.manual_seed(0)
    params = [torch.randn(7), torch.randn(3, 5)]
    args = ([p.clone() for p in params], [torch.randn_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [],
            [torch.zeros(()) for _ in params])
    opcheck(torch.ops.pygan_optim.adam_step_read_grads_.default, args,
            dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled=False, emas=[], ema_index=[], ema_momentum=0.0))


# ---- bug 2: foreach=True with a Tensor lr --------------------------------------------

@pytest.mark.parametrize("compiled", [False, True])
def test_tensor_lr_with_foreach_is_refused_compiled_as_eager(compiled):
    model = small_model()
    opt = FusedAdam(model.parameters(), lr=1e-2)
    opt.param_groups[0].update(foreach=True, lr=torch.tensor(1e-2))  # torch's Adam refuses
    give_grads(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    # Dynamo wraps the error raised while tracing (as for torch's Adam).
    with pytest.raises(Exception, match="lr as a Tensor is not supported for capturable=False"):
        step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state


# ---- checked and fine ------------------------------------------------------------------

def test_compiled_and_eager_steps_mixed_on_one_optimizer_equal_eager():
    """Eager steps pack the state (views of one buffer); compiled steps then
    update those views (Inductor), and eager steps take the result over."""
    models = [small_model(), small_model()]
    opts = [FusedAdam(m.parameters(), lr=1e-2, betas=(0.5, 0.99), amsgrad=True) for m in models]
    compiled = torch.compile(opts[1].step, backend="inductor")
    for seed, use_compiled in enumerate([0, 0, 1, 1, 0, 1]):
        for m in models:
            give_grads(m, seed, skip=(1,) if seed == 3 else ())
        opts[0].step()
        (compiled if use_compiled else opts[1].step)()
        assert_same(list(models[0].parameters()), opts[0], list(models[1].parameters()), opts[1])


def test_groups_state_and_hyper_parameters_changed_between_compiled_steps():
    """add_param_group, load_state_dict (torch's Adam's dict), betas through 0,
    maximize, amsgrad switched on, weight decay: each change is seen (Dynamo
    guards), bit for bit with eager."""
    models = [small_model(), small_model()]
    runs = []
    for model, compiled in zip(models, (False, True)):
        ps = list(model.parameters())
        opt = FusedAdam(ps[:2], lr=1e-2, betas=(0.5, 0.99))
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        give_grads(model, 0)
        step()
        opt.add_param_group({"params": ps[2:], "lr": 0.1})
        give_grads(model, 1)
        step()
        torch_model = copy.deepcopy(model)
        torch_opt = torch.optim.Adam([{"params": list(torch_model.parameters())[:2]},
                                      {"params": list(torch_model.parameters())[2:]}], lr=3e-2)
        give_grads(torch_model, 2)
        torch_opt.step()
        opt.load_state_dict(torch_opt.state_dict())
        for seed, (betas, maximize, amsgrad, wd) in enumerate(
                [((0.0, 0.99), False, False, 0.0), ((0.0, 0.9), True, False, 0.1),
                 ((0.9, 0.9), True, True, 0.0)], start=3):
            for group in opt.param_groups:
                group.update(betas=betas, maximize=maximize, amsgrad=amsgrad, weight_decay=wd)
            give_grads(model, seed)
            step()
        runs.append((ps, opt))
    assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


def test_step_options_inside_compiled_code_equal_eager():
    models = [small_model(), small_model()]
    opts = [FusedAdam(m.parameters(), lr=1e-2, betas=(0.0, 0.99)) for m in models]

    def step(opt, scale, found_inf, mult):
        with opt.step_options(grad_scale=scale, found_inf=found_inf, grad_mult=mult,
                              zero_grads=True):
            opt.step()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for seed in range(3):
        for m in models:
            give_grads(m, seed)
        args = (torch.tensor([2.0 ** seed]), torch.tensor([float(seed == 1)]),
                torch.tensor([0.5]))
        step(opts[0], *args)
        compiled(opts[1], *args)
        assert_same(list(models[0].parameters()), opts[0], list(models[1].parameters()), opts[1])
        assert all(not p.grad.any() for p in models[1].parameters())


def test_float_lr_scheduler_recompiles_then_runs_eager_with_equal_results():
    """A float lr is a constant of the graph: each new value traces again (as
    torch's foreach Adam) until Dynamo's recompile limit, then the step runs
    eagerly. The results stay eager FusedAdam's; a Tensor lr compiles once."""
    for lr in (1e-2, torch.tensor(1e-2)):
        torch._dynamo.reset()
        counters.clear()
        models = [small_model(), small_model()]
        opts = [FusedAdam(m.parameters(), lr=lr if not torch.is_tensor(lr) else lr.clone())
                for m in models]
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.8 ** e) for o in opts]
        compiled = torch.compile(opts[1].step, backend="aot_eager")
        for seed in range(10):
            for m in models:
                give_grads(m, seed)
            opts[0].step()
            compiled()
            for s in scheds:
                s.step()
        assert_same(list(models[0].parameters()), opts[0], list(models[1].parameters()), opts[1])
        if torch.is_tensor(lr):
            assert counters["stats"]["unique_graphs"] == 1


def test_compiled_ema_step_leaves_every_pair_pending():
    model = small_model()
    opt = FusedAdam(model.parameters(), lr=1e-2, betas=(0.0, 0.99))
    averages = [p.detach().clone() for p in model.parameters()]
    give_grads(model, 0)
    blend = EmaBlend(list(zip(model.parameters(), averages)), 0.9)
    torch.compile(lambda: opt.step(ema=blend), backend="aot_eager", fullgraph=True)()
    assert len(blend.pending()) == len(averages) and not blend.done
