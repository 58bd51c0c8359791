"""The three stage CLIs on tiny models: outputs, contract files, shards, reruns and bad input."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from idpo_jobs.config import Stage
from idpo_operator.plan import StageKey

from tests.conftest import read_json, run_cli, tiny_spec, write_config

pytestmark = pytest.mark.slow
G1, R1, T1 = StageKey(1, Stage.GENERATE), StageKey(1, Stage.RANK), StageKey(1, Stage.TRAIN)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def generated(tiny, tmp_path_factory) -> Path:
    """Iteration 1 generated in two shards."""
    ws = tmp_path_factory.mktemp("ws")
    spec = tiny_spec(tiny, generation={"shards": 2})
    config, _ = write_config(spec, ws, G1)
    for shard in (0, 1):
        ok(run_cli("generate", config, shard))
    return ws


def test_generate_writes_n_responses_per_prompt_across_disjoint_shards(generated: Path) -> None:
    parts = [generated / "iter-1" / "generate" / f"part-0000{k}" for k in (0, 1)]
    rows = [json.loads(line) for p in parts for line in (p / "generations.jsonl").read_text().splitlines()]
    ids = [r["prompt_id"] for r in rows]
    assert len(ids) == 8 and len(set(ids)) == 8  # perIteration 8: nothing lost, nothing twice
    assert all(len(r["all_generated_responses"]) == 3 for r in rows)
    assert all(len(set(r["all_generated_responses"])) > 1 for r in rows)  # sampled, not greedy
    success = read_json(parts[1] / "_SUCCESS.json")
    assert success["shard"] == 1 and success["metrics"]["prompts"] == 4
    assert set(success["inputs"]) == {"model", "prompts"} and "transformers" in success["versions"]


def test_generate_is_reproducible_with_a_seed(tiny, generated: Path, tmp_path: Path) -> None:
    config, _ = write_config(tiny_spec(tiny, generation={"shards": 2}), tmp_path, G1)
    ok(run_cli("generate", config, 1))
    ours = (tmp_path / "iter-1/generate/part-00001/generations.jsonl").read_text()
    assert ours == (generated / "iter-1/generate/part-00001/generations.jsonl").read_text()


def test_rerunning_a_finished_stage_exits_at_once_and_changes_nothing(tiny, generated: Path) -> None:
    config = generated / "generate-1.json"
    before = tree_digest(generated / "iter-1")
    start = time.monotonic()
    proc = run_cli("generate", config, 0)
    ok(proc)
    assert "nothing to do" in proc.stdout
    assert tree_digest(generated / "iter-1") == before
    assert time.monotonic() - start < 30  # no model load happened (a load alone is seconds)


@pytest.mark.parametrize(
    ("ranking", "kind"),
    [
        ({"ranker": "pairrm", "model": "tiny://pairrm"}, "pairrm"),
        ({"ranker": "function", "function": "rewards:starts_with_s", "model": None}, "function"),
        ({"ranker": "reward-model", "model": "REWARD"}, "reward-model"),
    ],
    ids=["pairrm", "function", "reward-model"],
)
def test_rank_pairs_best_against_worst_from_all_generate_parts(
    tiny, generated, ranked, tmp_path, ranking, kind
) -> None:
    import datasets

    if kind == "pairrm":  # the shared spec's ranker: `ranked` ran exactly this stage already
        out = ranked
    else:
        if ranking.get("model") == "REWARD":
            ranking = {**ranking, "model": str(tiny["reward"])}
        spec = tiny_spec(tiny, generation={"shards": 2}, ranking=ranking)
        config, _ = write_config(spec, generated, R1, out_dir=tmp_path)
        ok(run_cli("rank", config))
        out = tmp_path
    part = out / "iter-1" / "rank" / "part-00000"
    metrics = read_json(part / "_SUCCESS.json")["metrics"]
    assert metrics["ranker"] == kind and metrics["prompts"] == 8
    assert metrics["pairs"] + metrics["dropped_ties"] == 8 and metrics["pairs"] > 0
    pairs = datasets.load_dataset("json", data_files=str(part / "pairs.jsonl"), split="train")
    for row in pairs:
        scores = row["all_rm_scores"]
        assert row["score_chosen"] == max(scores) and row["score_rejected"] == min(scores)
        assert row["chosen"][-1]["role"] == "assistant" and row["chosen"][0]["content"] == row["prompt"]
    assert metrics["mean_chosen_score"] > metrics["mean_rejected_score"]


@pytest.fixture(scope="module")
def ranked(tiny, generated: Path) -> Path:
    spec = tiny_spec(tiny, generation={"shards": 2})
    config, _ = write_config(spec, generated, R1)
    ok(run_cli("rank", config))
    return generated


@pytest.mark.parametrize(
    "training",
    [
        {},
        {
            "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "referencePolicy": "initial",
            "precomputeRefLogProbs": True,
        },
    ],
    ids=["full", "lora-initial-precomputed"],
)
def test_train_saves_a_plain_checkpoint_the_next_iteration_loads(tiny, ranked, tmp_path, training) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = tiny_spec(tiny, generation={"shards": 2}, training=training)
    config, _ = write_config(spec, ranked, T1, out_dir=tmp_path)
    ok(run_cli("train", config))
    model_dir = tmp_path / "iter-1" / "train" / "model"
    metrics = read_json(tmp_path / "iter-1" / "train" / "_SUCCESS.json")["metrics"]
    assert metrics["pairs"] > 0 and metrics["steps"] >= 1 and metrics["checkpoint"] == str(model_dir)
    assert 0.0 <= metrics["reward_accuracy"] <= 1.0
    assert not (model_dir / "adapter_config.json").exists()  # LoRA merged: a plain model
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny["policy"])
    assert any((a != b).any() for a, b in zip(model.parameters(), base.parameters(), strict=True))
    assert "[INST]" in AutoTokenizer.from_pretrained(model_dir).chat_template


# --- bad input: non-zero exit, a message naming the problem, nothing half-written ---------------
def test_unloadable_model_path_fails_cleanly(tiny, tmp_path: Path) -> None:
    config, _ = write_config(tiny_spec(tiny), tmp_path, G1, model=str(tmp_path / "no-model"))
    proc = run_cli("generate", config)
    assert proc.returncode == 2 and f"model '{tmp_path / 'no-model'}' does not exist" in proc.stderr
    assert list((tmp_path / "iter-1" / "generate").iterdir()) == []


def test_malformed_prompt_file_names_file_and_line(tiny, tmp_path: Path) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    config, _ = write_config(tiny_spec(tiny, prompts={"source": str(bad), "perIteration": None}), tmp_path, G1)
    proc = run_cli("generate", config)
    assert proc.returncode == 2 and f"{bad}:2: malformed JSON" in proc.stderr
    assert list((tmp_path / "iter-1" / "generate").iterdir()) == []


def test_ranker_directory_missing_files_fails_without_touching_inputs(tiny, generated, tmp_path) -> None:
    broken = tmp_path / "pairrm"
    broken.mkdir()
    (broken / "config.json").write_text((tiny["pairrm"] / "config.json").read_text())
    spec = tiny_spec(tiny, generation={"shards": 2}, ranking={"model": str(broken)})
    before = tree_digest(generated / "iter-1" / "generate")
    config, _ = write_config(spec, generated, R1, out_dir=tmp_path / "ws", termination_log=str(tmp_path / "term"))
    proc = run_cli("rank", config)
    assert proc.returncode == 2 and "lacks model.safetensors or pytorch_model.bin" in proc.stderr
    assert "lacks model.safetensors" in json.loads((tmp_path / "term").read_text())["error"]
    assert list((tmp_path / "ws" / "iter-1" / "rank").iterdir()) == []
    assert tree_digest(generated / "iter-1" / "generate") == before


def test_a_function_ranker_returning_a_non_number_is_named(tiny, generated, tmp_path) -> None:
    spec = tiny_spec(
        tiny,
        generation={"shards": 2},
        ranking={"ranker": "function", "function": "rewards:not_a_number", "model": None},
    )
    config, _ = write_config(spec, generated, R1, out_dir=tmp_path)
    proc = run_cli("rank", config)
    assert proc.returncode == 2 and "'rewards:not_a_number' returned 'high', not a number" in proc.stderr


def test_rank_refuses_an_incomplete_generate_stage(tiny, tmp_path: Path) -> None:
    config, _ = write_config(tiny_spec(tiny, generation={"shards": 2}), tmp_path, R1)
    proc = run_cli("rank", config)
    assert proc.returncode == 2 and "input stage 'generate' is incomplete" in proc.stderr
