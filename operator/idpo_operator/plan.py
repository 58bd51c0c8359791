"""What to run next: a pure function of the spec and of which stages have completed.

Both executors (the local runner and the Kubernetes operator) ask this module, so the order of
stages, the hand-off of checkpoints and every stage's config are decided in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from idpo_jobs import winrate
from idpo_jobs.config import (
    STAGE_ORDER,
    EvaluateConfig,
    GenerateConfig,
    RankConfig,
    Stage,
    StageConfig,
    TrackingConfig,
    TrainConfig,
    Workspace,
)

from idpo_operator.spec import IterativeDPORunSpec


@dataclass(frozen=True, order=True)
class StageKey:
    iteration: int
    stage: Stage

    def __str__(self) -> str:
        return f"iteration {self.iteration} {self.stage.value}"


BASE = 0  # the iteration number of the base model's evaluation


def iteration_stages(spec: IterativeDPORunSpec, iteration: int) -> list[Stage]:
    """Iteration 0 only evaluates the base model; iteration n generates, ranks, trains, evaluates."""
    evaluate = [Stage.EVALUATE] if spec.evaluation.enabled else []
    return evaluate if iteration == BASE else [*STAGE_ORDER, *evaluate]


def all_stages(spec: IterativeDPORunSpec) -> list[StageKey]:
    first = BASE if spec.evaluation.enabled else 1
    return [StageKey(i, s) for i in range(first, spec.iterations + 1) for s in iteration_stages(spec, i)]


def early_stop(spec: IterativeDPORunSpec, evaluations: dict[int, dict[str, Any]]) -> tuple[int, str] | None:
    """(the last iteration, why) when `evaluation.stopWhen` ends the run before `iterations`, given the
    evaluate metrics of the iterations evaluated so far (1, 2, ... in order)."""
    rule = spec.evaluation.stop_when if spec.evaluation.enabled else None
    history: list[dict[str, Any]] = []
    for i in range(1, spec.iterations):
        if i not in evaluations:
            return None
        history.append(evaluations[i])
        stop, why = winrate.should_stop(history, rule)
        if stop:
            return i, why
    return None


def truncated(spec: IterativeDPORunSpec, stop: tuple[int, str] | None) -> IterativeDPORunSpec:
    """The spec as far as it runs: an early stop makes its iteration the last."""
    return spec if stop is None else spec.model_copy(update={"iterations": stop[0]})


def policy_for(spec: IterativeDPORunSpec, workspace: Workspace, iteration: int) -> str:
    """The model iteration `iteration` starts from: the base, then each previous iteration's output."""
    return spec.model.name if iteration == 1 else workspace.checkpoint_uri(iteration - 1)


def input_of(key: StageKey) -> StageKey | None:
    """The stage whose parts `key` reads (and checks by digest)."""
    reads = {Stage.RANK: Stage.GENERATE, Stage.TRAIN: Stage.RANK}
    return StageKey(key.iteration, reads[key.stage]) if key.stage in reads else None


def tracking_config(
    spec: IterativeDPORunSpec,
    run: str,
    key: StageKey,
    reported: Mapping[StageKey, Mapping[str, Any]],
    namespace: str | None = None,
    uid: str | None = None,
) -> TrackingConfig | None:
    """What a stage gets of `spec.tracking`, with the MLflow runs earlier stages created (`reported`: each
    stage's metrics, where the creating stage put the ids); None when tracking is off."""
    if spec.tracking.mlflow is None and not spec.tracking.tensorboard:
        return None

    def found(name: str, iteration: int | None = None) -> str | None:
        ids = (m.get(name) for k, m in sorted(reported.items()) if iteration is None or k.iteration == iteration)
        return next((i for i in ids if isinstance(i, str)), None)

    return TrackingConfig(
        **spec.tracking.model_dump(),
        run=run,
        namespace=namespace,
        uid=uid,
        parent_run_id=found("mlflow_run_id"),
        iteration_run_id=found("mlflow_iteration_run_id", key.iteration),
    )


def stage_config(
    spec: IterativeDPORunSpec,
    run: str,
    workspace: Workspace,
    key: StageKey,
    input_digests: list[str] | None = None,
    tracking: TrackingConfig | None = None,
) -> StageConfig:
    """`input_digests`: the input stage's part digests (rank and train), so a rebuilt input is refused.
    `tracking`: `tracking_config`'s answer."""
    common: dict[str, Any] = {
        "run": run,
        "iteration": key.iteration,
        "workspace": str(workspace.root),
        "tracking": tracking,
    }
    if input_of(key) is not None:
        common["input_digests"] = input_digests
    i = key.iteration
    if key.stage is Stage.GENERATE:
        return GenerateConfig(
            **common,
            shards=spec.generation.shards,
            model=policy_for(spec, workspace, i),
            revision=spec.model.revision if i == 1 else None,
            chat_template=spec.model.chat_template,
            trust_remote_code=spec.model.trust_remote_code,
            prompts=spec.prompts,
            generation=spec.generation,
        )
    if key.stage is Stage.EVALUATE:
        return EvaluateConfig(
            **common,
            model=spec.model.name if i == BASE else workspace.checkpoint_uri(i),
            revision=spec.model.revision if i == BASE else None,
            chat_template=spec.model.chat_template,
            trust_remote_code=spec.model.trust_remote_code,
            prompts=spec.prompts,
            iterations=spec.iterations,
            generation=spec.generation,
            ranking=spec.ranking,
            evaluation=spec.evaluation,
            base_iteration=None if i == BASE else BASE,
            previous_iteration=None if i == BASE else i - 1,
        )
    if key.stage is Stage.RANK:
        return RankConfig(
            **common,
            shards=spec.ranking.shards,
            input_dir=str(workspace.stage_dir(i, Stage.GENERATE)),
            input_shards=spec.generation.shards,
            ranking=spec.ranking,
        )
    initial = spec.training.reference_policy == "initial"
    return TrainConfig(
        **common,
        model=policy_for(spec, workspace, i),
        reference_model=spec.model.name if initial else policy_for(spec, workspace, i),
        revision=spec.model.revision if i == 1 else None,
        chat_template=spec.model.chat_template,
        trust_remote_code=spec.model.trust_remote_code,
        input_dir=str(workspace.stage_dir(i, Stage.RANK)),
        input_shards=spec.ranking.shards,
        training=spec.training,
    )


def pending(spec: IterativeDPORunSpec, completed: Iterable[StageKey]) -> list[StageKey]:
    """Stages not yet completed, in run order.

    Stages are strictly sequential: a stage after a gap is pending even if its output exists,
    because its inputs (the gap's outputs) may have been rebuilt.
    """
    done = set(completed)
    stages = all_stages(spec)
    for n, key in enumerate(stages):
        if key not in done:
            return stages[n:]
    return []


def next_stage(spec: IterativeDPORunSpec, completed: Iterable[StageKey]) -> StageKey | None:
    todo = pending(spec, completed)
    return todo[0] if todo else None
