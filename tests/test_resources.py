"""Child objects: deterministic names, identifying labels only, and a hardened Job spec."""

from __future__ import annotations

import json

import pytest
from idpo_jobs.config import Stage
from idpo_operator import plan, resources
from idpo_operator.plan import StageKey
from idpo_operator.spec import parse_manifest

from tests.conftest import manifest

OWNER = resources.Owner("mistral", "ml", "0123456789abcdef")
RANK = StageKey(2, Stage.RANK)


def spec(**kw):
    return parse_manifest(manifest(**kw)).spec


def launch(s=None, key=RANK, **kw) -> resources.Launch:
    s = s or spec()
    return resources.Launch(s, OWNER, key, plan.stage_config(s, OWNER.name, resources.workspace(s, OWNER), key), **kw)


def job(s=None, key=RANK, **kw):
    return resources.build_job(launch(s, key, **kw))


def test_child_names_are_deterministic_and_fit_in_a_label() -> None:
    assert resources.job_name("mistral", RANK) == "mistral-i2-rank"
    long = "r" * 80
    a, b = resources.job_name(long, RANK), resources.job_name(long + "x", RANK)
    assert len(a) <= 63 and a.endswith("-i2-rank") and a != b and a == resources.job_name(long, RANK)


def test_job_is_an_indexed_job_with_one_completion_per_shard() -> None:
    body = job(spec(ranking={"shards": 3}))
    assert body["metadata"]["name"] == "mistral-i2-rank"
    assert (body["spec"]["completionMode"], body["spec"]["completions"], body["spec"]["parallelism"]) == (
        "Indexed",
        3,
        3,
    )
    container = body["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-I", "-u", "-m", "idpo_jobs.rank", "--config", "/etc/idpo/config.json"]
    assert {"name": "IDPO_PVC_ROOT", "value": "/workspace"} in container["env"]


def test_children_carry_the_owner_and_identifying_labels_only() -> None:
    body = job()
    assert body["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "idpo.dev/v1alpha1",
            "kind": "IterativeDPORun",
            "name": "mistral",
            "uid": "0123456789abcdef",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert body["metadata"]["labels"] == {
        "app.kubernetes.io/name": "idpo",
        "app.kubernetes.io/managed-by": "idpo-operator",
        "idpo.dev/run": "mistral",
        "idpo.dev/iteration": "2",
        "idpo.dev/stage": "rank",
    }
    assert body["spec"]["template"]["metadata"]["labels"] == body["metadata"]["labels"]


def test_pod_is_hardened_and_gets_no_service_account_token() -> None:
    pod = job()["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    sc = pod["containers"][0]["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def test_failure_policy_ignores_disruptions_and_does_not_retry_bad_input() -> None:
    body = job(spec(runtime={"retries": 4}))
    rules = body["spec"]["podFailurePolicy"]["rules"]
    assert (body["spec"]["backoffLimitPerIndex"], body["spec"]["maxFailedIndexes"]) == (4, 0)  # per shard
    assert "backoffLimit" not in body["spec"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [2, 28]  # bad input, volume full


def test_runtime_settings_reach_the_pod() -> None:
    s = spec(
        runtime={
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "priorityClassName": "batch",
            "queueName": "team-a",
            "serviceAccountName": "trainer",
            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}],
            "envFrom": [{"secretRef": {"name": "s3"}}],
            "activeDeadlineSeconds": 3600,
        },
        training={"resources": {"limits": {"nvidia.com/gpu": 8, "memory": "400Gi"}}},
    )
    body = job(s, StageKey(1, Stage.TRAIN))
    pod = body["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert (pod["nodeSelector"], pod["priorityClassName"], pod["serviceAccountName"]) == (
        {"gpu": "h100"},
        "batch",
        "trainer",
    )
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "8", "memory": "400Gi"}}  # quantities as strings
    assert container["env"][0]["name"] == "HF_TOKEN" and container["envFrom"] == [{"secretRef": {"name": "s3"}}]
    assert body["spec"]["activeDeadlineSeconds"] == 3600


@pytest.mark.parametrize(("retain", "owned"), [(True, False), (False, True)])
def test_workspace_claim_is_retained_by_default(retain: bool, owned: bool) -> None:
    pvc = resources.build_pvc(spec(storage={"retainOnDelete": retain, "size": "1Ti"}), OWNER)
    assert pvc is not None and pvc["metadata"]["name"] == "mistral-workspace"
    assert ("ownerReferences" in pvc["metadata"]) is owned
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Ti"


def test_existing_claim_is_used_and_not_created() -> None:
    s = spec(storage={"existingClaim": "shared"})
    assert resources.build_pvc(s, OWNER) is None
    assert job(s)["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "shared"}


def test_workspace_is_per_run_uid_and_relative_to_the_volume() -> None:
    ws = resources.workspace(spec(), OWNER)
    assert str(ws.root) == "idpo/mistral-01234567"
    assert ws.checkpoint_uri(1) == "pvc://idpo/mistral-01234567/iter-1/train/model"


def test_the_stage_config_travels_in_the_job_and_is_mounted_through_the_downward_api() -> None:
    body = job(spec(ranking={"batchSize": 99}))
    template = body["spec"]["template"]
    config = json.loads(template["metadata"]["annotations"][resources.ANNOTATION_CONFIG])
    assert config["stage"] == "rank" and config["ranking"]["batchSize"] == 99
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
    field = f"metadata.annotations['{resources.ANNOTATION_CONFIG}']"
    assert volume["downwardAPI"]["items"] == [{"path": "config.json", "fieldRef": {"fieldPath": field}}]
    mount = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}["config"]
    assert mount == {"name": "config", "mountPath": "/etc/idpo", "readOnly": True}


