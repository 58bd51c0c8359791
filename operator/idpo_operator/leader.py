"""Leader election with a coordination.k8s.io Lease, as client-go's leaderelection does it.

Every replica watches and caches; only the holder of the Lease writes. The timing is what makes two
writers impossible, whatever the clocks of the machines say:
- a follower takes the Lease only after it has seen the Lease record unchanged for `DURATION` seconds
  of its own monotonic clock (never by comparing the holder's renewTime with its own wall clock);
- the leader renews every `RETRY` seconds and counts itself the leader only while its last successful
  renewal began less than `RENEW_DEADLINE` seconds ago, by its own monotonic clock (which runs on while
  the process is paused, e.g. by SIGSTOP). RENEW_DEADLINE < DURATION: it stops writing before any
  follower could have taken over, and every write checks `leading()` just before it is sent;
- writes that must not be doubled also carry preconditions (apply.py), for the last instant a paused
  leader might have been between that check and the wire.
A clean shutdown releases the Lease, so a rollout hands over at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("idpo.leader")
DURATION, RENEW_DEADLINE, RETRY = 15, 10, 2  # seconds, client-go's defaults
REQUEST_TIMEOUT = (2, 4)  # shorter than the renew deadline: a hung call must not outlast it


def _micro(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        on_elected: Callable[[], None],
        *,
        identity: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.leases = client.CoordinationV1Api(api)
        self.namespace, self.name = namespace, name
        self.identity = identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self.on_elected = on_elected
        self._clock = clock
        self._renewed_at: float | None = None  # when our last successful renewal began
        self._observed: tuple[Any, ...] | None = None  # the Lease record as last seen, and since when
        self._observed_at = 0.0
        self._stop = threading.Event()

    def leading(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and self._clock() - renewed < RENEW_DEADLINE

    def start(self) -> None:
        threading.Thread(target=self._loop, name="leader-election", daemon=True).start()

    def _loop(self) -> None:
        was_leading = False
        while not self._stop.is_set():
            try:
                self._try()
            except Exception as err:  # the apiserver may be away: the renew deadline decides
                log.warning("lease %s/%s: %s", self.namespace, self.name, err)
            leading = self.leading()
            if leading and not was_leading:
                log.info("became the leader (%s)", self.identity)
                self.on_elected()
            elif was_leading and not leading:
                log.warning("lost the lease: stopping work")
            was_leading = leading
            self._stop.wait(RETRY)

    def observe(self, spec: dict[str, Any], now: float) -> bool:
        """Whether the Lease's holder may be replaced: nobody holds it, or its record has not changed
        for its duration as this process has watched it."""
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = spec.get("leaseDurationSeconds") or DURATION
        return not spec.get("holderIdentity") or now - self._observed_at > duration

    def _try(self) -> bool:
        started = self._clock()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": DURATION,
            "renewTime": _micro(dt.datetime.now(dt.UTC)),
        }
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status != 404:
                raise
            body = {"metadata": {"name": self.name}, "spec": {**spec, "acquireTime": spec["renewTime"]}}
            try:
                self.leases.create_namespaced_lease(self.namespace, body, _request_timeout=REQUEST_TIMEOUT)
            except ApiException as race:
                if race.status == 409:
                    return False
                raise
            self._renewed_at = started
            return True
        current = client.ApiClient().sanitize_for_serialization(lease.spec) or {}
        mine = current.get("holderIdentity") == self.identity
        free = self.observe(current, started)
        if not mine and not free:
            return False
        if not mine:
            spec["acquireTime"] = spec["renewTime"]
            spec["leaseTransitions"] = current.get("leaseTransitions", 0) + 1
        else:
            spec["acquireTime"] = current.get("acquireTime") or spec["renewTime"]
            spec["leaseTransitions"] = current.get("leaseTransitions", 0)
        # The resourceVersion makes this a compare-and-swap: of two replicas, one wins.
        body = {"metadata": {"name": self.name, "resourceVersion": lease.metadata.resource_version}, "spec": spec}
        try:
            self.leases.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        self._renewed_at = started
        return True

    def release(self) -> None:
        """On a clean shutdown: hand over now rather than after the lease expires."""
        self._stop.set()
        if not self.leading():
            return
        self._renewed_at = None
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace, _request_timeout=REQUEST_TIMEOUT)
            if lease.spec.holder_identity == self.identity:
                body = {
                    "metadata": {"name": self.name, "resourceVersion": lease.metadata.resource_version},
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": DURATION},
                }
                self.leases.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            log.warning("could not release the lease: %s", err.reason)


def default_namespace() -> str:
    """The operator's own namespace: POD_NAMESPACE (the chart sets it), else the service account's."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    return open(path).read().strip() if os.path.exists(path) else "default"
