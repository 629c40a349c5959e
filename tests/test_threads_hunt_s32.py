"""Thread counts, instruction sets and concurrency (session 32 hunt).

Oracles: torch 2.13's Adam/AdamW (fused=True, on one thread), torch's own
clip_grad_norm_, float64 sums, and the same work run serially. Element math must
be bit-identical for every thread count and between AVX2 and AVX-512; l2_norm may
differ between instruction sets only by its summation order, within the bound its
arithmetic allows. Bugs found (each test below fails on the code before the fix):
- two threads stepping one FusedAdam interleaved the Python part of their steps: a
  step refused in one thread (a KeyError on a state the other thread was still
  filling in) undid the states the other thread's step had just updated (the
  parameters moved, their state was dropped and restarted at step 0), and the
  options of one thread's step_options block leaked into the other's step or were
  deleted under it (AttributeError). Steps of one optimizer are now serialized;
- a Ctrl-C during a step_and_zero_grad that kept grads as exp_avg (beta1 = 0) is
  raised as soon as the step returns, before the release: the grad stayed on the
  parameter while its memory was the state's exp_avg, so zeroing it (or backward
  accumulating into it) rewrote the optimizer state.
"""
import hashlib
import inspect
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pygan_optim import FusedAdam, FusedAdamW, ops
from pygan_optim.optim import adam as adam_module
from pygan_optim.wrappers.fused_step import global_norm

# Around SIMD widths (16 fp32 lanes), the 1024-element norm blocks, the 32768
# elements per task and the 64K chunks; 300001 spreads one tensor over tasks.
SIZES = [0, 1, 15, 16, 17, 1023, 1024, 1025, 32767, 32768, 40000, 65537, 300001]
THREADS = [1, 2, 3, 5, 8]  # more than the machine's cores is fine


def _data(dtype, seed, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype) for n in sizes]


def _many_small(dtype, seed):
    g = torch.Generator().manual_seed(1234)
    return _data(dtype, seed, [int(n) for n in torch.randint(0, 200, (1500,), generator=g)])


def _digest(tensors):
    h = hashlib.sha1()
    for t in tensors:
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _every_op(dtype, make):
    """Every public op, with the options that change the loops taken; returns a
    digest per op."""
    x = make(dtype, 1)
    out = {}
    found = torch.zeros(1)
    y = [t.clone() for t in x]
    ops.scale_(y, 0.37, found)
    out["scale_"] = _digest(y + [found])
    out["scale"] = _digest(ops.scale(x, torch.tensor(1.7), found))
    out["l2_norm"] = _digest(list(ops.l2_norm(x, 0.5, torch.zeros(1))))
    e = make(dtype, 2)
    ops.ema_(e, x, 0.999)
    out["ema_"] = _digest(e)
    for name, b1, ams, kw in (
            ("plain", 0.9, False, dict(weight_decay=0.0)),
            ("amp_clip_zero_ema", 0.0, False, dict(weight_decay=0.1, zero_grads=True,
                                                    grad_scale=torch.tensor(1024.0),
                                                    found_inf=torch.zeros(()),
                                                    grad_mult=torch.tensor(0.3))),
            ("amsgrad_adamw_maximize", 0.5, True, dict(weight_decay=0.1, decoupled=True,
                                                        maximize=True))):
        p, g, m = make(dtype, 3), [t.clone() for t in x], make(dtype, 4)
        v, vmax = [t.abs() for t in make(dtype, 5)], [t.abs() * 2 for t in make(dtype, 6)]
        steps = [torch.tensor(float(i % 5)) for i in range(len(p))]
        emas = make(dtype, 7) if kw.get("zero_grads") else None
        for _ in range(2):
            ops.adam_step_(p, g, m, v, steps, lr=1e-2, beta1=b1, beta2=0.999, eps=1e-8,
                           amsgrad=ams, max_exp_avg_sqs=vmax, emas=emas, ema_momentum=0.99,
                           **kw)
            g = [t.clone() for t in x]
        out[f"adam_step_/{name}"] = _digest(p + m + v + vmax + steps + (emas or []))
    return out


