"""The plain ops with tensors that share memory, and with scalar arguments on the meta
device: refused by name before anything is written, or computed as torch's sequence
of in-place ops would. Found by a helper's bug hunt; the kernels write chunks of
different tensors on different threads, so a tensor written twice would race."""
import pytest
import torch

from pygan_optim import FusedAdam, ops

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def _adam_lists(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(size, generator=g) for _ in range(n)]
    grads = [torch.randn(size, generator=g) for _ in range(n)]
    # params, grads, exp_avgs, exp_avg_sqs, state_steps: ops.adam_step_'s lists
    return [params, grads, [torch.zeros(size) for _ in range(n)],
            [torch.zeros(size) for _ in range(n)], [torch.zeros(()) for _ in range(n)]]


def _snapshot(lists):
    return [[t.clone() for t in ts] for ts in lists]


def _unchanged(lists, before):
    return all(torch.equal(a, b) for ts, bs in zip(lists, before) for a, b in zip(ts, bs))


def test_a_written_tensor_with_internal_overlap_is_refused_before_any_write():
    lists = _adam_lists()
    lists[0][1] = torch.zeros(1).expand(64)  # every element the same memory
    before = _snapshot(lists)
    with pytest.raises(RuntimeError, match=r"params\[1\] has elements that share memory"):
        ops.adam_step_(*lists, **HP)
    assert _unchanged(lists, before)

    tensors = [torch.ones(5), torch.zeros(1).expand(5)]
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has elements that share memory"):
        ops.scale_(tensors, 2.0, found_inf=torch.zeros(1))
    assert torch.equal(tensors[0], torch.ones(5))

    emas = [torch.zeros(5), torch.zeros(1).expand(5)]
    with pytest.raises(RuntimeError, match=r"ema\[1\] has elements that share memory"):
        ops.ema_(emas, [torch.ones(5), torch.ones(5)], 0.5)
    assert torch.equal(emas[0], torch.zeros(5))


def test_fused_adam_with_an_expanded_parameter_changes_nothing_and_keeps_no_state():
    a = torch.nn.Parameter(torch.randn(8))
    b = torch.nn.Parameter(torch.zeros(1).expand(8))
    a.grad, b.grad = torch.randn(8), torch.randn(8)
    opt = FusedAdam([a, b], lr=1e-2)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="share memory"):
        opt.step()
    assert torch.equal(a, before) and len(opt.state) == 0


@pytest.mark.parametrize("which", ["params", "exp_avgs", "state_steps"])
def test_a_tensor_written_twice_is_refused_by_name(which):
    lists = _adam_lists()
    index = {"params": 0, "exp_avgs": 2, "state_steps": 4}[which]
    lists[index][2] = lists[index][0]
    before = _snapshot(lists)
    with pytest.raises(RuntimeError, match=rf"{which}\[\d\] and {which}\[\d\] share memory"):
        ops.adam_step_(*lists, **HP)
    assert _unchanged(lists, before)


def test_a_grad_that_is_also_written_is_refused():
    lists = _adam_lists()
    lists[1][1] = lists[2][0]  # grads[1] is exp_avgs[0]
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] is written and shares memory with "
                                           r"grads\[1\]"):
        ops.adam_step_(*lists, **HP)


def test_read_only_grads_may_be_shared():
    lists = _adam_lists()
    lists[1][1] = lists[1][0]
    twin = _snapshot(lists)
    twin[1][1] = twin[1][0]
    ops.adam_step_(*lists, **HP)
    for i in range(3):  # one by one: the oracle for a shared read-only grad
        ops.adam_step_(*[[ts[i]] for ts in twin], **HP)
    assert _unchanged(lists, twin)


def test_ema_and_scale_refuse_a_tensor_given_twice():
    e, p = torch.zeros(5), torch.ones(5)
    with pytest.raises(RuntimeError, match=r"ema\[1\] and ema\[0\] share memory"):
        ops.ema_([e, e], [p, p], 0.5)
    assert torch.equal(e, torch.zeros(5))
    t = torch.ones(5)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] and tensors\[0\] share memory"):
        ops.scale_([t, t], 2.0, found_inf=torch.zeros(1))
    assert torch.equal(t, torch.ones(5))


