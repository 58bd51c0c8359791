"""One reconcile of one run, as a pure function: observation in, actions out.

`decide(run, jobs, pods)` reads the spec, the previous status and the Jobs/Pods the run owns,
asks the plan what runs next, and returns the objects to create (if absent), the new status and
the events to post. The kopf handlers only gather the observation and apply the decision.
"""

from __future__ import annotations

import datetime as dt
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from idpo_jobs.config import STAGE_ORDER, Stage
from pydantic import BaseModel, ValidationError

from idpo_operator import memory, plan, resources
from idpo_operator.plan import StageKey
from idpo_operator.spec import DEFAULT_STAGE_IMAGE, IterativeDPORunSpec, format_validation_error
from idpo_operator.status import (
    Phase,
    Reason,
    StageRecord,
    build_status,
    digests_of,
    invalid_status,
    merge_metrics,
    stage_status,
    timestamp,
)
from idpo_operator.status import current as status_current

CONTROLLER_UID = "batch.kubernetes.io/controller-uid"  # the Job controller's label on its pods


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
    fail: dict[str, str] = field(default_factory=dict)  # Job name -> why: pods that cannot start
    delete: list[str] = field(default_factory=list)  # Job names: out of range after `iterations` went down
    restart: list[str] = field(default_factory=list)  # gang Job names: delete with their pods, then re-create
    again: bool = False  # a step waits for this status to be written: reconcile again once it is


WAITING_FOR_CAPACITY = "Pending: waiting for capacity"
# Why a gang restarts (StageRecord.restarting): a pod failed (an attempt), or was disrupted (not one).
POD_FAILED, DISRUPTED = "PodFailed", "DisruptionTarget"
# Waiting reasons that no amount of waiting fixes: the stage fails at once, not at its start deadline.
FATAL_WAITING = {"InvalidImageName", "ErrImageNeverPull"}
# The spec sections each stage freezes for its iteration when it starts (their `resources` stay
# live: a pod that cannot be scheduled may be fixed mid-iteration). A stage's sections are fixed once
# it started, so later stages read what earlier ones produced; a stage not yet started, or re-run
# after a failure and a fix, takes the live spec. Everything else applies to the next Job created.
STAGE_SECTIONS = {
    Stage.GENERATE: ("model", "prompts", "generation"),
    Stage.RANK: ("ranking",),
    Stage.TRAIN: ("training",),
    Stage.EVALUATE: ("evaluation",),
}
FROZEN_SECTIONS = tuple(name for names in STAGE_SECTIONS.values() for name in names)


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


def _age(since: str | None, now: str) -> float:
    if not since:
        return 0.0
    parse = lambda t: dt.datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(now) - parse(since)).total_seconds()


def waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    """Why a pod has not started: (reason, message), from its containers or the scheduler."""
    status = pod.get("status", {})
    if status.get("phase") not in (None, "Pending"):
        return None
    for cs in status.get("containerStatuses", []):
        wait = cs.get("state", {}).get("waiting")
        if wait and wait.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return wait["reason"], wait.get("message", "")
    for cond in status.get("conditions", []):
        if cond["type"] == "PodScheduled" and cond["status"] == "False":
            return cond.get("reason", "Unschedulable"), cond.get("message", "")
    return None


