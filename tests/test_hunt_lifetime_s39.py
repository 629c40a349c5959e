"""Object lifetime, concurrency, process forking and signals (a bug hunt, session 39).

Oracles: torch.optim.Adam (its lifetime behaviour: what `del` and the cyclic
garbage collector free) and sequential runs of our own code (bit for bit).
The bugs it found are fixed (each test's docstring says which); the other tests
pin what held.
"""
import gc
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pygan_optim import EmaBlend, FusedAdam, FusedAdamW, ops


# --- helpers ---------------------------------------------------------------------------------

def _params(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(n, generator=g)) for n in sizes], g


def _snapshot(params, opt):
    """Params and every state tensor, cloned (bitwise comparisons)."""
    out = [p.detach().clone() for p in params]
    for p in params:
        state = opt.state.get(p, {})
        out += [state[k].clone() for k in sorted(state) if isinstance(state[k], torch.Tensor)]
    return out


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _wait_child(pid, timeout):
    """waitpid with a deadline: a hung child is killed and reported as None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _fork_and_run(body, out_path, timeout=60.0):
    """Runs body() in an os.fork child (one torch thread: a forked child of a process
    that ran OpenMP regions hangs in torch's own ops otherwise, NOTES "Threads and
    instruction sets"); returns (exit status or None if it hung, the bytes body
    returned, written to out_path)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.alarm(int(timeout) + 5)
            torch.set_num_threads(1)
            data = body()
            with open(out_path, "wb") as f:
                f.write(data)
            code = 0
        finally:
            os._exit(code)
    status = _wait_child(pid, timeout)
    data = b""
    if status == 0:
        with open(out_path, "rb") as f:
            data = f.read()
    return status, data


def _tensor_bytes(tensors):
    return b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)


# --- 1. leaks on refused steps and on the success path ----------------------------------------

def _refusal(kind):
    """Edits that make the next step refuse (with the error type), on the last
    parameter of the last group."""
    def bad_dtype(ps, opt):
        ps[-1].grad_dtype = None  # torch 2.13 checks grad dtypes on assignment otherwise
        ps[-1].grad = torch.randn(ps[-1].shape, dtype=torch.float64)

    def bad_shape(ps, opt):
        ps[-1].grad.data = torch.randn(ps[-1].numel() + 1)

    def sparse(ps, opt):
        ps[-1].grad = torch.randn(ps[-1].numel()).to_sparse()

    def text_lr(ps, opt):
        opt.param_groups[-1]["lr"] = "0.1"

    def negative_lr(ps, opt):
        opt.param_groups[-1]["lr"] = -1.0

    def neg_view(ps, opt):
        ps[-1].grad = torch.randn(ps[-1].numel())._neg_view()

    def state_shape(ps, opt):
        opt.state[ps[-1]]["exp_avg"] = torch.zeros(ps[-1].numel() + 3)

    def shared_state(ps, opt):
        opt.state[ps[-1]]["exp_avg_sq"] = opt.state[ps[-1]]["exp_avg"]

    return {f.__name__: f for f in (bad_dtype, bad_shape, sparse, text_lr, negative_lr, neg_view,
                                    state_shape, shared_state)}[kind]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kind", ["bad_dtype", "bad_shape", "sparse", "text_lr", "negative_lr",
                                  "neg_view", "state_shape", "shared_state"])
