"""What stages and people can write is untrusted input: arbitrary stage summaries (termination messages)
and arbitrary statuses go through the observation and status code, which must never raise, never put a
NaN or an unbounded value into status, and fail a stage whose summary is malformed with a clear message.
Property-based (hypothesis), beside the cases the issue named."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from idpo_jobs.config import Stage
from idpo_operator.observe import MAX_TEXT, job_record, parse_summary, pod_view
from idpo_operator.plan import StageKey
from idpo_operator.reconcile import decide
from idpo_operator.status import parse_previous

from tests.test_reconcile import NOW, job, job_raw, pod_raw, run

G1 = StageKey(1, Stage.GENERATE)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
summaries = st.one_of(
    json_values.map(lambda v: json.dumps(v)),  # any JSON at all, NaN included (Python writes it)
    st.fixed_dictionaries(
        {},
        optional={
            "shard": json_values,
            "shards": json_values,
            "metrics": st.dictionaries(st.text(max_size=20), json_values, max_size=80),
            "digest": json_values,
            "error": json_values,
        },
    ).map(json.dumps),
    st.text(max_size=300),  # not JSON: a log tail
)


def finite(value: Any) -> bool:
    """Whether a value holds no NaN or infinity anywhere (what the apiserver can store)."""
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return not (isinstance(value, float) and not math.isfinite(value))


def summary_pod(message: str) -> Any:
    raw = pod_raw(G1, {})
    raw["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = message
    return pod_view(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=summaries, state=st.sampled_from(["Complete", "Failed", None]))
def test_any_summary_gives_a_record_and_a_writable_status(message: str, state: str | None) -> None:
    pod = summary_pod(message)
    record = job_record(job(G1, state), [pod])
    assert record.phase in ("Succeeded", "Failed", "Running")
    assert record.message is None or len(record.message) <= MAX_TEXT
    d = decide(run(), [job(G1, state)], [pod], NOW)
    json.dumps(d.status, allow_nan=False)  # what the API client sends: no NaN, no Infinity
    assert finite(d.status) and len(json.dumps(d.status)) < 64_000


@settings(max_examples=300, deadline=None)
@given(status=st.dictionaries(st.sampled_from(["iterations", "phase", "frozenSpecs", "conditions", "x"]), json_values))
def test_any_previous_status_is_read_without_raising_and_decided_on(status: dict[str, Any]) -> None:
    parse_previous(status)
    d = decide(run(status), [job(G1, "Complete")], [], NOW)
    json.dumps(d.status, allow_nan=False)


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ("[1]", "malformed stage summary: expected a JSON object, got list"),
        ("null", "malformed stage summary: expected a JSON object, got NoneType"),
        ("5", "malformed stage summary: expected a JSON object, got int"),
        ('{"shard": 3, "shards": 1, "metrics": {}}', "malformed stage summary: shard 3 of 1, but the Job has 1"),
        ('{"metrics": {"prompts": {"nested": 1}}}', "malformed stage summary: metric 'prompts' is a dict"),
        ('{"metrics": [1, 2]}', "malformed stage summary: metrics is a list, not an object"),
    ],
    ids=["list", "null", "number", "shard-out-of-range", "metric-of-the-wrong-type", "metrics-not-an-object"],
)
def test_a_malformed_summary_fails_its_stage_with_a_clear_message(message: str, says: str) -> None:
    d = decide(run(), [job(G1, "Complete")], [summary_pod(message)], NOW)
    assert d.status["phase"] == "Failed" and d.create == []
    assert says in d.status["message"], d.status["message"]


def test_a_nan_loss_becomes_null_with_a_warning_and_the_run_goes_on() -> None:
    message = json.dumps({"metrics": {"prompts": 8, "loss": float("nan"), "steps": [1, float("inf")]}})
    d = decide(run(), [job(G1, "Complete")], [summary_pod(message)], NOW)
    generate = d.status["iterations"][0]["stages"]["generate"]
    assert generate["phase"] == "Succeeded" and generate["metrics"] == {"prompts": 8, "steps": [1, None]}
    assert "metric loss was nan; recorded as null" in generate["message"]
    assert d.create[-1]["metadata"]["name"] == "r-i1-rank"


def test_a_summary_is_parsed_once_as_its_pod_arrives() -> None:
    assert parse_summary('{"metrics": {"pairs": 7}, "digest": "abc123"}').metrics == {"pairs": 7}
    raw = job_raw(G1, "Complete")
    assert job_record(job(G1, "Complete"), []).phase == "Succeeded" and raw["status"]["conditions"]
