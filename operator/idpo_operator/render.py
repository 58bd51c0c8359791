"""What `idpo plan -o yaml` shows without a cluster: the objects the operator would create for
iteration 1, as `helm template` does, for kubeconform or a policy engine."""

from __future__ import annotations

from typing import Any

from idpo_jobs.config import STAGE_ORDER

from idpo_operator import plan, resources
from idpo_operator.plan import StageKey
from idpo_operator.spec import Manifest

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"  # the run's uid, unknown before it exists


def iteration_objects(manifest: Manifest, stage_image: str) -> list[dict[str, Any]]:
    spec = manifest.spec
    owner = resources.Owner(manifest.metadata.name, manifest.metadata.namespace or "default", PLACEHOLDER_UID)
    workspace = resources.workspace(spec, owner)
    objects = [o for o in (resources.build_pvc(spec, owner),) if o]
    for stage in STAGE_ORDER:
        key = StageKey(1, stage)
        config = plan.stage_config(spec, owner.name, workspace, key)
        objects += resources.stage_objects(resources.Launch(spec, owner, key, config, stage_image))
    return objects
