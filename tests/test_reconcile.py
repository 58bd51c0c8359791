"""The reconcile decision, table-driven from fixture Jobs and Pods; no server involved."""

from __future__ import annotations

import json
from typing import Any

from idpo_jobs.config import Stage
from idpo_operator import plan, resources
from idpo_operator.frozen import read as frozen_specs
from idpo_operator.observe import CONTROLLER_UID, JobView, PodView, job_view, pod_view
from idpo_operator.plan import StageKey
from idpo_operator.reconcile import RunView, decide
from idpo_operator.spec import IterativeDPORunSpec

from tests.conftest import manifest

NOW = "2026-01-01T00:00:00Z"


def run(status: dict | None = None, **spec: Any) -> RunView:
    return RunView("r", "ns", "uid-12345678", 1, manifest(**spec)["spec"], status or {})


def job(key: StageKey, state: str | None, failed: int = 0) -> JobView:
    return job_view(job_raw(key, state, failed))


def config_of(obj: dict[str, Any]) -> dict[str, Any]:
    """The stage config a Job carries on its pod template (mounted by the downward API)."""
    return json.loads(obj["spec"]["template"]["metadata"]["annotations"][resources.ANNOTATION_CONFIG])


def job_raw(key: StageKey, state: str | None, failed: int = 0) -> dict[str, Any]:
    owner = resources.Owner("r", "ns", "uid-12345678")
    conditions = (
        [
            {
                "type": state,
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "too many",
                "lastTransitionTime": NOW,
            }
        ]
        if state
        else []
    )
    return {
        "metadata": {
            "name": resources.job_name("r", key),
            "uid": f"job-{key.iteration}-{key.stage.value}",
            "labels": resources.labels(owner, key),
            "ownerReferences": [owner.reference()],
        },
        "status": {
            "conditions": conditions,
            "failed": failed,
            "startTime": NOW,
            **({"completionTime": NOW} if state == "Complete" else {}),
        },
    }


def pod(key: StageKey, message: dict[str, Any]) -> PodView:
    return pod_view(pod_raw(key, message))


def pod_raw(key: StageKey, message: dict[str, Any]) -> dict[str, Any]:
    owner = resources.Owner("r", "ns", "uid-12345678")
    labels = {**resources.labels(owner, key), CONTROLLER_UID: f"job-{key.iteration}-{key.stage.value}"}
    return {
        "metadata": {"labels": labels},
        "status": {"containerStatuses": [{"state": {"terminated": {"message": json.dumps(message)}}}]},
    }


def done_through(n: int, spec_run: RunView) -> list[JobView]:
    from idpo_operator.spec import IterativeDPORunSpec

    keys = plan.all_stages(IterativeDPORunSpec.model_validate(spec_run.spec))[:n]
    return [job(k, "Complete") for k in keys]


def test_a_new_run_creates_workspace_config_and_first_job() -> None:
    d = decide(run(), [], [], NOW)
    assert [o["kind"] for o in d.create] == ["PersistentVolumeClaim", "Job"]
    assert d.create[1]["metadata"]["name"] == "r-i1-generate"
    config = config_of(d.create[1])
    assert config["workspace"] == "idpo/r-uid-1234" and config["stage"] == "generate"
    assert d.status["phase"] == "Running" and d.status["currentStage"] == "generate"
    assert [e.reason for e in d.events] == ["StageStarted"]


def test_a_completed_job_hands_off_to_the_next_stage_with_its_metrics() -> None:
    g1 = StageKey(1, Stage.GENERATE)
    d = decide(run(), [job(g1, "Complete")], [pod(g1, {"metrics": {"prompts": 8, "responses": 24}})], NOW)
    assert d.create[-1]["metadata"]["name"] == "r-i1-rank"
    first = d.status["iterations"][0]["stages"]
    assert first["generate"]["phase"] == "Succeeded" and first["generate"]["metrics"] == {"prompts": 8, "responses": 24}
    assert {e.reason for e in d.events} == {"StageSucceeded", "StageStarted"}


def test_the_second_iteration_trains_from_the_first_checkpoint() -> None:
    r = run()
    d = decide(r, done_through(5, r), [], NOW)
    config = config_of(d.create[-1])
    assert config["stage"] == "train" and config["model"] == "pvc://idpo/r-uid-1234/iter-1/train/model"
    # Status names the claim too (KServe's `pvc://<claim>/<path>`); a stage resolves either form.
    assert d.status["latestCheckpoint"] == "pvc://r-workspace/idpo/r-uid-1234/iter-1/train/model"