@pytest.mark.parametrize("arg", ["lr", "found_inf", "grad_scale", "grad_mult", "step"])
def test_a_meta_scalar_among_cpu_tensors_is_refused(arg):
    """One meta tensor sends the call to the fake implementation, which would
    otherwise do nothing and report success."""
    lists = _adam_lists()
    kwargs = dict(HP)
    if arg == "step":
        lists[4][1] = torch.zeros((), device="meta")
    else:
        kwargs[arg] = torch.ones((), device="meta")
    before = _snapshot(lists[:4])
    with pytest.raises(RuntimeError, match="is on meta but the tensors are on cpu"):
        ops.adam_step_(*lists, **kwargs)
    assert _unchanged(lists[:4], before)


def test_meta_scalars_for_scale_and_norm_are_refused():
    with pytest.raises(RuntimeError, match="factor is on meta"):
        ops.scale_([torch.ones(3)], torch.ones((), device="meta"), found_inf=torch.zeros(1))
    with pytest.raises(RuntimeError, match="scale is on meta"):
        ops.l2_norm([torch.ones(3)], torch.ones((), device="meta"))


@pytest.mark.parametrize("arg", ["lr", "grad_scale", "grad_mult", "found_inf"])
def test_a_scalar_that_shares_memory_with_a_written_tensor_is_refused(arg):
    """The CPU loops read a scalar once, the CUDA kernels once per block: one the
    call writes (a view of a parameter) would give each backend its own answer."""
    lists = _adam_lists()
    scalar = lists[0][1][3:4] if arg != "found_inf" else lists[0][1][3:4].zero_()
    kw = dict(HP, **{arg: scalar})
    before = _snapshot(lists)
    with pytest.raises(RuntimeError, match=rf"params\[1\] is written and shares memory with "
                                           rf"{arg}, which the same call reads"):
        ops.adam_step_(*lists, **kw)
    assert _unchanged(lists, before)
    # A scalar that shares memory with a grad, which is only read, is fine.
    lists[1][0][5] = 0.5
    ops.adam_step_(*lists, **dict(HP, **{arg: lists[1][0][5:6]}))


def test_scale_and_norm_scalars_that_share_memory_with_written_tensors_are_refused():
    tensors = [torch.full((6,), 2.0), torch.ones(4)]
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is written and shares memory with "
                                           r"factor"):
        ops.scale_(tensors, tensors[0][:1], found_inf=torch.zeros(1))
    assert torch.equal(tensors[0], torch.full((6,), 2.0))
    with pytest.raises(RuntimeError, match=r"found_inf is written and shares memory with "
                                           r"tensors\[1\]"):
        ops.l2_norm(tensors, found_inf=tensors[1][:1])


def test_a_tensor_past_the_end_of_its_resized_storage_is_refused_by_name():
    """torch's own ops read past the end (a crash); each op refuses it by name."""
    lists = _adam_lists(size=1 << 20)
    lists[1][2].untyped_storage().resize_(16)  # grads[2]: 4 of its 2^20 elements left
    before = _snapshot([lists[0], lists[2], lists[3]])
    message = r"grads\[2\] is a tensor whose elements reach past the end of its storage"
    with pytest.raises(RuntimeError, match=message):
        ops.adam_step_(*lists, **HP)
    assert _unchanged([lists[0], lists[2], lists[3]], before)
    shrunk = lists[1][2]
    for call in (lambda: ops.scale_([shrunk], 2.0, found_inf=torch.zeros(1)),
                 lambda: ops.l2_norm([shrunk]),
                 lambda: ops.ema_([torch.zeros(1 << 20)], [shrunk], 0.5)):
        with pytest.raises(RuntimeError, match="reach past the end of its storage"):
            call()
    # Strided: the last element decides, not the element count.
    strided = torch.zeros(100)[::3]
    strided.untyped_storage().resize_(4 * 99)  # one float short of element 99
    with pytest.raises(RuntimeError, match="reach past the end"):
        ops.scale_([strided], 2.0, found_inf=torch.zeros(1))


