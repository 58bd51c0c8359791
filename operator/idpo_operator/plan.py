"""What to run next: a pure function of the spec and of which stages have completed.

Both executors (the local runner and the Kubernetes operator) ask this module, so the order of
stages, the hand-off of checkpoints and every stage's config are decided in one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from idpo_jobs.config import (
    STAGE_ORDER,
    GenerateConfig,
    RankConfig,
    Stage,
    StageConfig,
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


def all_stages(spec: IterativeDPORunSpec) -> list[StageKey]:
    return [StageKey(i, s) for i in range(1, spec.iterations + 1) for s in STAGE_ORDER]


def policy_for(spec: IterativeDPORunSpec, workspace: Workspace, iteration: int) -> str:
    """The model iteration `iteration` starts from: the base, then each previous iteration's output."""
    return spec.model.name if iteration == 1 else workspace.checkpoint_uri(iteration - 1)


def stage_config(spec: IterativeDPORunSpec, run: str, workspace: Workspace, key: StageKey) -> StageConfig:
    common = {"run": run, "iteration": key.iteration, "workspace": str(workspace.root)}
    i = key.iteration
    if key.stage is Stage.GENERATE:
        return GenerateConfig(
            **common,
            shards=spec.generation.shards,
            model=policy_for(spec, workspace, i),
            revision=spec.model.revision if i == 1 else None,
            chat_template=spec.model.chat_template,
            prompts=spec.prompts,
            generation=spec.generation,
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
