"""The operator end to end: kubectl applies runs, the real kopf operator drives Jobs, the real stage
CLIs run them on tiny models, and status tells the story.

By default the cluster is a local control plane (tests/controlplane) whose node agent runs the
pods as processes; `IDPO_E2E_KUBECONFIG` (with `IDPO_E2E_IMAGE`) runs the same tests against any
cluster: see tests/harness/cluster.py."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import time
import uuid
from typing import Any

import pytest
from idpo_operator import resources

from tests.conftest import TINY_SPEC, merge
from tests.harness.cluster import VOLUME_MOUNT, Cluster, Target
from tests.harness.tracking import check_tracked

pytestmark = pytest.mark.slow
XDIST_SPLIT = 2  # its tests in two groups, each with its own namespace, on two workers (conftest)
CLAIM = "models"  # an existingClaim the tests seed with the tiny models
# Grants only the fault suite's stories use: failing a Job that cannot start, deleting out-of-range
# and failed gang Jobs, the headless Service of a train stage on several nodes, reading a child whose
# name is taken (whose is it?), and removing the finalizer an older operator put on a run.
FAULT_PATH_GRANTS = {
    ("patch", "batch", "jobs"),
    ("delete", "batch", "jobs"),
    ("get", "batch", "jobs"),
    ("create", "", "services"),
    ("get", "", "services"),
    ("get", "", "persistentvolumeclaims"),
    ("patch", "idpo.dev", "iterativedporuns"),
}
# Reads of Kueue's objects, made once Kueue is installed (tests/test_kueue.py).
KUEUE_GRANTS = {(verb, "kueue.x-k8s.io", kind) for verb in ("list", "watch") for kind in ("workloads", "localqueues")}
# Creating the leader-election Lease: only the first operator on a cluster does (here, whichever module's operator
# ran first on this worker's control plane); a later one takes the Lease the last one released.
LEASE_CREATE = ("create", "coordination.k8s.io", "leases")

# The shared tiny spec, with its models on the seeded claim instead of tiny:// URIs.
SPEC: dict[str, Any] = merge(
    TINY_SPEC,
    {
        "model": {"name": "pvc://tiny/policy"},
        "prompts": {"source": "pvc://tiny/prompts.jsonl"},
        "ranking": {"model": "pvc://tiny/pairrm"},
        "storage": {"existingClaim": CLAIM},
        "runtime": {"retries": 1, "env": []},  # tests/rewards.py is in the suite's stage image
    },
)


# A ranker that loads nothing (tests/rewards.py), for runs that only need their stages to succeed: a PairRM rank
# pod spends ~5 CPU-s importing torch and llm-blender. Seeded generation makes its iteration 1 yield pairs.
LIGHT_RANKING: dict[str, Any] = {"ranker": "function", "function": "rewards:starts_with_s", "model": None}


def run_manifest(name: str, **override: Any) -> dict[str, Any]:
    return {
        "apiVersion": "idpo.dev/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": name},
        "spec": merge(SPEC, override),
    }


def stamp(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def cluster(kube: Target, tmp_path_factory: pytest.TempPathFactory):
    with Cluster(kube, tmp_path_factory.mktemp("e2e"), "e2e") as c:
        c.seed(CLAIM)
        yield c


@pytest.fixture(autouse=True)
def delete_runs_afterwards(cluster: Cluster):
    """Runs a test left going would compete with the next tests' stages for the cores (or GPUs)."""
    yield
    cluster.kubectl("delete", "idpo", "--all", "--wait=false")


def stage(status: dict[str, Any], iteration: int, name: str) -> dict[str, Any]:
    (entry,) = [it for it in status["iterations"] if it["iteration"] == iteration]
    return entry["stages"][name]


def on_volume(status: dict[str, Any]) -> str:
    """The mounted path of the run's latest checkpoint (`pvc://<claim>/<path>`), as a stage pod sees it."""
    return f"{VOLUME_MOUNT}/{status['latestCheckpoint'].removeprefix(f'pvc://{CLAIM}/')}"


