"""Ends a training process that stopped making progress, instead of letting it hang.

On a multi-process run a dead or stuck worker leaves the others waiting inside a
collective, in C++, forever: no Python exception ever reaches them. :class:`Watchdog`
is a daemon thread with a deadline. The loop tells it when a step completes
(:meth:`Watchdog.progress`) and what it is doing (:meth:`Watchdog.doing`); if nothing
completes for ``seconds``, the thread logs the last completed step and what the loop
was waiting on, dumps every thread's Python stack (:mod:`faulthandler`) to stderr and
ends the process with :data:`EXIT_CODE` through ``os._exit``, which works whatever the
main thread is blocked in. A launcher (SLURM, a pod's job controller) then sees the
failure and can restart the job, which resumes from its latest checkpoint.

What counts as progress is the loop's choice (see ``trainer._train``), deliberately:

- a step's metrics arriving on the host (they are fetched one step late, and the fetch
  blocks until the device has finished that step; nothing else waits on the device);
- each evaluation batch (its metrics are fetched), so an evaluation of any length is
  fine while its batches complete, and a hang inside one is caught too; the first batch
  includes the evaluation step's compile;
- the end of a checkpoint save and of the image summaries, each of which must finish
  within the limit;
- the start of the clean-up when the run ends, which then has a whole period to write
  the final checkpoint and release the input.

It is armed once the first step has completed: start-up, the checkpoint restore and the
first step's compilation are never watched (a dead process then shows up at the first
collective, where jax's own start-up timeouts apply).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable

from absl import logging

# The exit status of a process the watchdog ended (0: done or stopped by a signal,
# 1: an error, 2: a mistake in the command).
EXIT_CODE = 3
# How long the report (log line, stacks) may take before the process exits anyway: a
# stderr pipe that nobody reads must not turn the watchdog itself into a hang.
REPORT_SECONDS = 30.0


class Watchdog:
    """A deadline, moved on by :meth:`progress`; past it the process exits.

    ``seconds <= 0`` disables it: :meth:`arm` starts no thread and every method is a
    no-op. ``on_expire(message)`` replaces the exit (for tests).
    """

    def __init__(self, seconds: float, *, exit_code: int = EXIT_CODE,
                 on_expire: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds)
        self.exit_code = exit_code
        self._on_expire = on_expire
        self._clock = clock
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_step: int | None = None
        self._doing = "starting"
        self._last_progress = clock()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    @property
    def armed(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def arm(self) -> None:
        """Starts the deadline (now + ``seconds``) and its thread; once."""
        if not self.enabled or self._thread is not None:
            return
        with self._lock:
            self._last_progress = self._clock()
        self._thread = threading.Thread(target=self._watch, name="training-watchdog",
                                        daemon=True)
        self._thread.start()

    def progress(self, step: int | None = None) -> None:
        """Something completed now (step ``step``, when given): the deadline moves on."""
        with self._lock:
            self._last_progress = self._clock()
            if step is not None:
                self._last_step = step

    def doing(self, what: str) -> None:
        """What the loop does next, for the report; not progress by itself."""
        with self._lock:
            self._doing = what

    def stop(self) -> None:
        """Ends the thread (waits for it); the watchdog cannot fire afterwards."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def message(self) -> str:
        with self._lock:
            last, doing, since = self._last_step, self._doing, self._last_progress
        last_text = "none" if last is None else str(last)
        return (f"watchdog: no training progress for {self._clock() - since:.0f} s "
                f"(config.train.watchdog_seconds={self.seconds:g}); last completed step "
                f"{last_text}; waiting on: {doing}. Another process may have died or hung. "
                f"Python stacks follow; exiting with status {self.exit_code}")

    def _watch(self) -> None:
        while True:
            with self._lock:
                remaining = self._last_progress + self.seconds - self._clock()
            if remaining <= 0:
                break
            if self._stopped.wait(remaining):
                return
        if self._stopped.is_set():
            return
        message = self.message()
        if self._on_expire is not None:
            self._on_expire(message)
            return
        reporter = threading.Thread(target=_report, args=(message,), daemon=True)
        reporter.start()
        reporter.join(REPORT_SECONDS)
        os._exit(self.exit_code)  # pylint: disable=protected-access


def _report(message: str) -> None:
    """The message (absl logging, to stderr in the entry points), every thread's
    stack, and whatever the console has buffered."""
    for flush in (sys.stdout.flush, sys.stderr.flush):
        try:
            flush()
        except Exception:  # pylint: disable=broad-except
            pass
    logging.error("%s", message)
    logging.flush()
    try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    except (AttributeError, OSError, ValueError):  # stderr without a file descriptor
        faulthandler.dump_traceback(file=2, all_threads=True)
    try:
        sys.stderr.flush()
    except Exception:  # pylint: disable=broad-except
        pass
