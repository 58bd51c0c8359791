"""The CRD is generated from the spec models, structural, and in sync with `crds/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from idpo_operator import crd

CRD_FILE = Path(__file__).parent.parent / "crds" / "idpo.dev_iterativedporuns.yaml"


def walk(node: Any, path: str = "spec"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.get("properties", {}).items():
            yield from walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_checked_in_crd_matches_the_spec_models() -> None:
    assert CRD_FILE.read_text() == crd.render(), "crds/ is stale: run `idpo crd -o crds/idpo.dev_iterativedporuns.yaml`"


def test_schema_is_structural() -> None:
    for path, node in walk(crd.spec_schema()):
        assert not {"anyOf", "oneOf", "allOf", "$ref", "title", "const"} & set(node), path
        untyped = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")  # their values vary
        typed = "type" in node or any(node.get(key) for key in untyped)
        assert typed, f"{path} has no type"
        if node.get("type") == "object":
            assert {"properties", "additionalProperties", "x-kubernetes-preserve-unknown-fields"} & set(node), path


def test_exclusive_bounds_are_whole_numbers_or_cel_rules() -> None:
    """The apiserver checks a whole-number value against int64(bound) when a bound is exclusive: with
    `maximum: 0.5, exclusiveMaximum: true` it refuses `0` (and refused the CRD itself, whose default is 0).
    Fractional strict bounds are CEL rules instead."""
    strict = []
    for path, node in walk(crd.spec_schema()):
        for flag, bound in (("exclusiveMaximum", "maximum"), ("exclusiveMinimum", "minimum")):
            if node.get(flag):
                assert float(node[bound]).is_integer(), f"{path}: exclusive fractional {bound}"
        strict += [(path, r["rule"]) for r in node.get("x-kubernetes-validations", []) if r["rule"].startswith("self ")]
    assert ("spec.training.labelSmoothing", "self < 0.5") in strict


def defaults(schema: dict[str, Any], value: Any) -> Any:
    """Apiserver-style defaulting: fill absent fields that have defaults, recursively."""
    if not isinstance(value, dict):
        return value
    out = dict(value)
    for name, prop in schema.get("properties", {}).items():
        if name not in out and "default" in prop:
            out[name] = prop["default"]
        if name in out:
            out[name] = defaults(prop, out[name])
    return out


def test_apiserver_defaults_agree_with_pydantic_defaults() -> None:
    from idpo_operator.spec import IterativeDPORunSpec

    defaulted = defaults(crd.spec_schema(), {})
    assert IterativeDPORunSpec.model_validate(defaulted) == IterativeDPORunSpec()
    assert defaulted["generation"]["responsesPerPrompt"] == 5 and defaulted["ranking"]["pairing"]["dropTies"]


def test_crd_names_version_status_and_printer_columns() -> None:
    doc = crd.crd()
    assert doc["metadata"]["name"] == "iterativedporuns.idpo.dev"
    assert doc["spec"]["names"]["shortNames"] == ["idpo"]
    (version,) = doc["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Phase", "Iteration", "Stage", "WinRate", "Ready", "Age"]


@pytest.mark.parametrize(
    ("path", "rule"),
    [("spec.model", "self.name == oldSelf.name"), ("spec.ranking", "has(self.function)"), ("spec.storage", "oldSelf")],
)
def test_cel_rules_sit_on_their_sections(path: str, rule: str) -> None:
    nodes = dict(walk(crd.spec_schema()))
    rules = [r["rule"] for r in nodes[path].get("x-kubernetes-validations", [])]
    assert any(rule in r for r in rules), rules


def test_every_string_list_and_map_of_the_spec_is_bounded() -> None:
    """So that a run at the caps keeps a small object (and status): docs/spec-reference's caps."""
    bound = {"string": "maxLength", "array": "maxItems", "map": "maxProperties"}
    unbounded = []
    for path, node in walk(crd.spec_schema()):
        kind = "map" if "additionalProperties" in node else node.get("type")
        if kind in bound and bound[kind] not in node and "enum" not in node:
            unbounded.append(path)
    assert unbounded == []


@pytest.mark.parametrize(
    ("path", "cap"),
    [("spec.iterations", 100), ("spec.training.distributed.nodes", 64), ("spec.generation.shards", 256)],
)
def test_the_documented_caps_are_in_the_schema(path: str, cap: int) -> None:
    assert dict(walk(crd.spec_schema()))[path]["maximum"] == cap
