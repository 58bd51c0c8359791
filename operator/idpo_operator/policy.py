"""What a run may ask for, decided by the cluster's admins (docs/security.md).

Creating a run means running the stage image in its namespace with the run's settings, as creating a
TrainJob or RayJob does. A `Policy` narrows that: which stage images, which `ranking.function` modules,
which environment variable names and which Secrets `runtime.env` may use, which `envFrom` sources, where
credentials may travel (endpoints), which models may be loaded and which may run their own code, which
service accounts, node selectors, tolerations and priority classes. Some rules are no choice: the pods
stay within the restricted Pod Security profile, and in a cluster a model or data location is a Hub id or
a `pvc://` path, never a path of the container. The chart enforces the same rules at admission (a
ValidatingAdmissionPolicy, charts/idpo/templates/policy.yaml) and hands this operator the same values
(`--policy FILE`), so a cluster without the admission policy gets them too: a refused run is Failed with
the field named, and no Job is ever created for it. `idpo run` applies a policy only when given one.

Each allow-list is either null (anything) or a list (only those; [] is nothing). Each rule is a small
function of one field (`*_problem`), so that a new field (several rankers, LLM judges with endpoints)
reuses the rule instead of restating it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from idpo_jobs.config import PVC_SCHEME, TINY_SCHEME, Model
from pydantic import Field, ValidationError

from idpo_operator.spec import IterativeDPORunSpec

# Modules the stage image ships as rankers (the project's own demo rewards).
SHIPPED_FUNCTION_MODULES = ["idpo_jobs.rewards"]
# Environment variables a run may set without the admin naming them: none of them loads code, changes
# an import path, the dynamic loader, unpickling, an endpoint or a proxy, or the project's IDPO_* contract.
# `PREFIX*` is a pattern, which never admits a name ending in PATTERN_NEVER (see `env_name_allowed`).
SAFE_ENV = [
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TRANSFORMERS_VERBOSITY",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "CUDA_LAUNCH_BLOCKING",
    "PYTORCH_CUDA_ALLOC_CONF",
    "TORCH_DISTRIBUTED_DEBUG",
    "TORCH_CPP_LOG_LEVEL",
    "TORCH_SHOW_CPP_STACKTRACES",
    "TORCH_NCCL_*",
    "NCCL_*",
    "VLLM_LOGGING_LEVEL",
]
# What a pattern never admits: names that by convention hold a file, a library, a plugin, a command, a
# directory or an address (NCCL_NET_PLUGIN loads a shared object, NCCL_CONF_FILE reads more variables,
# NCCL_DEBUG_FILE writes where it says, NCCL_COMM_ID is the address ranks meet at). An admin who wants
# one names it exactly.
PATTERN_NEVER = (
    "_PLUGIN|_FILE|_PATH|_DIR|_LIB|_LIBRARY|_PRELOAD|_EXEC|_CMD|_COMMAND|_MODULE|_HOME|_ROOT|"
    "_URL|_URI|_ENDPOINT|_HOST|_ADDR|_PROXY|_ID"
)
PATTERN_NEVER_RULE = f"({PATTERN_NEVER})$"
# A model or data location in a cluster run: a Hub id (`name` or `org/name`), or a `pvc://`/`tiny://` URI.
HUB_ID_RULE = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
LOCATION_SCHEMES = (PVC_SCHEME, TINY_SCHEME)
# A registry host: the first component of an image reference when a `/` follows and it has a `.` or
# a `:` (a port), or is `localhost` (the distribution reference grammar).
REGISTRY_RULE = r"^(localhost|[^/]*[.:][^/]*)/"
DEFAULT_PORTS = {"http": "80", "https": "443"}
# What runtime.podSecurityContext may set, and the values it may not take: what remains cannot weaken
# the restricted profile (it never sets privileged, host namespaces, capabilities or root).
SECURITY_FIELDS = {
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "fsGroup",
    "fsGroupChangePolicy",
    "supplementalGroups",
    "seccompProfile",
    "appArmorProfile",
}
# The keys a null may remove (resources.REMOVABLE_SECURITY); a null anywhere else is refused, as it
# would otherwise read as "unset" to one reader and "the default" to another.
NULLABLE_SECURITY = {"fsGroup", "fsGroupChangePolicy"}
CONFINED_PROFILES = ("RuntimeDefault", "Localhost")
# Volume kinds the restricted profile allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


class Policy(Model):
    images: list[str] | None = Field(
        None,
        description="Stage images a run's runtime.image may name, matched as registry/repository: "
        "`registry.example.com/ml/idpo-jobs` (any tag or digest of that repository), `...:1.2` or `...@sha256:...` "
        "(exactly that), `registry.example.com/ml/` (any repository below). A reference without a registry host "
        "is Docker Hub's (`idpo-jobs` is `docker.io/library/idpo-jobs`). null: any image. A run without "
        "runtime.image runs the operator's own stage image.",
    )
    function_modules: list[str] | None = Field(
        default_factory=lambda: list(SHIPPED_FUNCTION_MODULES),
        description="Modules a `ranking.function` may come from (a module or any of its submodules). null: any.",
    )
    secrets: list[str] | None = Field(
        default_factory=list,
        description="Secrets runtime.env (secretKeyRef), runtime.envFrom (secretRef), "
        "tracking.mlflow.credentialsSecret and evaluation.judges[].endpoint.apiKeySecret may reference. null: any.",
    )
    env: list[str] | None = Field(
        default_factory=lambda: list(SAFE_ENV),
        description="Names runtime.env may set: exact names, or `PREFIX*` patterns that never admit a name "
        f"ending in {PATTERN_NEVER.replace('|', ', ')}. null: any name.",
    )
    env_from: list[str] | None = Field(
        default_factory=list,
        description="Sources runtime.envFrom may name, as `Secret/<name>` or `ConfigMap/<name>`: every key "
        "of a source becomes a variable that no name rule sees, so list only sources that the run's authors "
        "cannot write. A `prefix` is never allowed. null: any.",
    )
    endpoints: list[str] | None = Field(
        default_factory=list,
        description="Where a run may send credentials or its data: `scheme://host[:port][/path]`, matched on "
        "scheme, host, port (80 and 443 by default) and whole path segments. Applies to "
        "tracking.mlflow.trackingUri when a credentialsSecret is attached, and to every LLM judge's "
        "evaluation.judges[].endpoint.baseUrl (with or without an apiKeySecret). null: anywhere.",
    )
    models: list[str] | None = Field(
        None,
        description="Model sources runs may load (model.name, ranking.model): a Hub id, or a prefix ending in "
        "`/` (`mistralai/`, `pvc://models/`, `tiny://`). null: any.",
    )
    remote_code: list[str] | None = Field(
        default_factory=list,
        description="Model sources (as in `models`) whose own code may run: what model.trustRemoteCode and "
        "ranking.trustRemoteCode may be set for. null: any.",
    )
    service_accounts: list[str] | None = Field(
        default_factory=list, description="Values runtime.serviceAccountName may take. null: any."
    )
    node_selectors: list[str] | None = Field(
        None, description="Allowed runtime.nodeSelector entries, as `key` (any value) or `key=value`. null: any."
    )
    tolerations: list[str] | None = Field(
        None,
        description="Taint keys runtime.tolerations may tolerate; `*` allows a toleration without a key "
        "(which tolerates every taint). null: any.",
    )
    priority_classes: list[str] | None = Field(
        None, description="Values runtime.priorityClassName may take. null: any."
    )


def default(stage_image: str) -> Policy:
    """Without a policy file: the operator's own stage image repository and the shipped rankers only."""
    return Policy(images=[repository(stage_image)])