def test_refused_steps_repeated_keep_nothing_alive_and_change_nothing(kind, groups):
    """Held: 300 refused steps (after a first good one) leave params, grads and
    state exactly as they were, no reference held on any of them, no Python
    object left behind, no state created or dropped."""
    ps, gen = _params([1000, 33000] * groups, seed=3)
    opt = FusedAdam([{"params": ps[2 * i:2 * i + 2]} for i in range(groups)], lr=1e-2)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    _refusal(kind)(ps, opt)
    before = _snapshot(ps, opt)
    state_objects = {id(p): {k: id(v) for k, v in opt.state[p].items()} for p in ps}
    grads = [p.grad for p in ps]
    grad_refs = [sys.getrefcount(g) for g in grads]
    param_refs = [sys.getrefcount(p) for p in ps]
    for _ in range(20):  # warm: caches, plans
        with pytest.raises((RuntimeError, TypeError, ValueError)):
            opt.step()
    gc.collect()
    objects = len(gc.get_objects())
    for _ in range(300):
        with pytest.raises((RuntimeError, TypeError, ValueError)):
            opt.step()
    gc.collect()
    # A few objects of gc/pytest's own come and go; a leak per refused step would
    # leave at least 300.
    assert len(gc.get_objects()) - objects < 50
    assert [sys.getrefcount(g) for g in grads] == grad_refs
    assert [sys.getrefcount(p) for p in ps] == param_refs
    assert all(p.grad is g for p, g in zip(ps, grads))
    assert {id(p): {k: id(v) for k, v in opt.state[p].items()} for p in ps} == state_objects
    assert _equal(_snapshot(ps, opt), before)


def test_refused_op_calls_from_the_check_threads_leak_nothing():
    """Held: the op's check pass refuses a tensor on a worker thread (4000
    parameters: both threads check); 200 such calls keep no reference to any
    tensor (one kept per call would show in the exact counts) and leave the step
    counts at 0."""
    n = 4000
    params = [torch.randn(10) for _ in range(n)]
    grads = [torch.randn(10) for _ in range(n)]
    exp_avgs = [torch.zeros(10) for _ in range(n)]
    exp_avg_sqs = [torch.zeros(10) for _ in range(n)]
    steps = [torch.zeros(()) for _ in range(n)]
    grads[n - 7] = torch.randn(10)._neg_view()
    watched = (params[0], grads[0], exp_avgs[0], grads[n - 7], params[n - 1], steps[n - 1])
    refs = [sys.getrefcount(t) for t in watched]
    for _ in range(200):
        with pytest.raises(RuntimeError, match=r"grads\[3993\] is a negative"):
            ops.adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=0.1, beta1=0.9,
                           beta2=0.99, eps=1e-8)
    assert [sys.getrefcount(t) for t in watched] == refs
    assert all(float(s) == 0 for s in steps)
    assert all(torch.count_nonzero(m) == 0 for m in exp_avgs)


