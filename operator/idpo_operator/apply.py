"""The only module that writes to the Kubernetes API: observe a run, decide, apply.

Reads come from kopf's in-memory indexes (handlers.py), fed by the watch streams: a reconcile
makes no GET or LIST. Writes go through one shared, pooled API client with timeouts. Children are
created if absent (ownership is checked by uid in the decision), the status is written once per reconcile
through the status subresource and only when it changed, and events are posted after the status
write succeeded. A failed write lands in status (condition `ApplyFailed` with the API's message)
before the error is raised for kopf to retry.

Reconciles of one run are serialized and coalesced: a request that arrives while one runs marks the
run dirty, and the running reconcile goes round once more, so a burst of events costs one or two.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from idpo_operator import leader, memory, metrics, reconcile, resources
from idpo_operator.spec import API_VERSION, DEFAULT_STAGE_IMAGE, GROUP, KIND, PLURAL, VERSION
from idpo_operator.status import Reason, conditions, timestamp

log = logging.getLogger("idpo.operator")
POOL = 32  # = kopf's handler threads (handlers.py)
TIMEOUT = (5, 30)  # seconds: connect, read. A hung apiserver must not hang a reconcile forever.
reconciles = 0  # reported by the liveness probe


@dataclass
class Settings:
    stage_image: str = DEFAULT_STAGE_IMAGE
    lease_namespace: str | None = None  # None: no leader election (one replica, or local development)
    max_concurrent_stages: int = 0  # across all runs; 0: no cap (Kueue, if any, queues them instead)
    gpu_memory_gb: float = 80  # what status.memoryPlan is checked against


settings = Settings()
_api: client.ApiClient | None = None


def connect() -> None:
    global _api
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # One pooled client for every write (kopf has its own for watches), with as many kept-alive
    # connections as handler threads: a connection dropped from a full pool is a TLS handshake later.
    configuration.connection_pool_maxsize = POOL
    _api = client.ApiClient(configuration)


def api() -> client.ApiClient:
    if _api is None:
        connect()
    return _api  # type: ignore[return-value]


@dataclass
class Cache:
    """What the watches have seen, as kopf indexes keyed by (namespace, run name or label)."""

    runs: Mapping[Any, Any]
    jobs: Mapping[Any, Any]
    pods: Mapping[Any, Any]

    def one(self, index: Mapping[Any, Any], key: tuple[str, str]) -> list[dict[str, Any]]:
        return [dict(o) for o in index.get(key, [])]


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    dirty: bool = False


_slots: dict[tuple[str, str], _Slot] = {}
_slots_lock = threading.Lock()
# The status we last wrote per run, with the resourceVersion the write made: until the cache shows
# that version of the run, our own write is the truth (else a reconcile would redo a transition
# from a stale status, posting its events twice).
_written: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}


class ApplyError(Exception):
    """A write the API refused; the run's status already says so, and kopf retries."""


def _create(obj: dict[str, Any]) -> None:
    ns, kind, name = obj["metadata"]["namespace"], obj["kind"], obj["metadata"]["name"]
    core, batch = client.CoreV1Api(api()), client.BatchV1Api(api())
    create = {
        "PersistentVolumeClaim": core.create_namespaced_persistent_volume_claim,
        "ConfigMap": core.create_namespaced_config_map,
        "Service": core.create_namespaced_service,
        "Job": batch.create_namespaced_job,
    }[kind]
    try:
        create(ns, obj, _preload_content=False, _request_timeout=TIMEOUT)
        log.info("created %s %s/%s", kind, ns, name)
    except ApiException as err:
        # Already there: ours (a restarted operator, a cache a moment behind), or a Job of another
        # run of this name, which the next reconcile sees in the cache and refuses to use.
        if err.status != 409:
            raise


def _delete_job(batch: client.BatchV1Api, name: str, namespace: str, propagation: str) -> None:
    try:
        batch.delete_namespaced_job(name, namespace, propagation_policy=propagation, _request_timeout=TIMEOUT)
    except ApiException as err:
        if err.status != 404:  # gone already: what was asked
            raise


