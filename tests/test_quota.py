"""A namespace under ResourceQuota, on the real control plane: a run whose claim fills the storage quota
exactly reaches Succeeded, a Job the quota refuses is a stalled write retried, not a failed run, and a Job
whose pods the quota refuses fails its stage at the start deadline, saying why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.harness.cluster import Cluster, Target
from tests.test_children import refused_pods_stall_the_run
from tests.test_operator_e2e import run_manifest

pytestmark = pytest.mark.slow
CLAIM_SIZE = "1Gi"


@pytest.fixture(scope="module")
def cluster(kube: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if kube.namespace is not None:
        pytest.skip("puts a quota on a namespace of its own; IDPO_E2E_NAMESPACE names a shared one")
    with Cluster(kube, tmp_path_factory.mktemp("quota"), "quota") as c:
        yield c


def quota(name: str, hard: dict[str, str]) -> str:
    return yaml.safe_dump(
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name}, "spec": {"hard": hard}}
    )


def stalled(status: dict[str, Any]) -> dict[str, Any]:
    return {c["type"]: c for c in status.get("conditions") or []}.get("Stalled") or {}


def test_a_run_fills_its_storage_quota_exactly_and_a_job_the_quota_refuses_is_retried(cluster: Cluster) -> None:
    jobs = len(json.loads(cluster.kubectl("get", "jobs", "-o", "json").stdout)["items"])
    # What the run needs: its own claim. And no room for one more Job, until the quota is raised.
    storage = quota("storage", {"persistentvolumeclaims": "1", "requests.storage": CLAIM_SIZE})
    assert cluster.kubectl("apply", "-f", "-", stdin=storage).returncode == 0
    assert cluster.kubectl("apply", "-f", "-", stdin=quota("jobs", {"count/jobs.batch": str(jobs)})).returncode == 0
    try:
        # The models are built on the run's own claim (tiny://): nothing else takes storage.
        doc = run_manifest(
            "quota",
            iterations=1,
            model={"name": "tiny://policy"},
            prompts={"source": "tiny://prompts.jsonl"},
            ranking={"ranker": "function", "function": "idpo_jobs.rewards:starts_with_s", "model": None},
            storage={"existingClaim": None, "size": CLAIM_SIZE},
        )
        assert cluster.apply(doc).returncode == 0
        status = cluster.wait("quota", lambda s: "exceeded quota" in stalled(s).get("message", ""), timeout=60)
        assert stalled(status)["status"] == "True" and "count/jobs.batch" in stalled(status)["message"]
        assert status.get("phase") != "Failed" and cluster.jobs("quota") == []

        raised = cluster.kubectl(
            "patch", "resourcequota", "jobs", "--type=merge", "-p", '{"spec":{"hard":{"count/jobs.batch":"100"}}}'
        )
        assert raised.returncode == 0, raised.stderr
        # Retried on the operator's backoff (at most a minute): every later stage's create-if-absent of
        # the claim, which fills the quota, is answered 403 and found to be the run's own.
        status = cluster.wait_phase("quota", "Succeeded", "Failed", timeout=300)
        assert status["phase"] == "Succeeded", status.get("message")
        assert stalled(status).get("status") != "True"
        claims = json.loads(cluster.kubectl("get", "pvc", "-o", "json").stdout)["items"]
        assert [c["metadata"]["name"] for c in claims] == ["quota-workspace"]
    finally:
        cluster.kubectl("delete", "resourcequota", "storage", "jobs")
        cluster.kubectl("delete", "idpo", "quota", "--wait=false")


def test_a_quota_that_refuses_every_pod_stalls_the_run_with_its_reason_at_the_start_deadline(cluster: Cluster) -> None:
    # The Job is admitted; its pods are not (`pods: 0`). The Job controller's only report of it is a
    # FailedCreate Event on the Job: the run says why while it waits, and fails at its start deadline.
    assert cluster.kubectl("apply", "-f", "-", stdin=quota("no-pods", {"pods": "0"})).returncode == 0
    try:
        refused_pods_stall_the_run(cluster, "podless", "exceeded quota: no-pods")
    finally:
        cluster.kubectl("delete", "resourcequota", "no-pods")
        cluster.kubectl("delete", "idpo", "podless", "--wait=false")