@pytest.mark.parametrize("mode", ["step", "release", "keep", "zeros", "ema"])
def test_references_stay_constant_over_many_successful_steps(mode):
    """Held: 150 steps (plain, released grads, grads kept as exp_avg, zeros in the
    pass, EMA blended) change no parameter's or state tensor's reference count
    and leave no Python objects behind."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 8))
    ps = list(net.parameters())
    opt = FusedAdam([{"params": ps[:2]}, {"params": ps[2:]}] if mode != "keep" else ps,
                    lr=1e-3, betas=(0.0 if mode == "keep" else 0.9, 0.99))
    opt.keep_grad_min_bytes_cpu = 0
    averages = [p.detach().clone() for p in ps]
    x = torch.randn(16, 200)

    def iteration():
        net(x).square().mean().backward()
        if mode == "step":
            opt.step()
            opt.zero_grad()
        elif mode in ("release", "keep"):
            opt.step_and_zero_grad()
        elif mode == "zeros":
            opt.step_and_zero_grad(set_to_none=False)
        else:
            opt.step_and_zero_grad(ema=EmaBlend(list(zip(ps, averages)), 0.99))

    for _ in range(20):
        iteration()
    gc.collect()
    param_refs = [sys.getrefcount(p) for p in ps]
    state_refs = [sys.getrefcount(t) for p in ps for t in opt.state[p].values()]
    objects = len(gc.get_objects())
    for _ in range(150):
        iteration()
    gc.collect()
    assert len(gc.get_objects()) - objects < 50
    assert [sys.getrefcount(p) for p in ps] == param_refs
    assert [sys.getrefcount(t) for p in ps for t in opt.state[p].values()] == state_refs
    assert all(float(opt.state[p]["step"]) == 170 for p in ps)


def _first_constructions():
    # The first optimizer of a process imports torch._dynamo inside torch's
    # add_param_group, whose frames then stay in a cycle for a while: not ours.
    for cls in (torch.optim.Adam, FusedAdam, FusedAdamW):
        cls([nn.Parameter(torch.zeros(1))])
    gc.collect()


@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW])
def test_deleting_an_optimizer_frees_its_state_without_the_cycle_collector(cls):
    """Found in session 39: OptimizerState was a reference cycle (its defaultdict
    factory its own bound method, each ParamState holding it), so `del optimizer`
    freed no state tensor, nor the parameters keying them, until the cycle
    collector ran (never with gc disabled or frozen). torch's Adam frees them at
    once; so does ours now (the ParamStates hold their state weakly)."""
    _first_constructions()

    def alive_after_del(make):
        p = nn.Parameter(torch.randn(1000))
        opt = make([p])
        p.grad = torch.randn(1000)
        opt.step()
        refs = [weakref.ref(opt.state[p]["exp_avg"]), weakref.ref(p)]
        del opt, p
        return [r() is not None for r in refs]

    gc.disable()
    try:
        # Control: torch's Adam frees exp_avg and the parameter on `del`.
        assert alive_after_del(lambda ps: torch.optim.Adam(ps, lr=1e-3)) == [False, False]
        assert alive_after_del(lambda ps: cls(ps, lr=1e-3)) == [False, False]
    finally:
        gc.enable()
        gc.collect()


class _Trainer(nn.Module):
    """A module that owns its optimizer and clips grads with a hook of its own
    (a bound method, so the weight's hook refers back to the module)."""

    def __init__(self, cls):
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.optimizer = cls(self.parameters(), lr=1e-3)
        self.clip = 1.0
        self.lin.weight.register_hook(self._clip_grad)

    def _clip_grad(self, grad):
        return grad.clamp(-self.clip, self.clip)

    def train_step(self, x):
        self.lin(x).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def test_a_module_owning_its_stepped_optimizer_in_a_cycle_is_collected():
    """Found in session 39: the C++ AdamPlan holds its parameters' Python objects
    but was not a GC-tracked type, so a cycle through a stepped FusedAdam's plan
    (module -> its optimizer -> plan -> weight -> the weight's grad hook, a bound
    method -> module) was never collected: the module, its parameters and the
    optimizer state leaked for the process's life. The plan now reports them to
    the cycle collector (module.cpp, collected_by_gc), which frees the cycle as
    it does with torch's Adam."""
    _first_constructions()

    def survivors(cls):
        trainer = _Trainer(cls)
        trainer.train_step(torch.randn(4, 64))
        refs = [weakref.ref(trainer), weakref.ref(trainer.lin.weight),
                weakref.ref(trainer.optimizer.state[trainer.lin.weight]["exp_avg"])]
        del trainer
        gc.collect()
        return [r() is not None for r in refs]

    assert survivors(torch.optim.Adam) == [False, False, False]  # the control
    assert survivors(FusedAdam) == [False, False, False]


def test_a_module_owning_an_optimizer_that_never_stepped_is_collected():
    """Held (the boundary of the bug above): before its first step FusedAdam has
    no plan, and the same cycle is collected."""
    _first_constructions()
    trainer = _Trainer(FusedAdam)
    refs = [weakref.ref(trainer), weakref.ref(trainer.lin.weight)]
    del trainer
    gc.collect()
    assert [r() is not None for r in refs] == [False, False]


# --- 2. threads ---------------------------------------------------------------------------------

def _train(cls, sizes, seed, steps, kw, ema, barrier=None):
    ps, gen = _params(sizes, seed)
    half = len(ps) // 2
    opt = cls([{"params": ps[:half]}, {"params": ps[half:]}], lr=1e-2, **kw)
    opt.keep_grad_min_bytes_cpu = 0
    averages = [p.detach().clone() for p in ps]
    grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(steps)]
    if barrier is not None:
        barrier.wait(timeout=60)
    for s in range(steps):
        for p, g in zip(ps, grads[s]):
            p.grad = g.clone()
        if ema:
            opt.step_and_zero_grad(ema=EmaBlend(list(zip(ps, averages)), 0.9))
        elif s % 2:
            opt.step_and_zero_grad()
        else:
            opt.step()
    return _snapshot(ps, opt) + averages


