"""Kueue's objects for the e2e suites: a ClusterQueue of 8 GPUs, its LocalQueue and priorities, and Jobs of
sleeping pods that ask for GPUs (tests/test_kueue_harness.py, tests/test_kueue.py).

`IDPO_KUEUE_RECORD=DIR` writes what Kueue made of each Job (the Job, its Workload, its pods) at each step,
as JSON.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idpo_operator.resources import CONTAINER_SECURITY, POD_SECURITY
from kubernetes import client, config

from tests.harness.cluster import JOB_NAME, RESTRICTED, Target

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
QUEUE_NAME = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"
GPU = "nvidia.com/gpu"
RELEASED = "released"  # the key of a release ConfigMap (`Queues.release`)


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
        self,
        seconds: float,
        *,
        gpus: int = 8,
        pods: int = 1,
        priority: str | None = None,
        starts_after: str | None = None,
        runs_until: str | None = None,
    ) -> dict[str, Any]:
        """Create a Job of `pods` pods sleeping `seconds`, each with `gpus` GPUs, in the LocalQueue; returns
        it as the apiserver stored it (after Kueue's mutating webhook). Explicit holds, by ConfigMaps that
        `release` creates: with `starts_after`, no pod starts before that one exists (the kubelet waits on
        a missing ConfigMap, CreateContainerConfigError) while the admitted Job holds its quota; with
        `runs_until`, a pod that starts before that one exists runs until it is deleted (a preemption ends
        it), and a pod that starts after sleeps `seconds`."""
        labels = {QUEUE_NAME: self.local_queue, **({PRIORITY_CLASS: priority} if priority else {})}
        env, sleep = [], f"{seconds}"
        if starts_after:
            env.append({"name": "STARTED", "valueFrom": {"configMapKeyRef": {"name": starts_after, "key": RELEASED}}})
        if runs_until:
            ref = {"name": runs_until, "key": RELEASED, "optional": True}
            env.append({"name": "RELEASED", "valueFrom": {"configMapKeyRef": ref}})
            sleep = f"{seconds} if os.environ.get('RELEASED') else 86400"
        container = {
            "name": "main",
            "image": self.target.image,
            "command": ["python", "-c", f"import os, time; time.sleep({sleep})"],
            "env": env,
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

    def release(self, name: str) -> None:
        """Create the ConfigMap `name` that held Jobs wait for (`job`'s `starts_after` and `runs_until`)."""
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {RELEASED: "yes"}}
        self.core.create_namespaced_config_map(self.namespace, body, _preload_content=False)

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


@contextmanager
def queues_for(kueue: Target, namespace: str | None = None) -> Iterator[Queues]:
    """A ResourceFlavor, a ClusterQueue of 8 GPUs that preempts lower priorities within itself, a LocalQueue
    `gpus` in `namespace` (else a restricted namespace of its own, deleted afterwards), two
    WorkloadPriorityClasses; deleted afterwards."""
    api = config.new_client_from_config(str(kueue.kubeconfig))
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    nodes = json.loads(core.list_node(_preload_content=False).data)["items"]
    if not any(int(n["status"].get("allocatable", {}).get(GPU, "0")) >= 8 for n in nodes):
        raise RuntimeError(f"no node of {kueue.kubeconfig} has 8 allocatable {GPU}")
    suffix = uuid.uuid4().hex[:6]
    owned = namespace is None and kueue.namespace is None
    namespace = namespace or kueue.namespace or f"kueue-{suffix}"
    if owned:
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
        if owned:
            core.delete_namespace(namespace, _preload_content=False)
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", q.local_queue)
        for body in reversed(cluster_objects):  # a ClusterQueue goes once its Workloads have
            custom.delete_cluster_custom_object(GROUP, VERSION, plurals[body["kind"]], body["metadata"]["name"])
