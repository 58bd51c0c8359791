"""What the node agent makes of a Pod, as pure functions: env, identity, hosts, status.

No API calls here: lookups of ConfigMaps and Secrets come in as a `fetch` function, so the rules
(which a kubelet applies the same way) are unit-tested without a cluster.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from tests.controlplane.images import ImageConfig

TERMINATION_LOG = "/dev/termination-log"
MESSAGE_LIMIT = 4096  # the kubelet's cap on a termination message
LOG_FALLBACK_LINES, LOG_FALLBACK_BYTES = 80, 2048  # FallbackToLogsOnError: the log's tail, so capped
CLUSTER_DOMAIN = "cluster.local"

Fetch = Callable[[str, str], dict[str, Any] | None]  # (kind, name) -> object in the pod's namespace, or None


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Waiting(Exception):
    """The container cannot start yet; `reason` is the kubelet's (CreateContainerConfigError, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


# -- env -------------------------------------------------------------------------------------------
def _source_data(fetch: Fetch, kind: str, name: str) -> dict[str, str] | None:
    obj = fetch(kind, name)
    if obj is None:
        return None
    if kind == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def _field(pod: dict[str, Any], path: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    found = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if found:
        return (meta.get(found.group(1)) or {}).get(found.group(2), "")
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
    }
    if path not in values:
        raise Waiting("CreateContainerConfigError", f"unsupported fieldRef {path!r}")
    return values[path]


def expand(value: str, env: dict[str, str]) -> str:
    """`$(VAR)` from earlier variables, `$$` for a literal `$`; unknown references stay as written."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def container_env(pod: dict[str, Any], container: dict[str, Any], base: dict[str, str], fetch: Fetch) -> dict[str, str]:
    """The env a kubelet gives `container`: image env, then envFrom, then env, with `$(VAR)` expansion.
    A missing ConfigMap, Secret or key that is not optional raises Waiting, as the kubelet does."""
    env = dict(base)
    for source in container.get("envFrom", []):
        kind, ref = (
            ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        )
        data = _source_data(fetch, kind, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise Waiting("CreateContainerConfigError", f'{kind.lower()} "{ref["name"]}" not found')
        env |= {source.get("prefix", "") + k: v for k, v in data.items()}
    for var in container.get("env", []):
        if "valueFrom" not in var:
            env[var["name"]] = expand(str(var.get("value", "")), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = _field(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            resource = source["resourceFieldRef"]["resource"]
            kind, _, name = resource.partition(".")
            env[var["name"]] = str((container.get("resources", {}).get(kind) or {}).get(name, "0"))
        else:
            kind, ref = (
                ("ConfigMap", source["configMapKeyRef"])
                if "configMapKeyRef" in source
                else ("Secret", source["secretKeyRef"])
            )
            data = _source_data(fetch, kind, ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                what = (
                    f'{kind.lower()} "{ref["name"]}" not found'
                    if data is None
                    else (f"couldn't find key {ref['key']} in {kind} {pod['metadata'].get('namespace')}/{ref['name']}")
                )
                raise Waiting("CreateContainerConfigError", what)
            env[var["name"]] = data[ref["key"]]
    return env


def command(container: dict[str, Any], env: dict[str, str], image: ImageConfig) -> list[str]:
    """The image's ENTRYPOINT and CMD unless the container's `command` and `args` replace them, with
    `$(VAR)` expansion in the container's own words only (a kubelet leaves the image's alone)."""
    words = [expand(a, env) for a in container.get("command") or []]
    args = [expand(a, env) for a in container.get("args") or []]
    argv = image.argv(words, args)
    if not argv:
        raise Waiting("CreateContainerError", "Error: no command specified")
    return argv


# -- identity --------------------------------------------------------------------------------------
def identity(pod: dict[str, Any], container: dict[str, Any], image_user: tuple[int, int]) -> tuple[int, int, list[int]]:
    """(uid, gid, groups) from the container's, then the pod's securityContext, then the image's user."""
    pod_sc, sc = pod["spec"].get("securityContext") or {}, container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser", image_user[0]))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", image_user[1] if uid == image_user[0] else 0))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and uid == 0:
        raise Waiting("CreateContainerConfigError", "container has runAsNonRoot and image will run as root")
    groups = [gid, *pod_sc.get("supplementalGroups", [])]
    if "fsGroup" in pod_sc:
        groups.append(pod_sc["fsGroup"])
    return uid, gid, sorted(set(groups))