def _post_event(run: dict[str, Any], event: reconcile.Event) -> None:
    meta = run["metadata"]
    now = timestamp()
    body = {
        "metadata": {"generateName": f"{meta['name'][:200]}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": "idpo-operator"},
        "reportingComponent": "idpo-operator",
    }
    try:
        client.CoreV1Api(api()).create_namespaced_event(
            meta["namespace"], body, _preload_content=False, _request_timeout=TIMEOUT
        )
    except ApiException as err:  # events are best effort; status already holds the record
        log.warning("could not post event %s: %s", event.reason, err.reason)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that also removes keys the new status no longer has."""
    return {"status": {**{k: None for k in old if k not in new}, **new}}


def _patch_status(namespace: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """Patch the status; the run's resourceVersion after the write."""
    patched = client.CustomObjectsApi(api()).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, status_patch(old, new), _request_timeout=TIMEOUT
    )
    return patched["metadata"]["resourceVersion"]


def _older(cached: str, written: str) -> bool:
    """Whether the cached run predates our write. resourceVersions are etcd revisions, integers that
    only grow; were they ever not, only the version our write replaced counts as older."""
    try:
        return int(cached) < int(written)
    except ValueError:
        return False


def _api_message(err: Exception) -> str:
    if isinstance(err, ApiException):
        try:
            return json.loads(err.body)["message"]
        except (TypeError, ValueError, KeyError):
            return f"{err.status} {err.reason}"
    return str(err)


def failed_write_status(status: dict[str, Any], message: str, generation: int) -> dict[str, Any]:
    """The decided status, but Stalled with the API's refusal; observedGeneration still advances."""
    now = timestamp()
    text = f"API write failed: {message}"[:1000]
    return {
        **status,
        "message": text,
        "observedGeneration": generation,
        "conditions": conditions(
            status.get("phase", "Pending"), Reason.APPLY_FAILED, text, now, generation, status.get("conditions"), True
        ),
    }


_elector: leader.Elector | None = None
_latest: Cache | None = None  # what a new leader resyncs from


def elect(namespace: str, lease: str = "idpo-operator") -> None:
    """Act only while holding the Lease; on becoming the leader, reconcile every cached run."""
    global _elector
    _elector = leader.Elector(api(), namespace, lease, on_elected=_resync)
    _elector.start()


def step_down() -> None:
    if _elector is not None:
        _elector.release()


def _resync() -> None:
    cache = _latest
    for namespace, name in list(cache.runs.keys()) if cache is not None else []:
        try:
            reconcile_run(namespace, name, cache)
        except Exception as err:  # the handlers and the safety net retry it
            log.warning("resync of %s/%s: %s", namespace, name, err)


_inflight: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # (namespace, run label) -> created Jobs
_events = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="events")
_capacity_lock = threading.Lock()
_started: dict[str, float] = {}  # Jobs this process created, until the cache shows them
_queued: dict[tuple[str, str], None] = {}  # runs waiting for capacity, in arrival order


