"""The Helm chart as the tests see it: rendered offline, and the RBAC it grants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).parents[2] / "charts" / "idpo"
RELEASE, RELEASE_NAMESPACE = "idpo", "idpo-system"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = helm.Chart.load(CHART).render(values, name=RELEASE, namespace=RELEASE_NAMESPACE)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for d in docs if d["kind"] == kind for r in d["rules"]]


def granted(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(verb, group, resource) triples the rendered RBAC allows."""
    return {
        (verb, group, res)
        for kind in ("ClusterRole", "Role")
        for r in rules(docs, kind)
        for verb in r["verbs"]
        for group in r["apiGroups"]
        for res in r["resources"]
    }


def service_account(docs: list[dict[str, Any]]) -> tuple[str, str]:
    """(namespace, name) of the operator's ServiceAccount."""
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    return account["metadata"]["namespace"], account["metadata"]["name"]