def job_conditions(cluster: Cluster, run: str, job: str) -> list[dict[str, Any]]:
    return [
        c for j in cluster.jobs(run) if j["metadata"]["name"] == job for c in j.get("status", {}).get("conditions", [])
    ]


def pods_per_job(cluster: Cluster, run: str) -> dict[str, int]:
    return {j["metadata"]["name"]: len(cluster.pods(j["metadata"]["name"])) for j in cluster.jobs(run)}


def stage_configs(cluster: Cluster, run: str) -> dict[int, dict[str, Any]]:
    """Iteration -> stage -> the config its Job handed the stage (the pod template's annotation)."""
    found: dict[int, dict[str, Any]] = {}
    for job in cluster.jobs(run):
        labels, template = job["metadata"]["labels"], job["spec"]["template"]["metadata"]
        if (iteration := int(labels[resources.LABEL_ITERATION])) > 0:
            config = json.loads(template["annotations"][resources.ANNOTATION_CONFIG])
            found.setdefault(iteration, {})[labels[resources.LABEL_STAGE]] = config
    return found


def test_an_applied_run_goes_through_every_stage_and_reports_it(cluster: Cluster, mlflow_server) -> None:
    # The stage pods report to the test's MLflow server, which they reach on loopback on our control
    # plane only: the pods are processes of this machine (another cluster's pods would not reach it).
    local = cluster.target.plane is not None
    tracking = {"mlflow": {"trackingUri": mlflow_server.uri, "experiment": "e2e"}} if local else {}
    # Two pairs a step: the train stages take several steps, each a point of the tracked curves.
    doc = run_manifest("happy", evaluation={"enabled": True}, training={"perDeviceBatchSize": 2}, tracking=tracking)
    applied = cluster.apply(doc)
    assert applied.returncode == 0, applied.stderr
    status = cluster.wait_phase("happy", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    if local:
        found = check_tracked(mlflow_server, "e2e", "happy", stage_configs(cluster, "happy"), status["bestCheckpoint"])
        assert found["parent"].data.tags["idpo.namespace"] == cluster.namespace
        assert status["tracking"]["mlflowRunId"] == found["parent"].info.run_id

    gen, rank, train = (stage(status, 2, s) for s in ("generate", "rank", "train"))
    assert gen["metrics"]["prompts"] == 8 and gen["metrics"]["responses"] == 24
    assert rank["metrics"]["pairs"] + rank["metrics"]["dropped_ties"] == 8
    assert train["metrics"]["steps"] >= 1 and train["jobName"] == "happy-i2-train"
    base, second = status["iterations"][0], stage(status, 2, "evaluate")  # iteration 0: the base model
    assert base["iteration"] == 0 and base["stages"]["evaluate"]["phase"] == "Succeeded"
    assert second["metrics"]["prompts"] == 16 and 0 <= second["metrics"]["lc_win_rate_vs_base"] <= 1
    assert status["bestIteration"] in (1, 2) and status["bestCheckpoint"].startswith(f"pvc://{CLAIM}/idpo/happy-")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"

    uid = cluster.run("happy")["metadata"]["uid"]
    assert status["latestCheckpoint"] == f"pvc://{CLAIM}/idpo/happy-{uid[:8]}/iter-2/train/model"  # KServe's form
    load = "import sys; from transformers import AutoModelForCausalLM as M; M.from_pretrained(sys.argv[1]).to('cpu')"
    loaded, message = cluster.run_job(["-c", load, on_volume(status)], claim=CLAIM)
    assert loaded, message

    jobs = sorted(cluster.jobs("happy"), key=lambda j: j["metadata"]["creationTimestamp"])
    assert len(jobs) == 9 and set(pods_per_job(cluster, "happy").values()) == {1}  # 1 + 2 x (3 + 1)
    gaps = [
        (stamp(b["metadata"]["creationTimestamp"]) - stamp(a["status"]["completionTime"])).total_seconds()
        for a, b in itertools.pairwise(jobs)
    ]
    print(f"hand-off latency (Job complete -> next Job created), s: max {max(gaps):.1f}, all {gaps}")

    table = cluster.kubectl("get", "idpo", "happy")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "ITERATION", "STAGE", "WINRATE", "READY", "AGE"]
    assert row.split()[:3] == ["happy", "Succeeded", "2/2"] and row.split()[4] == "True"
    assert float(row.split()[3]) == status["latestWinRate"]  # iteration 2's LC win rate against the base
    described = cluster.kubectl("describe", "idpo", "happy")
    assert "StageSucceeded" in described.stdout and "RunSucceeded" in described.stdout
    metrics_and_idpo_status_tell_the_same_story(cluster, "happy")


