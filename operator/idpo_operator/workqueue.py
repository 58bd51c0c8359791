"""The operator's work queue, shaped like controller-runtime's: keys in, one reconcile per key at a time.

- A key added while it is queued is not queued twice; a key added while it is being processed is
  processed once more afterwards. A burst of watch events for one run costs one or two reconciles.
- `add(key, after=s)` looks at the key again in `s` seconds (controller-runtime's RequeueAfter: a
  start deadline that will pass), and a failed reconcile is retried with a per-key exponential backoff.
- Keys whose reconcile wanted capacity (the cap on running stages across runs) wait in arrival order
  and are let through, oldest first, when `release` says stages ended.
- Only the leader processes: a follower's workers drop what they are handed (its caches still fill,
  so that it can take over at once); `resync` queues every known key.

Its state lives in the object (a lock, a condition, a few collections), so it is tested without a cluster.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

log = logging.getLogger("idpo.queue")
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 60.0  # seconds: a failing key's first and longest wait


class Retry(Exception):
    """A failure already reported where it belongs (a run's status): retried after a backoff, logged
    without a traceback."""


@dataclass(frozen=True)
class Result:
    requeue_after: float | None = None  # seconds: process the key again then
    parked: bool = False  # it wanted capacity: let it through when a stage ends


class WorkQueue:
    def __init__(
        self,
        process: Callable[[Hashable], Result],
        *,
        workers: int = 8,
        active: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._process, self._active, self._clock = process, active, clock
        self._workers = workers
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._dirty: set[Hashable] = set()  # added while being processed
        self._delayed: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()
        self._parked: dict[Hashable, None] = {}  # insertion-ordered: oldest first
        self._failures: dict[Hashable, int] = {}
        self._stopped = False
        self._threads: list[threading.Thread] = []

    # -- producers ---------------------------------------------------------------------------------
    def add(self, key: Hashable, after: float = 0.0) -> None:
        with self._cond:
            if after > 0:
                heapq.heappush(self._delayed, (self._clock() + after, next(self._seq), key))
            else:
                self._enqueue(key)
            self._cond.notify()

    def resync(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            self.add(key)

    def release(self, count: int) -> None:
        """Stages ended: let up to `count` keys that wait for capacity try again, oldest first. They
        stay parked (keeping their place) until a reconcile of theirs no longer waits."""
        with self._cond:
            for key in list(self._parked)[:count]:
                self._enqueue(key)
            self._cond.notify_all()

    def forget(self, key: Hashable) -> None:
        """A deleted key: nothing of it stays behind (a delayed entry left in the heap is dropped when due)."""
        with self._cond:
            self._parked.pop(key, None)
            self._failures.pop(key, None)

    # -- state, for metrics and tests --------------------------------------------------------------
    def parked(self) -> list[Hashable]:
        with self._cond:
            return list(self._parked)

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._delayed) + len(self._processing)

    # -- workers -----------------------------------------------------------------------------------
    def start(self) -> None:
        for n in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"reconcile-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(5)

    def _enqueue(self, key: Hashable) -> None:  # under the lock
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)

    def _promote(self) -> float | None:
        """Queue the delayed keys that are due; seconds until the next one (None: none waits)."""
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, key = heapq.heappop(self._delayed)
            self._enqueue(key)
        return self._delayed[0][0] - now if self._delayed else None

    def take(self, timeout: float | None = None) -> Hashable | None:
        """The next key to process (it is then being processed until `done`), or None after `timeout`
        or on stop."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self._stopped:
                wait = self._promote()
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
            return None

    def done(self, key: Hashable, result: Result | None) -> None:
        """`result` None: the reconcile raised; the key is retried after a backoff."""
        with self._cond:
            self._processing.discard(key)
            if result is None:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                after: float | None = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
            else:
                self._failures.pop(key, None)
                after = result.requeue_after
                if result.parked:
                    self._parked.setdefault(key)
                else:
                    self._parked.pop(key, None)
            if key in self._dirty:
                self._dirty.discard(key)
                self._enqueue(key)
            if after is not None:
                if after > 0:
                    heapq.heappush(self._delayed, (self._clock() + after, next(self._seq), key))
                else:
                    self._enqueue(key)
            self._cond.notify()

    def _work(self) -> None:
        while (key := self.take()) is not None:
            if not self._active():
                self.done(key, Result())  # a follower writes nothing; a new leader resyncs
                continue
            try:
                result: Result | None = self._process(key)
            except Retry as err:
                log.warning("reconcile of %s: %s; retrying after a backoff", key, err)
                result = None
            except Exception:
                log.exception("reconcile of %s failed; retrying after a backoff", key)
                result = None
            self.done(key, result)
