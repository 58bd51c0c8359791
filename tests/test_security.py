"""The trust model on the real apiserver (docs/security.md): the chart's admission policy refuses what a
run may not ask for, naming the field, and decides every generated spec as the operator's policy does;
without it the operator refuses the same, and creates no Job; a hostile environment never runs, even with
its names allowed on purpose; the frozen sections are judged again before each stage.
(A child of the predicted name that is not the run's: tests/test_faults.py.)"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from idpo_operator import policy
from idpo_operator.spec import GROUP, PLURAL, VERSION, IterativeDPORunSpec
from kubernetes import client
from pydantic import ValidationError

from tests.harness import chart
from tests.harness.cluster import VOLUME_MOUNT, Cluster, Target, slowed
from tests.test_operator_e2e import (
    CLAIM,
    delete_runs_afterwards,  # noqa: F401  (autouse: the e2e module's, here too)
    run_manifest,
    stage,
)
from tests.test_policy import PROMPTS_AS_CODE, SECRET_READER, SHIPPED

pytestmark = pytest.mark.slow
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
ALLOWED_SECRET = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "token"}}}
ROOT = {"podSecurityContext": {"runAsUser": 0}}  # refused by every policy: the probe of one in force
NULLS = {"podSecurityContext": {"seccompProfile": None, "runAsNonRoot": None}}  # issue 30, class 4


def create(cluster: Cluster, manifest: dict[str, Any]) -> Any:
    """`kubectl create`, which sends nulls as written (`kubectl apply` drops them on create)."""
    manifest["spec"]["runtime"].setdefault("image", cluster.image)
    return cluster.kubectl("create", "-f", "-", stdin=yaml.safe_dump(manifest))


def hostile_env(marker: str, planted: str) -> list[dict[str, str]]:
    """Issue 30's class 1: every Python process of the pod runs `touch <marker>-browser` (the warnings
    filter imports `antigravity`, which opens $BROWSER), and imports the sitecustomize planted on the claim."""
    return [
        {"name": "PYTHONWARNINGS", "value": "ignore::antigravity.X"},
        {"name": "BROWSER", "value": f"sh -c 'touch {marker}-browser' %s"},
        {"name": "PYTHONPATH", "value": planted},
    ]


def phase_of(status: dict[str, Any], name: str, iteration: int = 1) -> str | None:
    entries = [it for it in status.get("iterations") or [] if it.get("iteration") == iteration]
    return entries[0].get("stages", {}).get(name, {}).get("phase") if entries else None


@pytest.fixture(scope="module")
def cluster(kube: Target, tmp_path_factory: pytest.TempPathFactory):
    with Cluster(kube, tmp_path_factory.mktemp("security"), "security") as c:
        c.seed(CLAIM)
        yield c


def dry_run(cluster: Cluster, name: str, **spec: Any) -> client.ApiException | None:
    """Create a run with the server's dry run: None when admitted, else the apiserver's answer."""
    body = run_manifest(name, **spec)
    try:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, body, dry_run="All")
    except client.ApiException as err:
        return err
    return None


@contextmanager
def admission_policy(cluster: Cluster, values: dict[str, Any]) -> Iterator[policy.Policy]:
    """The chart's admission policy with `values`, bound to this namespace and in force; yields the
    operator's Policy from the same values (the chart's ConfigMap), and removes the admission policy after."""
    if cluster.target.plane is None:
        pytest.skip("installs a cluster-scoped admission policy, which only the local control plane is ours to change")
    docs = chart.render({"watchNamespaces": [cluster.namespace], "policy": values})
    admission = [d for d in docs if d["kind"] in POLICY_KINDS]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-policy")]
    rules = policy.Policy.model_validate(yaml.safe_load(config_map["data"]["policy.yaml"]))
    applied = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(admission))
    assert applied.returncode == 0, applied.stderr
    try:
        deadline = time.monotonic() + 30 * cluster.patience  # the apiserver starts enforcing it in a moment
        while dry_run(cluster, "probe", runtime=ROOT) is None:
            assert time.monotonic() < deadline, "the admission policy was never enforced"
            time.sleep(0.5)
        listed = cluster.kubectl("get", "validatingadmissionpolicy", admission[0]["metadata"]["name"], "-o", "json")
        warnings = json.loads(listed.stdout).get("status", {}).get("typeChecking", {}).get("expressionWarnings", [])
        assert warnings == [], warnings  # every expression type-checks against the CRD's schema
        yield rules
    finally:
        cluster.kubectl("delete", "-f", "-", stdin=yaml.safe_dump_all(admission))
        deadline = time.monotonic() + 30 * cluster.patience  # and the apiserver stops enforcing it a moment later
        while dry_run(cluster, "probe", runtime=ROOT) is not None:
            assert time.monotonic() < deadline, "the admission policy stayed in force"
            time.sleep(0.5)


SUITE = {"images": ["ghcr.io/idpo-dev/idpo-jobs"], "functionModules": ["idpo_jobs.rewards"], "secrets": ["hub-token"]}


def test_the_chart_admission_policy_refuses_a_run_naming_the_field(cluster: Cluster) -> None:
    with admission_policy(cluster, SUITE):
        refused = cluster.apply(run_manifest("reader", iterations=1, **SECRET_READER))
        assert refused.returncode != 0 and "spec.ranking.function: the module is not allowed" in refused.stderr
        code = cluster.apply(run_manifest("coder", iterations=1, **PROMPTS_AS_CODE))
        assert code.returncode != 0 and "spec.ranking.function" in code.stderr
        other = {"name": "HUGGING_FACE_HUB_TOKEN", "valueFrom": {"secretKeyRef": {"name": "db-password", "key": "p"}}}
        secret = cluster.apply(run_manifest("secret", iterations=1, runtime={"env": [ALLOWED_SECRET, other]}))
        assert secret.returncode != 0 and "spec.runtime.env: valueFrom.secretKeyRef" in secret.stderr
        names = cluster.apply(run_manifest("names", iterations=1, runtime={"env": [{**ALLOWED_SECRET, "name": "X"}]}))
        assert "spec.runtime.env: X not allowed" in names.stderr  # names, not only Secret references
        root = cluster.apply(run_manifest("root", iterations=1, runtime=ROOT))
        assert root.returncode != 0 and "stages never run as root" in root.stderr
        hostile = cluster.apply(run_manifest("hostile", iterations=1, runtime={"env": hostile_env("/x", "/y")}))
        assert "spec.runtime.env: PYTHONWARNINGS, BROWSER, PYTHONPATH not allowed" in hostile.stderr
        nulls = create(cluster, run_manifest("nulls", iterations=1, runtime=NULLS))
        assert nulls.returncode != 0 and "null is allowed for fsGroup and fsGroupChangePolicy only" in nulls.stderr
        elsewhere = run_manifest("lookalike", iterations=1, runtime={"image": "idpo-jobs:5000/attacker/evil"})
        assert (
            "spec.runtime.image: not an allowed stage image"
            in cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(elsewhere)).stderr
        )
        local = cluster.apply(run_manifest("local", iterations=1, model={"name": "/workspace/idpo/other/model"}))
        assert local.returncode != 0 and "never a local path" in local.stderr
        # The HF token case: a Secret the policy allows, under a name it allows, is admitted.
        allowed = run_manifest("token", iterations=1, runtime={"env": [ALLOWED_SECRET]})
        allowed["spec"]["runtime"]["image"] = cluster.image
        checked = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(allowed))
        assert checked.returncode == 0, checked.stderr


def test_without_the_admission_policy_the_operator_refuses_the_same_runs_and_creates_no_job(cluster: Cluster) -> None:
    assert cluster.apply(run_manifest("reader", iterations=1, **SECRET_READER)).returncode == 0
    assert cluster.apply(run_manifest("coder", iterations=1, **PROMPTS_AS_CODE)).returncode == 0
    assert (
        cluster.apply(run_manifest("hostile", iterations=1, runtime={"env": hostile_env("/x", "/y")})).returncode == 0
    )
    assert create(cluster, run_manifest("nulls", iterations=1, runtime=NULLS)).returncode == 0
    assert cluster.apply(run_manifest("beside", iterations=1)).returncode == 0
    reader = cluster.wait_phase("reader", "Failed", timeout=60)
    assert "refused by policy: spec.ranking.function: module of 'os:getenv' is not allowed" in reader["message"]
    assert "spec.runtime.env[0].valueFrom.secretKeyRef: Secret 'db-password' is not allowed" in reader["message"]
    assert {c["type"]: c["reason"] for c in reader["conditions"]}["Stalled"] == "PolicyDenied"
    coder = cluster.wait_phase("coder", "Failed", timeout=60)
    assert "spec.ranking.function: module of 'timeit:timeit' is not allowed" in coder["message"]
    hostile = cluster.wait_phase("hostile", "Failed", timeout=60)["message"]
    assert all(f"spec.runtime.env[{n}].name: '{name}' is not an allowed variable" in hostile
               for n, name in enumerate(["PYTHONWARNINGS", "BROWSER", "PYTHONPATH"])), hostile  # fmt: skip
    nulls = cluster.wait_phase("nulls", "Failed", timeout=60)["message"]
    assert "spec.runtime.podSecurityContext.runAsNonRoot: null is not allowed" in nulls
    status = cluster.wait_phase("beside", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    huge = dry_run(cluster, "huge", runtime={"env": [{"name": f"V{n}", "value": "x" * 4000} for n in range(5)]})
    assert huge is not None and "runtime.env: the values may add up to 16384 characters" in huge.body  # the CRD's
    for name in ("reader", "coder", "hostile", "nulls"):
        assert cluster.jobs(name) == []  # nothing of theirs ever ran


@contextmanager
def operator_with(cluster: Cluster, **overrides: Any) -> Iterator[None]:
    """The operator restarted under a policy with `overrides`, and restarted as the suite's after."""
    cluster.stop_operator()
    cluster.policy_overrides = overrides
    cluster.start_operator()
    try:
        yield
    finally:
        cluster.stop_operator()
        cluster.policy_overrides = {}
        cluster.start_operator()