def test_a_killed_operator_resumes_without_duplicates(cluster: Cluster) -> None:
    assert cluster.apply(run_manifest("restart", iterations=1)).returncode == 0
    cluster.wait("restart", lambda s: s.get("currentStage") == "rank")
    cluster.stop_operator(signal.SIGKILL)  # mid-stage: rank 1 runs on without anyone watching
    deadline = time.monotonic() + 120 * cluster.patience
    while not any(c["type"] == "Complete" for c in job_conditions(cluster, "restart", "restart-i1-rank")):
        assert time.monotonic() < deadline, "rank 1 did not finish"
        time.sleep(0.5)
    # Mid-hand-off: rank 1 is complete, train 1 not yet created, and the status still says rank.
    assert "restart-i1-train" not in {j["metadata"]["name"] for j in cluster.jobs("restart")}
    assert cluster.run("restart")["status"]["currentStage"] == "rank"
    cluster.start_operator()
    status = cluster.wait_phase("restart", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    names = [j["metadata"]["name"] for j in cluster.jobs("restart")]
    assert sorted(names) == sorted(set(names)) and len(names) == 3
    pods = pods_per_job(cluster, "restart")
    assert set(pods.values()) == {1}, pods  # no stage ran twice


def test_a_failed_attempt_is_retried_and_counted(cluster: Cluster) -> None:
    # The scoring function times out once (exit 1, as a crash or OOM would): a retry, not bad input.
    marker = f"{VOLUME_MOUNT}/markers/{uuid.uuid4().hex}"  # fresh, should the claim outlive a suite run
    env = [*SPEC["runtime"]["env"], {"name": "IDPO_FLAKY_MARKER", "value": marker}]
    flaky = {"ranker": "function", "function": "rewards:flaky", "model": None}
    assert cluster.apply(run_manifest("retry", iterations=1, ranking=flaky, runtime={"env": env})).returncode == 0
    status = cluster.wait_phase("retry", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    (job,) = [j for j in cluster.jobs("retry") if j["metadata"]["name"] == "retry-i1-rank"]
    print(
        "DEBUG",
        json.dumps(stage(status, 1, "rank")),
        json.dumps(job["status"]),
        json.dumps(job["metadata"].get("annotations")),
    )
    assert stage(status, 1, "rank")["attempts"] == 2
    assert (job["status"]["failed"], job["status"]["succeeded"]) == (1, 1)


def test_a_stage_that_always_fails_stalls_the_run_keeps_earlier_outputs_and_runs_again_once_fixed(
    cluster: Cluster,
) -> None:
    bad = {"ranker": "function", "function": "rewards:not_a_number", "model": None}
    assert cluster.apply(run_manifest("doomed", iterations=1, ranking=bad)).returncode == 0
    status = cluster.wait_phase("doomed", "Failed")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Stalled"]["status"] == "True" and conditions["Ready"]["status"] == "False"
    assert status["message"].startswith("iteration 1 rank failed")
    assert "'rewards:not_a_number' returned 'high', not a number" in status["message"]
    assert stage(status, 1, "generate")["phase"] == "Succeeded"
    uid = cluster.run("doomed")["metadata"]["uid"]
    gen = f"{VOLUME_MOUNT}/idpo/doomed-{uid[:8]}/iter-1/generate/part-00000/_SUCCESS.json"
    intact, message = cluster.run_job(["-c", "import json, sys; json.load(open(sys.argv[1]))", gen], claim=CLAIM)
    assert intact, message
    assert pods_per_job(cluster, "doomed")["doomed-i1-rank"] == 1  # bad input: not retried

    good = {**bad, "function": "rewards:starts_with_s"}
    assert cluster.apply(run_manifest("doomed", iterations=1, ranking=good)).returncode == 0  # the fix is the commit
    status = cluster.wait_phase("doomed", "Succeeded", timeout=120)
    rank = status["iterations"][0]["stages"]["rank"]
    assert rank["metrics"]["ranker"] == "function" and rank["attempts"] == 2
    assert pods_per_job(cluster, "doomed")["doomed-i1-generate"] == 1


JUDGE = {"name": "gpt4", "endpoint": {"baseUrl": "https://api.openai.com/v1", "model": "gpt-4-1106-preview"}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"iterations": 0},
            "spec.iterations: Invalid value: 0: spec.iterations in body should be greater than or equal to 1",
        ),
        ({"ranking": {"ranker": "function", "model": None}}, "spec.ranking.function: Invalid value: ranker 'function'"),
        (
            {"generation": {"engine": "tgi"}},
            'spec.generation.engine: Unsupported value: "tgi": supported values: "vllm"',
        ),
        ({"storage": {"root": "../elsewhere"}}, "spec.storage.root: Invalid value"),
        ({"model": {"name": "pvc://../other-team/model"}}, "spec.model.name: Invalid value"),
        ({"evaluation": {"judges": [JUDGE, JUDGE]}}, "evaluation.judges: names must be unique"),
    ],
    ids=["bounds", "cel-cross-field", "enum", "root-traversal", "pvc-traversal", "judge-names"],
)
def test_invalid_manifests_are_refused_by_the_crd(cluster: Cluster, override: dict, message: str) -> None:
    refused = cluster.apply(run_manifest("refused", **override))
    assert refused.returncode != 0 and message in refused.stderr


