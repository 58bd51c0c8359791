"""The child objects of a run, as plain dicts: names, labels, the PVC, a stage's Job (and a gang's Service).

Pure builders: the owner is passed in, nothing is looked up. Child names are derived here and
only here, deterministically, so a restarted operator finds its Jobs instead of duplicating them.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from idpo_jobs.config import PVC_CLAIM_ENV, PVC_ROOT_ENV, JudgeSpec, Resources, Stage, StageConfig, Workspace
from idpo_jobs.contract import EXIT_BAD_INPUT, EXIT_VOLUME_FULL, TERMINATION_LOG, TERMINATION_LOG_ENV

from idpo_operator.plan import StageKey
from idpo_operator.spec import API_VERSION, DEFAULT_STAGE_IMAGE, KIND, IterativeDPORunSpec

LABEL_RUN = "idpo.dev/run"
LABEL_ITERATION = "idpo.dev/iteration"
LABEL_STAGE = "idpo.dev/stage"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_RUN = "idpo.dev/run-name"  # the run's full name, when its label had to be shortened
ANNOTATION_RUN_UID = "idpo.dev/run-uid"  # on a retained claim (no ownerReference): whose it is
ANNOTATION_FAILURE = "idpo.dev/failure"  # why the operator failed a Job that could not start
# Which attempt of its stage a Job starts at. A gang (a train stage on several nodes) is restarted whole,
# by re-creating its Job, and a failed stage started again after a fix is a new Job too: the count cannot
# live in one Job's own pod failures.
ANNOTATION_ATTEMPT = "idpo.dev/attempt"
# The stage's typed config, on the pod template: mounted as a file through the downward API, so a stage
# needs no ConfigMap (no second object to write per stage, none that someone else could plant).
ANNOTATION_CONFIG = "idpo.dev/stage-config"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's pod annotation
RENDEZVOUS_MARGIN = 300  # seconds a gang's rendezvous waits beyond runtime.startTimeoutSeconds
COMMON_LABELS = {"app.kubernetes.io/name": "idpo", "app.kubernetes.io/managed-by": "idpo-operator"}
VOLUME_MOUNT = "/workspace"
CONFIG_MOUNT = "/etc/idpo"
CONFIG_KEY = "config.json"
CONFIG_PATH = f"{CONFIG_MOUNT}/{CONFIG_KEY}"
CONTAINER = "stage"
MAX_NAME = 253  # a DNS-1123 subdomain: claims
MAX_LABEL = 63
# An Indexed Job's pods are named and host-named `<job>-<index>`: a DNS label (no dots, <= 63),
# with room for a 3-digit index and for what Kueue derives from it (its 63-char Workload names).
MAX_JOB_NAME = 52
MAX_FOLDER = 128  # the run's folder on the volume


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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def child_name(run: str, suffix: str, limit: int = MAX_NAME, dots: bool = True) -> str:
    """`<run>-<suffix>` when that is valid, else shortened (and dots replaced) as
    `<stem>-<hash>--<suffix>`, with a hash of the full name, so that every run name Kubernetes accepts works.

    No two runs compute the same child name. A shortened name is never another run's plain name: the
    part before `-<suffix>` ends with a hyphen, which no run name can (a DNS subdomain ends with a letter
    or a digit), and a suffix (`i<n>-<stage>`, `workspace`) is read back from the end in one way only.
    Two shortened names differ by the hash of the full names (a crafted collision of its 32 bits meets
    the ownership check: a child of another uid is never used)."""
    full = f"{run}-{suffix}"
    if len(full) <= limit and (dots or "." not in full):
        return full
    stem = run if dots else run.replace(".", "-")
    return f"{stem[: limit - len(suffix) - 11].rstrip('-.')}-{_digest(full)}--{suffix}"


def job_name(run: str, key: StageKey) -> str:
    return child_name(run, f"i{key.iteration}-{key.stage.value}", MAX_JOB_NAME, dots=False)


def service_name(run: str, key: StageKey) -> str:
    """The gang's headless Service, which is also its pods' `subdomain`. The Job's name, unless that
    starts with a digit: a Service name is a DNS-1035 label (a letter first)."""
    name = job_name(run, key)
    return name if name[0].isalpha() else f"g{_digest(name)}-{key.stage.value}"


def run_label(run: str) -> str:
    """The `idpo.dev/run` label value: the name itself when it fits a label (<= 63), else a hashed
    prefix; ANNOTATION_RUN keeps the full name."""
    if len(run) <= MAX_LABEL:
        return run
    return f"{run[: MAX_LABEL - 9].rstrip('-.')}-{_digest(run)}"


def pvc_name(spec: IterativeDPORunSpec, run: str) -> str:
    return spec.storage.existing_claim or child_name(run, "workspace")


def workspace(spec: IterativeDPORunSpec, owner: Owner) -> Workspace:
    """Relative to the volume: one directory per run (uid-suffixed, so a re-created run starts clean)."""
    folder = f"{owner.name}-{owner.uid[:8]}"
    if len(folder) > MAX_FOLDER:  # a file name is at most 255 bytes; stages add their own below it
        folder = f"{owner.name[: MAX_FOLDER - 18].rstrip('-.')}-{_digest(owner.name)}-{owner.uid[:8]}"
    return Workspace(f"{spec.storage.root.strip('/')}/{folder}")


def labels(owner: Owner, key: StageKey | None = None) -> dict[str, str]:
    """Identifying labels only: never the run's own labels (GitOps tracking labels stay on the run)."""
    out = {**COMMON_LABELS, LABEL_RUN: run_label(owner.name)}
    if key is not None:
        out |= {LABEL_ITERATION: str(key.iteration), LABEL_STAGE: key.stage.value}
    return out