def load(path: str | Path) -> Policy:
    try:
        return Policy.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    except (OSError, yaml.YAMLError, ValidationError) as err:
        raise ValueError(f"policy {path}: {err}") from None


def _allowed(value: str, allowed: list[str] | None) -> bool:
    return allowed is None or value in allowed


def _module_allowed(function: str, modules: list[str] | None) -> bool:
    module = function.partition(":")[0]
    return modules is None or any(module == m or module.startswith(f"{m}.") for m in modules)


def _listed(values: list[str] | None) -> str:
    return ", ".join(values) if values else "none"


# ---------------------------------------------------------------------------------------------
# Images, as registry/repository
# ---------------------------------------------------------------------------------------------
def normalized_image(reference: str) -> str:
    """`reference` with its registry host: Docker Hub's when it names none (`python:3` is
    `docker.io/library/python:3`). The chart's CEL rule computes the same."""
    if re.match(REGISTRY_RULE, reference):
        return reference
    return f"docker.io/{reference}" if "/" in reference else f"docker.io/library/{reference}"


def repository(image: str) -> str:
    """The repository of an image reference, without tag or digest."""
    name = image.split("@")[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":")[0]


def _image_entry(entry: str) -> str:
    # `<repo>:` and `<repo>@` (the form of earlier releases) name the repository.
    return normalized_image(entry[:-1] if entry.endswith((":", "@")) else entry)