def _optimizers():
    """FusedAdam/AdamW with plain steps and updates that keep grads, several dtypes."""
    out = {}
    for cls in (FusedAdam, FusedAdamW):
        for b1 in (0.0, 0.9):
            params = [nn.Parameter(t) for t in _data(torch.float32, 8)] + \
                     [nn.Parameter(t) for t in _data(torch.bfloat16, 9, [17, 40000, 70000])]
            opt = cls(params, lr=1e-2, betas=(b1, 0.99), weight_decay=0.05)
            opt.keep_grad_min_bytes_cpu = 0  # keeping grads from 32768 elements on
            for it in range(3):
                for p, g in zip(params, _data(torch.float32, 20 + it, [p.numel() for p in params])):
                    p.grad = g.to(p.dtype)
                if it % 2:
                    opt.step()
                    opt.zero_grad()
                else:
                    opt.step_and_zero_grad()
            out[f"{cls.__name__}/{b1}"] = _digest(
                list(params) + [t for p in params for t in opt.state[p].values()])
    return out


def _with_threads(n, fn, *args):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_every_op_is_bit_identical_for_every_thread_count(dtype):
    for make in (_data, _many_small):
        results = {n: _with_threads(n, _every_op, dtype, make) for n in THREADS}
        for n in THREADS[1:]:
            assert results[n] == results[1], (n, make.__name__,
                                               [k for k in results[1] if results[n][k] != results[1][k]])


def test_optimizers_are_bit_identical_for_every_thread_count_and_after_changes():
    results = {n: _with_threads(n, _optimizers) for n in (1, 3, 8)}
    assert results[3] == results[1] and results[8] == results[1]
    # torch.set_num_threads changed between the steps of one optimizer.
    sequence = iter([1, 5, 2, 8, 3, 1, 2, 5, 8, 3, 1, 2])
    real = adam_module.FusedAdam.step

    def step_on_changing_threads(self, *args, **kwargs):
        torch.set_num_threads(next(sequence))
        return real(self, *args, **kwargs)

    before = torch.get_num_threads()
    try:
        adam_module.FusedAdam.step = step_on_changing_threads
        changing = _optimizers()
    finally:
        adam_module.FusedAdam.step = real
        torch.set_num_threads(before)
    assert changing == results[1]


# --- instruction sets, in subprocesses (ATEN_CPU_CAPABILITY is read at import) ----------------

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
import test_threads_hunt_s32 as t
from pygan_optim import FusedAdam, FusedAdamW, _ext
res = {{"isa": _ext.cpu_capability()}}
for n in (1, 3):
    torch.set_num_threads(n)
    res[n] = {{str(d): t._every_op(d, t._data) for d in (torch.float32, torch.bfloat16)}}
    res[n]["opt"] = t._optimizers()
torch.set_num_threads(1)
res["norms"] = t._norm_errors()
res["torch_fused"] = t._against_torch_fused()
print(json.dumps(res))
"""


def _norm_errors():
    """Relative errors of l2_norm's total against float64 sums, on inputs whose
    float32 sums round often (equal values) and on random ones."""
    g = torch.Generator().manual_seed(5)
    cases = [[torch.full((1 << 20,), 0.1)], [torch.full((1023,), 0.1)],
             [torch.full((65537,), 1.1).half()], [torch.full((65537,), 1.1).bfloat16()],
             [torch.randn(n, generator=g) for n in SIZES[1:]]]
    errors = []
    for tensors in cases:
        for scale in (1.0, 0.3):
            total, per = ops.l2_norm(tensors, scale)
            exact_per = [float((t.double() * float(torch.tensor(scale))).square().sum().sqrt())
                         for t in tensors]
            exact = sum(e * e for e in exact_per) ** 0.5
            errors.append(abs(total.item() - exact) / exact)
            errors.extend(abs(p - e) / e for p, e in zip(per.tolist(), exact_per) if e)
    return max(errors)


def _against_torch_fused():
    """Ours on 3 threads against torch's fused Adam on one (its scalar tails are then
    only each tensor's last numel % 16 elements: sizes in multiples of 64)."""
    same = {}
    for cls, kw in ((FusedAdam, {}), (FusedAdamW, dict(weight_decay=0.1))):
        sizes = [64, 1024, 32768, 65536 + 64, 300032]
        runs = []
        for make, threads in ((lambda ps: cls(ps, lr=1e-2, betas=(0.9, 0.99), **kw), 3),
                              (lambda ps: getattr(torch.optim, cls.__name__[5:])(
                                  ps, lr=1e-2, betas=(0.9, 0.99), fused=True, **kw), 1)):
            torch.set_num_threads(threads)
            params = [nn.Parameter(t) for t in _data(torch.float32, 11, sizes)]
            opt = make(params)
            for it in range(3):
                for p, g in zip(params, _data(torch.float32, 30 + it, sizes)):
                    p.grad = g
                opt.step()
            runs.append(list(params) + [opt.state[p][k] for p in params
                                        for k in ("exp_avg", "exp_avg_sq")])
        torch.set_num_threads(1)
        same[cls.__name__] = all(torch.equal(a, b) for a, b in zip(*runs))
    return same


