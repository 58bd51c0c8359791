"""Real Kueue on the test cluster: quota, queueing, preemption and gangs, with Jobs of sleeping pods
that ask for `nvidia.com/gpu` (the local plane's node has 8).

One ResourceFlavor, one ClusterQueue of 8 GPUs (cpu and memory covered too) that preempts lower
priorities within itself, one LocalQueue, two WorkloadPriorityClasses (tests/harness/kueue.py).
`IDPO_KUEUE_RECORD=DIR` writes what Kueue made of each Job at each step, as JSON.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from idpo_operator.resources import CONTAINER_SECURITY, POD_SECURITY
from kubernetes import watch

from tests.harness.cluster import JOB_NAME, Target
from tests.harness.kueue import (
    GPU,
    QUEUE_NAME,
    Queues,
    admitted,
    conditions,
    holds,
    queues_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def queues(kueue: Target) -> Iterator[Queues]:
    with queues_for(kueue) as q:
        yield q


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
    release = f"release-{uuid.uuid4().hex[:6]}"
    first = queues.job(1, starts_after=release)  # admitted, it holds the quota until released
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

    queues.release(release)
    queues.until("the first complete", lambda: holds(queues.read_job(name), "Complete"))
    assert holds(queues.workload(first), "Finished")
    queues.until("the second admitted", lambda: admitted(queues.read_job(other)))
    done = queues.until("the second complete", lambda: holds(job := queues.read_job(other), "Complete") and job)
    queues.record("complete", done)


def test_a_high_priority_job_preempts_a_low_one_which_runs_again_after(queues: Queues) -> None:
    release = f"release-{uuid.uuid4().hex[:6]}"
    low = queues.job(1, priority=queues.low, runs_until=release)  # its first pod runs until preempted
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
    queues.release(release)  # the next pod, once re-admitted, sleeps its second and completes
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
