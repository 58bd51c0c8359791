"""What an apiserver does with a custom resource before storing it, for the emulator.

In apiserver order: prune fields the structural schema does not know, apply defaults, validate
(type, enum, bounds, pattern, lengths, nullable), then evaluate `x-kubernetes-validations` CEL rules
with cel-python, transition rules (those using `oldSelf`) only on update. Returns the errors in the
apiserver's `path: message` form and the pruned, defaulted object.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import celpy

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


@functools.cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _prune_and_default(schema: dict[str, Any], value: Any) -> Any:
    if value is None or schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        out = {k: _prune_and_default(props[k], v) for k, v in value.items() if k in props}
        for name, prop in props.items():
            if name not in out and "default" in prop:
                out[name] = _prune_and_default(prop, copy.deepcopy(prop["default"]))
        return out
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: _prune_and_default(schema["additionalProperties"], v) for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune_and_default(schema["items"], v) for v in value]
    return value


def _type_error(schema: dict[str, Any], value: Any) -> str | None:
    if value is None:
        return None if schema.get("nullable") else "Required value: must not be null"
    if schema.get("x-kubernetes-int-or-string"):
        return None if isinstance(value, int | str) and not isinstance(value, bool) else "must be int or string"
    kind = schema.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = kind is None or isinstance(value, _TYPES[kind])
    return None if ok else f'Invalid value: "{type(value).__name__}": must be of type {kind}'


def _validate(schema: dict[str, Any], value: Any, path: str, errors: list[str]) -> None:
    problem = _type_error(schema, value)
    if problem or value is None:
        if problem:
            errors.append(f"{path}: {problem}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: Unsupported value: {value!r}: supported values: {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        strict_low, strict_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if low is not None and (value <= low if strict_low else value < low):
            bound = "greater than" if strict_low else "greater than or equal to"
            errors.append(f"{path}: Invalid value: {value}: must be {bound} {low}")
        if high is not None and (value >= high if strict_high else value > high):
            bound = "less than" if strict_high else "less than or equal to"
            errors.append(f"{path}: Invalid value: {value}: must be {bound} {high}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: Invalid value: {value!r}: should match '{schema['pattern']}'")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: Invalid value: {value!r}: should be at least {schema['minLength']} chars long")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: Invalid value: should have at least {schema['minItems']} items")
        for n, item in enumerate(value):
            _validate(schema.get("items", {}), item, f"{path}[{n}]", errors)
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in value:
                _validate(prop, value[name], f"{path}.{name}", errors)
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}.{name}: Required value")
        if isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                _validate(schema["additionalProperties"], item, f"{path}[{key}]", errors)


def _cel(schema: dict[str, Any], value: Any, old: Any, path: str, errors: list[str]) -> None:
    if value is None:
        return
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        bindings = {"self": celpy.json_to_cel(value)}
        if transition:
            bindings["oldSelf"] = celpy.json_to_cel(old)
        try:
            ok = bool(_program(rule["rule"]).evaluate(bindings))
        except Exception as err:  # a rule that cannot evaluate is reported like the apiserver does
            errors.append(f"{path}: Invalid value: rule {rule['rule']!r} failed to evaluate: {err}")
            continue
        if not ok:
            errors.append(f"{path}{rule.get('fieldPath', '')}: Invalid value: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in value:
                _cel(prop, value[name], old.get(name) if isinstance(old, dict) else None, f"{path}.{name}", errors)


def admit(schema: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    cleaned = _prune_and_default(schema, obj)
    errors: list[str] = []
    for name in ("spec",):
        if name in cleaned:
            prop = schema["properties"][name]
            _validate(prop, cleaned[name], name, errors)
            if not errors:
                _cel(prop, cleaned[name], (old or {}).get(name) if old else None, name, errors)
    return errors, cleaned
