"""The fault suite: what a real cluster does to a run, on the real control plane, with the operator
under the chart's RBAC and the stage namespace enforcing the restricted Pod Security profile.

Each story asserts the final phase, the status message, that no stage ran twice, and that finished
outputs are intact."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import time
import urllib.parse
from typing import Any

import pytest
import yaml
from idpo_jobs.config import Stage
from idpo_operator.plan import StageKey

from tests.harness.cluster import Cluster, Target, audit_stamp, free_port
from tests.test_children import legacy_job_name, refused_pods_stall_the_run, stalled
from tests.test_operator_e2e import (
    CLAIM,
    FAULT_PATH_GRANTS,
    LIGHT_RANKING,
    delete_runs_afterwards,  # noqa: F401  (autouse: the e2e module's, here too)
    on_volume,
    pods_per_job,
    run_manifest,
    stage,
)

pytestmark = pytest.mark.slow
XDIST_SPLIT = 2  # its tests in two groups, each with its own namespace, on two workers (conftest)


@pytest.fixture(scope="module")
def cluster(kube: Target, tmp_path_factory: pytest.TempPathFactory):
    with Cluster(kube, tmp_path_factory.mktemp("faults"), "faults") as c:
        c.seed(CLAIM)
        yield c


def no_stage_ran_twice(cluster: Cluster, run: str) -> None:
    pods = pods_per_job(cluster, run)
    assert pods and set(pods.values()) == {1}, pods


def test_any_run_name_kubernetes_accepts_runs_to_succeeded(cluster: Cluster) -> None:
    names = ["team.a.tiny", "r" + "-long" * 50]  # dotted, and near the 253-character limit: both at once
    for name in names:
        applied = cluster.apply(run_manifest(name, iterations=1, ranking=LIGHT_RANKING))
        assert applied.returncode == 0, applied.stderr
    for name in names:
        status = cluster.wait_phase(name, "Succeeded", "Failed")
        assert status["phase"] == "Succeeded", (name, status.get("message"))
        no_stage_ran_twice(cluster, name)
        assert all("." not in j["metadata"]["name"] and len(j["metadata"]["name"]) <= 52 for j in cluster.jobs(name))


def test_a_pod_that_cannot_start_fails_the_stage_with_its_reason_after_the_start_deadline(cluster: Cluster) -> None:
    runtime = {"image": "registry.invalid/idpo/missing:0", "startTimeoutSeconds": 30}
    assert cluster.apply(run_manifest("stuck", iterations=1, runtime=runtime)).returncode == 0
    waiting = cluster.wait("stuck", lambda s: "ImagePullBackOff" in s.get("message", ""), timeout=60)
    assert waiting["phase"] == "Running" and waiting["message"].startswith("iteration 1 generate: Pending: ")
    status = cluster.wait_phase("stuck", "Failed", timeout=120)
    # The kubelet's two words for it: the first failed pull, then the back-off between retries.
    assert re.search(r"did not start within 30s: Pending: (ErrImagePull|ImagePullBackOff): ", status["message"])
    assert {c["type"]: c["status"] for c in status["conditions"]}["Stalled"] == "True"
    deadline = time.monotonic() + 60 * cluster.patience
    while cluster.pods("stuck-i1-generate"):  # the Job controller removed the pod: nothing holds a node
        assert time.monotonic() < deadline, cluster.pods("stuck-i1-generate")
        time.sleep(1)


def test_a_missing_secret_waits_and_the_stage_starts_once_it_exists(cluster: Cluster) -> None:
    env = [
        *run_manifest("x")["spec"]["runtime"]["env"],
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "token"}}},
    ]
    secretive = run_manifest("secretive", iterations=1, runtime={"env": env}, ranking=LIGHT_RANKING)
    assert cluster.apply(secretive).returncode == 0
    waiting = cluster.wait("secretive", lambda s: "CreateContainerConfigError" in s.get("message", ""), timeout=60)
    assert 'secret "hub-token" not found' in waiting["message"]
    created = cluster.kubectl("create", "secret", "generic", "hub-token", "--from-literal=token=hf_x")
    assert created.returncode == 0, created.stderr
    try:
        status = cluster.wait_phase("secretive", "Succeeded", "Failed")
        assert status["phase"] == "Succeeded", status.get("message")
        no_stage_ran_twice(cluster, "secretive")
    finally:
        cluster.kubectl("delete", "secret", "hub-token")  # missing again for the next test that needs it so


def test_a_run_recreated_with_the_same_name_never_uses_its_predecessors_jobs(cluster: Cluster) -> None:
    assert cluster.apply(run_manifest("again", iterations=1)).returncode == 0
    cluster.wait("again", lambda s: s.get("currentStage") == "rank")
    old_uid = cluster.run("again")["metadata"]["uid"]
    assert cluster.kubectl("delete", "idpo", "again", "--wait=true").returncode == 0
    assert cluster.apply(run_manifest("again", iterations=1)).returncode == 0
    status = cluster.wait_phase("again", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    new_uid = cluster.run("again")["metadata"]["uid"]
    assert new_uid != old_uid
    for job in cluster.jobs("again"):
        assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == [new_uid]
    assert f"again-{new_uid[:8]}" in status["latestCheckpoint"]
    no_stage_ran_twice(cluster, "again")


def test_lowering_iterations_mid_run_stops_after_the_new_last_and_raising_continues(cluster: Cluster) -> None:
    assert cluster.apply(run_manifest("shrink", iterations=2)).returncode == 0
    cluster.wait("shrink", lambda s: s.get("currentIteration") == 2 and s.get("currentStage") == "generate")
    assert cluster.apply(run_manifest("shrink", iterations=1)).returncode == 0
    status = cluster.wait_phase("shrink", "Succeeded", "Failed", timeout=120)
    assert status["phase"] == "Succeeded" and status["progress"] == "1/1"
    deadline = time.monotonic() + 60 * cluster.patience
    while any(j["metadata"]["name"].startswith("shrink-i2-") for j in cluster.jobs("shrink")):
        assert time.monotonic() < deadline, "the out-of-range iteration's Job was not deleted"
        time.sleep(1)
    assert cluster.apply(run_manifest("shrink", iterations=2)).returncode == 0
    status = cluster.wait("shrink", lambda s: s.get("phase") == "Succeeded" and s.get("progress") == "2/2")
    assert stage(status, 2, "train")["phase"] == "Succeeded"
    assert stage(status, 1, "train")["attempts"] == 1  # iteration 1 was not redone


def test_a_two_node_train_runs_as_one_gang_and_a_killed_pod_restarts_it_whole(cluster: Cluster) -> None:
    gang = {"distributed": {"nodes": 2, "masterPort": free_port()}}
    assert cluster.apply(run_manifest("gang", iterations=1, training=gang)).returncode == 0
    job = "gang-i1-train"

    def both_running() -> list[dict]:
        pods = cluster.pods(job)
        return pods if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) else []

    deadline = time.monotonic() + 300 * cluster.patience
    while not (first := both_running()):
        assert time.monotonic() < deadline, cluster.pods(job)
        time.sleep(0.2)
    index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in first}
    assert sorted(index) == ["0", "1"] and index["0"]["spec"]["subdomain"] == job
    # Node 1's pod is deleted mid-run, as an operator error or a crash of its node agent would end it:
    # the Job fails, and the operator stops and re-creates the whole gang.
    cluster.core.delete_namespaced_pod(index["1"]["metadata"]["name"], cluster.namespace)

    status = cluster.wait_phase("gang", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    train = stage(status, 1, "train")
    assert train["attempts"] == 2 and "restarting" not in train
    # Both nodes' ranks trained together in the second attempt: the same number of steps each.
    metrics = train["metrics"]
    assert metrics["world_size"] == 2 and len(set(metrics["rank_steps"])) == 1 and metrics["steps"] > 0
    second = cluster.pods(job)
    assert len(second) == 2 and not {p["metadata"]["uid"] for p in second} & {p["metadata"]["uid"] for p in first}
    (recreated,) = [j for j in cluster.jobs("gang") if j["metadata"]["name"] == job]
    assert recreated["metadata"]["annotations"]["idpo.dev/attempt"] == "2"
    events = cluster.kubectl("get", "events", "--field-selector", "involvedObject.name=gang", "-o", "json")
    said = [(e["reason"], e["message"]) for e in json.loads(events.stdout)["items"]]
    train = {reason: message for reason, message in said if message.startswith("iteration 1 train")}
    assert sorted(reason for reason, message in said if message.startswith("iteration 1 train")) == [
        "StageRestarting",
        "StageRetrying",
        "StageStarted",
        "StageSucceeded",
    ], said
    assert "restarting all pods: a pod failed in attempt 1" in train["StageRestarting"], said
    assert "attempt 2 after a failure" in train["StageRetrying"], said
    assert "SpecChangeDeferred" not in {reason for reason, _ in said}, said
    loads = (
        "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    )
    loaded, message = cluster.run_job(["-c", loads, on_volume(status)], claim=CLAIM)
    assert loaded, message


def test_a_second_operator_stays_passive_until_the_leader_hands_over(cluster: Cluster, tmp_path) -> None:
    import json
    import urllib.request

    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    second = cluster.spawn_operator(tmp_path / "second.log", liveness, free_port())
    try:
        assert cluster.apply(run_manifest("handover", iterations=1)).returncode == 0
        cluster.wait("handover", lambda s: s.get("currentStage") == "rank")

        def reconciles() -> int:
            return json.loads(urllib.request.urlopen(liveness, timeout=10).read())["reconciles"]

        assert reconciles() == 0  # it watches and caches, and writes nothing
        cluster.stop_operator()  # SIGTERM: the leader releases the Lease on its way out
        first, cluster.operator = cluster.operator, second  # `wait` gives up if this one dies
        status = cluster.wait_phase("handover", "Succeeded", "Failed")
        assert status["phase"] == "Succeeded", status.get("message")
        assert reconciles() > 0
        no_stage_ran_twice(cluster, "handover")
    finally:
        second.terminate()
        second.wait(30)
        cluster.start_operator()
    assert first is not None and first.returncode is not None


def test_a_run_costs_its_own_writes_only_and_reads_nothing_but_its_watches(cluster: Cluster) -> None:
    if cluster.target.plane is None:
        pytest.skip("reads the apiserver's audit log, which only the local control plane shares")

    reconciled = ("iterativedporuns", "jobs", "pods")

    def reads() -> int:
        return sum(verb in ("list", "get") for verb, _, res in cluster.operator_requests() if res in reconciled)

    def reasons() -> list[str]:
        listed = cluster.kubectl("get", "events", "--field-selector", "involvedObject.name=cached", "-o", "json")
        return sorted(e["reason"] for e in json.loads(listed.stdout)["items"])

    before = reads()
    assert cluster.apply(run_manifest("cached", iterations=1, ranking=LIGHT_RANKING)).returncode == 0
    assert cluster.wait_phase("cached", "Succeeded", "Failed")["phase"] == "Succeeded"
    # The run's last event is posted just after its last status write.
    wait_for(lambda: "RunSucceeded" in reasons(), "no RunSucceeded event", 60 * cluster.patience)
    # Three stages, dozens of Job and Pod events and reconciles, and no read of their own: what reads
    # there are, are kopf's re-lists when a watch ends (every 5 minutes), at most one per kind.
    assert reads() - before <= len(reconciled)
    mine = [
        e
        for e in cluster.operator_audit()
        if e["verb"] not in ("get", "list", "watch") and e["objectRef"].get("name", "").startswith("cached")
    ]
    writes = collections.Counter(
        (e["verb"], e["objectRef"]["resource"], e["objectRef"].get("subresource")) for e in mine
    )
    # A status patch per transition (three stage starts, two of them hand-offs, and the end) and a Job per
    # stage, its config inside: nothing of kopf's own (no annotations, no finalizer) and no ConfigMaps.
    assert writes == {("patch", "iterativedporuns", "status"): 4, ("create", "jobs", None): 3}, writes
    # An event per stage start and end, and one for the run's end: a hand-off is 4 writes in all.
    assert reasons() == ["RunSucceeded", *["StageStarted"] * 3, *["StageSucceeded"] * 3], reasons()
    # Jobs and Pods come only from watches with the run label as a server-side selector.
    queries = [
        urllib.parse.parse_qs(urllib.parse.urlsplit(e["requestURI"]).query)
        for e in cluster.operator_audit()
        if e["objectRef"]["resource"] in ("jobs", "pods")
        and e["verb"] in ("list", "watch")
        and "kubectl" not in e.get("userAgent", "")  # the authorizer test's own `kubectl get jobs`, as the operator
    ]
    assert queries and all(q.get("labelSelector") == ["idpo.dev/run"] for q in queries), queries


def test_an_operator_killed_at_every_stage_boundary_finishes_the_run_without_duplicates(cluster: Cluster) -> None:
    import signal

    from tests.test_operator_e2e import job_conditions

    assert cluster.apply(run_manifest("boundaries", iterations=1)).returncode == 0
    for stage_name in ("generate", "rank", "train"):
        job = f"boundaries-i1-{stage_name}"
        deadline = time.monotonic() + 180 * cluster.patience
        while not any(c["type"] == "Complete" for c in job_conditions(cluster, "boundaries", job)):
            assert time.monotonic() < deadline, f"{job} did not complete"
            time.sleep(0.2)
        cluster.stop_operator(signal.SIGKILL)  # right at the hand-off: no release of the Lease
        cluster.start_operator()  # it waits out the dead leader's Lease (15 s), then resumes
    status = cluster.wait_phase("boundaries", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert sorted(j["metadata"]["name"] for j in cluster.jobs("boundaries")) == [
        "boundaries-i1-generate",
        "boundaries-i1-rank",
        "boundaries-i1-train",
    ]
    no_stage_ran_twice(cluster, "boundaries")


def test_an_older_operators_finalizer_is_removed_so_that_the_run_can_be_deleted(cluster: Cluster) -> None:
    # Operators before 0.2 ran a kopf timer per run, and kopf guards a timer with a finalizer.
    manifest = run_manifest("upgraded", iterations=1, suspend=True)
    manifest["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    assert cluster.apply(manifest).returncode == 0
    cluster.wait("upgraded", lambda s: s.get("phase") == "Suspended", timeout=60)
    deadline = time.monotonic() + 30 * cluster.patience
    while cluster.run("upgraded")["metadata"].get("finalizers"):
        assert time.monotonic() < deadline, cluster.run("upgraded")["metadata"]
        time.sleep(0.2)
    assert cluster.kubectl("delete", "idpo", "upgraded", "--timeout=30s").returncode == 0


@pytest.mark.parametrize(
    ("summary", "says"),
    [
        ("[1]", "malformed stage summary: expected a JSON object, got list"),
        ("null", "malformed stage summary: expected a JSON object, got NoneType"),
        ('{"shard": 4, "shards": 1, "metrics": {"pairs": 3}}', "malformed stage summary: shard 4 of 1"),
    ],
    ids=["list", "null", "shard-out-of-range"],
)
def test_a_stage_that_leaves_a_malformed_summary_fails_with_a_clear_message(
    cluster: Cluster, summary: str, says: str
) -> None:
    name = f"stub-{len(summary)}"
    env = [*run_manifest("x")["spec"]["runtime"]["env"], {"name": "IDPO_STUB_SUMMARY", "value": summary}]
    ranking = {"ranker": "function", "function": "rewards:stub_summary", "model": None}
    assert cluster.apply(run_manifest(name, iterations=1, ranking=ranking, runtime={"env": env})).returncode == 0
    status = cluster.wait_phase(name, "Failed")
    assert status["message"].startswith("iteration 1 rank failed") and says in status["message"], status["message"]
    assert [j["metadata"]["name"] for j in cluster.jobs(name) if j["metadata"]["name"].endswith("train")] == []
    # Its status stays writable: a spec edit is observed and recorded.
    assert cluster.kubectl("patch", "idpo", name, "--type=merge", "-p", '{"spec":{"suspend":true}}').returncode == 0
    cluster.wait(name, lambda s: s.get("observedGeneration") == 2, timeout=60)


def test_a_nan_metric_is_recorded_as_null_with_a_warning_and_a_run_alongside_succeeds(cluster: Cluster) -> None:
    summary = json.dumps({"shard": 0, "shards": 1, "metrics": {"pairs": 1, "loss": float("nan")}})  # Python writes NaN
    env = [*run_manifest("x")["spec"]["runtime"]["env"], {"name": "IDPO_STUB_SUMMARY", "value": summary}]
    ranking = {"ranker": "function", "function": "rewards:stub_summary", "model": None}
    assert cluster.apply(run_manifest("nan", iterations=1, ranking=ranking, runtime={"env": env})).returncode == 0
    assert cluster.apply(run_manifest("alongside", iterations=1, ranking=LIGHT_RANKING)).returncode == 0
    status = cluster.wait_phase("nan", "Failed")
    rank = status["iterations"][0]["stages"]["rank"]
    assert rank["phase"] == "Succeeded" and rank["metrics"] == {"pairs": 1}  # the NaN is not sent to the API
    assert "metric loss was nan; recorded as null" in rank["message"]
    # The stub wrote no pairs: train refuses its input with the stage's own words.
    assert "iteration 1 train failed" in status["message"] and "input stage 'rank' is incomplete" in status["message"]
    assert cluster.wait_phase("alongside", "Succeeded", "Failed")["phase"] == "Succeeded"


def identity(log: pathlib.Path) -> str:
    """The leader-election identity (its API user agent too) of the replica that last became the leader
    in `log` (a log the module's operators append to: the latest is the one running)."""
    found = re.findall(r"became the leader \((\S+)\)", log.read_text())
    assert found, log.read_text()[-2000:]
    return found[-1]


def wait_for(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_leader_paused_past_its_lease_writes_nothing_once_another_took_over(cluster: Cluster, tmp_path) -> None:
    import signal
    import urllib.request

    if cluster.target.plane is None:
        pytest.skip("reads the apiserver's audit log, which only the local control plane shares")
    first, first_log = cluster.operator, cluster.operator_log
    assert first is not None
    second_log, liveness = tmp_path / "second.log", f"http://127.0.0.1:{free_port()}/healthz"
    second = cluster.spawn_operator(second_log, liveness, free_port())
    try:
        assert cluster.apply(run_manifest("paused", iterations=1)).returncode == 0
        cluster.wait("paused", lambda s: s.get("currentStage") == "rank")
        # That step's Events go out after its status write, off the reconcile's path (apply.py): let them land
        # (the wait above sees the status at once). An Event already past its `leading()` check when the
        # process stops is sent when it resumes, as client-go's would be: what this test is about is what the
        # old leader decides and writes after it lost the Lease.
        time.sleep(2)
        old = identity(first_log)
        os.killpg(first.pid, signal.SIGSTOP)  # as a node's freeze or a long GC pause would
        patience = 90 * cluster.patience
        wait_for(lambda: "became the leader" in second_log.read_text(), "the follower never took over", patience)
        new = identity(second_log)
        time.sleep(3)
        os.killpg(first.pid, signal.SIGCONT)  # it wakes up believing nothing happened
        cluster.operator = second  # `wait` gives up if this one dies
        status = cluster.wait_phase("paused", "Succeeded", "Failed")
        assert status["phase"] == "Succeeded", status.get("message")
        time.sleep(3)  # the old leader has had its chance to write
        assert json.loads(urllib.request.urlopen(liveness, timeout=10).read())["reconciles"] > 0
        # The new leader's term ends here: once it leaves (below), the old one may rightly lead again.
        term_ended = audit_stamp()
    finally:
        cluster.operator = first
        second.terminate()
        second.wait(30)
        cluster.stop_operator()
        cluster.start_operator()
    audit = [e for e in cluster.operator_audit() if e.get("stageTimestamp")]
    took_over = min(  # the new leader's first successful write of the Lease: it holds it from then on
        e["stageTimestamp"]
        for e in audit
        if new in e.get("userAgent", "")
        and e["objectRef"]["resource"] == "leases"
        and e["verb"] in ("update", "create")
        and e["responseStatus"].get("code", 500) < 400
    )
    late = [
        (e["verb"], e["objectRef"]["resource"], e["responseStatus"].get("code"))
        for e in audit
        if old in e.get("userAgent", "")
        and took_over < e["stageTimestamp"] < term_ended
        and e["verb"] not in ("get", "list", "watch")
        and e["responseStatus"].get("code", 500) < 400
    ]
    assert late == [], late
    no_stage_ran_twice(cluster, "paused")


def test_with_two_replicas_every_edit_of_a_succeeded_run_is_acted_on(cluster: Cluster, tmp_path) -> None:
    second = cluster.spawn_operator(tmp_path / "follower.log", f"http://127.0.0.1:{free_port()}/healthz", free_port())
    try:
        assert cluster.apply(run_manifest("edited", iterations=1, ranking=LIGHT_RANKING)).returncode == 0
        assert cluster.wait_phase("edited", "Succeeded", "Failed")["phase"] == "Succeeded"
        before = len(cluster.operator_audit()) if cluster.target.plane is not None else 0
        for n in range(2, 12):
            patch = json.dumps({"spec": {"iterations": n, "suspend": True}})
            assert cluster.kubectl("patch", "idpo", "edited", "--type=merge", "-p", patch).returncode == 0
            generation = cluster.run("edited")["metadata"]["generation"]
            cluster.wait(
                "edited",
                lambda s, n=n, g=generation: s.get("observedGeneration") == g and s.get("progress") == f"2/{n}",
                timeout=30,
            )
        if cluster.target.plane is not None:  # nobody wrote to the run but its status: no kopf bookkeeping
            writes = [e for e in cluster.operator_audit()[before:] if e["objectRef"]["resource"] == "iterativedporuns"]
            assert {(e["verb"], e["objectRef"].get("subresource")) for e in writes} <= {("patch", "status")}
    finally:
        second.terminate()
        second.wait(30)


def test_a_planted_claim_of_the_predicted_name_stalls_the_run_and_is_never_used(cluster: Cluster) -> None:
    planted = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "victim-workspace", "labels": {"idpo.dev/run": "victim"}},  # labels are easy to forge
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    assert cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(planted)).returncode == 0
    manifest = run_manifest("victim", iterations=1)
    manifest["spec"].pop("storage")  # the run would create (or use) `victim-workspace`
    assert cluster.apply(manifest).returncode == 0
    status = cluster.wait("victim", lambda s: s.get("conditions") and "ForeignChild" in json.dumps(s), timeout=60)
    stalled = {c["type"]: c for c in status["conditions"]}["Stalled"]
    assert (
        stalled["status"] == "True"
        and "PersistentVolumeClaim victim-workspace belongs to another" in stalled["message"]
    )
    time.sleep(2)  # reconciles go on (with a backoff): still no Job, no pod ever mounted the claim
    assert cluster.jobs("victim") == []
    mounted = cluster.kubectl("get", "pods", "-o", "json")
    volumes = [v for p in json.loads(mounted.stdout)["items"] for v in p["spec"].get("volumes", [])]
    assert not any((v.get("persistentVolumeClaim") or {}).get("claimName") == "victim-workspace" for v in volumes)
    cluster.kubectl("delete", "pvc", "victim-workspace", "--wait=false")


