"""The work queue on its own: bursts coalesce, one reconcile per key at a time, delayed and failed keys
come back, keys waiting for capacity go through oldest first, and a follower processes nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Hashable

import pytest
from idpo_operator.workqueue import BACKOFF_FIRST, Result, Retry, WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drain(queue: WorkQueue, process, limit: int = 100) -> list[Hashable]:
    """Process what is due, in one thread, as a worker would; the keys in processing order."""
    seen = []
    for _ in range(limit):
        key = queue.take(timeout=0)
        if key is None:
            return seen
        seen.append(key)
        queue.done(key, process(key))
    raise AssertionError("the queue never ran dry")


def test_a_burst_of_events_for_one_run_costs_one_reconcile() -> None:
    queue = WorkQueue(lambda key: Result())
    for _ in range(50):
        queue.add(("ns", "a"))
    queue.add(("ns", "b"))
    assert drain(queue, lambda key: Result()) == [("ns", "a"), ("ns", "b")]


def test_an_event_during_a_reconcile_makes_exactly_one_more() -> None:
    queue = WorkQueue(lambda key: Result())
    queue.add("a")
    key = queue.take(timeout=0)
    for _ in range(10):  # the run changes while it is being reconciled
        queue.add("a")
    assert queue.take(timeout=0) is None  # never two reconciles of one key at once
    queue.done(key, Result())
    assert drain(queue, lambda k: Result()) == ["a"]


def test_workers_never_reconcile_one_key_twice_at_once_and_every_burst_is_seen() -> None:
    running: Counter[str] = Counter()
    overlaps, calls = [], Counter()
    lock = threading.Lock()

    def process(key: Hashable) -> Result:
        with lock:
            running[key] += 1
            calls[key] += 1
            if running[key] > 1:
                overlaps.append(key)
        time.sleep(0.002)
        with lock:
            running[key] -= 1
        return Result()

    queue = WorkQueue(process, workers=8)
    queue.start()
    try:
        for _ in range(200):
            for key in "abcd":
                queue.add(key)
        deadline = time.monotonic() + 10
        while queue.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        queue.stop()
    assert overlaps == [] and set(calls) == set("abcd")
    assert sum(calls.values()) < 200  # coalesced: far fewer reconciles than the 800 events


def test_a_key_asked_back_later_comes_back_when_due() -> None:
    clock = Clock()
    queue = WorkQueue(lambda key: Result(), clock=clock)
    queue.add("deadline", after=30)
    assert drain(queue, lambda k: Result()) == []
    clock.now = 31
    assert drain(queue, lambda k: Result()) == ["deadline"]
    queue.add("again")
    assert drain(queue, lambda k: Result(requeue_after=5) if clock.now < 40 else Result()) == ["again"]
    clock.now = 37
    assert drain(queue, lambda k: Result()) == ["again"]


def test_a_failing_reconcile_is_retried_with_a_growing_backoff() -> None:
    clock = Clock()
    queue = WorkQueue(lambda key: Result(), clock=clock)
    queue.add("flaky")
    waits, failed_at = [], None
    for _ in range(5):
        while (key := queue.take(timeout=0)) is None:
            clock.now += 0.125
        if failed_at is not None:
            waits.append(clock.now - failed_at)
        failed_at = clock.now
        queue.done(key, None)  # it raised
    assert waits == [pytest.approx(BACKOFF_FIRST * 2**n) for n in range(4)]
    while (key := queue.take(timeout=0)) is None:
        clock.now += 0.125
    queue.done(key, Result())  # a success resets it
    assert queue._failures == {}


def test_runs_waiting_for_capacity_go_through_oldest_first_as_stages_end() -> None:
    capacity = {"free": 0}
    started: list[str] = []

    def process(key: Hashable) -> Result:
        if capacity["free"] == 0:
            return Result(parked=True)
        capacity["free"] -= 1
        started.append(key)
        return Result()

    queue = WorkQueue(process)
    for key in ("first", "second", "third"):
        queue.add(key)
    drain(queue, process)
    assert queue.parked() == ["first", "second", "third"] and started == []
    queue.add("third")  # an event of the youngest: it is looked at, and keeps its place in line
    drain(queue, process)
    assert queue.parked() == ["first", "second", "third"]
    capacity["free"] = 1  # one stage ended
    queue.release(1)
    drain(queue, process)
    assert started == ["first"] and queue.parked() == ["second", "third"]
    capacity["free"] = 2
    queue.release(2)
    drain(queue, process)
    assert started == ["first", "second", "third"] and queue.parked() == []


def test_a_follower_processes_nothing_and_a_resync_catches_up_once_it_leads() -> None:
    leading = {"now": False}
    seen: list[Hashable] = []
    queue = WorkQueue(lambda key: seen.append(key) or Result(), workers=2, active=lambda: leading["now"])
    queue.start()
    try:
        queue.add("a")
        time.sleep(0.1)
        assert seen == []
        leading["now"] = True
        queue.resync(["a", "b"])
        deadline = time.monotonic() + 5
        while sorted(seen) != ["a", "b"] and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        queue.stop()
    assert sorted(seen) == ["a", "b"]


def test_a_reported_failure_is_retried_like_any_other() -> None:
    def process(key: Hashable) -> Result:
        raise Retry("the API refused a write; the run's status says so")

    queue = WorkQueue(process, workers=1)
    queue.start()
    try:
        queue.add("refused")
        deadline = time.monotonic() + 5
        while not queue._failures and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        queue.stop()
    assert queue._failures == {"refused": 1}


def test_a_forgotten_key_leaves_nothing_behind() -> None:
    queue = WorkQueue(lambda key: Result(parked=True))
    queue.add("deleted")
    drain(queue, lambda key: Result(parked=True))
    queue.forget("deleted")
    assert queue.parked() == [] and queue._failures == {}
