"""The trust model on the real apiserver (docs/security.md): the chart's admission policy refuses what a
run may not ask for, naming the field; without it the operator refuses the same, and creates no Job.
(A child of the predicted name that is not the run's: tests/test_faults.py.)"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from tests.harness import chart
from tests.harness.cluster import Cluster, Target
from tests.test_operator_e2e import (
    CLAIM,
    delete_runs_afterwards,  # noqa: F401  (autouse: the e2e module's, here too)
    run_manifest,
)
from tests.test_policy import PROMPTS_AS_CODE, SECRET_READER

pytestmark = pytest.mark.slow
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
ALLOWED_SECRET = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "token"}}}


@pytest.fixture(scope="module")
def cluster(kube: Target, tmp_path_factory: pytest.TempPathFactory):
    with Cluster(kube, tmp_path_factory.mktemp("security"), "security") as c:
        c.seed(CLAIM)
        yield c


def admission_policy(cluster: Cluster) -> list[dict[str, Any]]:
    """The chart's policy and its binding, bound to this namespace, with this suite's allowances."""
    values = {
        "watchNamespaces": [cluster.namespace],
        "policy": {"images": [cluster.image], "functionModules": ["idpo_jobs.rewards"], "secrets": ["hub-token"]},
    }
    return [d for d in chart.render(values) if d["kind"] in POLICY_KINDS]


def refused_reasons(cluster: Cluster, name: str) -> str:
    return cluster.run(name).get("status", {}).get("message", "")


def test_the_chart_admission_policy_refuses_a_run_naming_the_field(cluster: Cluster) -> None:
    if cluster.target.plane is None:
        pytest.skip("installs a cluster-scoped admission policy, which only the local control plane is ours to change")
    docs = admission_policy(cluster)
    applied = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    assert applied.returncode == 0, applied.stderr
    try:
        # The apiserver compiles the policy and starts enforcing it in a moment.
        deadline = time.monotonic() + 30 * cluster.patience
        while (refused := cluster.apply(run_manifest("reader", iterations=1, **SECRET_READER))).returncode == 0:
            cluster.kubectl("delete", "idpo", "reader", "--wait=false")
            assert time.monotonic() < deadline, "the admission policy was never enforced"
            time.sleep(0.5)
        assert "spec.ranking.function: the module is not allowed" in refused.stderr, refused.stderr
        code = cluster.apply(run_manifest("coder", iterations=1, **PROMPTS_AS_CODE))
        assert code.returncode != 0 and "spec.ranking.function" in code.stderr
        secret = cluster.apply(run_manifest("secret", iterations=1, runtime={"env": [{**ALLOWED_SECRET, "name": "X"},
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "db-password", "key": "p"}}}]}))  # fmt: skip
        assert secret.returncode != 0 and "spec.runtime.env: valueFrom.secretKeyRef" in secret.stderr
        root = cluster.apply(run_manifest("root", iterations=1, runtime={"podSecurityContext": {"runAsUser": 0}}))
        assert root.returncode != 0 and "stages never run as root" in root.stderr
        # The HF token case: a Secret the policy allows is admitted.
        allowed = run_manifest("token", iterations=1, runtime={"env": [ALLOWED_SECRET]})
        allowed["spec"]["runtime"]["image"] = cluster.image
        checked = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(allowed))
        assert checked.returncode == 0, checked.stderr
        listed = cluster.kubectl("get", "validatingadmissionpolicy", docs[0]["metadata"]["name"], "-o", "json")
        warnings = json.loads(listed.stdout).get("status", {}).get("typeChecking", {}).get("expressionWarnings", [])
        assert warnings == [], warnings  # every expression type-checks against the CRD's schema
    finally:
        cluster.kubectl("delete", "-f", "-", stdin=yaml.safe_dump_all(docs))
        reader = run_manifest("reader", iterations=1, **SECRET_READER)
        reader["spec"]["runtime"]["image"] = cluster.image
        deadline = time.monotonic() + 30 * cluster.patience  # and the apiserver stops enforcing it a moment later
        while cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(reader)).returncode:
            assert time.monotonic() < deadline, "the admission policy stayed in force"
            time.sleep(0.5)


def test_without_the_admission_policy_the_operator_refuses_the_same_runs_and_creates_no_job(cluster: Cluster) -> None:
    assert cluster.apply(run_manifest("reader", iterations=1, **SECRET_READER)).returncode == 0
    assert cluster.apply(run_manifest("coder", iterations=1, **PROMPTS_AS_CODE)).returncode == 0
    assert cluster.apply(run_manifest("beside", iterations=1)).returncode == 0
    reader = cluster.wait_phase("reader", "Failed", timeout=60)
    assert "refused by policy: spec.ranking.function: module of 'os:getenv' is not allowed" in reader["message"]
    assert "spec.runtime.env[0].valueFrom.secretKeyRef: Secret 'db-password' is not allowed" in reader["message"]
    assert {c["type"]: c["reason"] for c in reader["conditions"]}["Stalled"] == "PolicyDenied"
    coder = cluster.wait_phase("coder", "Failed", timeout=60)
    assert "spec.ranking.function: module of 'timeit:timeit' is not allowed" in coder["message"]
    status = cluster.wait_phase("beside", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert cluster.jobs("reader") == [] and cluster.jobs("coder") == []  # nothing of theirs ever ran