def image_allowed(image: str, entries: list[str] | None) -> bool:
    """Whether `image` is one of `entries`: a repository (any tag or digest of it, never a longer name or
    another registry: `idpo-jobs` does not admit `idpo-jobs:5000/evil`), an exact tag or digest, or a
    prefix ending in `/`."""
    if entries is None:
        return True
    ref = normalized_image(image)
    for entry in map(_image_entry, entries):
        if entry.endswith("/"):
            matched = ref.startswith(entry)
        elif "@" in entry or ":" in entry.rsplit("/", 1)[-1]:
            matched = ref == entry
        else:
            rest = ref[len(entry) :]
            matched = ref == entry or (ref.startswith(entry) and rest[:1] in (":", "@") and "/" not in rest)
        if matched:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def env_name_allowed(name: str, allowed: list[str] | None) -> bool:
    """An exact entry admits its name; a `PREFIX*` entry admits names that start with PREFIX and do not
    end in PATTERN_NEVER."""
    if allowed is None or name in allowed:
        return True
    patterned = not re.search(PATTERN_NEVER_RULE, name)
    return patterned and any(e.endswith("*") and name.startswith(e[:-1]) for e in allowed)


def env_problems(spec: IterativeDPORunSpec, policy: Policy) -> list[str]:
    out = []
    for n, env in enumerate(spec.runtime.env):
        if not env_name_allowed(env.name, policy.env):
            out.append(f"spec.runtime.env[{n}].name: {env.name!r} is not an allowed variable (policy `env`)")
        ref = env.value_from.secret_key_ref if env.value_from else None
        if ref is not None and not _allowed(ref.name, policy.secrets):
            out.append(f"spec.runtime.env[{n}].valueFrom.secretKeyRef: Secret {ref.name!r} is not allowed")
    for n, source in enumerate(spec.runtime.env_from):
        field = f"spec.runtime.envFrom[{n}]"
        if source.prefix:
            out.append(f"{field}.prefix: not allowed: it renames every key of the source")
        for kind, ref in (("Secret", source.secret_ref), ("ConfigMap", source.config_map_ref)):
            if ref is None:
                continue
            if kind == "Secret" and not _allowed(ref.name, policy.secrets):
                out.append(f"{field}.secretRef: Secret {ref.name!r} is not allowed")
            if not _allowed(f"{kind}/{ref.name}", policy.env_from):
                allowed = _listed(policy.env_from)
                out.append(f"{field}: {kind}/{ref.name} is not an allowed envFrom source (allowed: {allowed})")
    return out


