"""GitOps health: the Argo CD Lua script and the Flux CEL expressions, run against real statuses.

The statuses come from `status.build_status` / `invalid_status`, the functions the operator uses
to write them, across a run's life: Pending, Running, Suspended, Succeeded, Failed, InvalidSpec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import lupa
import pytest
import yaml
from idpo_jobs.config import Stage, Workspace
from idpo_operator import plan
from idpo_operator.plan import StageKey
from idpo_operator.spec import parse_manifest
from idpo_operator.status import Phase, StageRecord, build_status, invalid_status

from tests.conftest import manifest

GITOPS = Path(__file__).parent.parent / "deploy" / "gitops"
WS = Workspace("idpo/r-0000")


def lifecycle() -> dict[str, dict[str, Any]]:
    spec = parse_manifest(manifest(iterations=1)).spec
    keys = plan.all_stages(spec)
    ok = StageRecord(phase=Phase.SUCCEEDED, attempts=1)
    return {
        "pending": build_status(spec, {}, WS),
        "running": build_status(spec, {keys[0]: ok, keys[1]: StageRecord(phase=Phase.RUNNING, attempts=1)}, WS),
        "suspended": build_status(parse_manifest(manifest(iterations=1, suspend=True)).spec, {}, WS),
        "succeeded": build_status(spec, dict.fromkeys(keys, ok), WS),
        "failed": build_status(
            spec,
            {
                keys[0]: ok,
                StageKey(1, Stage.RANK): StageRecord(phase=Phase.FAILED, attempts=3, message="exit 2: bad ranker"),
            },
            WS,
        ),
        "invalid": invalid_status("spec.iterations: must be >= 1", generation=1),
    }


def run_object(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "idpo.dev/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": "r", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)

    def table(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: table(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([table(v) for v in value])
        return value

    lua.globals().obj = table(obj)
    hs = lua.execute((GITOPS / "argocd-health.lua").read_text())
    return hs["status"], hs["message"]


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("pending", "Progressing"),
        ("running", "Progressing"),
        ("suspended", "Suspended"),
        ("succeeded", "Healthy"),
        ("failed", "Degraded"),
        ("invalid", "Degraded"),
    ],
)
def test_argocd_health_follows_the_run(state: str, expected: str) -> None:
    status = lifecycle()[state]
    health, message = argocd_health(run_object(status))
    assert health == expected and message == status["message"]


def test_argocd_waits_for_the_operator_to_observe_a_new_generation() -> None:
    assert argocd_health(run_object(None))[0] == "Progressing"
    stale = lifecycle()["succeeded"]  # observedGeneration 1
    assert argocd_health(run_object(stale, generation=2)) == (
        "Progressing",
        "The idpo operator has not observed generation 2 yet",
    )


def flux_health(obj: dict[str, Any]) -> str:
    """Flux's evaluation (RFC 0009): generation check, then inProgress, failed, current; else InProgress."""
    doc = yaml.safe_load((GITOPS / "flux-kustomization.yaml").read_text())
    (check,) = doc["spec"]["healthCheckExprs"]
    observed = obj.get("status", {}).get("observedGeneration")
    if observed is not None and observed != obj["metadata"]["generation"]:
        return "InProgress"
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(v) for k, v in obj.items()}
    for name, verdict in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if bool(env.program(env.compile(check[name])).evaluate(activation)):
            return verdict
    return "InProgress"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("pending", "InProgress"),
        ("running", "InProgress"),
        ("suspended", "InProgress"),
        ("succeeded", "Current"),
        ("failed", "Failed"),
        ("invalid", "Failed"),
    ],
)
def test_flux_health_expressions_follow_the_run(state: str, expected: str) -> None:
    assert flux_health(run_object(lifecycle()[state])) == expected


def test_flux_waits_for_the_operator_to_observe_a_new_generation() -> None:
    assert flux_health(run_object(lifecycle()["succeeded"], generation=2)) == "InProgress"


def kstatus(obj: dict[str, Any]) -> str:
    """kstatus' generic rules for custom resources (sigs.k8s.io/cli-utils), which Flux `wait` uses."""
    status = obj.get("status") or {}
    if status.get("observedGeneration", obj["metadata"]["generation"]) != obj["metadata"]["generation"]:
        return "InProgress"
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    if conditions.get("Stalled") == "True":
        return "Failed"
    if conditions.get("Reconciling") == "True":
        return "InProgress"
    return "Current"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("pending", "InProgress"),
        ("running", "InProgress"),
        ("succeeded", "Current"),
        ("failed", "Failed"),
        ("invalid", "Failed"),
        ("suspended", "Current"),
    ],
)
def test_kstatus_reads_the_conditions_as_documented(state: str, expected: str) -> None:
    # A suspended run is Current for kstatus: nothing is reconciling and nothing is stuck (docs/gitops.md).
    assert kstatus(run_object(lifecycle()[state])) == expected