def test_a_running_job_means_no_new_objects() -> None:
    d = decide(run(), [job(StageKey(1, Stage.GENERATE), None, failed=1)], [], NOW)
    assert d.create == [] and d.status["iterations"][0]["stages"]["generate"]["attempts"] == 2


def test_a_failed_job_fails_the_run_and_names_the_stage_and_error() -> None:
    g1, r1 = StageKey(1, Stage.GENERATE), StageKey(1, Stage.RANK)
    d = decide(
        run(),
        [job(g1, "Complete"), job(r1, "Failed", failed=3)],
        [pod(r1, {"stage": "rank", "error": "ranker directory /x lacks config.json"})],
        NOW,
    )
    assert d.create == [] and d.status["phase"] == "Failed"
    assert d.status["message"] == "iteration 1 rank failed after 3 attempt(s): ranker directory /x lacks config.json"
    conditions = {c["type"]: c["status"] for c in d.status["conditions"]}
    assert conditions["Stalled"] == "True" and conditions["Ready"] == "False"
    assert [e.reason for e in d.events if e.type == "Warning"] == ["StageFailed", "RunFailed"]


def test_a_finished_run_is_succeeded_and_creates_nothing() -> None:
    r = run()
    d = decide(r, done_through(6, r), [], NOW)
    assert d.create == [] and d.status["phase"] == "Succeeded" and d.status["progress"] == "2/2"


def test_suspend_stops_new_jobs_but_keeps_records() -> None:
    r = run(suspend=True)
    d = decide(r, done_through(1, r), [], NOW)
    assert d.create == [] and d.status["phase"] == "Suspended"


def test_a_succeeded_stage_whose_job_was_deleted_is_not_rerun() -> None:
    r = run()
    first = decide(r, done_through(2, r), [], NOW)
    again = decide(run(first.status), [], [], NOW)  # Jobs gone (TTL), operator restarted
    assert [o["metadata"]["name"] for o in again.create if o["kind"] == "Job"] == ["r-i1-train"]


def test_an_invalid_spec_stalls_the_run_with_the_field_named() -> None:
    r = RunView("r", "ns", "u", 3, {"iterations": 0}, {})
    d = decide(r, [], [], NOW)
    assert d.create == [] and d.status["phase"] == "Failed" and d.status["observedGeneration"] == 3
    assert "spec.iterations: Input should be greater than or equal to 1" in d.status["message"]
    assert {c["type"]: c["reason"] for c in d.status["conditions"]}["Stalled"] == "InvalidSpec"
    assert decide(RunView("r", "ns", "u", 3, {"iterations": 0}, d.status), [], [], NOW).events == []


def test_a_job_owned_by_another_uid_is_never_used_and_stalls_the_run_until_it_is_gone() -> None:
    g1 = StageKey(1, Stage.GENERATE)
    raw = job_raw(g1, "Complete")
    raw["metadata"]["ownerReferences"][0]["uid"] = "uid-of-a-deleted-run"
    d = decide(run(), [job_view(raw)], [], NOW)
    assert d.create == [] and d.status["iterations"][0]["stages"]["generate"]["phase"] == "Pending"
    stalled = {c["type"]: c for c in d.status["conditions"]}["Stalled"]
    assert (stalled["status"], stalled["reason"]) == ("True", "ForeignChild") and "r-i1-generate" in stalled["message"]
    assert [o["kind"] for o in decide(run(), [], [], NOW).create][-1] == "Job"  # once the GC removed it


def pending_pod(key: StageKey, created: str, reason: str) -> PodView:
    p = pod_raw(key, {})
    p["metadata"]["creationTimestamp"] = created
    p["status"] = {
        "phase": "Pending",
        "containerStatuses": [{"state": {"waiting": {"reason": reason, "message": "m"}}}],
    }
    return pod_view(p)