def test_finished_jobs_expire_when_a_ttl_is_set() -> None:
    assert job(ttl_seconds=600)["spec"]["ttlSecondsAfterFinished"] == 600
    assert "ttlSecondsAfterFinished" not in job()["spec"]


def test_training_launches_through_torchrun_with_the_kubeflow_trainer_environment() -> None:
    body = job(spec(training={"resources": {"limits": {"nvidia.com/gpu": 8}}}), StageKey(1, Stage.TRAIN))
    container = body["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:6] == ["python", "-I", "-u", "-m", "idpo_jobs.distributed", "train"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_MASTER_PORT"]) == ("1", "8", "29500")
    assert env["HOME"].startswith("/tmp/") and env["XDG_CACHE_HOME"].startswith(
        "/tmp/"
    )  # writable under a read-only root


def test_names_stay_valid_for_any_run_name_kubernetes_accepts() -> None:
    dotted, long = "team.a.run", "r" * 253
    assert resources.job_name(dotted, RANK).startswith("team-a-run-") and "." not in resources.job_name(dotted, RANK)
    assert len(resources.job_name(long, RANK)) <= 52 and resources.job_name(long, RANK).endswith("-i2-rank")
    assert resources.job_name("team-a-run", RANK) != resources.job_name(dotted, RANK)  # no collision
    assert resources.run_label(dotted) == dotted and len(resources.run_label(long)) <= 63
    assert len(resources.child_name(long, "workspace")) <= 253
    folder = resources.workspace(spec(), resources.Owner(long, "ml", "0123456789abcdef")).root.name
    assert len(folder) <= 128 and folder.endswith("-01234567")


TRAIN = StageKey(1, Stage.TRAIN)
TWO_NODES = {
    "training": {"distributed": {"nodes": 2, "processesPerNode": 4}, "resources": {"limits": {"nvidia.com/gpu": 4}}},
    "storage": {"accessModes": ["ReadWriteMany"]},
    "runtime": {"queueName": "gpu", "retries": 3},
}


def test_a_train_stage_on_several_nodes_is_one_indexed_job_that_fails_whole() -> None:
    s = spec(**TWO_NODES)
    body = job(s, TRAIN)
    js, pod = body["spec"], body["spec"]["template"]["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"]) == ("Indexed", 2, 2)
    # The first failed pod fails the Job; the operator, not the Job controller, restarts the gang.
    assert js["backoffLimit"] == 0 and "backoffLimitPerIndex" not in js
    rules = js["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob", "FailJob"]
    assert rules[0]["onPodConditions"] == [{"type": "DisruptionTarget"}]
    assert rules[1]["onExitCodes"]["values"] == [2, 28]
    assert body["metadata"]["annotations"][resources.ANNOTATION_ATTEMPT] == "1"
    assert body["metadata"]["labels"][resources.LABEL_QUEUE] == "gpu"  # Kueue admits the gang as one
    assert any(v["name"] == "dshm" and v["emptyDir"] == {"medium": "Memory"} for v in pod["volumes"])