def watched(obj: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Whether `obj` carries the identifying labels of `expected` (the child the operator would create):
    those its watches select on. A Job without them would never be seen, its stage never observed."""
    have = (obj.get("metadata") or {}).get("labels") or {}
    want = expected["metadata"]["labels"]
    return all(have.get(k) == want[k] for k in (LABEL_RUN, LABEL_ITERATION, LABEL_STAGE) if k in want)


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether `obj` belongs to the run with `uid`: ownership is by uid, never by name. A retained claim
    has no ownerReference (deleting the run must not delete it) and says whose it is in an annotation."""
    meta = obj.get("metadata") or {}
    if any(r.get("uid") == uid and r.get("controller") for r in meta.get("ownerReferences") or []):
        return True
    return obj.get("kind") == "PersistentVolumeClaim" and (meta.get("annotations") or {}).get(ANNOTATION_RUN_UID) == uid


def _metadata(name: str, owner: Owner, key: StageKey | None = None, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, key),
        "annotations": {ANNOTATION_RUN: owner.name},
    }
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
    body["metadata"]["annotations"][ANNOTATION_RUN_UID] = owner.uid
    if s.storage_class_name:
        body["spec"]["storageClassName"] = s.storage_class_name
    return body


@dataclass(frozen=True)
class Launch:
    """What one stage's Job (and a gang's Service) is built from. `image`: the operator's default stage
    image, for runs that name none; `attempt`: the attempt the Job starts at; `ttl_seconds`: how long
    the finished Job stays (its record in status outlives it)."""

    spec: IterativeDPORunSpec
    owner: Owner
    key: StageKey
    config: StageConfig
    image: str = DEFAULT_STAGE_IMAGE
    attempt: int = 1
    ttl_seconds: int | None = None

    @property
    def gang(self) -> bool:
        return gang(self.spec, self.key.stage)


def stage_resources(spec: IterativeDPORunSpec, stage: Stage) -> Resources:
    # Evaluation generates, then judges: it needs what generation needs.
    sections = {Stage.GENERATE: spec.generation, Stage.RANK: spec.ranking, Stage.TRAIN: spec.training}
    return sections.get(stage, spec.generation).resources


THREADS_ENV = "OMP_NUM_THREADS"


# A CPU count as people write one (`4`, "1.5", "500m"). Anything else (exponents, "inf", "nan", other suffixes)
# is left to the apiserver, which refuses what is no quantity, and the pod keeps torch's default.
CPU_QUANTITY = re.compile(r"(\d{1,6})(\.\d{1,6})?(m?)")
MAX_THREADS = 1024


def _cpus(quantity: str | int) -> float | None:
    """A CPU quantity as a number of CPUs; None for a form CPUs are not written in."""
    found = CPU_QUANTITY.fullmatch(str(quantity))
    if found is None:
        return None
    cpus = float(found.group(1) + (found.group(2) or ""))
    return cpus / 1000 if found.group(3) else cpus


