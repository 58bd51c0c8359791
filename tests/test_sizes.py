"""Sizes a run's author controls cannot grow what the operator stores or holds: a stage's metrics merged
from 256 shards' summaries, and the spec itself, in status and in the operator's cache."""

from __future__ import annotations

import copy
import json
from typing import Any

from idpo_jobs.config import Stage
from idpo_operator import compact, plan
from idpo_operator.observe import job_record, job_view, pod_view
from idpo_operator.plan import StageKey
from idpo_operator.status import build_status

from tests.test_reconcile import job_raw, pod_raw
from tests.test_status import WS, spec

SHARDS = 256
LIMIT = 4096  # bytes of a termination message: what one stage pod can say


def maximal_summary(shard: int, stage: Stage) -> str:
    """A summary of (nearly) 4 KiB whose metric names no other shard uses, with the characters that
    JSON escapes most expensively, long lists and the counts merging adds up."""
    metrics: dict[str, Any] = {"prompts": 1, "pairs": 1, "responses": 1}
    n = 0
    while True:
        metrics[f"s{shard}-\u202e\x1b-{n}"] = "\x00<script>" * 3 if n % 2 else [1e308, "\x1b[2J", None] * 2
        text = json.dumps({"shard": shard, "shards": SHARDS, "metrics": metrics, "digest": "ab" * 32})
        if len(text.encode()) > LIMIT or len(metrics) > 64:
            del metrics[f"s{shard}-\u202e\x1b-{n}"]
            return json.dumps({"shard": shard, "shards": SHARDS, "metrics": metrics, "digest": "ab" * 32})
        n += 1


def sharded_record(stage: Stage, shards: int = SHARDS) -> Any:
    """The record of a completed stage whose `shards` pods each reported a maximal summary."""
    key = StageKey(1, stage)
    raw = job_raw(key, "Complete")
    raw["spec"] = {"completions": shards}
    pods = []
    for shard in range(shards):
        pod = pod_raw(key, {})
        message = maximal_summary(shard, stage).replace(f'"shards": {SHARDS}', f'"shards": {shards}')
        pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = message
        pods.append(pod_view(pod))
    return job_record(job_view(raw), pods)


def test_a_stage_of_256_shards_with_maximal_summaries_keeps_a_small_record() -> None:
    record = sharded_record(Stage.GENERATE)
    assert record.phase == "Succeeded", record.message
    size = len(json.dumps(record.to_wire(), separators=(",", ":")))
    assert len(json.dumps(record.metrics, separators=(",", ":"))) <= LIMIT
    assert size < LIMIT + (64 + 3) * SHARDS + 1024, size  # metrics, the parts' digests, the message
    assert record.metrics["prompts"] == SHARDS  # the counts are still the sums of every shard's
    assert "left out" in (record.message or "")


def test_a_run_of_256_shard_stages_keeps_its_status_under_the_budget() -> None:
    s = spec(iterations=100, evaluation={"enabled": True}, generation={"shards": SHARDS}, ranking={"shards": SHARDS})
    made = {stage: sharded_record(stage, SHARDS if stage in (Stage.GENERATE, Stage.RANK) else 1) for stage in Stage}
    assert all(r.phase == "Succeeded" for r in made.values())
    records = {key: copy.deepcopy(made[key.stage]) for key in plan.all_stages(s)}
    records[StageKey(100, Stage.EVALUATE)].phase = "Running"  # the last iteration's parts' digests still count
    status = build_status(s, records, WS, claim="c" * 253)
    kept = len(json.dumps(status["iterations"], separators=(",", ":")))
    kept += len(json.dumps(status.get("frozenSpecs") or {}, separators=(",", ":")))
    assert kept <= compact.BUDGET, kept
    assert len(json.dumps(status, separators=(",", ":"))) < 256 * 1024
