"""Ctrl-C in ``pygan-optim train`` from its first line on: the one-line message, exit 130.

Both ways to run the command (the ``pygan-optim`` script and ``python -m
pygan_optim.cli``) import the package, and with it torch and MMEngine (seconds),
before :func:`pygan_optim.cli.main` runs. The package's ``__init__`` therefore calls
:func:`guard_cli_start` first: when this process is ``pygan-optim train`` it takes
SIGINT with a handler that prints the message the command prints for a later
Ctrl-C and exits 130 at once (nothing has been written yet); ``cli.train`` gives
SIGINT back to Python (:func:`release`) as its ``except KeyboardInterrupt`` takes
over. Any other import of the package leaves SIGINT alone. Standard library only:
this runs before torch is imported.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

EXIT_INTERRUPTED = 130
_SCRIPT_NAMES = ("pygan-optim", "pygan-optim.exe", "pygan-optim-script.py",
                 "pygan-optim-script.pyw")
_MODULE = "pygan_optim.cli"

_installed = False


def interrupted_message(work_dir: Optional[str], done: Optional[int] = None) -> str:
    """The line after ``pygan-optim train: `` for a Ctrl-C; ``done``: the iterations
    trained, None before the train loop was built."""
    at = f" at iter {done}" if done is not None else ""
    try:
        with open(os.path.join(work_dir, "last_checkpoint")) as f:
            last = f.read().strip()
    except (OSError, TypeError):  # TypeError: no --work-dir
        last = ""
    return f"interrupted{at}; " + (f"the last checkpoint is {last} (continue with --resume)"
                                   if last else "no checkpoint was saved")


def cli_args() -> Optional[List[str]]:
    """The command's arguments (``train ...``) when this process runs the
    ``pygan-optim`` command, else None."""
    argv = getattr(sys, "argv", None)  # (an embedded interpreter may have none)
    if not argv:
        return None
    if argv[0] == "-m":
        # python [options] -m MODULE ARGS: while the package imports, runpy has not
        # yet put MODULE's path in argv[0]; the original command line names it
        # right before ARGS (as "-m MODULE" or a "-mMODULE" token).
        orig = getattr(sys, "orig_argv", None) or []
        i = len(orig) - len(argv)
        if i < 1 or not (orig[i] == _MODULE or (orig[i].startswith("-") and not
                                                 orig[i].startswith("--") and
                                                 orig[i].endswith("m" + _MODULE))):
            return None
    elif os.path.basename(argv[0]) not in _SCRIPT_NAMES:
        return None
    else:
        # A multiprocessing spawn child (a DataLoader worker with mp_start_method
        # 'spawn') is handed its parent's sys.argv and re-runs the script as
        # __mp_main__, importing the package; its own command line (python -c ...
        # --multiprocessing-fork) does not end with these arguments.
        orig = getattr(sys, "orig_argv", None)
        n = len(argv) - 1
        if orig is not None and n and (n > len(orig) or list(orig[-n:]) != list(argv[1:])):
            return None
    return list(argv[1:])


def _work_dir(args: List[str]) -> Optional[str]:
    """``--work-dir`` as ``pygan-optim train``'s parser reads it (abbreviations
    included); None where it is missing or the arguments do not parse."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError(message)

    parser = _Parser(add_help=False)
    parser.add_argument("--work-dir")
    try:
        return parser.parse_known_args(args)[0].work_dir
    except Exception:
        return None


def guard_cli_start() -> None:
    """Takes SIGINT when this process is ``pygan-optim train`` (see the module)."""
    global _installed
    args = cli_args()
    if not args or args[0] != "train" or _installed:
        return
    try:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # ignored (a background job) or someone else's: leave it
    except (ValueError, OSError):
        return
    work_dir = _work_dir(args[1:])

    def interrupted(signum, frame):
        try:
            sys.stdout.flush()
            print(f"pygan-optim train: {interrupted_message(work_dir)}", file=sys.stderr,
                  flush=True)
        finally:
            # Exit at once: the imports under way might catch an exception (a
            # SystemExit in a bare except) and go on.
            os._exit(EXIT_INTERRUPTED)

    interrupted.pygan_optim_guard = True  # what release() looks for
    try:
        signal.signal(signal.SIGINT, interrupted)
    except (ValueError, OSError):  # not the main thread
        return
    _installed = True


def release() -> None:
    """Gives SIGINT back to Python's handler (which raises KeyboardInterrupt), the
    one the guard replaced; does nothing where the guard is not installed."""
    global _installed
    if not _installed:
        return
    try:
        if getattr(signal.getsignal(signal.SIGINT), "pygan_optim_guard", False):
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except (ValueError, OSError):
        return
    _installed = False
