"""torch.compile traces FusedAdam.step and the fused wrapper step (issue 13).

Under Dynamo the step calls the registered op once per param group and device,
with the lists built by ``_init_group`` (run outside the graph, as for torch's
own optimizers). Compiled results must equal eager ones bit for bit: the graph
calls the same kernel on the same tensors.
"""
import copy

import pytest
import torch

from pygan_optim.optim import FusedAdam, FusedAdamW
from pygan_optim.wrappers import fused_step


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def give_grads(model, seed, scale=1.0):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale


VARIANTS = {
    "adam": lambda ps: FusedAdam(ps, lr=1e-2, betas=(0.5, 0.99), weight_decay=0.1),
    "gan_betas": lambda ps: FusedAdam(ps, lr=1e-3, betas=(0.0, 0.999), eps=1e-6),
    "amsgrad_maximize": lambda ps: FusedAdam(ps, lr=1e-2, amsgrad=True, maximize=True),
    "adamw": lambda ps: FusedAdamW(ps, lr=1e-2),
    "tensor_lr": lambda ps: FusedAdam(ps, lr=torch.tensor(1e-2)),
    "two_groups": lambda ps: FusedAdam([{"params": ps[:2]}, {"params": ps[2:], "lr": 1e-1}],
                                       lr=1e-2),
}


def assert_same(model_a, opt_a, model_b, opt_b):
    for k, (a, b) in enumerate(zip(model_a.parameters(), model_b.parameters())):
        assert torch.equal(a, b), f"param {k} differs"
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"state {key} of param {k} differs"


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_is_one_graph_without_breaks_at_steady_state(variant):
    model = small_model()
    opt = VARIANTS[variant](list(model.parameters()))
    for seed in range(2):
        give_grads(model, seed)
        opt.step()
    give_grads(model, 2)
    explained = torch._dynamo.explain(opt.step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        explained.break_reasons
    code = explained.graphs[0].code
    # One update call per group (nothing unrolled per tensor), plus a checking-only
    # call for each group after the first, so a refused step changes nothing.
    groups = len(opt.param_groups)
    assert code.count("pygan_optim.adam_step_") == 2 * groups - 1
    assert code.count("validate_only = True") == groups - 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("variant", ["adam", "amsgrad_maximize", "two_groups"])
def test_compiled_step_equals_eager_bit_for_bit(variant, backend):
    eager_model, compiled_model = small_model(), small_model()
    eager_opt = VARIANTS[variant](list(eager_model.parameters()))
    compiled_opt = VARIANTS[variant](list(compiled_model.parameters()))
    compiled_step = torch.compile(compiled_opt.step, backend=backend)
    for seed in range(4):  # from the very first step, which creates the state
        give_grads(eager_model, seed)
        give_grads(compiled_model, seed)
        eager_opt.step()
        compiled_step()
        assert_same(eager_model, eager_opt, compiled_model, compiled_opt)
    # The compiled steps leave state an eager step (and a checkpoint) takes over.
    give_grads(eager_model, 99)
    give_grads(compiled_model, 99)
    eager_opt.step()
    compiled_opt.step()
    assert_same(eager_model, eager_opt, compiled_model, compiled_opt)


def test_compiled_training_step_breaks_only_at_backward_and_equals_eager():
    """A whole training step under torch.compile: the only graph break is
    torch's own at ``backward()`` (torch.optim.Adam has the same one), none in
    the optimizer. aot_eager runs the model with eager kernels, so the grads and
    hence the updates are bit-identical (inductor may reorder the model's math)."""
    eager_model, compiled_model = small_model(), small_model()
    eager_opt = VARIANTS["gan_betas"](list(eager_model.parameters()))
    compiled_opt = VARIANTS["gan_betas"](list(compiled_model.parameters()))
    torch.manual_seed(10)
    batches = [torch.randn(4, 6) for _ in range(4)]

    def train_step(model, opt, x):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()

    compiled = torch.compile(train_step, backend="aot_eager")
    for x in batches:
        train_step(eager_model, eager_opt, x)
        compiled(compiled_model, compiled_opt, x)
        assert_same(eager_model, eager_opt, compiled_model, compiled_opt)
    explained = torch._dynamo.explain(train_step)(compiled_model, compiled_opt, batches[0])
    reasons = [r.reason for r in explained.break_reasons]
    assert explained.graph_break_count == 1 and "backward" in reasons[0], reasons


def wrapper_step(opt, loss_scale):
    return fused_step.step(opt, max_norm=0.5, loss_scale=loss_scale, zero_grads=True,
                           log_norm=lambda norm: None, step_kwargs={})


def test_fused_wrapper_step_compiles_and_equals_eager():
    """Clip (global norm) + AMP unscale + skip on inf + zeroing, in one graph."""
    eager_model = small_model()
    eager_opt = VARIANTS["gan_betas"](list(eager_model.parameters()))
    compiled_model = copy.deepcopy(eager_model)
    compiled_opt = VARIANTS["gan_betas"](list(compiled_model.parameters()))
    scale = torch.tensor(256.0)
    compiled = torch.compile(wrapper_step, backend="aot_eager")
    for seed in range(4):
        for model in (eager_model, compiled_model):
            give_grads(model, seed, scale=256.0)
            if seed == 2:  # an overflow: the step must change nothing
                next(model.parameters()).grad[0, 0] = float("inf")
        before = [p.clone() for p in compiled_model.parameters()]
        found_eager = wrapper_step(eager_opt, scale)
        found_compiled = compiled(compiled_opt, scale)
        assert torch.equal(found_eager, found_compiled)
        assert found_compiled.item() == (1.0 if seed == 2 else 0.0)
        if seed == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, compiled_model.parameters()))
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in compiled_model.parameters())
        assert_same(eager_model, eager_opt, compiled_model, compiled_opt)

    give_grads(compiled_model, 7, scale=256.0)
    explained = torch._dynamo.explain(wrapper_step)(compiled_opt, scale)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
        explained.break_reasons


def test_compiled_step_refused_in_a_later_group_changes_nothing():
    """Hyper-parameters are checked by the op at run time: every group's call is
    checked before the first one writes, as in eager mode."""
    model = small_model()
    opt = VARIANTS["two_groups"](list(model.parameters()))
    give_grads(model, 0)
    opt.step()
    opt.param_groups[1]["lr"] = -1.0
    give_grads(model, 1)
    before = [p.clone() for p in model.parameters()]
    state_before = copy.deepcopy([dict(opt.state[p]) for p in model.parameters()])
    with pytest.raises(ValueError, match="invalid learning rate -1"):
        torch.compile(opt.step, backend="aot_eager")()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for p, saved in zip(model.parameters(), state_before):
        assert all(torch.equal(opt.state[p][k], saved[k]) for k in saved)


def test_compiled_step_on_dtensor_params_uses_local_shards(tmp_path):
    """FSDP2-style DTensor parameters (one rank here; tests/test_fsdp2.py runs
    two): the traced step also hands their local shards to the op."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        plain = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
                   for p in plain]
        eager_opt, compiled_opt = FusedAdam(plain, lr=1e-2), FusedAdam(sharded, lr=1e-2)
        compiled_step = torch.compile(compiled_opt.step, backend="aot_eager")
        for _ in range(3):
            for p, d in zip(plain, sharded):
                p.grad = torch.randn(8, 4)
                d.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
            eager_opt.step()
            compiled_step()
            assert all(torch.equal(p, d.to_local()) for p, d in zip(plain, sharded))
        explained = torch._dynamo.explain(compiled_opt.step)()
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    finally:
        dist.destroy_process_group()
