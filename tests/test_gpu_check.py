"""bench/gpu_check.py's dry run: the GPU check runs in CI, so it cannot rot before a GPU is lent.

The dry run is the GPU run's code on CPU with a tiny Mistral; it runs here with the packages the GPU machine
lacks made unimportable (the wheels of requirements/gpu-check-wheels.txt aside), in the stage subprocesses too.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
BENCH = ROOT / "bench"
# Not on the GPU machine and not among the wheels that travel there: importing one would fail there.
ABSENT_ON_GPU_MACHINE = ("vllm", "llm_blender", "kubernetes", "kopf")
# As absent as there: `find_spec` answers None (libraries probe for optional packages that way), so importing
# one fails with ModuleNotFoundError. Every import searches sys.path through PathFinder.
HIDE_PACKAGES = f"""
import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec


def find_spec(cls, name, path=None, target=None):
    if name.partition(".")[0] in {ABSENT_ON_GPU_MACHINE!r}:
        return None
    return _find_spec(name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
"""


def gpu_check(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`python bench/gpu_check.py --dry-run ARGS` without the packages the GPU machine lacks; its result."""
    (tmp / "hide").mkdir()
    (tmp / "hide" / "sitecustomize.py").write_text(HIDE_PACKAGES)
    path = os.pathsep.join(p for p in (str(tmp / "hide"), os.environ.get("PYTHONPATH", "")) if p)
    out = tmp / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out), "--workdir", str(tmp), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": path},
        cwd=ROOT,
    )
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc, result = gpu_check(tmp_path_factory.mktemp("gpu-check"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, result


@pytest.mark.slow
def test_dry_run_trains_full_and_lora_through_the_stage_with_cpu_memory_left_unmeasured(dry_run: Any) -> None:
    _, result = dry_run
    assert result["dry_run"] is True and result["device"]["cuda"] is False
    assert [(r["size"], r["mode"]) for r in result["train"]] == [("tiny", "full"), ("tiny", "lora")]
    for record in result["train"]:
        assert "error" not in record, record
        assert record["strategy"] == "single" and record["steps"] == 3 and len(record["step_s"]) == 3
        assert record["step_s_median"] > 0 and record["tokens_per_s"] > 0
        assert record["tokens_per_step"] == 2 * 2 * 64  # chosen and rejected of 2 pairs, 64 tokens each
        assert record["model_tflop_per_step"] > 0 and record["mfu_of_matmul"] > 0
        assert record["mfu"] is None  # no datasheet peak for a CPU
        memory = record["memory"]
        assert memory["measured_max_allocated_gb"] is None and memory["measured_over_predicted"] is None
        assert 0 < memory["predicted"]["allocated_gb"] < memory["predicted"]["total_gb"]
    full, lora = result["train"]
    assert "reference (bf16)" in full["memory"]["predicted"]["items_gb"]
    assert "frozen base (bf16)" in lora["memory"]["predicted"]["items_gb"]
    assert lora["model_tflop_per_step"] < full["model_tflop_per_step"]


@pytest.mark.slow
def test_dry_run_generates_at_every_batch_size_and_writes_where_told(dry_run: Any) -> None:
    proc, result = dry_run
    assert [(r["size"], r["batch_size"]) for r in result["generate"]] == [("tiny", 1), ("tiny", 8), ("tiny", 64)]
    for record in result["generate"]:
        assert "error" not in record, record
        assert 0 < record["new_tokens"] <= record["batch_size"] * record["max_new_tokens"]
        assert record["tokens_per_s"] > 0 and record["peak_allocated_gb"] is None
    assert result["models"][0]["params"] > 0 and result["matmul"]["tflops"] > 0
    assert "wrote " in proc.stdout and "train  mode" in proc.stdout


def test_a_failed_measurement_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    proc, result = gpu_check(tmp_path, "--modes", "lora", "--lora-rank", "0", "--gen-batches", "2")
    assert proc.returncode == 1
    [train] = result["train"]
    assert train["mode"] == "lora" and "validation error" in train["error"]
    [generated] = result["generate"]
    assert "error" not in generated and generated["tokens_per_s"] > 0
    assert "tiny   lora  error: ValidationError" in proc.stdout


def test_a_dpo_step_counts_policy_forward_and_backward_and_a_reference_forward_on_both_sequences(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    gpu_check = importlib.import_module("gpu_check")
    info = {"matmul_params": 1e9, "layers": 2, "heads": 4, "head_dim": 8}
    attention = 2 * 4 * 8 * 100  # layers x heads x head_dim x sequence length
    full, recompute = gpu_check.step_flops(info, tokens=10, max_length=100, lora_params=None)
    assert full == 10 * (8e9 + 16 * attention)
    assert recompute == 10 * (2e9 + 4 * attention)
    lora, _ = gpu_check.step_flops(info, tokens=10, max_length=100, lora_params=1e6)
    assert lora == 10 * (6e9 + 16 * attention + 6e6)  # no weight gradients for the frozen base
