"""The run's status (DESIGN §3), computed purely from per-stage records.

Both executors fill `StageRecord`s from what they observe (local: `_SUCCESS.json` files and
subprocess exits; Kubernetes: Jobs and Pod termination messages) and call `build_status`, so
`status.json` and the custom resource's status have one shape.

Phases: Pending, Running, Succeeded, Failed, Suspended. Conditions (kstatus-compatible):
- Ready: True only when the run Succeeded (a long run is not "ready" while training).
- Reconciling: True while work remains and the run is neither failed nor suspended.
- Stalled: True when the run Failed (retries exhausted); reason names the stage.
- Succeeded / Failed / Suspended: mirror the terminal or paused phase.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from idpo_jobs import winrate
from idpo_jobs.config import Stage, Workspace

from idpo_operator.plan import StageKey, all_stages, iteration_stages
from idpo_operator.spec import IterativeDPORunSpec


class Phase:
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Reason:
    """Condition reasons, one line each."""

    SUCCEEDED = "RunSucceeded"  # every stage of every iteration completed
    EARLY_STOPPED = "EarlyStopped"  # evaluation.stopWhen ended the run before `iterations`
    RUNNING = "StageRunning"  # a stage is running or about to start
    PENDING = "Pending"  # nothing started yet
    STAGE_FAILED = "StageFailed"  # a stage failed after its retries
    INVALID_SPEC = "InvalidSpec"  # the spec failed validation
    SUSPENDED = "Suspended"  # spec.suspend is true
    FOREIGN_CHILD = "ForeignChild"  # a child's name is taken by an object another run (uid) owns
    APPLY_FAILED = "ApplyFailed"  # the API refused a create, patch or delete; the message is the API's


@dataclass
class StageRecord:
    phase: str = Phase.PENDING
    job_name: str | None = None
    attempts: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    digests: list[str] | None = None  # per part, as the stage reported them: the next stage checks them
    # A gang (a train stage on several nodes) being re-created whole after a pod failed: why, as a
    # pod failure reason (`PodFailed` counts as an attempt, `DisruptionTarget` does not).
    restarting: str | None = None
    # A running stage whose pod waits to start: since when, and the kubelet's or scheduler's reason.
    waiting_since: str | None = field(default=None, compare=False)
    waiting_reason: str | None = field(default=None, compare=False)

    @classmethod
    def from_wire(cls, s: dict[str, Any]) -> StageRecord:
        return cls(
            phase=s.get("phase", Phase.PENDING),
            job_name=s.get("jobName"),
            attempts=s.get("attempts", 1),
            start_time=s.get("startTime"),
            completion_time=s.get("completionTime"),
            metrics=s.get("metrics", {}),
            message=s.get("message"),
            digests=s.get("digests"),
            restarting=s.get("restarting"),
        )

    def to_wire(self) -> dict[str, Any]:
        out = {
            "phase": self.phase,
            "jobName": self.job_name,
            "attempts": self.attempts,
            "startTime": self.start_time,
            "completionTime": self.completion_time,
            "metrics": self.metrics or None,
            "message": self.message,
            "digests": self.digests,
            "restarting": self.restarting,
        }
        return {k: v for k, v in out.items() if v is not None}


def stage_status(status: dict[str, Any], key: StageKey) -> dict[str, Any]:
    """The stage's entry in a status; empty when it has none."""
    for it in status.get("iterations", []):
        if it["iteration"] == key.iteration:
            return it.get("stages", {}).get(key.stage.value, {})
    return {}


