"""beta1 == 0: FusedAdam keeps a parameter's grad tensor as its exp_avg instead of
writing a copy (see the FusedAdam docstring). Every case is checked against two
oracles: FusedAdam with ``grad_as_exp_avg = False`` (the copy; the arithmetic of
param and exp_avg_sq is the same, so everything must be bit-identical) and
torch.optim.Adam's for-loop, whose exp_avg with beta1 == 0 is exactly the grad.
"""
import gc
import os
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from pygan_optim import FusedAdam, FusedAdamW
from spawned_worker import exit_after_success

BIG = 40000  # over the 32768 elements from which grads are kept
SHAPES = [(BIG,), (200, 250), (7,)]  # the last is too small to be kept
BETAS = (0.0, 0.999)


def make_params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def grads_for(step, shapes=SHAPES):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) * 10.0 ** (step % 3 - 1) for s in shapes]


class Trio:
    """The same parameters under ours (keeping), ours (copying) and torch's Adam."""

    def __init__(self, cls=FusedAdam, ref_cls=torch.optim.Adam, **kw):
        kw.setdefault("betas", BETAS)
        self.params = [make_params() for _ in range(3)]
        self.keep = cls(self.params[0], lr=1e-2, **kw)
        self.copy = cls(self.params[1], lr=1e-2, **kw)
        self.copy.grad_as_exp_avg = False
        self.torch = ref_cls(self.params[2], lr=1e-2, foreach=False, **kw)
        self.opts = [self.keep, self.copy, self.torch]

    def set_grads(self, step):
        for params in self.params:
            for p, g in zip(params, grads_for(step)):
                p.grad = g.clone()

    def step(self):
        for opt in self.opts:
            opt.step()

    def zero_grad(self, **kw):
        for opt in self.opts:
            opt.zero_grad(**kw)

    def kept(self):
        return [self.keep.state[p].get("exp_avg") is p.grad and p.grad is not None
                for p in self.params[0]]

    def check(self, what="", l2=0.0):
        for i, (a, b, c) in enumerate(zip(*self.params)):
            assert torch.equal(a, b), f"{what}: param {i} differs from the copying path"
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=f"{what}: param {i}")
            sa, sb, sc = self.keep.state[a], self.copy.state[b], self.torch.state[c]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sa[key], sb[key]), f"{what}: {key} of param {i}"
            # With beta1 == 0 torch's exp_avg is the effective grad: exactly the
            # grad, unless L2 decay adds l2 * param to it: torch rounds that
            # product before the sum, we round once (FMA), so they differ by up
            # to half an ulp of the product and one of the sum.
            if not l2:
                assert torch.equal(sa["exp_avg"], sc["exp_avg"]), f"{what}: exp_avg of {i}"
            else:
                product_ulp = 2.0 ** -23 * l2 * float(c.detach().abs().max())
                torch.testing.assert_close(sa["exp_avg"], sc["exp_avg"], rtol=2 ** -23,
                                           atol=product_ulp)
            assert float(sa["step"]) == float(sc["step"])
        for a, c in zip(self.params[0], self.params[2]):
            assert (a.grad is None) == (c.grad is None)
            if a.grad is not None:
                assert torch.equal(a.grad, c.grad), f"{what}: a grad was modified"


def test_plain_steps_keep_the_grad_and_match_torch():
    t = Trio()
    for step in range(4):
        t.set_grads(step)
        t.step()
        assert t.kept() == [True, True, False], step
        t.check(f"step {step}")
        t.zero_grad()  # set_to_none=True: the grads live on only as exp_avg
        assert all(p.grad is None for p in t.params[0])
        t.check(f"after zero_grad {step}")
    assert all(t.copy.state[p]["exp_avg"] is not p.grad for p in t.params[1])


def test_repeated_steps_on_the_same_grads():
    t = Trio()
    t.set_grads(0)
    for step in range(3):
        t.step()
        t.check(f"step {step}")
    assert t.kept() == [True, True, False]