def thread_env(spec: IterativeDPORunSpec, stage: Stage) -> list[dict[str, Any]]:
    """torch's intra-op threads per process, from the CPUs the pod may use (its limit, else its request),
    shared by its processes. Left to torch (a thread per core of the *node*) when the pod names no CPUs or
    the run sets the variable itself. On a shared node torch's default oversubscribes the pod's CPUs, and
    OpenMP's spin-waiting then burns its CFS quota (bench/threads.py: ~13x the CPU seconds of a tiny
    train step, 2 cores, 4 processes). torchrun sets 1 when it starts several processes and finds none."""
    if any(var.name == THREADS_ENV for var in spec.runtime.env):
        return []
    res = stage_resources(spec, stage)
    cpus = _cpus(res.limits.get("cpu", res.requests.get("cpu", 0)))
    if not cpus:
        return []
    processes = spec.training.distributed.processes(res) if stage is Stage.TRAIN else 1
    return [{"name": THREADS_ENV, "value": str(min(MAX_THREADS, max(1, int(cpus // processes))))}]


# The restricted Pod Security Standard, with no fixed uid: the image's user (1000) by default, or the
# one the platform assigns (OpenShift's restricted-v2). fsGroup makes the claim group-writable;
# `runtime.podSecurityContext` may change any of it (the policy keeps the result restricted, and the
# operator checks the rendered template); a null keeps the default, except for REMOVABLE_SECURITY.
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "fsGroup": 1000,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
# Under a read-only root, everything that writes a cache or a home directory gets the `/tmp`
# emptyDir; model downloads go to the claim, so each is fetched once per run.
SCRATCH = "/tmp"
WRITABLE_ENV = {
    "HOME": f"{SCRATCH}/home",
    "XDG_CACHE_HOME": f"{SCRATCH}/cache",
    "TRITON_CACHE_DIR": f"{SCRATCH}/cache/triton",
    "TORCHINDUCTOR_CACHE_DIR": f"{SCRATCH}/cache/torchinductor",
    "VLLM_CACHE_ROOT": f"{SCRATCH}/cache/vllm",
    "MPLCONFIGDIR": f"{SCRATCH}/cache/matplotlib",
    "HF_HOME": f"{VOLUME_MOUNT}/.cache/huggingface",
}


# What a null in runtime.podSecurityContext removes: not part of the restricted profile, and assigned
# by some platforms (OpenShift's restricted-v2 refuses a pod that names an fsGroup outside its range).
REMOVABLE_SECURITY = ("fsGroup", "fsGroupChangePolicy")


def pod_security(spec: IterativeDPORunSpec) -> dict[str, Any]:
    """The pods' securityContext: the defaults, with the run's values over them. A null is no value (the
    default stays), so that leaving a field out can never weaken the profile; only REMOVABLE_SECURITY
    can be removed with a null."""
    asked = spec.runtime.pod_security_context
    merged = {**copy.deepcopy(POD_SECURITY), **{k: v for k, v in asked.items() if v is not None}}
    return {k: v for k, v in merged.items() if not (k in REMOVABLE_SECURITY and k in asked and asked[k] is None)}


# The interpreter flags of a stage in a pod: isolated mode (-I: no PYTHON* variable, no user site, no
# script directory on the path), so that nothing in the environment changes what Python runs;
# unbuffered (-u) in place of PYTHONUNBUFFERED, which -I ignores. Every Python process the stage starts
# gets the same flags (multiprocessing copies them; the train launcher hands them to torchrun's workers).
ISOLATED = ("-I", "-u")


def stage_command(
    stage: Stage, config: str = CONFIG_PATH, python: str = "python", flags: tuple[str, ...] = ISOLATED
) -> list[str]:
    """The command a stage runs, in a Job and under `idpo run` alike. Train goes through the torchrun
    launcher (a world of one runs in-process); the rest run as is."""
    if stage is Stage.TRAIN:
        return [python, *flags, "-m", "idpo_jobs.distributed", "train", "--config", config]
    return [python, *flags, "-m", f"idpo_jobs.{stage.value}", "--config", config]


def gang(spec: IterativeDPORunSpec, stage: Stage) -> bool:
    """Whether the stage runs as one torchrun job over several pods, which fail and restart together."""
    return stage is Stage.TRAIN and spec.training.distributed.nodes > 1


def torchrun_env(spec: IterativeDPORunSpec, master: str, port: int) -> dict[str, str]:
    """Kubeflow Trainer's torchrun contract (PET_*), which the stage's launcher hands to torchrun."""
    dist = spec.training.distributed
    env = {
        "PET_NNODES": str(dist.nodes),
        "PET_NPROC_PER_NODE": str(dist.processes(spec.training.resources)),
        "PET_MASTER_ADDR": master,
        "PET_MASTER_PORT": str(port),
    }
    if dist.nodes > 1:
        # torchrun waits this long for every node (600 s by default): past the start deadline, so a
        # pod that cannot start fails the stage with its reason, not the others with a timeout.
        env["PET_RDZV_CONF"] = f"timeout={spec.runtime.start_timeout_seconds + RENDEZVOUS_MARGIN}"
    return env


def rendezvous_env(spec: IterativeDPORunSpec, owner: Owner, key: StageKey) -> list[dict[str, Any]]:
    """The PET_* environment of a train pod, so the image runs the same under a TrainJob. Node rank =
    the pod's completion index; the rendezvous is the index-0 pod, by its stable name."""
    several = gang(spec, key.stage)
    master = f"{job_name(owner.name, key)}-0.{service_name(owner.name, key)}" if several else "127.0.0.1"
    env = torchrun_env(spec, master, spec.training.distributed.master_port)
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}
    return [*({"name": k, "value": v} for k, v in env.items()), {"name": "PET_NODE_RANK", "valueFrom": index}]


def build_service(launch: Launch) -> dict[str, Any]:
    """A gang's headless Service: DNS names `<job>-<index>.<service>` for its pods. Published before
    they are ready, because torchrun's rendezvous is what makes them so."""
    owner, key = launch.owner, launch.key
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service_name(owner.name, key), owner, key),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels(owner, key),
            "ports": [{"name": "rendezvous", "port": launch.spec.training.distributed.master_port}],
        },
    }


# The keys of `tracking.mlflow.credentialsSecret` a stage gets, by name: never the whole Secret (envFrom),
# whose other keys would become variables no policy has judged.
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _credentials(spec: IterativeDPORunSpec) -> list[dict[str, Any]]:
    mlflow = spec.tracking.mlflow
    if not (mlflow and mlflow.credentials_secret):
        return []
    return [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": mlflow.credentials_secret, "key": k, "optional": True}}}
        for k in MLFLOW_CREDENTIALS
    ]


def judges_of(spec: IterativeDPORunSpec, stage: Stage) -> list[JudgeSpec]:
    """The LLM judges a stage calls: the evaluation's judges in the evaluate stage, a judge axis's in the rank
    and evaluate stages (which score with every axis); one per name."""
    found = list(spec.evaluation.judges) if stage is Stage.EVALUATE else []
    if stage in (Stage.RANK, Stage.EVALUATE):
        found += [a.judge for a in spec.ranking.axes or [] if a.judge is not None]
    return list({j.name: j for j in reversed(found)}.values())


def _judge_keys(spec: IterativeDPORunSpec, stage: Stage) -> list[dict[str, Any]]:
    """Each judge's API key, from its Secret, as `IDPO_JUDGE_API_KEY_<NAME>`: only in the stages that call
    the judge, and never in the stage's config, status or logs."""
    return [
        {
            "name": judge.api_key_env,
            "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}},
        }
        for judge in judges_of(spec, stage)
        if (secret := judge.endpoint.api_key_secret) is not None
    ]


def _container(spec: IterativeDPORunSpec, owner: Owner, key: StageKey, image: str) -> dict[str, Any]:
    rt = spec.runtime
    env = [
        *thread_env(spec, key.stage),
        *rt.env_wire(),
        *_credentials(spec),
        *_judge_keys(spec, key.stage),
        # Last, so that they win over the run's: a later entry of the same name replaces an earlier one
        # (and env replaces envFrom). The stage's paths and termination log are the operator's alone.
        {"name": PVC_ROOT_ENV, "value": VOLUME_MOUNT},
        {"name": PVC_CLAIM_ENV, "value": pvc_name(spec, owner.name)},
        {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG},
        *({"name": k, "value": v} for k, v in WRITABLE_ENV.items()),
        *(rendezvous_env(spec, owner, key) if key.stage is Stage.TRAIN else []),
    ]
    res = stage_resources(spec, key.stage)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": rt.image or image,
        "imagePullPolicy": rt.image_pull_policy,
        "command": stage_command(key.stage),
        # The pod's own scratch directory: a relative model or data name that is not a Hub id can only
        # resolve into it, never into the claim or the image.
        "workingDir": SCRATCH,
        "env": env,
        "volumeMounts": [
            {"name": "workspace", "mountPath": VOLUME_MOUNT},
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": SCRATCH},
            {"name": "dshm", "mountPath": "/dev/shm"},  # NCCL and dataloaders need more than 64 MiB
        ],
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if rt.env_from:
        container["envFrom"] = rt.env_from_wire()
    if res.requests or res.limits:
        # Quantities as strings: the API takes `4` or "4", but typed clients (and admission
        # webhooks written with them) accept only strings.
        wire = res.to_wire()
        container["resources"] = {kind: {k: str(q) for k, q in wire[kind].items()} for kind in wire if wire[kind]}
    return container


def build_job(launch: Launch) -> dict[str, Any]:
    """One Job per stage per iteration: an Indexed Job whose index k is shard k of `config.shards`,
    or, for a gang, node k of the torchrun job."""
    spec, owner, key, config, image = launch.spec, launch.owner, launch.key, launch.config, launch.image
    rt = spec.runtime
    meta = _metadata(job_name(owner.name, key), owner, key)
    meta["annotations"][ANNOTATION_ATTEMPT] = str(launch.attempt)
    if rt.queue_name:  # Kueue admits the Job's pods (all `parallelism` of them) as one workload
        meta["labels"][LABEL_QUEUE] = rt.queue_name
    config_field = {"fieldPath": f"metadata.annotations['{ANNOTATION_CONFIG}']"}
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_security(spec),
        "containers": [_container(spec, owner, key, image)],
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": pvc_name(spec, owner.name)}},
            {"name": "config", "downwardAPI": {"items": [{"path": CONFIG_KEY, "fieldRef": config_field}]}},
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
    # Bad input, and a full volume, fail the same way every time: fail the Job without retrying.
    bad_input = {
        "action": "FailJob",
        "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT, EXIT_VOLUME_FULL]},
    }
    disrupted = {"type": "DisruptionTarget"}  # evictions, preemptions, node drains: not the stage's fault
    job_spec: dict[str, Any] = {"completionMode": "Indexed"}
    if launch.gang:
        nodes = spec.training.distributed.nodes
        pod["subdomain"] = service_name(owner.name, key)
        # All or nothing: the first failed pod fails the Job (the Job controller then stops the
        # others) and the operator re-creates it whole (reconcile.gang_failure): a replacement pod
        # could not rejoin the running ranks. A disruption fails it too, by a rule of its own, so that
        # the operator can tell it from a crash and not count it as an attempt.
        job_spec |= {
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onPodConditions": [disrupted]}, bad_input]},
        }
    else:
        job_spec |= {
            "completions": config.shards,
            "parallelism": config.shards,
            # Retries per shard: one flaky shard cannot use up the others' retries. The first shard
            # that runs out fails the Job (and the stage) at once.
            "backoffLimitPerIndex": rt.retries,
            "maxFailedIndexes": 0,
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [disrupted]}, bad_input]},
        }
    template_annotations = {ANNOTATION_RUN: owner.name, ANNOTATION_CONFIG: config.model_dump_json(by_alias=True)}
    job_spec["template"] = {
        "metadata": {"labels": labels(owner, key), "annotations": template_annotations},
        "spec": pod,
    }
    if rt.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = rt.active_deadline_seconds
    if launch.ttl_seconds is not None:
        job_spec["ttlSecondsAfterFinished"] = launch.ttl_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def stage_objects(launch: Launch) -> list[dict[str, Any]]:
    """What starting a stage creates, in order: a gang's Service, then the Job (its config inside)."""
    return [*([build_service(launch)] if launch.gang else []), build_job(launch)]
