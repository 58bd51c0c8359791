"""Frozen iteration specs: the spec-editing contract (docs/spec-editing.md) as pure functions.

Each stage freezes the spec sections that shape it when it starts, for its iteration; a later edit of
a frozen section applies from the next iteration. Status stores each distinct set of sections once,
by digest (`status.frozenSpecs`), and each iteration names its digest (`iterations[n].specDigest`): a
long run with a large chat template keeps a small status.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Mapping
from typing import Any

from idpo_jobs.config import STAGE_ORDER, Stage
from pydantic import BaseModel

from idpo_operator.plan import StageKey
from idpo_operator.spec import IterativeDPORunSpec

Sections = dict[str, Any]
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
ORDER = (*STAGE_ORDER, Stage.EVALUATE)


def _with_nulls(section: Mapping[str, Any], model: type[BaseModel]) -> dict[str, Any]:
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


def _read_sections(sections: Any) -> Sections | None:
    if not isinstance(sections, Mapping):
        return None
    fields = IterativeDPORunSpec.model_fields
    return {
        name: _with_nulls(section, fields[name].annotation)  # type: ignore[arg-type]
        for name, section in sections.items()
        if name in FROZEN_SECTIONS and isinstance(section, Mapping)
    }


def read(status: Mapping[str, Any]) -> dict[int, Sections]:
    """Each started iteration's frozen sections, from a status (as the apiserver stored it)."""
    stored = status.get("frozenSpecs")
    stored = stored if isinstance(stored, Mapping) else {}
    out: dict[int, Sections] = {}
    for it in status.get("iterations") if isinstance(status.get("iterations"), list) else []:
        if not isinstance(it, Mapping) or not isinstance(it.get("iteration"), int):
            continue
        # `spec`: a status written before specs were stored once (an operator upgraded mid-run).
        sections = _read_sections(stored.get(it.get("specDigest")) or it.get("spec"))
        if sections is not None:
            out[it["iteration"]] = sections
    return out


def stored(value: Any) -> Any:
    """Sections as the apiserver returns them: no null fields (status is written by merge patch), and
    whole floats as integers (it decodes JSON numbers and encodes 1.0 as 1)."""
    if isinstance(value, Mapping):
        return {k: stored(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [stored(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def digests(status: Mapping[str, Any]) -> dict[int, str]:
    """Each iteration's specDigest, whether or not status still holds its sections."""
    iterations = status.get("iterations")
    return {
        it["iteration"]: it["specDigest"]
        for it in (iterations if isinstance(iterations, list) else [])
        if isinstance(it, Mapping) and isinstance(it.get("iteration"), int) and isinstance(it.get("specDigest"), str)
    }


def digest(sections: Sections) -> str:
    """The same digest for sections as written and as read back."""
    return hashlib.sha256(json.dumps(stored(sections), sort_keys=True).encode()).hexdigest()[:12]


def write(frozen: Mapping[int, Sections]) -> tuple[dict[int, str], dict[str, Sections]]:
    """(iteration -> digest, digest -> sections): what status stores, each distinct spec once."""
    digests = {i: digest(s) for i, s in frozen.items()}
    return digests, {digests[i]: stored(s) for i, s in frozen.items()}


def live_sections(spec: IterativeDPORunSpec) -> Sections:
    wire = spec.to_wire()
    return {name: {k: v for k, v in wire[name].items() if k != "resources"} for name in FROZEN_SECTIONS}


def spec_for(spec: IterativeDPORunSpec, frozen: Sections | None) -> IterativeDPORunSpec:
    """The spec an iteration runs with: its frozen sections over the live spec (live `resources`)."""
    if not frozen:
        return spec
    wire = spec.to_wire()
    for name, section in frozen.items():
        wire[name] = {**section, **({"resources": wire[name]["resources"]} if "resources" in wire[name] else {})}
    return IterativeDPORunSpec.model_validate(wire)


def refreeze(frozen: Sections, live: Sections, starting: Stage) -> Sections:
    """Keep the sections of the stages before `starting`; take the rest from the live spec."""
    kept = {name for stage in ORDER[: ORDER.index(starting)] for name in STAGE_SECTIONS[stage]}
    return {name: frozen[name] if name in kept and name in frozen else live[name] for name in FROZEN_SECTIONS}


def deferred(frozen: Sections, live: Sections, started: list[Stage]) -> bool:
    """Whether the live spec changed a section that one of the iteration's `started` stages froze."""
    return any(frozen.get(name) not in (None, live[name]) for s in started for name in STAGE_SECTIONS[s])


def started_stages(records: Mapping[StageKey, Any], iteration: int, pending: str) -> list[Stage]:
    """The stages of `iteration` whose record is not `pending` (they froze their sections)."""
    return [s for s in ORDER if (r := records.get(StageKey(iteration, s))) is not None and r.phase != pending]
