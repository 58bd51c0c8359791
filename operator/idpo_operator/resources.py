"""The child objects of a run, as plain dicts: names, labels, PVC, ConfigMap, Job.

Pure builders: the owner is passed in, nothing is looked up. Child names are derived here and
only here, deterministically, so a restarted operator finds its Jobs instead of duplicating them.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

from idpo_jobs.config import PVC_ROOT_ENV, Resources, Stage, StageConfig, Workspace
from idpo_jobs.contract import EXIT_BAD_INPUT

from idpo_operator.plan import StageKey
from idpo_operator.spec import API_VERSION, KIND, IterativeDPORunSpec

LABEL_RUN = "idpo.dev/run"
LABEL_ITERATION = "idpo.dev/iteration"
LABEL_STAGE = "idpo.dev/stage"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
COMMON_LABELS = {"app.kubernetes.io/name": "idpo", "app.kubernetes.io/managed-by": "idpo-operator"}
VOLUME_MOUNT = "/workspace"
CONFIG_MOUNT = "/etc/idpo"
CONFIG_KEY = "config.json"
CONTAINER = "stage"
MAX_NAME = 63  # a Job name becomes a label value on its Pods


@dataclass(frozen=True)
class Owner:
    """The run, as its children refer to it."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def child_name(run: str, suffix: str) -> str:
    """`<run>-<suffix>`, shortened with a hash of the full name when over 63 characters."""
    full = f"{run}-{suffix}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{run[: MAX_NAME - len(suffix) - 10].rstrip('-.')}-{digest}-{suffix}"


def job_name(run: str, key: StageKey) -> str:
    return child_name(run, f"i{key.iteration}-{key.stage.value}")


def config_map_name(run: str, key: StageKey, config: StageConfig) -> str:
    """Named after its content: a stage re-run after a spec fix gets its new config, not a stale one."""
    digest = hashlib.sha256(config.model_dump_json(by_alias=True).encode()).hexdigest()[:8]
    return child_name(run, f"i{key.iteration}-{key.stage.value}-{digest}")


def pvc_name(spec: IterativeDPORunSpec, run: str) -> str:
    return spec.storage.existing_claim or child_name(run, "workspace")


def workspace(spec: IterativeDPORunSpec, owner: Owner) -> Workspace:
    """Relative to the volume: one directory per run (uid-suffixed, so a re-created run starts clean)."""
    return Workspace(f"{spec.storage.root.strip('/')}/{owner.name}-{owner.uid[:8]}")


def labels(owner: Owner, key: StageKey | None = None) -> dict[str, str]:
    """Identifying labels only: never the run's own labels (GitOps tracking labels stay on the run)."""
    out = {**COMMON_LABELS, LABEL_RUN: owner.name}
    if key is not None:
        out |= {LABEL_ITERATION: str(key.iteration), LABEL_STAGE: key.stage.value}
    return out


def _metadata(name: str, owner: Owner, key: StageKey | None = None, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": owner.namespace, "labels": labels(owner, key)}
    if owned:
        meta["ownerReferences"] = [owner.reference()]
    return meta


def build_pvc(spec: IterativeDPORunSpec, owner: Owner) -> dict[str, Any] | None:
    """The workspace claim, or None with `existingClaim`. Retained claims carry no ownerReference,
    so deleting the run does not garbage-collect its checkpoints."""
    s = spec.storage
    if s.existing_claim:
        return None
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(pvc_name(spec, owner.name), owner, owned=not s.retain_on_delete),
        "spec": {"accessModes": list(s.access_modes), "resources": {"requests": {"storage": s.size}}},
    }
    if s.storage_class_name:
        body["spec"]["storageClassName"] = s.storage_class_name
    return body


def build_config_map(owner: Owner, key: StageKey, config: StageConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config_map_name(owner.name, key, config), owner, key),
        "data": {CONFIG_KEY: config.model_dump_json(by_alias=True, indent=2)},
    }


def stage_resources(spec: IterativeDPORunSpec, stage: Stage) -> Resources:
    return {Stage.GENERATE: spec.generation, Stage.RANK: spec.ranking, Stage.TRAIN: spec.training}[stage].resources


# The restricted Pod Security Standard; the jobs image runs as uid 1000 and fsGroup makes the claim writable.
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _container(spec: IterativeDPORunSpec, key: StageKey) -> dict[str, Any]:
    rt = spec.runtime
    env = [
        {"name": PVC_ROOT_ENV, "value": VOLUME_MOUNT},
        {"name": "HF_HOME", "value": f"{VOLUME_MOUNT}/.cache/huggingface"},  # downloads land on the PVC once
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *rt.env,
    ]
    res = stage_resources(spec, key.stage)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": rt.image,
        "imagePullPolicy": rt.image_pull_policy,
        "command": ["python", "-m", f"idpo_jobs.{key.stage.value}", "--config", f"{CONFIG_MOUNT}/{CONFIG_KEY}"],
        "env": env,
        "volumeMounts": [
            {"name": "workspace", "mountPath": VOLUME_MOUNT},
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},  # NCCL and dataloaders need more than 64 MiB
        ],
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if rt.env_from:
        container["envFrom"] = list(rt.env_from)
    if res.requests or res.limits:
        container["resources"] = {k: v for k, v in res.to_wire().items() if v}
    return container


def build_job(spec: IterativeDPORunSpec, owner: Owner, key: StageKey, config: StageConfig) -> dict[str, Any]:
    """One Job per stage per iteration; an Indexed Job whose index k is shard k of `config.shards`."""
    rt = spec.runtime
    meta = _metadata(job_name(owner.name, key), owner, key)
    if rt.queue_name:
        meta["labels"][LABEL_QUEUE] = rt.queue_name
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [_container(spec, key)],
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": pvc_name(spec, owner.name)}},
            {"name": "config", "configMap": {"name": config_map_name(owner.name, key, config)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    optional = {
        "nodeSelector": rt.node_selector,
        "tolerations": rt.tolerations,
        "priorityClassName": rt.priority_class_name,
        "serviceAccountName": rt.service_account_name,
        "imagePullSecrets": [{"name": s} for s in rt.image_pull_secrets],
    }
    pod |= {k: v for k, v in optional.items() if v}
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": config.shards,
        "parallelism": config.shards,
        "backoffLimit": rt.retries,
        "podFailurePolicy": {
            "rules": [
                # Evictions, preemptions and node drains are not the stage's fault: not counted.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                # Bad input fails the same way every time: fail the Job without retrying.
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]},
                },
            ]
        },
        "template": {"metadata": {"labels": labels(owner, key)}, "spec": pod},
    }
    if rt.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = rt.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