def test_two_optimizers_stepped_from_two_threads_equal_sequential_runs():
    """Held: two FusedAdam/FusedAdamW (two groups each, kept grads, amsgrad, EMA)
    stepped at once from two threads equal the same runs one after the other."""
    jobs = [(FusedAdam, [100_000, 7, 40_000, 70_001], 1, dict(betas=(0.0, 0.99)), False),
            (FusedAdamW, [50_000, 3, 90_000, 1000], 2, dict(amsgrad=True), True)]
    steps = 12
    sequential = [_train(*job[:3], steps, *job[3:]) for job in jobs]
    for _ in range(2):
        results, errors = [None, None], []
        barrier = threading.Barrier(2)

        def run(i):
            try:
                results[i] = _train(*jobs[i][:3], steps, *jobs[i][3:], barrier=barrier)
            except BaseException as error:  # noqa: B036 (reported below)
                errors.append(repr(error))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert not errors, errors
        assert all(_equal(r, s) for r, s in zip(results, sequential))


def _op_work(seed, steps=15):
    gen = torch.Generator().manual_seed(seed)
    sizes = [200_000, 5, 70_001, 1_000]
    params = [torch.randn(n, generator=gen) for n in sizes]
    exp_avgs = [torch.zeros(n) for n in sizes]
    exp_avg_sqs = [torch.zeros(n) for n in sizes]
    steps_t = [torch.zeros(()) for _ in sizes]
    averages = [p.clone() for p in params]
    norms = []
    for _ in range(steps):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        ops.scale_(grads, 0.5, torch.zeros(1))
        norms.append(ops.l2_norm(grads)[0])
        ops.adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps_t, lr=1e-2, beta1=0.9,
                       beta2=0.99, eps=1e-8, emas=averages, ema_momentum=0.9)
        ops.ema_(averages, params, 0.5)
    return params + exp_avgs + exp_avg_sqs + averages + norms + steps_t


def test_ops_from_three_threads_while_a_fourth_changes_the_thread_count():
    """Held: the ops let the GIL go, so three threads run them at once (each its
    own OpenMP team) while a fourth flips torch.set_num_threads between 1 and 2:
    no hang, and bit for bit the sequential results (the ops are thread-count
    independent)."""
    before = torch.get_num_threads()
    sequential = [_op_work(s) for s in (1, 2, 3)]
    results, errors = [None] * 3, []
    stop = threading.Event()

    def toggle():
        k = 0
        while not stop.is_set():
            torch.set_num_threads(1 + k % 2)
            k += 1
            time.sleep(0.001)

    def run(i):
        try:
            results[i] = _op_work(i + 1)
        except BaseException as error:  # noqa: B036 (reported below)
            errors.append(repr(error))

    toggler = threading.Thread(target=toggle)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    try:
        toggler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        stop.set()
        toggler.join()
        torch.set_num_threads(before)
    assert not any(t.is_alive() for t in threads), "an op call hung"
    assert not errors, errors
    assert all(_equal(r, s) for r, s in zip(results, sequential))