def test_with_the_names_allowed_on_purpose_the_payload_still_never_runs(cluster: Cluster) -> None:
    """Defence in depth: an admin who lets the names through does not let the code run. Every stage
    process, torchrun's two training workers included, starts isolated (python -I)."""
    marker, planted = f"{VOLUME_MOUNT}/markers/{uuid.uuid4().hex}", f"{VOLUME_MOUNT}/planted-{uuid.uuid4().hex}"
    plant = f"import os; os.makedirs({planted!r}); open({planted!r} + '/sitecustomize.py', 'w').write(" \
        f"\"open({marker!r} + '-site', 'w').close()\\n\")"  # fmt: skip
    ok, message = cluster.run_job(["-c", plant], claim=CLAIM)
    assert ok, message
    env = hostile_env(marker, planted)
    with operator_with(cluster, env=[*policy.SAFE_ENV, "PYTHONWARNINGS", "BROWSER", "PYTHONPATH"]):
        training = {"distributed": {"processesPerNode": 2, "strategy": "ddp"}}
        assert (
            cluster.apply(run_manifest("opened", iterations=1, runtime={"env": env}, training=training)).returncode == 0
        )
        status = cluster.wait_phase("opened", "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status.get("message")
    assert stage(status, 1, "train")["metrics"]["world_size"] == 2
    check = f"import glob, sys; found = glob.glob({marker!r} + '*'); print(found); sys.exit(1 if found else 0)"
    clean, found = cluster.run_job(["-c", check], claim=CLAIM)
    assert clean, f"a payload ran: {found}"


def test_a_function_written_into_a_frozen_section_never_runs(cluster: Cluster) -> None:
    """Issue 30, class 7: whoever may write the status subresource cannot choose what a later stage runs.
    The rank stage is held (the test hooks slow it) while the operator is away and the status is edited."""
    ranking = {**SHIPPED, "batchSize": 1}
    runtime = slowed(1.0, f"{VOLUME_MOUNT}/markers/{uuid.uuid4().hex}.log", [])
    assert cluster.apply(run_manifest("frozen", iterations=1, ranking=ranking, runtime=runtime)).returncode == 0
    status = cluster.wait("frozen", lambda s: phase_of(s, "rank") == "Running")
    cluster.stop_operator()
    try:
        (digest,) = status["frozenSpecs"]
        patch = {"status": {"frozenSpecs": {digest: {"ranking": {"function": "os:getenv"}}}}}
        edited = cluster.kubectl(
            "patch", "idpo", "frozen", "--subresource=status", "--type=merge", "-p", json.dumps(patch)
        )
        assert edited.returncode == 0, edited.stderr
    finally:
        cluster.start_operator()
    status = cluster.wait_phase("frozen", "Failed", timeout=300)
    # Status names the edited section by its digest (the operator's next write keys it by its new content).
    (digest,) = [d for d, sections in status["frozenSpecs"].items() if sections["ranking"]["function"] == "os:getenv"]
    expected = f"refused by policy: status.frozenSpecs.{digest}.ranking.function: module of 'os:getenv' is not allowed"
    assert status["message"].startswith(expected), status["message"]
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Stalled"] == "PolicyDenied"
    assert not any(j["metadata"]["name"].endswith("-train") for j in cluster.jobs("frozen"))


# ---------------------------------------------------------------------------------------------
# The admission policy and the operator's policy agree, on generated specs
# ---------------------------------------------------------------------------------------------
CUSTOM = {
    "images": ["idpo-jobs:", "registry.example.com/ml/", "ghcr.io/idpo-dev/idpo-jobs:0.2.0"],
    "functionModules": ["idpo_jobs.rewards", "mylab"],
    "secrets": ["hf-token", "mlflow-creds"],
    "env": ["HF_TOKEN", "NCCL_*", "PYTHONWARNINGS", "MYLAB_*"],
    "envFrom": ["Secret/hf-token", "ConfigMap/settings"],
    "endpoints": ["https://ml.example.com/mlflow", "http://127.0.0.1:5000"],
    "models": ["tiny://", "mistralai/", "pvc://tiny/"],
    "remoteCode": ["tiny://policy"],
    "serviceAccounts": ["trainer"],
    "nodeSelectors": ["gpu=h100"],
    "tolerations": ["nvidia.com/gpu"],
    "priorityClasses": ["batch"],
}
# Per field: values both policies allow, and values that tell the rules apart (most of them refused by
# one policy or both). A generated spec takes the second kind for a few fields only, so that admitted
# specs are as well represented as refused ones.
SAFE_ENV_ENTRIES = [{"name": "HF_TOKEN", "value": "v"}, {"name": "NCCL_DEBUG", "value": "INFO"}]
FIELDS: dict[str, tuple[list[Any], list[Any]]] = {
    "image": (
        [None, "", "ghcr.io/idpo-dev/idpo-jobs:0.2.0"],
        [
            *(f"ghcr.io/idpo-dev/idpo-jobs@sha256:{'a' * 64}", "ghcr.io/idpo-dev/idpo-jobs-evil:1"),
            *(f"ghcr.io/idpo-dev/idpo-jobs:0.2.0@sha256:{'b' * 64}", "idpo-jobs:5000/attacker/evil", "idpo-jobs:2"),
            *("idpo-jobs", "docker.io/library/idpo-jobs:3", "registry.example.com/ml/idpo-jobs:1"),
            *("registry.example.com/mlx/idpo-jobs:1", "localhost:5000/idpo-jobs:1"),
        ],
    ),
    "function": (
        [None, "idpo_jobs.rewards:starts_with_s"],
        ["idpo_jobs.rewardsx:f", "os:getenv", "mylab.rank:f", "mylabx:f"],
    ),
    "env": (
        [[], SAFE_ENV_ENTRIES],
        [
            [{"name": name, "value": "v"}]
            for name in (
                *("NCCL_NET_PLUGIN", "NCCL_TOPO_FILE", "TORCH_NCCL_BLOCKING_WAIT", "PYTHONPATH", "PYTHONWARNINGS"),
                *("BROWSER", "LD_PRELOAD", "HF_ENDPOINT", "HTTPS_PROXY", "IDPO_PVC_ROOT", "MYLAB_ADDR", "MYLAB_X"),
                "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
            )
        ]
        + [
            [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}]
            for secret in ("hf-token", "hub-token", "db-password")
        ],
    ),
    "envFrom": (
        [[]],
        [
            [{kind: {"name": name}, **({"prefix": prefix} if prefix is not None else {})}]
            for kind in ("secretRef", "configMapRef")
            for name in ("hf-token", "settings")
            for prefix in (None, "", "LD_")
        ],
    ),
    "podSecurityContext": (
        [{}, {"runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}, {"fsGroup": None}],
        [
            *({"runAsNonRoot": v} for v in (False, None)),
            *({"runAsUser": v} for v in (0, None)),
            *({"seccompProfile": v} for v in ({"type": "Unconfined"}, {"type": "Localhost", "localhostProfile": "p"})),
            {"seccompProfile": None},
            *({"appArmorProfile": {"type": v}} for v in ("RuntimeDefault", "Unconfined")),
            {"sysctls": [{"name": "kernel.shm_rmid_forced", "value": "1"}]},
        ],
    ),
    "serviceAccountName": ([None], ["trainer", "admin"]),
    "nodeSelector": ([{}], [{"gpu": "h100"}, {"gpu": "a100"}]),
    "tolerations": ([[]], [[{"key": "nvidia.com/gpu", "operator": "Exists"}], [{"operator": "Exists"}]]),
    "priorityClassName": ([None], ["batch", "system-cluster-critical"]),
    "model": (
        ["tiny://policy", "pvc://tiny/policy", "mistralai/Mistral-7B-Instruct-v0.2"],
        ["gpt2", "/workspace/idpo/x", "./model", "org/../x", "org/name/extra", "pvc://other/policy"],
    ),
    "modelCode": ([False], [True]),
    "rankerModel": (
        ["tiny://pairrm", "pvc://tiny/pairrm"],
        ["llm-blender/PairRM", "/models/ranker", "mistralai/rm", "tiny://policy"],
    ),
    "rankerCode": ([False], [True]),
    "source": (["tiny://prompts.jsonl", "pvc://tiny/prompts.jsonl", "snorkelai/x"], ["/data/p.jsonl", "x/../y"]),
    "evaluation": ([None, "snorkelai/x"], ["/data/p.jsonl", "x/../y"]),
    "tracking": (
        [None, ("http://127.0.0.1:5000", None), ("https://ml.example.com/mlflow", "")],
        [
            (uri, secret)
            for uri in (
                *("http://127.0.0.1:5000", "http://127.0.0.1:5001", "https://ml.example.com/mlflow"),
                *("https://ml.example.com/mlflow/api", "https://ml.example.com/mlflow-x", "http://ml.example.com/m"),
                *("https://ML.example.com:443/mlflow", "https://ml.example.com@evil.com/mlflow", "https://x.org"),
                *("https://ml.example.com/mlflow/../a", "file:///workspace/x"),
            )
            for secret in ("mlflow-creds", "other")
        ]
        + [("file:///workspace/x", None)],
    ),
    # LLM judges: every baseUrl under `endpoints` (with a key or without), the key's Secret under `secrets`.
    "judges": (
        [[]],
        [
            [{"name": "j", "endpoint": {"baseUrl": url, "model": "m", **key}}]
            for url in (
                *("http://127.0.0.1:5000/v1", "http://127.0.0.1:5001/v1", "https://ml.example.com/mlflow/v1"),
                *("https://ml.example.com/mlflow-x/v1", "https://ml.example.com@evil.com/mlflow", "http://10.0.0.1"),
                "https://ml.example.com/mlflow/../v1",
            )
            for key in (
                {},
                {"apiKeySecret": {"name": "mlflow-creds", "key": "k"}},
                {"apiKeySecret": {"name": "x", "key": "k"}},
            )
        ],
    ),
}


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """Spec overrides over the suite's tiny spec: safe values, but for a few fields drawn to tell rules apart."""
    hostile = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=3))
    pick = {name: draw(st.sampled_from(FIELDS[name][name in hostile])) for name in FIELDS}
    runtime = {k: pick[k] for k in ("image", "env", "envFrom", "podSecurityContext", "nodeSelector", "tolerations")}
    runtime |= {k: pick[k] for k in ("serviceAccountName", "priorityClassName")}
    if pick["function"]:
        ranking = {"ranker": "function", "function": pick["function"], "model": None}
    else:
        ranking = {"ranker": draw(st.sampled_from(["pairrm", "reward-model"])), "model": pick["rankerModel"]}
    spec: dict[str, Any] = {
        "model": {"name": pick["model"], "trustRemoteCode": pick["modelCode"]},
        "prompts": {"source": pick["source"]},
        "ranking": {**ranking, "trustRemoteCode": pick["rankerCode"]},
        "runtime": runtime,
    }
    if pick["evaluation"]:
        spec["evaluation"] = {"prompts": {"source": pick["evaluation"], "split": "test"}}
    if pick["judges"]:
        spec["evaluation"] = {**spec.get("evaluation", {}), "judges": pick["judges"]}
    if pick["tracking"]:
        uri, secret = pick["tracking"]
        spec["tracking"] = {
            "mlflow": {"trackingUri": uri, **({"credentialsSecret": secret} if secret is not None else {})}
        }
    return spec


@pytest.mark.parametrize("values", [{}, CUSTOM], ids=["chart-defaults", "custom"])
def test_the_admission_policy_and_the_operator_decide_every_generated_spec_alike(
    cluster: Cluster, values: dict[str, Any]
) -> None:
    seen = {"admitted": 0, "refused": 0}
    with admission_policy(cluster, values) as rules:

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(override=specs())
        def agree(override: dict[str, Any]) -> None:
            body = run_manifest("generated", **override)
            try:
                spec = IterativeDPORunSpec.model_validate(body["spec"])
            except ValidationError:
                return  # not a spec (the CRD refuses it too): no policy decides it
            operator = policy.violations(spec, rules)
            answer = dry_run(cluster, "generated", **override)
            if answer is not None and answer.status != 403:  # 403: refused by the admission policy
                raise AssertionError(f"the apiserver refused it otherwise ({answer.status}): {answer.body}")
            seen["admitted" if answer is None else "refused"] += 1
            assert (answer is None) == (operator == []), (override, operator, answer and answer.body)

        agree()
    assert seen["admitted"] > 10 and seen["refused"] > 10, seen  # both answers were put to the test
