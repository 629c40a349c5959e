"""Session 38: gaps between FusedAdam / the ops and torch, closed.

- a hyper-parameter given as text (``group["lr"] = "1e-4"``, as a YAML config
  can leave it) is refused by name, as torch's optimizers refuse it, and a
  refused step changes nothing;
- an integer Tensor lr runs as torch's fused Adam runs it (it was refused);
- a step counter held as float16/bfloat16 (a loaded state dict, an edit) is
  read as float32, as torch's fused Adam loads it (it was refused);
- ``ops.scale_`` / ``ops.ema_`` refuse to write a tensor that requires grad
  while grad mode is on (no autograd formula), as torch's foreach ops refuse
  writing such a leaf;
- ``capturable=True`` on the CPU steps as torch's fused Adam does there.

Comparisons are bit for bit against torch (one thread, sizes in multiples of 64:
off torch's scalar tails), since the same arithmetic runs.
"""
import copy

import pytest
import torch
import torch.nn as nn

from pygan_optim import FusedAdam, FusedAdamW, ops

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPES = [(256, 64), (128,)]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def step_both(opt, ref, params, twins, steps, compare_each=True):
    """The same grads to both optimizers for each step; compared after each."""
    for step in steps:
        set_grads(params, step)
        set_grads(twins, step)
        opt.step()
        ref.step()
        if compare_each:
            assert_same(params, twins, opt, ref)


def assert_same(ours, theirs, opt_a, opt_b):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a.detach(), b.detach()), f"param {i}"
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key]), f"{key} of param {i}"
        assert float(opt_a.state[a]["step"]) == float(opt_b.state[b]["step"])


def torch_fused(cls):
    return torch.optim.AdamW if cls is FusedAdamW else torch.optim.Adam


# --- hyper-parameters given as text -----------------------------------------

@pytest.mark.parametrize("key, value", [("lr", "0.1"), ("eps", "1e-8"),
                                        ("weight_decay", "0"), ("betas", ("0", 0.999)),
                                        ("betas", (0.9, b"0.999"))])
def test_text_hyper_parameter_is_refused_by_name_and_nothing_changes(key, value):
    """Torch's Adam fails on each (a TypeError in its arithmetic or its op's
    arguments); ours ran float("0.1"). The text sits in the second group, so
    the first group (checked and run first before) must stay untouched."""
    params = make_params()
    opt = FusedAdam([{"params": params[:1]}, {"params": params[1:]}], lr=0.01)
    set_grads(params, 0)
    opt.step()
    ref = torch.optim.Adam([nn.Parameter(p.detach().clone()) for p in params], lr=0.01,
                           fused=True)
    ref.param_groups[0][key] = value
    ref.param_groups[0]["params"][0].grad = torch.ones(SHAPES[0])
    with pytest.raises(TypeError):
        ref.step()

    opt.param_groups[1][key] = value
    set_grads(params, 1)
    before = [p.detach().clone() for p in params]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    name = key if key != "betas" else ("beta1" if isinstance(value[0], str) else "beta2")
    with pytest.raises(TypeError, match=rf"FusedAdam: param group 1: {name} must be a "
                                        r"number, not (str|bytes)"):
        opt.step()
    for p, b, s in zip(params, before, state_before):
        assert torch.equal(p.detach(), b)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v)


def test_text_hyper_parameter_is_refused_by_the_ops():
    p, g = torch.zeros(64), torch.ones(64)
    m, v, s = torch.zeros(64), torch.zeros(64), torch.zeros(())
    found_inf = torch.zeros(1)
    with pytest.raises(TypeError, match=r"pygan_optim.adam_step_: lr must be a number, not "
                                        r"str '0.1'"):
        ops.adam_step_([p], [g], [m], [v], [s], lr="0.1", beta1=0.9, beta2=0.99, eps=1e-8)
    with pytest.raises(TypeError, match=r"pygan_optim.adam_step_: ema_momentum must be"):
        ops.adam_step_([p], [g], [m], [v], [s], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                       emas=[torch.zeros(64)], ema_momentum="0.9")
    assert torch.equal(p, torch.zeros(64)) and float(s) == 0.0
    with pytest.raises(TypeError, match=r"pygan_optim.ema_: momentum must be a number"):
        ops.ema_([p], [g], "0.5")
    with pytest.raises(TypeError, match=r"pygan_optim.ema_: new_weight must be a number"):
        ops.ema_([p], [g], 0.5, "0.5")
    with pytest.raises(TypeError, match=r"pygan_optim.scale_: factor must be a number"):
        ops.scale_([p], "2", found_inf)
    with pytest.raises(TypeError, match=r"pygan_optim.scale: factor must be a number"):
        ops.scale([p], "2", found_inf)
    with pytest.raises(TypeError, match=r"pygan_optim.l2_norm: scale must be a number"):
        ops.l2_norm([p], "2")
    assert torch.equal(p, torch.zeros(64))