def owned_jobs(cluster: Cluster, run: str) -> list[str]:
    uid = cluster.run(run)["metadata"]["uid"]
    return [j["metadata"]["name"] for j in cluster.jobs(run) if uid in json.dumps(j["metadata"]["ownerReferences"])]


def plain_job(name: str, image: str) -> dict[str, Any]:
    """A suspended Job of someone else's (no labels, no owner) under a name a run's Job would take."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "suspend": True,  # never runs anything
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "x", "image": image}]}},
        },
    }


def test_a_plain_job_of_the_predicted_name_stalls_the_run_until_it_is_deleted(cluster: Cluster) -> None:
    # No labels, no owner: the operator's label-selected watch never sees it, and the create's
    # "already exists" must not be taken for the run's own Job.
    planted = plain_job("squatted-i1-generate", cluster.image)
    assert cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(planted)).returncode == 0
    try:
        manifest = run_manifest("squatted", iterations=1, storage={"existingClaim": "absent"})  # no pod will run
        assert cluster.apply(manifest).returncode == 0
        status = cluster.wait("squatted", lambda s: stalled(s).get("reason") == "ForeignChild", timeout=60)
        assert "Job squatted-i1-generate belongs to another object" in stalled(status)["message"]
        assert status.get("phase") != "Running" and owned_jobs(cluster, "squatted") == []
        left = json.loads(cluster.kubectl("get", "job", "squatted-i1-generate", "-o", "json").stdout)
        assert "ownerReferences" not in left["metadata"] and left["spec"]["suspend"] is True  # never touched
    finally:
        cluster.kubectl("delete", "job", "squatted-i1-generate", "--wait=true")
    # Once it is gone, the run's next attempt (its backoff) creates its own.
    cluster.wait("squatted", lambda s: owned_jobs(cluster, "squatted") == ["squatted-i1-generate"], timeout=120)
    cluster.wait("squatted", lambda s: stalled(s).get("status") == "False", timeout=30)


def test_two_runs_whose_names_once_shortened_alike_each_get_their_own_jobs(cluster: Cluster) -> None:
    dotted = "team-a.finetune"  # shortened (a Job name has no dots), once to the other run's plain name
    other = legacy_job_name(dotted, StageKey(1, Stage.GENERATE)).removesuffix("-i1-generate")
    for name in (other, dotted):
        assert cluster.apply(run_manifest(name, iterations=1, storage={"existingClaim": "absent"})).returncode == 0
    for name in (dotted, other):
        status = cluster.wait(name, lambda s, n=name: len(owned_jobs(cluster, n)) == 1, timeout=60)
        assert stalled(status).get("status") != "True", status.get("message")
    assert owned_jobs(cluster, other) == [f"{other}-i1-generate"]
    assert owned_jobs(cluster, dotted) != owned_jobs(cluster, other)


def test_pods_the_pod_security_admission_refuses_stall_the_run_with_its_reason(cluster: Cluster) -> None:
    # Whatever makes the admitted pod break the namespace's `restricted` level (here a platform's
    # mutating policy that puts it on the host network), the Job controller can create no pod: its only
    # report is a FailedCreate Event on the Job. The run says why, then fails at its start deadline.
    name = f"idpo-test-host-network-{cluster.namespace}"
    expression = "Object{spec: Object.spec{hostNetwork: true}}"
    labels = "object.metadata.?labels.orValue({})"
    ours = f"'idpo.dev/run' in {labels} && {labels}['idpo.dev/run'] == 'refused'"
    namespace = {"matchLabels": {"kubernetes.io/metadata.name": cluster.namespace}}
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
                ]
            },
            "matchConditions": [{"name": "run", "expression": ours}],
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "mutations": [{"patchType": "ApplyConfiguration", "applyConfiguration": {"expression": expression}}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "matchResources": {"namespaceSelector": namespace},
        },
    }
    created = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([policy, binding]))
    assert created.returncode == 0, created.stderr
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "labels": {"idpo.dev/run": "refused"}},
        "spec": {"containers": [{"name": "x", "image": cluster.image}]},
    }
    deadline = time.monotonic() + 60 * cluster.patience
    # The apiserver loads a new admission policy a moment later: a run's first pod must meet it.
    while "hostNetwork" not in cluster.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(probe)).stderr:
        assert time.monotonic() < deadline, "the mutating admission policy never took effect"
        time.sleep(0.5)
    try:
        refused_pods_stall_the_run(cluster, "refused", 'violates PodSecurity "restricted:latest": host namespaces')
    finally:
        cluster.kubectl("delete", "mutatingadmissionpolicybinding,mutatingadmissionpolicy", name)


def test_the_operator_used_the_grants_only_fault_paths_need(cluster: Cluster) -> None:
    """Every grant beyond the happy path's is used, on this test's own objects, by the fault path it is
    there for: a Job that cannot start is failed (patch) and, retried, deleted; a gang's Service of a
    taken name is created and read; a claim and a Job of a taken name are read; an older operator's
    finalizer goes."""
    if cluster.target.plane is None:
        pytest.skip("reads the apiserver's audit log, which only the local control plane shares")
    planted = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "grants-claim-workspace"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "grants-gang-i1-train"},
            "spec": {"clusterIP": "None", "selector": {"app": "someone-else"}},
        },
        plain_job("grants-squat-i1-generate", cluster.image),
    ]
    assert cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(planted)).returncode == 0

    def used() -> bool:
        return cluster.operator_calls("grants-") >= FAULT_PATH_GRANTS

    try:
        stuck = {"image": "registry.invalid/idpo/missing:0", "startTimeoutSeconds": 30}
        assert cluster.apply(run_manifest("grants-stuck", iterations=1, runtime=stuck)).returncode == 0
        claim = run_manifest("grants-claim", iterations=1)
        claim["spec"].pop("storage")  # the run would create `grants-claim-workspace`: taken
        assert cluster.apply(claim).returncode == 0
        finalized = run_manifest("grants-final", iterations=1, suspend=True)
        finalized["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
        assert cluster.apply(finalized).returncode == 0
        gang = {"distributed": {"nodes": 2, "masterPort": free_port()}}
        ranking = {"ranker": "function", "function": "rewards:starts_with_s", "model": None}
        assert cluster.apply(run_manifest("grants-gang", iterations=1, training=gang, ranking=ranking)).returncode == 0
        squat = run_manifest("grants-squat", iterations=1, storage={"existingClaim": "absent"})  # no pod will run
        assert cluster.apply(squat).returncode == 0

        cluster.wait_phase("grants-stuck", "Failed", timeout=180)  # the Job failed by a patch
        retry = ("annotate", "idpo", "grants-stuck", "idpo.dev/retry=1", "--overwrite")
        assert cluster.kubectl(*retry).returncode == 0  # the failed Job is deleted, and created again
        wait_for(used, "the fault paths' grants were not all used", 600 * cluster.patience)
    finally:
        runs = ("grants-stuck", "grants-claim", "grants-final", "grants-gang", "grants-squat")
        cluster.kubectl("delete", "idpo", *runs, "--wait=false")
        taken = ("pvc/grants-claim-workspace", "service/grants-gang-i1-train", "job/grants-squat-i1-generate")
        cluster.kubectl("delete", *taken, "--wait=false")
    assert cluster.operator_calls("grants-") >= FAULT_PATH_GRANTS, FAULT_PATH_GRANTS - cluster.operator_calls("grants-")
