"""Runs under real Kueue (docs/kueue.md): a stage Job is a Kueue workload; status says why it waits, a
start deadline never fails a stage that Kueue holds, a preemption costs no attempt and the stage goes on
from its last checkpoint, and a gang is admitted as one workload."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.cluster import Cluster, Target, hooked
from tests.harness.kueue import GROUP, VERSION, Queues, queues_for
from tests.test_operator_e2e import (
    CLAIM,
    KUEUE_GRANTS,
    SPEC,
    delete_runs_afterwards,  # noqa: F401  (autouse: the e2e module's, here too)
    run_manifest,
)

pytestmark = pytest.mark.slow
EIGHT_GPUS = {"resources": {"limits": {"nvidia.com/gpu": 8}}, "distributed": {"processesPerNode": 1}}


@pytest.fixture(scope="module")
def cluster(kueue: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(kueue, tmp_path_factory.mktemp("kueue"), "kueue-runs") as c:
        c.seed(CLAIM)
        yield c


@pytest.fixture(scope="module")
def queues(kueue: Target, cluster: Cluster) -> Iterator[Queues]:
    with queues_for(kueue, cluster.namespace) as q:
        yield q


def queued(name: str, queues: Queues, **spec: Any) -> dict[str, Any]:
    runtime = {"queueName": queues.local_queue, **spec.pop("runtime", {})}
    return run_manifest(name, iterations=1, runtime=runtime, **spec)


def train(status: dict[str, Any]) -> dict[str, Any]:
    return status.get("iterations", [{}])[0].get("stages", {}).get("train", {})


def events(cluster: Cluster, run: str) -> list[tuple[str, str, str]]:
    listed = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={run}", "-o", "json")
    items = sorted(json.loads(listed.stdout)["items"], key=lambda e: e["metadata"]["creationTimestamp"])
    return [(e["reason"], e["message"], e["metadata"]["creationTimestamp"]) for e in items]


def test_a_train_waiting_for_quota_is_queued_with_kueues_reason_and_never_failed_by_its_deadline(
    cluster: Cluster, queues: Queues
) -> None:
    runtime = {"startTimeoutSeconds": 30}
    # The first train holds the 8 GPUs, at its first step, until the test lets it go on (the test hooks).
    hold = cluster.hold("train", 1)
    holding = {**runtime, **hooked(SPEC["runtime"]["env"], **hold.env)}
    first = queued("first", queues, training=EIGHT_GPUS, runtime=holding)
    assert cluster.apply(first).returncode == 0
    cluster.pod_that_logged("first-i1-train", hold.line, timeout=300)
    assert cluster.apply(queued("second", queues, training=EIGHT_GPUS, runtime=runtime)).returncode == 0
    where = f"Pending: queued in ClusterQueue {queues.cluster_queue} (LocalQueue {queues.local_queue}): "
    # Queued at once; Kueue's reason a moment later, when it has tried to admit the Job's Workload.
    waiting = cluster.wait("second", lambda s: "insufficient unused quota" in s.get("message", ""), timeout=300)
    assert train(waiting)["admission"] == "Queued" and waiting["phase"] == "Running"
    assert waiting["message"].startswith(f"iteration 1 train: {where}"), waiting["message"]
    # Queued past its start deadline, held there by the first: the deadline counts from admission.
    time.sleep(runtime["startTimeoutSeconds"] + 5)
    assert cluster.run("second")["status"]["phase"] == "Running"
    cluster.release(hold, CLAIM)
    for name in ("first", "second"):
        status = cluster.wait_phase(name, "Succeeded", "Failed", timeout=600)
        assert status["phase"] == "Succeeded", status.get("message")
        assert train(status)["attempts"] == 1
    said = {reason: stamp for reason, message, stamp in events(cluster, "second") if "train" in message}
    assert {"StageQueued", "StageAdmitted"} <= set(said)
    # It waited longer than its start deadline, and the deadline did not fail it: it counts from admission.
    waited = dt_seconds(said["StageAdmitted"]) - dt_seconds(said["StageQueued"])
    assert waited > runtime["startTimeoutSeconds"], waited


def dt_seconds(stamp: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_preempted_train_costs_no_attempt_and_resumes_from_its_checkpoint(cluster: Cluster, queues: Queues) -> None:
    training = {**EIGHT_GPUS, "epochs": 10, "checkpointEverySteps": 2}
    hold = cluster.hold("train", 5)  # two checkpoints in (steps 2 and 4), held until preempted
    runtime = hooked(SPEC["runtime"]["env"], **hold.env)
    assert cluster.apply(queued("preempted", queues, training=training, runtime=runtime)).returncode == 0
    cluster.pod_that_logged("preempted-i1-train", hold.line, timeout=300)
    urgent = queues.job(10, priority=queues.high)  # a higher-priority workload wants the 8 GPUs
    status = cluster.wait("preempted", lambda s: train(s).get("admission") == "Preempted", timeout=120)
    assert train(status)["message"].startswith("Preempted: waiting for re-admission")
    assert train(status)["attempts"] == 1 and status["phase"] == "Running"
    cluster.release(hold, CLAIM)
    queues.until("the urgent Job done", lambda: queues.read_job(urgent["metadata"]["name"])["status"].get("succeeded"))
    status = cluster.wait_phase("preempted", "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status.get("message")
    assert train(status)["attempts"] == 1  # a preemption is not a failed attempt
    assert train(status)["metrics"]["resumed_from_step"] > 0
    reasons = [reason for reason, message, _ in events(cluster, "preempted") if "train" in message]
    assert "StagePreempted" in reasons and reasons.count("StageAdmitted") >= 1


def test_a_two_node_gang_is_admitted_as_one_workload(cluster: Cluster, queues: Queues) -> None:
    from tests.harness.cluster import free_port

    gang = {"distributed": {"nodes": 2, "masterPort": free_port()}}
    assert cluster.apply(queued("gang", queues, training=gang)).returncode == 0
    status = cluster.wait_phase("gang", "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status.get("message")
    listed = queues.custom.list_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, "workloads", label_selector="idpo.dev/run=gang"
    )
    (workload,) = [w for w in listed["items"] if w["metadata"]["name"].startswith("job-gang-i1-train")]
    assert [p["count"] for p in workload["spec"]["podSets"]] == [2]
    assert train(status)["metrics"]["world_size"] == 2


def test_the_operator_read_kueues_workloads_and_local_queues(cluster: Cluster) -> None:
    if cluster.target.plane is None:
        pytest.skip("reads the apiserver's audit log, which only the local control plane shares")
    cluster.wait_for_calls(KUEUE_GRANTS)
