"""The Helm chart, linted and rendered offline (helm-python-sdk) and validated against Kubernetes schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from tests.harness.chart import CHART, granted, render, rules

CRD = Path(__file__).parent.parent / "crds" / "idpo.dev_iterativedporuns.yaml"
K8S = "1.31.0"


def test_chart_lints_clean() -> None:
    report = helm.lint(str(CHART), strict=True, kube_version=f"v{K8S}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == []


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["ml", "research"]}], ids=["cluster", "namespaced"])
def test_rendered_manifests_are_valid_kubernetes(values: dict[str, Any]) -> None:
    for doc in render(values):
        kubernetes_validate.validate(doc, K8S, strict=True)


def test_the_chart_ships_the_generated_crd_and_no_copy() -> None:
    chart = helm.Chart.load(CHART)
    assert [c["name"] for c in chart.crds] == ["crds/idpo.dev_iterativedporuns.yaml"]
    assert (CHART / "crds" / CRD.name).resolve() == CRD.resolve()


def test_operator_pod_is_restricted_and_single() -> None:
    (deploy,) = [d for d in render() if d["kind"] == "Deployment"]
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "RollingUpdate"  # safe: leader election
    pod = spec["template"]["spec"]
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" and "--all-namespaces" in container["args"]
    assert "--log-format=json" in container["args"] and "--metrics-port=9090" in container["args"]


def test_namespaced_mode_uses_roles_and_watches_only_those_namespaces() -> None:
    docs = render({"watchNamespaces": ["ml", "research"]})
    roles = [d for d in docs if d["kind"] == "Role" and not d["metadata"]["name"].endswith("-leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "research"]
    cluster_rules = rules(docs, "ClusterRole")
    assert cluster_rules == [  # only what kopf's own discovery needs; the run's resources stay in Roles
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    ]
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    assert [a for a in deploy["spec"]["template"]["spec"]["containers"][0]["args"] if "namespace" in a] == [
        "--namespace=ml",
        "--namespace=research",
    ]


def test_rbac_has_no_wildcards() -> None:
    for verb, group, res in granted(render()):
        assert "*" not in (verb, group, res)


def test_values_are_checked_against_the_schema() -> None:
    with pytest.raises(helm.HelmValuesError, match="watchNamespaces"):
        render({"watchNamespaces": "ml"})


def test_leader_election_may_touch_leases_in_the_release_namespace_only() -> None:
    (role,) = [d for d in render() if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader-election")]
    assert role["metadata"]["namespace"] == "idpo-system"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]