def _run_isa(isa):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _norm_bound(isa):
    """What l2_norm's arithmetic allows, relative to the exact norm: squares added
    in float32 over blocks of 1024 (each vector lane about 1024 / lanes of them,
    then the lanes; the default build and unvectorised dtypes one after another,
    without FMA two roundings each: gamma(2 * 1024) at most), the blocks in float64,
    then a square root (halves the relative error) and the float32 result (half
    an ulp). Summation order is all that differs between instruction sets."""
    u = 2.0 ** -24
    terms = 2 * 1024 + 1
    return 0.5 * terms * u / (1 - terms * u) + u


def test_instruction_sets_agree_and_are_thread_count_independent():
    runs = {isa: _run_isa(isa) for isa in ("avx512", "avx2", "default")}
    for isa, run in runs.items():
        assert run["1"] == run["3"], isa
        assert run["norms"] <= _norm_bound(isa), (isa, run["norms"])
        # Against torch fused Adam/AdamW on the same instruction set (torch follows
        # ATEN_CPU_CAPABILITY too), ours on 3 threads.
        assert all(run["torch_fused"].values()), (isa, run["torch_fused"])
    wide = [run for run in runs.values() if run["isa"] in ("avx2", "avx512")]
    if len({run["isa"] for run in wide}) == 2:  # this machine has both
        a, b = wide[0]["1"], wide[1]["1"]
        for key in a:
            if key == "opt":
                assert a[key] == b[key]
                continue
            # Elementwise ops bit for bit; l2_norm only by its summation order.
            assert {k: v for k, v in a[key].items() if k != "l2_norm"} == \
                   {k: v for k, v in b[key].items() if k != "l2_norm"}, key


def test_wrapper_clip_norm_within_the_bound_of_torchs_clip_grad_norm():
    """The norm the fused wrapper clips with (and logs) against torch's
    clip_grad_norm_ (its own summation order) on 1, 3 and 8 threads."""
    bound = 2 * _norm_bound("default")
    before = torch.get_num_threads()
    for n in (1, 3, 8):
        torch.set_num_threads(n)
        try:
            params = [nn.Parameter(t) for t in _data(torch.float32, 40)]
            grads = _data(torch.float32, 41)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            theirs = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
            total = global_norm(grads, None, None)
            assert abs(total.item() - theirs) <= bound * theirs, (n, total.item(), theirs)
        finally:
            torch.set_num_threads(before)


# --- concurrency -------------------------------------------------------------------------------

def _op_work(seed, dtype):
    p, g, m = _data(dtype, seed), _data(dtype, seed + 1), _data(dtype, seed + 2)
    v = [t.abs() for t in _data(dtype, seed + 3)]
    steps = [torch.zeros(()) for _ in p]
    e = _data(dtype, seed + 4)
    norms = []
    for _ in range(4):
        found = torch.zeros(1)
        total, per = ops.l2_norm(g, 0.5, found)
        ops.adam_step_(p, g, m, v, steps, lr=1e-2, beta1=0.9 if seed % 2 else 0.0, beta2=0.999,
                       eps=1e-8, grad_mult=torch.clamp(1.0 / (total + 1e-6), max=1.0),
                       found_inf=found, emas=e, ema_momentum=0.9)
        ops.scale_(g, 0.9, found)
        ops.ema_(e, p, 0.99)
        norms += [total, per]
    return _digest(p + m + v + steps + e + norms)


def _opt_work(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in SIZES]
    opt = FusedAdam(params, lr=1e-2, betas=(0.0 if seed % 2 else 0.9, 0.99), weight_decay=0.01)
    opt.keep_grad_min_bytes_cpu = 0
    for i in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step_and_zero_grad() if i % 2 else opt.step()
    return _digest(list(params) + [t for p in params for t in opt.state[p].values()])