def gang_failure(job: dict[str, Any], pods: list[dict[str, Any]]) -> str | None:
    """Why a failed gang Job may be re-created (POD_FAILED or DISRUPTED); None for any other Job,
    and for a gang that must not run again: bad input, its deadline, the operator's own verdict."""
    annotations = job["metadata"].get("annotations", {})
    if resources.ANNOTATION_ATTEMPT not in annotations or resources.ANNOTATION_FAILURE in annotations:
        return None
    done = _true_conditions(job)
    cond = done.get("Failed") or done.get("FailureTarget") or {}
    # A disrupted pod is counted only once it has terminated, and its peers, failing at their next
    # collective, are often counted first: the pods' conditions tell it, not the Job's reason.
    disrupted = any(DISRUPTED in _true_conditions(p) for p in pods)
    if cond.get("reason") == "BackoffLimitExceeded":
        return DISRUPTED if disrupted else POD_FAILED
    # The Job controller's message names the rule that matched: "Pod ns/x has condition DisruptionTarget ...".
    if cond.get("reason") == "PodFailurePolicy" and (disrupted or f"condition {DISRUPTED}" in cond.get("message", "")):
        return DISRUPTED
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
        # SuccessCriteriaMet comes first, and completionTime only with Complete (after the pods end).
        cond = done.get("Complete") or done["SuccessCriteriaMet"]
        record.completion_time = record.completion_time or cond.get("lastTransitionTime")
        record.phase = Phase.SUCCEEDED
        record.attempts = failed_pods + 1
        stage = key_of(job).stage  # type: ignore[union-attr]
        parts = [s["metrics"] for s in summaries if isinstance(s.get("metrics"), dict)]
        record.metrics = merge_metrics(stage, parts) if parts else {}
        record.digests = digests_of(summaries)
    elif "Failed" in done or "FailureTarget" in done:
        cond = done.get("Failed") or done["FailureTarget"]
        errors = [s["error"] for s in summaries if s.get("error")]
        record.phase = Phase.FAILED
        record.attempts = max(failed_pods, 1)
        stuck = job["metadata"].get("annotations", {}).get(resources.ANNOTATION_FAILURE)
        record.message = stuck or (
            errors[-1] if errors else f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}"
        )
        record.completion_time = record.completion_time or cond.get("lastTransitionTime")
    else:
        record.phase = Phase.RUNNING
        record.attempts = failed_pods + 1
        stuck = [(w, p) for p in pods if (w := waiting(p))]
        if stuck:
            (reason, message), pod = stuck[0]
            record.message = f"Pending: {reason}: {message}"[:500]
            record.waiting_since = pod["metadata"].get("creationTimestamp")
            record.waiting_reason = reason
    # A gang's Job fails at its first failed pod and is re-created whole: its attempt is on the Job.
    attempt = job["metadata"].get("annotations", {}).get(resources.ANNOTATION_ATTEMPT)
    if attempt:
        record.attempts = int(attempt)
    return record


def previous_records(status: dict[str, Any]) -> dict[StageKey, StageRecord]:
    """Succeeded stages from the last status: the record survives its Job (TTL, manual delete). And
    restarting gangs, whose Job is deleted while they restart."""
    out = {}
    for it in status.get("iterations", []):
        for name, s in it.get("stages", {}).items():
            if s.get("restarting") or s.get("phase") == Phase.SUCCEEDED:
                out[StageKey(it["iteration"], Stage(name))] = StageRecord.from_wire(s)
    return out


def _stage_events(old: dict[str, Any], new: dict[str, Any]) -> list[Event]:
    before = {(it["iteration"], n): s for it in old.get("iterations", []) for n, s in it.get("stages", {}).items()}
    events = []
    for it in new.get("iterations", []):
        for name, s in it.get("stages", {}).items():
            prev = before.get((it["iteration"], name), {})
            key = StageKey(it["iteration"], Stage(name))
            phase, was = s.get("phase"), prev.get("phase")
            if s.get("restarting") and not prev.get("restarting"):
                events.append(Event("Warning", "StageRestarting", f"{key}: {s.get('message', '')}", key))
            elif phase == Phase.RUNNING and s.get("attempts", 1) > max(prev.get("attempts", 1), 1):  # 0: Pending
                events.append(Event("Warning", "StageRetrying", f"{key}: attempt {s['attempts']} after a failure", key))
            elif phase == Phase.RUNNING and was != Phase.RUNNING:
                events.append(Event("Normal", "StageStarted", f"{key} started (job {s.get('jobName')})", key))
            elif phase == Phase.SUCCEEDED and was != Phase.SUCCEEDED:
                message = f"{key} succeeded: {json.dumps(s.get('metrics', {}))}"[:1000]
                events.append(Event("Normal", "StageSucceeded", message, key))
                worse = s.get("metrics", {}).get("lc_win_rate_vs_previous")
                if key.stage is Stage.EVALUATE and key.iteration > 1 and isinstance(worse, float) and worse < 0.5:
                    message = (
                        f"iteration {key.iteration} is worse than iteration {key.iteration - 1}: LC win rate {worse}"
                    )
                    events.append(Event("Warning", "IterationWorse", message, key))
            elif phase == Phase.FAILED and was != Phase.FAILED:
                events.append(Event("Warning", "StageFailed", f"{key} failed: {s.get('message', '')}", key))
    if new.get("phase") != old.get("phase") and new.get("phase") in (Phase.SUCCEEDED, Phase.FAILED):
        kind = "Normal" if new["phase"] == Phase.SUCCEEDED else "Warning"
        events.append(Event(kind, f"Run{new['phase']}", new.get("message", "")))
    return events


