"""Parameters swapped by torch.utils.swap_tensors after FusedAdam has stepped.

`Module.load_state_dict` and `Module.to` swap parameters under
`torch.__future__.set_swap_module_params_on_conversion(True)`, and `.to` always
does for tensor-subclass parameters. swap_tensors refuses a tensor that anyone
but its Python object references, so the optimizer may hold the parameters'
objects between steps, not their tensors, and each step must update the tensor
the object holds now.

Oracles: torch.optim.Adam (for-loop), which holds nothing between steps, within
the arithmetic's bounds (`close` of test_fused_adam: rtol 1e-5 after a few
steps); and the same run of FusedAdam with the parameters copied in place of
swapped, bit for bit (the same arithmetic on the same values).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from pygan_optim import FusedAdam
from test_fused_adam import close

HP = dict(lr=1e-2, betas=(0.0, 0.999), eps=1e-6)


@pytest.fixture
def swapping():
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


def make_model(seed=0):
    torch.manual_seed(seed)
    # 40000 weights: large enough for the grad to be kept as exp_avg (with
    # keep_small_cpu_grads); the bias and the conv's are packed into shared
    # state buffers.
    return nn.Sequential(nn.Linear(200, 200), nn.Conv2d(3, 4, 3))


def backward(model, step):
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def train(optimizer_type, swap, **kw):
    """Two steps, a state dict of new values loaded, two more steps."""
    model = make_model()
    opt = optimizer_type(model.parameters(), **HP, **kw)
    for step in range(2):
        backward(model, step)
        opt.step()
    new_values = {k: v + 0.5 for k, v in make_model(seed=1).state_dict().items()}
    torch.__future__.set_swap_module_params_on_conversion(swap)
    params_before = list(model.parameters())
    model.load_state_dict(new_values)
    assert all(p is q for p, q in zip(params_before, model.parameters()))
    kept = []  # per step after the load: whether the weight's grad became its exp_avg
    for step in range(2, 4):
        backward(model, step)
        grad_at = model[0].weight.grad.data_ptr()
        if isinstance(opt, FusedAdam):
            opt.step_and_zero_grad()
        else:
            opt.step()
            opt.zero_grad()
        kept.append(opt.state[model[0].weight]["exp_avg"].data_ptr() == grad_at)
    return model, opt, kept


@pytest.mark.usefixtures("keep_small_cpu_grads")  # the kept-grad path too
def test_load_state_dict_with_swapped_params_continues_as_copied_ones(swapping):
    copied, copied_opt, _ = train(FusedAdam, swap=False)
    swapped, swapped_opt, kept = train(FusedAdam, swap=True)
    assert kept == [True, True]
    for p, q in zip(swapped.parameters(), copied.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(swapped_opt.state[p][key], copied_opt.state[q][key]), key
    reference, reference_opt, _ = train(torch.optim.Adam, swap=True, foreach=False)
    for p, q in zip(swapped.parameters(), reference.parameters()):
        close(p.detach(), q.detach())
        close(swapped_opt.state[p]["exp_avg_sq"], reference_opt.state[q]["exp_avg_sq"])


def test_stale_tensor_of_a_swapped_param_is_not_written(swapping):
    model = make_model()
    opt = FusedAdam(model.parameters(), **HP)
    backward(model, 0)
    opt.step()
    weight = model[0].weight
    replacement = nn.Parameter(torch.full_like(weight, 0.25))
    torch.utils.swap_tensors(weight, replacement)
    assert torch.equal(weight, torch.full_like(weight, 0.25))
    stale = replacement.detach().clone()  # the tensor the weight held before
    backward(model, 1)
    opt.step()
    assert torch.equal(replacement.detach(), stale)
    assert not torch.equal(weight.detach(), torch.full_like(weight, 0.25))

    reference = make_model()
    reference_opt = torch.optim.Adam(reference.parameters(), **HP, foreach=False)
    backward(reference, 0)
    reference_opt.step()
    with torch.no_grad():
        reference[0].weight.fill_(0.25)
    backward(reference, 1)
    reference_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        close(p.detach(), q.detach())


def test_module_to_another_dtype_is_refused_by_name_and_changes_nothing(swapping):
    """torch's Adam raises too (its float32 state against float64 params)."""
    model = make_model()
    opt = FusedAdam(model.parameters(), **HP)
    backward(model, 0)
    opt.step()
    model.to(torch.float64)
    backward(model, 1)
    params = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    with pytest.raises(RuntimeError, match="has dtype Float but params.* has dtype Double"):
        opt.step()
    for p, before, state in zip(model.parameters(), params, states):
        assert torch.equal(p, before)
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v), k


SWAPPING_THREAD = textwrap.dedent("""
    import threading, time
    import torch
    from torch import nn
    from pygan_optim import FusedAdam

    # 36 MB each: above glibc's largest mmap threshold, so a freed tensor's pages
    # are unmapped and a step still writing them faults.
    SIZE = 9 * 2**20
    params = [nn.Parameter(torch.zeros(SIZE)) for _ in range(3)]
    for p in params:
        p.grad = torch.ones(SIZE)
    opt = FusedAdam(params, lr=1e-3)
    opt.step()
    stop, swaps = False, 0

    def swapper():
        global swaps
        while not stop:
            for p in params:
                new = nn.Parameter(torch.zeros(SIZE))
                new.grad = torch.ones(SIZE)
                try:
                    torch.utils.swap_tensors(p, new)
                    swaps += 1
                except RuntimeError:
                    pass
                del new  # frees the tensor p held before, if swapped

    thread = threading.Thread(target=swapper)
    thread.start()
    start = time.time()
    try:
        while time.time() - start < 1.5:
            opt.step()
    finally:
        stop = True
        thread.join()
    assert all(torch.isfinite(p).all() for p in params)
    print("swaps", swaps)
""")


def test_a_thread_swapping_params_while_steps_run_does_not_crash_the_process():
    """The step reads the parameters' tensors without counting references (see
    adam_plan.cpp) and keeps the GIL, so a swap from another thread waits for
    the step to end. (With the GIL let go, such a swap freed the tensor the
    step was writing: a segfault.) Run in a process of its own."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    done = subprocess.run([sys.executable, "-c", SWAPPING_THREAD], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 0  # some swaps happened between steps
