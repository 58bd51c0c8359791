"""The trust model's rules in the operator: what a policy refuses (naming the field), what it lets
through, and that a refused run gets no Job. The same cases run against the chart's admission policy on
the real apiserver in tests/test_security.py."""

from __future__ import annotations

from typing import Any

import pytest
from idpo_operator import policy
from idpo_operator.policy import Policy, violations
from idpo_operator.reconcile import RunView, Settings, decide
from idpo_operator.spec import IterativeDPORunSpec

from tests.conftest import manifest

NOW = "2026-01-01T00:00:00Z"
STAGE_IMAGE = "ghcr.io/idpo-dev/idpo-jobs:0.1.0"
DEFAULT = policy.default(STAGE_IMAGE)
HF_TOKEN = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
# The issue's two manifests: a ranker that prints a Secret it reads into status, one that runs prompts as code.
SECRET_READER = {
    "ranking": {"ranker": "function", "function": "os:getenv", "model": None},
    "runtime": {"env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "db-password", "key": "p"}}}]},
}
PROMPTS_AS_CODE = {"ranking": {"ranker": "function", "function": "timeit:timeit", "model": None}}

# (spec override, policy, the fields refused: [] when it is allowed)
CASES: dict[str, tuple[dict[str, Any], Policy, list[str]]] = {
    "a-plain-run": ({}, DEFAULT, []),
    "secret-reader": (SECRET_READER, DEFAULT, ["spec.ranking.function", "spec.runtime.env[0].valueFrom.secretKeyRef"]),
    "prompts-as-code": (PROMPTS_AS_CODE, DEFAULT, ["spec.ranking.function"]),
    "shipped-ranker": ({"ranking": {"ranker": "function", "function": "idpo_jobs.rewards:length", "model": None}},
                       DEFAULT, []),
    "a-look-alike-module": ({"ranking": {"ranker": "function", "function": "idpo_jobs.rewardsx:f", "model": None}},
                            DEFAULT, ["spec.ranking.function"]),
    "hf-token-allowed": ({"runtime": {"env": [HF_TOKEN]}}, Policy(secrets=["hf-token"]), []),
    "hf-token-not-allowed": ({"runtime": {"env": [HF_TOKEN]}}, DEFAULT, ["spec.runtime.env[0].valueFrom.secretKeyRef"]),
    "env-from-a-secret": ({"runtime": {"envFrom": [{"secretRef": {"name": "s3"}}]}}, DEFAULT,
                          ["spec.runtime.envFrom[0].secretRef"]),
    "env-from-a-config-map": ({"runtime": {"envFrom": [{"configMapRef": {"name": "settings"}}]}}, DEFAULT, []),
    "another-image": ({"runtime": {"image": "docker.io/evil/miner:1"}}, DEFAULT, ["spec.runtime.image"]),
    "a-look-alike-image": ({"runtime": {"image": "ghcr.io/idpo-dev/idpo-jobs-evil:1"}}, DEFAULT,
                           ["spec.runtime.image"]),
    "the-stage-image": ({"runtime": {"image": "ghcr.io/idpo-dev/idpo-jobs:0.2.0"}}, DEFAULT, []),
    "any-image": ({"runtime": {"image": "docker.io/x/y:1"}}, Policy(images=None), []),
    "a-service-account": ({"runtime": {"serviceAccountName": "admin"}}, DEFAULT, ["spec.runtime.serviceAccountName"]),
    "an-allowed-service-account": ({"runtime": {"serviceAccountName": "trainer"}},
                                   Policy(service_accounts=["trainer"]), []),
    "node-selector": ({"runtime": {"nodeSelector": {"gpu": "h100", "zone": "a"}}},
                      Policy(node_selectors=["gpu=h100"]), ["spec.runtime.nodeSelector"]),
    "toleration-of-every-taint": ({"runtime": {"tolerations": [{"operator": "Exists"}]}},
                                  Policy(tolerations=["nvidia.com/gpu"]), ["spec.runtime.tolerations[0]"]),
    "gpu-toleration": ({"runtime": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}},
                       Policy(tolerations=["nvidia.com/gpu"]), []),
    "priority-class": ({"runtime": {"priorityClassName": "system-cluster-critical"}},
                       Policy(priority_classes=["batch"]),
                       ["spec.runtime.priorityClassName"]),
    "root": ({"runtime": {"podSecurityContext": {"runAsUser": 0}}}, Policy(images=None),
             ["spec.runtime.podSecurityContext.runAsUser"]),
    "unconfined-seccomp": ({"runtime": {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}}},
                           Policy(images=None), ["spec.runtime.podSecurityContext.seccompProfile"]),
    "sysctls": ({"runtime": {"podSecurityContext": {"sysctls": [{"name": "kernel.x", "value": "1"}]}}},
                Policy(images=None), ["spec.runtime.podSecurityContext.sysctls"]),
    "openshift-fs-group": ({"runtime": {"podSecurityContext": {"fsGroup": None, "runAsUser": 1000680000}}},
                           DEFAULT, []),
}  # fmt: skip


def spec(**override: Any) -> IterativeDPORunSpec:
    return IterativeDPORunSpec.model_validate(manifest(**override)["spec"])


@pytest.mark.parametrize("case", list(CASES))
def test_a_policy_refuses_exactly_what_it_does_not_allow_and_names_the_field(case: str) -> None:
    override, rules, refused = CASES[case]
    found = violations(spec(**override), rules)
    assert [line.split(":")[0] for line in found] == refused, found


def test_a_refused_run_fails_with_the_field_named_and_gets_no_job() -> None:
    run = RunView("r", "ns", "uid-12345678", 1, manifest(**SECRET_READER)["spec"])
    d = decide(run, [], [], NOW, settings=Settings(policy=DEFAULT))
    assert d.create == [] and d.status["phase"] == "Failed"
    assert d.status["message"].startswith("refused by policy: spec.ranking.function: module of 'os:getenv'")
    assert {c["type"]: c["reason"] for c in d.status["conditions"]}["Stalled"] == "PolicyDenied"
    assert [e.reason for e in d.events] == ["PolicyDenied"]
    fixed = RunView("r", "ns", "uid-12345678", 2, manifest()["spec"], d.status)  # the spec fixed in Git
    assert [o["kind"] for o in decide(fixed, [], [], NOW, settings=Settings(policy=DEFAULT)).create][-1] == "Job"


def test_without_a_policy_file_the_operator_allows_its_own_stage_image_and_the_shipped_rankers() -> None:
    assert DEFAULT.images == ["ghcr.io/idpo-dev/idpo-jobs:", "ghcr.io/idpo-dev/idpo-jobs@"]
    assert DEFAULT.function_modules == ["idpo_jobs.rewards"] and DEFAULT.secrets == []


def test_a_policy_file_has_the_chart_values_shape(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("images: null\nfunctionModules: [mylab.rewards]\nsecrets: [hf-token]\nserviceAccounts: []\n")
    loaded = policy.load(path)
    assert (loaded.images, loaded.function_modules, loaded.secrets) == (None, ["mylab.rewards"], ["hf-token"])
    path.write_text("secret: [typo]\n")
    with pytest.raises(ValueError, match="secret"):
        policy.load(path)
