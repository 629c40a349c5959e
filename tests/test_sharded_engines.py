"""PyTorch's other engines and MMEngine's strategies, on two real gloo processes:
ZeroRedundancyOptimizer (ZeRO-1) with FusedAdam inside, including
consolidate/save/load; FSDP1 with ``use_orig_params`` True and False; MMEngine's
DDPStrategy and FSDPStrategy building our wrapper from a config; AMP under FSDP1
skipping a step on every rank when one rank's shard overflows. Each run is
compared with the same run on ``torch.optim.Adam(foreach=False)``.
(DDP through our wrapper: test_ddp.py; FSDP2: test_fsdp2.py.)
Workers assert themselves; mp.spawn stops the other rank and re-raises."""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from spawned_worker import exit_after_success

WORLD = 2
ITERS = 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batches(rank):
    g = torch.Generator().manual_seed(300 + rank)  # each rank its own data
    return [torch.randn(4, 5, generator=g) for _ in range(ITERS)]


def _torch_adam(params, **kw):
    return torch.optim.Adam(params, foreach=False, **kw)


def _close(ours, theirs, what):
    # Ours vs torch's for-loop: at most ulp(p) + 4 eps |update| per step
    # (tests/test_fused_adam.py), |update| <= lr = 1e-2, fp32 eps = 1.2e-7, over
    # ITERS steps; the grads are identical (the same engine runs both).
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=ITERS * 2.4e-7, atol=ITERS * 4 * 1.2e-7 * 1e-2,
                                   msg=what)


def _train_plain(model, optimizer, batches):
    for x in batches:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def _check_zero(rank, out_dir):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pygan_optim.optim import FusedAdam

    def build(cls):
        model = DDP(_model())
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=1e-2,
                                              betas=(0.0, 0.999))

    batches = _batches(rank)
    results = {}
    for name, cls in (("ours", FusedAdam), ("torch", _torch_adam)):
        model, opt = build(cls)
        _train_plain(model, opt, batches)
        results[name] = [p.detach().clone() for p in model.parameters()]
    _close(results["ours"], results["torch"], "ZeRO-1")

    # Consolidate on rank 0, save, load on every rank: training continues alike.
    model, opt = build(FusedAdam)
    _train_plain(model, opt, batches[:3])
    opt.consolidate_state_dict(to=0)
    path = os.path.join(out_dir, "zero.pt")
    if rank == 0:
        torch.save(opt.state_dict(), path)
    dist.barrier()
    restored_model, restored_opt = build(FusedAdam)
    restored_model.load_state_dict(model.state_dict())
    restored_opt.load_state_dict(torch.load(path))
    _train_plain(model, opt, batches[3:])
    _train_plain(restored_model, restored_opt, batches[3:])
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b), "ZeRO-1 resume"


