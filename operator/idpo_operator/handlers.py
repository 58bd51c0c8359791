"""kopf handlers: indexes that cache what the watches see, and handlers that only name the run to
reconcile. `apply.Controller` (in kopf's memo) does the rest from the caches, in its own workers.

    kopf run --standalone -m idpo_operator.handlers --namespace ml      # or: idpo operator

What kopf itself writes to a run is nothing at all: the handlers are event handlers and indexes only,
which keep no progress or diff-base annotations and need no finalizer, and kopf posts no events. So a
follower replica writes nothing, and a run's cost is our own four writes per stage hand-off. Jobs and
Pods are watched with the run label as a server-side selector: the operator never receives the
cluster's other Jobs and Pods. The Job controller reports a pod the apiserver refused (Pod Security, a
quota, a webhook) only as a `FailedCreate` Event on the Job: Events are watched too, selected by the
server (involvedObject kind Job, reason FailedCreate). Handlers are coroutines: an event costs no thread
hop.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from idpo_operator import apply, observe, queueing
from idpo_operator.reconcile import RETRY_ANNOTATION, RunView, cached_spec
from idpo_operator.resources import ANNOTATION_RUN, LABEL_RUN
from idpo_operator.spec import GROUP, PLURAL, VERSION

RUNS = (GROUP, VERSION, PLURAL)
JOBS = ("batch", "v1", "jobs")
PODS = ("", "v1", "pods")
EVENTS = ("", "v1", "events")
KUEUE = "kueue.x-k8s.io"
WORKLOADS = (KUEUE, "v1beta2", "workloads")
LOCAL_QUEUES = (KUEUE, "v1beta2", "localqueues")
OURS = {LABEL_RUN: kopf.PRESENT}
# kopf removes its finalizer from any object no handler needs it for: in every replica, followers too.
# Pointed at a name nobody sets, it never touches finalizers; the leader removes the one that operators
# before 0.2 set (apply.LEGACY_FINALIZER).
UNUSED_FINALIZER = "idpo.dev/kopf-unused"

options = apply.Settings()  # the CLI sets it from its flags before kopf starts


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf builds one for every event of every watched object (a deep copy of the whole
    body, status included) for change handlers to diff against. There are none here, only event and
    index handlers, so the copy was a third of kopf's cost per event and nothing read it."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    runs: kopf.Index[Any, Any],
    jobs: kopf.Index[Any, Any],
    pods: kopf.Index[Any, Any],
    **indexes: Any,
) -> None:
    settings.persistence.finalizer = UNUSED_FINALIZER
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.enabled = False  # our own events tell the run's story
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # a line per event is much of kopf's cost
    for resource in (JOBS, PODS, WORKLOADS):  # Kueue copies the label onto Workloads (docs/kueue.md)
        settings.watching.label_selectors[resource] = LABEL_RUN  # the label exists: ours only
    # Events carry no labels: the Job controller's refusals of Jobs' pods only, selected by the server.
    settings.watching.field_selectors[EVENTS] = observe.FAILED_CREATE_SELECTOR
    api = apply.connect()
    queues = indexes.get("workloads"), indexes.get("local_queues")
    cache = apply.Cache(runs, jobs, pods, *queues, failed_creates=indexes.get("failed_creates"))
    memo.controller = apply.Controller(options, cache, api)
    memo.controller.start()


@kopf.on.cleanup()
async def hand_over(memo: kopf.Memo, **_: Any) -> None:
    memo.controller.stop()


# -- the caches: reconciles read these, never the API ------------------------------------------------
@kopf.index(*RUNS)
async def runs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    meta = body["metadata"]
    spec, size = cached_spec(body.get("spec"))
    view = RunView(
        name=name,
        namespace=namespace,
        uid=meta["uid"],
        generation=meta.get("generation", 1),
        spec=spec,
        spec_bytes=size,
        status=body.get("status") or {},
        resource_version=meta.get("resourceVersion", ""),
        deleting=bool(meta.get("deletionTimestamp")),
        retry=(meta.get("annotations") or {}).get(RETRY_ANNOTATION),
        finalizers=tuple(meta.get("finalizers") or ()),
    )
    return {(namespace, name): view}


@kopf.index(*JOBS, labels=OURS)
async def jobs(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_RUN]): observe.job_view(body)}


@kopf.index(*PODS, labels=OURS)
async def pods(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_RUN]): observe.pod_view(body)}


@kopf.index(*EVENTS)
async def failed_creates(namespace: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """Why a Job has no pods: the Job controller's FailedCreate Events, by Job uid. Events of other
    Jobs of the namespace come too (Events have no labels to select ours by); they are few (one object
    per Job and message, its count bumped) and expire with the Events (an hour by default)."""
    failure = observe.create_failure(body)
    return {(namespace, failure.job_uid): failure} if failure else {}


# -- triggers ----------------------------------------------------------------------------------------
@kopf.on.event(*RUNS)
async def run_changed(name: str, namespace: str, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.run_changed((namespace, name), meta.get("resourceVersion", ""))


def _run_of(annotations: dict[str, str], labels: dict[str, str]) -> str:
    """The annotation holds the run's full name; the label is shortened for names over 63 characters."""
    return annotations.get(ANNOTATION_RUN) or labels[LABEL_RUN]


@kopf.on.event(*JOBS, labels=OURS)
async def job_changed(
    type: str | None,
    annotations: dict[str, str],
    labels: dict[str, str],
    namespace: str,
    body: kopf.Body,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    memo.controller.job_changed((namespace, _run_of(annotations, labels)), observe.job_view(body), type == "DELETED")


def _waiting(status: dict[str, Any], **_: Any) -> bool:
    return status.get("phase") == "Pending"


@kopf.on.event(*PODS, labels=OURS, when=_waiting)  # why a pod waits; its Job tells the rest
async def pod_changed(
    annotations: dict[str, str], labels: dict[str, str], namespace: str, memo: kopf.Memo, **_: Any
) -> None:
    memo.controller.changed((namespace, _run_of(annotations, labels)))


@kopf.on.event(*EVENTS)
async def create_failed(type: str | None, namespace: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    failure = observe.create_failure(body)
    if failure is not None and type != "DELETED":
        memo.controller.create_failed(namespace, failure.job_uid)


@kopf.on.probe(id="reconciles")
async def reconciles(memo: kopf.Memo, **_: Any) -> int:
    return memo.controller.reconciles


# -- Kueue (registered by `watch_kueue`, when the operator is started with --kueue) ------------------
async def workloads(namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels[LABEL_RUN]): queueing.workload_view(body)}


async def local_queues(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[Any, Any]:
    return {namespace: (name, spec.get("clusterQueue"))}


async def workload_changed(namespace: str, labels: dict[str, str], memo: kopf.Memo, **_: Any) -> None:
    memo.controller.changed_label(namespace, labels[LABEL_RUN])


def watch_kueue() -> None:
    """Why a stage waits in Kueue's queue, and whether it was preempted: from Workloads and LocalQueues.
    Watches that find no Kueue resources (Kueue not installed) wait for them quietly."""
    kopf.index(*WORKLOADS, labels=OURS)(workloads)
    kopf.index(*LOCAL_QUEUES)(local_queues)
    kopf.on.event(*WORKLOADS, labels=OURS)(workload_changed)
