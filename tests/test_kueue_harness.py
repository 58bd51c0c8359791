"""Real Kueue on the test cluster: quota, queueing, preemption and gangs, with Jobs of sleeping pods
that ask for `nvidia.com/gpu` (the local plane's node has 8).

One ResourceFlavor, one ClusterQueue of 8 GPUs (cpu and memory covered too) that preempts lower
priorities within itself, one LocalQueue, two WorkloadPriorityClasses. `IDPO_KUEUE_RECORD=DIR`
writes what Kueue made of each Job (the Job, its Workload, its pods) at each step, as JSON.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from idpo_operator.resources import CONTAINER_SECURITY, POD_SECURITY
from kubernetes import client, config, watch

from tests.harness.cluster import JOB_NAME, RESTRICTED, Target

pytestmark = pytest.mark.slow

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
QUEUE_NAME = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"
GPU = "nvidia.com/gpu"


@dataclass
class Queues:
    target: Target
    namespace: str
    flavor: str
    cluster_queue: str
    local_queue: str
    low: str
    high: str
    api: Any = None
    batch: Any = None
    core: Any = None
    custom: Any = None
    recorded: dict[str, int] = field(default_factory=dict)

    # -- Jobs ----------------------------------------------------------------------------------------
    def job(
        self, seconds: float, *, gpus: int = 8, pods: int = 1, priority: str | None = None, until: bool = False
    ) -> dict[str, Any]:
        """Create a Job of `pods` pods sleeping `seconds` (with `until`: until `seconds` from now,
        however often a pod starts), each with `gpus` GPUs, in the LocalQueue; returns it as the
        apiserver stored it (after Kueue's mutating webhook)."""
        sleep = f"max(0.5, {time.time() + seconds:.1f} - time.time())" if until else f"{seconds}"
        labels = {QUEUE_NAME: self.local_queue, **({PRIORITY_CLASS: priority} if priority else {})}
        container = {
            "name": "main",
            "image": self.target.image,
            "command": ["python", "-c", f"import time; time.sleep({sleep})"],
            "securityContext": CONTAINER_SECURITY,
            "resources": {"limits": {GPU: str(gpus)}},
        }
        pod = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": POD_SECURITY,
            "containers": [container],
        }
        spec: dict[str, Any] = {"backoffLimit": 0, "template": {"spec": pod}}
        if pods > 1:
            spec |= {"completionMode": "Indexed", "completions": pods, "parallelism": pods}
        body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"sleep-{uuid.uuid4().hex[:6]}"}}
        body |= {"spec": spec}
        body["metadata"]["labels"] = labels
        return self._read(self.batch.create_namespaced_job(self.namespace, body, _preload_content=False))

    def read_job(self, name: str) -> dict[str, Any]:
        return self._read(self.batch.read_namespaced_job(name, self.namespace, _preload_content=False))

    def workload(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The Workload Kueue made for `job`: the one it controls, by the Job's uid."""
        listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, "workloads")
        uid = job["metadata"]["uid"]
        owned = [w for w in listed["items"] if any(o["uid"] == uid for o in w["metadata"].get("ownerReferences", []))]
        return owned[0] if owned else None

    def pods(self, job: str) -> list[dict[str, Any]]:
        listed = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{JOB_NAME}={job}", _preload_content=False
        )
        return self._read(listed)["items"]

    def _read(self, response: Any) -> Any:
        return json.loads(response.data)

    # -- waiting and recording -------------------------------------------------------------------------
    def until(self, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout * self.target.patience
        while not (got := check()):
            assert time.monotonic() < deadline, f"not {what} after {timeout} s"
            time.sleep(0.2)
        return got

    def record(self, step: str, job: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> None:
        folder = os.environ.get("IDPO_KUEUE_RECORD")
        if not folder:
            return
        name = job["metadata"]["name"]
        n = self.recorded[name] = self.recorded.get(name, 0) + 1
        workload = self.workload(job)
        involved = {name, workload["metadata"]["name"] if workload else ""}
        listed = self._read(self.core.list_namespaced_event(self.namespace, _preload_content=False))["items"]
        events = [
            {k: e.get(k) for k in ("involvedObject", "reason", "message", "type", "reportingComponent", "count")}
            for e in listed
            if e["involvedObject"]["name"] in involved
        ]
        snapshot = {
            "job": self.read_job(name),
            "workload": workload,
            "pods": self.pods(name) if pods is None else pods,
            "events": events,
        }
        path = Path(folder) / f"{name}-{n:02d}-{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(snapshot, indent=1))


def conditions(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions", [])}


def holds(obj: dict[str, Any] | None, kind: str, status: str = "True") -> bool:
    return conditions(obj).get(kind, {}).get("status") == status


def admitted(job: dict[str, Any]) -> bool:
    return job["spec"].get("suspend") is False


def finished(job: dict[str, Any]) -> bool:
    return holds(job, "Complete") or holds(job, "Failed")


def kueue_object(kind: str, name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, **metadata}, **spec}


@pytest.fixture(scope="module")
def queues(kueue: Target) -> Iterator[Queues]:
    api = config.new_client_from_config(str(kueue.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    nodes = json.loads(core.list_node(_preload_content=False).data)["items"]
    if not any(int(n["status"].get("allocatable", {}).get(GPU, "0")) >= 8 for n in nodes):
        pytest.skip(f"no node of {kueue.kubeconfig} has 8 allocatable {GPU}")
    suffix = uuid.uuid4().hex[:6]
    namespace = kueue.namespace or f"kueue-{suffix}"
    if kueue.namespace is None:
        core.create_namespace({"metadata": {"name": namespace, "labels": RESTRICTED}}, _preload_content=False)
    q = Queues(kueue, namespace, f"gpu-{suffix}", f"gpus-{suffix}", "gpus", f"low-{suffix}", f"high-{suffix}")
    q.api, q.batch, q.core, q.custom = api, client.BatchV1Api(api), core, custom
    quota = [{"name": "cpu", "nominalQuota": "64"}, {"name": "memory", "nominalQuota": "256Gi"}]
    quota.append({"name": GPU, "nominalQuota": "8"})
    cluster_objects = [
        kueue_object("ResourceFlavor", q.flavor, {"spec": {}}),
        kueue_object(
            "ClusterQueue",
            q.cluster_queue,
            {
                "spec": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "resourceGroups": [
                        {
                            "coveredResources": ["cpu", "memory", GPU],
                            "flavors": [{"name": q.flavor, "resources": quota}],
                        }
                    ],
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                }
            },
        ),
        kueue_object("WorkloadPriorityClass", q.low, {"value": 100, "description": "may be preempted"}),
        kueue_object("WorkloadPriorityClass", q.high, {"value": 1000, "description": "preempts low"}),
    ]
    plurals = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues"}
    plurals["WorkloadPriorityClass"] = "workloadpriorityclasses"
    for body in cluster_objects:
        custom.create_cluster_custom_object(GROUP, VERSION, plurals[body["kind"]], body)
    local_name = q.local_queue
    local = kueue_object("LocalQueue", local_name, {"spec": {"clusterQueue": q.cluster_queue}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", local)
    q.until(
        "an active LocalQueue",
        lambda: holds(
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", local_name), "Active"
        ),
    )
    try:
        yield q
    finally:
        background = client.V1DeleteOptions(propagation_policy="Background")
        q.batch.delete_collection_namespaced_job(namespace, body=background, _preload_content=False)
        if kueue.namespace is None:
            core.delete_namespace(namespace, _preload_content=False)
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", q.local_queue)
        for body in reversed(cluster_objects):  # a ClusterQueue goes once its Workloads have
            custom.delete_cluster_custom_object(GROUP, VERSION, plurals[body["kind"]], body["metadata"]["name"])


def test_a_job_without_a_queue_name_is_left_alone(queues: Queues) -> None:
    body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "no-queue"}}
    container = {"name": "main", "image": queues.target.image, "command": ["python", "-c", "pass"]}
    container["securityContext"] = CONTAINER_SECURITY
    pod = {"restartPolicy": "Never", "securityContext": POD_SECURITY, "containers": [container]}
    body["spec"] = {"backoffLimit": 0, "template": {"spec": pod}}
    job = queues._read(queues.batch.create_namespaced_job(queues.namespace, body, _preload_content=False))
    assert job["spec"]["suspend"] is False and QUEUE_NAME not in job["metadata"].get("labels", {})
    queues.until("complete", lambda: holds(queues.read_job("no-queue"), "Complete"))
    assert queues.workload(job) is None


def test_a_job_is_held_suspended_until_admitted_and_the_next_waits_for_quota(queues: Queues) -> None:
    first = queues.job(3)
    assert first["spec"]["suspend"] is True, "Kueue's webhook suspends a Job that names a queue"
    second = queues.job(1)
    name, other = first["metadata"]["name"], second["metadata"]["name"]

    running = queues.until("admitted", lambda: admitted(job := queues.read_job(name)) and job)
    workload = queues.workload(first)
    assert holds(workload, "QuotaReserved") and holds(workload, "Admitted")
    assert workload["spec"]["podSets"][0]["count"] == 1
    assert workload["status"]["admission"]["clusterQueue"] == queues.cluster_queue
    queues.record("admitted", running)

    waiting = queues.until("pending", lambda: holds(w := queues.workload(second), "QuotaReserved", "False") and w)
    assert queues.read_job(other)["spec"]["suspend"] is True
    reserved = conditions(waiting)["QuotaReserved"]
    assert reserved["reason"] == "Pending"
    assert "insufficient unused quota" in reserved["message"] and GPU in reserved["message"], reserved
    queues.record("queued", second)

    queues.until("the first complete", lambda: holds(queues.read_job(name), "Complete"))
    assert holds(queues.workload(first), "Finished")
    queues.until("the second admitted", lambda: admitted(queues.read_job(other)))
    done = queues.until("the second complete", lambda: holds(job := queues.read_job(other), "Complete") and job)
    queues.record("complete", done)


def test_a_high_priority_job_preempts_a_low_one_which_runs_again_after(queues: Queues) -> None:
    low = queues.job(10, priority=queues.low, until=True)  # its second pod sleeps what is left
    name = low["metadata"]["name"]
    pod = queues.until(
        "running", lambda: next((p for p in queues.pods(name) if p["status"].get("phase") == "Running"), None)
    )
    seen: list[dict[str, Any]] = []  # the low Job's pods, as each change of them was watched
    stop = threading.Event()

    def watch_pods() -> None:
        stream = watch.Watch()
        for event in stream.stream(
            queues.core.list_namespaced_pod, queues.namespace, label_selector=f"{JOB_NAME}={name}", timeout_seconds=60
        ):
            seen.append(queues.api.sanitize_for_serialization(event["object"]))
            if stop.is_set():
                stream.stop()

    threading.Thread(target=watch_pods, daemon=True).start()
    queues.until("watching its pod", lambda: seen)
    queues.record("running", low)

    high = queues.job(2, priority=queues.high)
    evicted = queues.until("evicted", lambda: holds(w := queues.workload(low), "Evicted") and w)
    assert conditions(evicted)["Evicted"]["reason"] == "Preempted"
    assert conditions(evicted)["Preempted"]["reason"] == "InClusterQueue"
    suspended = queues.until(  # Kueue suspends the Job, then the Job controller says so
        "suspended", lambda: (job := queues.read_job(name))["spec"]["suspend"] and holds(job, "Suspended") and job
    )
    queues.record("preempted", suspended)
    queues.until("its pods gone", lambda: not queues.pods(name))
    running_high = queues.until(
        "the high one admitted", lambda: admitted(job := queues.read_job(high["metadata"]["name"])) and job
    )
    queues.record("requeued", suspended)
    queues.record("admitted", running_high)

    back = queues.until("re-admitted", lambda: admitted(job := queues.read_job(name)) and job)
    assert holds(queues.read_job(high["metadata"]["name"]), "Complete"), "re-admitted once the high one is done"
    assert holds(queues.workload(low), "Requeued")
    queues.record("readmitted", back)
    done = queues.until("complete", lambda: holds(job := queues.read_job(name), "Complete") and job, timeout=90)
    stop.set()
    queues.record("complete", done, pods=seen)
    preempted = [p for p in seen if p["metadata"]["uid"] == pod["metadata"]["uid"]][-1]
    assert preempted["metadata"].get("deletionTimestamp"), "the Job controller deleted the preempted pod"
    assert "failed" not in done["status"], "with backoffLimit 0: a preemption is no failed attempt"
    assert conditions(queues.workload(low))["Evicted"]["status"] == "False"


def test_an_indexed_job_of_two_pods_is_one_workload_of_one_pod_set_of_two(queues: Queues) -> None:
    gang = queues.job(1, gpus=4, pods=2)
    name = gang["metadata"]["name"]
    queues.until("admitted", lambda: admitted(queues.read_job(name)))
    workload = queues.workload(gang)
    assert [(s["name"], s["count"]) for s in workload["spec"]["podSets"]] == [("main", 2)]
    assignment = workload["status"]["admission"]["podSetAssignments"][0]
    assert assignment["count"] == 2 and assignment["resourceUsage"][GPU] == "8"
    queues.record("admitted", gang)
    done = queues.until("complete", lambda: holds(job := queues.read_job(name), "Complete") and job)
    assert done["status"]["succeeded"] == 2
    queues.record("complete", done)
