"""The only module that writes to the Kubernetes API: a reconcile's observation, decision and writes.

`Controller.reconcile(key)` reads the run, its Jobs and Pods from the caches (kopf indexes fed by the
watches: no GET or LIST per reconcile), asks `reconcile.decide`, and applies the decision through one
pooled API client with timeouts: children created if absent (a name another object holds is never
used: ownership is checked by uid), Jobs failed, deleted or restarted, the status patched once and only
when it changed, then events posted off the reconcile's path. A write the API refuses lands in status
(condition `ApplyFailed` with the API's message, over the last status: the decision's progress is not
claimed) and the key is retried after a backoff. The work queue (workqueue.py) serializes and
coalesces reconciles per run; the expectations (expectations.py) bridge the caches' lag behind our writes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from idpo_operator import leader, memory, metrics, observe, reconcile, resources, workqueue
from idpo_operator.expectations import Expectations
from idpo_operator.policy import Policy
from idpo_operator.reconcile import RunView
from idpo_operator.spec import API_VERSION, DEFAULT_STAGE_IMAGE, GROUP, KIND, PLURAL, VERSION
from idpo_operator.status import Reason, conditions, timestamp

log = logging.getLogger("idpo.operator")
WORKERS = 16  # reconciles at once; they mostly wait on API writes
EVENT_POSTERS = 2  # events go out off the reconcile's path
TIMEOUT = (5, 30)  # seconds: connect, read. A hung apiserver must not hang a reconcile forever.
SAFETY_NET_SECONDS = 120.0  # an active run is looked at this often even without events (a missed one)
LEGACY_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"  # set by operators before 0.2 (their kopf timer)
RunKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Settings:
    stage_image: str = DEFAULT_STAGE_IMAGE
    lease_namespace: str | None = None  # None: no leader election (one replica, or local development)
    max_concurrent_stages: int = 0  # across all runs; 0: no cap (Kueue, if any, queues them instead)
    gpu_memory_gb: float = 80  # what status.memoryPlan is checked against
    job_ttl_seconds: int | None = 3600  # finished stage Jobs expire this long after (None: never)
    policy: Policy | None = None  # what runs may ask for (docs/security.md); None: anything

    def decide(self) -> reconcile.Settings:
        return reconcile.Settings(self.stage_image, self.gpu_memory_gb * memory.GB, self.job_ttl_seconds, self.policy)


class ApplyError(workqueue.Retry):
    """A write the API refused; the run's status already says so, and the key is retried."""


class Cache:
    """What the watches have seen: kopf indexes of RunViews, JobViews and PodViews, the Job controller's
    FailedCreate Events (observe.CreateFailure, by namespace and Job uid), and with Kueue its
    WorkloadViews and each namespace's LocalQueues."""

    def __init__(
        self,
        runs: Mapping[Any, Any],
        jobs: Mapping[Any, Any],
        pods: Mapping[Any, Any],
        workloads: Mapping[Any, Any] | None = None,
        local_queues: Mapping[Any, Any] | None = None,
        failed_creates: Mapping[Any, Any] | None = None,
    ) -> None:
        self._runs, self._jobs, self._pods = runs, jobs, pods
        self._failed_creates = failed_creates if failed_creates is not None else {}
        # An index is falsy while empty: test for None, or a watch started later would never be seen.
        self._workloads = workloads if workloads is not None else {}
        self._local_queues = local_queues if local_queues is not None else {}

    def run(self, key: RunKey) -> RunView | None:
        return next(iter(self._runs.get(key, ())), None)

    def run_keys(self) -> list[RunKey]:
        return list(self._runs.keys())

    def jobs(self, label: tuple[str, str]) -> list[observe.JobView]:
        return list(self._jobs.get(label, ()))

    def pods(self, label: tuple[str, str]) -> list[observe.PodView]:
        return list(self._pods.get(label, ()))

    def queues(self, label: tuple[str, str]) -> reconcile.Queues:
        return reconcile.Queues(list(self._workloads.get(label, ())), dict(self._local_queues.get(label[0], ())))

    def failures(self, namespace: str, jobs: list[observe.JobView]) -> dict[str, observe.CreateFailure]:
        """The latest FailedCreate of each of `jobs` that has one (a Job may have several Events: the
        apiserver's message changed, a quota's counts for one)."""
        out = {}
        for job in jobs:
            found = list(self._failed_creates.get((namespace, job.uid), ()))
            if found and job.uid:
                out[job.uid] = max(found, key=lambda f: f.last or "")
        return out

    def job_label(self, namespace: str, uid: str) -> str | None:
        """The run label of the Job of `uid`, if the cache has it."""
        for (ns, label), store in self._jobs.items():
            if ns == namespace and any(j.uid == uid for j in store):
                return label
        return None

    def job_names(self) -> set[str]:
        return {j.name for store in self._jobs.values() for j in store}

    def running_jobs(self) -> int:
        return sum(not j.done for store in self._jobs.values() for j in store)


