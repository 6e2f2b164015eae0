"""The stop-signal modes: raised where work may be abandoned, recorded where it may not."""
import gc
import os
import signal
import time

import pytest

from dalle_jax import signals


@pytest.fixture
def handler():
    previous = signal.getsignal(signal.SIGTERM)
    signals.reset()
    assert signals.install(sigint=False)
    yield
    signal.signal(signal.SIGTERM, previous)
    signals.reset()


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def test_interruptible_region_raises_stop(handler):
    reached = []
    with pytest.raises(signals.Stop) as stop:
        with signals.interruptible():
            _sigterm()
            reached.append("after")  # the handler runs before the next bytecode
    assert stop.value.name == "SIGTERM" and not reached
    assert signals.requested() == "SIGTERM"


def test_deferred_region_only_records_and_the_next_interruptible_raises(handler):
    with signals.interruptible():
        with signals.deferred():
            _sigterm()
            assert signals.requested() == "SIGTERM"  # noted, work goes on
        with pytest.raises(signals.Stop):
            with signals.interruptible():
                pass


def test_a_second_signal_is_ignored(handler):
    with pytest.raises(signals.Stop):
        with signals.interruptible():
            _sigterm()
    # Clean-up after the stop runs in a deferred region; a second signal, even inside
    # an interruptible part of it, is only logged.
    with signals.deferred():
        _sigterm()
    signals._modes.append("raise")  # as if inside an interruptible region
    try:
        _sigterm()
    finally:
        signals._modes.pop()
    assert signals.requested() == "SIGTERM"


def test_outside_any_region_the_signal_waits_for_the_first_interruptible(handler):
    _sigterm()
    assert signals.requested() == "SIGTERM"
    with pytest.raises(signals.Stop):
        with signals.interruptible():
            pass


def test_stop_is_not_swallowed_by_except_exception(handler):
    with pytest.raises(signals.Stop):
        with signals.interruptible():
            try:
                _sigterm()
            except Exception:  # pylint: disable=broad-except
                pytest.fail("Stop must pass through `except Exception`")


def test_a_signal_inside_a_finalizer_is_delivered_again(handler):
    # An exception raised inside a gc callback is printed and dropped by Python; the
    # stop must still happen, just after the callback.
    sent = []

    def callback(phase, info):
        del info
        if phase == "start" and not sent:
            sent.append(True)
            _sigterm()

    gc.callbacks.append(callback)
    try:
        with pytest.raises(signals.Stop):
            with signals.interruptible():
                gc.collect()
                time.sleep(2)  # the signal comes again here
    finally:
        gc.callbacks.remove(callback)
    assert sent
