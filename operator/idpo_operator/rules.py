"""What happens next in a run: one pure function, the same for both executors.

`next_step(spec, records)` reads the stages' records (from Jobs and status on a cluster, from the
workspace and the stage processes locally) and says which stage runs now, or why the run stops:
failed, suspended, stopped early by `evaluation.stopWhen`, or done. The operator and `idpo run` act
on its answer; neither decides these rules on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from idpo_jobs.config import Stage

from idpo_operator import plan
from idpo_operator.plan import StageKey
from idpo_operator.spec import IterativeDPORunSpec
from idpo_operator.status import Phase, StageRecord


class Stop(enum.StrEnum):
    FAILED = "failed"  # a stage failed (after its retries): nothing more starts
    SUSPENDED = "suspended"  # spec.suspend: no new stage starts; running ones finish
    EARLY_STOPPED = "early-stopped"  # evaluation.stopWhen ended the run before `iterations`
    DONE = "done"  # every stage of every iteration succeeded


@dataclass(frozen=True)
class Step:
    spec: IterativeDPORunSpec  # the spec as far as the run goes (an early stop makes its iteration the last)
    start: StageKey | None = None  # the stage to run now (or to keep running)
    stop: Stop | None = None
    failed: StageKey | None = None
    early_stop: tuple[int, str] | None = None  # (last iteration, why)


def next_step(spec: IterativeDPORunSpec, records: Mapping[StageKey, StageRecord]) -> Step:
    evaluations = {
        k.iteration: r.metrics for k, r in records.items() if k.stage is Stage.EVALUATE and r.phase == Phase.SUCCEEDED
    }
    stop = plan.early_stop(spec, evaluations)
    spec = plan.truncated(spec, stop)
    keys = plan.all_stages(spec)
    failed = next((k for k in keys if (r := records.get(k)) is not None and r.phase == Phase.FAILED), None)
    if failed is not None:
        return Step(spec, stop=Stop.FAILED, failed=failed, early_stop=stop)
    key = plan.next_stage(spec, [k for k, r in records.items() if r.phase == Phase.SUCCEEDED])
    if key is None:
        return Step(spec, stop=Stop.EARLY_STOPPED if stop else Stop.DONE, early_stop=stop)
    if spec.suspend:
        return Step(spec, stop=Stop.SUSPENDED, early_stop=stop)
    return Step(spec, start=key, early_stop=stop)
