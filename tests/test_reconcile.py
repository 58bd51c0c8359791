"""The reconcile decision, table-driven from fixture Jobs and Pods; no server involved."""

from __future__ import annotations

import json
from typing import Any

from idpo_jobs.config import Stage
from idpo_operator import plan, resources
from idpo_operator.plan import StageKey
from idpo_operator.reconcile import RunView, decide

from tests.conftest import manifest

NOW = "2026-01-01T00:00:00Z"


def run(status: dict | None = None, **spec: Any) -> RunView:
    return RunView("r", "ns", "uid-12345678", 1, manifest(**spec)["spec"], status or {})


def job(key: StageKey, state: str | None, failed: int = 0) -> dict[str, Any]:
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
        "metadata": {"name": resources.job_name("r", key), "labels": resources.labels(owner, key)},
        "status": {
            "conditions": conditions,
            "failed": failed,
            "startTime": NOW,
            **({"completionTime": NOW} if state == "Complete" else {}),
        },
    }


def pod(key: StageKey, message: dict[str, Any]) -> dict[str, Any]:
    owner = resources.Owner("r", "ns", "uid-12345678")
    return {
        "metadata": {"labels": resources.labels(owner, key)},
        "status": {"containerStatuses": [{"state": {"terminated": {"message": json.dumps(message)}}}]},
    }


def done_through(n: int, spec_run: RunView) -> list[dict[str, Any]]:
    from idpo_operator.spec import IterativeDPORunSpec

    keys = plan.all_stages(IterativeDPORunSpec.model_validate(spec_run.spec))[:n]
    return [job(k, "Complete") for k in keys]


def test_a_new_run_creates_workspace_config_and_first_job() -> None:
    d = decide(run(), [], [], NOW)
    assert [o["kind"] for o in d.create] == ["PersistentVolumeClaim", "ConfigMap", "Job"]
    assert d.create[2]["metadata"]["name"] == "r-i1-generate"
    config = json.loads(d.create[1]["data"]["config.json"])
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
    config = json.loads(d.create[1]["data"]["config.json"])
    assert config["stage"] == "train" and config["model"] == "pvc://idpo/r-uid-1234/iter-1/train/model"
    assert d.status["latestCheckpoint"] == "pvc://idpo/r-uid-1234/iter-1/train/model"


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
