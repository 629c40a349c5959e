"""Session 39 hunt: configurations of PyTorch's sharding engines that the other
distributed tests do not cover, on two real gloo processes. No bug was found in
pygan_optim; this pins what was checked:

- ZeroRedundancyOptimizer with ``parameters_as_bucket_view=True`` (parameters
  become views of one flat bucket), two param groups, beta1 0 and 0.9;
  ``add_param_group`` mid-run, which rebuilds the buckets and moves every
  parameter's ``.data`` (also on a rank whose local FusedAdam gets no new group,
  so its cached plan is not rebuilt); ``overlap_with_ddp=True`` is refused by
  ZeRO itself with a message naming FusedAdam (it needs a functional optimizer).
- DDP through our wrapper with ``find_unused_parameters=True`` where one layer is
  used on rank 0 only and another on no rank after two iterations (grad None),
  with and without ``gradient_as_bucket_view``; ``static_graph=True``; the fp16
  compression comm hook; clip plus accumulation (``no_sync``).
- FSDP1 ``NO_SHARD`` and ``SHARD_GRAD_OP`` with ``use_orig_params`` False and
  True, ``MixedPrecision`` with bf16 params; ``keep_low_precision_grads`` (fp16
  grads of fp32 params) refused by name, as torch's Adam refuses them;
  ``FSDP.optim_state_dict`` / ``optim_state_dict_to_load`` (full and sharded)
  from FusedAdam into torch's Adam and back.
- FSDP2 with ``MixedPrecisionPolicy`` (bf16 params, fp32 or bf16 reduction),
  ``reshard_after_forward=False``, and ``get_optimizer_state_dict`` /
  ``set_optimizer_state_dict`` (sharded and full) across FusedAdam and torch's
  Adam.

Each run is compared with the same run on ``torch.optim.Adam(foreach=False)``:
parameters and every state tensor. With beta1 == 0 and grads released (our
wrapper's ``update_params``), the updates keep grads as exp_avg where nothing
else holds them (keep threshold lowered to 0 bytes): kept under DDP without
bucket views and FSDP1 ``NO_SHARD`` with flat parameters, never for DDP's bucket
views, FSDP1's original-parameter views or beta1 = 0.9; and the optimizer's
state never changes between one update and the next step (a kept grad that an
engine still wrote into would change it: DDP's reducer copies into grads at the
end of backward, FSDP1 accumulates into its own buffers).

The losses are linear in the parameters, so the grads do not depend on them and
both runs see identical grads; what is left is rounding, as bounded in
tests/test_sharded_engines.py. Workers assert themselves and end as
tests/spawned_worker.py says; the parent gives up after a deadline instead of
hanging on a rank that waits in a collective."""
import copy
import faulthandler
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from spawned_worker import exit_after_success

WORLD = 2
ITERS = 6
LR = 1e-2
DEADLINE_S = 120  # per spawned test; the three take about 5-10 s each here


def _torch_adam(params, **kw):
    return torch.optim.Adam(params, foreach=False, **kw)


def _close(ours, theirs, what, lr=LR, iters=ITERS):
    # Ours vs torch's for-loop on identical grads: at most ulp(p) + 4 eps |update|
    # per step (tests/test_fused_adam.py), |update| <= lr, fp32 eps = 1.2e-7.
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=iters * 2.4e-7, atol=iters * 4 * 1.2e-7 * lr,
                                   msg=lambda m: f"{what}, param {i}: {m}")


def _close_clipped(ours, theirs, what):
    # With a clip, the coefficient's norm is summed in another order than
    # torch's clip_grad_norm_ (~1e-6 relative apart), differently each step,
    # and Adam is scale invariant only for a constant factor: up to about
    # lr x 4e-6 per step.
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=ITERS * LR * 4e-6,
                                   msg=lambda m: f"{what}, param {i}: {m}")


