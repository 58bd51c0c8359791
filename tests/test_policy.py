"""The trust model's rules in the operator: what a policy refuses (naming the field), what it lets
through, and that a refused run gets no Job. The same cases run against the chart's admission policy on
the real apiserver in tests/test_security.py."""

from __future__ import annotations

import json
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
MLFLOW = {"trackingUri": "https://ml.example.com/mlflow", "credentialsSecret": "mlflow-creds"}
TRACKING = Policy(secrets=["mlflow-creds"], endpoints=["https://ml.example.com/mlflow"])
JUDGE = {"name": "gpt4", "endpoint": {"baseUrl": "https://api.openai.com/v1", "model": "gpt-4-1106-preview",
                                      "apiKeySecret": {"name": "openai", "key": "api-key"}}}  # fmt: skip
JUDGES = Policy(secrets=["openai"], endpoints=["https://api.openai.com/v1", "http://judge.llm.svc:8000/v1"])
# The issue's two manifests: a ranker that prints a Secret it reads into status, one that runs prompts as code.
SECRET_READER = {
    "ranking": {"ranker": "function", "function": "os:getenv", "model": None},
    "runtime": {"env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "db-password", "key": "p"}}}]},
}
SHIPPED = {"ranker": "function", "function": "idpo_jobs.rewards:starts_with_s", "model": None}
PROMPTS_AS_CODE = {"ranking": {"ranker": "function", "function": "timeit:timeit", "model": None}}

# (spec override, policy, the fields refused: [] when it is allowed)
CASES: dict[str, tuple[dict[str, Any], Policy, list[str]]] = {
    "a-plain-run": ({}, DEFAULT, []),
    "secret-reader": (SECRET_READER, DEFAULT, ["spec.ranking.function", "spec.runtime.env[0].name",
                                               "spec.runtime.env[0].valueFrom.secretKeyRef"]),
    "prompts-as-code": (PROMPTS_AS_CODE, DEFAULT, ["spec.ranking.function"]),
    "shipped-ranker": ({"ranking": SHIPPED}, DEFAULT, []),
    "a-look-alike-module": ({"ranking": {"ranker": "function", "function": "idpo_jobs.rewardsx:f", "model": None}},
                            DEFAULT, ["spec.ranking.function"]),
    "hf-token-allowed": ({"runtime": {"env": [HF_TOKEN]}}, Policy(secrets=["hf-token"]), []),
    "hf-token-not-allowed": ({"runtime": {"env": [HF_TOKEN]}}, DEFAULT, ["spec.runtime.env[0].valueFrom.secretKeyRef"]),
    "env-from-a-secret": ({"runtime": {"envFrom": [{"secretRef": {"name": "s3"}}]}}, DEFAULT,
                          ["spec.runtime.envFrom[0].secretRef", "spec.runtime.envFrom[0]"]),
    "env-from-a-config-map": ({"runtime": {"envFrom": [{"configMapRef": {"name": "settings"}}]}}, DEFAULT,
                              ["spec.runtime.envFrom[0]"]),
    "env-from-a-listed-source": ({"runtime": {"envFrom": [{"configMapRef": {"name": "settings"}}]}},
                                 Policy(env_from=["ConfigMap/settings"]), []),
    "env-from-with-a-prefix": ({"runtime": {"envFrom": [{"prefix": "LD_", "configMapRef": {"name": "settings"}}]}},
                               Policy(env_from=["ConfigMap/settings"]), ["spec.runtime.envFrom[0].prefix"]),
    # Class 1 of issue 30: what a variable can make every Python process run, load or trust.
    "warnings-and-browser": ({"runtime": {"env": [{"name": "PYTHONWARNINGS", "value": "ignore::antigravity.X"},
                                                  {"name": "BROWSER", "value": "sh -c 'id' %s"}]}}, DEFAULT,
                             ["spec.runtime.env[0].name", "spec.runtime.env[1].name"]),
    "the-loader": ({"runtime": {"env": [{"name": "LD_PRELOAD", "value": "/workspace/x.so"}]}}, DEFAULT,
                   ["spec.runtime.env[0].name"]),
    "python-path": ({"runtime": {"env": [{"name": "PYTHONPATH", "value": "/workspace/x"},
                                         {"name": "PYTHONSTARTUP", "value": "/workspace/x.py"}]}}, DEFAULT,
                    ["spec.runtime.env[0].name", "spec.runtime.env[1].name"]),
    "pickle-switch": ({"runtime": {"env": [{"name": "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "value": "1"}]}}, DEFAULT,
                      ["spec.runtime.env[0].name"]),
    "the-stage-contract": ({"runtime": {"env": [{"name": "IDPO_TERMINATION_LOG", "value": "/workspace/x"},
                                                {"name": "IDPO_PVC_ROOT", "value": "/"}]}}, DEFAULT,
                           ["spec.runtime.env[0].name", "spec.runtime.env[1].name"]),
    "an-nccl-plugin": ({"runtime": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"},
                                            {"name": "NCCL_NET_PLUGIN", "value": "/workspace/evil"},
                                            {"name": "NCCL_CONF_FILE", "value": "/workspace/nccl.conf"},
                                            {"name": "NCCL_COMM_ID", "value": "attacker.example:5000"}]}}, DEFAULT,
                       ["spec.runtime.env[1].name", "spec.runtime.env[2].name", "spec.runtime.env[3].name"]),
    "threads-and-token": ({"runtime": {"env": [{"name": "OMP_NUM_THREADS", "value": "4"}, HF_TOKEN]}},
                          Policy(secrets=["hf-token"]), []),
    "a-name-opened-on-purpose": ({"runtime": {"env": [{"name": "PYTHONWARNINGS", "value": "error"}]}},
                                 Policy(env=["PYTHONWARNINGS"]), []),
    "a-pattern-never-admits-a-path": ({"runtime": {"env": [{"name": "NCCL_TOPO_FILE", "value": "/x"}]}},
                                      Policy(env=["NCCL_*"]), ["spec.runtime.env[0].name"]),
    # Class 3: an allowed Secret sent where the run likes.
    "hub-endpoint": ({"runtime": {"env": [HF_TOKEN, {"name": "HF_ENDPOINT", "value": "http://attacker"}]}},
                     Policy(secrets=["hf-token"]), ["spec.runtime.env[1].name"]),
    "a-proxy": ({"runtime": {"env": [{"name": "HTTPS_PROXY", "value": "http://attacker:3128"}]}}, DEFAULT,
                ["spec.runtime.env[0].name"]),
    "tracking-credentials-elsewhere": ({"tracking": {"mlflow": {**MLFLOW, "trackingUri": "http://attacker:5000"}}},
                                       TRACKING, ["spec.tracking.mlflow.trackingUri"]),
    "tracking-credentials-at-a-look-alike-path": (
        {"tracking": {"mlflow": {**MLFLOW, "trackingUri": "https://ml.example.com/mlflow-evil"}}}, TRACKING,
        ["spec.tracking.mlflow.trackingUri"]),
    "tracking-credentials-behind-a-user-part": (
        {"tracking": {"mlflow": {**MLFLOW, "trackingUri": "https://ml.example.com@attacker/mlflow"}}}, TRACKING,
        ["spec.tracking.mlflow.trackingUri"]),
    "tracking-credentials-at-the-endpoint": ({"tracking": {"mlflow": {**MLFLOW, "trackingUri":
                                              "https://ml.example.com:443/mlflow/"}}}, TRACKING, []),
    "tracking-without-credentials": ({"tracking": {"mlflow": {"trackingUri": "http://anywhere:5000"}}}, DEFAULT, []),
    "tracking-into-the-container": ({"tracking": {"mlflow": {"trackingUri": "file:///workspace/other-run"}}},
                                    DEFAULT, ["spec.tracking.mlflow.trackingUri"]),
    # LLM judges: a key only to an allowed endpoint, and no endpoint outside the list even without a key (SSRF).
    "judge-key-at-an-allowed-endpoint": ({"evaluation": {"judges": [JUDGE]}}, JUDGES, []),
    "judge-key-from-another-secret": (
        {"evaluation": {"judges": [{**JUDGE, "endpoint": {**JUDGE["endpoint"],
                                                          "apiKeySecret": {"name": "db", "key": "p"}}}]}},
        JUDGES, ["spec.evaluation.judges[0].endpoint.apiKeySecret"]),
    "judge-key-elsewhere": ({"evaluation": {"judges": [{**JUDGE, "endpoint": {**JUDGE["endpoint"],
                                                        "baseUrl": "https://api.openai.com.attacker.io/v1"}}]}},
                            JUDGES, ["spec.evaluation.judges[0].endpoint.baseUrl"]),
    "judge-key-under-the-default-policy": ({"evaluation": {"judges": [JUDGE]}}, DEFAULT,
                                           ["spec.evaluation.judges[0].endpoint.apiKeySecret",
                                            "spec.evaluation.judges[0].endpoint.baseUrl"]),
    "keyless-judge-at-an-internal-address": ({"evaluation": {"judges": [{"name": "x", "endpoint": {
                                                 "baseUrl": "http://169.254.169.254/latest", "model": "m"}}]}},
                                             JUDGES, ["spec.evaluation.judges[0].endpoint.baseUrl"]),
    "keyless-judge-in-the-cluster-allowed": ({"evaluation": {"judges": [{"name": "x", "endpoint": {
                                                 "baseUrl": "http://judge.llm.svc:8000/v1", "model": "m"}}]}},
                                             JUDGES, []),
    # Class 2: a checkpoint's own code.
    "remote-code": ({"model": {"trustRemoteCode": True}}, DEFAULT, ["spec.model.trustRemoteCode"]),
    "remote-code-allowed": ({"model": {"trustRemoteCode": True}, "ranking": {"trustRemoteCode": True}},
                            Policy(images=None, remote_code=["tiny://"]), []),
    "ranker-remote-code": ({"ranking": {"trustRemoteCode": True}}, Policy(remote_code=["tiny://policy"]),
                           ["spec.ranking.trustRemoteCode"]),
    "an-approved-model-registry": ({}, Policy(models=["mistralai/", "tiny://pairrm"]), ["spec.model.name"]),
    # Class 8: paths off the claim, images by registry/repository.
    "an-absolute-model": ({"model": {"name": "/workspace/idpo/other-run/iter-3/train/model"}}, DEFAULT,
                          ["spec.model.name"]),
    "relative-paths": ({"prompts": {"source": "../etc/prompts.jsonl"}, "ranking": {"model": "./ranker"}}, DEFAULT,
                       ["spec.ranking.model", "spec.prompts.source"]),
    "an-absolute-evaluation-source": ({"evaluation": {"prompts": {"source": "/root/x.jsonl"}}}, DEFAULT,
                                      ["spec.evaluation.prompts.source"]),
    "hub-ids-and-the-claim": ({"model": {"name": "mistralai/Mistral-7B-Instruct-v0.2"},
                               "prompts": {"source": "pvc://idpo/other-run/prompts.jsonl"}}, DEFAULT, []),
    "a-registry-named-like-the-repository": ({"runtime": {"image": "idpo-jobs:5000/attacker/evil"}},
                                             Policy(images=["idpo-jobs:"]), ["spec.runtime.image"]),
    "a-tag-of-the-repository": ({"runtime": {"image": "idpo-jobs:2"}}, Policy(images=["idpo-jobs:"]), []),
    "a-pinned-tag": ({"runtime": {"image": "registry.example.com/ml/idpo-jobs:2"}},
                     Policy(images=["registry.example.com/ml/idpo-jobs:1"]), ["spec.runtime.image"]),
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
    # Class 4: nulls that would remove the profile's own settings.
    "nulls": ({"runtime": {"podSecurityContext": {"seccompProfile": None, "runAsNonRoot": None}}}, DEFAULT,
              ["spec.runtime.podSecurityContext.runAsNonRoot", "spec.runtime.podSecurityContext.seccompProfile"]),
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
    assert DEFAULT.images == ["ghcr.io/idpo-dev/idpo-jobs"]
    assert DEFAULT.function_modules == ["idpo_jobs.rewards"] and DEFAULT.secrets == []


def test_a_policy_file_has_the_chart_values_shape(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("images: null\nfunctionModules: [mylab.rewards]\nsecrets: [hf-token]\nserviceAccounts: []\n")
    loaded = policy.load(path)
    assert (loaded.images, loaded.function_modules, loaded.secrets) == (None, ["mylab.rewards"], ["hf-token"])
    path.write_text("secret: [typo]\n")
    with pytest.raises(ValueError, match="secret"):
        policy.load(path)


def test_the_rendered_pod_template_is_judged_as_pod_security_admission_would() -> None:
    from idpo_jobs.config import Stage
    from idpo_operator import plan, resources
    from idpo_operator.plan import StageKey

    s, owner, key = spec(), resources.Owner("r", "ns", "uid-12345678"), StageKey(1, Stage.TRAIN)
    config = plan.stage_config(s, "r", resources.workspace(s, owner), key)
    template = resources.build_job(resources.Launch(s, owner, key, config))["spec"]["template"]
    assert policy.pod_template_violations(template) == []
    del template["spec"]["securityContext"]["seccompProfile"]
    template["spec"]["containers"][0]["securityContext"] |= {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}
    template["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    found = [line.split(":")[0] for line in policy.pod_template_violations(template)]
    assert found == [
        "spec.volumes[4]",
        "spec.containers[0].securityContext.seccompProfile",
        "spec.containers[0].securityContext.privileged",
        "spec.containers[0].securityContext.capabilities.drop",
        "spec.containers[0].securityContext.capabilities.add",
    ]


def test_a_stage_whose_pod_template_would_not_be_restricted_is_refused_not_created(monkeypatch) -> None:
    """The template, not the spec, is judged: a default the builder lost is caught before any Job exists."""
    from idpo_operator import resources

    monkeypatch.setitem(resources.POD_SECURITY, "runAsNonRoot", False)
    d = decide(
        RunView("r", "ns", "uid-12345678", 1, manifest()["spec"]), [], [], NOW, settings=Settings(policy=DEFAULT)
    )
    assert d.create == [] and d.status["phase"] == "Failed"
    assert "Job r-i1-generate pod template: spec.containers[0].securityContext.runAsNonRoot" in d.status["message"]
    assert {c["type"]: c["reason"] for c in d.status["conditions"]}["Stalled"] == "PolicyDenied"


def frozen_then_rank_done(ranking: dict[str, Any], rules: Policy) -> tuple[RunView, list[Any]]:
    """A run whose generate and rank completed under `rules`: its status (with the sections they froze)
    and the Jobs the train stage follows."""
    from idpo_jobs.config import Stage
    from idpo_operator.plan import StageKey

    from tests.test_reconcile import job

    g1, r1 = StageKey(1, Stage.GENERATE), StageKey(1, Stage.RANK)
    doc = manifest(ranking=ranking)["spec"]
    status = decide(RunView("r", "ns", "uid-12345678", 1, doc), [], [], NOW, settings=Settings(policy=rules)).status
    run = RunView("r", "ns", "uid-12345678", 1, doc, status)
    status = decide(run, [job(g1, "Complete")], [], NOW, settings=Settings(policy=rules)).status
    return RunView("r", "ns", "uid-12345678", 1, doc, status), [job(g1, "Complete"), job(r1, "Complete")]


def test_a_function_written_into_a_frozen_section_is_refused_before_the_next_stage_runs_it() -> None:
    run, jobs = frozen_then_rank_done(SHIPPED, DEFAULT)
    status = json.loads(json.dumps(run.status))
    (digest,) = status["frozenSpecs"]
    status["frozenSpecs"][digest]["ranking"]["function"] = "os:getenv"  # someone who may write status
    d = decide(
        RunView("r", "ns", "uid-12345678", 1, run.spec, status), jobs, [], NOW, settings=Settings(policy=DEFAULT)
    )
    assert d.create == [] and d.status["phase"] == "Failed"
    assert d.status["message"].startswith(f"refused by policy: status.frozenSpecs.{digest}.ranking.function: ")
    assert {c["type"]: c["reason"] for c in d.status["conditions"]}["Stalled"] == "PolicyDenied"
    assert d.status["frozenSpecs"] == status["frozenSpecs"]  # nothing recorded is lost


def test_a_policy_tightened_mid_run_holds_for_the_sections_the_iteration_froze() -> None:
    run, jobs = frozen_then_rank_done(SHIPPED, DEFAULT)
    # The admins withdraw the shipped rankers; the run's spec moves on to PairRM (from the next iteration).
    tightened = Policy(images=DEFAULT.images, function_modules=[])
    live = manifest()["spec"]
    d = decide(
        RunView("r", "ns", "uid-12345678", 2, live, run.status), jobs, [], NOW, settings=Settings(policy=tightened)
    )
    assert d.create == [] and "status.frozenSpecs." in d.status["message"]
    assert ".ranking.function: module of 'idpo_jobs.rewards:starts_with_s' is not allowed" in d.status["message"]
    # Under the policy it started with, the same observation starts the train stage.
    same = decide(
        RunView("r", "ns", "uid-12345678", 2, live, run.status), jobs, [], NOW, settings=Settings(policy=DEFAULT)
    )
    assert same.create[-1]["metadata"]["name"] == "r-i1-train"


def test_the_charts_default_policy_is_the_operators() -> None:
    """One default, whether the operator reads the chart's ConfigMap or runs without a policy file."""
    import yaml

    from tests.harness import chart

    (config_map,) = [
        d for d in chart.render() if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-policy")
    ]
    assert Policy.model_validate(yaml.safe_load(config_map["data"]["policy.yaml"])) == DEFAULT
