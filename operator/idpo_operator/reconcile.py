"""One reconcile of one run, as a pure function: observation in, actions out.

`decide(run, jobs, pods)` parses the spec and the previous status once, merges what the run's Jobs and
Pods show into one record per stage (`_records`), asks `rules.next_step` what happens next, builds
what starting that stage creates (`_start`), and returns the objects to create (if absent), the Jobs
to fail, delete or restart, the new status and the events to post. The kopf handlers only gather the
observation (observe.py) and the apply layer writes the decision.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from idpo_jobs.config import Stage
from pydantic import ValidationError

from idpo_operator import frozen as frozen_specs
from idpo_operator import memory, plan, queueing, resources, rules
from idpo_operator.observe import (
    DISRUPTED,
    FATAL_WAITING,
    POD_FAILED,
    CreateFailure,
    JobView,
    PodView,
    gang_failure,
    job_record,
)
from idpo_operator.plan import StageKey
from idpo_operator.policy import Policy, pod_template_violations, violations
from idpo_operator.spec import DEFAULT_STAGE_IMAGE, IterativeDPORunSpec, format_validation_error
from idpo_operator.status import (
    Phase,
    Previous,
    Reason,
    StageRecord,
    build_status,
    invalid_status,
    parse_previous,
    timestamp,
)
from idpo_operator.status import current as status_current

WAITING_FOR_CAPACITY = "Pending: waiting for capacity"
# Bytes of a run's spec (compact JSON) the operator runs and keeps in memory. The apiserver bounds an
# object only by its request size (3 MiB) and etcd's (1.5 MiB), and a CEL rule cannot measure a whole
# spec; real specs are a few KiB (a long chat template and a page of env included), and a stage's
# config, which holds most of the spec, travels in a pod-template annotation (256 KiB for them all).
MAX_SPEC_BYTES = 64 * 1024
RETRY = "Retry"  # StageRecord.restarting: a failed stage started again after the spec changed (a new attempt)
RETRY_ANNOTATION = "idpo.dev/retry"  # a new value starts a failed stage again without a spec change


@dataclass(frozen=True)
class RunView:
    """What the operator read of the run itself. `spec` is as the cache keeps it (`cached_spec`): its
    compact JSON, or "" for one over MAX_SPEC_BYTES (`spec_bytes` says how big it was); or a mapping."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: Mapping[str, Any] | str
    status: Mapping[str, Any] = field(default_factory=dict)
    resource_version: str = ""
    deleting: bool = False
    retry: str | None = None  # RETRY_ANNOTATION's value
    finalizers: tuple[str, ...] = ()
    spec_bytes: int = 0  # of the spec as compact JSON, when the cache measured it

    @property
    def owner(self) -> resources.Owner:
        return resources.Owner(self.name, self.namespace, self.uid)


def cached_spec(spec: Mapping[str, Any] | None) -> tuple[str, int]:
    """What the operator keeps of a run's spec between events, and its size in bytes: its compact JSON
    text, not the parsed objects (many short env entries take eight times their JSON's size as dicts),
    and nothing at all past MAX_SPEC_BYTES: memory per run is bounded whatever the spec holds."""
    text = json.dumps(spec or {}, separators=(",", ":"), ensure_ascii=False)
    size = len(text.encode())
    return (text if size <= MAX_SPEC_BYTES else ""), size


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str
    key: StageKey | None = None  # the stage it is about, for consumers other than humans (metrics)


@dataclass(frozen=True)
class Settings:
    """How the operator was started (its flags)."""

    stage_image: str = DEFAULT_STAGE_IMAGE
    gpu_memory: float = 80 * memory.GB  # bytes per GPU that status.memoryPlan is checked against
    job_ttl_seconds: int | None = None  # ttlSecondsAfterFinished of stage Jobs; None: kept
    policy: Policy | None = None  # what runs may ask for; None: anything


@dataclass
class Decision:
    create: list[dict[str, Any]]
    status: dict[str, Any]
    events: list[Event]
    fail: dict[str, str] = field(default_factory=dict)  # Job name -> why: pods that cannot start
    delete: list[str] = field(default_factory=list)  # Job names: out of range after `iterations` went down
    restart: list[str] = field(default_factory=list)  # Job names: delete with their pods, then re-create
    requeue_after: float | None = None  # seconds: decide again then (a start deadline; 0: once status is written)
    wants_capacity: bool = False  # a stage would start now, but the cap on running stages is reached