def _same_state(ours, theirs, what):
    """Lists of per-parameter state dicts (plain tensors or DTensors)."""
    assert len(ours) == len(theirs), what
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.keys() == b.keys(), (what, i, sorted(a), sorted(b))
        for k in a:
            x, y = a[k], b[k]
            if hasattr(x, "full_tensor"):
                assert type(x) is type(y), (what, i, k, type(x), type(y))  # DTensor like torch's
                x, y = x.full_tensor(), y.full_tensor()
            # exp_avg with beta1 = 0 is the grad; exp_avg_sq agrees to fp32
            # rounding of g^2 sums; step counts exactly.
            torch.testing.assert_close(x, y.to(x.dtype), rtol=1e-4, atol=1e-9,
                                       msg=lambda m: f"{what}, state {k} of param {i}: {m}")


def _spawn(worker, tmp_path):
    """mp.spawn with a deadline: a rank stuck in a collective fails the test
    instead of hanging it."""
    ctx = mp.start_processes(worker, args=(str(tmp_path),), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{worker.__name__}: ranks still running after {DEADLINE_S} s")


def _init(rank, out_dir):
    # Each rank prints its stack and exits if it is stuck (before the parent's deadline).
    faulthandler.dump_traceback_later(DEADLINE_S - 10, exit=True)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}",
                            rank=rank, world_size=WORLD)
    torch.set_num_threads(1)


def _finish():
    dist.barrier()  # both ranks leave together (see tests/test_ddp.py)
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    exit_after_success()


def _ranks_agree(tensors, what):
    flat = torch.cat([t.detach().flatten() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), what


# ---------------------------------------------------------------- ZeRO-1 --

def _zero_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3))