def test_changing_the_base_model_mid_run_is_refused(cluster: Cluster) -> None:
    assert cluster.apply(run_manifest("immutable", iterations=1)).returncode == 0
    changed = cluster.apply(run_manifest("immutable", iterations=1, model={"name": "pvc://tiny/other"}))
    assert changed.returncode != 0 and "model.name is immutable" in changed.stderr


def test_a_spec_the_crd_let_through_stalls_with_the_field_named(cluster: Cluster) -> None:
    from idpo_operator.crd import crd

    lax = crd()  # as if an older CRD without the CEL rules were installed
    lax["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["ranking"].pop(
        "x-kubernetes-validations"
    )
    cluster.install_crd(lax)
    try:
        # A real apiserver takes a moment to serve the new schema.
        deadline = time.monotonic() + 30 * cluster.patience
        while cluster.apply(run_manifest("lax", ranking={"ranker": "function", "model": None})).returncode != 0:
            assert time.monotonic() < deadline, "the lax CRD never admitted the run"
            time.sleep(1)
    finally:
        cluster.install_crd(crd())
    status = cluster.wait_phase("lax", "Failed", timeout=60)
    assert "invalid spec" in status["message"] and "spec.ranking" in status["message"]
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Stalled"] == "InvalidSpec"
    assert cluster.jobs("lax") == []
    assert cluster.apply(run_manifest("after-lax", iterations=1)).returncode == 0  # the operator still serves
    cluster.wait("after-lax", lambda s: s.get("phase") == "Running" and bool(cluster.jobs("after-lax")), timeout=60)