@dataclass(frozen=True)
class Queues:
    """What Kueue says of the run's Jobs: their Workloads, and which ClusterQueue each LocalQueue feeds."""

    workloads: list[queueing.WorkloadView] = field(default_factory=list)
    cluster_queues: Mapping[str, str] = field(default_factory=dict)  # LocalQueue -> ClusterQueue


@dataclass
class Children:
    """The run's Jobs (owned by its uid, by stage) and their pods; names of Jobs another owner holds;
    the latest refusal of each Job's pods (observe.refused)."""

    jobs: dict[StageKey, JobView]
    pods: dict[StageKey, list[PodView]]
    foreign: set[str]
    workloads: dict[str, queueing.WorkloadView] = field(default_factory=dict)  # by Job uid
    failures: Mapping[str, CreateFailure] = field(default_factory=dict)  # by Job uid

    @classmethod
    def of(
        cls,
        uid: str,
        jobs: list[JobView],
        pods: list[PodView],
        queues: Queues | None = None,
        failures: Mapping[str, CreateFailure] | None = None,
    ) -> Children:
        # Ownership is by uid: a Job of a deleted run of the same name is never used (the garbage
        # collector is removing it), and blocks its name until it is gone.
        owned = [j for j in jobs if j.controller == uid]
        uids = {j.uid for j in owned if j.uid}
        by_key: dict[StageKey, list[PodView]] = {}
        for p in pods:
            if p.job_uid in uids and p.key is not None:
                by_key.setdefault(p.key, []).append(p)
        return cls(
            {j.key: j for j in owned if j.key is not None},
            by_key,
            {j.name for j in jobs if j.controller != uid},
            {w.job_uid: w for w in (queues.workloads if queues else []) if w.job_uid in uids},
            {k: f for k, f in (failures or {}).items() if k in uids},
        )


@dataclass
class _Actions:
    """What observing the Jobs asks of the apply layer, besides creating the next stage."""

    fail: dict[str, str] = field(default_factory=dict)
    restart: list[str] = field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def _age(since: str | None, now: str) -> float:
    if not since:
        return 0.0
    parse = lambda t: dt.datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse(now) - parse(since)).total_seconds()


def _retry_requested(run: RunView, previous: Previous) -> bool:
    """A failed stage runs again once the spec changed after the failure was recorded (GitOps: the fix
    is the commit), or when RETRY_ANNOTATION takes a new value."""
    handled = run.status.get("retried") if isinstance(run.status, Mapping) else None
    return run.generation > previous.observed_generation or (run.retry is not None and run.retry != handled)


def _restarting(record: StageRecord, why: str, message: str) -> StageRecord:
    return StageRecord(
        Phase.RUNNING, record.job_name, record.attempts, record.start_time, message=message, restarting=why
    )


def _observed(
    spec: IterativeDPORunSpec,
    job: JobView,
    children: Children,
    queues: Queues,
    before: StageRecord,
    retry: bool,
    now: str,
    actions: _Actions,
) -> StageRecord:
    """The record of a stage whose Job exists, and what to do about that Job."""
    pods = children.pods.get(job.key, []) if job.key else []
    if before.restarting:
        # The status says the stage restarts; only now may its Job go (Foreground: with its pods, so
        # the next attempt never meets one of them), and the attempt count has outlived it.
        if not job.deleting:
            actions.restart.append(job.name)
        return before
    record = job_record(job, pods, children.failures.get(job.uid or ""))
    if before.phase == Phase.RUNNING and before.job_name == job.name and before.start_time:
        record.start_time = before.start_time  # the operator's own clock, when it created the Job: said once
    if record.phase == Phase.RUNNING:
        workload = children.workloads.get(job.uid or "")
        state, message = queueing.admission(job.queue, job.suspended, before.admission, workload, queues.cluster_queues)
        record.admission = state
        record.message = message or record.message
    if record.phase == Phase.FAILED:
        why = gang_failure(job, pods)
        if why == DISRUPTED or (why == POD_FAILED and record.attempts <= spec.runtime.retries):
            cause = "was disrupted" if why == DISRUPTED else f"failed in attempt {record.attempts}"
            actions.requeue(0)  # the Job goes once this status is written
            return _restarting(record, why, f"restarting all pods: a pod {cause}: {record.message}"[:500])
        if retry and before.phase == Phase.FAILED:  # a failure the last status recorded, not one just seen
            actions.requeue(0)
            return _restarting(record, RETRY, f"starting again after a spec change: {record.message}"[:500])
    elif record.phase == Phase.RUNNING and record.waiting_reason:
        limit = spec.runtime.start_timeout_seconds
        left = limit - _age(record.waiting_since, now)
        if record.waiting_reason in FATAL_WAITING:
            actions.fail[job.name] = f"cannot start: {record.message}"
        elif left < 0:
            actions.fail[job.name] = f"did not start within {limit}s: {record.message}"
        else:
            actions.requeue(left + 1)
    return record