def timestamp(seconds: float | None = None) -> str:
    when = dt.datetime.fromtimestamp(seconds, dt.UTC) if seconds is not None else dt.datetime.now(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# Which count weights a stage's `mean_*` metrics when shards are merged.
_WEIGHTS = {Stage.GENERATE: "responses", Stage.RANK: "pairs", Stage.TRAIN: "pairs", Stage.EVALUATE: "prompts"}


def merge_metrics(stage: Stage, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One stage's metrics from its shards: counts add up, `mean_*` are weighted by the stage's count."""
    if len(parts) == 1:
        return dict(parts[0])
    weight = _WEIGHTS[stage]
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        values = [p[key] for p in parts if key in p]
        if key.startswith("mean_"):
            weights = [p.get(weight, 0) for p in parts if key in p]
            total = sum(weights)
            merged[key] = round(sum(v * w for v, w in zip(values, weights, strict=True)) / total, 4) if total else 0.0
        elif all(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
            merged[key] = values[0]
        else:
            merged[key] = round(sum(values), 4)
    return merged


def digests_of(summaries: list[dict[str, Any]]) -> list[str] | None:
    """Every part's digest in part order (from the stage's termination summaries), or None while one
    is missing."""
    found = {s.get("shard", 0): s["digest"] for s in summaries if s.get("digest")}
    shards = max((s.get("shards", 1) for s in summaries), default=0)
    return [found[k] for k in range(shards)] if shards and len(found) == shards else None


def record_from_summaries(stage: Stage, summaries: list[dict[str, Any]], attempts: int = 1) -> StageRecord:
    return StageRecord(
        phase=Phase.SUCCEEDED,
        attempts=max(attempts, 1),
        start_time=timestamp(min(s["startTime"] for s in summaries)),
        completion_time=timestamp(max(s["completionTime"] for s in summaries)),
        metrics=merge_metrics(stage, [s["metrics"] for s in summaries]),
    )


def _phase(spec: IterativeDPORunSpec, records: dict[StageKey, StageRecord]) -> str:
    phases = [records.get(k, StageRecord()).phase for k in all_stages(spec)]
    if all(p == Phase.SUCCEEDED for p in phases):
        return Phase.SUCCEEDED
    if Phase.FAILED in phases:
        return Phase.FAILED
    if spec.suspend:
        return Phase.SUSPENDED
    if any(p != Phase.PENDING for p in phases):
        return Phase.RUNNING
    return Phase.PENDING


def _condition(
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int,
    previous: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    value = "True" if status else "False"
    old = previous.get(type_)
    since = old["lastTransitionTime"] if old and old.get("status") == value else now
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def conditions(
    phase: str,
    reason: str,
    message: str,
    now: str,
    generation: int,
    previous: list[dict[str, Any]] | None = None,
    stalled: bool = False,
) -> list[dict[str, Any]]:
    """`stalled`: a problem that stops progress without failing the run (it may clear by itself)."""
    prev = {c["type"]: c for c in previous or []}
    flags = {
        "Ready": phase == Phase.SUCCEEDED,
        "Reconciling": phase in (Phase.PENDING, Phase.RUNNING) and not stalled,
        "Stalled": phase == Phase.FAILED or stalled,
        "Succeeded": phase == Phase.SUCCEEDED,
        "Failed": phase == Phase.FAILED,
        "Suspended": phase == Phase.SUSPENDED,
    }
    return [_condition(t, v, reason, message, now, generation, prev) for t, v in flags.items()]


def current(spec: IterativeDPORunSpec, records: dict[StageKey, StageRecord]) -> StageKey | None:
    """The first stage that has not succeeded (the one running, failed or next)."""
    for key in all_stages(spec):
        if records.get(key, StageRecord()).phase != Phase.SUCCEEDED:
            return key
    return None


def build_status(
    spec: IterativeDPORunSpec,
    records: dict[StageKey, StageRecord],
    workspace: Workspace,
    *,
    generation: int = 1,
    previous: dict[str, Any] | None = None,
    now: str | None = None,
    claim: str | None = None,
    frozen: dict[int, dict[str, Any]] | None = None,
    problem: tuple[str, str] | None = None,
    deferred: bool = False,
    early_stop: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """`claim`: checkpoints as `pvc://<claim>/<path>` (KServe's storage URI) for a run on a cluster.
    `frozen`: each started iteration's spec sections. `problem`: (reason, message) of something
    that blocks progress without failing the run. `deferred`: the spec changed after the current
    iteration started; the change applies from the next one."""
    now = now or timestamp()
    previous = previous or {}
    frozen = frozen or {}
    phase = _phase(spec, records)

    def checkpoint(i: int) -> str:
        return f"pvc://{claim}/{workspace.checkpoint(i)}" if claim else workspace.checkpoint_uri(i)

    at = current(spec, records)
    failed = next((k for k in all_stages(spec) if records.get(k, StageRecord()).phase == Phase.FAILED), None)

    if phase == Phase.SUCCEEDED and early_stop is not None:
        reason, message = Reason.EARLY_STOPPED, f"stopped early after iteration {early_stop[0]}: {early_stop[1]}"
    elif phase == Phase.SUCCEEDED:
        reason, message = Reason.SUCCEEDED, f"completed {spec.iterations} iterations"
    elif failed is not None:
        detail = records[failed].message or "failed"
        reason, message = (
            Reason.STAGE_FAILED,
            f"{failed} failed after {records[failed].attempts} attempt(s): {detail}",
        )
    elif phase == Phase.SUSPENDED:
        reason, message = Reason.SUSPENDED, "suspended: no new stages start"
    elif phase in (Phase.RUNNING, Phase.PENDING) and at is not None and records.get(at, StageRecord()).message:
        reason, message = (Reason.RUNNING if phase == Phase.RUNNING else Reason.PENDING), f"{at}: {records[at].message}"
    elif phase == Phase.RUNNING and at is not None:
        reason, message = Reason.RUNNING, f"{at} is {records.get(at, StageRecord()).phase.lower()}"
    else:
        reason, message = Reason.PENDING, "waiting to start"
    if problem is not None and phase not in (Phase.SUCCEEDED, Phase.FAILED):
        reason, message = problem

    iterations = []
    for i in sorted({k.iteration for k in all_stages(spec)}):
        stages = {s.value: records.get(StageKey(i, s), StageRecord()) for s in iteration_stages(spec, i)}
        ok = all(r.phase == Phase.SUCCEEDED for r in stages.values())
        entry: dict[str, Any] = {
            "iteration": i,
            "phase": Phase.SUCCEEDED
            if ok
            else next((r.phase for r in stages.values() if r.phase != Phase.SUCCEEDED), Phase.PENDING),
            "stages": {name: r.to_wire() for name, r in stages.items()},
        }
        if i >= 1 and stages[Stage.TRAIN.value].phase == Phase.SUCCEEDED:
            entry["checkpoint"] = checkpoint(i)
        if i in frozen:
            entry["spec"] = frozen[i]
        iterations.append(entry)

    done_iterations = [e for e in iterations if "checkpoint" in e]
    evaluated = [e for e in iterations if e["iteration"] >= 1 and "evaluate" in e["stages"]]
    history = [e["stages"]["evaluate"].get("metrics", {}) for e in evaluated]
    rule = spec.evaluation.stop_when
    best = winrate.best_index(history, rule.metric if rule else "lcWinRateVsBase")
    latest = next((h["lc_win_rate_vs_base"] for h in reversed(history) if "lc_win_rate_vs_base" in h), None)
    started = [r.start_time for r in records.values() if r.start_time]
    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "observedGeneration": generation,
        "currentIteration": at.iteration if at else spec.iterations,
        "iterationsTotal": spec.iterations,
        "progress": f"{at.iteration if at else spec.iterations}/{spec.iterations}",  # printer column
        "currentStage": at.stage.value if at else None,
        "startTime": previous.get("startTime") or (min(started) if started else None),
        "completionTime": now if phase in (Phase.SUCCEEDED, Phase.FAILED) else None,
        "latestCheckpoint": done_iterations[-1]["checkpoint"] if done_iterations else None,
        "conditions": conditions(
            phase, reason, message, now, generation, previous.get("conditions"), stalled=problem is not None
        ),
        "iterations": iterations,
        "specChangeDeferred": f"applies from iteration {at.iteration + 1}" if deferred and at else None,
        # latestCheckpoint is the last trained iteration's; bestCheckpoint is the one to ship.
        "bestIteration": evaluated[best]["iteration"] if best is not None else None,
        "bestCheckpoint": evaluated[best].get("checkpoint") if best is not None else None,
        "latestWinRate": round(latest, 3) if latest is not None else None,  # printer column: LC vs base
        "earlyStop": {"iteration": early_stop[0], "reason": early_stop[1]} if early_stop else None,
    }
    if previous.get("completionTime") and status["completionTime"]:
        status["completionTime"] = previous["completionTime"]
    return {k: v for k, v in status.items() if v is not None}


def invalid_status(
    message: str, *, generation: int, previous: dict[str, Any] | None = None, now: str | None = None
) -> dict[str, Any]:
    """A spec the operator cannot run (it got past the CRD schema): Failed and Stalled, field named."""
    now = now or timestamp()
    previous = previous or {}
    text = f"invalid spec: {message}"
    return {
        **{k: v for k, v in previous.items() if k in ("iterations", "startTime", "latestCheckpoint")},
        "phase": Phase.FAILED,
        "message": text,
        "observedGeneration": generation,
        "conditions": conditions(Phase.FAILED, Reason.INVALID_SPEC, text, now, generation, previous.get("conditions")),
    }
