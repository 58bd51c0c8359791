"""Sizes a run's author controls cannot grow what the operator stores or holds: a stage's metrics merged
from 256 shards' summaries, and the spec itself, in status and in the operator's cache."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import tracemalloc
from typing import Any

import kopf
from idpo_jobs.config import Stage
from idpo_operator import compact, handlers, plan
from idpo_operator.observe import job_record, job_view, pod_view
from idpo_operator.plan import StageKey
from idpo_operator.reconcile import MAX_SPEC_BYTES, decide
from idpo_operator.status import build_status

from tests.conftest import manifest
from tests.test_reconcile import NOW, job_raw, pod_raw
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


def indexed(body: dict[str, Any]) -> Any:
    """What the operator's cache keeps of a run: its kopf index function's value (run to completion
    here; it awaits nothing)."""
    meta = body["metadata"]
    coroutine = handlers.runs(namespace=meta["namespace"], name=meta["name"], body=kopf.Body(body))
    try:
        coroutine.send(None)
    except StopIteration as done:
        (view,) = done.value.values()
        return view
    raise AssertionError("the index function awaited something")


def run_body(name: str, env: list[dict[str, str]]) -> dict[str, Any]:
    doc = manifest(name, runtime={"env": env}, suspend=True)
    doc["metadata"] |= {"namespace": "ns", "uid": f"uid-{name}", "generation": 1, "resourceVersion": "1"}
    return doc


def retained(make: Any) -> tuple[Any, int]:
    """`make()`'s value and the bytes it holds on to (allocated while it ran and still alive)."""
    gc.collect()
    tracemalloc.start()
    try:
        value = make()
        gc.collect()
        return value, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_the_operator_holds_a_bounded_amount_per_run_whatever_its_spec_holds() -> None:
    # The 40 suspended runs with a 1 MiB variable each, and 40 with thousands of short ones, as
    # their watch events arrive (JSON, parsed and dropped once indexed).
    blob, short = [{"name": "BLOB", "value": "x" * (1 << 20)}], [{"name": f"E{i}", "value": "x"} for i in range(5000)]
    huge = [json.dumps(run_body(f"huge-{n}", blob)) for n in range(40)]
    many = [json.dumps(run_body(f"many-{n}", short)) for n in range(40)]
    for events in (huge, many):
        views, size = retained(lambda events=events: [indexed(json.loads(e)) for e in events])
        assert size / len(views) < 8 * 1024, size / len(views)  # nothing of an oversized spec is kept
        decision = decide(views[0], [], [], NOW)
        assert decision.status["phase"] == "Failed" and decision.create == []
        stalled = {c["type"]: c for c in decision.status["conditions"]}["Stalled"]
        assert stalled["reason"] == "InvalidSpec" and f"over the {MAX_SPEC_BYTES}" in stalled["message"]


def test_a_spec_within_the_bound_is_kept_as_text_and_decided_on_as_before() -> None:
    body = run_body("typical", [{"name": f"E{i}", "value": "v" * 200} for i in range(64)])
    body["spec"]["suspend"] = False
    view = indexed(body)
    assert isinstance(view.spec, str) and view.spec_bytes == len(view.spec.encode()) < MAX_SPEC_BYTES
    from_text = decide(view, [], [], NOW)
    from_dict = decide(dataclasses.replace(view, spec=body["spec"]), [], [], NOW)
    assert from_text.create == from_dict.create
    assert [o["kind"] for o in from_text.create] == ["PersistentVolumeClaim", "Job"]