def test_deleting_a_run_removes_its_jobs_and_keeps_its_volume(cluster: Cluster) -> None:
    manifest = run_manifest("deleted", iterations=1)
    manifest["spec"].pop("storage")  # the operator creates (and by default retains) the claim
    assert cluster.apply(manifest).returncode == 0
    cluster.wait("deleted", lambda s: s.get("currentStage") == "generate" and "iterations" in s)
    assert cluster.kubectl("get", "pvc", "deleted-workspace").returncode == 0
    assert cluster.jobs("deleted")
    assert cluster.kubectl("delete", "idpo", "deleted", "--wait=false").returncode == 0
    jobs = [j["metadata"]["name"] for j in cluster.jobs("deleted")]
    cluster.wait("deleted", lambda s: not cluster.jobs("deleted"), timeout=30)
    cluster.wait("deleted", lambda s: not any(cluster.pods(j) for j in jobs), timeout=60)  # the garbage collector's
    assert cluster.kubectl("get", "configmaps", "-l", "idpo.dev/run=deleted", "-o", "name").stdout.strip() == ""
    kept = cluster.kubectl("get", "pvc", "deleted-workspace", "-o", "jsonpath={.metadata.name}")
    assert kept.stdout == "deleted-workspace"


def test_suspend_holds_new_stages_and_resume_continues(cluster: Cluster) -> None:
    assert cluster.apply(run_manifest("paused", iterations=1, suspend=True)).returncode == 0
    status = cluster.wait_phase("paused", "Suspended", timeout=60)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "True"
    assert cluster.jobs("paused") == []
    assert (
        cluster.kubectl("patch", "idpo", "paused", "--type=merge", "-p", '{"spec":{"suspend":false}}').returncode == 0
    )
    resumed = cluster.wait("paused", lambda s: s.get("phase") == "Running", timeout=60)
    assert resumed["observedGeneration"] == 2
    assert [j["metadata"]["name"] for j in cluster.jobs("paused")] == ["paused-i1-generate"]


def test_the_liveness_endpoint_reports_reconciles(cluster: Cluster) -> None:
    import json
    import urllib.error
    import urllib.request

    def reconciles() -> int:
        return json.loads(urllib.request.urlopen(cluster.liveness, timeout=10).read())["reconciles"]

    # Poll, as a kubelet's probe would: the endpoint serves once the operator has started (this module's
    # operator may have started a moment ago), and kopf serves its value from a cache of some seconds.
    deadline = time.monotonic() + 60 * cluster.patience
    while True:
        try:
            before = reconciles()
            break
        except urllib.error.URLError:
            assert time.monotonic() < deadline, "the liveness endpoint never answered"
            time.sleep(1)
    assert cluster.apply(run_manifest("probed", iterations=1, suspend=True)).returncode == 0
    cluster.wait_phase("probed", "Suspended", timeout=60)  # a reconcile wrote that
    while (count := reconciles()) <= before:
        assert time.monotonic() < deadline, f"reconciles stayed at {count}"
        time.sleep(1)


def test_the_chart_rbac_allows_exactly_the_calls_the_operator_makes(cluster: Cluster) -> None:
    from tests.harness.chart import granted, render

    if cluster.target.plane is None:
        pytest.skip("reads the apiserver's audit log, which only the local control plane shares")
    # The operator creates the claim, as in production; the stages build the tiny models on it.
    tiny = {"model": {"name": "tiny://policy"}, "prompts": {"source": "tiny://prompts.jsonl"}}
    manifest = run_manifest("rbac", iterations=1, ranking={"model": "tiny://pairrm"}, **tiny)
    manifest["spec"].pop("storage")
    assert cluster.apply(manifest).returncode == 0
    assert cluster.wait_phase("rbac", "Succeeded", "Failed")["phase"] == "Succeeded"

    # This module's whole history (starts, restarts, failures, deletes), plus the one grant no call
    # uses: admission (OwnerReferencesPermissionEnforcement) checks it when children block deletion.
    calls = cluster.operator_calls() | {("update", "idpo.dev", "iterativedporuns/finalizers")}
    print("operator API calls:", sorted(calls))
    for values in ({}, {"watchNamespaces": [cluster.namespace]}):
        allowed = granted(render(values))
        assert calls - allowed == set(), "RBAC misses calls the operator makes"
        # Failing a Job that cannot start, deleting out-of-range ones, reading a child of a taken name, removing
        # an older operator's finalizer: the fault suite uses those. Creating the Lease: see LEASE_CREATE.
        unused = FAULT_PATH_GRANTS | KUEUE_GRANTS | {LEASE_CREATE}
        assert allowed - calls <= unused, "RBAC grants more than the operator uses"


