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
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from idpo_jobs import winrate
from idpo_jobs.config import Stage, Workspace

from idpo_operator import compact
from idpo_operator import frozen as frozen_specs
from idpo_operator.plan import StageKey, all_stages, iteration_stages
from idpo_operator.spec import IterativeDPORunSpec

MAX_TEXT = 500  # characters of a string metric, or of a stage's message in status
MAX_METRICS = 64  # keys of a stage's metrics: of one summary, and of its shards' merged
MAX_METRICS_BYTES = 4096  # of a stage's metrics as compact JSON: what one summary (a termination message) holds


class Phase:
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


STAGE_NAMES = frozenset(s.value for s in Stage)
PHASES = (Phase.PENDING, Phase.RUNNING, Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED)


class Reason:
    """Condition reasons, one line each."""

    SUCCEEDED = "RunSucceeded"  # every stage of every iteration completed
    EARLY_STOPPED = "EarlyStopped"  # evaluation.stopWhen ended the run before `iterations`
    RUNNING = "StageRunning"  # a stage is running or about to start
    PENDING = "Pending"  # nothing started yet
    STAGE_FAILED = "StageFailed"  # a stage failed after its retries
    VOLUME_FULL = "VolumeFull"  # a stage failed because the run's volume is full (not retried)
    INVALID_SPEC = "InvalidSpec"  # the spec failed validation
    POLICY_DENIED = "PolicyDenied"  # the cluster's policy does not allow what the spec asks for
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
    compacted: bool = False  # an old record cut down to its headline metrics (compact.py)
    admission: str | None = None  # under Kueue: Queued, Admitted or Preempted (queueing.py)
    reason: str | None = None  # of a failure, as the stage named it (VolumeFull)
    # A running stage whose pod waits to start: since when, and the kubelet's or scheduler's reason.
    waiting_since: str | None = field(default=None, compare=False)
    waiting_reason: str | None = field(default=None, compare=False)

    @classmethod
    def from_wire(cls, s: Mapping[str, Any]) -> StageRecord:
        """A record as status holds it; fields of the wrong type read as absent (status is ours, but a
        person with access to the status subresource can write anything there)."""

        def get(name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
            value = s.get(name)
            return value if isinstance(value, kind) and not isinstance(value, bool) else default

        phase = s.get("phase")
        digests = get("digests", list)
        return cls(
            phase=phase if phase in PHASES else Phase.PENDING,
            job_name=get("jobName", str),
            attempts=get("attempts", int, 1),
            start_time=get("startTime", str),
            completion_time=get("completionTime", str),
            metrics=dict(get("metrics", dict, {})),
            message=get("message", str),
            digests=[str(d) for d in digests] if digests is not None else None,
            restarting=get("restarting", str),
            compacted=s.get("compacted") is True,
            admission=get("admission", str),
            reason=get("reason", str),
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
            "compacted": self.compacted or None,
            "admission": self.admission,
            "reason": self.reason,
        }
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Previous:
    """The last status, parsed once: what a decision reads of it, and nothing else."""

    records: dict[StageKey, StageRecord] = field(default_factory=dict)
    frozen: dict[int, dict[str, Any]] = field(default_factory=dict)
    spec_digests: dict[int, str] = field(default_factory=dict)  # also of iterations whose sections were let go
    phase: str | None = None
    message: str | None = None
    observed_generation: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    conditions: tuple[dict[str, Any], ...] = ()
    spec_change_deferred: bool = False
    memory_plan: dict[str, Any] | None = None

    def record(self, key: StageKey) -> StageRecord:
        """The stage's record; a Pending one (no attempts) when the status has none."""
        return self.records.get(key) or StageRecord()


def listed(value: Any) -> list[Any]:
    """A value that should be a list, or [] when it is something else."""
    return value if isinstance(value, list) else []


def parse_previous(status: Mapping[str, Any] | None) -> Previous:
    """Never raises: an entry that does not parse reads as absent."""
    status = status if isinstance(status, Mapping) else {}
    records = {}
    for it in listed(status.get("iterations")):
        stages = it.get("stages") if isinstance(it, Mapping) else None
        if not isinstance(stages, Mapping) or not isinstance(it.get("iteration"), int):
            continue
        for name, entry in stages.items():
            if name in STAGE_NAMES and isinstance(entry, Mapping):
                records[StageKey(it["iteration"], Stage(name))] = StageRecord.from_wire(entry)

    def text(name: str) -> str | None:
        value = status.get(name)
        return value if isinstance(value, str) else None

    generation = status.get("observedGeneration")
    conditions = [c for c in listed(status.get("conditions")) if isinstance(c, Mapping) and "type" in c]
    plan = status.get("memoryPlan")
    return Previous(
        records=records,
        frozen=frozen_specs.read(status),
        spec_digests=frozen_specs.digests(status),
        phase=text("phase"),
        message=text("message"),
        observed_generation=generation if isinstance(generation, int) else 0,
        start_time=text("startTime"),
        completion_time=text("completionTime"),
        conditions=tuple(dict(c) for c in conditions),
        spec_change_deferred=bool(status.get("specChangeDeferred")),
        memory_plan=dict(plan) if isinstance(plan, Mapping) else None,
    )


def canonical(value: Any) -> Any:
    """A status value as the apiserver stores it: status is written with merge patches, in which a null
    means "remove", so no object field is ever null there. Comparing our status with the stored one (is
    there anything to write?) needs ours in the same form. NaN and infinities, which JSON cannot carry
    (the apiserver refuses the whole write), read as null."""
    if isinstance(value, Mapping):
        return {k: c for k, v in value.items() if (c := canonical(v)) is not None}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def timestamp(seconds: float | None = None) -> str:
    when = dt.datetime.fromtimestamp(seconds, dt.UTC) if seconds is not None else dt.datetime.now(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


# Which count weights a stage's `mean_*` metrics when shards are merged.
_WEIGHTS = {Stage.GENERATE: "responses", Stage.RANK: "pairs", Stage.TRAIN: "pairs", Stage.EVALUATE: "prompts"}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _candidates(stage: Stage, parts: list[dict[str, Any]]) -> list[str]:
    """The keys a merged record may keep, at most MAX_METRICS: the stage's headline metrics first (what
    compaction keeps, the tracking run ids later stages report to), then in order of first appearance."""
    seen = dict.fromkeys(k for p in parts for k in p)
    first = [k for k in compact.HEADLINE[stage.value] if k in seen]
    return [*first, *(k for k in seen if k not in first)][:MAX_METRICS]


def merge_metrics(stage: Stage, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One stage's metrics from its shards: counts add up, `mean_*` are weighted by the stage's count, maps
    (the per-axis figures) merge key by key the same way. A value that is not a number in some shard (a
    null, a string) is taken from the first shard.

    Bounded whatever the shards report, so that one stage record stays small (256 shards of 64 metrics
    each would be 16,384 keys): at most MAX_METRICS keys and MAX_METRICS_BYTES of JSON, what a single
    summary can hold; `cut_note` says what was left out."""
    weight, keys = _WEIGHTS[stage], _candidates(stage, parts)
    weights = [p.get(weight, 0) if _number(p.get(weight, 0)) else 0 for p in parts]
    merged = _merged([{k: p[k] for k in keys if k in p} for p in parts], weights)
    size, kept = 2, set()  # "{}"
    for key, value in merged.items():
        item = len(json.dumps({key: value}, separators=(",", ":"), default=str)) - 1  # '"k":v' and a comma
        if size + item <= MAX_METRICS_BYTES:
            size += item
            kept.add(key)
    return {k: v for k, v in merged.items() if k in kept}


def _merged(parts: list[Mapping[str, Any]], weights: list[float]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        present = [(p[key], w) for p, w in zip(parts, weights, strict=True) if key in p]
        values = [v for v, _ in present]
        if len(values) > 1 and all(isinstance(v, Mapping) for v in values):
            merged[key] = _merged(values, [w for _, w in present])
        elif len(parts) == 1 or not all(_number(v) for v in values):
            merged[key] = values[0]
        elif key.startswith("mean_"):
            total = sum(w for _, w in present)
            merged[key] = round(sum(v * w for v, w in present) / total, 4) if total else 0.0
        else:
            merged[key] = round(sum(values), 4)
    return merged


def cut_note(parts: list[dict[str, Any]], merged: dict[str, Any]) -> str | None:
    """What `merge_metrics` left out, for the record's message (the stage's `_SUCCESS.json` has it all)."""
    left = [k for k in dict.fromkeys(k for p in parts for k in p) if k not in merged]
    if not left:
        return None
    shown = ", ".join(k[:40] for k in left[:5])
    limit = f"{MAX_METRICS} keys, {MAX_METRICS_BYTES} bytes"
    return f"{len(left)} metric(s) over the status limit ({limit}) left out: {shown}"


def digests_of(summaries: list[dict[str, Any]]) -> list[str] | None:
    """Every part's digest in part order (from the stage's termination summaries), or None while one
    is missing."""
    found = {s.get("shard", 0): s["digest"] for s in summaries if s.get("digest")}
    shards = max((s.get("shards", 1) for s in summaries), default=0)
    return [found[k] for k in range(shards)] if shards and len(found) == shards else None


def record_from_summaries(stage: Stage, summaries: list[dict[str, Any]], attempts: int = 1) -> StageRecord:
    parts = [s["metrics"] for s in summaries]
    metrics = merge_metrics(stage, parts)
    return StageRecord(
        phase=Phase.SUCCEEDED,
        attempts=max(attempts, 1),
        start_time=timestamp(min(s["startTime"] for s in summaries)),
        completion_time=timestamp(max(s["completionTime"] for s in summaries)),
        metrics=metrics,
        message=warned(summaries, cut_note(parts, metrics)),
    )


def warned(summaries: list[dict[str, Any]], *notes: str | None) -> str | None:
    """What the stage's parts warned of (a tracking server away), and `notes` of our own, as a succeeded
    record's message."""
    said = [w for s in summaries for w in s.get("warnings") or [] if isinstance(w, str)]
    said += [n for n in notes if n]
    return "; ".join(dict.fromkeys(said))[:MAX_TEXT] if said else None


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
    previous: Previous | None = None,
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
    previous = previous or Previous()
    frozen = frozen or {}
    spec_digests, stored_specs = frozen_specs.write(frozen)
    phase = _phase(spec, records)

    def checkpoint(i: int) -> str:
        return f"pvc://{claim}/{workspace.checkpoint(i)}" if claim else workspace.checkpoint_uri(i)

    at = current(spec, records)
    failed = next((k for k in all_stages(spec) if records.get(k, StageRecord()).phase == Phase.FAILED), None)

    if phase == Phase.SUCCEEDED and early_stop is not None:
        reason, message = Reason.EARLY_STOPPED, f"stopped early after iteration {early_stop[0]}: {early_stop[1]}"
    elif phase == Phase.SUCCEEDED:
        reason, message = Reason.SUCCEEDED, f"completed {spec.iterations} iteration{'s' * (spec.iterations != 1)}"
    elif failed is not None:
        detail = records[failed].message or "failed"
        reason = Reason.VOLUME_FULL if records[failed].reason == Reason.VOLUME_FULL else Reason.STAGE_FAILED
        message = f"{failed} failed after {records[failed].attempts} attempt(s): {detail}"
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
        if i in spec_digests or i in previous.spec_digests:
            entry["specDigest"] = spec_digests.get(i) or previous.spec_digests[i]
        iterations.append(entry)
    compact.drop_used_digests(iterations)
    stored_specs = compact.kept_specs(iterations, stored_specs)
    rule = spec.evaluation.stop_when
    compact.within_budget(iterations, stored_specs, follow=(rule.source,) if rule and rule.source else ())

    done_iterations = [e for e in iterations if "checkpoint" in e]
    evaluated = [e for e in iterations if e["iteration"] >= 1 and "evaluate" in e["stages"]]
    history = [e["stages"]["evaluate"].get("metrics", {}) for e in evaluated]
    best = winrate.best_of(history, rule)
    latest = next((h["lc_win_rate_vs_base"] for h in reversed(history) if "lc_win_rate_vs_base" in h), None)
    started = [r.start_time for r in records.values() if r.start_time]
    mlflow = next((m for r in records.values() if isinstance(m := r.metrics.get("mlflow_run_id"), str)), None)
    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "observedGeneration": generation,
        "currentIteration": at.iteration if at else spec.iterations,
        "iterationsTotal": spec.iterations,
        "progress": f"{at.iteration if at else spec.iterations}/{spec.iterations}",  # printer column
        "currentStage": at.stage.value if at else None,
        "startTime": previous.start_time or (min(started) if started else None),
        "completionTime": now if phase in (Phase.SUCCEEDED, Phase.FAILED) else None,
        "latestCheckpoint": done_iterations[-1]["checkpoint"] if done_iterations else None,
        "conditions": conditions(
            phase, reason, message, now, generation, list(previous.conditions), stalled=problem is not None
        ),
        "iterations": iterations,
        "frozenSpecs": stored_specs or None,
        "specChangeDeferred": f"applies from iteration {at.iteration + 1}" if deferred and at else None,
        # latestCheckpoint is the last trained iteration's; bestCheckpoint is the one to ship.
        "bestIteration": evaluated[best]["iteration"] if best is not None else None,
        "bestCheckpoint": evaluated[best].get("checkpoint") if best is not None else None,
        "latestWinRate": round(latest, 3) if latest is not None else None,  # printer column: LC vs base
        "earlyStop": {"iteration": early_stop[0], "reason": early_stop[1]} if early_stop else None,
        "tracking": {"mlflowRunId": mlflow} if mlflow else None,  # the run's MLflow run, made by its first stage
    }
    if previous.completion_time and status["completionTime"]:
        status["completionTime"] = previous.completion_time
    return canonical(status)


def invalid_status(
    message: str,
    *,
    generation: int,
    previous: Mapping[str, Any] | None = None,
    now: str | None = None,
    reason: str = Reason.INVALID_SPEC,
) -> dict[str, Any]:
    """A spec the operator will not run (it got past the CRD schema, or the cluster's policy refuses
    it): Failed and Stalled, field named. What the last status recorded of finished work is kept."""
    now = now or timestamp()
    previous = previous or {}
    text = f"{'refused by policy' if reason == Reason.POLICY_DENIED else 'invalid spec'}: {message}"
    kept = ("iterations", "frozenSpecs", "startTime", "latestCheckpoint")
    return canonical(
        {
            **{k: v for k, v in previous.items() if k in kept},
            "phase": Phase.FAILED,
            "message": text,
            "observedGeneration": generation,
            "conditions": conditions(
                Phase.FAILED, reason, text, now, generation, list(parse_previous(previous).conditions)
            ),
        }
    )