def test_numbers_that_are_not_floats_still_run():
    """numpy scalars and ints convert as before (only text is refused)."""
    np = pytest.importorskip("numpy")
    params, twins = make_params(), make_params()
    opt = FusedAdam(params, lr=np.float32(0.01), betas=(0.0, np.float64(0.99)), eps=1)
    ref = torch.optim.Adam(twins, lr=float(np.float32(0.01)), betas=(0.0, 0.99), eps=1.0,
                           fused=True)
    step_both(opt, ref, params, twins, range(2))


# --- an integer Tensor lr ---------------------------------------------------

@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_tensor_lr_runs_as_torch_fused(cls, dtype):
    """torch's fused Adam takes lr=torch.tensor(1) (also set mid-run); ours
    refused it ("lr must be a floating-point tensor")."""
    params, twins = make_params(), make_params()
    opt = cls(params, lr=torch.tensor(1, dtype=dtype), weight_decay=0.01)
    ref = torch_fused(cls)(twins, lr=torch.tensor(1, dtype=dtype), weight_decay=0.01,
                           fused=True)
    for step in range(3):
        if step == 2:  # a scheduler's integer write, mid-run
            for o in (opt, ref):
                o.param_groups[0]["lr"] = torch.tensor(0, dtype=dtype)
        set_grads(params, step)
        set_grads(twins, step)
        opt.step()
        ref.step()
        assert_same(params, twins, opt, ref)


def test_integer_tensor_lr_through_the_op_and_its_fake():
    """The op converts a read-only integer scalar; its meta twin agrees; a bool
    lr and an integer found_inf of scale_ (which the kernel writes) are still
    refused by name."""
    p, g = torch.zeros(64), torch.ones(64)
    m, v, s = torch.zeros(64), torch.zeros(64), torch.zeros(())
    ops.adam_step_([p], [g], [m], [v], [s], lr=torch.tensor(2), beta1=0.0, beta2=0.0, eps=0.0)
    assert torch.equal(p, torch.full((64,), -2.0))  # a unit step of lr = 2
    meta = [torch.zeros(64, device="meta") for _ in range(4)]
    ops.adam_step_([meta[0]], [meta[1]], [meta[2]], [meta[3]], [torch.zeros((), device="meta")],
                   lr=torch.tensor(2, device="meta"), beta1=0.0, beta2=0.0, eps=0.0)
    with pytest.raises(RuntimeError, match=r"lr must be a floating-point or integer tensor, "
                                           r"not Bool"):
        ops.adam_step_([p], [g], [m], [v], [s], lr=torch.tensor(True), beta1=0.0, beta2=0.0,
                       eps=0.0)
    with pytest.raises(RuntimeError, match=r"lr must be a floating-point or integer tensor, "
                                           r"not torch.bool"):
        ops.adam_step_([meta[0]], [meta[1]], [meta[2]], [meta[3]],
                       [torch.zeros((), device="meta")], lr=torch.tensor(True, device="meta"),
                       beta1=0.0, beta2=0.0, eps=0.0)
    assert torch.equal(p, torch.full((64,), -2.0)) and float(s) == 1.0
    with pytest.raises(RuntimeError, match=r"found_inf must be"):
        ops.scale_([p], 2.0, torch.zeros(1, dtype=torch.int32))
    assert torch.equal(p, torch.full((64,), -2.0))