def metrics_and_idpo_status_tell_the_same_story(cluster: Cluster, run: str) -> None:
    """For a Succeeded `run` with a train stage: the operator's metrics count it, and `idpo status` says it."""
    import os
    import subprocess
    import sys
    import urllib.request

    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{cluster.metrics_port}/metrics"
        lines = urllib.request.urlopen(url, timeout=10).read().decode().splitlines()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("idpo_")}

    # Metrics follow the status write (so a retried write is not counted twice): poll, as Prometheus would.
    deadline = time.monotonic() + 10 * cluster.patience
    while (samples := scrape()).get('idpo_runs{phase="Succeeded"}', 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert samples['idpo_runs{phase="Succeeded"}'] >= 1
    durations = {k: v for k, v in samples.items() if "duration" in k}
    assert samples.get('idpo_stage_duration_seconds_count{stage="train"}', 0) >= 1, durations
    assert samples["idpo_reconciles_total"] > 0 and "idpo_reconcile_errors_total" in samples

    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    table = subprocess.run(
        [sys.executable, "-m", "idpo_operator", "status", run, "-n", cluster.namespace],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    assert (
        table.stdout.startswith(f"{run}: Succeeded") and f"pvc://{CLAIM}/idpo/{run}-" in table.stdout.splitlines()[-1]
    )


def test_gitops_labels_stay_on_the_run_and_an_unchanged_reapply_changes_nothing(cluster: Cluster) -> None:
    manifest = run_manifest("tracked", iterations=1, suspend=True)
    manifest["metadata"]["labels"] = {"argocd.argoproj.io/instance": "runs", "kustomize.toolkit.fluxcd.io/name": "x"}
    assert cluster.apply(manifest).returncode == 0
    cluster.wait_phase("tracked", "Suspended", timeout=60)
    before = cluster.run("tracked")
    again = cluster.apply(manifest)
    assert again.returncode == 0 and "unchanged" in again.stdout
    after = cluster.run("tracked")
    assert after["metadata"]["generation"] == before["metadata"]["generation"] == 1
    assert (
        cluster.kubectl("patch", "idpo", "tracked", "--type=merge", "-p", '{"spec":{"suspend":false}}').returncode == 0
    )
    cluster.wait("tracked", lambda s: bool(cluster.jobs("tracked")), timeout=60)
    for job in cluster.jobs("tracked"):
        labels = job["metadata"]["labels"]
        assert not {"argocd.argoproj.io/instance", "kustomize.toolkit.fluxcd.io/name"} & set(labels)
        assert labels["idpo.dev/run"] == "tracked"


def wait_pod(cluster: Cluster, job: str, predicate: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout * cluster.patience
    while time.monotonic() < deadline:
        for pod in cluster.pods(job):
            if predicate(pod):
                return pod
        time.sleep(0.5)
    raise AssertionError(f"no pod of {job} as expected: {json.dumps(cluster.pods(job))[:3000]}")


def waiting_reason(pod: dict[str, Any]) -> str | None:
    states = [s.get("state", {}) for s in pod.get("status", {}).get("containerStatuses", [])]
    return next((s["waiting"].get("reason") for s in states if "waiting" in s), None)


def test_an_unknown_image_leaves_the_stage_pod_in_image_pull_back_off(cluster: Cluster) -> None:
    image = "registry.invalid/idpo/missing:0"
    assert cluster.apply(run_manifest("unpulled", iterations=1, runtime={"image": image})).returncode == 0
    pod = wait_pod(cluster, "unpulled-i1-generate", lambda p: waiting_reason(p) == "ImagePullBackOff")
    assert image in pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]


def test_a_pod_asking_for_more_gpus_than_any_node_has_stays_unschedulable(cluster: Cluster) -> None:
    greedy = {"resources": {"limits": {"nvidia.com/gpu": 64}}}
    assert cluster.apply(run_manifest("greedy", iterations=1, generation=greedy)).returncode == 0

    def unschedulable(pod: dict[str, Any]) -> bool:
        conditions = {c["type"]: c for c in pod.get("status", {}).get("conditions", [])}
        return conditions.get("PodScheduled", {}).get("reason") == "Unschedulable"

    pod = wait_pod(cluster, "greedy-i1-generate", unschedulable)
    (scheduled,) = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
    assert "Insufficient nvidia.com/gpu" in scheduled["message"] and pod["status"]["phase"] == "Pending"


def test_the_authorizer_denies_the_operator_a_verb_the_chart_does_not_grant(cluster: Cluster) -> None:
    if cluster.target.plane is None:
        pytest.skip("the operator runs under the chart's ServiceAccount only on the local control plane")
    env = {**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig)}
    as_operator = [cluster.kubectl_bin, "-n", cluster.namespace]
    allowed = subprocess.run([*as_operator, "get", "jobs"], capture_output=True, text=True, env=env, timeout=60)
    assert allowed.returncode == 0, allowed.stderr  # list is granted: the token itself works
    denied = subprocess.run([*as_operator, "get", "secrets"], capture_output=True, text=True, env=env, timeout=60)
    assert denied.returncode != 0
    assert 'User "system:serviceaccount:idpo-system:idpo-operator" cannot list resource "secrets"' in denied.stderr


def test_the_apiserver_rejects_an_indexed_job_whose_pod_hostnames_are_not_dns_labels(cluster: Cluster) -> None:
    from idpo_jobs.config import Stage
    from idpo_operator import plan, resources
    from idpo_operator.plan import StageKey
    from idpo_operator.spec import IterativeDPORunSpec

    spec = IterativeDPORunSpec.model_validate(merge(SPEC, {"runtime": {"image": cluster.image}}))
    owner = resources.Owner("valid", cluster.namespace, str(uuid.uuid4()))
    key = StageKey(1, Stage.GENERATE)
    config = plan.stage_config(spec, "valid", resources.workspace(spec, owner), key)
    job = resources.build_job(resources.Launch(spec, owner, key, config))
    job["metadata"].pop("ownerReferences")
    job["metadata"]["name"] = "dotted.name-i1-generate"  # pods `<job>-<index>` would get dotted hostnames
    created = cluster.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(job))
    assert created.returncode != 0 and "will not able to create pod with invalid DNS label" in created.stderr
    job["metadata"]["name"] = "valid-i1-generate"
    assert cluster.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(job)).returncode == 0


def test_evaluation_stops_a_run_early_and_names_the_best_checkpoint(cluster: Cluster) -> None:
    # An LC win rate is a logistic's value, always below 1: the rule fires after iteration 1 of 3.
    evaluation = {"enabled": True, "stopWhen": {"metric": "lcWinRateVsBase", "below": 1.0}}
    early = run_manifest("early", iterations=3, evaluation=evaluation, ranking=LIGHT_RANKING)
    assert cluster.apply(early).returncode == 0
    status = cluster.wait_phase("early", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "EarlyStopped"
    assert status["earlyStop"]["iteration"] == 1 and "is below 1" in status["message"]
    assert status["bestIteration"] == 1 and status["bestCheckpoint"] == status["latestCheckpoint"]
    names = {j["metadata"]["name"] for j in cluster.jobs("early")}
    assert names == {"early-i0-evaluate", *(f"early-i1-{s}" for s in ("generate", "rank", "train", "evaluate"))}
    assert set(pods_per_job(cluster, "early").values()) == {1}