def _meta_and_cpu(make):
    """The outcome of make(device) on the CPU and on meta: (type, first words)."""
    outcomes = []
    for device in ("cpu", "meta"):
        try:
            make(device)
            outcomes.append(None)
        except RuntimeError as e:
            outcomes.append(str(e).split(":")[1].split()[0])  # the tensor it names
    return outcomes


STRUCTURE_CASES = {
    "step of 2 elements": lambda z: ops.adam_step_([z(3)], [z(3)], [z(3)], [z(3)], [z(2)], **HP),
    "int64 step": lambda z: ops.adam_step_([z(3)], [z(3)], [z(3)], [z(3)],
                                           [z((), dtype=torch.int64)], **HP),
    "lr of 2 elements": lambda z: ops.adam_step_([z(3)], [z(3)], [z(3)], [z(3)], [z(())],
                                                 **dict(HP, lr=z(2))),
    "expanded param": lambda z: ops.adam_step_([z(1).expand(3)], [z(3)], [z(3)], [z(3)],
                                               [z(())], **HP),
    "expanded ema": lambda z: ops.ema_([z(1).expand(3)], [z(3)], 0.5),
    "float64 found_inf": lambda z: ops.scale_([z(3)], 2.0, z(1, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", list(STRUCTURE_CASES))
def test_meta_calls_refuse_what_cpu_calls_refuse(case):
    """The fake implementations (torch.compile, meta tensors) refuse a call's
    structure as the kernels do, naming the same tensor."""
    make = STRUCTURE_CASES[case]
    cpu, meta = _meta_and_cpu(lambda device: make(
        lambda *shape, **kw: torch.zeros(*shape, device=device, **kw)))
    assert cpu is not None and cpu == meta


def test_interleaved_views_that_share_no_element_are_accepted():
    """Byte spans of views with gaps interleave without sharing an element
    (W[:, :5] and W[:, 5:]; buf[0::2] and buf[1::2]): accepted, and computed as on
    separate tensors. Views that share one element are still refused."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(6, 10, generator=g)
    buf = torch.zeros(2 * 60)
    lists = [[W[:, :5], W[:, 5:]], [torch.randn(6, 5, generator=g) for _ in range(2)],
             [buf[0::2].view(6, 10)[:, :5], buf[1::2].view(6, 10)[:, 5:]],
             [torch.zeros(6, 5), torch.zeros(6, 5)], [torch.zeros(()), torch.zeros(())]]
    separate = [[t.clone() for t in ts] for ts in lists]
    ops.adam_step_(*lists, **HP)
    ops.adam_step_(*separate, **HP)
    for ts, us in zip(lists, separate):
        for t, u in zip(ts, us):
            assert torch.equal(t, u)
    emas = [buf[0::2][:30], buf[1::2][:30]]
    expected = [e.clone() for e in emas]
    sources = [torch.ones(30), torch.full((30,), 2.0)]
    ops.ema_(emas, sources, 0.5)
    ops.ema_(expected, sources, 0.5)
    assert all(torch.equal(e, x) for e, x in zip(emas, expected))
    ops.scale_([W[:, :5], W[:, 5:]], 2.0, found_inf=torch.zeros(1))
    assert torch.equal(W[:, :5], 2 * separate[0][0]) and torch.equal(W[:, 5:], 2 * separate[0][1])
    with pytest.raises(RuntimeError, match=r"tensors\[1\] and tensors\[0\] share memory"):
        ops.scale_([W[:, :6], W[:, 5:]], 2.0, found_inf=torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"is written and shares memory with grads\[0\]"):
        ops.adam_step_([W[:, :5]], [W[:, 4:9]], [torch.zeros(6, 5)], [torch.zeros(6, 5)],
                       [torch.zeros(())], **HP)


# ---- views of one buffer, compared byte run by byte run (session 30 hunt) ----

def test_halves_of_a_matrix_past_4m_elements_each_are_disjoint():
    """Column halves of 4,196,352 elements each (counted as sharing past 4M before)."""
    W = torch.randn(2048, 4098)
    expected = W * 0.5
    halves = [W[:, :2049], W[:, 2049:]]
    ops.scale_(halves, 0.5, found_inf=torch.zeros(1))
    assert torch.equal(W, expected)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] and tensors\[0\] share memory"):
        ops.scale_([W[:, :2049], W[:, 2048:]], 0.5, found_inf=torch.zeros(1))
    assert torch.equal(W, expected)


def _addresses(t):
    """The element offsets of a view, by brute force (the oracle)."""
    sizes, strides = t.shape, t.stride()
    out = {t.storage_offset()}
    for size, stride in zip(sizes, strides):
        out = {o + k * stride for o in out for k in range(size)}
    return out


def _random_view(buf, g):
    while True:
        dims = int(torch.randint(1, 4, (), generator=g))
        sizes = [int(torch.randint(1, 5, (), generator=g)) for _ in range(dims)]
        strides = [int(torch.randint(0, 9, (), generator=g)) for _ in range(dims)]
        span = sum((s - 1) * st for s, st in zip(sizes, strides))
        if span >= buf.numel():
            continue
        offset = int(torch.randint(0, buf.numel() - span, (), generator=g))
        view = buf.as_strided(sizes, strides, offset)
        if len(_addresses(view)) == view.numel():  # no internal overlap: refused elsewhere
            return view


@pytest.mark.parametrize("seed", range(4))
def test_views_of_one_buffer_are_refused_exactly_when_they_share_an_element(seed):
    """Random strided views of one buffer as ema_'s averages (written) and
    sources (read): refused iff two averages, or an average and a source, share
    an element; two sources may. Against a brute-force oracle."""
    g = torch.Generator().manual_seed(seed)
    refused = accepted = 0
    for _ in range(150):
        buf = torch.arange(48, dtype=torch.float32)
        n = int(torch.randint(1, 4, (), generator=g))
        emas = [_random_view(buf, g) for _ in range(n)]
        sources = []  # each with its average's shape and strides, somewhere in buf
        for e in emas:
            for _ in range(100):
                offset = int(torch.randint(0, 48, (), generator=g))
                span = sum((s - 1) * st for s, st in zip(e.shape, e.stride()))
                if offset + span < 48:
                    sources.append(buf.as_strided(e.shape, e.stride(), offset))
                    break
            else:
                sources.append(torch.ones(e.shape))
        written = [_addresses(e) for e in emas]
        read = [_addresses(s) if s.untyped_storage().data_ptr() == buf.data_ptr() else set()
                for s in sources]
        clash = any(written[i] & written[j] for i in range(n) for j in range(i)) or any(
            w & r for w in written for r in read)
        before = buf.clone()
        try:
            ops.ema_(emas, sources, 0.5)
        except RuntimeError as error:
            assert clash and "share" in str(error), str(error)
            assert torch.equal(buf, before)
            refused += 1
        else:
            assert not clash
            accepted += 1
    assert refused > 10 and accepted > 10  # both outcomes exercised


def test_many_column_views_are_checked_and_updated():
    """Column views of one matrix (W.unbind(1)) each span nearly all of it; with
    one column given twice among them the call is refused by name."""
    W = torch.randn(64, 300)
    expected = W * 2.0
    ops.scale_(list(W.unbind(1)), 2.0, found_inf=torch.zeros(1))
    assert torch.equal(W, expected)
    columns = list(W.unbind(1)) + [W[:, 150]]
    with pytest.raises(RuntimeError, match=r"tensors\[300\] and tensors\[150\] share memory"):
        ops.scale_(columns, 2.0, found_inf=torch.zeros(1))
    assert torch.equal(W, expected)