# --- a half-precision step counter -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_step_in_a_loaded_state_dict_is_read_as_float32(dtype):
    """A state dict whose groups do not say fused=True (torch's for-loop Adam
    saves its step as it holds it) keeps a half step through load_state_dict;
    ours refused it at the next step. Now it counts on in float32, bit for bit
    as torch's fused Adam continues from the float32 dict. (torch's fused
    Adam itself, given the half step, reads it wrongly: left out here.)"""
    params, twins = make_params(), make_params()
    opt = FusedAdam(params, lr=0.01)
    ref = torch.optim.Adam(twins, lr=0.01, fused=True)
    step_both(opt, ref, params, twins, range(2), compare_each=False)
    saved = ref.state_dict()
    halves = copy.deepcopy(saved)
    for group in halves["param_groups"]:
        group["fused"] = False
    for st in halves["state"].values():
        st["step"] = st["step"].to(dtype)
    opt.load_state_dict(halves)
    ref.load_state_dict(copy.deepcopy(saved))  # (a copy: loads keep uncast tensors)
    assert all(opt.state[p]["step"].dtype == dtype for p in params)  # kept by the load
    step_both(opt, ref, params, twins, range(2, 4))
    assert all(opt.state[p]["step"].dtype == torch.float32 for p in params)


def test_half_step_written_into_the_state_is_read_as_float32():
    """An edit that leaves a float16 step: torch's for-loop Adam counts on in
    float16, its fused and foreach Adam refuse it. Ours converts it, keeping
    the count, and steps as the for-loop does (same step values here)."""
    params, twins = make_params(), make_params()
    opt = FusedAdam(params, lr=0.01)
    ref = torch.optim.Adam(twins, lr=0.01, foreach=False)
    set_grads(params, 0)
    set_grads(twins, 0)
    opt.step()
    ref.step()
    for o, ps in ((opt, params), (ref, twins)):
        for p in ps:
            o.state[p]["step"] = o.state[p]["step"].half()
    set_grads(params, 1)
    set_grads(twins, 1)
    opt.step()
    ref.step()
    for p, q in zip(params, twins):
        assert opt.state[p]["step"].dtype == torch.float32
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 2.0
        # Different op orders (torch's for-loop divides by the bias corrections
        # separately): a few float32 ulps apart at most.
        torch.testing.assert_close(p.detach(), q.detach(), rtol=4e-7, atol=0)


# --- in-place ops on tensors that require grad --------------------------------

def test_scale_and_ema_refuse_to_write_what_autograd_tracks():
    leaf = nn.Parameter(torch.ones(64))
    other = torch.full((64,), 3.0)
    found_inf = torch.zeros(1)
    nonleaf = leaf * 1.0
    with pytest.raises(RuntimeError, match=r"in-place operation"):
        torch._foreach_mul_([leaf], 2.0)  # torch's foreach op, the model
    for call, message in [
            (lambda: ops.scale_([other, leaf], 2.0, found_inf),
             r"pygan_optim.scale_: tensors\[1\] requires grad"),
            (lambda: ops.scale_([nonleaf], 2.0, found_inf),
             r"pygan_optim.scale_: tensors\[0\] requires grad"),
            (lambda: ops.ema_([leaf], [other], 0.5), r"pygan_optim.ema_: ema\[0\] requires grad"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            call()
    assert torch.equal(leaf.detach(), torch.ones(64))
    assert torch.equal(other, torch.full((64,), 3.0)) and float(found_inf) == 0.0
    # Reading a tensor that requires grad is fine, and so is any write under no_grad.
    ops.ema_([other], [leaf], 0.5)
    assert torch.equal(other, torch.full((64,), 2.0))
    with torch.no_grad():
        ops.scale_([leaf], 2.0, found_inf)
        ops.ema_([leaf], [other], 0.5)
    assert torch.equal(leaf.detach(), torch.full((64,), 2.0))


# --- capturable=True on the CPU -------------------------------------------------

@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW])
def test_capturable_on_the_cpu_steps_as_torch_fused(cls):
    """torch's fused Adam takes capturable=True on the CPU (its for-loop and
    foreach ones assert); ours gives its bits."""
    params, twins = make_params(), make_params()
    opt = cls(params, lr=torch.tensor(0.01), capturable=True)
    ref = torch_fused(cls)(twins, lr=torch.tensor(0.01), capturable=True, fused=True)
    step_both(opt, ref, params, twins, range(3))
