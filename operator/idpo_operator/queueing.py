"""Stages under Kueue (docs/kueue.md): what a stage Job's admission says, for status and events.

With `runtime.queueName`, every stage Job carries Kueue's queue label; Kueue's webhook creates it
suspended, and Kueue admits it (unsuspends it) when its ClusterQueue has quota, or suspends it again to
preempt it. A suspended Job has no pods: it is queued, not running, and its start deadline has not begun
(the deadline runs from a pod's creation). A preempted stage is not a failed attempt: Kueue deletes its
pods and the Job controller counts no failure; it goes on, from its last checkpoint, when re-admitted.

Kueue says why a Job waits on the Job's Workload, not on the Job. The operator watches Workloads that
carry the run label (Kueue copies it when configured with `integrations.labelKeysToCopy: [idpo.dev/run]`)
and LocalQueues (to name the ClusterQueue); without them, status says less, and the same transitions
are still told from the Job alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

QUEUED, ADMITTED, PREEMPTED = "Queued", "Admitted", "Preempted"  # StageRecord.admission
MAX_REASON = 300


@dataclass(frozen=True)
class WorkloadView:
    """A Kueue Workload, as far as status needs it."""

    job_uid: str | None
    local_queue: str | None = None
    cluster_queue: str | None = None  # while admitted
    conditions: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)  # type -> (status, reason, message)

    def condition(self, kind: str) -> tuple[str, str, str] | None:
        return self.conditions.get(kind)


def workload_view(workload: Mapping[str, Any]) -> WorkloadView:
    meta, spec, status = workload.get("metadata") or {}, workload.get("spec") or {}, workload.get("status") or {}
    owner = next((r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
    conditions = {
        c["type"]: (str(c.get("status", "")), str(c.get("reason", "")), str(c.get("message", "")))
        for c in status.get("conditions") or []
        if isinstance(c, Mapping) and isinstance(c.get("type"), str)
    }
    return WorkloadView(
        job_uid=owner,
        local_queue=spec.get("queueName"),
        cluster_queue=(status.get("admission") or {}).get("clusterQueue"),
        conditions=conditions,
    )


def admission(
    queue: str | None,
    suspended: bool,
    before: str | None,
    workload: WorkloadView | None,
    cluster_queues: Mapping[str, str],
) -> tuple[str | None, str | None]:
    """(admission state, status message) of a stage Job in `queue` (its LocalQueue; None: not queued).
    `before`: the state the last status recorded; `cluster_queues`: LocalQueue -> ClusterQueue."""
    if queue is None:
        return None, None
    if not suspended:
        return ADMITTED, None
    evicted = workload.condition("Evicted") if workload else None
    if before in (ADMITTED, PREEMPTED) or (evicted is not None and evicted[0] == "True"):
        why = f" ({evicted[2]})" if evicted and evicted[0] == "True" and evicted[2] else ""
        return PREEMPTED, f"Preempted: waiting for re-admission{why}"[:MAX_REASON]
    cluster_queue = cluster_queues.get(queue)
    where = f"ClusterQueue {cluster_queue} (LocalQueue {queue})" if cluster_queue else f"LocalQueue {queue}"
    reserved = workload.condition("QuotaReserved") if workload else None
    reason = reserved[2] if reserved and reserved[0] != "True" and reserved[2] else "waiting for admission"
    return QUEUED, f"Pending: queued in {where}: {reason}"[:MAX_REASON]