def _check_zero_bucket_view(rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pygan_optim import FusedAdam

    g = torch.Generator().manual_seed(300 + rank)
    batches = [torch.randn(4, 5, generator=g) for _ in range(ITERS)]
    for betas in ((0.0, 0.999), (0.9, 0.99)):
        params, states = {}, {}
        for name, cls in (("ours", FusedAdam), ("torch", _torch_adam)):
            model = DDP(_zero_model())
            ps = list(model.parameters())
            opt = ZeroRedundancyOptimizer([dict(params=ps[:2]), dict(params=ps[2:], lr=2 * LR)],
                                          optimizer_class=cls, lr=LR, betas=betas,
                                          parameters_as_bucket_view=True)
            assert all(p.untyped_storage().nbytes() > p.nbytes for p in ps)  # bucket views
            for x in batches:
                opt.zero_grad()
                model(x).mean().backward()
                opt.step()
            params[name] = [p.detach().clone() for p in ps]
            states[name] = [{k: v.clone() for k, v in opt.optim.state[p].items()}
                            for p in ps if p in opt.optim.state]
        what = f"ZeRO parameters_as_bucket_view, betas {betas}"
        _close(params["ours"], params["torch"], what, lr=2 * LR)
        _same_state(states["ours"], states["torch"], what)
        _ranks_agree(params["ours"], what)


def _check_zero_add_param_group_rebuilds_buckets(rank):
    """add_param_group with bucket views gives every parameter new storage
    (``param.data = new_bucket[...]``). The rank whose local optimizer gets no
    new group keeps its plan: it must still update the parameters' new memory."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from pygan_optim import FusedAdam

    g = torch.Generator().manual_seed(300 + rank)
    batches = [torch.randn(4, 5, generator=g) for _ in range(ITERS)]
    results, local_groups = {}, {}
    for name, cls in (("ours", FusedAdam), ("torch", _torch_adam)):
        base, extra = _zero_model(), nn.Linear(5, 3)
        opt = ZeroRedundancyOptimizer(list(base.parameters()), optimizer_class=cls, lr=LR,
                                      betas=(0.0, 0.999), parameters_as_bucket_view=True)
        for i, x in enumerate(batches):
            if i == 2:
                opt.add_param_group(dict(params=list(extra.parameters()), lr=3 * LR))
            opt.zero_grad()
            (base(x).mean() + extra(x).mean()).backward()
            for p in list(base.parameters()) + list(extra.parameters()):
                dist.all_reduce(p.grad)  # what DDP would do
                p.grad.div_(WORLD)
            opt.step()
        results[name] = [p.detach().clone() for p in
                         list(base.parameters()) + list(extra.parameters())]
        local_groups[name] = len(opt.optim.param_groups)
    assert local_groups["ours"] == local_groups["torch"]
    _close(results["ours"], results["torch"], "ZeRO add_param_group with bucket views",
           lr=3 * LR)
    _ranks_agree(results["ours"], "ZeRO add_param_group")


def _check_zero_overlap_with_ddp_is_refused_by_name(rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from pygan_optim import FusedAdam

    with pytest.raises(ValueError, match="functional optimizer.*FusedAdam"):
        ZeroRedundancyOptimizer(_zero_model().parameters(), optimizer_class=FusedAdam, lr=LR,
                                overlap_with_ddp=True)


# ------------------------------------------------------------------- DDP --

class _DDPNet(nn.Module):
    """Linear in its parameters (grads do not depend on them). ``big`` has 40960
    weights, over the keep threshold; ``only0`` is used on rank 0 only, ``later``
    on no rank after two iterations (its grad then stays None everywhere),
    unless the graph must be static."""

    def __init__(self, static=False):
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Linear(256, 160)
        self.head = nn.Linear(256, 2)
        self.only0 = nn.Linear(256, 2)
        self.later = nn.Linear(256, 2)
        self.static = static
        self.calls = 0

    def forward(self, x):
        rank = dist.get_rank()
        y = self.big(x).sum(-1) + self.head(x).sum(-1)
        if rank == 0:
            y = y + self.only0(x).sum(-1)
        if self.calls < 2 and not self.static:
            y = y + self.later(x).sum(-1)
        self.calls += 1
        return y


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard


def _watch_state(wrapper, opt, model, big):
    """Patches wrapper.backward (on the instance: neither the clip nor the zeroing
    is overridden by it) to check, after each backward and before the step, that
    the optimizer's state is what the last update left; returns (snapshot
    function, list of problems, list of grad addresses per update)."""
    snap, bad, ptrs = {}, [], []
    backward = wrapper.backward

    def checked_backward(loss, **kwargs):
        backward(loss, **kwargs)
        for p, saved in snap.items():
            for k, v in saved.items():
                if not torch.equal(opt.state[p][k], v):
                    bad.append((k, tuple(p.shape)))
        ptrs.append(None if big().grad is None else _local(big().grad).data_ptr())

    wrapper.backward = checked_backward

    def take():
        snap.clear()
        for p in model.parameters():
            if opt.state.get(p):
                snap[p] = {k: v.clone() for k, v in opt.state[p].items()}
    return take, bad, ptrs


def _train_with_wrapper(rank, model, ours, beta1, accu, clip, big):
    import mmengine.optim as mm
    from mmengine.logging import MessageHub

    import pygan_optim

    MessageHub.get_instance(f"s39-{id(model)}")
    kw = dict(lr=LR, betas=(beta1, 0.999))
    clip_grad = dict(max_norm=clip) if clip else None
    if ours:
        opt = pygan_optim.FusedAdam(model.parameters(), **kw)
        opt.keep_grad_min_bytes_cpu = 0  # keep from 32768 elements, as on GPUs
        wrapper = pygan_optim.OptimWrapper(opt, accumulative_counts=accu, clip_grad=clip_grad)
    else:
        opt = _torch_adam(model.parameters(), **kw)
        wrapper = mm.OptimWrapper(opt, accumulative_counts=accu, clip_grad=clip_grad)
    wrapper.initialize_count_status(model, 0, ITERS)
    take, bad, ptrs = _watch_state(wrapper, opt, model, big)
    kept = []
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(ITERS):
        x = torch.randn(4, 256, generator=g)
        with wrapper.optim_context(model):
            loss = model(x).mean()
        wrapper.update_params(loss)
        if wrapper.should_update():  # this iteration updated
            kept.append(_local(opt.state[big()]["exp_avg"]).data_ptr() == ptrs[-1])
            take()
    assert not bad, f"the state changed between an update and the next step: {bad}"
    state = [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else {}
             for p in model.parameters()]
    return state, kept


def _check_ddp(rank, what, *, accu=2, clip=None, hook=None, static=False, **ddp_kwargs):
    from torch.nn.parallel import DistributedDataParallel as DDP

    bucket_view = ddp_kwargs.get("gradient_as_bucket_view", False)
    for beta1 in (0.0, 0.9):
        params, states, kept = {}, {}, None
        for ours in (True, False):
            model = DDP(_DDPNet(static), static_graph=static, **ddp_kwargs)
            if hook is not None:
                model.register_comm_hook(None, hook)
            state, k = _train_with_wrapper(rank, model, ours, beta1, accu, clip,
                                           lambda: model.module.big.weight)
            params[ours] = [p.detach().clone() for p in model.parameters()]
            states[ours] = state
            if ours:
                kept = k
        name = f"DDP {what}, beta1 {beta1}"
        (_close_clipped if clip else _close)(params[True], params[False], name)
        _same_state(states[True], states[False], name)
        _ranks_agree(params[True], name)
        # Kept only where the grad is nobody else's: never a bucket view.
        assert kept == [beta1 == 0.0 and not bucket_view] * len(kept), (name, kept)
        if not static:  # grad None on every rank from the third iteration: no step counted
            assert float(states[True][-1]["step"]) == float(states[False][-1]["step"]) == 1.0


def _ddp_worker(rank, out_dir):
    _init(rank, out_dir)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    _check_zero_bucket_view(rank)
    _check_zero_add_param_group_rebuilds_buckets(rank)
    _check_zero_overlap_with_ddp_is_refused_by_name(rank)
    _check_ddp(rank, "find_unused", find_unused_parameters=True)
    _check_ddp(rank, "find_unused bucket view", find_unused_parameters=True,
               gradient_as_bucket_view=True)
    _check_ddp(rank, "fp16 compress hook", hook=default_hooks.fp16_compress_hook,
               find_unused_parameters=True)
    _check_ddp(rank, "fp16 compress hook bucket view", hook=default_hooks.fp16_compress_hook,
               find_unused_parameters=True, gradient_as_bucket_view=True)
    _check_ddp(rank, "clip + accumulation", accu=3, clip=0.05, find_unused_parameters=True)
    _check_ddp(rank, "clip + accumulation bucket view", accu=3, clip=0.05,
               find_unused_parameters=True, gradient_as_bucket_view=True)
    # static_graph: no no_sync (DDP's reducer asserts on it), one graph every time.
    _check_ddp(rank, "static_graph", accu=1, static=True)
    _check_ddp(rank, "static_graph bucket view clip", accu=1, clip=0.05, static=True,
               gradient_as_bucket_view=True)
    _finish()


@pytest.mark.slow
def test_zero_bucket_views_and_ddp_configurations_two_ranks_gloo(tmp_path):
    _spawn(_ddp_worker, tmp_path)


# ----------------------------------------------------------------- FSDP1 --

class _FlatNet(nn.Module):
    """41891 parameters: a shard of 2 ranks (about 21k) is under the keep size
    of 32768 elements; ``out=320`` makes one of 41.5k, which is kept."""

    def __init__(self, out=160):
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Linear(256, out)
        self.head = nn.Linear(256, 3)

    def forward(self, x):
        return self.big(x).sum(-1) + self.head(x).sum(-1)


def _check_fsdp1(rank, what, *, accu=2, expect_kept=False, out=160, **fsdp_kwargs):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for beta1 in (0.0, 0.9):
        params, states, kept = {}, {}, None
        for ours in (True, False):
            model = FSDP(_FlatNet(out), device_id=torch.device("cpu"), **fsdp_kwargs)
            first = next(model.parameters())
            state, k = _train_with_wrapper(rank, model, ours, beta1, accu, None, lambda: first)
            with FSDP.summon_full_params(model):
                params[ours] = [p.detach().clone() for p in model.parameters()]
            states[ours] = state
            if ours:
                kept = k
        name = f"FSDP1 {what}, beta1 {beta1}"
        _close(params[True], params[False], name)
        _same_state(states[True], states[False], name)
        if beta1 != 0.0 or not expect_kept:
            assert not any(kept), (name, kept)
        else:
            # (A rank may copy on an update where gloo's work object still
            # holds the all-reduced grad: that is the safe side.)
            assert any(kept), (name, kept)


def _check_fsdp1_low_precision_grads_refused(rank):
    """keep_low_precision_grads hands fp16 grads to an fp32 FlatParameter:
    torch's Adam refuses them, and so does ours, naming dtypes and shape."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    from pygan_optim import FusedAdam

    model = FSDP(_FlatNet(), device_id=torch.device("cpu"),
                 sharding_strategy=ShardingStrategy.NO_SHARD,
                 mixed_precision=MixedPrecision(param_dtype=torch.float16,
                                                reduce_dtype=torch.float16,
                                                keep_low_precision_grads=True))
    opt = FusedAdam(model.parameters(), lr=LR)
    model(torch.randn(4, 256)).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"grad of parameter 0 of param group 0 .*"
                                           r"torch\.float16.*expected torch\.float32"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state  # nothing half-made


