"""Status: phases, kstatus conditions, merged shard metrics and the status table."""

from __future__ import annotations

import json
from typing import Any

from idpo_jobs.config import Stage, Workspace
from idpo_operator import plan, table
from idpo_operator.plan import StageKey
from idpo_operator.spec import parse_manifest
from idpo_operator.status import Phase, StageRecord, build_status, merge_metrics, parse_previous

from tests.conftest import manifest

WS = Workspace("/ws")


def spec(**kw):
    return parse_manifest(manifest(**{"iterations": 2, **kw})).spec


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


# What the stages report (the evaluate stage's with bestOfN), for a status at the caps.
METRICS = {
    Stage.GENERATE: {"prompts": 6667, "responses": 33335, "mean_response_chars": 1534.2, "empty_responses": 0,
                     "engine": "vllm"},
    Stage.RANK: {"prompts": 6667, "pairs": 6650, "dropped_ties": 17, "mean_chosen_score": 1.2345, "mean_rejected_score":
                 -0.9876, "mean_chosen_chars": 1620.5, "mean_rejected_chars": 1402.3, "ranker": "pairrm"},
    Stage.TRAIN: {"pairs": 6650, "steps": 416, "loss": 0.6123, "final_loss": 0.5432, "reward_accuracy": 0.7123,
                  "reward_margin": 0.1234, "checkpoint": "/workspace/" + "r" * 128 + "/iter-100/train/model",
                  "lora": False, "world_size": 1024, "strategy": "fsdp", "rank_steps": [416] * 64},
    Stage.EVALUATE: {
        "prompts": 200, "mean_response_chars": 1534.44, "empty_responses": 0, "generator": "x" * 100,
        "ranker": "pairrm", "temperature": 0.0, **{f"{m}_{v}": 0.6875 for m in ("win_rate", "lc_win_rate")
        for v in ("vs_base", "vs_previous", "best_of_n_vs_base")},
        **{f"{m}_{v}_ci": [0.444, 0.8584] for m in ("win_rate", "lc_win_rate")
           for v in ("vs_base", "vs_previous", "best_of_n_vs_base")},
        **{f"{c}_{v}": 70 for c in ("wins", "ties", "losses") for v in ("vs_base", "vs_previous")},
        "mean_length_diff_vs_base": -5.69, "mean_length_diff_vs_previous": -5.69, "base_iteration": 0,
        "previous_iteration": 99,
    },
}  # fmt: skip


def at_the_caps(messages: str = "", metrics: Any = None) -> tuple[Any, dict[StageKey, StageRecord], dict]:
    template = "{{ bos_token }}" + "x" * (16 * 1024)
    s = spec(iterations=100, model={"chatTemplate": template}, evaluation={"enabled": True},
             prompts={"perIteration": 1}, generation={"shards": 64}, ranking={"shards": 64})  # fmt: skip
    records = {
        k: StageRecord(
            Phase.SUCCEEDED,
            job_name="r" * 52,
            attempts=21,
            start_time="2026-01-01T00:00:00Z",
            completion_time="2026-01-01T00:00:00Z",
            metrics=dict(metrics or METRICS[k.stage]),
            message=messages or None,
            digests=["0123456789abcdef"] * 64,
        )
        for k in plan.all_stages(s)
    }
    from idpo_operator import frozen

    sections = frozen.live_sections(s)
    return s, records, {i: sections for i in range(1, 101)}


def test_a_run_at_the_caps_keeps_its_status_under_256_kib() -> None:
    """100 iterations, 64 shards, 1024 training processes, a 16 KiB chat template, the longest names."""
    s, records, frozen = at_the_caps()
    status = build_status(s, records, WS, claim="c" * 253, frozen=frozen)
    size = len(json.dumps(status, separators=(",", ":")))
    assert size < 256 * 1024, size
    full = status["iterations"][-1]["stages"]["evaluate"]["metrics"]
    assert full == METRICS[Stage.EVALUATE]  # the latest iterations keep their whole record


def test_summaries_of_any_size_leave_the_status_under_its_budget_with_the_latest_iterations_whole() -> None:
    # Stages that report 4 KiB (what a termination message holds) and warn on every metric.
    big = {f"metric_{n:02d}": "v" * 60 for n in range(48)}
    s, records, frozen = at_the_caps(messages="w" * 500, metrics=big)
    status = build_status(s, records, WS, claim="c" * 253, frozen=frozen)
    assert len(json.dumps(status, separators=(",", ":"))) < 256 * 1024
    assert status["iterations"][-1]["stages"]["train"]["metrics"] == big
    oldest = status["iterations"][1]["stages"]["train"]
    assert oldest["phase"] == "Succeeded" and oldest.get("compacted") is True