# -- names -----------------------------------------------------------------------------------------
def hostname(pod: dict[str, Any]) -> str:
    return (pod["spec"].get("hostname") or pod["metadata"]["name"])[:63].rstrip("-.")


def host_names(pod: dict[str, Any]) -> list[str]:
    """The names the kubelet writes into a pod's own /etc/hosts: its hostname, and with a subdomain
    its fully qualified name. Other names come from cluster DNS (`service_names`)."""
    host, sub = hostname(pod), pod["spec"].get("subdomain")
    if not sub:
        return [host]
    return [f"{host}.{sub}.{pod['metadata']['namespace']}.svc.{CLUSTER_DOMAIN}", host]


def _search_forms(name: str, namespace: str) -> list[str]:
    """`name` as a pod may write it: its search path (`<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`)
    completes each form to `<name>.<ns>.svc.<domain>`."""
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"]


def service_names(service: dict[str, Any], pods: list[tuple[dict[str, Any], bool]]) -> list[str]:
    """What cluster DNS answers for a headless Service, given the pods that have an IP (and whether
    each is ready): the Service's name, and `<hostname>.<service>` for each selected pod whose
    subdomain is the Service; a pod that is not ready only with publishNotReadyAddresses. Nothing
    for other Services: their names resolve to a ClusterIP, which nothing here may send to.

    The EndpointSlice controller cannot do this here: EndpointSlices refuse loopback addresses,
    and every pod of this node agent is on 127.0.0.1."""
    meta, spec = service["metadata"], service.get("spec") or {}
    selector = spec.get("selector") or {}
    if spec.get("clusterIP") != "None" or not selector:
        return []
    name, namespace = meta["name"], meta["namespace"]
    members = [
        pod
        for pod, ready in pods
        if pod["metadata"]["namespace"] == namespace
        and selector.items() <= (pod["metadata"].get("labels") or {}).items()
        and (ready or spec.get("publishNotReadyAddresses"))
    ]
    names = _search_forms(name, namespace) if members else []
    for pod in members:
        if pod["spec"].get("hostname") and pod["spec"].get("subdomain") == name:
            names += _search_forms(f"{pod['spec']['hostname']}.{name}", namespace)
    return names


def hosts_file(own: list[str], neighbours: list[str]) -> str:
    """Every pod is a process on this machine, so every name resolves to loopback."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"127.0.0.1\t{' '.join(own)}"]
    lines += [f"127.0.0.1\t{name}" for name in sorted(set(neighbours) - set(own))]
    return "\n".join(lines) + "\n"


# -- status ----------------------------------------------------------------------------------------
def termination_message(container: dict[str, Any], written: str, log_tail: str, exit_code: int) -> str:
    message = written[:MESSAGE_LIMIT]
    if not message and exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        message = "\n".join(log_tail.splitlines()[-LOG_FALLBACK_LINES:])[-LOG_FALLBACK_BYTES:]
    return message


def container_status(
    container: dict[str, Any], pod_uid: str, state: dict[str, Any], restarts: int = 0
) -> dict[str, Any]:
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": f"idpo-node-agent://{container['image']}",
        "containerID": f"idpo://{pod_uid}/{container['name']}",
        "ready": "running" in state,
        "started": "running" in state,
        "restartCount": restarts,
        "state": state,
    }


def conditions(phase: str, reason: str | None = None) -> list[dict[str, Any]]:
    """Pod conditions the kubelet owns (PodScheduled is the scheduler's and is left alone)."""
    stamp = now()
    ready = phase == "Running"
    not_ready = (
        None if ready else (reason or ("PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"))
    )

    def condition(kind: str, status: bool, why: str | None = None) -> dict[str, Any]:
        out = {"type": kind, "status": "True" if status else "False", "lastTransitionTime": stamp}
        return out | ({"reason": why} if why and not status else {})

    return [
        condition("PodReadyToStartContainers", phase != "Pending"),
        condition("Initialized", True),
        condition("ContainersReady", ready, not_ready),
        condition("Ready", ready, not_ready),
    ]