@pytest.mark.parametrize("hook", ["pre", "post"])
@pytest.mark.parametrize("update", ["step", "release", "zeros"])
def test_a_step_called_again_from_a_step_hook_equals_two_steps(hook, update):
    """Held: a step pre- or post-hook that calls the same optimizer's step once
    more (the lock is re-entrant), inside step(), step_and_zero_grad() (kept
    grads, beta1 = 0) and step_and_zero_grad(set_to_none=False), equals two
    plain steps on the same grads, bit for bit."""
    def run(with_hook):
        ps, gen = _params([40_000, 10, 33_000], seed=5)
        opt = FusedAdam([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, betas=(0.0, 0.99))
        opt.keep_grad_min_bytes_cpu = 0
        inside = [False]

        def again(o, *args):
            if not inside[0]:
                inside[0] = True
                try:
                    o.step()
                finally:
                    inside[0] = False

        if with_hook:
            (opt.register_step_pre_hook if hook == "pre" else opt.register_step_post_hook)(again)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            if not with_hook:
                opt.step()
                opt.step()
                opt.zero_grad(set_to_none=update != "zeros")
            elif update == "step":
                opt.step()
                opt.zero_grad()
            else:
                opt.step_and_zero_grad(set_to_none=update == "release")
            assert all(p.grad is None for p in ps) if update != "zeros" else all(
                torch.count_nonzero(p.grad) == 0 for p in ps)
        return _snapshot(ps, opt)

    assert _equal(run(True), run(False))


# --- 3. fork ------------------------------------------------------------------------------------

def _forked_setup():
    ps, gen = _params([300_001, 17, 50_000], seed=7)
    opt = FusedAdam([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, betas=(0.0, 0.99))
    opt.keep_grad_min_bytes_cpu = 0
    for _ in range(2):  # the parent's OpenMP threads run
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step_and_zero_grad()
    next_grads = [[torch.randn(p.shape, generator=gen) for p in ps] for _ in range(3)]
    return ps, opt, next_grads


def _three_more_steps(ps, opt, next_grads):
    for grads in next_grads:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step_and_zero_grad()
    return _snapshot(ps, opt)


def test_os_fork_child_steps_as_the_parent_does(tmp_path):
    """Held: after steps on both threads, an os.fork child (one torch thread)
    steps three more times to the parent's bits, and the parent is unaffected."""
    ps, opt, next_grads = _forked_setup()
    status, data = _fork_and_run(lambda: _tensor_bytes(_three_more_steps(ps, opt, next_grads)),
                                 tmp_path / "child.bin")
    assert status == 0, f"child status {status} (None: hung)"
    parent = _three_more_steps(ps, opt, next_grads)
    assert data == _tensor_bytes(parent)


def test_multiprocessing_fork_child_steps_as_the_parent_does(tmp_path):
    """Held: the same through multiprocessing's 'fork' start method."""
    ps, opt, next_grads = _forked_setup()
    out = tmp_path / "child.bin"

    def child():
        torch.set_num_threads(1)
        out.write_bytes(_tensor_bytes(_three_more_steps(ps, opt, next_grads)))

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("the forked child hung")
    assert proc.exitcode == 0
    assert out.read_bytes() == _tensor_bytes(_three_more_steps(ps, opt, next_grads))


class _Pairs(Dataset):
    """Deterministic samples: index i's input and target from a seed of its own."""

    def __len__(self):
        return 48

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        return torch.randn(64, generator=g), torch.randn(8, generator=g)


def _train_with_loader(num_workers):
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 8))
    opt = FusedAdamW(net.parameters(), lr=1e-2, betas=(0.0, 0.99))
    opt.keep_grad_min_bytes_cpu = 0
    loader = DataLoader(_Pairs(), batch_size=8, num_workers=num_workers,
                        multiprocessing_context="fork" if num_workers else None,
                        timeout=60 if num_workers else 0)
    for _ in range(2):  # two epochs: workers forked twice, after steps
        for x, y in loader:
            (net(x) - y).square().mean().backward()
            opt.step_and_zero_grad()
    return _snapshot(list(net.parameters()), opt)


def test_training_with_forked_dataloader_workers_equals_training_without():
    """Held: a FusedAdamW training loop fed by two forked DataLoader workers (forked
    after the parent's steps, every epoch) gives the bits of one without workers."""
    _op_work(4, steps=1)  # the parent's OpenMP threads exist before the first fork
    assert _equal(_train_with_loader(2), _train_with_loader(0))


