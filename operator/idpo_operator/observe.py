"""What the operator sees of a run's children, parsed once, as each watch event arrives.

The kopf indexes (handlers.py) hold `JobView`s and `PodView`s, not raw objects: a pod's termination
message is parsed when its event arrives rather than on every reconcile, and the caches keep only what
decisions read. `job_record` turns one Job and its pods into its stage's `StageRecord`.

A stage's summary (its termination message) is untrusted input: whatever a stage process writes there
ends up here. It is parsed defensively and bounded; anything malformed fails the stage with a message
that says what was wrong, and NaN or infinite metrics become null with a warning (the apiserver refuses
NaN in JSON, so one diverged loss would otherwise make the run's status unwritable).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from idpo_jobs.config import MAX_AXES, MAX_AXIS_NAME, MAX_JUDGES, Stage

from idpo_operator import resources
from idpo_operator.plan import StageKey
from idpo_operator.status import (
    MAX_METRICS,
    MAX_TEXT,
    Phase,
    StageRecord,
    cut_note,
    digests_of,
    merge_metrics,
    warned,
)

CONTROLLER_UID = "batch.kubernetes.io/controller-uid"  # the Job controller's label on its pods
MAX_LIST = 64  # items of a list metric (e.g. rank_steps: one per process)
AXES = "axes"  # the metrics that are maps: per-axis figures, {axis: {metric: value}} (docs/ranking.md), and
JUDGES = "judges"  # per LLM judge, {judge: {metric: value}} (docs/evaluation.md)
BLOCKS = {AXES: (MAX_AXES, MAX_AXIS_NAME), JUDGES: (MAX_JUDGES, MAX_AXIS_NAME)}  # entries at most, name length
# Waiting reasons that no amount of waiting fixes: the stage fails at once, not at its start deadline.
FATAL_WAITING = frozenset({"InvalidImageName", "ErrImageNeverPull"})
# Why a gang restarts (StageRecord.restarting): a pod failed (an attempt), or was disrupted (not one).
POD_FAILED, DISRUPTED = "PodFailed", "DisruptionTarget"
# The Job controller's Event (its only report) when the apiserver refuses a Job's pod: Pod Security
# admission, a ResourceQuota, a webhook or admission policy, a missing ServiceAccount, a LimitRange.
# The Job itself shows nothing: no pod, no condition, `active: 0`.
FAILED_CREATE = "FailedCreate"
FAILED_CREATE_SELECTOR = f"involvedObject.kind=Job,reason={FAILED_CREATE}"  # the Events watch's field selector


@dataclass(frozen=True)
class Summary:
    """A stage process's report of one part (a shard, or the whole stage), as far as it was sound."""

    shard: int = 0
    shards: int = 1
    metrics: Mapping[str, Any] = field(default_factory=dict)
    digest: str | None = None
    error: str | None = None
    reason: str | None = None  # a failure the stage named, e.g. contract.VOLUME_FULL
    warnings: tuple[str, ...] = ()
    log_tail: bool = False  # not JSON: the log's tail (`FallbackToLogsOnError`), the stage died first


@dataclass(frozen=True)
class PodView:
    name: str
    job_uid: str | None
    key: StageKey | None
    phase: str | None
    created: str | None = None
    waiting: tuple[str, str] | None = None  # (reason, message) of a pod that has not started
    summary: Summary | None = None
    malformed: str | None = None  # why its termination message could not be used
    disrupted: bool = False  # evicted, preempted, drained: the pod's DisruptionTarget condition
    deleting: bool = False  # deleted (a suspended Job's pods: Kueue's preemption): not a failed attempt


@dataclass(frozen=True)
class CreateFailure:
    """One `FailedCreate` Event of a Job: the apiserver's answer, and when it was first and last given."""

    job_uid: str
    message: str
    first: str | None = None  # RFC 3339 to the second, as Job and Pod timestamps are: comparable as text
    last: str | None = None


@dataclass(frozen=True)
class Condition:
    reason: str = ""
    message: str = ""
    since: str | None = None


@dataclass(frozen=True)
class JobView:
    name: str
    uid: str | None
    key: StageKey | None
    controller: str | None = None  # the uid of its controlling owner
    created: str | None = None  # its creationTimestamp
    attempt: int = 1  # ANNOTATION_ATTEMPT: the stage's attempt this Job started at
    gang: bool = False  # a train stage on several nodes: its pods fail and restart together
    failure: str | None = None  # ANNOTATION_FAILURE: the operator's verdict on a Job that cannot start
    conditions: Mapping[str, Condition] = field(default_factory=dict)  # those with status True
    failed: int = 0
    completions: int = 1
    start_time: str | None = None
    completion_time: str | None = None
    deleting: bool = False
    queue: str | None = None  # its Kueue LocalQueue (the queue-name label)
    suspended: bool = False  # spec.suspend: Kueue holds it (queued, or preempted)

    @property
    def done(self) -> bool:
        return bool({"Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"} & set(self.conditions))