def test_the_old_exp_avg_is_freed():
    t = Trio()
    t.set_grads(0)
    t.step()
    t.zero_grad()
    old = [weakref.ref(t.keep.state[p]["exp_avg"]) for p in t.params[0]]
    t.set_grads(1)
    t.step()
    gc.collect()
    assert [r() is None for r in old] == [True, True, False]


def _bytes_held(params, optimizer):
    """Bytes of the distinct storages of params, grads and optimizer state, each
    rounded up to the 64-byte alignment of torch's CPU allocations: two storages
    never share such a block, so a 28-byte one takes 64 (and FusedAdam's packed
    small-parameter state, 64-byte aligned within one storage, no more)."""
    storages = {}
    for p in params:
        for t in [p, p.grad] + list(optimizer.state[p].values()):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                storages[s.data_ptr()] = -(-s.nbytes() // 64) * 64
    return sum(storages.values())


def test_memory_is_torchs_at_every_point():
    t = Trio()
    for step in range(3):
        t.set_grads(step)
        phases = [("backward", None), ("step", "step"), ("zero_grad", "zero_grad")]
        for name, action in phases:
            if action:
                getattr(t, action)()
            ours = _bytes_held(t.params[0], t.keep)
            torch_ = _bytes_held(t.params[2], t.torch)
            assert ours <= torch_, (step, name, ours, torch_)


def test_zero_grad_in_place_gives_exp_avg_its_own_copy():
    t = Trio()
    t.set_grads(0)
    t.step()
    grads = [p.grad for p in t.params[0]]
    t.zero_grad(set_to_none=False)
    assert all(p.grad is g for p, g in zip(t.params[0], grads))  # grads stay the same tensors
    assert all(float(g.abs().sum()) == 0 for g in grads)
    t.check("after zero_grad(set_to_none=False)")
    for step in range(1, 3):  # grads that persist: copied from now on
        for params in t.params:
            for p, g in zip(params, grads_for(step)):
                p.grad.copy_(g)
        t.step()
        assert t.kept() == [False, False, False]
        t.check(f"step {step}")
        t.zero_grad(set_to_none=False)
    t.zero_grad()  # set_to_none=True again: keeping resumes
    t.set_grads(5)
    t.step()
    assert t.kept() == [True, True, False]
    t.check("step 5")


def test_module_zero_grad_in_place_is_noticed_and_stops_keeping():
    t = Trio()
    t.set_grads(0)
    t.step()
    for params in t.params:  # what Module.zero_grad(set_to_none=False) does
        for p in params:
            p.grad.zero_()
    # Not detectable here: state['exp_avg'] follows the grad until the next step.
    with pytest.warns(UserWarning, match="changed in place before the next step"):
        for params in t.params:
            for p, g in zip(params, grads_for(1)):
                p.grad.add_(g)
        t.step()
    t.check("step 1")
    t.zero_grad()
    t.set_grads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.step()
    assert t.kept() == [False, False, False]
    t.check("step 2")


def test_a_held_reference_to_exp_avg_sees_the_new_values():
    t = Trio()
    t.set_grads(0)
    t.step()
    t.zero_grad()
    held = t.keep.state[t.params[0][0]]["exp_avg"]
    held_sd = t.keep.state_dict()  # references the live tensors, as torch's does
    t.set_grads(1)
    t.step()
    assert t.keep.state[t.params[0][0]]["exp_avg"] is held
    assert held_sd["state"][1]["exp_avg"] is t.keep.state[t.params[0][1]]["exp_avg"]
    t.check("step 1")
    torch_sd = t.torch.state_dict()
    for k in (0, 1):
        assert torch.equal(held_sd["state"][k]["exp_avg"], torch_sd["state"][k]["exp_avg"])


def test_view_and_shared_grads_are_copied():
    t = Trio()
    g0, g1 = grads_for(0)[:2]
    for params in t.params:
        bucket = torch.cat([g0, g1.flatten()])  # grads as views into one buffer (DDP's buckets)
        params[0].grad = bucket[:BIG]
        params[1].grad = bucket[BIG:].view(200, 250)
        params[2].grad = torch.ones(7)
    t.step()
    assert t.kept() == [False, False, False]
    t.check("views")
    t.zero_grad()
    for params in t.params:  # one grad tensor for two parameters of the same shape
        shared = grads_for(1)[0]
        params[0].grad = shared
        params[1].grad = grads_for(1)[1]
        params[2].grad = torch.ones(7)
    shared_params = [make_params(7, [(BIG,)])[0] for _ in range(3)]
    for opt, extra in zip(t.opts, shared_params):
        opt.add_param_group(dict(params=[extra]))
        extra.grad = opt.param_groups[0]["params"][0].grad
    t.step()
    kept = [t.keep.state[p]["exp_avg"] is p.grad for p in (t.params[0][0], shared_params[0])]
    assert kept.count(True) <= 1
    t.check("shared grad")
    torch.testing.assert_close(shared_params[0], shared_params[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(t.keep.state[shared_params[0]]["exp_avg"],
                       t.torch.state[shared_params[2]]["exp_avg"])


@pytest.mark.parametrize("case", ["amp_skip", "clip", "zero_in_step", "beta1_changed"])
def test_a_step_that_cannot_keep_first_separates_exp_avg(case):
    """Kept after one step, then (grads not zeroed) a step whose exp_avg is not
    the raw grad: the grad must stay as it is and exp_avg must be torch's."""
    t = Trio()
    t.set_grads(0)
    t.step()
    t.check("step 0")
    before = [p.grad.clone() for p in t.params[0]]
    if case == "beta1_changed":
        for opt in t.opts:
            opt.param_groups[0]["betas"] = (0.5, 0.999)
        t.step()
        assert t.kept() == [False, False, False]
        t.check(case)
    else:
        options = dict(amp_skip=dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0)),
                       clip=dict(grad_mult=torch.tensor(0.5)),
                       zero_in_step=dict(zero_grads=True))[case]
        snapshot = [{k: v.clone() for k, v in t.keep.state[p].items()} for p in t.params[0]]
        with t.keep.step_options(**options):
            t.keep.step()
        assert t.kept() == [False, False, False]
        for p, g, snap in zip(t.params[0], before, snapshot):
            if case == "zero_in_step":
                assert float(p.grad.abs().sum()) == 0
            else:
                assert torch.equal(p.grad, g), "the step modified a grad"
            if case == "amp_skip":  # nothing changed
                for k, v in snap.items():
                    assert torch.equal(t.keep.state[p][k], v), k
            else:  # exp_avg is the effective grad, in its own tensor
                assert t.keep.state[p]["exp_avg"] is not p.grad
        if case == "clip":
            for p, g in zip(t.params[0], before):
                assert torch.equal(t.keep.state[p]["exp_avg"], g * 0.5)


def test_cases_that_never_keep():
    # L2 weight decay and maximize change the effective grad; AdamW's does not.
    for cls, kw, keeps in [(FusedAdam, dict(weight_decay=0.1), False),
                           (FusedAdam, dict(maximize=True), False),
                           (FusedAdam, dict(betas=(0.9, 0.999)), False),
                           (FusedAdamW, dict(weight_decay=0.1), True)]:
        ref_cls = torch.optim.AdamW if cls is FusedAdamW else torch.optim.Adam
        t = Trio(cls, ref_cls, **kw)
        for step in range(2):
            t.set_grads(step)
            t.step()
            assert t.kept() == [keeps, keeps, False], (cls, kw)
            if kw.get("betas", BETAS)[0] == 0:
                l2 = kw.get("weight_decay", 0.0) if cls is FusedAdam else 0.0
                t.check(f"{cls.__name__} {kw}", l2=l2)
            t.zero_grad()


def test_checkpoints_move_both_ways_and_continue_identically():
    t = Trio()
    for step in range(2):
        t.set_grads(step)
        t.step()
    # ours -> torch and torch -> ours, mid-run (grads still alive: exp_avg is a grad)
    ours_sd, torch_sd = t.keep.state_dict(), t.torch.state_dict()
    t.keep.load_state_dict(torch_sd)
    t.torch.load_state_dict(ours_sd)
    t.zero_grad()
    for step in range(2, 4):
        t.set_grads(step)
        t.step()
        t.check(f"step {step} after the exchange")
        t.zero_grad()


def test_mmengine_wrapper_with_accumulation_matches_torch():
    from mmengine.optim import OptimWrapper as MMOptimWrapper

    import pygan_optim

    def train(wrapper_cls, optimizer_cls, **kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
        opt = optimizer_cls(model.parameters(), lr=1e-3, betas=BETAS, **kw)
        wrapper = wrapper_cls(opt, accumulative_counts=3)
        wrapper.initialize_count_status(model, 0, 7)
        g = torch.Generator().manual_seed(5)
        states = []
        for _ in range(7):
            with wrapper.optim_context(model):
                loss = model(torch.randn(8, 256, generator=g)).pow(2).mean()
            wrapper.update_params(loss)
            states.append({k: {n: v.clone() for n, v in s.items()}
                           for k, s in opt.state_dict()["state"].items()})
        return model, opt, states

    def copying(params, **kw):
        opt = FusedAdam(params, **kw)
        opt.grad_as_exp_avg = False
        return opt

    torch_model, _, torch_states = train(MMOptimWrapper, torch.optim.Adam, foreach=False)
    copy_model, _, copy_states = train(MMOptimWrapper, copying)
    for wrapper_cls in (MMOptimWrapper, pygan_optim.OptimWrapper):
        model, opt, states = train(wrapper_cls, FusedAdam)
        assert len(opt._kept) == 1, "the 256x256 weight's grad was not kept"
        for it, (s, c, r) in enumerate(zip(states, copy_states, torch_states)):
            assert s.keys() == c.keys() == r.keys()
            for k in r:
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(s[k][key], c[k][key]), (wrapper_cls, it, k, key)
                    # torch's trajectory differs by rounding (not bit-identical to ours)
                    torch.testing.assert_close(s[k][key], r[k][key], rtol=1e-4, atol=1e-7)
        for a, b, c in zip(model.parameters(), copy_model.parameters(),
                           torch_model.parameters()):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def _ddp_worker(rank, out_dir, bucket_view):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}",
                            rank=rank, world_size=2)
    try:
        results = {}
        for name, cls in (("ours", FusedAdam), ("copy", FusedAdam), ("torch", torch.optim.Adam)):
            torch.manual_seed(0)
            model = DDP(nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 2)),
                        gradient_as_bucket_view=bucket_view)
            opt = cls(model.parameters(), lr=1e-3, betas=BETAS,
                      **({} if cls is FusedAdam else dict(foreach=False)))
            opt.grad_as_exp_avg = name != "copy"
            g = torch.Generator().manual_seed(10 + rank)
            kept = []
            for _ in range(4):
                model(torch.randn(4, 256, generator=g)).pow(2).mean().backward()
                opt.step()
                w = model.module[0].weight
                kept.append(opt.state[w]["exp_avg"] is w.grad)
                opt.zero_grad(set_to_none=not bucket_view)
            results[name] = dict(params=[p.detach().clone() for p in model.parameters()],
                                 exp_avg=[opt.state[p]["exp_avg"].clone()
                                          for p in model.parameters()], kept=kept)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks leave together (see tests/test_ddp.py)
    finally:
        dist.destroy_process_group()
    exit_after_success()


@pytest.mark.slow
@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_with_and_without_bucket_views(tmp_path, bucket_view):
    mp.spawn(_ddp_worker, args=(str(tmp_path), bucket_view), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        # A bucket view is DDP's storage: never kept. Otherwise kept.
        assert r["ours"]["kept"] == [not bucket_view] * 4
        assert r["copy"]["kept"] == [False] * 4
        for key in ("params", "exp_avg"):
            for a, b, c in zip(r["ours"][key], r["copy"][key], r["torch"][key]):
                assert torch.equal(a, b), key
                torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