def test_a_child_forked_while_another_thread_holds_the_step_lock_is_refused_not_hung(tmp_path):
    """Found in session 39: the optimizer's RLock (step_protocol.step_lock) came
    into a child forked while another thread held it (in a step_options block,
    or in a step), held by a thread that does not exist there: the child's first
    step waited forever. Now it is refused with an error naming the fork, since
    that thread's step can neither finish nor be undone in the child."""
    ps, gen = _params([100], seed=9)
    opt = FusedAdam(ps, lr=1e-2)
    ps[0].grad = torch.randn(100, generator=gen)
    opt.step()
    held, release = threading.Event(), threading.Event()

    def hold():
        with opt.step_options():  # e.g. a wrapper's step in a training thread
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)

        def child():
            ps[0].grad = torch.randn(100)
            before = ps[0].detach().clone()
            try:
                opt.step()
            except RuntimeError as e:
                unchanged = torch.equal(ps[0], before)
                return f"{unchanged}: {e}".encode()
            return b"stepped"

        status, data = _fork_and_run(child, tmp_path / "child.bin", timeout=3)
    finally:
        release.set()
        holder.join()
    assert status == 0, f"child status {status} (None: hung)"
    assert data.startswith(b"True: FusedAdam: this process was forked while another thread"), data
    # The parent's lock is untouched: the parent steps on.
    ps[0].grad = torch.randn(100, generator=gen)
    opt.step()


def test_a_child_forked_inside_the_forking_threads_own_step_block_steps(tmp_path):
    """Held: a lock held at the fork by the thread that forks is that thread's in
    the child too (re-entrant), so a child forked inside a step_options block steps
    like the parent, bit for bit."""
    ps, gen = _params([100], seed=10)
    opt = FusedAdam(ps, lr=1e-2)
    ps[0].grad = torch.randn(100, generator=gen)
    opt.step()
    grad = torch.randn(100, generator=gen)

    def child():
        ps[0].grad = grad.clone()
        opt.step()
        return _tensor_bytes(ps)

    with opt.step_options():
        status, data = _fork_and_run(child, tmp_path / "child.bin", timeout=30)
        ps[0].grad = grad.clone()
        opt.step()
    assert status == 0, f"child status {status} (None: hung)"
    assert data == _tensor_bytes(ps)


# --- 4. signals ---------------------------------------------------------------------------------

class _Alarm:
    """SIGALRM with a handler of our own, restored afterwards."""

    def __init__(self, handler):
        self.handler = handler

    def __enter__(self):
        self.previous = signal.signal(signal.SIGALRM, self.handler)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)


def _interrupt(*_):
    raise KeyboardInterrupt


def test_ctrl_c_at_random_times_leaves_whole_group_steps_and_training_continues():
    """Held: SIGALRM raising KeyboardInterrupt at random points of 40
    step_and_zero_grad() calls (two groups, grads kept as exp_avg): each group
    either stepped or not (its step counts tell), no grad is left sharing its
    state's memory, no option is left on the instance, and the result equals
    optimizers run with exactly the group steps that happened, bit for bit.
    Training then goes on normally."""
    sizes = [2_000_000, 40_000, 1_500_000]
    ps, gen = _params(sizes, seed=13)
    kw = dict(lr=1e-3, betas=(0.0, 0.99))
    opt = FusedAdam([{"params": ps[:2]}, {"params": ps[2:]}], **kw)
    opt.keep_grad_min_bytes_cpu = 0
    refs = [nn.Parameter(p.detach().clone()) for p in ps]
    ref_opts = [FusedAdam(refs[:2], **kw), FusedAdam(refs[2:], **kw)]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    for p, q, g in zip(ps, refs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    start = time.perf_counter()
    opt.step_and_zero_grad()
    took = time.perf_counter() - start
    for o in ref_opts:
        o.step()
    rng = random.Random(0)
    outcomes = set()
    with _Alarm(_interrupt):
        for _ in range(40):
            grads = [torch.randn(n, generator=gen) for n in sizes]
            counts = [float(opt.state[p]["step"]) for p in ps]
            try:
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0, 1.3 * took))
                opt.step_and_zero_grad()
                signal.setitimer(signal.ITIMER_REAL, 0)
                interrupted = False
            except KeyboardInterrupt:
                signal.setitimer(signal.ITIMER_REAL, 0)
                interrupted = True
            advanced = [float(opt.state[p]["step"]) - c for p, c in zip(ps, counts)]
            assert advanced[0] == advanced[1] and set(advanced) <= {0.0, 1.0}
            outcomes.add((interrupted, tuple(advanced)))
            for p in ps:
                assert p.grad is None or p.grad.data_ptr() != opt.state[p]["exp_avg"].data_ptr()
            assert not {"_release_grads", "_zero_grads", "_grad_mult"} & set(vars(opt))
            for o, members in ((ref_opts[0], [0, 1]), (ref_opts[1], [2])):
                if advanced[members[0]]:
                    for i in members:
                        refs[i].grad = grads[i].clone()
                    o.step()
            for p in ps:
                p.grad = None
    assert any(interrupted for interrupted, _ in outcomes)  # the test did interrupt
    for _ in range(2):  # training goes on
        for p, q in zip(ps, refs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step_and_zero_grad()
        for o in ref_opts:
            o.step()
    for o, members in ((ref_opts[0], [0, 1]), (ref_opts[1], [2])):
        for i in members:
            assert torch.equal(ps[i], refs[i])
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[ps[i]][key], o.state[refs[i]][key])