def test_a_pod_that_waits_shows_why_and_fails_the_stage_after_the_start_deadline() -> None:
    g1 = StageKey(1, Stage.GENERATE)
    waiting = decide(run(), [job(g1, None)], [pending_pod(g1, "2025-12-31T23:59:00Z", "ImagePullBackOff")], NOW)
    assert waiting.status["message"] == "iteration 1 generate: Pending: ImagePullBackOff: m" and waiting.fail == {}
    late = decide(run(), [job(g1, None)], [pending_pod(g1, "2025-12-31T23:00:00Z", "ImagePullBackOff")], NOW)
    assert late.fail == {"r-i1-generate": "did not start within 600s: Pending: ImagePullBackOff: m"}
    fatal = decide(run(), [job(g1, None)], [pending_pod(g1, NOW, "InvalidImageName")], NOW)
    assert list(fatal.fail) == ["r-i1-generate"]


def test_lowering_iterations_deletes_the_jobs_of_iterations_out_of_range() -> None:
    r = run(iterations=2)
    jobs = [*done_through(3, r), job(StageKey(2, Stage.GENERATE), None)]
    d = decide(run(r.status, iterations=1), jobs, [], NOW)
    assert d.delete == ["r-i2-generate"] and d.status["phase"] == "Succeeded"


def test_a_started_iteration_keeps_its_spec_and_a_change_waits_for_the_next_one() -> None:
    started = decide(run(generation={"shards": 2}), [], [], NOW)
    assert frozen_specs(started.status)[1]["generation"]["shards"] == 2
    edited = run(started.status, generation={"shards": 4})
    d = decide(edited, [job(StageKey(1, Stage.GENERATE), "Complete")], [], NOW)
    rank = config_of(d.create[-1])
    assert rank["inputShards"] == 2  # iteration 1 reads the parts it generated
    assert d.status["specChangeDeferred"] == "applies from iteration 2"
    assert "SpecChangeDeferred" in [e.reason for e in d.events]


def test_without_capacity_the_next_stage_waits_and_says_so() -> None:
    d = decide(run(), [], [], NOW, capacity=False)
    assert d.create == [] and d.status["phase"] == "Pending"
    assert d.status["message"] == "iteration 1 generate: Pending: waiting for capacity"


def evaluated(key: StageKey, lc: float) -> tuple[dict[str, Any], dict[str, Any]]:
    metrics = {"prompts": 16, "lc_win_rate_vs_base": lc, "lc_win_rate_vs_previous": lc, "win_rate_vs_base": lc}
    return job(key, "Complete"), pod(key, {"metrics": metrics})


def test_the_base_model_is_evaluated_first_and_every_iteration_after_its_training() -> None:
    spec = {"evaluation": {"enabled": True}}
    first = decide(run(**spec), [], [], NOW)
    assert first.create[-1]["metadata"]["name"] == "r-i0-evaluate"
    config = config_of(first.create[-1])
    assert (config["stage"], config["iteration"], config["baseIteration"]) == ("evaluate", 0, None)
    r = run(**spec)
    trained = [*[job(StageKey(0, Stage.EVALUATE), "Complete")], *done_through(3, run())]
    d = decide(r, trained, [], NOW)
    assert d.create[-1]["metadata"]["name"] == "r-i1-evaluate"
    config = config_of(d.create[-1])
    assert (config["baseIteration"], config["previousIteration"]) == (0, 0)
    assert config["model"] == "pvc://idpo/r-uid-1234/iter-1/train/model"


def test_a_stop_rule_ends_the_run_with_the_best_checkpoint_and_a_worse_iteration_is_an_event() -> None:
    rule = {"metric": "lcWinRateVsPrevious", "below": 0.5}
    spec = {"iterations": 3, "evaluation": {"enabled": True, "stopWhen": rule}}
    keys = plan.all_stages(IterativeDPORunSpec.model_validate(run(**spec).spec))[:9]  # through iteration 2
    jobs = {k: job(k, "Complete") for k in keys}
    (jobs[keys[4]], first), (jobs[keys[8]], second) = evaluated(keys[4], 0.7), evaluated(keys[8], 0.4)
    before = decide(run(**spec), [jobs[k] for k in keys[:8]], [first], NOW)
    assert before.create[-1]["metadata"]["name"] == "r-i2-evaluate"
    d = decide(run(before.status, **spec), list(jobs.values()), [first, second], NOW)
    assert d.create == [] and d.status["phase"] == "Succeeded"
    assert d.status["earlyStop"]["iteration"] == 2 and d.status["progress"] == "2/2"
    assert d.status["bestIteration"] == 1 and d.status["bestCheckpoint"].endswith("iter-1/train/model")
    assert "IterationWorse" in [e.reason for e in d.events]