def test_threads_running_ops_and_optimizers_at_once_match_serial_runs():
    """The plain ops let the GIL go (torch.ops), FusedAdam's step keeps it: both
    from several Python threads at once, on their own tensors, give the serial
    results bit for bit."""
    jobs = [(_op_work, s, d) for s in range(3) for d in (torch.float32, torch.bfloat16)] + \
           [(_opt_work, 100 + s, d) for s in range(3) for d in (torch.float32, torch.float16)]
    serial = [fn(s, d) for fn, s, d in jobs]
    results, errors = [None] * len(jobs), []

    def run(i):
        fn, s, d = jobs[i]
        try:
            results[i] = fn(s, d)
        except BaseException as error:  # noqa: B036 (reported below)
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == serial


def _one_optimizer(betas=(0.9, 0.99)):
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(n, generator=g)) for n in [1, 17, 1025, 40000, 65537]]
    params += [nn.Parameter(torch.randn(100, generator=g)) for _ in range(600)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params, FusedAdam(params, lr=1e-3, betas=betas)


def _in_threads(body, n=3):
    errors = []

    def run():
        try:
            body()
        except BaseException as error:  # noqa: B036 (reported by the caller)
            errors.append(repr(error))

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_two_threads_stepping_one_optimizer_never_lose_state():
    """Bug: interleaved, a step refused in one thread (KeyError on a state the other
    was filling in) undid states the other's step had just updated: parameters
    moved with their state dropped. Steps of one optimizer are now serialized, so
    three threads of 10 steps equal 30 steps in a row. (The threads do not set
    grads: torch 2.13 itself can crash on p.grad set and read from threads while
    other threads run ops.)"""
    reference_params, reference = _one_optimizer()
    for _ in range(30):
        reference.step()
    for _ in range(4):
        params, opt = _one_optimizer()
        errors = _in_threads(lambda: [opt.step() for _ in range(10)])
        assert not errors, errors
        assert all(float(opt.state[p].get("step", -1)) == 30 for p in params)
        assert all(torch.equal(a, b) for a, b in zip(params, reference_params))


def test_step_options_of_two_threads_do_not_mix():
    """Bug: step_options keeps its options on the instance; another thread's block
    deleted them under a running step (AttributeError: '_grad_mult') or its step
    ran with them. Each thread zeroes the grads in its update pass, so any order
    of whole steps gives the same result: the first step on the grads, the others
    on zeros."""
    reference_params, reference = _one_optimizer()
    for _ in range(30):
        reference.step_and_zero_grad(set_to_none=False)
    for _ in range(3):
        params, opt = _one_optimizer()
        errors = _in_threads(lambda: [opt.step_and_zero_grad(set_to_none=False)
                                      for _ in range(10)])
        assert not errors, errors
        assert all(torch.equal(a, b) for a, b in zip(params, reference_params))
        assert all(float(opt.state[p]["step"]) == 30 for p in params)


def test_steps_from_autograd_hooks_equal_steps_after_backward():
    """One optimizer per parameter stepped in its post-accumulate-grad hook (torch's
    optimizer-in-backward recipe), plain and keeping grads, against the same
    steps after backward and torch's fused Adam."""
    def run(cls, in_backward, update):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(300, 400), nn.Tanh(), nn.Linear(400, 64))
        opts = {p: cls([p], lr=1e-2, betas=(0.0, 0.99), **({} if cls is FusedAdam else
                                                          dict(fused=True)))
                for p in net.parameters()}
        for o in opts.values():
            o.keep_grad_min_bytes_cpu = 0

        def hook(p):
            if update:
                opts[p].step_and_zero_grad()
            else:
                opts[p].step()
                opts[p].zero_grad()

        if in_backward:
            for p in net.parameters():
                p.register_post_accumulate_grad_hook(hook)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            net(torch.randn(32, 300, generator=g)).square().mean().backward()
            if not in_backward:
                for p in net.parameters():
                    hook(p)
        return [p.detach() for p in net.parameters()] + \
               [t for o in opts.values() for s in o.state.values() for t in s.values()]

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's scalar tails (64 is a multiple of 16, 400 too)
    try:
        theirs = run(torch.optim.Adam, False, False)
        for in_backward in (False, True):
            for update in (False, True):
                ours = run(FusedAdam, in_backward, update)
                assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), (in_backward, update)
    finally:
        torch.set_num_threads(before)


class _StepsInWorker(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        p = nn.Parameter(torch.randn(300001, generator=g))
        opt = FusedAdam([p], lr=1e-2, betas=(0.0, 0.99))
        opt.keep_grad_min_bytes_cpu = 0
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=g)
            opt.step_and_zero_grad()
        return p.detach(), ops.l2_norm([p.detach()])[0]