def _check_fsdp1(rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from pygan_optim.optim import FusedAdam

    batches = _batches(rank)
    for use_orig_params in (True, False):
        results = {}
        for name, cls in (("ours", FusedAdam), ("torch", _torch_adam)):
            model = FSDP(_model(), device_id=torch.device("cpu"),
                         use_orig_params=use_orig_params)
            opt = cls(model.parameters(), lr=1e-2, betas=(0.0, 0.999))
            _train_plain(model, opt, batches)
            with FSDP.summon_full_params(model):
                results[name] = [p.detach().clone() for p in model.parameters()]
        _close(results["ours"], results["torch"], f"FSDP1 use_orig_params={use_orig_params}")


def _check_mmengine_strategies(rank):
    from mmengine._strategy import DDPStrategy, FSDPStrategy
    from mmengine.logging import MessageHub
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    import pygan_optim  # noqa: F401  (registers FusedAdam and FusedOptimWrapper)

    strategies = {
        "DDPStrategy": lambda: DDPStrategy(
            model_wrapper=dict(type="MMDistributedDataParallel", device_ids=None)),
        "FSDPStrategy": lambda: FSDPStrategy(
            model_wrapper=dict(type="MMFullyShardedDataParallel",
                               device_id=torch.device("cpu"), use_orig_params=True)),
    }
    batches = _batches(rank)
    for strategy_name, make in strategies.items():
        results = {}
        for name, wrapper_type, optimizer_type in (("ours", "FusedOptimWrapper", "FusedAdam"),
                                                   ("torch", "OptimWrapper", "Adam")):
            MessageHub.get_instance(f"{strategy_name}-{name}")
            model, wrapper = make().prepare(_model(), optim_wrapper=dict(
                type=wrapper_type, accumulative_counts=2,
                optimizer=dict(type=optimizer_type, lr=1e-2, betas=(0.0, 0.999))),
                dispatch_kwargs=dict(max_iters=ITERS))
            assert type(wrapper.optimizer).__name__ == optimizer_type
            for x in batches:
                with wrapper.optim_context(model):
                    loss = model(x).pow(2).mean()
                wrapper.update_params(loss)
            if strategy_name == "FSDPStrategy":
                with FSDP.summon_full_params(model):
                    results[name] = [p.detach().clone() for p in model.parameters()]
            else:
                results[name] = [p.detach().clone() for p in model.parameters()]
        _close(results["ours"], results["torch"], strategy_name)


def _check_fsdp1_clip_warns(rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    import pygan_optim

    model = FSDP(_model(), device_id=torch.device("cpu"), use_orig_params=True)
    wrapper = pygan_optim.OptimWrapper(pygan_optim.FusedAdam(model.parameters(), lr=1e-2),
                                       clip_grad=dict(max_norm=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in _batches(rank)[:2]:
            wrapper.update_params(model(x).pow(2).mean())
    fsdp1 = [w for w in caught if "FSDP1" in str(w.message)]
    assert len(fsdp1) == 1, [str(w.message) for w in caught]  # said once, not every step


def _check_fsdp1_amp_inf_on_one_rank(rank):
    """AmpOptimWrapper(use_fsdp=True) without clip: an overflow in one rank's
    shard skips the step and backs the scale off on every rank, as with torch's
    Adam (before, FusedAdam got each rank's own flag: rank 0 stepped and kept
    its scale)."""
    from mmengine.logging import MessageHub
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    import pygan_optim

    outcome = {}
    for name, cls in (("ours", pygan_optim.FusedAdam), ("torch", _torch_adam)):
        MessageHub.get_instance(f"fsdp1-amp-inf-{name}")
        torch.manual_seed(0)
        model = FSDP(_model(), device_id=torch.device("cpu"))
        wrapper = pygan_optim.AmpOptimWrapper(
            optimizer=cls(model.parameters(), lr=1e-2, betas=(0.0, 0.999)), use_fsdp=True,
            dtype="bfloat16")
        with wrapper.optim_context(model):
            loss = model(_batches(rank)[0]).pow(2).mean()
        wrapper.backward(wrapper.scale_loss(loss))
        before = [p.detach().clone() for p in model.parameters()]
        if rank == 1:  # an overflow landing in this rank's shard only
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        wrapper.step()
        outcome[name] = (any(not torch.equal(a, b) for a, b in zip(before, model.parameters())),
                         wrapper.loss_scaler.get_scale())
    assert outcome["torch"] == (False, 32768.0), outcome  # the oracle skips on every rank
    assert outcome["ours"] == outcome["torch"], (rank, outcome)


def _worker(rank, out_dir):
    os.environ["LOCAL_RANK"] = str(rank)  # read by MMEngine's strategies
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}",
                            rank=rank, world_size=WORLD)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # FSDP1 is deprecated upstream
            _check_zero(rank, out_dir)
            _check_fsdp1(rank)
            _check_mmengine_strategies(rank)
            _check_fsdp1_clip_warns(rank)
            _check_fsdp1_amp_inf_on_one_rank(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_after_success()


@pytest.mark.slow
def test_zero_fsdp1_and_mmengine_strategies_two_ranks_gloo(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