def test_the_gang_finds_its_rank_zero_pod_through_a_headless_service() -> None:
    s = spec(**TWO_NODES)
    body = job(s, TRAIN)
    (service,) = [o for o in resources.stage_objects(launch(s, TRAIN)) if o["kind"] == "Service"]
    pod = body["spec"]["template"]
    name = body["metadata"]["name"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["PET_MASTER_ADDR"]["value"] == f"{name}-0.{name}"
    assert (env["PET_NNODES"]["value"], env["PET_NPROC_PER_NODE"]["value"]) == ("2", "4")
    rank = env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert rank == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # A node that cannot start is the start deadline's to report (600 s), before torchrun gives up.
    assert env["PET_RDZV_CONF"]["value"] == "timeout=900"


def test_one_node_needs_no_service_and_keeps_per_shard_retries() -> None:
    s = spec()
    objects = resources.stage_objects(launch(s, TRAIN, attempt=3))
    assert [o["kind"] for o in objects] == ["Job"]
    assert objects[0]["spec"]["backoffLimitPerIndex"] == 2
    assert objects[0]["metadata"]["annotations"][resources.ANNOTATION_ATTEMPT] == "3"  # the attempt it starts at


def test_a_service_name_starts_with_a_letter_whatever_the_run_name() -> None:
    name = resources.service_name("7b-run", TRAIN)
    assert name[0].isalpha() and len(name) <= 63 and name != resources.service_name("8b-run", TRAIN)
    assert resources.service_name("run", TRAIN) == resources.job_name("run", TRAIN)


def test_the_operators_own_variables_come_after_the_runs_and_win() -> None:
    """A kubelet keeps the last entry of a name (and env over envFrom): the stage's paths and termination
    log are the operator's whatever the run sets."""
    hostile = [{"name": n, "value": "/"} for n in ("IDPO_PVC_ROOT", "IDPO_TERMINATION_LOG", "IDPO_PVC_CLAIM", "HOME")]
    container = job(spec(runtime={"env": hostile}))["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}  # what the process sees: the last one
    assert env["IDPO_PVC_ROOT"] == "/workspace" and env["IDPO_TERMINATION_LOG"] == "/dev/termination-log"
    assert env["IDPO_PVC_CLAIM"] == "mistral-workspace" and env["HOME"] == "/tmp/home"
    assert container["workingDir"] == "/tmp"  # a relative name resolves into the pod's own scratch


def test_tracking_credentials_come_by_key_never_as_a_whole_secret() -> None:
    tracking = {"mlflow": {"trackingUri": "https://ml.example.com", "credentialsSecret": "creds"}}
    container = job(spec(tracking=tracking))["spec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in container  # a key named LD_PRELOAD in that Secret becomes nothing
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert refs["MLFLOW_TRACKING_TOKEN"] == {"name": "creds", "key": "MLFLOW_TRACKING_TOKEN", "optional": True}
    assert {n for n, r in refs.items() if r["name"] == "creds"} == set(resources.MLFLOW_CREDENTIALS)


def test_a_judges_api_key_comes_from_its_secret_in_the_evaluate_stage_only() -> None:
    judges = [
        {"name": "gpt-4", "endpoint": {"baseUrl": "https://api.openai.com/v1", "model": "gpt-4-1106-preview",
                                       "apiKeySecret": {"name": "openai", "key": "api-key"}}},
        {"name": "local", "endpoint": {"baseUrl": "http://judge.llm.svc:8000/v1", "model": "m"}},
    ]  # fmt: skip
    s = spec(evaluation={"judges": judges})

    def refs(key: StageKey) -> dict[str, dict[str, str]]:
        container = job(s, key)["spec"]["template"]["spec"]["containers"][0]
        return {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }

    assert refs(StageKey(2, Stage.EVALUATE)) == {"IDPO_JUDGE_API_KEY_GPT_4": {"name": "openai", "key": "api-key"}}
    for stage in (Stage.GENERATE, Stage.RANK, Stage.TRAIN):
        assert refs(StageKey(2, stage)) == {}


def test_a_null_in_the_pod_security_context_keeps_the_restricted_default() -> None:
    nulls = {"seccompProfile": None, "runAsNonRoot": None, "fsGroup": None, "runAsUser": 1000680000}
    pod = job(spec(runtime={"podSecurityContext": nulls}))["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
        "fsGroupChangePolicy": "OnRootMismatch",
        "runAsUser": 1000680000,
    }  # fsGroup removed (OpenShift assigns it); the profile's own settings stay


def threads(s, key=RANK) -> list[str]:
    env = job(s, key)["spec"]["template"]["spec"]["containers"][0]["env"]
    return [e["value"] for e in env if e["name"] == "OMP_NUM_THREADS"]


TRAIN = StageKey(1, Stage.TRAIN)


@pytest.mark.parametrize(
    ("section", "resources_", "key", "expected"),
    [
        ("ranking", {"limits": {"cpu": "4"}, "requests": {"cpu": "2"}}, RANK, ["4"]),  # the limit first
        ("ranking", {"requests": {"cpu": 6}}, RANK, ["6"]),
        ("ranking", {"limits": {"cpu": "500m"}}, RANK, ["1"]),  # never 0
        ("ranking", {"limits": {"cpu": "2.5"}}, RANK, ["2"]),
        ("ranking", {"limits": {"memory": "8Gi"}}, RANK, []),  # no CPUs named: torch's own default
        ("ranking", {"limits": {"cpu": "inf"}}, RANK, []),  # no CPU count: the apiserver judges it
        ("ranking", {"limits": {"cpu": "1e308"}}, RANK, []),
        ("ranking", {"limits": {"cpu": "999999"}}, RANK, ["1024"]),
        ("generation", {"limits": {"cpu": "3"}}, StageKey(1, Stage.EVALUATE), ["3"]),  # evaluate sizes as generate
        ("training", {"limits": {"cpu": "16", "nvidia.com/gpu": 4}}, TRAIN, ["4"]),  # shared by 4 processes
    ],
    ids=["limit", "request", "millicores", "fraction", "no-cpu", "inf", "exponent", "huge", "evaluate", "processes"],
)
def test_torch_threads_follow_the_pods_cpus(section: str, resources_: dict, key: StageKey, expected: list) -> None:
    assert threads(spec(**{section: {"resources": resources_}}), key) == expected


def test_a_runs_own_thread_count_is_kept() -> None:
    own = {
        "runtime": {"env": [{"name": "OMP_NUM_THREADS", "value": "7"}]},
        "ranking": {"resources": {"limits": {"cpu": 2}}},
    }
    assert threads(spec(**own)) == ["7"]
