"""What a run may ask for, decided by the cluster's admins (docs/security.md).

Creating a run means running the stage image in its namespace with the run's settings, as creating a
TrainJob or RayJob does. A `Policy` narrows that: which stage images, which `ranking.function` modules,
which Secrets `runtime.env`/`envFrom` may reference, which service accounts, node selectors,
tolerations and priority classes; `runtime.podSecurityContext` may never weaken the restricted Pod
Security profile. The chart enforces the same rules at admission (a ValidatingAdmissionPolicy,
charts/idpo/templates/policy.yaml) and hands this operator the same values (`--policy FILE`), so a
cluster without the admission policy gets them too: a refused run is Failed with the field named, and
no Job is ever created for it. `idpo run` applies a policy only when given one.

Each allow-list is either null (anything) or a list (only those; [] is nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from idpo_jobs.config import Model
from pydantic import Field, ValidationError

from idpo_operator.spec import IterativeDPORunSpec

# Modules the stage image ships as rankers (the project's own demo rewards).
SHIPPED_FUNCTION_MODULES = ["idpo_jobs.rewards"]
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
CONFINED_PROFILES = ("RuntimeDefault", "Localhost")


class Policy(Model):
    images: list[str] | None = Field(
        None,
        description="Prefixes a run's runtime.image must start with, e.g. `registry.example.com/ml/idpo-jobs:` "
        "(literal: end with `:` or `/` to match a repository). null: any image. A run without runtime.image "
        "runs the operator's own stage image.",
    )
    function_modules: list[str] | None = Field(
        default_factory=lambda: list(SHIPPED_FUNCTION_MODULES),
        description="Modules a `ranking.function` may come from (a module or any of its submodules). null: any.",
    )
    secrets: list[str] | None = Field(
        default_factory=list,
        description="Secrets runtime.env (secretKeyRef) and runtime.envFrom (secretRef) may reference. null: any.",
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
    repository = stage_image.split("@")[0].rsplit(":", 1)[0] if ":" in stage_image.split("/")[-1] else stage_image
    return Policy(images=[f"{repository}:", f"{repository}@"])


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


def scorer_functions(spec: IterativeDPORunSpec) -> list[tuple[str, str]]:
    """(field, `module:callable`) of every function a run may score with: `ranking.function` (checked even when
    `axes` leaves it unused, as the admission policy does) and each function axis."""
    ranking = spec.ranking
    found = [("spec.ranking.function", ranking.function)] if ranking.function else []
    found += [(f"spec.ranking.axes[{n}].function", a.function) for n, a in enumerate(ranking.axes or []) if a.function]
    return found


def violations(spec: IterativeDPORunSpec, policy: Policy) -> list[str]:
    """What `spec` asks for that `policy` does not allow, one `field: rule` line each."""
    rt, out = spec.runtime, []
    if rt.image and policy.images is not None and not any(rt.image.startswith(p) for p in policy.images):
        out.append(
            f"spec.runtime.image: {rt.image!r} is not an allowed stage image (prefixes: {_listed(policy.images)})"
        )
    for field, function in scorer_functions(spec):
        if not _module_allowed(function, policy.function_modules):
            out.append(f"{field}: module of {function!r} is not allowed (modules: {_listed(policy.function_modules)})")
    for n, env in enumerate(rt.env):
        ref = ((env.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
        if ref is not None and not _allowed(ref, policy.secrets):
            out.append(f"spec.runtime.env[{n}].valueFrom.secretKeyRef: Secret {ref!r} is not allowed")
    for n, source in enumerate(rt.env_from):
        ref = (source.get("secretRef") or {}).get("name")
        if ref is not None and not _allowed(ref, policy.secrets):
            out.append(f"spec.runtime.envFrom[{n}].secretRef: Secret {ref!r} is not allowed")
    mlflow = spec.tracking.mlflow
    if mlflow and mlflow.credentials_secret and not _allowed(mlflow.credentials_secret, policy.secrets):
        out.append(f"spec.tracking.mlflow.credentialsSecret: Secret {mlflow.credentials_secret!r} is not allowed")
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


def security_violations(context: dict[str, Any]) -> list[str]:
    """runtime.podSecurityContext may not weaken the restricted profile (not a policy choice)."""
    field, out = "spec.runtime.podSecurityContext", []
    for key in sorted(set(context) - SECURITY_FIELDS):
        out.append(f"{field}.{key}: not allowed (only {', '.join(sorted(SECURITY_FIELDS))})")
    if context.get("runAsNonRoot") is False:
        out.append(f"{field}.runAsNonRoot: false is not allowed: stages never run as root")
    if context.get("runAsUser") == 0:
        out.append(f"{field}.runAsUser: 0 is not allowed: stages never run as root")
    for key in ("seccompProfile", "appArmorProfile"):
        profile = context.get(key)
        if profile is not None and (not isinstance(profile, dict) or profile.get("type") not in CONFINED_PROFILES):
            out.append(f"{field}.{key}: type must be one of {', '.join(CONFINED_PROFILES)}")
    return out
