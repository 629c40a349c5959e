"""Ctrl-C held back while a step's updates run.

A step makes one kernel call per param group and device, then the EMA's
bookkeeping. A Ctrl-C arriving during a call is raised as soon as it returns,
between those calls: some groups would be updated and others not, their step
counts one apart for the rest of training, or an EMA blended but not marked
so (a loop that carries on would blend it twice). Inside `ctrl_c_held` a
SIGINT is only noted; the handler it was meant for gets it when the block ends,
so a step updates every group or none, and the Ctrl-C still stops the run.
"""
import signal
import threading
from contextlib import contextmanager


@contextmanager
def ctrl_c_held(active: bool = True):
    handler = None
    if active and threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        # Off; or not the main thread (Python runs handlers there only, and its
        # step does not hold this one up); or a handler that is not Python's
        # (SIG_DFL ends the process at once, SIG_IGN drops the signal).
        yield
        return
    frames = []
    signal.signal(signal.SIGINT, lambda signum, frame: frames.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if frames:
            handler(signal.SIGINT, frames[0])  # Python's default raises KeyboardInterrupt
