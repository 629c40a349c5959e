"""Ctrl-C held back while a step's updates run.

A step makes one kernel call per param group and device, then its bookkeeping
(the EMA's record of what it blended, the dicts a user stored as state). A
Ctrl-C arriving during a call is raised as soon as it returns: some groups
would be updated and others not, their step counts one apart for the rest of
training, or an EMA blended but not recorded so (a loop that carries on would
blend it twice). Inside `ctrl_c_held` a SIGINT is only noted; the handler it
was meant for gets it when the block ends (Python's raises KeyboardInterrupt),
so an eager step finishes every update it started, and the Ctrl-C still
stops the run.
"""
# _signal, not signal: signal's functions look each handler up in an enum,
# which costs a caught ValueError per call for a function handler (about 2.5 us
# on CPython 3.11); three of them would cost more than a small step's updates.
import _signal
import threading
from contextlib import contextmanager

_SIGINT = _signal.SIGINT


@contextmanager
def ctrl_c_held():
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = _signal.getsignal(_SIGINT)
    if not callable(handler):
        # A SIGINT is handled in the main thread only, so a step in another
        # thread is not cut short by it; SIG_DFL ends the process at once and
        # SIG_IGN drops the signal: nothing of Python's to hold back.
        yield
        return
    noted = []
    try:
        _signal.signal(_SIGINT, lambda signum, frame: noted.append(frame))
    except ValueError:  # not the main interpreter's main thread
        yield
        return
    try:
        yield
    finally:
        _signal.signal(_SIGINT, handler)
        if noted:
            handler(_SIGINT, noted[0])
