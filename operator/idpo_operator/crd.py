"""The CustomResourceDefinition, generated from the spec models (the only source of truth).

    idpo crd > crds/idpo.dev_iterativedporuns.yaml     # a test fails when the file is stale

pydantic's JSON Schema is converted to the structural OpenAPI v3 subset Kubernetes accepts: refs
inlined, `X | None` as `nullable`, exclusive bounds in OpenAPI 3.0 form, free-form maps marked
`x-kubernetes-preserve-unknown-fields`, quantities as int-or-string, a name-or-list as an untyped value.
Cross-field rules that the pydantic validators enforce locally are stated again as CEL
(`x-kubernetes-validations`), declared on the models themselves through `CEL_RULES` below.
"""

from __future__ import annotations

from typing import Any

import yaml
from idpo_jobs.config import PVC_PATH_RULE

from idpo_operator.spec import GROUP, KIND, MAX_ENV_VALUES, PLURAL, VERSION, IterativeDPORunSpec

SHORT_NAMES = ["idpo"]
CATEGORIES = ["idpo", "ml"]


# CEL rules by model title (the pydantic class name). Each mirrors a pydantic validator, or adds
# what only the apiserver can check: immutability across updates (transition rules on oldSelf).
def _on_the_claim(field: str, nullable: bool = False) -> dict[str, str]:
    value = f"self.{field}"
    rule = PVC_PATH_RULE.format(value)
    return {
        "rule": f"!has({value}) || {rule}" if nullable else rule,  # a null reads as absent
        "message": "a pvc:// path must stay on the claim: not empty, not absolute, no `..` segment",
        "fieldPath": f".{field}",
    }


CEL_RULES: dict[str, list[dict[str, str]]] = {
    "RankingSpec": [
        _on_the_claim("model", nullable=True),
        {
            "rule": "self.ranker != 'function' || has(self.function)",
            "message": "ranker 'function' needs `function: module:callable`",
            "fieldPath": ".function",
        },
        {
            "rule": "self.ranker == 'function' || has(self.model)",
            "message": "rankers pairrm and reward-model need `model`",
            "fieldPath": ".model",
        },
        {
            "rule": "!has(self.axes) || self.axes.all(a, self.axes.exists_one(b, b.name == a.name))",
            "message": "axes: names must be unique",
            "fieldPath": ".axes",
        },
        {
            "rule": "!has(self.axes) || self.axes.exists(a, has(a.weight))",
            "message": "axes: at least one axis needs a `weight`: gates alone choose nothing",
            "fieldPath": ".axes",
        },
    ],
    "AxisSpec": [
        _on_the_claim("model", nullable=True),
        {"rule": "has(self.weight) != has(self.gate)", "message": "an axis needs exactly one of `weight` and `gate`"},
        {
            "rule": "self.kind != 'function' || has(self.function)",
            "message": "an axis of kind function needs `function: module:callable`",
            "fieldPath": ".function",
        },
        {
            "rule": "self.kind == 'function' || self.kind == 'judge' || has(self.model)",
            "message": "axes of kind pairrm and reward-model need `model`",
            "fieldPath": ".model",
        },
        {
            "rule": "(self.kind == 'judge') == (has(self.judge) && self.judge != null)",
            "message": "an axis of kind judge needs `judge`, and only it",
            "fieldPath": ".judge",
        },
        {
            "rule": "!has(self.judge) || self.judge == null || "
            "(has(self.judge.template) && self.judge.template == 'pointwise')",
            "message": "a judge axis needs template `pointwise` (a rating per response)",
            "fieldPath": ".judge.template",
        },
        {
            "rule": "self.kind != 'pairrm' || !has(self.gate)",
            "message": "a gate needs an absolute score; PairRM's are relative to the other candidates",
            "fieldPath": ".gate",
        },
    ],
    "GateSpec": [
        {"rule": "has(self.min) || has(self.max)", "message": "a gate needs `min`, `max` or both"},
        {"rule": "!has(self.min) || !has(self.max) || self.min <= self.max", "message": "gate min is above max"},
    ],
    "ModelSpec": [
        _on_the_claim("name"),
        {
            "rule": "self.name == oldSelf.name",
            "message": "model.name is immutable: later iterations build on checkpoints of the first model",
            "fieldPath": ".name",
        },
    ],
    "StorageSpec": [
        {"rule": "self == oldSelf", "message": "storage is immutable: the workspace holds the run's checkpoints"},
        {
            "rule": "self.root.matches('^[^/]') && !self.root.matches('(^|/)[.][.](/|$)')",
            "message": "storage.root must stay on the claim: relative, not empty, no `..` segment",
            "fieldPath": ".root",
        },
    ],
    "PromptsSpec": [_on_the_claim("source")],
    "EvaluationSpec": [
        {
            "rule": "!has(self.judges) || self.judges.all(j, self.judges.filter(k, k.name == j.name).size() == 1)",
            "message": "evaluation.judges: names must be unique",
            "fieldPath": ".judges",
        }
    ],
    "RuntimeSpec": [
        {
            "rule": f"!has(self.env) || self.env.map(e, has(e.value) ? size(e.value) : 0).sum() <= {MAX_ENV_VALUES}",
            "message": f"runtime.env: the values may add up to {MAX_ENV_VALUES} characters",
            "fieldPath": ".env",
        }
    ],
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Iteration", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
    {"name": "WinRate", "type": "number", "jsonPath": ".status.latestWinRate"},  # LC, vs the base model
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    {"name": "Checkpoint", "type": "string", "jsonPath": ".status.latestCheckpoint", "priority": 1},
]

