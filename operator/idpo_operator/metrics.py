"""Prometheus metrics of the operator, updated from each reconcile's decision.

idpo_runs{phase}                  runs this operator reconciled, by current phase
idpo_stage_duration_seconds{stage} stage wall time (Job start to completion), on success
idpo_stage_retries_total{stage}   failed attempts that were retried
idpo_reconciles_total             reconciles run
idpo_reconcile_errors_total       reconciles that raised (the handler is retried by kopf)
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from idpo_operator.reconcile import Event

RUNS = Gauge("idpo_runs", "Runs reconciled by this operator, by phase", ["phase"])
STAGE_SECONDS = Histogram(
    "idpo_stage_duration_seconds",
    "Stage wall time on success",
    ["stage"],
    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400),
)
RETRIES = Counter("idpo_stage_retries_total", "Failed stage attempts that were retried", ["stage"])
RECONCILES = Counter("idpo_reconciles_total", "Reconciles run")
ERRORS = Counter("idpo_reconcile_errors_total", "Reconciles that raised")

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def serve(port: int) -> None:
    start_http_server(port)


def _seconds(stage: dict[str, Any]) -> float | None:
    start, end = stage.get("startTime"), stage.get("completionTime")
    if not start or not end:
        return None
    parse = dt.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def record(run: tuple[str, str], status: dict[str, Any], events: list[Event]) -> None:
    """Account one reconcile's outcome: the run's phase and what its events say happened."""
    RECONCILES.inc()
    with _lock:
        _phases[run] = status.get("phase", "Pending")
        _publish_phases()
    stages = {(it["iteration"], name): s for it in status.get("iterations", []) for name, s in it["stages"].items()}
    for event in events:
        if event.key is None:
            continue
        stage = event.key.stage.value
        if event.reason == "StageRetrying":
            RETRIES.labels(stage=stage).inc()
        elif event.reason == "StageSucceeded":
            seconds = _seconds(stages.get((event.key.iteration, stage), {}))
            if seconds is not None:
                STAGE_SECONDS.labels(stage=stage).observe(seconds)


def forget(run: tuple[str, str]) -> None:
    """A deleted run leaves the phase gauge."""
    with _lock:
        _phases.pop(run, None)
        _publish_phases()


def _publish_phases() -> None:
    counts: dict[str, int] = {}
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase in ("Pending", "Running", "Succeeded", "Failed", "Suspended"):
        RUNS.labels(phase=phase).set(counts.get(phase, 0))