def _with_nulls(section: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """A frozen section as it was written. The apiserver drops null values from what it stores, and
    every field was written, so a nullable field that is absent was null: without this, an explicit
    `splitPattern: null` would come back as its default."""
    out = dict(section)
    for name, info in model.model_fields.items():
        key, kinds = info.alias or name, typing.get_args(info.annotation) or (info.annotation,)
        nested = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if key not in out:
            if type(None) in kinds:
                out[key] = None
        elif nested is not None and isinstance(out[key], dict):
            out[key] = _with_nulls(out[key], nested)
    return out


def frozen_specs(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    fields = IterativeDPORunSpec.model_fields
    return {
        it["iteration"]: {
            name: _with_nulls(section, fields[name].annotation)  # type: ignore[arg-type]
            for name, section in it["spec"].items()
            if name in fields
        }
        for it in status.get("iterations", [])
        if it.get("spec")
    }


def _sections(spec: IterativeDPORunSpec) -> dict[str, Any]:
    wire = spec.to_wire()
    return {name: {k: v for k, v in wire[name].items() if k != "resources"} for name in FROZEN_SECTIONS}


def spec_for(spec: IterativeDPORunSpec, frozen: dict[str, Any] | None) -> IterativeDPORunSpec:
    """The spec an iteration runs with: its frozen sections over the live spec (live `resources`)."""
    if not frozen:
        return spec
    wire = spec.to_wire()
    for name, section in frozen.items():
        wire[name] = {**section, **({"resources": wire[name]["resources"]} if "resources" in wire[name] else {})}
    return IterativeDPORunSpec.model_validate(wire)


def _refreeze(frozen: dict[str, Any], live: dict[str, Any], starting: Stage) -> dict[str, Any]:
    """Keep the sections of the stages before `starting`; take the rest from the live spec."""
    order = [*STAGE_ORDER, Stage.EVALUATE]
    before = order[: order.index(starting)]
    kept = {name for stage in before for name in STAGE_SECTIONS[stage]}
    return {name: frozen[name] if name in kept and name in frozen else live[name] for name in FROZEN_SECTIONS}


def _deferred(frozen: dict[str, Any], live: dict[str, Any], records: dict[StageKey, StageRecord], at: StageKey) -> bool:
    """Whether the live spec changed a section that a started stage of iteration `at` froze."""
    stages = [*STAGE_ORDER, Stage.EVALUATE]
    started = [s for s in stages if records.get(StageKey(at.iteration, s), StageRecord()).phase != Phase.PENDING]
    return any(frozen.get(name) not in (None, live[name]) for s in started for name in STAGE_SECTIONS[s])


def decide(
    run: RunView,
    jobs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    now: str | None = None,
    *,
    stage_image: str = DEFAULT_STAGE_IMAGE,
    capacity: bool = True,
    gpu_memory: float = 80 * memory.GB,
) -> Decision:
    """`capacity`: whether the operator's cap on concurrent stage Jobs lets this run start one now.
    `gpu_memory`: bytes per GPU that the status's memory plan is checked against."""
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
    frozen = frozen_specs(run.status)
    # Ownership is by uid: a Job of a deleted run of the same name is never used (the garbage
    # collector is removing it), and blocks its name until it is gone.
    foreign = {j["metadata"]["name"]: j for j in jobs if not resources.owned_by(j, run.uid)}
    jobs = [j for j in jobs if resources.owned_by(j, run.uid)]
    job_uids = {j["metadata"]["uid"] for j in jobs if "uid" in j["metadata"]}
    pods = [p for p in pods if p["metadata"].get("labels", {}).get(CONTROLLER_UID) in job_uids]
    jobs_by_key = {k: j for j in jobs if (k := key_of(j)) is not None}
    fail: dict[str, str] = {}
    restart: list[str] = []
    again = False
    for key, job in jobs_by_key.items():
        name = job["metadata"]["name"]
        owned_pods = [p for p in pods if key_of(p) == key]
        # A Job gone missing keeps its old record; a present Job is the truth, except that a Job
        # recorded as succeeded never runs again: a cache a moment behind the status must not undo it.
        previous, observed = records.get(key, StageRecord()), job_record(job, owned_pods)
        behind = previous.phase == Phase.SUCCEEDED and observed.phase != Phase.SUCCEEDED
        if previous.phase != Phase.SUCCEEDED or (name == previous.job_name and not behind):
            records[key] = observed
        record = records[key]
        why = gang_failure(job, owned_pods) if record.phase == Phase.FAILED and record.job_name == name else None
        if why == DISRUPTED or (why == POD_FAILED and record.attempts <= spec.runtime.retries):
            before = stage_status(run.status, key)
            cause = "was disrupted" if why == DISRUPTED else f"failed in attempt {record.attempts}"
            message = before.get("message") if before.get("restarting") else None
            records[key] = StageRecord(
                Phase.RUNNING,
                name,
                record.attempts,
                record.start_time,
                message=message or f"restarting all pods: a pod {cause}: {record.message}"[:500],
                restarting=why,
            )
            # The Job goes only once the status says the stage is restarting: the attempt count
            # must outlive it, even if the operator stops between the two writes.
            if not before.get("restarting"):
                again = True
            elif not job["metadata"].get("deletionTimestamp"):
                restart.append(name)
        elif record.phase == Phase.RUNNING and record.waiting_reason:
            late = _age(record.waiting_since, now) > spec.runtime.start_timeout_seconds
            if late or record.waiting_reason in FATAL_WAITING:
                fail[name] = f"did not start within {spec.runtime.start_timeout_seconds}s: {record.message}"
                if record.waiting_reason in FATAL_WAITING:
                    fail[name] = f"cannot start: {record.message}"

    evaluations = {
        k.iteration: r.metrics for k, r in records.items() if k.stage is Stage.EVALUATE and r.phase == Phase.SUCCEEDED
    }
    stop = plan.early_stop(spec, evaluations)
    spec = plan.truncated(spec, stop)  # an early stop makes its iteration the last
    out_of_range = [j["metadata"]["name"] for k, j in jobs_by_key.items() if k.iteration > spec.iterations]
    create: list[dict[str, Any]] = []
    problem: tuple[str, str] | None = None
    completed = [k for k, r in records.items() if r.phase == Phase.SUCCEEDED]
    failed = any(r.phase == Phase.FAILED for k, r in records.items() if k.iteration <= spec.iterations)
    key = plan.next_stage(spec, completed)
    if key is not None and not failed and not spec.suspend and key not in jobs_by_key:
        name = resources.job_name(run.name, key)
        # A stage the last status has as started but whose Job is absent: a gang deleted to restart it,
        # a create the API refused, a Job deleted by hand. Its attempt count carries over.
        prior = stage_status(run.status, key)
        started = prior.get("phase") in (Phase.RUNNING, Phase.PENDING)
        restarting = prior.get("restarting") if started else None
        attempt = max(prior.get("attempts", 1), 1) if started else 1
        if restarting == POD_FAILED:
            attempt += 1
        if name in foreign:
            problem = (Reason.FOREIGN_CHILD, f"Job {name} belongs to another object; waiting for it to be deleted")
        elif not capacity:
            records[key] = StageRecord(
                Phase.PENDING, message=WAITING_FOR_CAPACITY, attempts=prior.get("attempts", 0), restarting=restarting
            )
        else:
            # A restart runs the spec its first attempt froze (when the status has one).
            if not restarting or key.iteration not in frozen:
                frozen[key.iteration] = _refreeze(frozen.get(key.iteration, {}), _sections(spec), key.stage)
            effective = spec_for(spec, frozen[key.iteration])
            inputs = records.get(plan.input_of(key), StageRecord()).digests if plan.input_of(key) else None
            config = plan.stage_config(effective, run.name, ws, key, input_digests=inputs)
            pvc = resources.build_pvc(spec, owner)
            create = [
                *([pvc] if pvc else []),
                *resources.stage_objects(effective, owner, key, config, stage_image, attempt),
            ]
            records[key] = StageRecord(phase=Phase.RUNNING, job_name=name, attempts=attempt, start_time=now)

    at = status_current(spec, records)
    deferred = at is not None and _deferred(frozen.get(at.iteration, {}), _sections(spec), records, at)
    status = build_status(
        spec,
        records,
        ws,
        generation=run.generation,
        previous=run.status,
        now=now,
        claim=resources.pvc_name(spec, run.name),
        frozen=frozen,
        problem=problem,
        deferred=deferred,
        early_stop=stop,
    )
    events = _stage_events(run.status, status)
    if deferred and not run.status.get("specChangeDeferred"):
        message = f"spec change applies from iteration {at.iteration + 1}: iteration {at.iteration} keeps its spec"
        events.append(Event("Normal", "SpecChangeDeferred", message))
    status["memoryPlan"] = memory.summary(spec, gpu_memory)
    too_big = misfits(status["memoryPlan"])
    if too_big and too_big != misfits(run.status.get("memoryPlan")):
        message = "estimated GPU memory exceeds the GPU: " + "; ".join(too_big)
        events.append(Event("Warning", "MemoryPlanDoesNotFit", f"{message} (idpo plan shows the estimate)"))
    return Decision(create, status, events, fail=fail, delete=out_of_range, restart=restart, again=again)


def misfits(plan_status: dict[str, Any] | None) -> list[str]:
    """The stages of a status memory plan whose estimate does not fit, as `stage (variant): N GB`."""
    stages = (plan_status or {}).get("stages", [])
    return [f"{s['stage']} ({s['variant']}): {s['estimateGB']} GB" for s in stages if s.get("fits") is False]
