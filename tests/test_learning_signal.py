"""The loop learns: with a programmatic reward, held-out reward rises iteration after iteration.

This proves pairs are oriented right (chosen = higher reward) and each iteration's model is
handed on to the next: a flipped pair or a dropped hand-off makes the reward fall or stay flat.
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import pytest
from idpo_jobs.config import GenerationSpec, Stage
from idpo_jobs.data import read_jsonl
from idpo_jobs.generate import TransformersEngine
from idpo_jobs.models import render_prompt_ids
from idpo_operator.local import LocalRunner
from idpo_operator.spec import parse_manifest

from tests.conftest import env_with_tests, manifest
from tests.rewards import starts_with_s

pytestmark = pytest.mark.slow

ITERATIONS = 3


def held_out_reward(model: Path, prompts: list[str]) -> float:
    engine = TransformersEngine(
        str(model), GenerationSpec(temperature=1.0, max_new_tokens=20, batch_size=16), seed=1234
    )
    responses = engine.generate(render_prompt_ids(engine.tokenizer, prompts), 4)
    return statistics.fmean(starts_with_s(p, r) for p, rs in zip(prompts, responses, strict=True) for r in rs)


def test_held_out_reward_rises_from_the_base_model_to_the_last_iteration(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", env_with_tests()["PYTHONPATH"])
    doc = manifest(
        "learn",
        iterations=ITERATIONS,
        prompts={"perIteration": 48},
        generation={"responsesPerPrompt": 6, "maxNewTokens": 20, "batchSize": 16},
        ranking={"ranker": "function", "function": "rewards:starts_with_s", "model": None},
        training={"beta": 0.1, "learningRate": 1e-3, "epochs": 2, "perDeviceBatchSize": 8, "maxLength": 96},
    )
    runner = LocalRunner(parse_manifest(doc), tmp_path / "w")
    assert runner.run() == 0

    ws = runner.workspace
    used = {
        r["prompt_id"]
        for i in range(1, ITERATIONS + 1)
        for r in read_jsonl(ws.stage_dir(i, Stage.GENERATE) / "part-00000" / "generations.jsonl")
    }
    held_out = [
        r["prompt"] for r in read_jsonl(tmp_path / "w" / "tiny" / "prompts.jsonl") if r["prompt_id"] not in used
    ][:48]
    assert len(held_out) == 48

    models = [tmp_path / "w" / "tiny" / "policy"] + [ws.checkpoint(i) for i in range(1, ITERATIONS + 1)]
    rewards = [held_out_reward(m, held_out) for m in models]
    print("held-out reward by iteration (0 = base):", [round(r, 4) for r in rewards])
    assert rewards[-1] > rewards[0] + 0.1
    assert all(later > earlier - 0.02 for earlier, later in itertools.pairwise(rewards))