def test_a_job_cache_behind_the_status_does_not_undo_a_succeeded_stage() -> None:
    g1 = StageKey(1, Stage.GENERATE)
    done = decide(run(), [job(g1, "Complete")], [], NOW)
    behind = decide(run(done.status), [job(g1, None)], [], NOW)  # the Job as it was before it completed
    assert behind.status["iterations"][0]["stages"]["generate"]["phase"] == "Succeeded"
    assert "StageStarted" not in [e.reason for e in behind.events]


def test_the_next_stage_is_told_the_digests_its_input_reported() -> None:
    g1 = StageKey(1, Stage.GENERATE)
    summary = {"shard": 0, "shards": 1, "digest": "abc123", "metrics": {"prompts": 8}}
    d = decide(run(), [job(g1, "Complete")], [pod(g1, summary)], NOW)
    rank = config_of(d.create[-1])
    assert rank["stage"] == "rank" and rank["inputDigests"] == ["abc123"]
    assert d.status["iterations"][0]["stages"]["generate"]["digests"] == ["abc123"]


GANG = {"training": {"distributed": {"nodes": 2}}, "storage": {"accessModes": ["ReadWriteMany"]}}
TRAIN1 = StageKey(1, Stage.TRAIN)
CRASH = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
DISRUPTION = (
    "PodFailurePolicy",
    "Pod ns/r-i1-train-1-x has condition DisruptionTarget matching FailJob rule at index 0",
)
BAD_INPUT = ("PodFailurePolicy", "Container stage for pod ns/r-i1-train-0-x failed with exit code 2 matching FailJob")


def gang_job(attempt: int, state: str | None = None, why: tuple[str, str] = CRASH, deleting: bool = False) -> JobView:
    body = job_raw(TRAIN1, state)
    body["metadata"]["annotations"] = {resources.ANNOTATION_ATTEMPT: str(attempt)}
    body["spec"] = {"completions": 2, "template": {"spec": {"subdomain": resources.service_name("r", TRAIN1)}}}
    if state:
        body["status"]["conditions"][0] |= {"reason": why[0], "message": why[1]}
    if deleting:
        body["metadata"]["deletionTimestamp"] = NOW
    return job_view(body)


def before_train() -> list[JobView]:
    return done_through(2, run(**GANG))


def train_status(status: dict[str, Any]) -> dict[str, Any]:
    return status["iterations"][0]["stages"]["train"]


def test_a_failed_gang_is_deleted_whole_then_recreated_as_its_next_attempt() -> None:
    failed = decide(run(**GANG), [*before_train(), gang_job(1, "Failed")], [], now=NOW)
    name = resources.job_name("r", TRAIN1)
    train = train_status(failed.status)
    assert (train["phase"], train["attempts"], train["restarting"]) == ("Running", 1, "PodFailed")
    assert failed.status["phase"] == "Running" and "restarting all pods" in train["message"]
    assert [e.reason for e in failed.events if e.key == TRAIN1] == ["StageRestarting"]
    # Nothing is deleted before the status says so (the attempt count must outlive the Job); the
    # operator reconciles again once it is written.
    assert failed.restart == [] and failed.create == [] and failed.requeue_after == 0

    told = decide(run(failed.status, **GANG), [*before_train(), gang_job(1, "Failed")], [], now=NOW)
    assert told.restart == [name] and told.requeue_after is None and told.events == []

    # Its pods are being deleted (Foreground): nothing is asked again, nothing starts.
    deleting = decide(run(told.status, **GANG), [*before_train(), gang_job(1, "Failed", deleting=True)], [], now=NOW)
    assert deleting.restart == [] and deleting.create == [] and train_status(deleting.status)["restarting"]

    gone = decide(run(deleting.status, **GANG), before_train(), [], now=NOW)
    assert [o["kind"] for o in gone.create] == ["Service", "Job"]  # the claim came with the run's first Job
    assert gone.create[-1]["metadata"]["annotations"][resources.ANNOTATION_ATTEMPT] == "2"
    train = train_status(gone.status)
    assert (train["phase"], train["attempts"], "restarting" in train) == ("Running", 2, False)
    assert [e.reason for e in gone.events] == ["StageRetrying"]

    # The API refused that create: the status written says attempt 2 and no Job exists. The next
    # reconcile creates attempt 2 again, not attempt 1.
    again = decide(run(gone.status, **GANG), before_train(), [], now=NOW)
    assert again.create[-1]["metadata"]["annotations"][resources.ANNOTATION_ATTEMPT] == "2"