def _records(
    spec: IterativeDPORunSpec, run: RunView, previous: Previous, children: Children, queues: Queues, now: str
) -> tuple[dict[StageKey, StageRecord], _Actions]:
    """One record per stage: the previous status's, brought up to date by what the Jobs show."""
    actions = _Actions()
    retry = _retry_requested(run, previous)
    records: dict[StageKey, StageRecord] = {}
    for key, before in previous.records.items():
        if before.phase == Phase.SUCCEEDED or before.restarting:
            records[key] = before  # final, or mid-restart: the record outlives its Job (TTL, deletion)
        elif before.phase == Phase.FAILED and key not in children.jobs:
            # The failed Job expired (its TTL) or was deleted: still failed, unless asked to try again.
            records[key] = _restarting(before, RETRY, "starting again") if retry else before
    for key, job in children.jobs.items():
        before = previous.record(key)
        if before.phase == Phase.SUCCEEDED:
            continue  # a Job a cache a moment behind shows as running must not undo it
        records[key] = _observed(spec, job, children, queues, before, retry, now, actions)
    return records, actions


class Denied(Exception):
    """What starting a stage would run is not allowed: the frozen spec it would run with, or the pod
    template it would create. The message names each field."""


def _frozen_denied(
    key: StageKey, effective: IterativeDPORunSpec, policy: Policy | None, digest: str | None
) -> list[str]:
    """The policy's verdict on the spec the stage will run: the live spec passed already, so whatever is
    refused now comes from a section frozen in status (a policy tightened since, or a status write)."""
    if policy is None:
        return []
    where = f"status.frozenSpecs.{digest}" if digest else f"status.iterations[{key.iteration}].spec"
    return [line.replace("spec.", f"{where}.", 1) for line in violations(effective, policy)]


def _template_denied(objects: list[dict[str, Any]], policy: Policy | None) -> list[str]:
    if policy is None:
        return []
    return [
        f"Job {o['metadata']['name']} pod template: {problem}"
        for o in objects
        if o["kind"] == "Job"
        for problem in pod_template_violations(o["spec"]["template"])
    ]


def _start(
    key: StageKey,
    run: RunView,
    spec: IterativeDPORunSpec,
    records: dict[StageKey, StageRecord],
    previous: Previous,
    frozen: dict[int, dict[str, Any]],
    settings: Settings,
    now: str,
) -> list[dict[str, Any]]:
    """The objects that start `key` (its PVC first, for a run's first stage); records it as Running."""
    prior = records.get(key) or previous.record(key)
    # A stage the last status has as started but whose Job is absent: a restart (the Job was deleted to
    # start the next attempt), a create the API refused, a Job deleted by hand. Its attempt count carries over.
    started = prior.phase in (Phase.RUNNING, Phase.PENDING) and prior.attempts > 0
    attempt = max(prior.attempts, 1) if started else 1
    if prior.restarting in (POD_FAILED, RETRY):
        attempt += 1
    # A restart runs the spec its first attempt froze (when the status has one).
    if prior.restarting not in (POD_FAILED, DISRUPTED) or key.iteration not in frozen:
        frozen[key.iteration] = frozen_specs.refreeze(
            frozen.get(key.iteration, {}), frozen_specs.live_sections(spec), key.stage
        )
    effective = frozen_specs.spec_for(spec, frozen[key.iteration])
    digest = frozen_specs.digests(run.status).get(key.iteration)
    if denied := _frozen_denied(key, effective, settings.policy, digest):
        raise Denied("; ".join(denied))
    owner = run.owner
    ws = resources.workspace(spec, owner)
    source = plan.input_of(key)
    digests = records.get(source, StageRecord()).digests if source else None
    reported = {k: r.metrics for k, r in records.items()}
    tracking = plan.tracking_config(effective, run.name, key, reported, run.namespace, run.uid)
    config = plan.stage_config(effective, run.name, ws, key, input_digests=digests, tracking=tracking)
    # The claim is created with the run's first Job only: a create-if-absent at every stage would be
    # a write per hand-off, and one that a ResourceQuota the claim itself fills refuses (403, not 409).
    first = not any(r.job_name for r in (*previous.records.values(), *records.values()))
    pvc = resources.build_pvc(spec, owner) if first else None
    launch = resources.Launch(effective, owner, key, config, settings.stage_image, attempt, settings.job_ttl_seconds)
    name = resources.job_name(run.name, key)
    objects = resources.stage_objects(launch)
    if denied := _template_denied(objects, settings.policy):
        raise Denied("; ".join(denied))
    records[key] = StageRecord(phase=Phase.RUNNING, job_name=name, attempts=attempt, start_time=now)
    return [*([pvc] if pvc else []), *objects]