_DROP = {"title", "additionalProperties", "discriminator"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve `$ref`s, keeping the referring node's description/default."""
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = _inline(defs[name], defs)
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}, "title": name}
    return {k: _inline(v, defs) for k, v in node.items()}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    variants = node.get("anyOf")
    if variants is not None:
        kinds = [v for v in variants if v.get("type") != "null"]
        if {v.get("type") for v in kinds} == {"string", "integer"}:
            out["x-kubernetes-int-or-string"] = True
        elif {v.get("type") for v in kinds} == {"string", "array"}:
            # A name or a list of names (training.lossType): no structural type has both, so the apiserver
            # keeps the value as given and the operator's validation (pydantic) checks it.
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif len(kinds) == 1:
            out.update(_structural(kinds[0]))
        else:
            raise ValueError(f"cannot express union {variants} in a structural schema")
        if len(kinds) < len(variants):
            out["nullable"] = True
    strict: list[dict[str, str]] = []
    for key, value in node.items():
        if key in _DROP or key == "anyOf" or (key == "default" and value is None):
            continue
        if key == "properties":
            out["properties"] = {name: _with_object_default(_structural(prop)) for name, prop in value.items()}
        elif key == "items":
            out["items"] = _structural(value)
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            if float(value).is_integer():
                out[key] = True
            else:
                # The apiserver checks a whole-number value against int64(bound) when exclusive, so `0` fails
                # `< 0.5` ("should be less than 0"): the bound stays inclusive and CEL, which compares as
                # doubles, makes it strict.
                op = ">" if key == "exclusiveMinimum" else "<"
                strict.append({"rule": f"self {op} {value}", "message": f"must be {op} {value}"})
        else:
            out[key] = value
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra:
        out["additionalProperties"] = _structural(extra)
    elif extra is True or (node.get("type") == "object" and "properties" not in node and extra is None):
        out["x-kubernetes-preserve-unknown-fields"] = True
    rules = [*strict, *CEL_RULES.get(node.get("title", ""), [])]
    if rules:
        out["x-kubernetes-validations"] = rules
    if out.get("nullable") and any("oldSelf" in r["rule"] for r in out.get("x-kubernetes-validations", [])):
        # A transition rule on a nullable object must tolerate null; ours are on required objects.
        raise ValueError(f"CEL transition rules on nullable {node.get('title')}")
    return out


def _with_object_default(schema: dict[str, Any]) -> dict[str, Any]:
    """Sections default to their fields' defaults, as pydantic fills them. Spelled out rather than
    `{}`: the apiserver checks a default against the section's CEL rules, which read its fields. An object
    with required fields (a judge's `endpoint`) has no default: the field is required too."""
    if "properties" in schema and "default" not in schema and not schema.get("nullable") and not schema.get("required"):
        default = {name: prop["default"] for name, prop in schema["properties"].items() if "default" in prop}
        return {**schema, "default": default}
    return schema


def spec_schema() -> dict[str, Any]:
    raw = IterativeDPORunSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(_inline(raw, defs))
    schema.pop("required", None)  # every spec field has a default
    return schema


def crd() -> dict[str, Any]:
    status = {
        "type": "object",
        "description": "Observed state, written by the operator (see README: status).",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    version = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": PRINTER_COLUMNS,
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": IterativeDPORunSpec.__doc__,
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": spec_schema(),
                    "status": status,
                },
            }
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [version],
        },
    }


def render() -> str:
    header = "# Generated by `idpo crd` from the pydantic spec models. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
