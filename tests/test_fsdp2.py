"""FSDP2 (``fully_shard``, DTensor parameters) on two real gloo processes.

Each rank updates its local shards in the fused call. Checked here:
- the sharded step equals the unsharded step bit for bit: Adam works element
  by element, so the shards' results are the unsharded ones (Shard and
  Replicate placements, DTensor and plain params in one group, AMSGrad,
  AdamW, a Tensor lr);
- training a model with our wrapper (clip on) matches MMEngine's wrapper with
  torch's Adam, whose clip_grad_norm_ reduces the norm over the shards, and a
  single-process run on the same data;
- an inf in one rank's shard makes every rank skip the step;
- torch.distributed.checkpoint saves and restores the (DTensor) state.
Workers assert themselves; mp.spawn stops the other rank and re-raises.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from spawned_worker import exit_after_success

WORLD = 2
MAX_NORM = 0.05


def _model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    # Row counts 7 and 3 do not split evenly over 2 ranks: shards of unequal size.
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _full_grad(shape, step, k):
    g = torch.Generator().manual_seed(1000 * step + k)  # the same on every rank
    return torch.randn(shape, generator=g)


def _check_sharded_step_equals_unsharded(mesh, rank):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    from pygan_optim.optim import FusedAdam, FusedAdamW

    configs = [
        (FusedAdam, dict(lr=1e-2, betas=(0.5, 0.99), weight_decay=0.1)),
        (FusedAdam, dict(lr=1e-2, amsgrad=True, maximize=True)),
        (FusedAdamW, dict(lr=torch.tensor(1e-2), betas=(0.0, 0.999))),
    ]
    for cls, options in configs:
        plain = _model()
        extra_plain = [nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(2, 3))]
        sharded = copy.deepcopy(plain)
        fully_shard(sharded, mesh=mesh)
        # One replicated DTensor and one plain tensor beside it, in a group of their own.
        extra_sharded = [nn.Parameter(distribute_tensor(extra_plain[0].detach().clone(), mesh,
                                                        [Replicate()])),
                         nn.Parameter(extra_plain[1].detach().clone())]
        pairs = list(zip(list(plain.parameters()) + extra_plain,
                         list(sharded.parameters()) + extra_sharded))
        opt_plain = cls([{"params": list(plain.parameters())}, {"params": extra_plain}],
                        **options)
        opt_sharded = cls([{"params": list(sharded.parameters())}, {"params": extra_sharded}],
                          **options)
        for step in range(4):
            for k, (p, d) in enumerate(pairs):
                full = _full_grad(p.shape, step, k)
                p.grad = full.clone()
                d.grad = (distribute_tensor(full, d.device_mesh, d.placements)
                          if hasattr(d, "placements") else full.clone())
            opt_plain.step()
            opt_sharded.step()
            for k, (p, d) in enumerate(pairs):
                full = d.full_tensor() if hasattr(d, "placements") else d
                assert torch.equal(p.detach(), full.detach()), (cls.__name__, options, step, k)
                for key, value in opt_plain.state[p].items():
                    mine = opt_sharded.state[d][key]
                    if hasattr(d, "placements") and key != "step":
                        assert type(mine).__name__ == "DTensor", key  # state like torch's
                        mine = mine.full_tensor()
                    assert torch.equal(value, mine), (cls.__name__, step, k, key)


def _batches(rank, n):
    g = torch.Generator().manual_seed(200 + rank)  # each rank its own data
    return [torch.randn(4, 5, generator=g) for _ in range(n)]


def _train(model, wrapper, batches):
    for x in batches:
        with wrapper.optim_context(model):
            loss = model(x).pow(2).mean()
        wrapper.update_params(loss)


def _check_training_matches_torch_and_one_process(mesh, rank):
    import mmengine.optim as mm
    from mmengine.logging import MessageHub
    from torch.distributed.fsdp import fully_shard

    import pygan_optim

    iters = 5
    batches = _batches(rank, iters)
    results = {}
    for name, wrapper_cls, optimizer_cls in (
            ("ours", pygan_optim.OptimWrapper, pygan_optim.FusedAdam),
            ("torch", mm.OptimWrapper, lambda ps, **kw: torch.optim.Adam(ps, foreach=False, **kw))):
        hub = MessageHub.get_instance(f"fsdp2-{name}")
        model = _model()
        fully_shard(model, mesh=mesh)
        wrapper = wrapper_cls(optimizer_cls(model.parameters(), lr=1e-2, betas=(0.0, 0.999)),
                              clip_grad=dict(max_norm=MAX_NORM))
        assert wrapper.message_hub is hub  # the current instance when built
        norms = []
        for x in batches:
            _train(model, wrapper, [x])
            norms.append(hub.get_scalar("train/grad_norm").current())
        results[name] = ([p.full_tensor() for p in model.parameters()], norms)
    ours, ours_norms = results["ours"]
    theirs, their_norms = results["torch"]
    # The clip is active and both see the same global norm (summed over shards;
    # a per-rank norm would be about 1/sqrt(2) of it).
    assert min(their_norms) > MAX_NORM
    torch.testing.assert_close(torch.tensor(ours_norms), torch.tensor(their_norms),
                               rtol=1e-5, atol=0)
    # Grads agree to fp32 rounding of the norm (~1e-7 relative); Adam's update
    # is invariant to a common grad scale up to eps, so params differ only by
    # the per-step rounding of the update (an ulp or so of lr = 1e-2 per step).
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=iters * 1e-8)

    # One process, both ranks' batches: FSDP2 averages the ranks' grads, which
    # equals the grad of the mean of the two losses (up to summation order).
    every_batch = [torch.cat(xs) for xs in zip(*[_batches(r, iters) for r in range(WORLD)])]
    model = _model()
    MessageHub.get_instance("fsdp2-single")
    wrapper = pygan_optim.OptimWrapper(pygan_optim.FusedAdam(model.parameters(), lr=1e-2,
                                                             betas=(0.0, 0.999)),
                                       clip_grad=dict(max_norm=MAX_NORM))
    _train(model, wrapper, every_batch)
    for a, b in zip(ours, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=iters * 1e-7)


def _check_inf_on_one_rank_skips_everywhere(mesh, rank):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from pygan_optim.optim import FusedAdam
    from pygan_optim.wrappers import fused_step

    model = _model()
    fully_shard(model, mesh=mesh)
    opt = FusedAdam(model.parameters(), lr=1e-2)
    scale = torch.tensor(64.0)
    for step, plant in ((0, False), (1, True), (2, False)):
        for k, p in enumerate(model.parameters()):
            p.grad = distribute_tensor(_full_grad(p.shape, step, k) * 64.0, p.device_mesh,
                                       p.placements)
        if plant and rank == 1:
            next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")
        before = [p.full_tensor() for p in model.parameters()]
        found_inf = fused_step.step(opt, max_norm=MAX_NORM, loss_scale=scale, zero_grads=True,
                                    log_norm=lambda norm: None, step_kwargs={})
        assert found_inf.item() == float(plant), (rank, step)
        after = [p.full_tensor() for p in model.parameters()]
        changed = [not torch.equal(a, b) for a, b in zip(before, after)]
        assert changed == [not plant] * len(changed), (rank, step, changed)


def _check_distributed_checkpoint(mesh, rank, folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    from pygan_optim.optim import FusedAdam

    def build(seed):
        model = _model(seed)
        fully_shard(model, mesh=mesh)
        return model, FusedAdam(model.parameters(), lr=1e-2, betas=(0.0, 0.999))

    def train(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    batches = _batches(rank, 4)
    model, opt = build(0)
    train(model, opt, batches[:2])
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    exp_avgs = [s["exp_avg"] for s in state["optim"]["state"].values()]
    assert exp_avgs and all(type(t).__name__ == "DTensor" for t in exp_avgs)
    dcp.save(state, checkpoint_id=folder)
    train(model, opt, batches[2:])

    restored, restored_opt = build(1)  # other weights, empty state: all must come from disk
    state = {"model": get_model_state_dict(restored),
             "optim": get_optimizer_state_dict(restored, restored_opt)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(restored, state["model"])
    set_optimizer_state_dict(restored, restored_opt, state["optim"])
    train(restored, restored_opt, batches[2:])
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor())
    for a, b in zip(model.parameters(), restored.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key].full_tensor(),
                               restored_opt.state[b][key].full_tensor())
        assert float(opt.state[a]["step"]) == float(restored_opt.state[b]["step"]) == 4.0


def _worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}",
                            rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        _check_sharded_step_equals_unsharded(mesh, rank)
        _check_training_matches_torch_and_one_process(mesh, rank)
        _check_inf_on_one_rank_skips_everywhere(mesh, rank)
        _check_distributed_checkpoint(mesh, rank, os.path.join(out_dir, "dcp"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_after_success()


@pytest.mark.slow
def test_fsdp2_two_ranks_gloo(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