def connect() -> client.ApiClient:
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # One pooled client for every write (kopf has its own for watches), with a kept-alive connection for
    # each thread that writes (reconcile workers, event posters, the elector): a connection dropped from
    # a full pool is a TLS handshake later.
    configuration.connection_pool_maxsize = WORKERS + EVENT_POSTERS + 1
    return client.ApiClient(configuration)


def drain(response: Any) -> None:
    """Read an unparsed response to its end: only then does urllib3 put its connection back in the pool.
    Left unread, every such write costs a new connection and its TLS handshake."""
    response.read()
    response.release_conn()


def api_message(err: Exception) -> str:
    if isinstance(err, ApiException):
        try:
            return json.loads(err.body)["message"]
        except (TypeError, ValueError, KeyError):
            return f"{err.status} {err.reason}"
    return str(err)


class ForeignChild(Exception):
    """A child's name is held by an object that is not this run's."""


class NotLeading(workqueue.Retry):
    """This replica is not (or no longer) the leader: it writes nothing."""


class Conflict(workqueue.Retry):
    """The run changed since the version the status patch was based on; decided again from the cache."""


def failed_write_status(
    previous: Mapping[str, Any], reason: str, message: str, generation: int, now: str | None = None
) -> dict[str, Any]:
    """The last status, Stalled with why a write failed; observedGeneration still advances (GitOps
    must not show Progressing forever). The decision's progress is not claimed: it did not happen."""
    now = now or timestamp()
    text = f"API write failed: {message}"[:1000] if reason == Reason.APPLY_FAILED else message[:1000]
    phase = previous.get("phase", "Pending")
    return {
        **previous,
        "phase": phase,
        "message": text,
        "observedGeneration": generation,
        "conditions": conditions(phase, reason, text, now, generation, list(previous.get("conditions") or []), True),
    }


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: changed keys only, a null for each key
    `new` no longer has (at any depth: a merge patch keeps what it does not mention), lists whole."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            if nested := merge_patch(before, value):
                patch[key] = nested
        elif value != before or key not in old:
            patch[key] = value
    return patch


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    return {"status": merge_patch(old, new)}