def _active(job: dict[str, Any]) -> bool:
    done = {c["type"] for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"}
    return not done & {"Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"}


def _has_capacity(cache: Cache) -> bool:
    if not settings.max_concurrent_stages:
        return True
    seen = {j["metadata"]["name"]: j for jobs in cache.jobs.values() for j in jobs}
    for name, when in list(_started.items()):
        if name in seen or time.monotonic() - when > 60:
            _started.pop(name)
    running = sum(_active(j) for j in seen.values()) + len(_started)
    return running < settings.max_concurrent_stages


def release_queued(cache: Cache) -> None:
    """A stage Job ended: let the runs waiting for capacity try again, oldest first."""
    for key in list(_queued):
        if not _has_capacity(cache):
            break
        reconcile_run(*key, cache)


def reconcile_run(namespace: str, name: str, cache: Cache) -> None:
    """Reconcile one run now, or leave it to the reconcile of it already running (coalescing)."""
    global _latest
    _latest = cache
    if _elector is not None and not _elector.leader.is_set():
        return  # a follower watches and caches, and writes nothing
    key = (namespace, name)
    _queued.pop(key, None)
    with _slots_lock:
        slot = _slots.setdefault(key, _Slot())
        slot.dirty = True
    if not slot.lock.acquire(blocking=False):
        return  # the holder sees `dirty` and goes round again
    try:
        while True:
            with _slots_lock:
                if not slot.dirty:
                    break
                slot.dirty = False
            try:
                if _reconcile(namespace, name, cache):
                    with _slots_lock:
                        slot.dirty = True
            except Exception:
                metrics.ERRORS.inc()
                raise
    finally:
        slot.lock.release()


def _reconcile(namespace: str, name: str, cache: Cache) -> bool:
    """Whether the run needs another reconcile at once (Decision.again)."""
    global reconciles
    found = cache.one(cache.runs, (namespace, name))
    if not found:
        metrics.forget((namespace, name))
        return False
    run = found[0]
    meta = run["metadata"]
    if meta.get("deletionTimestamp"):
        metrics.forget((namespace, name))
        _written.pop((namespace, name), None)
        _inflight.pop((namespace, resources.run_label(name)), None)
        return False
    status = run.get("status") or {}
    version, written = _written.get((namespace, name), ("", {}))
    if version and _older(meta.get("resourceVersion", ""), version):
        status = written
    view = reconcile.RunView(name, namespace, meta["uid"], meta.get("generation", 1), run.get("spec") or {}, status)
    label = (namespace, resources.run_label(name))
    jobs = cache.one(cache.jobs, label)
    # Jobs this process created that the cache does not show yet: present, not to be created again.
    seen = {j["metadata"]["name"] for j in jobs}
    inflight = _inflight.setdefault(label, {})
    for job_name in [n for n in inflight if n in seen]:
        del inflight[job_name]
    jobs += list(inflight.values())
    with _capacity_lock:  # the count and the create, as one step across runs
        capacity = _has_capacity(cache)
        decision = reconcile.decide(
            view,
            jobs,
            cache.one(cache.pods, label),
            stage_image=settings.stage_image,
            capacity=capacity,
            gpu_memory=settings.gpu_memory_gb * memory.GB,
        )
        for obj in decision.create:
            if obj["kind"] == "Job":
                _started[obj["metadata"]["name"]] = time.monotonic()
    if not capacity:
        _queued.setdefault((namespace, name), None)
    batch = client.BatchV1Api(api())
    writes: list[Callable[[], None]] = [lambda o=o: _create(o) for o in decision.create]
    for job, why in decision.fail.items():
        # The Job controller fails a Job past its deadline and removes its pods: the GPUs go back.
        body = {"metadata": {"annotations": {resources.ANNOTATION_FAILURE: why}}, "spec": {"activeDeadlineSeconds": 1}}
        writes.append(lambda j=job, b=body: batch.patch_namespaced_job(j, namespace, b, _request_timeout=TIMEOUT))
    for job in decision.delete:
        writes.append(lambda j=job: _delete_job(batch, j, namespace, "Background"))
    for job in decision.restart:
        # Foreground: the Job goes only after its pods have, so the next attempt never meets one of them.
        writes.append(lambda j=job: _delete_job(batch, j, namespace, "Foreground"))
    try:
        for write in writes:
            write()
        for obj in decision.create:  # reconciles of one run are serialized: registered before the next
            if obj["kind"] == "Job":
                inflight[obj["metadata"]["name"]] = {"metadata": obj["metadata"], "status": {}}
    except (ApiException, ValueError) as err:
        status = failed_write_status(decision.status, _api_message(err), view.generation)
        if status != view.status:
            _patch_status(namespace, name, view.status, status)
        raise ApplyError(_api_message(err)) from err
    if decision.status != view.status:
        _written[(namespace, name)] = (_patch_status(namespace, name, view.status, decision.status), decision.status)
        for event in decision.events:  # off the reconcile's path: the next stage need not wait for them
            _events.submit(_post_event, run, event)
    metrics.record((namespace, name), decision.status, decision.events)
    reconciles += 1
    return decision.again
