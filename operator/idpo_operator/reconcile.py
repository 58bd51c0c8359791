"""One reconcile of one run, as a pure function: observation in, actions out.

`decide(run, jobs, pods)` reads the spec, the previous status and the Jobs/Pods the run owns,
asks the plan what runs next, and returns the objects to create (if absent), the new status and
the events to post. The kopf handlers only gather the observation and apply the decision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from idpo_jobs.config import Stage
from pydantic import ValidationError

from idpo_operator import plan, resources
from idpo_operator.plan import StageKey
from idpo_operator.spec import IterativeDPORunSpec, format_validation_error
from idpo_operator.status import (
    Phase,
    StageRecord,
    build_status,
    invalid_status,
    merge_metrics,
    timestamp,
)


@dataclass(frozen=True)
class RunView:
    """What the operator read of the run itself."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def owner(self) -> resources.Owner:
        return resources.Owner(self.name, self.namespace, self.uid)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str
    key: StageKey | None = None  # the stage it is about, for consumers other than humans (metrics)


@dataclass
class Decision:
    create: list[dict[str, Any]]
    status: dict[str, Any]
    events: list[Event]


def _true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", []) if c.get("status") == "True"}


def termination(pod: dict[str, Any]) -> dict[str, Any]:
    """The stage's summary, from the terminated container's message (no volume mount needed)."""
    for cs in pod.get("status", {}).get("containerStatuses", []):
        message = cs.get("state", {}).get("terminated", {}).get("message")
        if message:
            try:
                return json.loads(message)
            except json.JSONDecodeError:
                return {"error": message.strip()[-500:]}  # FallbackToLogsOnError: the log's tail
    return {}


def key_of(obj: dict[str, Any]) -> StageKey | None:
    lab = obj.get("metadata", {}).get("labels", {})
    try:
        return StageKey(int(lab[resources.LABEL_ITERATION]), Stage(lab[resources.LABEL_STAGE]))
    except (KeyError, ValueError):
        return None


def job_record(job: dict[str, Any], pods: list[dict[str, Any]]) -> StageRecord:
    st = job.get("status", {})
    done = _true_conditions(job)
    failed_pods = st.get("failed", 0)
    summaries = [termination(p) for p in pods]
    record = StageRecord(
        job_name=job["metadata"]["name"], start_time=st.get("startTime"), completion_time=st.get("completionTime")
    )
    if "Complete" in done or "SuccessCriteriaMet" in done:
        record.phase = Phase.SUCCEEDED
        record.attempts = failed_pods + 1
        stage = key_of(job).stage  # type: ignore[union-attr]
        parts = [s["metrics"] for s in summaries if isinstance(s.get("metrics"), dict)]
        record.metrics = merge_metrics(stage, parts) if parts else {}
    elif "Failed" in done or "FailureTarget" in done:
        cond = done.get("Failed") or done["FailureTarget"]
        errors = [s["error"] for s in summaries if s.get("error")]
        record.phase = Phase.FAILED
        record.attempts = max(failed_pods, 1)
        record.message = errors[-1] if errors else f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}"
        record.completion_time = record.completion_time or cond.get("lastTransitionTime")
    else:
        record.phase = Phase.RUNNING
        record.attempts = failed_pods + 1
    return record


def previous_records(status: dict[str, Any]) -> dict[StageKey, StageRecord]:
    """Succeeded stages from the last status: the record survives its Job (TTL, manual delete)."""
    out = {}
    for it in status.get("iterations", []):
        for name, s in it.get("stages", {}).items():
            if s.get("phase") == Phase.SUCCEEDED:
                out[StageKey(it["iteration"], Stage(name))] = StageRecord(
                    phase=Phase.SUCCEEDED,
                    job_name=s.get("jobName"),
                    attempts=s.get("attempts", 1),
                    start_time=s.get("startTime"),
                    completion_time=s.get("completionTime"),
                    metrics=s.get("metrics", {}),
                )
    return out


def _stage_events(old: dict[str, Any], new: dict[str, Any]) -> list[Event]:
    before = {(it["iteration"], n): s for it in old.get("iterations", []) for n, s in it.get("stages", {}).items()}
    events = []
    for it in new.get("iterations", []):
        for name, s in it.get("stages", {}).items():
            prev = before.get((it["iteration"], name), {})
            key = StageKey(it["iteration"], Stage(name))
            phase, was = s.get("phase"), prev.get("phase")
            if phase == Phase.RUNNING and was != Phase.RUNNING:
                events.append(Event("Normal", "StageStarted", f"{key} started (job {s.get('jobName')})", key))
            elif phase == Phase.RUNNING and s.get("attempts", 1) > prev.get("attempts", 1):
                events.append(Event("Warning", "StageRetrying", f"{key}: attempt {s['attempts']} after a failure", key))
            elif phase == Phase.SUCCEEDED and was != Phase.SUCCEEDED:
                message = f"{key} succeeded: {json.dumps(s.get('metrics', {}))}"
                events.append(Event("Normal", "StageSucceeded", message, key))
            elif phase == Phase.FAILED and was != Phase.FAILED:
                events.append(Event("Warning", "StageFailed", f"{key} failed: {s.get('message', '')}", key))
    if new.get("phase") != old.get("phase") and new.get("phase") in (Phase.SUCCEEDED, Phase.FAILED):
        kind = "Normal" if new["phase"] == Phase.SUCCEEDED else "Warning"
        events.append(Event(kind, f"Run{new['phase']}", new.get("message", "")))
    return events


def decide(run: RunView, jobs: list[dict[str, Any]], pods: list[dict[str, Any]], now: str | None = None) -> Decision:
    now = now or timestamp()
    try:
        spec = IterativeDPORunSpec.model_validate(run.spec)
    except ValidationError as err:
        message = format_validation_error(err, prefix="spec.").strip().replace("\n  ", "; ")
        status = invalid_status(message, generation=run.generation, previous=run.status, now=now)
        events = [] if run.status.get("message") == status["message"] else [Event("Warning", "InvalidSpec", message)]
        return Decision([], status, events)

    owner = run.owner
    ws = resources.workspace(spec, owner)
    records = previous_records(run.status)
    jobs_by_key = {k: j for j in jobs if (k := key_of(j)) is not None}
    for key, job in jobs_by_key.items():
        name = job["metadata"]["name"]
        owned_pods = [p for p in pods if key_of(p) == key]
        # A Job gone missing keeps its old record; a present Job is the truth.
        if records.get(key, StageRecord()).phase != Phase.SUCCEEDED or name == records[key].job_name:
            records[key] = job_record(job, owned_pods)

    create: list[dict[str, Any]] = []
    completed = [k for k, r in records.items() if r.phase == Phase.SUCCEEDED]
    failed = any(r.phase == Phase.FAILED for r in records.values())
    key = plan.next_stage(spec, completed)
    if key is not None and not failed and not spec.suspend and key not in jobs_by_key:
        config = plan.stage_config(spec, run.name, ws, key)
        pvc = resources.build_pvc(spec, owner)
        create = [
            o
            for o in (
                pvc,
                resources.build_config_map(owner, key, config),
                resources.build_job(spec, owner, key, config),
            )
            if o
        ]
        records[key] = StageRecord(
            phase=Phase.RUNNING, job_name=resources.job_name(run.name, key), attempts=1, start_time=now
        )

    status = build_status(spec, records, ws, generation=run.generation, previous=run.status, now=now)
    return Decision(create, status, _stage_events(run.status, status))
