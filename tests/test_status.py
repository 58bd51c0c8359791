"""Status: phases, kstatus conditions, merged shard metrics and the status table."""

from __future__ import annotations

from idpo_jobs.config import Stage, Workspace
from idpo_operator import plan, table
from idpo_operator.plan import StageKey
from idpo_operator.spec import parse_manifest
from idpo_operator.status import Phase, StageRecord, build_status, merge_metrics, parse_previous

from tests.conftest import manifest

WS = Workspace("/ws")


def spec(**kw):
    return parse_manifest(manifest(iterations=2, **kw)).spec


def done(*keys: StageKey) -> dict[StageKey, StageRecord]:
    return {
        k: StageRecord(
            phase=Phase.SUCCEEDED,
            attempts=1,
            start_time="2026-01-01T00:00:00Z",
            completion_time="2026-01-01T00:00:30Z",
        )
        for k in keys
    }


def conds(status: dict) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_a_fresh_run_is_pending_and_reconciling() -> None:
    status = build_status(spec(), {}, WS, now="2026-01-01T00:00:00Z")
    assert status["phase"] == Phase.PENDING
    assert conds(status) == {
        "Ready": "False",
        "Reconciling": "True",
        "Stalled": "False",
        "Succeeded": "False",
        "Failed": "False",
        "Suspended": "False",
    }


def test_mid_run_status_points_at_the_current_stage_and_last_checkpoint() -> None:
    s = spec()
    records = done(*plan.all_stages(s)[:4])
    records[StageKey(2, Stage.RANK)] = StageRecord(phase=Phase.RUNNING, attempts=1)
    status = build_status(s, records, WS)
    assert (status["phase"], status["currentIteration"], status["currentStage"]) == ("Running", 2, "rank")
    assert status["latestCheckpoint"] == "/ws/iter-1/train/model"
    assert status["iterations"][0]["checkpoint"] == "/ws/iter-1/train/model"
    assert "checkpoint" not in status["iterations"][1]


def test_a_finished_run_is_ready_and_succeeded() -> None:
    s = spec()
    status = build_status(s, done(*plan.all_stages(s)), WS)
    assert status["phase"] == "Succeeded" and status["latestCheckpoint"] == "/ws/iter-2/train/model"
    assert conds(status)["Ready"] == "True" and conds(status)["Reconciling"] == "False"


def test_a_failed_stage_stalls_the_run_and_is_named() -> None:
    s = spec()
    records = done(*plan.all_stages(s)[:1])
    records[StageKey(1, Stage.RANK)] = StageRecord(phase=Phase.FAILED, attempts=3, message="exit 1: boom")
    status = build_status(s, records, WS)
    assert status["phase"] == "Failed" and conds(status)["Stalled"] == "True"
    assert status["message"] == "iteration 1 rank failed after 3 attempt(s): exit 1: boom"


def test_suspended_run_reports_suspended() -> None:
    status = build_status(spec(suspend=True), {}, WS)
    assert status["phase"] == "Suspended" and conds(status)["Suspended"] == "True"


def test_condition_transition_times_only_move_when_status_flips() -> None:
    s = spec()
    first = build_status(s, {}, WS, now="2026-01-01T00:00:00Z")
    second = build_status(
        s, done(plan.all_stages(s)[0]), WS, previous=parse_previous(first), now="2026-01-01T00:05:00Z"
    )
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Reconciling"] == "2026-01-01T00:00:00Z"
    final = build_status(s, done(*plan.all_stages(s)), WS, previous=parse_previous(second), now="2026-01-01T01:00:00Z")
    assert {c["type"]: c["lastTransitionTime"] for c in final["conditions"]}["Ready"] == "2026-01-01T01:00:00Z"


def test_shard_metrics_add_counts_and_weight_means() -> None:
    parts = [
        {"pairs": 1, "dropped_ties": 1, "mean_chosen_score": 1.0, "ranker": "pairrm"},
        {"pairs": 3, "dropped_ties": 0, "mean_chosen_score": 2.0, "ranker": "pairrm"},
    ]
    assert merge_metrics(Stage.RANK, parts) == {
        "pairs": 4,
        "dropped_ties": 1,
        "mean_chosen_score": 1.75,
        "ranker": "pairrm",
    }


def test_status_table_shows_one_row_per_iteration_with_metrics() -> None:
    s = spec()
    records = done(*plan.all_stages(s)[:3])
    records[StageKey(1, Stage.RANK)].metrics = {
        "pairs": 7,
        "dropped_ties": 1,
        "mean_chosen_score": 0.5,
        "mean_chosen_chars": 40.0,
    }
    records[StageKey(1, Stage.TRAIN)].metrics = {"loss": 0.69, "reward_accuracy": 0.75, "reward_margin": 0.1}
    lines = table.render(build_status(s, records, WS), "r").splitlines()
    header, row1, row2 = lines[-3], lines[-2].split(), lines[-1].split()
    assert header.split()[:4] == ["ITER", "PHASE", "STAGE", "DURATION"]
    assert row1[:4] == ["1", "Succeeded", "-", "1m30s"] and "7" in row1 and "0.75" in row1
    assert row1[-1] == "/ws/iter-1/train/model"
    assert row2[:3] == ["2", "Pending", "generate"]
