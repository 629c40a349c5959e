"""Two known gaps of session 32, closed in session 33.

1. ``ExactResumeHook`` restored its state only through the Runner's own resume
   (``resume=True``), not a manual ``runner.resume(path)`` on a Runner built with
   ``resume=False``: MMEngine supports that flow (``train()`` then skips its own
   load), but the resumed run drew other random numbers and lost the part of the
   accumulation window saved in the checkpoint.
2. A Ctrl-C while ``pygan-optim train`` was still importing torch and MMEngine
   printed Python's traceback instead of the one-line message (exit 130).
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_resume_hunt_s32 import assert_same, make_runner, trained, wrapper

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [dict(type="ExactResumeHook")]


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    # MMEngine 0.10.7 cannot load its own checkpoints under torch's
    # weights_only=True default (see tests/test_gan.py).
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


# --- 1. a manual runner.resume(path) ------------------------------------------------

@pytest.mark.parametrize("k, accu", [(5, 3), (4, 1)])  # 5: mid accumulation window
def test_manual_resume_continues_bit_for_bit(tmp_path, k, accu):
    """A run saved at k and resumed with ``runner.resume(path)`` on a Runner built
    with resume=False equals the uninterrupted run and the resume=True run, bit
    for bit: the random state (dropout draws from it) and the window's counts and
    grads come back as through the Runner's own resume."""
    kw = dict(hooks=HOOKS, dropout=0.5)
    straight = trained(make_runner(tmp_path / "straight", wrapper(accu=accu), 9, **kw))
    make_runner(tmp_path / "first", wrapper(accu=accu), 9, ckpt_interval=k, **kw).train()
    ckpt = tmp_path / "first" / f"iter_{k}.pth"
    auto = trained(make_runner(tmp_path / "auto", wrapper(accu=accu), 9, resume_from=ckpt,
                               **kw))
    runner = make_runner(tmp_path / "manual", wrapper(accu=accu), 9, **kw)
    runner.resume(str(ckpt))
    manual = trained(runner)
    assert_same(straight, auto)
    assert_same(straight, manual)


def test_manual_load_checkpoint_of_iteration_0_restores_nothing(tmp_path):
    """The guard kept: a manual ``runner.load_checkpoint`` (weights only, no
    resume) of a checkpoint saved at iteration 0 restores neither the old run's
    random state nor its counts, also on a Runner built with resume=True whose
    own resume then does not run (the checkpoint counts as loaded)."""
    cfg = wrapper(accu=1)
    first = make_runner(tmp_path / "first", cfg, 0, hooks=HOOKS, dropout=0.5)
    first.train()
    ckpt = tmp_path / "first" / "iter_0.pth"
    first.save_checkpoint(str(tmp_path / "first"), ckpt.name)
    runs = []
    for name, hooks in (("plain", []), ("hook", HOOKS)):
        runner = make_runner(tmp_path / name, cfg, 3, seed=123, dropout=0.5, hooks=hooks)
        runner._resume = name == "hook"  # as resume=True with no checkpoint in work_dir
        runner.load_checkpoint(str(ckpt))
        runs.append(trained(runner))
    assert_same(*runs)


# --- 2. Ctrl-C while `pygan-optim train` imports ---------------------------------------

TINY = str(ROOT / "configs" / "biggan_32x32_tiny.py")
SCRIPT = Path(sys.executable).with_name("pygan-optim")
LAUNCHERS = {"module": [sys.executable, "-m", "pygan_optim.cli", "train"],
             "script": [str(SCRIPT), "train"]}
MESSAGE = (r"pygan-optim train: interrupted( at iter \d+)?; (no checkpoint was saved|"
           r"the last checkpoint is \S+ \(continue with --resume\))")


def _importing_torch(pid) -> bool:
    """Whether the process has mapped torch's library: it is importing torch (or
    has), which the package does first thing, right after its Ctrl-C guard."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _interrupt(launcher, argv, when):
    """``pygan-optim train ARGV``, SIGINT at ``when``: "torch" as soon as torch's
    library is mapped (the imports are under way), or that many seconds after it
    (still importing, building, or training: whichever it is, the outcome must be
    the same). Returns the exit code and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    p = subprocess.Popen(LAUNCHERS[launcher] + argv, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not _importing_torch(p.pid):
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.002)
        if when != "torch":
            time.sleep(when)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return p.returncode, err


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").is_file(),
                                reason="needs Linux's /proc")


@needs_proc
@pytest.mark.parametrize("launcher, when", [("module", "torch"), ("script", "torch"),
                                            ("module", 0.3), ("script", 1.0), ("module", 2.0)])
def test_ctrl_c_from_the_start_is_one_line_and_exit_130(tmp_path, launcher, when):
    """Bug: a Ctrl-C while torch and MMEngine imported printed Python's traceback."""
    if launcher == "script" and not SCRIPT.is_file():
        pytest.skip("the pygan-optim script is not installed next to this Python")
    code, err = _interrupt(launcher, [TINY, "--work-dir", str(tmp_path / "work"),
                                      "--cfg-options", "train_cfg.max_iters=100000",
                                      "default_hooks.checkpoint.interval=100000"], when)
    assert "Traceback" not in err, err[-3000:]
    assert code == 130, err[-3000:]
    assert re.fullmatch(MESSAGE, err.splitlines()[-1]), err[-3000:]


@needs_proc
def test_ctrl_c_while_importing_names_the_last_checkpoint(tmp_path):
    """The message while importing is the later one: it names the work dir's last
    checkpoint (--work-dir read as argparse reads it, abbreviated here)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "last_checkpoint").write_text(str(work / "iter_7.pth"))
    code, err = _interrupt("module", [TINY, "--work", str(work)], "torch")
    assert code == 130, err[-3000:]
    assert err.splitlines()[-1] == (f"pygan-optim train: interrupted; the last checkpoint "
                                    f"is {work / 'iter_7.pth'} (continue with --resume)")


@pytest.mark.parametrize("argv, orig, expected", [
    (["-m", "train", "c.py"], ["py", "-m", "pygan_optim.cli", "train", "c.py"], ["train", "c.py"]),
    (["-m", "train"], ["py", "-X", "dev", "-W", "error", "-m", "pygan_optim.cli", "train"],
     ["train"]),
    (["-m", "train"], ["py", "-Bmpygan_optim.cli", "train"], ["train"]),
    (["-m", "train"], ["py", "-m", "other.cli", "train"], None),
    (["-m", "pygan_optim.cli", "train"], ["py", "-m", "x", "pygan_optim.cli", "train"], None),
    (["/venv/bin/pygan-optim", "train", "c.py"], ["py", "/venv/bin/pygan-optim", "train", "c.py"],
     ["train", "c.py"]),
    (["/x/train.py", "train"], ["py", "/x/train.py", "train"], None),
    (["-c", "train"], ["py", "-c", "import pygan_optim", "train"], None),
])
def test_which_processes_the_guard_takes(monkeypatch, argv, orig, expected):
    """Only ``pygan-optim`` (the script, or ``python -m pygan_optim.cli``) is the
    command; any other process importing the package keeps Python's SIGINT."""
    from pygan_optim import _interrupt

    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig)
    assert _interrupt.cli_args() == expected


def test_importing_the_package_without_sys_argv_works():
    """An embedded interpreter may have no sys.argv: the start-up guard must not make
    the import fail there (it only looks at the command line)."""
    code = ("import sys\n"
            "del sys.argv\n"
            "import pygan_optim, signal\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
