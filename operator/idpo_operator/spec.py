"""The `IterativeDPORun` resource: spec models (source of truth for the CRD) and manifest loading.

Stage sections (`generation`, `ranking`, `training`, ...) are the stage parameter models of
`idpo_jobs.config`, so operator and stages share one definition of each field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from idpo_jobs.config import (
    MAX_ITEMS,
    MAX_NAME,
    MAX_URI,
    EvaluationSpec,
    GenerationSpec,
    Model,
    ModelSpec,
    PromptsSpec,
    RankingSpec,
    RelativePath,
    TrackingSpec,
    TrainingSpec,
)
from pydantic import Field, ValidationError, model_validator

GROUP = "idpo.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "IterativeDPORun"
PLURAL = "iterativedporuns"


class StorageSpec(Model):
    existing_claim: str | None = Field(None, max_length=MAX_NAME, description="Use this PVC instead of creating one.")
    size: str = Field("200Gi", max_length=32, description="Size of the PVC the operator creates.")
    storage_class_name: str | None = Field(None, max_length=MAX_NAME, description="StorageClass of the created PVC.")
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]] = Field(
        default_factory=lambda: ["ReadWriteOnce"],
        min_length=1,
        max_length=3,
        description="Access modes of the created PVC; ReadWriteMany when shards or training.distributed.nodes "
        "run on several nodes.",
    )
    retain_on_delete: bool = Field(True, description="Keep the created PVC (checkpoints) when the run is deleted.")
    root: RelativePath = Field(
        "idpo",
        max_length=200,
        description="Directory on the volume under which each run gets `<run>-<uid8>/`: relative, without `..`.",
    )


# Bounds on what a run puts into its pods' environment: the operator holds every run's spec in memory.
MAX_ENV_NAME = 256
MAX_ENV_VALUE = 4096  # one value: a token, a PEM certificate
MAX_ENV_VALUES = 16 * 1024  # all of a run's `env` values together


class KeyRef(Model):
    """A key of a Secret or ConfigMap, as in a Pod spec."""

    name: str = Field(min_length=1, max_length=MAX_NAME)
    key: str = Field(min_length=1, max_length=MAX_NAME)
    optional: bool | None = None


class EnvVarSource(Model):
    """Where a variable's value comes from, as in a Pod spec (one of these)."""

    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None
    field_ref: dict[str, Any] | None = Field(None, max_length=2, description="As in a Pod spec.")
    resource_field_ref: dict[str, Any] | None = Field(None, max_length=3, description="As in a Pod spec.")


class EnvVar(Model):
    """A container env entry, as in a Pod spec. The cluster's policy decides which names a run may set."""

    name: str = Field(min_length=1, max_length=MAX_ENV_NAME, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = Field(None, max_length=MAX_ENV_VALUE)
    value_from: EnvVarSource | None = None


class SourceRef(Model):
    """A whole Secret or ConfigMap, as in a Pod spec's envFrom."""

    name: str = Field(min_length=1, max_length=MAX_NAME)
    optional: bool | None = None


class EnvFromSource(Model):
    """An envFrom entry, as in a Pod spec; every key of its source becomes a variable (docs/security.md)."""

    prefix: str | None = Field(None, max_length=MAX_ENV_NAME)
    config_map_ref: SourceRef | None = None
    secret_ref: SourceRef | None = None


# The stage image when neither the run nor the operator (`idpo operator --stage-image`, which the
# chart sets from its values) names one: the `jobs` target of the Dockerfile, at this version.
DEFAULT_STAGE_IMAGE = "ghcr.io/idpo-dev/idpo-jobs:0.1.0"


class RuntimeSpec(Model):
    image: str | None = Field(
        None,
        max_length=MAX_URI,
        description="Stage image (the Dockerfile's jobs target). None: the operator's --stage-image.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent")
    image_pull_secrets: list[Annotated[str, Field(max_length=MAX_NAME)]] = Field(
        default_factory=list, max_length=16, description="Secret names."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict, max_length=32)
    tolerations: list[dict[str, Any]] = Field(default_factory=list, max_length=32, description="As in a Pod spec.")
    priority_class_name: str | None = Field(None, max_length=MAX_NAME)
    service_account_name: str | None = Field(None, max_length=MAX_NAME)
    queue_name: str | None = Field(
        None, max_length=63, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name; docs/kueue.md)."
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Extra container env, as in a Pod spec (e.g. HF_TOKEN from a Secret the policy allows): names "
        f"the cluster's policy allows; values at most {MAX_ENV_VALUE} characters, {MAX_ENV_VALUES} in all. The "
        "operator's own variables (paths, the termination log, PET_*) come after these and win.",
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list,
        max_length=16,
        description="As in a Pod spec; only from sources the cluster's policy lists (their keys cannot be judged "
        "by name at admission).",
    )
    retries: int = Field(
        2,
        ge=0,
        le=20,
        description="Times each shard of a stage is retried (with Kubernetes' exponential backoff) before the "
        "run fails. Bad input (exit code 2) is never retried.",
    )
    active_deadline_seconds: int | None = Field(None, ge=60, description="Deadline of each stage Job.")
    start_timeout_seconds: int = Field(
        600,
        ge=30,
        description="A stage pod that has not started after this long (image pull, scheduling, a missing "
        "Secret), or a stage Job whose pods the apiserver refuses (Pod Security, a quota, a webhook) for this "
        "long, fails the stage with the reason it was waiting for.",
    )
    pod_security_context: dict[str, Any] = Field(
        default_factory=dict,
        max_length=16,
        description="Merged over the stage pods' securityContext (runAsNonRoot, seccomp RuntimeDefault, "
        "fsGroup 1000). It cannot weaken the restricted Pod Security profile. `fsGroup: null` (and "
        "`fsGroupChangePolicy: null`) removes that default, where the platform assigns one (OpenShift "
        "restricted-v2); a null for any other key keeps the default.",
    )

    @model_validator(mode="after")
    def _env_size(self) -> RuntimeSpec:
        total = sum(len(e.value or "") for e in self.env)
        if total > MAX_ENV_VALUES:
            raise ValueError(f"env: the values add up to {total} characters, more than {MAX_ENV_VALUES}")
        return self

    def env_wire(self) -> list[dict[str, Any]]:
        """`env` as a Pod spec takes it (no null fields)."""
        return [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in self.env]

    def env_from_wire(self) -> list[dict[str, Any]]:
        return [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in self.env_from]