# ---------------------------------------------------------------------------------------------
# Endpoints: where credentials may travel
# ---------------------------------------------------------------------------------------------
def _endpoint(uri: str) -> tuple[str, str, str, str] | None:
    """(scheme, host, port, path) of an absolute URI; None for one that has none, or a user part."""
    try:
        parts = urlsplit(uri)
        port = str(parts.port) if parts.port is not None else DEFAULT_PORTS.get(parts.scheme, "")
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or "@" in parts.netloc:
        return None
    return parts.scheme, parts.hostname.lower(), port, parts.path


def endpoint_allowed(uri: str, endpoints: list[str] | None) -> bool:
    """Whether `uri` is at one of `endpoints`: same scheme, host and port, and a path at or below the
    entry's path in whole segments (`https://h/mlflow` admits `/mlflow/api`, not `/mlflow-x` or `/admin`)."""
    if endpoints is None:
        return True
    target = _endpoint(uri)
    if target is None or ".." in target[3].split("/"):
        return False
    for entry in endpoints:
        allowed = _endpoint(entry)
        if allowed is None or allowed[:3] != target[:3]:
            continue
        prefix, path = allowed[3].removesuffix("/"), target[3]
        if not prefix or path == prefix or path.startswith(f"{prefix}/"):
            return True
    return False


def endpoint_problem(field: str, uri: str, policy: Policy) -> str | None:
    """Why credentials may not go to `uri` (a tracking server, a judge's API), or None. For any field that
    sends a Secret somewhere."""
    if endpoint_allowed(uri, policy.endpoints):
        return None
    return f"{field}: {uri!r} is not an allowed endpoint for credentials (allowed: {_listed(policy.endpoints)})"


# ---------------------------------------------------------------------------------------------
# Models and locations
# ---------------------------------------------------------------------------------------------
def source_allowed(source: str, entries: list[str] | None) -> bool:
    """An entry ending in `/` admits what starts with it; any other admits itself only."""
    return entries is None or any(source.startswith(e) if e.endswith("/") else source == e for e in entries)


def location_problem(field: str, value: str) -> str | None:
    """A cluster run reads models and data from the Hub or its claim: never a path of the container
    (another run's folder on a shared mount, the image's own files). `idpo run` takes local paths."""
    if value.startswith(LOCATION_SCHEMES) or (re.match(HUB_ID_RULE, value) and ".." not in value):
        return None
    return f"{field}: {value!r} is neither a Hub id nor a pvc:// or tiny:// location (no local paths in a cluster)"


def model_problems(
    field: str, source: str | None, trust_remote_code: bool, policy: Policy, trust_field: str | None = None
) -> list[str]:
    """The rules on one model a stage loads: where it is, whether it is an allowed source, whether its
    own code may run. For every model field (the policy, a ranker, later an axis)."""
    if source is None:
        return []
    problem = location_problem(field, source)
    out = [problem] if problem else []
    if not source_allowed(source, policy.models):
        out.append(f"{field}: {source!r} is not an allowed model source (allowed: {_listed(policy.models)})")
    if trust_remote_code and not source_allowed(source, policy.remote_code):
        trust_field = trust_field or field.rsplit(".", 1)[0] + ".trustRemoteCode"
        out.append(
            f"{trust_field}: running the code of {source!r} is not allowed (allowed: {_listed(policy.remote_code)})"
        )
    return out


def _locations(spec: IterativeDPORunSpec) -> Iterable[tuple[str, str]]:
    yield "spec.prompts.source", spec.prompts.source
    if spec.evaluation.prompts is not None:
        yield "spec.evaluation.prompts.source", spec.evaluation.prompts.source


def scorer_functions(spec: IterativeDPORunSpec) -> list[tuple[str, str]]:
    """(field, `module:callable`) of every function a run may score with: `ranking.function` (checked even when
    `axes` leaves it unused, as the admission policy does) and each function axis."""
    ranking = spec.ranking
    found = [("spec.ranking.function", ranking.function)] if ranking.function else []
    found += [(f"spec.ranking.axes[{n}].function", a.function) for n, a in enumerate(ranking.axes or []) if a.function]
    return found