class Writer:
    """The API calls of a reconcile, through one pooled client. Each write first asks `leading`: a
    replica that lost the Lease (a pause past it, a partition) stops at the next call."""

    def __init__(self, api: client.ApiClient, leading: Callable[[], bool] = lambda: True) -> None:
        self.core, self.batch = client.CoreV1Api(api), client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.leading = leading

    def guard(self) -> None:
        if not self.leading():
            raise NotLeading("not the leader: no writes")

    def create(self, obj: dict[str, Any], owner_uid: str) -> None:
        self.guard()
        ns, kind, name = obj["metadata"]["namespace"], obj["kind"], obj["metadata"]["name"]
        create, read = {
            "PersistentVolumeClaim": (
                self.core.create_namespaced_persistent_volume_claim,
                self.core.read_namespaced_persistent_volume_claim,
            ),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
        }[kind]
        try:
            drain(create(ns, obj, _preload_content=False, _request_timeout=TIMEOUT))
            log.info("created %s %s/%s", kind, ns, name)
        except ApiException as err:
            # ResourceQuota admission comes before the name is checked: a claim that is there already and
            # fills the namespace's quota is answered 403 "exceeded quota", not 409. Reading it tells which.
            quota = err.status == 403 and "exceeded quota" in api_message(err)
            if err.status != 409 and not quota:
                raise
            # There already: ours (a restarted operator, a cache a moment behind), or someone else's, which
            # the label-selected watches may never show (a Job without the run's labels): never "created".
            try:
                found = json.loads(read(name, ns, _preload_content=False, _request_timeout=TIMEOUT).data)
            except ApiException as missing:
                if quota and missing.status == 404:
                    raise err from None  # not there: the quota refused it
                raise
            if not resources.owned_by({**found, "kind": kind}, owner_uid):
                raise ForeignChild(f"{kind} {name} belongs to another object; not using it") from None
            if kind == "Job" and not resources.watched(found, obj):
                raise ForeignChild(f"Job {name} has this run's owner but not its labels; not using it") from None

    def fail_job(self, namespace: str, name: str, why: str) -> None:
        # The Job controller fails a Job past its deadline and removes its pods: the GPUs go back.
        self.guard()
        body = {"metadata": {"annotations": {resources.ANNOTATION_FAILURE: why}}, "spec": {"activeDeadlineSeconds": 1}}
        self.batch.patch_namespaced_job(name, namespace, body, _request_timeout=TIMEOUT)

    def delete_job(self, namespace: str, name: str, uid: str | None, propagation: str) -> None:
        """The Job of that uid: never one created since under the same name (a stale writer's delete)."""
        self.guard()
        options = client.V1DeleteOptions(
            propagation_policy=propagation, preconditions=client.V1Preconditions(uid=uid) if uid else None
        )
        try:
            self.batch.delete_namespaced_job(name, namespace, body=options, _request_timeout=TIMEOUT)
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or a new Job of the name: not ours to delete
                raise

    def patch_status(self, run: RunView, new: Mapping[str, Any]) -> str:
        """Patch the status of the run's version we decided from (a conflict if it changed since);
        the run's resourceVersion after the write."""
        self.guard()
        body = status_patch(run.status, new)
        if run.resource_version:
            body["metadata"] = {"resourceVersion": run.resource_version}
        try:
            patched = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, run.namespace, PLURAL, run.name, body, _request_timeout=TIMEOUT
            )
        except ApiException as err:
            if err.status == 409:
                raise Conflict("the run changed meanwhile; deciding again") from None
            raise
        return patched["metadata"]["resourceVersion"]

    def remove_finalizer(self, run: RunView, finalizer: str) -> None:
        self.guard()
        index = run.finalizers.index(finalizer)
        body = [
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ]
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            run.namespace,
            PLURAL,
            run.name,
            body,
            _content_type="application/json-patch+json",  # the test op: only while it is still there
            _request_timeout=TIMEOUT,
        )

    def post_event(self, run: RunView, event: reconcile.Event) -> None:
        if not self.leading():
            return  # a replica that lost the Lease after deciding posts nothing
        now = timestamp()
        body = {
            "metadata": {"generateName": f"{run.name[:200]}.", "namespace": run.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": run.name,
                "namespace": run.namespace,
                "uid": run.uid,
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
            posted = self.core.create_namespaced_event(
                run.namespace, body, _preload_content=False, _request_timeout=TIMEOUT
            )
            drain(posted)
        except ApiException as err:  # events are best effort; status already holds the record
            log.warning("could not post event %s: %s", event.reason, err.reason)


class Controller:
    """The reconciler: one per operator process, its state in the object (kopf's memo holds it)."""

    def __init__(self, settings: Settings, cache: Cache, api: client.ApiClient, *, workers: int = WORKERS) -> None:
        self.settings, self.cache, self.api = settings, cache, api
        self.writer = Writer(api, self.is_leader)
        self.identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        api.user_agent = f"idpo-operator/{self.identity}"  # the audit log tells replicas apart
        self.expectations = Expectations()
        self.elector: leader.Elector | None = None
        # kopf calls the first handler only once every index is filled: before that, a reconcile would
        # see a run without its Jobs and start them again.
        self._indexed = threading.Event()
        self._jobs: dict[str | None, observe.JobView] = {}  # each Job as its last event showed it
        self.queue = workqueue.WorkQueue(
            self.reconcile, workers=workers, active=lambda: self._indexed.is_set() and self.is_leader()
        )
        self._capacity = threading.Lock()  # the count and the create, as one step across runs
        self._events = concurrent.futures.ThreadPoolExecutor(EVENT_POSTERS, thread_name_prefix="events")
        self._stop = threading.Event()
        self.reconciles = 0  # reported by the liveness probe

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.settings.lease_namespace:
            namespace = self.settings.lease_namespace
            self.elector = leader.Elector(self.api, namespace, "idpo-operator", self.resync, identity=self.identity)
            self.elector.start()
        self.queue.start()
        threading.Thread(target=self._safety_net, name="safety-net", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self.elector is not None:
            self.elector.release()  # a rollout's next replica takes over at once, not after the lease expires
        self.queue.stop()

    def is_leader(self) -> bool:
        return self.elector is None or self.elector.leading()

    def resync(self) -> None:
        self.queue.resync(self.cache.run_keys())

    def _safety_net(self) -> None:
        """Active runs are looked at now and then even without events: a watch event can be missed."""
        while not self._stop.wait(SAFETY_NET_SECONDS):
            for key in self.cache.run_keys():
                run = self.cache.run(key)
                if run is not None and run.status.get("phase") not in ("Succeeded", "Failed"):
                    self.queue.add(key)

    # -- triggers (from the kopf handlers) -----------------------------------------------------------
    def changed(self, key: RunKey) -> None:
        self._indexed.set()
        self.queue.add(key)

    def run_changed(self, key: RunKey, resource_version: str) -> None:
        """The run changed, unless the change is our own status write, which has nothing new to decide on."""
        if self.expectations.written(key, resource_version):
            self._indexed.set()
            return
        self.changed(key)

    def job_changed(self, key: RunKey, job: observe.JobView, deleted: bool) -> None:
        """A Job event: a reconcile only when what a decision reads of the Job changed (most of a Job's
        updates are counts of active and ready pods)."""
        last = self._jobs.pop(job.uid, None) if deleted else self._jobs.get(job.uid)
        if not deleted:
            if last == job:
                self._indexed.set()
                return
            self._jobs[job.uid] = job
        self.changed(key)
        if job.done and self.settings.max_concurrent_stages:
            self.job_finished()

    def changed_label(self, namespace: str, label: str) -> None:
        """A child that names its run only by the (possibly shortened) run label: a Kueue Workload."""
        for key in self.cache.run_keys():
            if key[0] == namespace and resources.run_label(key[1]) == label:
                self.changed(key)

    def create_failed(self, namespace: str, job_uid: str) -> None:
        """The apiserver refused a pod of the Job of `job_uid`: its run, if the Job is one of ours."""
        label = self.cache.job_label(namespace, job_uid)
        if label is not None:
            self.changed_label(namespace, label)

    def job_finished(self) -> None:
        """A stage Job ended: runs waiting for capacity may start theirs, oldest first."""
        cap = self.settings.max_concurrent_stages
        if cap and self.queue.parked():
            self.queue.release(max(cap - self._running(), 0))

    def _running(self) -> int:
        return self.cache.running_jobs() + self.expectations.in_flight(self.cache.job_names())

    # -- one reconcile -----------------------------------------------------------------------------
    def reconcile(self, key: Hashable) -> workqueue.Result:
        namespace, name = key  # type: ignore[misc]
        cached = self.cache.run((namespace, name))
        if cached is None or cached.deleting:
            self.forget((namespace, name))
            return workqueue.Result()
        version, status = self.expectations.status(key, cached.resource_version, cached.status)
        run = dataclasses.replace(cached, status=status, resource_version=version)
        label = (namespace, resources.run_label(name))
        jobs = self.expectations.jobs(key, self.cache.jobs(label))
        cap = self.settings.max_concurrent_stages
        with self._capacity:
            capacity = not cap or self._running() < cap
            decision = reconcile.decide(
                run,
                jobs,
                self.cache.pods(label),
                settings=self.settings.decide(),
                capacity=capacity,
                queues=self.cache.queues(label),
                failures=self.cache.failures(namespace, jobs),
            )
            created = [observe.job_view(o) for o in decision.create if o["kind"] == "Job"]
            for job in created:
                self.expectations.created(key, job)
        try:
            self._write(run, decision, {j.name: j.uid for j in jobs})
            if decision.status != run.status:
                self._patch_status(key, run, decision.status)
                for event in decision.events:  # off the reconcile's path: the next stage need not wait for them
                    self._events.submit(self.writer.post_event, run, event)
        except workqueue.Retry:
            self.expectations.cancel(key, [j.name for j in created])
            raise
        except (ApiException, ValueError, ForeignChild) as err:
            self.expectations.cancel(key, [j.name for j in created])
            self._stall(key, run, Reason.FOREIGN_CHILD if isinstance(err, ForeignChild) else Reason.APPLY_FAILED, err)
            raise ApplyError(api_message(err)) from err
        if LEGACY_FINALIZER in run.finalizers:
            self.writer.remove_finalizer(run, LEGACY_FINALIZER)
        metrics.record(key, decision.status, decision.events)  # type: ignore[arg-type]
        self.reconciles += 1
        return workqueue.Result(requeue_after=decision.requeue_after, parked=decision.wants_capacity)

    def _write(self, run: RunView, decision: reconcile.Decision, uids: Mapping[str, str | None]) -> None:
        ns, writer = run.namespace, self.writer
        writes: list[Callable[[], None]] = [lambda o=o: writer.create(o, run.uid) for o in decision.create]
        writes += [lambda j=j, w=w: writer.fail_job(ns, j, w) for j, w in decision.fail.items()]
        writes += [lambda j=j: writer.delete_job(ns, j, uids.get(j), "Background") for j in decision.delete]
        # Foreground: the Job goes only after its pods have, so the next attempt never meets one of them.
        writes += [lambda j=j: writer.delete_job(ns, j, uids.get(j), "Foreground") for j in decision.restart]
        for write in writes:
            write()

    def _patch_status(self, key: Hashable, run: RunView, status: dict[str, Any]) -> None:
        version = self.writer.patch_status(run, status)
        self.expectations.wrote(key, version, status)

    def _stall(self, key: Hashable, run: RunView, reason: str, err: Exception) -> None:
        """A refused write lands in status, over the last status: what the decision meant did not happen.
        Every failure to write status ends here too; if even this patch fails, the log says why."""
        failed = failed_write_status(run.status, reason, api_message(err), run.generation)
        if failed == run.status:
            return
        try:
            self._patch_status(key, run, failed)
        except (ApiException, ValueError, workqueue.Retry) as again:
            log.warning("could not record a failed write of %s in its status: %s", key, api_message(again))

    def forget(self, key: RunKey) -> None:
        """A deleted run leaves nothing behind in memory."""
        self.expectations.forget(key)
        self.queue.forget(key)
        metrics.forget(key)