class IterativeDPORunSpec(Model):
    """An iterative DPO run: `iterations` rounds of generate -> rank -> train."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    prompts: PromptsSpec = Field(default_factory=PromptsSpec)
    iterations: int = Field(3, ge=1, le=100, description="Rounds of generate -> rank -> train.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    ranking: RankingSpec = Field(default_factory=RankingSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec,
        description="Held-out evaluation of the base model and of every iteration: win rates, early stop.",
    )
    storage: StorageSpec = Field(default_factory=StorageSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment tracking: MLflow, TensorBoard (docs/tracking.md)."
    )
    suspend: bool = Field(False, description="Stop starting new stages (running ones finish).")

    @model_validator(mode="after")
    def _runnable(self) -> IterativeDPORunSpec:
        nodes, storage = self.training.distributed.nodes, self.storage
        if nodes > 1 and not storage.existing_claim and "ReadWriteMany" not in storage.access_modes:
            # Every pod of the gang mounts the volume; a ReadWriteOnce one attaches to one node only, so
            # the other pods would wait in ContainerCreating until the start deadline. An existingClaim's
            # modes are the cluster's to know: the start deadline names a Multi-Attach wait there.
            raise ValueError(
                f"training.distributed.nodes {nodes} needs a volume every node can mount: set "
                "storage.accessModes to [ReadWriteMany] (or use an existingClaim that is ReadWriteMany)"
            )
        problem = self.evaluation.heldout_problem(self.prompts, self.iterations)
        if problem:
            raise ValueError(f"evaluation: {problem}")
        rule = self.evaluation.stop_when
        names = [a.name for a in self.ranking.axes or []]
        if rule is not None and rule.axis is not None and rule.axis not in names:
            known = ", ".join(names) or "none: per-axis figures come with ranking.axes"
            raise ValueError(f"evaluation.stopWhen.axis: {rule.axis!r} is not an axis of ranking.axes ({known})")
        judges = [j.name for j in self.evaluation.judges]
        by_name = {j.name: j for j in self.evaluation.judges}
        for axis in self.ranking.axes or []:
            if axis.judge is not None and by_name.setdefault(axis.judge.name, axis.judge) != axis.judge:
                # One name, one API key variable (IDPO_JUDGE_API_KEY_<NAME>) in the stage pods.
                raise ValueError(
                    f"ranking.axes: judge {axis.judge.name!r} is defined twice, differently; give it another name"
                )
        if rule is not None and rule.judge is not None and rule.judge not in judges:
            known = ", ".join(judges) or "none"
            raise ValueError(f"evaluation.stopWhen.judge: {rule.judge!r} is not a judge of evaluation.judges ({known})")
        return self


class Metadata(Model):
    model_config = Model.model_config | {"extra": "allow"}
    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    namespace: str | None = Field(None, max_length=63)


class Manifest(Model):
    api_version: Literal["idpo.dev/v1alpha1"]
    kind: Literal["IterativeDPORun"]
    metadata: Metadata
    spec: IterativeDPORunSpec = Field(default_factory=IterativeDPORunSpec)


class ManifestError(ValueError):
    """An invalid manifest; the message names each bad field path and its rule."""


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {prefix}{path}: {msg}")
    return "\n".join(lines)


def parse_manifest(doc: Any, origin: str = "manifest") -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestError(f"{origin}: expected a mapping with apiVersion/kind/metadata/spec")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as err:
        raise ManifestError(f"{origin} is invalid:\n{format_validation_error(err)}") from None


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{path} is not valid YAML: {err}") from None
    return parse_manifest(doc, origin=str(path))