# ---------------------------------------------------------------------------------------------
# The whole spec
# ---------------------------------------------------------------------------------------------
def violations(spec: IterativeDPORunSpec, policy: Policy) -> list[str]:
    """What `spec` asks for that `policy` does not allow, one `field: rule` line each."""
    rt, out = spec.runtime, []
    if rt.image and not image_allowed(rt.image, policy.images):
        allowed = _listed(policy.images)
        out.append(f"spec.runtime.image: {rt.image!r} is not an allowed stage image (allowed: {allowed})")
    for field, function in scorer_functions(spec):
        if not _module_allowed(function, policy.function_modules):
            out.append(f"{field}: module of {function!r} is not allowed (modules: {_listed(policy.function_modules)})")
    out += model_problems("spec.model.name", spec.model.name, spec.model.trust_remote_code, policy)
    ranker_model = spec.ranking.model if spec.ranking.ranker != "function" else None
    out += model_problems("spec.ranking.model", ranker_model, spec.ranking.trust_remote_code, policy)
    for n, axis in enumerate(spec.ranking.axes or []):
        field, trust = f"spec.ranking.axes[{n}].model", spec.ranking.trust_remote_code
        out += model_problems(field, axis.model, trust, policy, "spec.ranking.trustRemoteCode")
    out += [p for field, value in _locations(spec) if (p := location_problem(field, value))]
    out += env_problems(spec, policy)
    out += tracking_problems(spec, policy)
    out += judge_problems(spec, policy)
    if rt.service_account_name and not _allowed(rt.service_account_name, policy.service_accounts):
        out.append(f"spec.runtime.serviceAccountName: {rt.service_account_name!r} is not allowed")
    for key, value in rt.node_selector.items():
        allowed = policy.node_selectors
        if allowed is not None and key not in allowed and f"{key}={value}" not in allowed:
            out.append(f"spec.runtime.nodeSelector: {key}={value} is not allowed")
    for n, toleration in enumerate(rt.tolerations):
        key = toleration.get("key") or "*"
        if not _allowed(key, policy.tolerations):
            out.append(f"spec.runtime.tolerations[{n}]: tolerating {key!r} is not allowed")
    if rt.priority_class_name and not _allowed(rt.priority_class_name, policy.priority_classes):
        out.append(f"spec.runtime.priorityClassName: {rt.priority_class_name!r} is not allowed")
    return out + security_violations(rt.pod_security_context)


def tracking_problems(spec: IterativeDPORunSpec, policy: Policy) -> list[str]:
    mlflow, out = spec.tracking.mlflow, []
    if mlflow is None:
        return out
    if mlflow.tracking_uri.startswith("file:"):
        out.append("spec.tracking.mlflow.trackingUri: a file:// store is a path of the container; use TensorBoard")
    if mlflow.credentials_secret:
        if not _allowed(mlflow.credentials_secret, policy.secrets):
            out.append(f"spec.tracking.mlflow.credentialsSecret: Secret {mlflow.credentials_secret!r} is not allowed")
        problem = endpoint_problem("spec.tracking.mlflow.trackingUri", mlflow.tracking_uri, policy)
        out += [problem] if problem else []
    return out