def _stage_events(previous: Previous, records: Mapping[StageKey, StageRecord]) -> list[Event]:
    events = []
    for key, s in sorted(records.items()):
        prev = previous.records.get(key) or StageRecord(attempts=0)
        if s.admission != prev.admission and s.phase == Phase.RUNNING:
            if s.admission == queueing.QUEUED:
                events.append(Event("Normal", "StageQueued", f"{key}: {s.message or ''}", key))
            elif s.admission == queueing.PREEMPTED:
                events.append(Event("Warning", "StagePreempted", f"{key}: {s.message or ''}", key))
            elif s.admission == queueing.ADMITTED and prev.admission is not None:
                events.append(Event("Normal", "StageAdmitted", f"{key} admitted by Kueue", key))
        if s.restarting and not prev.restarting:
            events.append(Event("Warning", "StageRestarting", f"{key}: {s.message or ''}", key))
        elif s.phase == Phase.RUNNING and s.attempts > max(prev.attempts, 1):  # attempts 0: Pending
            events.append(Event("Warning", "StageRetrying", f"{key}: attempt {s.attempts} after a failure", key))
        elif s.phase == Phase.RUNNING and prev.phase != Phase.RUNNING:
            events.append(Event("Normal", "StageStarted", f"{key} started (job {s.job_name})", key))
        elif s.phase == Phase.SUCCEEDED and prev.phase != Phase.SUCCEEDED:
            events.append(Event("Normal", "StageSucceeded", _succeeded_message(key, s), key))
            worse = s.metrics.get("lc_win_rate_vs_previous")
            if key.stage is Stage.EVALUATE and key.iteration > 1 and isinstance(worse, float) and worse < 0.5:
                message = f"iteration {key.iteration} is worse than iteration {key.iteration - 1}: LC win rate {worse}"
                events.append(Event("Warning", "IterationWorse", message, key))
        elif s.phase == Phase.FAILED and prev.phase != Phase.FAILED:
            events.append(Event("Warning", "StageFailed", f"{key} failed: {s.message or ''}", key))
    return events


def _succeeded_message(key: StageKey, record: StageRecord) -> str:
    return f"{key} succeeded: {json.dumps(record.metrics)}"[:1000]


def _refused(run: RunView, message: str, now: str, reason: str = Reason.INVALID_SPEC) -> Decision:
    """Nothing is created for a spec the operator will not run; status says why, once as an event."""
    status = invalid_status(message, generation=run.generation, previous=run.status, now=now, reason=reason)
    events = [] if run.status.get("message") == status["message"] else [Event("Warning", reason, message)]
    return Decision([], status, events)