def test_ctrl_c_during_the_first_groups_kernels_leaves_every_group_stepped_or_none():
    """Found in session 39: a Ctrl-C that arrived while the first param group's
    kernels ran was raised in the Python between the groups' calls: group 0
    stepped, group 1 not, their step counts one apart for the rest of training
    (torch's Adam, a Python loop over groups too, shares it). Now SIGINT is held
    from the first update to the step's end (optim/ctrl_c.py): every group steps,
    and the KeyboardInterrupt comes right after."""
    ps, gen = _params([3_000_000, 1000], seed=17)
    opt = FusedAdam([{"params": ps[:1]}, {"params": ps[1:]}], lr=1e-3)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    counts = [float(opt.state[p]["step"]) for p in ps]

    def between_groups(*_):
        # Fires every 0.2 ms; group 0's call (milliseconds, GIL held) leaves the
        # signal pending, so this runs as soon as that call returns: a Ctrl-C that
        # arrived during group 0's kernels.
        if float(opt.state[ps[0]]["step"]) > counts[0] and float(
                opt.state[ps[1]]["step"]) == counts[1]:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.raise_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends
            fired.append(True)

    fired, interrupted = [], False
    with _Alarm(between_groups):
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        try:
            opt.step()
        except KeyboardInterrupt:
            interrupted = True
        signal.setitimer(signal.ITIMER_REAL, 0)
    advanced = [float(opt.state[p]["step"]) - c for p, c in zip(ps, counts)]
    assert advanced in ([0.0, 0.0], [1.0, 1.0]), advanced
    assert fired, "the timer never found the gap between the groups"
    assert interrupted  # the Ctrl-C is held, not dropped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_right_after_a_blending_update_leaves_the_ema_marked_blended():
    """Found in session 39 (NOTES had it as a known gap): a Ctrl-C raised right
    after the update that blended the EMA, before the step recorded the blend,
    left the pair pending, and a loop that caught the interrupt and blended
    pending() blended it twice. SIGINT is now held until the step's end."""
    ps, gen = _params([3_000_000], seed=19)
    avg = ps[0].detach().clone()
    opt = FusedAdam(ps, lr=1e-3)
    ps[0].grad = torch.randn(ps[0].shape, generator=gen)
    blend = EmaBlend([(ps[0], avg)], momentum=0.75)

    def after_update(*_):
        if ps[0][0] != start[0]:  # the update's call has returned (Adam moves it by ~lr)
            signal.setitimer(signal.ITIMER_REAL, 0)
            fired.append(True)
            signal.raise_signal(signal.SIGINT)

    fired, interrupted = [], False
    start = ps[0].detach().clone()
    with _Alarm(after_update):
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        try:
            opt.step(ema=blend)
        except KeyboardInterrupt:
            interrupted = True
        signal.setitimer(signal.ITIMER_REAL, 0)
    assert fired and interrupted
    assert blend.pending() == []  # recorded as blended: nothing left for the caller
    expected = start.clone()
    ops.ema_([expected], [ps[0].detach()], 0.75)
    assert torch.equal(avg, expected)


