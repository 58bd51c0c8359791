"""The spec models: recipe defaults, and invalid manifests rejected with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from idpo_operator.spec import ManifestError, load_manifest, parse_manifest

from tests.conftest import manifest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_defaults_reproduce_the_snorkel_recipe() -> None:
    spec = parse_manifest(
        {"apiVersion": "idpo.dev/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "m"}}
    ).spec
    assert spec.model.name == "mistralai/Mistral-7B-Instruct-v0.2"
    assert spec.iterations == 3
    assert spec.generation.responses_per_prompt == 5
    assert spec.generation.engine == "vllm"
    assert (spec.ranking.ranker, spec.ranking.model) == ("pairrm", "llm-blender/PairRM")
    assert spec.prompts.split_pattern == "train_iteration_{n}"
    assert spec.training.reference_policy == "rolling"


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_manifest_is_valid(example: Path) -> None:
    assert load_manifest(example).metadata.name


@pytest.mark.parametrize(
    ("override", "field", "rule"),
    [
        ({"iterations": 0}, "spec.iterations", "greater than or equal to 1"),
        (
            {"generation": {"responsesPerPrompt": 1}},
            "spec.generation.responsesPerPrompt",
            "greater than or equal to 2",
        ),
        ({"training": {"beta": -0.1}}, "spec.training.beta", "greater than 0"),
        ({"training": {"betta": 0.1}}, "spec.training.betta", "unknown field"),
        ({"generation": {"temperature": "hot"}}, "spec.generation.temperature", "valid number"),
        ({"generation": {"engine": "tgi"}}, "spec.generation.engine", "'vllm' or 'transformers'"),
        ({"prompts": {"source": ""}}, "spec.prompts.source", "at least 1 character"),
        ({"prompts": {"splitPattern": "train_{i}"}}, "spec.prompts.splitPattern", "match pattern"),
        ({"ranking": {"ranker": "function", "function": None}}, "spec.ranking", "needs `function"),
        (
            {"ranking": {"ranker": "function", "function": "no colon"}},
            "spec.ranking.function",
            "match pattern",
        ),
        (
            {"tracking": {"mlflow": {"trackingUri": "mlflow.example.com:5000"}}},
            "spec.tracking.mlflow.trackingUri",
            "match pattern",
        ),
    ],
    ids=[
        "iterations-0",
        "responses-1",
        "negative-beta",
        "unknown-field",
        "wrong-type",
        "bad-enum",
        "empty-source",
        "pattern-without-n",
        "function-missing",
        "function-malformed",
        "tracking-uri-without-scheme",
    ],
)
def test_invalid_manifest_names_the_field_and_the_rule(override: dict, field: str, rule: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest(**override))
    line = next((ln for ln in str(err.value).splitlines() if ln.strip().startswith(field + ":")), None)
    assert line is not None, str(err.value)
    assert rule in line


def test_missing_prompt_source_is_reported(tmp_path: Path) -> None:
    doc = manifest()
    doc["spec"]["prompts"]["source"] = None
    with pytest.raises(ManifestError, match=r"spec\.prompts\.source: Input should be a valid string"):
        parse_manifest(doc)


def test_wrong_kind_and_bad_yaml_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="kind: Input should be 'IterativeDPORun'"):
        parse_manifest({**manifest(), "kind": "Job"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "missing.yaml")


def test_several_training_nodes_need_a_volume_every_node_can_mount() -> None:
    two = {"training": {"distributed": {"nodes": 2}}}
    with pytest.raises(ManifestError, match=r"nodes 2 needs a volume every node can mount.*ReadWriteMany"):
        parse_manifest(manifest(**two))
    assert parse_manifest(manifest(**two, storage={"accessModes": ["ReadWriteMany"]})).spec.training.distributed.nodes
    assert parse_manifest(manifest(**two, storage={"existingClaim": "shared"}))  # its modes are the cluster's


def test_env_values_are_bounded_each_and_together() -> None:
    """Issue 30, class 6: the operator holds every run's spec in memory; 1 MiB values are refused."""
    with pytest.raises(ManifestError, match=r"spec\.runtime\.env\.0\.value: String should have at most 4096"):
        parse_manifest(manifest(runtime={"env": [{"name": "HF_TOKEN", "value": "x" * (1 << 20)}]}))
    five = [{"name": f"V{n}", "value": "x" * 4000} for n in range(5)]
    with pytest.raises(ManifestError, match=r"spec\.runtime: .*env: the values add up to 20000 characters"):
        parse_manifest(manifest(runtime={"env": five}))
    assert parse_manifest(manifest(runtime={"env": five[:4]})).spec.runtime.env[3].value == "x" * 4000
