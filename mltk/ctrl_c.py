"""Ctrl-C in a long command: never lost, and never in the middle of a file being written.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Two places go wrong:

- in a finalizer (a weakref callback, ``__del__``, the garbage collector), Python prints ``Exception ignored in ...``
  and drops it: ``remembered()`` keeps the press (and spares the user that message), for the command to ask
  ``pressed()`` at its next safe point;
- inside torch's C++ checkpoint writer, where it surfaces as a RuntimeError about the zip stream: ``deferred()``
  holds the press for the length of such a write, and raises it once the file is whole.
"""

import signal
import sys
import threading
from contextlib import contextmanager


@contextmanager
def remembered(raise_now: bool = True):
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered: yields ``pressed()``.

    ``raise_now=False``: the press is only remembered, for code that must not be cut anywhere (a library's own
    bookkeeping, such as Optuna's between trials) and asks ``pressed()`` at its safe points instead.
    Nested (``mltk tune``'s search around each trial's ``mltk run``), a press an inner block sees is every outer
    block's too, so a press the trial's finalizers dropped still stops the search. A SIGINT the caller ignores (nohup,
    a background job) stays ignored; off the main thread, which handles no signals, ``pressed()`` is always False.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield lambda: False
        return
    presses: list[int] = []
    chain = [presses, *getattr(previous, "chain", [])]  # this block's presses, then each enclosing block's

    def handler(signum, frame):
        for kept in chain:
            kept.append(signum)
        if raise_now:
            raise KeyboardInterrupt

    handler.chain = chain
    unraisable = sys.unraisablehook

    def quiet(dropped):  # Python's "Exception ignored in ..." for a press it dropped: remembered, so not shown
        if not isinstance(dropped.exc_value, KeyboardInterrupt):
            unraisable(dropped)

    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = quiet
    try:
        yield lambda: bool(presses)
    finally:
        sys.unraisablehook = unraisable
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def stop_if(pressed) -> None:
    """A press Python dropped (it landed in a finalizer) stops the command here, as one it raised would have."""
    if pressed():
        raise KeyboardInterrupt


@contextmanager
def deferred():
    """A Ctrl-C during the block (a write that must not be cut) is held, and raised as it ends: the KeyboardInterrupt
    comes after the block, never inside it. (Blocking SIGINT with ``pthread_sigmask`` is not enough: the kernel hands
    it to one of torch's other threads, and Python still raises it in the main one.)"""
    previous = signal.getsignal(signal.SIGINT)
    with remembered(raise_now=False) as pressed:
        yield
    if pressed() and callable(previous):
        previous(signal.SIGINT, None)  # as if it came now: an enclosing remembered() keeps it, then it raises