def _check_fsdp1_optim_state_dict_across_classes(rank):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    from pygan_optim import FusedAdam

    def train(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            model(x).mean().backward()
            opt.step()

    def set_type(model, kind):
        if kind == "sharded":
            FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT)
        else:
            FSDP.set_state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                     FullStateDictConfig(rank0_only=False),
                                     FullOptimStateDictConfig(rank0_only=False))

    g = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(4, 256, generator=g) for _ in range(5)]
    kw = dict(lr=LR, betas=(0.0, 0.999))
    for use_orig_params in (False, True):
        for kind in ("full", "sharded"):
            for src, dst in ((FusedAdam, _torch_adam), (_torch_adam, FusedAdam)):
                what = f"FSDP1 optim_state_dict {kind}, orig {use_orig_params}, {src} -> {dst}"
                ref = FSDP(_FlatNet(), device_id=torch.device("cpu"),
                           use_orig_params=use_orig_params)
                ref_opt = src(ref.parameters(), **kw)
                train(ref, ref_opt, xs[:3])
                set_type(ref, kind)
                osd = copy.deepcopy(FSDP.optim_state_dict(ref, ref_opt))
                msd = copy.deepcopy(ref.state_dict())
                new = FSDP(_FlatNet(), device_id=torch.device("cpu"),
                           use_orig_params=use_orig_params)
                set_type(new, kind)
                new.load_state_dict(msd)
                new_opt = dst(new.parameters(), **kw)
                new_opt.load_state_dict(FSDP.optim_state_dict_to_load(new, new_opt, osd))
                train(ref, ref_opt, xs[3:])
                train(new, new_opt, xs[3:])
                with FSDP.summon_full_params(ref), FSDP.summon_full_params(new):
                    _close([p.detach().clone() for p in new.parameters()],
                           [p.detach().clone() for p in ref.parameters()], what, iters=5)
                _same_state([dict(new_opt.state.get(p, {})) for p in new.parameters()],
                            [dict(ref_opt.state.get(p, {})) for p in ref.parameters()], what)


