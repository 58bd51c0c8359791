"""What `idpo plan` shows without a cluster: the objects the operator would create for iteration 1
(as `helm template` does, for kubeconform or a policy engine), and which memory estimates apply."""

from __future__ import annotations

from typing import Any

from idpo_jobs.config import STAGE_ORDER

from idpo_operator import plan, resources
from idpo_operator.memory import MemoryPlan, StageMemory
from idpo_operator.plan import StageKey
from idpo_operator.spec import IterativeDPORunSpec, Manifest

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"  # the run's uid, unknown before it exists


def iteration_objects(manifest: Manifest, stage_image: str) -> list[dict[str, Any]]:
    spec = manifest.spec
    owner = resources.Owner(manifest.metadata.name, manifest.metadata.namespace or "default", PLACEHOLDER_UID)
    workspace = resources.workspace(spec, owner)
    objects = [o for o in (resources.build_pvc(spec, owner),) if o]
    for stage in STAGE_ORDER:
        key = StageKey(1, stage)
        config = plan.stage_config(spec, owner.name, workspace, key)
        objects += [
            resources.build_config_map(owner, key, config),
            resources.build_job(spec, owner, key, config, stage_image),
        ]
    return objects


def chosen_stages(spec: IterativeDPORunSpec, memory: MemoryPlan) -> list[StageMemory]:
    """The estimates for what will run: every stage, train under the spec's strategy only."""
    chosen = spec.training.distributed.strategy
    return [s for s in memory.stages if s.stage != "train" or s.variant.startswith(chosen)]
