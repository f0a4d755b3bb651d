"""The garbage collector's pause around encoding: counted across threads, and it leaves the
collector as it found it."""

from __future__ import annotations

import gc
import threading

from airouter.core.gcpause import collection_paused


def test_overlapping_pauses_end_with_the_last_and_restore_the_collector() -> None:
    assert gc.isenabled()
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with collection_paused():
            entered.set()
            release.wait(10)

    with collection_paused():
        assert not gc.isenabled()
        thread = threading.Thread(target=other)
        thread.start()
        assert entered.wait(10)
    assert not gc.isenabled()  # the other thread's pause still holds
    release.set()
    thread.join(10)
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off_and_errors_still_resume_it() -> None:
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    try:
        with collection_paused():
            raise KeyError("boom")
    except KeyError:
        pass
    assert gc.isenabled()
