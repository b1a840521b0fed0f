"""Ctrl-C that stops a training run between two steps.

Python runs its SIGINT handler in the main thread, but the kernel hands the signal to any
thread that does not block it. When it lands in one of TensorFlow's worker threads, the step
that is running can wait forever: the SIGINT test hung inside the step call in about one run
in twenty. So the entry scripts call ``install()`` before TensorFlow starts its threads: it
blocks SIGINT in every thread (threads inherit the mask) and one waiting thread receives it.

- While a training loop runs inside ``deferred()``, the first Ctrl-C only sets a flag: the
  loop finishes its step, writes a checkpoint and raises KeyboardInterrupt itself
  (``check()``). A second Ctrl-C interrupts the main thread at once.
- Otherwise (data preparation, testing) Ctrl-C raises KeyboardInterrupt in the main thread,
  as Python normally does.

Without ``install()`` (library use, tests in one process) nothing changes: Python's own
handler raises KeyboardInterrupt and the training loop catches it as before.
"""
from __future__ import annotations

import _thread
import contextlib
import signal
import threading

_requested = threading.Event()
_lock = threading.Lock()
_state = {"installed": False, "deferring": 0}


def install() -> bool:
    """Route SIGINT to one waiting thread; returns whether it did (main thread, POSIX only)."""
    with _lock:
        if _state["installed"]:
            return True
        if (threading.current_thread() is not threading.main_thread()
                or not hasattr(signal, "pthread_sigmask")
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return False
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        threading.Thread(target=_wait, name="sigint", daemon=True).start()
        _state["installed"] = True
        return True


def _wait() -> None:
    while True:
        signal.sigwait({signal.SIGINT})
        with _lock:
            defer = _state["deferring"] > 0 and not _requested.is_set()
            if defer:
                _requested.set()
        if not defer:
            _thread.interrupt_main()


@contextlib.contextmanager
def deferred():
    """Within this block a first Ctrl-C is only recorded; poll it with ``check()``."""
    with _lock:
        _state["deferring"] += 1
        _requested.clear()
    try:
        yield
    finally:
        with _lock:
            _state["deferring"] -= 1
            _requested.clear()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside ``deferred()``."""
    if _requested.is_set():
        raise KeyboardInterrupt
