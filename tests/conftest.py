import os
import signal

import pytest
import torch
from hypothesis import settings

# A shell without job control starts background commands with SIGINT ignored,
# and an ignored signal stays ignored in every process started from it: the
# tests that press Ctrl-C in a child (`pygan-optim train`) would then see it
# never arrive. Python's own handler here makes the children start with the
# default action again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Property tests draw the same examples on every run, so CI is reproducible;
# HYPOTHESIS_PROFILE=explore draws new ones each run (the database keeps failures).
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _with_threads(n):
    """torch's thread count set to n for a test, and restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Torch's fused loop gives each thread a range and runs its last numel % 16
    elements in a scalar tail that its compiler contracts differently; one thread
    and sizes in multiples of 64 keep bit-for-bit comparisons off those tails."""
    yield from _with_threads(1)


@pytest.fixture
def two_threads():
    """Two threads: the check pass and the kernels split their work between them."""
    yield from _with_threads(2)


@pytest.fixture
def keep_small_cpu_grads(monkeypatch):
    """FusedAdam keeps CPU grads as exp_avg from 32768 elements on, as on GPUs,
    instead of from 32 MiB (keep_grad_min_bytes_cpu): the tests of what keeping
    does run on small tensors."""
    from pygan_optim import FusedAdam

    monkeypatch.setattr(FusedAdam, "keep_grad_min_bytes_cpu", 0)
