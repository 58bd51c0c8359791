"""Leader election with a coordination.k8s.io Lease, as controller-runtime does it.

Every replica watches and caches; only the holder of the Lease writes. A replica that is not the
leader tries to take the Lease every `RETRY` seconds and takes it once the holder stopped renewing for
`DURATION` seconds (a killed pod) or released it (a clean shutdown, so a rollout hands over at once).
So two replicas during a rollout never both act, and `strategy: RollingUpdate` is safe.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("idpo.leader")
DURATION, RENEW, RETRY = 15, 5, 2  # seconds: lease duration, renew period, retry period of a follower


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _micro(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expired(spec: dict[str, Any], now: dt.datetime) -> bool:
    """A Lease nobody holds, or whose holder stopped renewing it."""
    if not spec.get("holderIdentity") or not spec.get("renewTime"):
        return True
    renewed = dt.datetime.fromisoformat(spec["renewTime"].replace("Z", "+00:00"))
    return (now - renewed).total_seconds() > spec.get("leaseDurationSeconds", DURATION)


class Elector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, on_elected: Callable[[], None]) -> None:
        self.leases = client.CoordinationV1Api(api)
        self.namespace, self.name = namespace, name
        self.identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self.on_elected = on_elected
        self.leader = threading.Event()
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="leader-election", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                held = self._try()
            except Exception as err:  # the apiserver may be away: a leader that cannot renew steps down
                log.warning("lease %s/%s: %s", self.namespace, self.name, err)
                held = False
            if held and not self.leader.is_set():
                log.info("became the leader (%s)", self.identity)
                self.leader.set()
                self.on_elected()
            elif not held and self.leader.is_set():
                log.warning("lost the lease: stopping work")
                self.leader.clear()
            self._stop.wait(RENEW if held else RETRY)

    def _try(self) -> bool:
        now = _now()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": DURATION, "renewTime": _micro(now)}
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace, _request_timeout=(5, 10))
        except ApiException as err:
            if err.status != 404:
                raise
            body = {"metadata": {"name": self.name}, "spec": {**spec, "acquireTime": _micro(now)}}
            try:
                self.leases.create_namespaced_lease(self.namespace, body, _request_timeout=(5, 10))
                return True
            except ApiException as race:
                if race.status == 409:
                    return False
                raise
        current = client.ApiClient().sanitize_for_serialization(lease.spec) or {}
        mine = current.get("holderIdentity") == self.identity
        if not mine and not expired(current, now):
            return False
        if not mine:
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = current.get("leaseTransitions", 0) + 1
        # The resourceVersion makes this a compare-and-swap: of two replicas, one wins.
        body = {"metadata": {"name": self.name, "resourceVersion": lease.metadata.resource_version}, "spec": spec}
        try:
            self.leases.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=(5, 10))
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def release(self) -> None:
        """On a clean shutdown: hand over now rather than after the lease expires."""
        self._stop.set()
        if not self.leader.is_set():
            return
        self.leader.clear()
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace, _request_timeout=(5, 10))
            if lease.spec.holder_identity == self.identity:
                body = {
                    "metadata": {"name": self.name, "resourceVersion": lease.metadata.resource_version},
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": DURATION},
                }
                self.leases.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=(5, 10))
        except ApiException as err:
            log.warning("could not release the lease: %s", err.reason)


def default_namespace() -> str:
    """The operator's own namespace: POD_NAMESPACE (the chart sets it), else the service account's."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    return open(path).read().strip() if os.path.exists(path) else "default"