def judge_problems(spec: IterativeDPORunSpec, policy: Policy) -> list[str]:
    """LLM judges (`evaluation.judges`, judge axes): a judge's `baseUrl` is always under `endpoints`, with a key
    or without. Without a key the
    stage still sends the run's prompts and responses there, and an address of the tenant's choosing would
    let a run make the cluster's pods call any internal service (SSRF), so there is no keyless exception.
    Its `apiKeySecret` must be one of `secrets`."""
    out = []
    judges = [(f"spec.evaluation.judges[{n}]", j) for n, j in enumerate(spec.evaluation.judges)]
    judges += [(f"spec.ranking.axes[{n}].judge", a.judge) for n, a in enumerate(spec.ranking.axes or []) if a.judge]
    for where, judge in judges:
        field = f"{where}.endpoint"
        secret = judge.endpoint.api_key_secret
        if secret is not None and not _allowed(secret.name, policy.secrets):
            out.append(f"{field}.apiKeySecret: Secret {secret.name!r} is not allowed")
        problem = endpoint_problem(f"{field}.baseUrl", judge.endpoint.base_url, policy)
        out += [problem] if problem else []
    return out


def security_violations(context: dict[str, Any]) -> list[str]:
    """runtime.podSecurityContext may not weaken the restricted profile (not a policy choice)."""
    field, out = "spec.runtime.podSecurityContext", []
    for key in sorted(set(context) - SECURITY_FIELDS):
        out.append(f"{field}.{key}: not allowed (only {', '.join(sorted(SECURITY_FIELDS))})")
    for key in sorted(k for k, v in context.items() if v is None and k in SECURITY_FIELDS - NULLABLE_SECURITY):
        out.append(f"{field}.{key}: null is not allowed: leave it out to keep the default")
    if context.get("runAsNonRoot") is False:
        out.append(f"{field}.runAsNonRoot: false is not allowed: stages never run as root")
    if context.get("runAsUser") == 0:
        out.append(f"{field}.runAsUser: 0 is not allowed: stages never run as root")
    for key in ("seccompProfile", "appArmorProfile"):
        profile = context.get(key)
        if profile is not None and (not isinstance(profile, dict) or profile.get("type") not in CONFINED_PROFILES):
            out.append(f"{field}.{key}: type must be one of {', '.join(CONFINED_PROFILES)}")
    return out


def pod_template_violations(template: dict[str, Any]) -> list[str]:
    """Where a rendered pod template falls outside the restricted Pod Security profile, as the apiserver's
    Pod Security admission would judge its pods: what is about to run, not what the spec said."""
    pod = template.get("spec") or {}
    sc = pod.get("securityContext") or {}
    out = [f"spec.{k}: host namespaces are not allowed" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    for n, volume in enumerate(pod.get("volumes") or []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"spec.volumes[{n}]: {', '.join(sorted(kinds - RESTRICTED_VOLUMES))} volumes are not allowed")
    for n, container in enumerate([*pod.get("initContainers", []), *pod.get("containers", [])]):
        csc, field = container.get("securityContext") or {}, f"spec.containers[{n}].securityContext"

        def effective(key: str, c: dict[str, Any] = csc) -> Any:
            return c.get(key, sc.get(key))

        if effective("runAsNonRoot") is not True:
            out.append(f"{field}.runAsNonRoot: must be true (pod or container)")
        if effective("runAsUser") == 0:
            out.append(f"{field}.runAsUser: 0 is not allowed")
        if (effective("seccompProfile") or {}).get("type") not in CONFINED_PROFILES:
            out.append(f"{field}.seccompProfile: type must be one of {', '.join(CONFINED_PROFILES)} (pod or container)")
        apparmor = effective("appArmorProfile")
        if apparmor is not None and apparmor.get("type") not in CONFINED_PROFILES:
            out.append(f"{field}.appArmorProfile: type must be one of {', '.join(CONFINED_PROFILES)}")
        if csc.get("privileged"):
            out.append(f"{field}.privileged: not allowed")
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{field}.allowPrivilegeEscalation: must be false")
        capabilities = csc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            out.append(f"{field}.capabilities.drop: must include ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{field}.capabilities.add: only NET_BIND_SERVICE is allowed")
        if any(p.get("hostPort") for p in container.get("ports") or []):
            out.append(f"spec.containers[{n}].ports: hostPort is not allowed")
    return out