def decide(
    run: RunView,
    jobs: list[JobView],
    pods: list[PodView],
    now: str | None = None,
    *,
    settings: Settings | None = None,
    capacity: bool = True,
    queues: Queues | None = None,
    failures: Mapping[str, CreateFailure] | None = None,
) -> Decision:
    """`capacity`: whether the operator's cap on concurrent stage Jobs lets this run start one now.
    `queues`: what Kueue says of the run's Jobs, when the operator watches it. `failures`: the latest
    `FailedCreate` Event of each Job (by uid): the apiserver refused its pods."""
    now = now or timestamp()
    settings = settings or Settings()
    if run.spec_bytes > MAX_SPEC_BYTES:
        message = f"spec: {run.spec_bytes} bytes of JSON, over the {MAX_SPEC_BYTES} this operator runs"
        return _refused(run, message, now)
    try:
        raw = json.loads(run.spec) if isinstance(run.spec, str) else run.spec
        spec = IterativeDPORunSpec.model_validate(raw)
    except ValidationError as err:
        return _refused(run, format_validation_error(err, prefix="spec.").strip().replace("\n  ", "; "), now)
    if settings.policy is not None and (denied := violations(spec, settings.policy)):
        return _refused(run, "; ".join(denied), now, Reason.POLICY_DENIED)
    previous = parse_previous(run.status)
    queues = queues or Queues()
    children = Children.of(run.uid, jobs, pods, queues, failures)
    records, actions = _records(spec, run, previous, children, queues, now)
    step = rules.next_step(spec, records)
    frozen = dict(previous.frozen)
    create: list[dict[str, Any]] = []
    problem: tuple[str, str] | None = None
    wants_capacity = False
    key = step.start
    if key is not None and key not in children.jobs:
        name = resources.job_name(run.name, key)
        if name in children.foreign:
            problem = (Reason.FOREIGN_CHILD, f"Job {name} belongs to another object; waiting for it to be deleted")
        elif not capacity:
            wants_capacity = True
            prior = records.get(key) or previous.record(key)
            records[key] = StageRecord(
                Phase.PENDING, message=WAITING_FOR_CAPACITY, attempts=prior.attempts, restarting=prior.restarting
            )
        else:
            try:
                create = _start(key, run, spec, records, previous, frozen, settings, now)
            except Denied as err:
                return _refused(run, str(err), now, Reason.POLICY_DENIED)

    spec = step.spec
    out_of_range = [j.name for k, j in children.jobs.items() if k.iteration > spec.iterations]
    at = status_current(spec, records)
    deferred = at is not None and frozen_specs.deferred(
        frozen.get(at.iteration, {}),
        frozen_specs.live_sections(spec),
        frozen_specs.started_stages(records, at.iteration, Phase.PENDING),
    )
    status = build_status(
        spec,
        records,
        resources.workspace(spec, run.owner),
        generation=run.generation,
        previous=previous,
        now=now,
        claim=resources.pvc_name(spec, run.name),
        frozen=frozen,
        problem=problem,
        deferred=deferred,
        early_stop=step.early_stop,
    )
    if run.retry is not None:
        status["retried"] = run.retry
    events = _stage_events(previous, records)
    if status["phase"] != previous.phase and status["phase"] in (Phase.SUCCEEDED, Phase.FAILED):
        kind = "Normal" if status["phase"] == Phase.SUCCEEDED else "Warning"
        events.append(Event(kind, f"Run{status['phase']}", status.get("message", "")))
    if deferred and not previous.spec_change_deferred:
        message = f"spec change applies from iteration {at.iteration + 1}: iteration {at.iteration} keeps its spec"
        events.append(Event("Normal", "SpecChangeDeferred", message))
    status["memoryPlan"] = memory.summary(spec, settings.gpu_memory)
    too_big = misfits(status["memoryPlan"])
    if too_big and too_big != misfits(previous.memory_plan):
        message = "estimated GPU memory exceeds the GPU: " + "; ".join(too_big)
        events.append(Event("Warning", "MemoryPlanDoesNotFit", f"{message} (idpo plan shows the estimate)"))
    return Decision(
        create,
        status,
        events,
        fail=actions.fail,
        delete=out_of_range,
        restart=actions.restart,
        requeue_after=actions.requeue_after,
        wants_capacity=wants_capacity,
    )


def misfits(plan_status: Mapping[str, Any] | None) -> list[str]:
    """The stages of a status memory plan whose estimate does not fit, as `stage (variant): N GB`."""
    stages = (plan_status or {}).get("stages", [])
    return [f"{s['stage']} ({s['variant']}): {s['estimateGB']} GB" for s in stages if s.get("fits") is False]
