"""Review of session 33's changes: failing tests for what the review found."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
INTERRUPT = ROOT / "pygan_optim" / "_interrupt.py"


# --- the Ctrl-C guard in multiprocessing spawn children ---------------------------------

SPAWN_CHILD_ORIG_ARGV = ["python", "-c", "from multiprocessing.spawn import spawn_main; "
                         "spawn_main(tracker_fd=5, pipe_handle=7)", "--multiprocessing-fork"]


def test_spawn_child_argv_is_not_the_command(monkeypatch):
    """A spawn child gets its parent's sys.argv (multiprocessing.spawn.prepare), but its
    own command line is ``python -c ... --multiprocessing-fork``: it is not the command."""
    from pygan_optim import _interrupt

    monkeypatch.setattr(sys, "argv", ["/venv/bin/pygan-optim", "train", "c.py"])
    monkeypatch.setattr(sys, "orig_argv", SPAWN_CHILD_ORIG_ARGV)
    assert _interrupt.cli_args() is None


def test_guard_not_installed_in_dataloader_spawn_workers(tmp_path):
    """Bug: a DataLoader worker (mp_start_method='spawn') of ``pygan-optim train`` re-ran
    the script as __mp_main__ with the parent's argv and installed the guard: on Ctrl-C
    each worker printed its own "pygan-optim train: interrupted; ..." line (with a
    checkpoint claim of its own) and os._exit(130)-ed."""
    script = tmp_path / "pygan-optim"  # named as the console script
    script.write_text(textwrap.dedent(f"""
        import importlib.util, multiprocessing as mp, signal, sys

        def guard():
            spec = importlib.util.spec_from_file_location("_guard", {str(INTERRUPT)!r})
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod

        def child(q):
            guard().guard_cli_start()  # what `import pygan_optim` does first
            handler = signal.getsignal(signal.SIGINT)
            q.put(bool(getattr(handler, "pygan_optim_guard", False)))

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q,))
            p.start()
            print("child guarded:", q.get())
            p.join()
    """))
    out = subprocess.run([sys.executable, str(script), "train", "c.py"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "child guarded: False"


# --- the ema_ fake refuses the weights the kernel refuses ---------------------------------

@pytest.mark.parametrize("momentum, new_weight", [(0.9, 0.9), (0.1, 0.1), (1.5, None),
                                                  (0.5, -0.5), (0.5, float("nan"))])
def test_ema_fake_checks_weights_as_the_kernel(momentum, new_weight):
    """Bug: adam_step_'s fake checked ema_new_weight, ema_'s fake checked neither weight,
    so a traced ema_ with a mistaken pair (m, m) passed where the kernel refuses it."""
    import pygan_optim  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode

    ema, params = [torch.zeros(4)], [torch.ones(4)]
    with pytest.raises(ValueError):
        torch.ops.pygan_optim.ema_(ema, params, momentum, new_weight)
    with FakeTensorMode() as mode:
        fe = [mode.from_tensor(t) for t in ema]
        fp = [mode.from_tensor(t) for t in params]
        with pytest.raises(ValueError):
            torch.ops.pygan_optim.ema_(fe, fp, momentum, new_weight)


def test_ema_fake_accepts_mmagic_weights():
    import pygan_optim  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        e, p = mode.from_tensor(torch.zeros(4)), mode.from_tensor(torch.ones(4))
        torch.ops.pygan_optim.ema_([e], [p], 1 - 1e-4, 1e-4)
        torch.ops.pygan_optim.ema_([e], [p], 0.999, None)