def test_a_restart_that_waited_for_capacity_is_a_retry_not_a_start() -> None:
    restarting = decide(run(**GANG), [*before_train(), gang_job(1, "Failed")], [], now=NOW)
    waited = decide(run(restarting.status, **GANG), before_train(), [], capacity=False)
    assert train_status(waited.status)["phase"] == "Pending" and train_status(waited.status)["restarting"]
    started = decide(run(waited.status, **GANG), before_train(), [])
    assert started.create[-1]["metadata"]["annotations"][resources.ANNOTATION_ATTEMPT] == "2"
    assert [e.reason for e in started.events] == ["StageRetrying"]


def test_a_gang_out_of_retries_fails_the_run() -> None:
    last = decide(run(**GANG, runtime={"retries": 2}), [*before_train(), gang_job(3, "Failed")], [], now=NOW)
    assert last.restart == [] and last.status["phase"] == "Failed"
    assert "after 3 attempt(s)" in last.status["message"]


def disrupted_pod() -> PodView:
    body = pod_raw(TRAIN1, {})
    body["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    return pod_view(body)


def test_a_disrupted_gang_restarts_without_using_an_attempt() -> None:
    by_rule = [*before_train(), gang_job(1, "Failed", DISRUPTION)]
    # The peers failed first (their failure is the Job's reason); the evicted pod still says why.
    by_peers = ([*before_train(), gang_job(1, "Failed", CRASH)], [disrupted_pod()])
    for jobs, pods in ((by_rule, []), by_peers):
        disrupted = decide(run(**GANG, runtime={"retries": 0}), jobs, pods)
        assert train_status(disrupted.status)["restarting"] == "DisruptionTarget"
        again = decide(run(disrupted.status, **GANG, runtime={"retries": 0}), before_train(), [])
        assert again.create[-1]["metadata"]["annotations"][resources.ANNOTATION_ATTEMPT] == "1"


def test_a_gang_that_failed_on_bad_input_is_not_restarted() -> None:
    bad = decide(run(**GANG), [*before_train(), gang_job(1, "Failed", BAD_INPUT)], [])
    assert bad.restart == [] and bad.status["phase"] == "Failed"


def test_status_carries_a_memory_plan_and_a_misfit_is_a_warning() -> None:
    seven_b = {"model": {"name": "mistralai/Mistral-7B-Instruct-v0.2"}}
    eight_gpus = {**seven_b, "training": {"resources": {"limits": {"nvidia.com/gpu": 8}}}}
    fits = decide(run(**eight_gpus), [], [])
    plan_ = fits.status["memoryPlan"]
    assert plan_["gpuMemoryGB"] == 80 and [s["stage"] for s in plan_["stages"]] == ["generate", "rank", "train"]
    train = plan_["stages"][2]
    assert train["variant"].startswith("fsdp, 8 processes") and train["fits"] and train["estimateGB"] < 80
    assert not any(e.reason == "MemoryPlanDoesNotFit" for e in fits.events)

    one_gpu = decide(run(**seven_b), [], [])
    (warning,) = [e for e in one_gpu.events if e.reason == "MemoryPlanDoesNotFit"]
    assert "train (single, 1 process" in warning.message
    # Said once: the same plan in the previous status posts nothing new.
    assert not any(e.reason == "MemoryPlanDoesNotFit" for e in decide(run(one_gpu.status, **seven_b), [], []).events)


def without_nulls(value: Any) -> Any:
    """What the apiserver stores of a status: null values are dropped."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def test_a_frozen_spec_reads_back_as_written_though_the_apiserver_dropped_its_nulls() -> None:
    explicit = {"prompts": {"splitPattern": None, "perIteration": None}}
    started = decide(run(**explicit), [], [], now=NOW)
    stored = without_nulls(started.status)
    (frozen,) = stored["frozenSpecs"].values()
    assert "splitPattern" not in frozen["prompts"]
    assert frozen_specs(stored)[1]["prompts"]["splitPattern"] is None  # not its default, train_iteration_{n}
    running = decide(run(stored, **explicit), [job(StageKey(1, Stage.GENERATE), None)], [], now=NOW)
    assert "specChangeDeferred" not in running.status
    assert not any(e.reason == "SpecChangeDeferred" for e in running.events)


def as_stored(status: dict[str, Any]) -> dict[str, Any]:
    """What the apiserver keeps of a status written by merge patch: no null fields, whole floats as ints."""
    from idpo_operator.frozen import stored

    return stored(status)


def test_a_status_read_back_as_the_apiserver_stored_it_is_not_written_again() -> None:
    explicit = {"prompts": {"splitPattern": None}, "generation": {"temperature": 1.0}}
    g1 = StageKey(1, Stage.GENERATE)
    nan = pod(g1, {"metrics": {"prompts": 8, "loss": float("nan")}})  # a summary's NaN becomes null
    for jobs, pods in (([], []), ([job(g1, None)], []), ([job(g1, "Complete")], [nan])):
        first = decide(run(**explicit), jobs, pods, NOW)
        created = [job_view(o) for o in first.create if o["kind"] == "Job"]  # as the cache shows them next
        again = decide(run(as_stored(first.status), **explicit), jobs + created, pods, NOW)
        assert again.status == as_stored(first.status) and again.create == [] and again.events == []


TRAIN_UNDER_KUEUE = {"runtime": {"queueName": "gpus"}}
QUEUE_MESSAGE = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor gpu"


def kueue_job(suspended: bool, failed: int = 0) -> JobView:
    raw = job_raw(TRAIN1, None, failed)
    raw["metadata"]["labels"][resources.LABEL_QUEUE] = "gpus"
    raw["spec"] = {"suspend": suspended}
    return job_view(raw)


def workload(*conditions: tuple[str, str, str, str]) -> Any:
    from idpo_operator.queueing import WorkloadView

    return WorkloadView(f"job-{TRAIN1.iteration}-{TRAIN1.stage.value}", "gpus", None, {c[0]: c[1:] for c in conditions})


def queues(*conditions: tuple[str, str, str, str]) -> Any:
    from idpo_operator.reconcile import Queues

    return Queues([workload(*conditions)], {"gpus": "team-a"})


def test_a_stage_kueue_holds_is_queued_with_kueues_reason_and_no_start_deadline() -> None:
    r = run(runtime={"queueName": "gpus", "startTimeoutSeconds": 30})
    jobs = [*done_through(2, r), kueue_job(suspended=True)]
    held = queues(("QuotaReserved", "False", "Pending", QUEUE_MESSAGE))
    d = decide(r, jobs, [], "2026-01-02T00:00:00Z", queues=held)  # a day after the Job was created
    train = d.status["iterations"][0]["stages"]["train"]
    assert train["admission"] == "Queued" and d.fail == {} and d.status["phase"] == "Running"
    assert (
        d.status["message"]
        == f"iteration 1 train: Pending: queued in ClusterQueue team-a (LocalQueue gpus): {QUEUE_MESSAGE}"
    )
    assert "StageQueued" in [e.reason for e in d.events]


def test_a_preempted_stage_waits_for_readmission_without_spending_an_attempt() -> None:
    r = run(**TRAIN_UNDER_KUEUE)
    admitted = decide(r, [*done_through(2, r), kueue_job(suspended=False)], [], NOW, queues=queues())
    assert admitted.status["iterations"][0]["stages"]["train"]["admission"] == "Admitted"
    # Kueue suspends the Job again; the Job controller deletes its pod, which ends Failed (SIGTERM).
    killed = pod_raw(TRAIN1, {})
    killed["metadata"]["deletionTimestamp"] = NOW
    killed["status"] = {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 143}}}]}
    evicted = queues(("Evicted", "True", "Preempted", "Preempted to accommodate a workload"))
    preempted = decide(
        run(admitted.status, **TRAIN_UNDER_KUEUE),
        [*done_through(2, r), kueue_job(suspended=True)],
        [pod_view(killed)],
        NOW,
        queues=evicted,
    )
    train = preempted.status["iterations"][0]["stages"]["train"]
    assert (train["admission"], train["attempts"], train["phase"]) == ("Preempted", 1, "Running")
    assert train["message"] == "Preempted: waiting for re-admission (Preempted to accommodate a workload)"
    assert [e.reason for e in preempted.events] == ["StagePreempted"] and preempted.create == []
    again = decide(run(preempted.status, **TRAIN_UNDER_KUEUE), [*done_through(2, r), kueue_job(False)], [], NOW)
    assert again.status["iterations"][0]["stages"]["train"]["admission"] == "Admitted"
    assert [e.reason for e in again.events] == ["StageAdmitted"]
