"""The memory estimate against figures users report, and the recipe's 7B run on 8x80GB."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from idpo_operator import memory
from idpo_operator.memory import GB, KNOWN_MODELS
from idpo_operator.spec import IterativeDPORunSpec

MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"
EIGHT_GPUS = {"resources": {"limits": {"nvidia.com/gpu": 8}}}


def plan(**training: Any) -> memory.MemoryPlan:
    """The recipe (Mistral-7B, batch 8, max length 1024, checkpointing) with `training` on top."""
    return memory.plan_memory(IterativeDPORunSpec.model_validate({"training": {**EIGHT_GPUS, **training}}))


def policy_states(stage: memory.StageMemory) -> float:
    return sum(i.bytes for i in stage.items if i.name.startswith(("policy", "AdamW")))


def test_fsdp_shards_the_policys_sixteen_bytes_per_parameter_over_eight_gpus() -> None:
    fsdp = plan().stage("train", "fsdp")
    # ZeRO-3 / FSDP full shard: fp32 weights + grads + 2 Adam moments = 16 B/param, /8 = 14.5 GB.
    assert policy_states(fsdp) == pytest.approx(16 * 7.24e9 / 8, rel=1e-6)
    # With the sharded bf16 reference: the ~17 GB/GPU of model state users report for 7B DPO on 8 GPUs.
    reference = fsdp.item("reference (bf16, sharded /8)")
    assert 15.5 * GB < policy_states(fsdp) + reference < 17.5 * GB


def test_the_recipe_fits_8x80gb_under_fsdp_but_not_under_ddp() -> None:
    recipe = plan()
    assert recipe.stage("train", "fsdp").fits(80 * GB)
    ddp = recipe.stage("train", "ddp")
    assert not ddp.fits(80 * GB)
    # Not a close call: the policy's states and the reference alone are 18 B/param = 130 GB.
    assert policy_states(ddp) + ddp.item("reference (bf16)") > 120 * GB


def test_without_gradient_checkpointing_the_recipes_activations_alone_fill_a_gpu() -> None:
    fsdp = plan(gradientCheckpointing=False).stage("train", "fsdp")
    assert fsdp.item("activations (no checkpointing)") > 60 * GB and not fsdp.fits(80 * GB)
    assert plan().stage("train", "fsdp").item("activations (checkpointed)") < 10 * GB


@pytest.mark.parametrize(
    ("training", "reference"),
    [({}, False), ({"referencePolicy": "initial"}, True)],
    ids=["rolling-reference-is-the-base", "initial-reference-is-loaded"],
)
def test_lora_on_one_80gb_gpu_holds_a_bf16_base_and_tiny_adapters(training: dict[str, Any], reference: bool) -> None:
    spec = {"lora": {}, "resources": {"limits": {"nvidia.com/gpu": 1}}, **training}
    (train,) = [s for s in plan(**spec).stages if s.stage == "train"]  # one process: nothing to compare
    assert train.item("frozen base (bf16)") == pytest.approx(2 * 7.24e9)
    assert train.item("LoRA adapters, grads, AdamW (fp32)") < 1 * GB  # r=16 on every linear: 42M params
    assert any(i.name.startswith("reference") for i in train.items) == reference
    assert train.fits(80 * GB)


def test_precomputed_reference_log_probs_drop_the_reference_model() -> None:
    train = plan(precomputeRefLogProbs=True, distributed={"strategy": "ddp"}).stage("train", "ddp")
    assert not any(i.name.startswith("reference") for i in train.items)


def test_vllm_holds_the_bf16_weights_split_by_tensor_parallelism_and_caches_the_rest() -> None:
    one = memory.plan_memory(IterativeDPORunSpec()).stage("generate")
    assert one.item("weights (bf16 / 1)") == pytest.approx(14.48 * GB)
    # Mistral-7B's KV cache is 128 KiB per token (GQA: 8 KV heads of 128 over 32 layers, K and V in bf16).
    assert "131 kB/token" in one.notes[0]
    assert one.total == pytest.approx(0.9 * 80 * GB) and one.fits(80 * GB)
    two = memory.plan_memory(IterativeDPORunSpec.model_validate({"generation": {"tensorParallelSize": 2}}))
    assert two.stage("generate").item("weights (bf16 / 2)") == pytest.approx(7.24 * GB)


def test_vllm_does_not_fit_when_the_weights_leave_no_kv_cache() -> None:
    small_gpu = memory.plan_memory(IterativeDPORunSpec(), gpu_memory=16 * GB)
    assert not small_gpu.stage("generate").fits(16 * GB)


def test_pairrm_is_a_small_fp32_model() -> None:
    rank = memory.plan_memory(IterativeDPORunSpec()).stage("rank")
    assert rank.item("weights (fp32)") == pytest.approx(0.435e9 * 4) and rank.fits(24 * GB)


def test_an_unknown_model_gives_an_unknown_verdict_not_a_guess() -> None:
    spec = IterativeDPORunSpec.model_validate({"model": {"name": "pvc://models/mine"}})
    train = memory.plan_memory(spec).stage("train")
    assert not train.known and train.total is None and train.fits(80 * GB) is None
    assert "unknown" in memory.format_plan(memory.plan_memory(spec))
    mine = memory.plan_memory(spec, shape=KNOWN_MODELS[MISTRAL]).stage("train")
    assert mine.known


def test_the_table_names_every_item_and_a_verdict_per_stage() -> None:
    text = memory.format_plan(plan())
    assert "train (fsdp, 8 processes (1 node x 8))" in text and "train (ddp, 8 processes (1 node x 8))" in text
    assert "does NOT fit 80 GB" in text and text.count("total: fits") == 3
    assert "AdamW moments (2 x fp32, sharded /8)" in text


def test_operator_imports_the_estimate_without_torch() -> None:
    code = "import sys, idpo_operator.memory; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
