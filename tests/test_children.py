"""A run's children against what else is in the namespace, decided without a server: names no other run
computes, and a Job whose pods the apiserver refuses (the Job controller's FailedCreate Event). The same
stories on the real control plane: tests/test_faults.py and tests/test_quota.py."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from idpo_jobs.config import Stage
from idpo_operator import resources
from idpo_operator.observe import CreateFailure, create_failure, job_view, pod_view
from idpo_operator.plan import StageKey
from idpo_operator.reconcile import decide

from tests.test_operator_e2e import run_manifest
from tests.test_reconcile import NOW, job_raw, pod_raw, run

G1 = StageKey(1, Stage.GENERATE)
KEYS = [StageKey(i, s) for i in (0, 1, 12, 100) for s in Stage]
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
REFUSED = 'Error creating: pods "r-i1-generate-0-" is forbidden: violates PodSecurity "restricted:latest": host...'
label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
run_names = st.lists(label, min_size=1, max_size=12).map(".".join).filter(lambda n: len(n) <= 253)


def legacy_job_name(run: str, key: StageKey) -> str:
    """How operators before this one shortened a Job name: `<stem>-<hash>-<suffix>`."""
    suffix = f"i{key.iteration}-{key.stage.value}"
    digest = hashlib.sha256(f"{run}-{suffix}".encode()).hexdigest()[:8]
    return f"{run.replace('.', '-')[: 52 - len(suffix) - 10].rstrip('-.')}-{digest}-{suffix}"


def test_a_dotted_runs_job_is_not_named_as_the_run_its_old_short_name_spells() -> None:
    # The pair: `team-a.finetune` was shortened to `team-a-finetune-<hash>-i1-generate`, the very
    # name of the Job of a run called `team-a-finetune-<hash>`.
    dotted = "team-a.finetune"
    other = legacy_job_name(dotted, G1).removesuffix("-i1-generate")
    assert resources.job_name(other, G1) == legacy_job_name(dotted, G1)  # the plain name of the other run
    assert resources.job_name(dotted, G1) != resources.job_name(other, G1)
    assert resources.job_name(dotted, G1).endswith("--i1-generate") and "." not in resources.job_name(dotted, G1)


@settings(max_examples=300, deadline=None)
@given(names=st.lists(run_names, min_size=2, max_size=6, unique=True))
def test_no_two_run_names_share_a_child_name(names: list[str]) -> None:
    jobs = [(n, k, resources.job_name(n, k)) for n in names for k in KEYS]
    assert len({j for _, _, j in jobs}) == len(jobs)
    claims = {resources.child_name(n, "workspace") for n in names}
    assert len(claims) == len(names)
    for name, key, job in jobs:
        assert len(job) <= resources.MAX_JOB_NAME and DNS_LABEL.fullmatch(job), job
        suffix = f"-i{key.iteration}-{key.stage.value}"
        if job != f"{name}{suffix}":  # shortened: what precedes the suffix is no run name at all
            assert job.endswith(suffix) and job.removesuffix(suffix).endswith("-")


def test_long_names_stay_valid_and_distinct_from_the_plain_names_they_resemble() -> None:
    long = "a" * 253
    claim = resources.child_name(long, "workspace")
    assert len(claim) <= 253 and claim.endswith("--workspace")
    stem = claim.removesuffix("-workspace")
    assert stem.endswith("-")  # no run is named so: a DNS subdomain ends with a letter or a digit
    assert resources.child_name(stem.rstrip("-"), "workspace") != claim  # the run named as the old form was


def refused_pods_stall_the_run(cluster: Any, name: str, because: str) -> None:
    """The real control plane's half (tests/test_faults.py, tests/test_quota.py): run `name` in a namespace
    whose apiserver refuses its pods, `because` being in the refusal. Status says why while the stage waits,
    then the stage fails at its start deadline (30 s), with no pod ever created."""
    runtime = {"startTimeoutSeconds": 30}
    assert cluster.apply(run_manifest(name, iterations=1, runtime=runtime)).returncode == 0
    waiting = cluster.wait(name, lambda s: "FailedCreate" in s.get("message", ""), timeout=90)
    assert waiting["phase"] == "Running" and stalled(waiting).get("status") != "True"
    assert waiting["message"].startswith("iteration 1 generate: Pending: FailedCreate: Error creating: ")
    assert because in waiting["message"], waiting["message"]
    status = cluster.wait_phase(name, "Failed", timeout=120)
    assert "did not start within 30s: Pending: FailedCreate: " in status["message"], status["message"]
    assert stalled(status)["status"] == "True" and cluster.pods(f"{name}-i1-generate") == []


def stalled(status: dict[str, Any]) -> dict[str, Any]:
    return {c["type"]: c for c in status.get("conditions") or []}.get("Stalled") or {}


def failure(uid: str = "job-1-generate", first: str = NOW, last: str = NOW, message: str = REFUSED) -> CreateFailure:
    return CreateFailure(uid, message, first, last)


def unstarted(start: str = "2025-12-31T23:59:50Z", suspended: bool = False) -> Any:
    raw = job_raw(G1, None)
    raw["status"]["startTime"] = start
    raw["metadata"]["creationTimestamp"] = start
    raw["spec"] = {"suspend": suspended}
    return job_view(raw)


def created_pod(created: str, phase: str) -> Any:
    raw = pod_raw(G1, {})
    raw["metadata"]["creationTimestamp"] = created
    raw["status"] = {"phase": phase}
    return pod_view(raw)


def test_a_job_whose_pods_are_refused_shows_the_apiservers_reason_then_fails_at_the_start_deadline() -> None:
    r = run(runtime={"startTimeoutSeconds": 30})
    failures = {"job-1-generate": failure(first="2025-12-31T23:59:50Z")}  # at once: the Job's first sync
    waiting = decide(r, [unstarted()], [], NOW, failures=failures)
    assert waiting.status["phase"] == "Running" and waiting.fail == {}
    assert waiting.status["message"] == f"iteration 1 generate: Pending: FailedCreate: {REFUSED}"
    assert waiting.requeue_after == 30 - 10 + 1  # at its deadline, counted from the Job's start
    since = {"job-1-generate": failure(first="2025-12-31T23:59:00Z")}  # refused again and again since
    late = decide(r, [unstarted("2025-12-31T23:59:00Z")], [], NOW, failures=since)
    assert late.fail == {"r-i1-generate": f"did not start within 30s: Pending: FailedCreate: {REFUSED}"}


def test_a_refusal_from_before_the_job_started_or_before_its_newest_pod_is_not_the_jobs_state() -> None:
    old = {"job-1-generate": failure(first="2025-12-31T23:00:00Z", last="2025-12-31T23:00:00Z")}
    readmitted = decide(run(), [unstarted()], [], NOW, failures=old)  # Kueue admitted it again since
    assert "FailedCreate" not in readmitted.status["message"] and readmitted.fail == {}
    overcome = {"job-1-generate": failure(first="2025-12-31T23:59:51Z", last="2025-12-31T23:59:52Z")}
    running = decide(run(), [unstarted()], [created_pod("2025-12-31T23:59:55Z", "Running")], NOW, failures=overcome)
    assert "FailedCreate" not in running.status["message"]
    held = decide(run(), [unstarted(suspended=True)], [], NOW, failures={"job-1-generate": failure()})
    assert "FailedCreate" not in held.status["message"]  # a suspended Job creates no pods: nothing refused
    other = decide(run(), [unstarted()], [], NOW, failures={"someone-elses-job": failure("someone-elses-job")})
    assert "FailedCreate" not in other.status["message"]


def test_a_stage_with_some_pods_running_and_others_refused_says_so_and_waits_without_a_deadline() -> None:
    r = run(runtime={"startTimeoutSeconds": 30}, generation={"shards": 2})
    pods = [created_pod("2025-12-31T23:00:00Z", "Running")]
    d = decide(r, [unstarted("2025-12-31T23:00:00Z")], pods, NOW, failures={"job-1-generate": failure()})
    assert "Pending: FailedCreate: " in d.status["message"] and d.fail == {}
    # Its pods all finished, and the one it needs now is refused: the deadline counts from the refusal.
    done = [created_pod("2025-12-31T23:00:00Z", "Failed")]
    recent = {"job-1-generate": failure(first="2025-12-31T23:59:45Z")}
    d = decide(r, [unstarted("2025-12-31T23:00:00Z")], done, NOW, failures=recent)
    assert d.fail == {} and d.requeue_after == 30 - 15 + 1


def test_failed_create_events_of_both_apis_are_read_and_others_are_not() -> None:
    core = {
        "involvedObject": {"kind": "Job", "name": "r-i1-generate", "uid": "u1"},
        "reason": "FailedCreate",
        "message": "Error creating: x" * 100,
        "firstTimestamp": "2026-01-01T00:00:00Z",
        "lastTimestamp": "2026-01-01T00:05:00Z",
        "count": 7,
    }
    seen = create_failure(core)
    assert seen is not None and (seen.job_uid, seen.first, seen.last) == ("u1", NOW, "2026-01-01T00:05:00Z")
    assert len(seen.message) == 500
    modern = {
        "regarding": {"kind": "Job", "uid": "u2"},
        "reason": "FailedCreate",
        "note": "quota",
        "eventTime": "2026-01-01T00:00:00.123456Z",
        "series": {"count": 2, "lastObservedTime": "2026-01-01T00:01:00.000001Z"},
    }
    assert create_failure(modern) == CreateFailure("u2", "quota", NOW, "2026-01-01T00:01:00Z")
    assert create_failure({**core, "reason": "SuccessfulCreate"}) is None
    assert create_failure({**core, "involvedObject": {"kind": "ReplicaSet", "uid": "u3"}}) is None
