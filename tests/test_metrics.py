"""Operator metrics are updated from each reconcile's decision (status and events)."""

from __future__ import annotations

from idpo_jobs.config import Stage
from idpo_operator import metrics
from idpo_operator.plan import StageKey
from idpo_operator.reconcile import Event
from prometheus_client import REGISTRY


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_stage_events_feed_durations_retries_and_phases() -> None:
    train, rank = StageKey(1, Stage.TRAIN), StageKey(1, Stage.RANK)
    status = {
        "phase": "Succeeded",
        "iterations": [
            {
                "iteration": 1,
                "stages": {"train": {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:30Z"}},
            }
        ],
    }
    before = (
        sample("idpo_stage_duration_seconds_sum", stage="train"),
        sample("idpo_stage_retries_total", stage="rank"),
    )
    metrics.record(
        ("ns", "m"),
        status,
        [
            Event("Normal", "StageSucceeded", "any text", train),
            Event("Warning", "StageRetrying", "any text", rank),
            Event("Normal", "RunSucceeded", "no stage"),
        ],
    )
    assert sample("idpo_stage_duration_seconds_sum", stage="train") - before[0] == 90
    assert sample("idpo_stage_retries_total", stage="rank") - before[1] == 1
    succeeded = sample("idpo_runs", phase="Succeeded")
    assert succeeded >= 1
    metrics.forget(("ns", "m"))
    assert sample("idpo_runs", phase="Succeeded") == succeeded - 1  # a deleted run leaves the gauge at once
