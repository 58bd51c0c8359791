"""Kueue on the test control plane: what the harness installs and how the manager is configured,
read from the manifests of Kueue's own Go module (copied into its build cache, binaries.build_kueue).

- CRDs: `config/components/crd`'s resources with its patches (conversion webhooks) applied;
- webhooks: `config/components/webhook/manifests.yaml`, those for Kueue's own kinds and for the one
  integration enabled here (`batch/job`), with its kustomization's patches; every `clientConfig`
  (webhooks and CRD conversion) is turned from the in-cluster Service into a loopback URL with the
  plane's CA, as controller-runtime's envtest does, so the apiserver calls the manager on 127.0.0.1;
- RBAC: every ClusterRole, ClusterRoleBinding, Role and RoleBinding of `config/components/rbac`,
  named as Kueue's own install names them (`kueue-` prefix, namespace `kueue-system`), the manager's
  ServiceAccount replaced by the client-certificate user the manager runs as (pki.CLIENTS["kueue"]).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane.pki import CLIENTS

NAMESPACE = "kueue-system"
PREFIX = "kueue-"  # Kueue's config/default kustomization puts it before every name
USER = CLIENTS["kueue"][0]
LABELS = {"app.kubernetes.io/name": "kueue"}  # as config/default labels everything it installs
METRICS_CERTS = "/etc/kueue/metrics/certs"  # fixed in the manager when its internal certificates are off
FRAMEWORKS = ["batch/job"]
WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}  # Kueue's own kinds; the batch/job integration
WORKLOADS_CRD = "workloads.kueue.x-k8s.io"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the Workload CRD is 1.4 MB of YAML


def _load(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.load_all(f, Loader=_Loader) if doc]


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge as far as these patches need it: maps merge, lists of named maps merge by
    name, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in patch):
        out = list(base)
        for item in patch:
            at = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get("name") == item["name"]), None)
            if at is None:
                out.append(item)
            else:
                out[at] = _merge(out[at], item)
        return out
    return patch


def _kustomize(folder: Path) -> list[dict[str, Any]]:
    """A component's resources with its patches (files or inline) applied, matched by kind and name."""
    kustomization = _load(folder / "kustomization.yaml")[0]
    docs = [doc for resource in kustomization.get("resources", []) for doc in _load(folder / resource)]
    for entry in kustomization.get("patches", []):
        patches = _load(folder / entry["path"]) if "path" in entry else list(yaml.safe_load_all(entry["patch"]))
        for patch in patches:
            for i, doc in enumerate(docs):
                if (doc["kind"], doc["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"]):
                    docs[i] = _merge(doc, patch)
    return docs


def _labelled(doc: dict[str, Any]) -> dict[str, Any]:
    doc["metadata"]["labels"] = {**doc["metadata"].get("labels", {}), **LABELS}
    return doc


def _loopback(client_config: dict[str, Any], url: str, ca_bundle: str) -> dict[str, Any]:
    """A Service reference made a URL on the manager's loopback port, with the plane's CA."""
    path = client_config.get("service", {}).get("path", "")
    return {"url": f"{url}{path}", "caBundle": ca_bundle}


def crds(config: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's CRDs; their conversion webhooks (v1beta1 <-> v1beta2) on `url`."""
    out = []
    for doc in _kustomize(config / "components" / "crd"):
        webhook = doc["spec"].get("conversion", {}).get("webhook")
        if webhook:
            webhook["clientConfig"] = _loopback(webhook["clientConfig"], url, ca_bundle)
        out.append(_labelled(doc))
    return out


def webhook_configurations(config: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """The mutating and validating webhooks for Kueue's kinds and batch/v1 Jobs, on `url`. The
    others serve integrations not enabled here (their kinds are not installed, or pods, deployments
    and statefulsets, which the manager then only answers with a no-op)."""
    out = []
    for doc in _kustomize(config / "components" / "webhook"):
        if doc["kind"] not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            continue  # the Service: nothing calls it
        doc["metadata"]["name"] = PREFIX + doc["metadata"]["name"]
        kept = []
        for webhook in doc["webhooks"]:
            if all(group in WEBHOOK_GROUPS for rule in webhook["rules"] for group in rule["apiGroups"]):
                kept.append({**webhook, "clientConfig": _loopback(webhook["clientConfig"], url, ca_bundle)})
        doc["webhooks"] = kept
        out.append(_labelled(doc))
    return out


def rbac(config: Path) -> list[dict[str, Any]]:
    """Kueue's roles and bindings as its install names them, bound to the manager's user."""
    out = []
    for doc in _kustomize(config / "components" / "rbac"):
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            continue  # the ServiceAccount: the manager runs as a client-certificate user
        doc = copy.deepcopy(doc)
        doc["metadata"]["name"] = PREFIX + doc["metadata"]["name"]
        if doc["kind"] in ("Role", "RoleBinding"):
            doc["metadata"]["namespace"] = NAMESPACE
        if "roleRef" in doc:
            doc["roleRef"]["name"] = PREFIX + doc["roleRef"]["name"]
            doc["subjects"] = [
                {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": USER}
                if s["kind"] == "ServiceAccount"
                else s
                for s in doc["subjects"]
            ]
        out.append(_labelled(doc))
    return out


def configuration(*, webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    """The manager's Configuration: everything on 127.0.0.1, no leader election, no internal
    certificates, no metrics or visibility servers, only Jobs that name a queue managed."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        # The admin's part of docs/kueue.md: Workloads carry the run label, so idpo can watch them by it.
        "integrations": {"frameworks": FRAMEWORKS, "labelKeysToCopy": ["idpo.dev/run"]},
        # The visibility server is an aggregated API on all interfaces; nothing here reads it.
        "featureGates": {"VisibilityOnDemand": False},
    }


def objects(config: Path, url: str, ca_bundle: str) -> dict[str, list[dict[str, Any]]]:
    """What to install, by phase: before the manager starts (its namespace, CRDs, RBAC) and once it
    answers (its webhooks: registered earlier, they would refuse every Job until it is up)."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": dict(LABELS)}}
    return {
        "before": [namespace, *crds(config, url, ca_bundle), *rbac(config)],
        "after": webhook_configurations(config, url, ca_bundle),
    }
