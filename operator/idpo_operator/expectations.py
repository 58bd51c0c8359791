"""What this operator wrote that its watches have not shown yet (KubeRay's "expectations").

Reads come from caches fed by watch streams, which lag our own writes by a moment. Two records bridge
the gap, one per run:
- the Jobs it created, until the cache shows them: a reconcile in between must neither create one
  again nor count it out of the cap on running stages;
- the status it last wrote, with the resourceVersion the write made: until the cached run is at least
  that version, our write is the truth (else a reconcile would redo a transition from a stale status,
  posting its events twice).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from idpo_operator.observe import JobView

FORGET_AFTER = 60.0  # seconds: a created Job the cache never showed (deleted at once?) stops counting


def older(cached: str, written: str) -> bool:
    """Whether the cached object predates our write. resourceVersions are etcd revisions, integers that
    only grow; were they ever not, only the version our write replaced counts as older."""
    try:
        return int(cached) < int(written)
    except ValueError:
        return False


class Expectations:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._jobs: dict[Hashable, dict[str, tuple[float, JobView]]] = {}
        self._status: dict[Hashable, tuple[str, dict[str, Any]]] = {}

    def created(self, run: Hashable, job: JobView) -> None:
        with self._lock:
            self._jobs.setdefault(run, {})[job.name] = (self._clock(), job)

    def cancel(self, run: Hashable, names: list[str]) -> None:
        """Creates that did not happen (the API refused a write of the reconcile)."""
        with self._lock:
            for name in names:
                self._jobs.get(run, {}).pop(name, None)

    def jobs(self, run: Hashable, cached: list[JobView]) -> list[JobView]:
        """The run's Jobs: the cache's, and those created since that it does not show yet."""
        seen = {j.name for j in cached}
        with self._lock:
            mine = self._jobs.get(run, {})
            for name in [n for n, (when, _) in mine.items() if n in seen or self._clock() - when > FORGET_AFTER]:
                del mine[name]
            if not mine:
                self._jobs.pop(run, None)
            return [*cached, *(job for _, job in mine.values())]

    def in_flight(self, cached: set[str]) -> int:
        """Created Jobs across runs that are not among the cached Job names: running, for the cap."""
        with self._lock:
            now = self._clock()
            return sum(
                1
                for jobs in self._jobs.values()
                for name, (when, _) in jobs.items()
                if name not in cached and now - when <= FORGET_AFTER
            )

    def wrote(self, run: Hashable, resource_version: str, status: dict[str, Any]) -> None:
        with self._lock:
            self._status[run] = (resource_version, status)

    def written(self, run: Hashable, resource_version: str) -> bool:
        """Whether `resource_version` of the run is the one our last status write made."""
        with self._lock:
            return bool(resource_version) and self._status.get(run, ("",))[0] == resource_version

    def status(self, run: Hashable, cached_version: str, cached: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
        """(resourceVersion, status) as a decision must read them: our write's, while the cache is behind it."""
        with self._lock:
            version, written = self._status.get(run, ("", {}))
            if version and older(cached_version, version):
                return version, written
            self._status.pop(run, None)
            return cached_version, cached

    def forget(self, run: Hashable) -> None:
        """A deleted run leaves nothing behind."""
        with self._lock:
            self._jobs.pop(run, None)
            self._status.pop(run, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs) + len(self._status)