def test_steps_in_dataloader_workers_after_the_parent_used_its_threads():
    """Forked workers (torch gives them one thread; a plain os.fork child of a
    process that ran OpenMP regions hangs in torch's own ops as in ours)."""
    _opt_work(1, torch.float32)  # the parent's OpenMP threads exist
    expected = [_StepsInWorker()[i] for i in range(2)]
    loader = DataLoader(_StepsInWorker(), batch_size=None, num_workers=2, timeout=120)
    for (p, norm), (p_ref, norm_ref) in zip(loader, expected):
        assert torch.equal(p, p_ref) and torch.equal(norm, norm_ref)


# --- interrupts --------------------------------------------------------------------------------

def _interrupt_right_after_the_kernel_call(exc=KeyboardInterrupt):
    """Raises `exc` in FusedAdam._run right after the plan's step returned, where a
    Ctrl-C that arrived during the step (which holds the GIL) is raised."""
    src, first = inspect.getsourcelines(adam_module.FusedAdam._run)
    line = first + next(i for i, s in enumerate(src) if s.strip() == "if not validate_only:")

    def tracer(frame, event, arg):
        if frame.f_code is not adam_module.FusedAdam._run.__code__:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line and not frame.f_locals["validate_only"]:
                sys.settrace(None)
                raise exc
            return local
        return local
    return tracer


def test_ctrl_c_right_after_an_update_that_kept_grads_leaves_no_grad_on_the_state():
    """Bug: the kept grad stayed on the parameter, sharing the state's exp_avg
    memory: zeroing it (zero_grad(set_to_none=False), or backward accumulating
    into it) rewrote the optimizer state."""
    p = nn.Parameter(torch.randn(40000))
    opt = FusedAdam([p], lr=1e-2, betas=(0.0, 0.99))
    opt.keep_grad_min_bytes_cpu = 0
    p.grad = torch.randn(40000)
    opt.step_and_zero_grad()
    grad = torch.randn(40000)
    p.grad = grad.clone()
    sys.settrace(_interrupt_right_after_the_kernel_call())
    try:
        with pytest.raises(KeyboardInterrupt):
            opt.step_and_zero_grad()
    finally:
        sys.settrace(None)
    exp_avg = opt.state[p]["exp_avg"]
    assert torch.equal(exp_avg, grad)  # the update ran: beta1 = 0, exp_avg = grad
    opt.zero_grad(set_to_none=False)
    assert torch.equal(exp_avg, grad)
    assert p.grad is None or p.grad.data_ptr() != exp_avg.data_ptr()
    assert float(opt.state[p]["step"]) == 2


def test_hooks_raising_during_a_step_leave_a_consistent_state():
    """A pre-hook raising: nothing changes. A post-hook raising: the update is
    whole (params, state, steps) and the grads are neither zeroed nor released,
    as with torch's step then zero_grad. A Ctrl-C right after the kernel call of
    a plain step: the update and its state are kept together."""
    def setup():
        params = [nn.Parameter(t) for t in _data(torch.float32, 50, [17, 40000, 65537])]
        for p, g in zip(params, _data(torch.float32, 51, [17, 40000, 65537])):
            p.grad = g
        return params, FusedAdam(params, lr=1e-2, betas=(0.0, 0.99))

    params, opt = setup()
    before = [p.detach().clone() for p in params]
    handle = opt.register_step_pre_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        opt.step_and_zero_grad()
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not opt.state
    assert all(p.grad is not None for p in params)

    reference_params, reference = setup()
    reference.step()
    for zeros in (False, True):
        params, opt = setup()
        grads = [p.grad.clone() for p in params]
        handle = opt.register_step_post_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
        with pytest.raises(RuntimeError, match="x"):
            opt.step_and_zero_grad(set_to_none=not zeros)
        handle.remove()
        assert all(torch.equal(a, b) for a, b in zip(params, reference_params))
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
        assert all(torch.equal(opt.state[p]["exp_avg"], reference.state[q]["exp_avg"])
                   and float(opt.state[p]["step"]) == 1 for p, q in zip(params, reference_params))

    params, opt = setup()
    sys.settrace(_interrupt_right_after_the_kernel_call())
    try:
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    finally:
        sys.settrace(None)
    assert all(torch.equal(a, b) for a, b in zip(params, reference_params))
    assert all(float(opt.state[p]["step"]) == 1 for p in params)
