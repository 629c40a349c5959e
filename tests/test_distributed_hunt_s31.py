"""Session 31 hunt: zeros written in the update (one pass, and after the step
with several param groups) under PyTorch's distributed engines, on two real
gloo processes. No bug was found; this pins the checked behaviour: DDP
(gradient_as_bucket_view), FSDP1 (use_orig_params) and FSDP2 with one and two
param groups, beta1 0 and 0.9, FusedAdam.step_and_zero_grad(set_to_none=False)
against torch.optim.Adam(fused=True) + zero_grad(set_to_none=False): same
parameters, same state, grads zeros (not None) at the same addresses.
The loss is linear in the parameters, so the grads do not depend on them and
the two runs stay on identical grads (the fused oracle matches ours bit for
bit on one thread; tolerances are float32 rounding). Workers assert
themselves; mp.spawn stops the other rank and re-raises."""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from spawned_worker import exit_after_success

WORLD = 2
ITERS = 3


class _Parallel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 211)  # 1055 weights: the beta1 = 0 register loop
        self.b = nn.Linear(5, 13)

    def forward(self, x):
        return self.a(x).sum(-1) + self.b(x).sum(-1)


def _wrap(engine, mesh):
    model = _Parallel()
    if engine == "ddp_bucket_view":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, gradient_as_bucket_view=True)
    if engine == "fsdp1_orig_params":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    from torch.distributed.fsdp import fully_shard
    fully_shard(model, mesh=mesh)
    return model


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _run(engine, mesh, rank, ours, groups, beta1):
    from pygan_optim import FusedAdam

    model = _wrap(engine, mesh)
    params = list(model.parameters())
    param_groups = ([dict(params=params)] if groups == 1 else
                    [dict(params=params[:2]), dict(params=params[2:], lr=2e-2)])
    kw = dict(lr=1e-2, betas=(beta1, 0.999))
    opt = (FusedAdam(param_groups, **kw) if ours
           else torch.optim.Adam(param_groups, fused=True, **kw))
    g = torch.Generator().manual_seed(300 + rank)
    addresses = []
    for _ in range(ITERS):
        model(torch.randn(4, 5, generator=g)).mean().backward()
        if ours:
            opt.step_and_zero_grad(set_to_none=False)
        else:
            opt.step()
            opt.zero_grad(set_to_none=False)
        grads = [_local(p.grad) for p in model.parameters()]
        assert all(t is None or not t.any() for t in grads), (engine, ours)
        addresses.append([None if t is None else t.data_ptr() for t in grads])
    state = [{k: _local(v).clone() for k, v in opt.state[p].items()} if p in opt.state else {}
             for p in params]
    return [_local(p).detach().clone() for p in params], state, addresses


def _worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}",
                            rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # FSDP1 is deprecated upstream
            for engine in ("ddp_bucket_view", "fsdp1_orig_params", "fsdp2"):
                for groups in (1, 2):
                    for beta1 in (0.0, 0.9):
                        what = (engine, groups, beta1)
                        p1, s1, a1 = _run(engine, mesh, rank, True, groups, beta1)
                        p2, s2, a2 = _run(engine, mesh, rank, False, groups, beta1)
                        for x, y in zip(p1, p2):
                            torch.testing.assert_close(x, y, rtol=ITERS * 2.4e-7,
                                                       atol=ITERS * 4 * 1.2e-7 * 2e-2, msg=what)
                        for x, y in zip(s1, s2):
                            assert x.keys() == y.keys(), what
                            for k in x:
                                torch.testing.assert_close(x[k], y[k], msg=f"{what} {k}")
                        # Zeros written in place: each grad keeps its address, as with torch.
                        stable = lambda a: [len({r[i] for r in a}) == 1 for i in range(len(a[0]))]
                        assert stable(a1) == stable(a2), what
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_after_success()


@pytest.mark.slow
def test_zeros_in_update_under_ddp_fsdp1_fsdp2_two_ranks_gloo(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