def _fsdp1_worker(rank, out_dir):
    _init(rank, out_dir)
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # FSDP1 is deprecated upstream
        warnings.simplefilter("ignore", UserWarning)
        _check_fsdp1(rank, "NO_SHARD flat", expect_kept=True,
                     sharding_strategy=ShardingStrategy.NO_SHARD)
        _check_fsdp1(rank, "NO_SHARD orig params", use_orig_params=True,
                     sharding_strategy=ShardingStrategy.NO_SHARD)
        _check_fsdp1(rank, "SHARD_GRAD_OP flat", sharding_strategy=ShardingStrategy.SHARD_GRAD_OP)
        _check_fsdp1(rank, "SHARD_GRAD_OP orig params", use_orig_params=True,
                     sharding_strategy=ShardingStrategy.SHARD_GRAD_OP)
        # A shard of a flat parameter is a fresh tensor FSDP hands over whole:
        # kept once it is large enough.
        _check_fsdp1(rank, "FULL_SHARD large shards", expect_kept=True, out=320)
        _check_fsdp1(rank, "SHARD_GRAD_OP large shards", expect_kept=True, out=320,
                     sharding_strategy=ShardingStrategy.SHARD_GRAD_OP)
        _check_fsdp1(rank, "FULL_SHARD bf16 params", mixed_precision=MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        _check_fsdp1_low_precision_grads_refused(rank)
        _check_fsdp1_optim_state_dict_across_classes(rank)
    _finish()


@pytest.mark.slow
def test_fsdp1_strategies_precision_and_optim_state_dict_two_ranks_gloo(tmp_path):
    _spawn(_fsdp1_worker, tmp_path)


# ----------------------------------------------------------------- FSDP2 --

def _fsdp2_model(mesh, mp_policy=None, reshard=True, per_layer=False):
    from torch.distributed.fsdp import fully_shard

    model = _FlatNet()  # 161 rows would not split evenly; 160 and 3 (uneven) do both
    kw = dict(mesh=mesh, reshard_after_forward=reshard)
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    if per_layer:
        fully_shard(model.big, **kw)
    fully_shard(model, **kw)
    return model


def _check_fsdp2(rank, mesh, what, *, accu=1, clip=None, **model_kw):
    for beta1 in (0.0, 0.9):
        params, states = {}, {}
        for ours in (True, False):
            model = _fsdp2_model(mesh, **model_kw)
            first = next(model.parameters())
            state, kept = _train_with_wrapper(rank, model, ours, beta1, accu, clip,
                                              lambda: first)
            params[ours] = [p.full_tensor() for p in model.parameters()]
            states[ours] = state
            if ours:
                assert not any(kept), kept  # DTensors are never kept
        name = f"FSDP2 {what}, beta1 {beta1}"
        (_close_clipped if clip else _close)(params[True], params[False], name)
        _same_state(states[True], states[False], name)


def _check_fsdp2_state_dict_across_classes(rank, mesh):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    from pygan_optim import FusedAdam

    def train(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            model(x).mean().backward()
            opt.step()

    g = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(4, 256, generator=g) for _ in range(5)]
    kw = dict(lr=LR, betas=(0.0, 0.999))
    for full in (False, True):
        options = StateDictOptions(full_state_dict=full)
        for src, dst in ((FusedAdam, _torch_adam), (_torch_adam, FusedAdam)):
            what = f"FSDP2 optimizer state dict, full {full}, {src} -> {dst}"
            ref = _fsdp2_model(mesh)
            ref_opt = src(ref.parameters(), **kw)
            train(ref, ref_opt, xs[:3])
            msd = get_model_state_dict(ref, options=options)
            # A sharded state dict holds the optimizer's own tensors: copied, or
            # both optimizers would go on updating the same state.
            osd = copy.deepcopy(get_optimizer_state_dict(ref, ref_opt, options=options))
            new = _fsdp2_model(mesh)
            new_opt = dst(new.parameters(), **kw)
            set_model_state_dict(new, msd, options=options)
            set_optimizer_state_dict(new, new_opt, osd, options=options)
            train(ref, ref_opt, xs[3:])
            train(new, new_opt, xs[3:])
            _close([p.full_tensor() for p in new.parameters()],
                   [p.full_tensor() for p in ref.parameters()], what, iters=5)
            _same_state([dict(new_opt.state[p]) for p in new.parameters()],
                        [dict(ref_opt.state[p]) for p in ref.parameters()], what)


def _fsdp2_worker(rank, out_dir):
    _init(rank, out_dir)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh("cpu", (WORLD,))
    _check_fsdp2(rank, mesh, "bf16 params, fp32 reduce", accu=2,
                 mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                reduce_dtype=torch.float32))
    _check_fsdp2(rank, mesh, "bf16 params and reduce, clip", clip=0.05, per_layer=True,
                 mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                reduce_dtype=torch.bfloat16))
    _check_fsdp2(rank, mesh, "reshard_after_forward=False", accu=2, reshard=False,
                 per_layer=True)
    _check_fsdp2(rank, mesh, "reshard_after_forward=False, clip", accu=3, clip=0.05,
                 reshard=False)
    _check_fsdp2_state_dict_across_classes(rank, mesh)
    _finish()


@pytest.mark.slow
def test_fsdp2_precision_resharding_and_state_dicts_two_ranks_gloo(tmp_path):
    _spawn(_fsdp2_worker, tmp_path)