def key_of(labels: Mapping[str, str]) -> StageKey | None:
    try:
        return StageKey(int(labels[resources.LABEL_ITERATION]), Stage(labels[resources.LABEL_STAGE]))
    except (KeyError, ValueError):
        return None


def _true_conditions(status: Mapping[str, Any]) -> dict[str, Condition]:
    out = {}
    for c in status.get("conditions") or []:
        if isinstance(c, Mapping) and c.get("status") == "True" and isinstance(c.get("type"), str):
            out[c["type"]] = Condition(str(c.get("reason", "")), str(c.get("message", "")), c.get("lastTransitionTime"))
    return out


def job_view(job: Mapping[str, Any]) -> JobView:
    meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    annotations = meta.get("annotations") or {}
    controller = next((r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
    attempt = annotations.get(resources.ANNOTATION_ATTEMPT)
    return JobView(
        name=meta["name"],
        uid=meta.get("uid"),
        key=key_of(meta.get("labels") or {}),
        controller=controller,
        created=meta.get("creationTimestamp"),
        attempt=int(attempt) if attempt and attempt.isdigit() else 1,
        gang=bool(((spec.get("template") or {}).get("spec") or {}).get("subdomain")),
        failure=annotations.get(resources.ANNOTATION_FAILURE),
        conditions=_true_conditions(status),
        failed=int(status.get("failed") or 0),
        completions=int(spec.get("completions") or 1),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        deleting=bool(meta.get("deletionTimestamp")),
        queue=(meta.get("labels") or {}).get(resources.LABEL_QUEUE),
        suspended=bool(spec.get("suspend")),
    )


def _second(value: Any) -> str | None:
    """An Event's timestamp (a MicroTime in `eventTime`) to the second, as Jobs and Pods give theirs."""
    if not isinstance(value, str) or len(value) < 19:
        return None
    return f"{value[:19]}Z"


def create_failure(event: Mapping[str, Any]) -> CreateFailure | None:
    """A `FailedCreate` Event about a Job, as the cache keeps it; None for any other Event. Core v1 Events
    (the Job controller's recorder) carry first and last timestamps and a count; events.k8s.io ones an
    eventTime and a series."""
    involved = event.get("involvedObject") or event.get("regarding") or {}
    if involved.get("kind") != "Job" or event.get("reason") != FAILED_CREATE or not involved.get("uid"):
        return None
    series, created = event.get("series") or {}, (event.get("metadata") or {}).get("creationTimestamp")
    first = event.get("firstTimestamp") or event.get("eventTime") or created
    last = event.get("lastTimestamp") or series.get("lastObservedTime") or event.get("eventTime") or created
    message = str(event.get("message") or event.get("note") or "")
    return CreateFailure(str(involved["uid"]), message[:MAX_TEXT], _second(first), _second(last))


def refused(job: JobView, pods: list[PodView], failure: CreateFailure | None) -> tuple[str, str | None] | None:
    """(the apiserver's message, since when the Job has had no pod to run) when the Job's latest attempt
    to create a pod was refused: a refusal since it started (or was admitted by Kueue, which restarts its
    clock) and since its newest pod. The time is None while another of its pods is active: the stage
    runs, slowly (a quota that fits some of its pods), and waits without a deadline."""
    if failure is None or failure.last is None or job.suspended or job.done or job.deleting:
        return None
    started = job.start_time or job.created
    newest = max((p.created for p in pods if p.created), default=None)
    if any(t is not None and failure.last < t for t in (started, newest)):
        return None  # a refusal of an earlier admission, or one a pod created since has overcome
    if any(p.phase in (None, "Pending", "Running") and not p.deleting for p in pods):
        return failure.message, None
    return failure.message, max((t for t in (started, newest, failure.first) if t), default=failure.last)


def waiting(status: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why a pod has not started: (reason, message), from its containers or the scheduler."""
    if status.get("phase") not in (None, "Pending"):
        return None
    for cs in status.get("containerStatuses") or []:
        wait = (cs.get("state") or {}).get("waiting")
        if wait and wait.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return str(wait["reason"]), str(wait.get("message", ""))
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return str(cond.get("reason", "Unschedulable")), str(cond.get("message", ""))
    return None


def _blocks(block: str, value: Any, warnings: list[str]) -> dict[str, dict[str, Any]]:
    """Per-axis or per-judge figures ({name: {metric: value}}), bounded as a summary's metrics are."""
    most, longest = BLOCKS[block]
    if not isinstance(value, dict) or len(value) > most:
        raise ValueError(f"metric {block!r} is not a map of at most {most} {block}")
    out = {}
    for key, figures in value.items():
        if not isinstance(figures, dict) or len(figures) > MAX_METRICS:
            raise ValueError(f"metric {block!r} has {str(key)[:40]!r}, not a map of at most {MAX_METRICS} metrics")
        name = str(key)[:longest]
        out[name] = {str(k)[:100]: _metric(f"{block}.{name}.{k}", v, warnings) for k, v in figures.items()}
    return out


def _metric(name: str, value: Any, warnings: list[str]) -> Any:
    """A metric value as status may hold it; raises ValueError for what no metric can be."""
    if name in BLOCKS:
        return _blocks(name, value, warnings)
    if isinstance(value, float) and not math.isfinite(value):
        warnings.append(f"metric {name} was {value}; recorded as null")
        return None
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, list) and len(value) <= MAX_LIST:
        return [_metric(name, v, warnings) for v in value if not isinstance(v, list | dict)]
    raise ValueError(f"metric {name!r} is a {type(value).__name__}, not a number, string or list")


def parse_summary(text: str) -> Summary:
    """A termination message as a Summary; ValueError says what is wrong with it.

    Not JSON at all is the log tail (`FallbackToLogsOnError`: the stage died before writing one), and
    stands as the error; JSON of the wrong shape is a broken stage and is reported as malformed.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return Summary(error=text.strip()[-MAX_TEXT:], log_tail=True)
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__} {text[:60]!r}")
    warnings: list[str] = []
    shard, shards = doc.get("shard", 0), doc.get("shards", 1)
    if isinstance(shard, bool) or not isinstance(shard, int) or isinstance(shards, bool) or not isinstance(shards, int):
        raise ValueError(f"shard {str(shard)[:20]!r} of {str(shards)[:20]!r} is not a pair of integers")
    metrics = doc.get("metrics", {})
    if metrics is None:
        metrics = {}
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics is a {type(metrics).__name__}, not an object")
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"{len(metrics)} metrics, more than {MAX_METRICS}")
    clean = {str(k)[:100]: _metric(str(k), v, warnings) for k, v in metrics.items()}
    said = doc.get("warnings")  # what the stage itself warns of (a tracking server away)
    warnings += [str(w)[:200] for w in (said if isinstance(said, list) else [])[:5]]
    digest, error, reason = doc.get("digest"), doc.get("error"), doc.get("reason")
    if digest is not None and (not isinstance(digest, str) or not digest.isalnum() or len(digest) > 64):
        raise ValueError(f"digest {str(digest)[:70]!r} is not a short hex string")
    return Summary(
        shard=shard,
        shards=shards,
        metrics=clean,
        digest=digest,
        error=str(error)[-MAX_TEXT:] if error else None,
        reason=reason if isinstance(reason, str) and reason.isalnum() and len(reason) <= 40 else None,
        warnings=tuple(warnings),
    )


def pod_view(pod: Mapping[str, Any]) -> PodView:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    summary, malformed = None, None
    for cs in status.get("containerStatuses") or []:
        message = ((cs.get("state") or {}).get("terminated") or {}).get("message")
        if message:
            try:
                summary = parse_summary(message)
            except ValueError as err:
                malformed = f"malformed stage summary: {err}"
    return PodView(
        name=meta.get("name", ""),
        job_uid=labels.get(CONTROLLER_UID),
        key=key_of(labels),
        phase=status.get("phase"),
        created=meta.get("creationTimestamp"),
        waiting=waiting(status),
        summary=summary,
        malformed=malformed,
        disrupted=any(c.get("type") == DISRUPTED and c.get("status") == "True" for c in status.get("conditions") or []),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def gang_failure(job: JobView, pods: list[PodView]) -> str | None:
    """Why a failed gang Job may be re-created (POD_FAILED or DISRUPTED); None for any other Job,
    and for a gang that must not run again: bad input, its deadline, the operator's own verdict."""
    if not job.gang or job.failure is not None:
        return None
    cond = job.conditions.get("Failed") or job.conditions.get("FailureTarget") or Condition()
    # A disrupted pod is counted only once it has terminated, and its peers, failing at their next
    # collective, are often counted first: the pods' conditions tell it, not the Job's reason.
    disrupted = any(p.disrupted for p in pods)
    if cond.reason == "BackoffLimitExceeded":
        return DISRUPTED if disrupted else POD_FAILED
    # The Job controller's message names the rule that matched: "Pod ns/x has condition DisruptionTarget ...".
    if cond.reason == "PodFailurePolicy" and (disrupted or f"condition {DISRUPTED}" in cond.message):
        return DISRUPTED
    return None


def _succeeded(job: JobView, pods: list[PodView], record: StageRecord) -> StageRecord:
    """A complete Job's record, or a failed one when its pods' summaries cannot be trusted."""
    stage = job.key.stage if job.key else Stage.GENERATE
    problems = [p.malformed for p in pods if p.malformed]
    problems += [
        f"malformed stage summary: not JSON: {p.summary.error}" for p in pods if p.summary and p.summary.log_tail
    ]
    summaries = sorted(
        (p.summary for p in pods if p.summary is not None and not p.summary.log_tail), key=lambda s: s.shard
    )  # in shard order: a value that only the first shard's counts is the same at every reconcile
    shards = job.completions if stage in (Stage.GENERATE, Stage.RANK) else 1
    for s in summaries:
        if not 0 <= s.shard < shards or s.shards != shards:
            problems.append(f"malformed stage summary: shard {s.shard} of {s.shards}, but the Job has {shards}")
    if problems:
        record.phase, record.message = Phase.FAILED, problems[0][:MAX_TEXT]
        return record
    parts = [dict(s.metrics) for s in summaries]
    try:
        record.metrics = merge_metrics(stage, parts) if summaries else {}
    except (TypeError, ValueError) as err:
        record.phase, record.message = Phase.FAILED, f"malformed stage summary: {err}"[:MAX_TEXT]
        return record
    record.phase = Phase.SUCCEEDED
    record.digests = digests_of([{"shard": s.shard, "shards": s.shards, "digest": s.digest} for s in summaries])
    record.message = warned([{"warnings": list(s.warnings)} for s in summaries], cut_note(parts, record.metrics))
    return record


def job_record(job: JobView, pods: list[PodView], failure: CreateFailure | None = None) -> StageRecord:
    """The stage's record as its Job (and the Job's pods, and its latest `FailedCreate` Event) show it now."""
    record = StageRecord(job_name=job.name, start_time=job.start_time, completion_time=job.completion_time)
    done = job.conditions
    if "Complete" in done:
        # Not SuccessCriteriaMet, which comes a moment before: only with Complete are the Job's counts final
        # (its failed pods may be counted last) and its completionTime set; a succeeded record is final.
        record.completion_time = record.completion_time or done["Complete"].since
        record = _succeeded(job, pods, record)
    elif "Failed" in done or "FailureTarget" in done:
        cond = done.get("Failed") or done["FailureTarget"]
        errors = [p.summary.error for p in pods if p.summary is not None and p.summary.error]
        errors += [p.malformed for p in pods if p.malformed]
        record.phase = Phase.FAILED
        record.reason = next((p.summary.reason for p in pods if p.summary and p.summary.reason), None)
        record.message = (job.failure or (errors[-1] if errors else f"{cond.reason or 'Failed'}: {cond.message}"))[
            :MAX_TEXT
        ]
        record.completion_time = record.completion_time or cond.since
    else:
        record.phase = Phase.RUNNING
        stuck = [p for p in pods if p.waiting]
        if stuck:
            reason, message = stuck[0].waiting  # type: ignore[misc]
            record.message = f"Pending: {reason}: {message}"[:MAX_TEXT]
            record.waiting_since = stuck[0].created
            record.waiting_reason = reason
        elif found := refused(job, pods, failure):
            record.message = f"Pending: {FAILED_CREATE}: {found[0]}"[:MAX_TEXT]
            if found[1] is not None:  # no pod at all: the start deadline counts
                record.waiting_since, record.waiting_reason = found[1], FAILED_CREATE
    # A gang's Job fails at its first failed pod and is re-created whole: its attempt is the Job's. Any
    # other Job retries its shards itself; each failed pod was an attempt (a failed Job: its last one).
    # The Job counts a failed pod only once it has finalized it: the pods themselves say so sooner.
    failed = "Failed" in done or "FailureTarget" in done
    tries = max(job.failed, sum(p.phase == "Failed" and not (p.disrupted or p.deleting) for p in pods))
    tries += 0 if failed else 1
    record.attempts = job.attempt if job.gang else job.attempt - 1 + max(tries, 1)
    return record
