"""SIGTERM and SIGINT: stop at a safe point, never half-way through a write.

A job installs the handler before anything slow starts (:func:`install`). What a
signal does then depends on where the main thread is:

- inside :func:`interruptible` (start-up, restore, compile, evaluation, an entry
  point's whole ``main``): :class:`Stop` is raised at once, and the job unwinds;
- inside :func:`deferred` (a training step, a checkpoint save): the request is only
  recorded; the loop asks :func:`requested` at its next step boundary, saves and stops;
- before the job starts (its imports and flag checks, when installed with
  ``before_start=True``): the process exits 0 at once, as nothing has been written;
- elsewhere: recorded, and raised on entering :func:`interruptible`.

Only the first signal acts; later ones are logged and ignored, so a stop in progress
(a final save) is never cut short by a second Ctrl-C. On a multi-process run jax's
preemption service owns SIGTERM (see ``train.distributed``).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
from typing import Iterator

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None
_modes: list[str] = []  # "raise" | "defer"; the innermost is last
_installed = False
_before_start = False  # exit at once: the job has not started


class Stop(BaseException):
    """A stop signal arrived where the work in progress may be abandoned.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` handlers
    on the way out do not swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_collecting = False  # a garbage collection is running (see _track_collections)
_WEAKREF_FILES = ("weakref.py", "_weakrefset.py")


def _track_collections(phase: str, info) -> None:
    del info
    global _collecting
    _collecting = phase == "start"


def _in_finalizer(frame) -> bool:
    """Whether the main thread is inside a garbage collection, a gc callback, a
    ``__del__`` or a weakref callback: places where Python prints and drops any
    exception instead of raising it."""
    if _collecting:
        return True
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if (code in callbacks or code.co_name == "__del__"
                or code.co_filename.endswith(_WEAKREF_FILES)):
            return True
        frame = frame.f_back
    return False


def _handler(signum, frame) -> None:
    global _requested
    name = signal.Signals(signum).name
    if _requested is not None:
        logging.warning("%s: already stopping", name)
        return
    raises = (_modes[-1] == "raise") if _modes else _before_start
    if raises and _in_finalizer(frame):
        # An exception raised here would be dropped: deliver the signal again shortly,
        # once the finalizer has returned.
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    _requested = signum
    if _modes and _modes[-1] == "raise":
        raise Stop(signum)
    if not _modes and _before_start:
        print(f"stopped by {name} before the job started; nothing was written", flush=True)
        raise SystemExit(0)
    logging.warning("%s: stopping at the next safe point", name)


def install(sigint: bool = True, before_start: bool = False) -> bool:
    """Installs the handler for SIGTERM and, unless ``sigint`` is False (a library
    caller keeping Ctrl-C's usual meaning), SIGINT. Main thread only; idempotent.

    ``before_start``: a job's process that has not started its work yet (see
    :func:`started`); a signal until then exits at once.
    """
    global _installed, _before_start
    if threading.current_thread() is not threading.main_thread():
        return False
    _before_start = before_start
    for signum in _SIGNALS if sigint else (signal.SIGTERM,):
        signal.signal(signum, _handler)
    if _track_collections not in gc.callbacks:
        gc.callbacks.insert(0, _track_collections)  # first: it marks the collection
    _installed = True
    return True


def started() -> None:
    """The job's work begins: from now on a signal stops it at a safe point."""
    global _before_start
    _before_start = False


def installed() -> bool:
    return _installed


def requested() -> str | None:
    """The name of the stop signal received, or None."""
    return None if _requested is None else signal.Signals(_requested).name


def reset() -> None:
    """Forgets a received signal (tests; a library caller that handled the stop)."""
    global _requested
    _requested = None


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A region a stop signal may cut short: :class:`Stop` is raised in it."""
    _modes.append("raise")
    try:
        if _requested is not None:
            raise Stop(_requested)
        yield
    finally:
        _modes.pop()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A region that must not be cut: a stop signal is only recorded."""
    _modes.append("defer")
    try:
        yield
    finally:
        _modes.pop()
