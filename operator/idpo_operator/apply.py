"""The only module that talks to the Kubernetes API: observe a run, decide, apply.

Children are created if absent (deterministic names make a duplicate a harmless 409), the status
is written once per reconcile through the status subresource and only when it changed, and events
are posted after the status write succeeded. Reconciles of one run are serialized in-process: kopf
may call us for the run and for its Jobs at the same time.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from idpo_operator import metrics, reconcile, resources
from idpo_operator.spec import API_VERSION, GROUP, KIND, PLURAL, VERSION
from idpo_operator.status import timestamp

log = logging.getLogger("idpo.operator")
_locks: dict[tuple[str, str], threading.Lock] = collections.defaultdict(threading.Lock)
reconciles = 0  # reported by the liveness probe


def connect() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _items(response: Any) -> list[dict[str, Any]]:
    return json.loads(response.data)["items"]


def _create(obj: dict[str, Any]) -> None:
    ns, kind = obj["metadata"]["namespace"], obj["kind"]
    core, batch = client.CoreV1Api(), client.BatchV1Api()
    create = {
        "PersistentVolumeClaim": core.create_namespaced_persistent_volume_claim,
        "ConfigMap": core.create_namespaced_config_map,
        "Job": batch.create_namespaced_job,
    }[kind]
    try:
        create(ns, obj)
        log.info("created %s %s/%s", kind, ns, obj["metadata"]["name"])
    except ApiException as err:
        if err.status != 409:  # already there: a restarted operator re-found its child
            raise


def _post_event(run: dict[str, Any], event: reconcile.Event) -> None:
    meta = run["metadata"]
    now = timestamp()
    body = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": "idpo-operator"},
        "reportingComponent": "idpo-operator",
    }
    try:
        client.CoreV1Api().create_namespaced_event(meta["namespace"], body)
    except ApiException as err:  # events are best effort; status already holds the record
        log.warning("could not post event %s: %s", event.reason, err.reason)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that also removes keys the new status no longer has."""
    return {"status": {**{k: None for k in old if k not in new}, **new}}


def reconcile_run(namespace: str, name: str) -> None:
    try:
        _reconcile(namespace, name)
    except Exception:
        metrics.ERRORS.inc()
        raise


def _reconcile(namespace: str, name: str) -> None:
    global reconciles
    with _locks[(namespace, name)]:
        custom, core, batch = client.CustomObjectsApi(), client.CoreV1Api(), client.BatchV1Api()
        try:
            run = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                metrics.forget((namespace, name))
                return
            raise
        meta = run["metadata"]
        if meta.get("deletionTimestamp"):
            metrics.forget((namespace, name))
            return
        view = reconcile.RunView(
            name, namespace, meta["uid"], meta.get("generation", 1), run.get("spec") or {}, run.get("status") or {}
        )
        selector = f"{resources.LABEL_RUN}={name}"
        jobs = _items(batch.list_namespaced_job(namespace, label_selector=selector, _preload_content=False))
        pods = _items(core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False))
        decision = reconcile.decide(view, jobs, pods)
        for obj in decision.create:
            _create(obj)
        if decision.status != view.status:
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, status_patch(view.status, decision.status)
            )
            for event in decision.events:
                _post_event(run, event)
        metrics.record((namespace, name), decision.status, decision.events)
        reconciles += 1