# --- the review's findings (session 39) ------------------------------------------------------

def test_two_threads_of_a_forked_child_taking_a_free_lock_are_not_refused(tmp_path):
    """The review's finding: in a child, thread B read the lock's pre-fork entry and
    was switched out; thread A checked the lock and entered a step, holding it; B's
    check then found it held and refused B's step, though no thread held it at the
    fork. The check is now made under a lock of its own, and B waits for A."""
    from pygan_optim.optim import step_protocol

    opt = FusedAdam([nn.Parameter(torch.zeros(2))])
    step_protocol.step_lock(opt)  # made in the parent, free at the fork

    def child():
        a_holds, result = threading.Event(), {}

        def stall_b(frame, event, arg):  # B switched out as it starts the check
            if event == "call" and frame.f_code is step_protocol._checked_after_fork.__code__:
                a_holds.wait(5)

        def thread_a():
            time.sleep(0.1)  # B has read the old entry by now
            with step_protocol.step_lock(opt):
                a_holds.set()
                time.sleep(0.3)

        def thread_b():
            sys.settrace(stall_b)
            try:
                with step_protocol.step_lock(opt):
                    result["b"] = b"stepped"
            except RuntimeError as e:
                result["b"] = str(e).encode()
            finally:
                sys.settrace(None)

        threads = [threading.Thread(target=thread_b), threading.Thread(target=thread_a)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        return result.get("b", b"no result")

    status, data = _fork_and_run(child, tmp_path / "child.bin", timeout=30)
    assert status == 0, f"child status {status} (None: hung)"
    assert data == b"stepped", data


def _interrupt_after(opt, method_name):
    """A Ctrl-C arriving while `method_name` runs: SIGINT raised as it returns."""
    real = getattr(type(opt), method_name)

    def patched(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return out
    setattr(opt, method_name, patched.__get__(opt))


def test_ctrl_c_while_the_plans_are_built_changes_nothing_and_the_step_can_be_retried():
    """The review's finding: a Ctrl-C before the first update (while plans are
    built and the later groups' calls are checked) skipped the refusal's undo,
    which ran for Exception only: the EmaBlend stayed claimed (a retry with it was
    refused) and a dict the user stored as a state stayed adopted."""
    ps = [nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(i)))
          for i in range(2)]
    opt = FusedAdam([{"params": ps[:1]}, {"params": ps[1:]}], lr=1e-2)
    for p in ps:
        p.grad = torch.ones(64)
    blend = EmaBlend([(p, p.detach().clone()) for p in ps], momentum=0.5)
    mine = {}
    opt.state[ps[0]] = mine  # a reset: the step creates this state
    before = [p.detach().clone() for p in ps]
    _interrupt_after(opt, "_plans_for")
    with pytest.raises(KeyboardInterrupt):
        opt.step(ema=blend)
    del opt._plans_for
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert opt.state[ps[0]] is mine and mine == {} and ps[1] not in opt.state
    assert len(blend.pending()) == 2
    opt.step(ema=blend)  # the retry
    assert blend.pending() == [] and float(mine["step"]) == 1.0


def test_ctrl_c_during_a_one_call_step_still_mirrors_the_users_state_dict():
    """The review's finding: a step of one call without an EMA was not held, so a
    Ctrl-C during its kernel was raised before the step put the state back into a
    dict the user had stored (`opt.state[p] = d`), which then never showed it."""
    p = nn.Parameter(torch.randn(64))
    opt = FusedAdam([p], lr=1e-2)
    p.grad = torch.ones(64)
    opt.step()
    mine = {}
    opt.state[p] = mine
    _interrupt_after(opt, "_hold_if_captured")  # the first line after the C++ call
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    del opt._hold_if_captured
    assert float(mine["step"]) == 1.0 and mine["exp_avg"] is opt.state[p]["exp_avg"]
