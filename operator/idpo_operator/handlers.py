"""kopf handlers: indexes that cache what the watches see, and handlers that only name the run to
reconcile; `apply.reconcile_run` does the rest from the caches.

kopf run --standalone -m idpo_operator.handlers --namespace ml      # or: idpo operator
"""

from __future__ import annotations

import logging
import random
from typing import Any

import kopf

from idpo_operator import apply
from idpo_operator.resources import ANNOTATION_RUN, LABEL_RUN
from idpo_operator.spec import GROUP, PLURAL, VERSION

RUNS = (GROUP, VERSION, PLURAL)
OURS = {LABEL_RUN: kopf.PRESENT}
SAFETY_NET_SECONDS = 30.0
FINISHED = ("Succeeded", "Failed")


def plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists: index entries must not change under a reader.
    managedFields are dropped: large, and nothing here reads them."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items() if k != "managedFields"}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's bookkeeping goes to annotations, so `status` stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="idpo.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="idpo.dev")
    settings.posting.level = logging.WARNING  # our own events tell the run's story
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # Handlers mostly wait on API writes: more threads than cores keep hand-offs from queueing.
    settings.execution.max_workers = apply.POOL
    apply.connect()
    if apply.settings.lease_namespace:
        apply.elect(apply.settings.lease_namespace)


@kopf.on.cleanup()
def hand_over(**_: Any) -> None:
    apply.step_down()  # a rollout's next replica takes over at once, not after the lease expires


# -- the caches: reconciles read these, never the API ------------------------------------------------
@kopf.index(*RUNS)
def runs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): plain(body)}


@kopf.index("batch", "v1", "jobs", labels=OURS)
def jobs(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_RUN]): {k: plain(body.get(k, {})) for k in ("metadata", "status")}}


@kopf.index("", "v1", "pods", labels=OURS)
def pods(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_RUN]): {k: plain(body.get(k, {})) for k in ("metadata", "status")}}


def _reconcile(namespace: str, name: str, kwargs: dict[str, Any]) -> None:
    apply.reconcile_run(namespace, name, apply.Cache(kwargs["runs"], kwargs["jobs"], kwargs["pods"]))


# -- triggers ----------------------------------------------------------------------------------------
@kopf.on.resume(*RUNS)
@kopf.on.create(*RUNS)
@kopf.on.update(*RUNS)
def run_changed(name: str, namespace: str, **kwargs: Any) -> None:
    _reconcile(namespace, name, kwargs)


def _waiting(status: dict[str, Any], **_: Any) -> bool:
    return status.get("phase") == "Pending"


@kopf.on.event("batch", "v1", "jobs", labels=OURS)
@kopf.on.event("", "v1", "pods", labels=OURS, when=_waiting)  # why a pod waits; its Job tells the rest
def child_changed(annotations: dict[str, str], labels: dict[str, str], namespace: str, **kwargs: Any) -> None:
    # The annotation holds the full name; the label is shortened for names over 63 characters.
    _reconcile(namespace, annotations.get(ANNOTATION_RUN) or labels[LABEL_RUN], kwargs)
    apply.release_queued(apply.Cache(kwargs["runs"], kwargs["jobs"], kwargs["pods"]))


@kopf.timer(
    *RUNS,
    interval=SAFETY_NET_SECONDS,
    initial_delay=lambda **_: random.uniform(SAFETY_NET_SECONDS / 2, SAFETY_NET_SECONDS),  # spread, not in step
    when=lambda status, **_: status.get("phase") not in FINISHED,
)
def safety_net(name: str, namespace: str, **kwargs: Any) -> None:
    """For active runs only: catches a missed watch event and a pod's start deadline passing."""
    _reconcile(namespace, name, kwargs)


@kopf.on.probe(id="reconciles")
def reconciles(**_: Any) -> int:
    return apply.reconciles
