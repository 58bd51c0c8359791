"""The evaluate stage on tiny models: held-out prompts, AlpacaEval export, and win rates that see a real gain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from idpo_jobs.config import EvaluateConfig, EvaluationSpec, PromptsSpec, RankingSpec
from idpo_jobs.data import load_prompts
from idpo_operator.spec import IterativeDPORunSpec

from tests.conftest import read_json, run_cli, tiny_spec
from tests.rewards import starts_with_s

pytestmark = pytest.mark.slow
FUNCTION_RANKER = {"ranker": "function", "function": "rewards:starts_with_s", "model": None}
HELD_OUT = 24


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr


def evaluate_config(
    spec: IterativeDPORunSpec,
    workspace: Path,
    iteration: int,
    model: str | Path,
    base: int | None = None,
    previous: int | None = None,
    **evaluation: Any,
) -> Path:
    config = EvaluateConfig(
        run="t",
        iteration=iteration,
        workspace=str(workspace),
        model=str(model),
        prompts=spec.prompts,
        iterations=spec.iterations,
        generation=spec.generation,
        ranking=spec.ranking,
        evaluation=EvaluationSpec(**{"limit": HELD_OUT, "max_new_tokens": 12, **evaluation}),
        base_iteration=base,
        previous_iteration=previous,
    )
    path = workspace / f"evaluate-{iteration}.json"
    workspace.mkdir(parents=True, exist_ok=True)
    config.dump(path)
    return path


def metrics_of(workspace: Path, iteration: int) -> dict[str, Any]:
    return read_json(workspace / f"iter-{iteration}" / "evaluate" / "_SUCCESS.json")["metrics"]


def s_words_model(policy: Path, out: Path) -> Path:
    """The tiny policy, its generation config forbidding every token that starts with a letter other than
    's': a changed model that writes what `rewards:starts_with_s` rewards (the transformers engine obeys it)."""
    from transformers import AutoTokenizer

    shutil.copytree(policy, out)
    vocab = AutoTokenizer.from_pretrained(policy).get_vocab()
    banned = sorted(i for t, i in vocab.items() if t.lstrip("▁")[:1].isalpha() and t.lstrip("▁")[:1].lower() != "s")
    generation = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**generation, "suppress_tokens": banned}))
    return out


@pytest.fixture(scope="module")
def spec(tiny) -> IterativeDPORunSpec:
    return tiny_spec(tiny, ranking=FUNCTION_RANKER)


@pytest.fixture(scope="module")
def base(tiny, spec, tmp_path_factory) -> Path:
    """A workspace whose iteration 0 holds the base model's evaluation, with best-of-3."""
    ws = tmp_path_factory.mktemp("ws")
    ok(run_cli("evaluate", evaluate_config(spec, ws, 0, tiny["policy"], best_of_n=3)))
    return ws


@pytest.fixture(scope="module")
def better(tiny, tmp_path_factory) -> Path:
    return s_words_model(tiny["policy"], tmp_path_factory.mktemp("models") / "s-words")


def test_the_base_model_is_evaluated_on_held_out_prompts_no_iteration_trains_on(spec, base: Path) -> None:
    stage = base / "iter-0" / "evaluate"
    rows = [json.loads(line) for line in (stage / "responses.jsonl").read_text().splitlines()]
    ids = {r["prompt_id"] for r in rows}
    trained = {p["prompt_id"] for n in range(1, spec.iterations + 1) for p in load_prompts(spec.prompts, n)}
    assert len(ids) == HELD_OUT and not ids & trained
    exported = json.loads((stage / "alpaca_eval.json").read_text())
    assert [set(e) for e in exported] == [{"instruction", "output", "generator"}] * HELD_OUT
    assert [(e["instruction"], e["output"], e["generator"]) for e in exported] == [
        (r["prompt"], r["response"], "t-iter-0") for r in rows
    ]
    metrics = metrics_of(base, 0)
    assert metrics["prompts"] == HELD_OUT and metrics["mean_response_chars"] > 0
    assert "win_rate_vs_base" not in metrics  # nothing earlier to compare with


def test_best_of_n_keeps_the_rankers_favourite_sample_and_is_judged_against_the_base(base: Path) -> None:
    stage = base / "iter-0" / "evaluate"
    rows = [json.loads(line) for line in (stage / "responses.jsonl").read_text().splitlines()]
    for row in rows:
        scores = [starts_with_s(row["prompt"], s) for s in row["best_of_n_responses"]]
        assert len(scores) == 3
        assert row["best_of_n_response"] == row["best_of_n_responses"][scores.index(max(scores))]
    metrics = metrics_of(base, 0)
    assert metrics["best_of_n"] == 3
    counts = [metrics[f"best_of_n_{k}_vs_base"] for k in ("wins", "ties", "losses")]
    assert sum(counts) == HELD_OUT
    assert metrics["best_of_n_win_rate_vs_base"] == pytest.approx((counts[0] + counts[1] / 2) / HELD_OUT, abs=1e-4)
    bon = json.loads((stage / "alpaca_eval_best_of_n.json").read_text())
    assert {e["generator"] for e in bon} == {"t-iter-0-best-of-3"}


def test_evaluation_detects_a_model_that_writes_what_the_ranker_rewards(spec, base: Path, better: Path) -> None:
    log = base / "termination-log"
    ok(run_cli("evaluate", evaluate_config(spec, base, 1, better, base=0, previous=0), IDPO_TERMINATION_LOG=str(log)))
    metrics = metrics_of(base, 1)
    assert metrics["win_rate_vs_base"] > 0.5 and metrics["win_rate_vs_base_ci"][0] > 0.5
    assert metrics["lc_win_rate_vs_base"] > 0.5 and metrics["lc_win_rate_vs_base_ci"][0] > 0.5
    assert metrics["wins_vs_base"] + metrics["ties_vs_base"] + metrics["losses_vs_base"] == HELD_OUT
    # Iteration 1's previous model is the base: the same judgement under both names.
    assert metrics["win_rate_vs_previous"] == metrics["win_rate_vs_base"]
    assert (metrics["base_iteration"], metrics["previous_iteration"]) == (0, 0)
    summary = log.read_text()
    assert len(summary.encode()) < 4096 and json.loads(summary)["metrics"] == metrics
    judged = (base / "iter-1" / "evaluate" / "judgments.jsonl").read_text().splitlines()
    assert len(judged) == HELD_OUT


def test_the_base_model_against_itself_ties_every_prompt(tiny, spec, base: Path, tmp_path: Path) -> None:
    shutil.copytree(base / "iter-0", tmp_path / "iter-0")
    ok(run_cli("evaluate", evaluate_config(spec, tmp_path, 1, tiny["policy"], base=0, previous=0)))
    metrics = metrics_of(tmp_path, 1)
    assert metrics["ties_vs_base"] == HELD_OUT  # greedy decoding: the same model writes the same responses
    assert metrics["win_rate_vs_base"] == 0.5 and metrics["lc_win_rate_vs_base"] == pytest.approx(0.5, abs=1e-6)


def test_by_default_a_small_prompt_file_is_evaluated_on_the_prompts_the_iterations_leave(tiny, tmp_path) -> None:
    """248 prompts, 3 iterations of 48: the default held-out set is the 104 prompts left (its limit is 200)."""
    spec = tiny_spec(tiny, ranking=FUNCTION_RANKER, iterations=3, prompts={"perIteration": 48})
    ok(run_cli("evaluate", evaluate_config(spec, tmp_path, 0, tiny["policy"], limit=EvaluationSpec().limit)))
    ids = {json.loads(line)["prompt_id"] for line in (tmp_path / "iter-0/evaluate/responses.jsonl").open()}
    trained = {p["prompt_id"] for n in (1, 2, 3) for p in load_prompts(spec.prompts, n)}
    assert metrics_of(tmp_path, 0)["prompts"] == len(ids) == 248 - 3 * 48 and not ids & trained


def test_pairrm_judges_a_whole_evaluation_in_both_orders(tiny, base: Path, better: Path, tmp_path: Path) -> None:
    shutil.copytree(base / "iter-0", tmp_path / "iter-0")
    spec = tiny_spec(tiny)  # ranking: the tiny PairRM
    ok(run_cli("evaluate", evaluate_config(spec, tmp_path, 1, better, base=0, previous=0, best_of_n=2)))
    metrics = metrics_of(tmp_path, 1)
    assert metrics["ranker"] == "pairrm"
    assert metrics["wins_vs_base"] + metrics["ties_vs_base"] + metrics["losses_vs_base"] == HELD_OUT
    assert metrics["best_of_n"] == 2 and "best_of_n_win_rate_vs_base" in metrics
    judged = [json.loads(line) for line in (tmp_path / "iter-1/evaluate/judgments.jsonl").read_text().splitlines()]
    assert all(0 <= j["preference"] <= 1 and j["outcome"] in (0.0, 0.5, 1.0) for j in judged)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"iterations": 30}, "fewer than evaluation.minPrompts=16"),  # 30 x 8 leave 8 of the 248 tiny prompts
        ({"base": 0}, "no _SUCCESS.json"),  # the base evaluation has not run in this workspace
    ],
    ids=["held-out-overlaps-training", "missing-baseline"],
)
def test_an_evaluation_that_cannot_be_honest_is_refused_as_bad_input(tiny, tmp_path, change, message) -> None:
    spec = tiny_spec(tiny, ranking=FUNCTION_RANKER, iterations=change.get("iterations", 2))
    base = change.get("base")
    proc = run_cli("evaluate", evaluate_config(spec, tmp_path, 1, tiny["policy"], base=base, previous=base))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_pairrm_comparison_of_a_pair_is_one_minus_that_of_the_swapped_pair(tiny) -> None:
    from idpo_jobs.rank import PairRMRanker

    ranker = PairRMRanker(RankingSpec(ranker="pairrm", model=str(tiny["pairrm"])), str(tiny["pairrm"]))
    prompts = ["Describe tides in two sentences.", "Give three tips about chess.", "Why do people like kites?"]
    first = ["kind gentle helpful answer", "the river of time", "a calm and friendly honest reply about kites"]
    second = ["the mountain of water", "wise careful kind tips", "kites"]
    forward = ranker.compare(prompts, first, second)
    backward = ranker.compare(prompts, second, first)
    assert all(0 < p < 1 for p in forward)
    assert [f + b for f, b in zip(forward, backward, strict=True)] == pytest.approx([1.0] * 3, abs=1e-6)
    # llm-blender's own both-order mode agrees on who wins.
    wins = ranker.blender.compare(prompts, first, second, batch_size=4, disable_tqdm=True)
    assert [p > 0.5 for p in forward] == [bool(w) for w in wins]
    candidates = [[a, b, a + " " + b] for a, b in zip(first, second, strict=True)]
    best = ranker.best_of_n(prompts, candidates)
    assert best == ranker.best_of_n(prompts, candidates) and all(0 <= i < 3 for i in best)


@pytest.mark.parametrize(
    ("prompts", "problem"),
    [
        ({"source": "p.jsonl", "perIteration": 8}, None),
        ({"source": "p.jsonl", "splitPattern": None}, "whole prompt file"),
        ({"source": "org/data"}, None),  # train_iteration_{n} -> test_iteration_1
        ({"source": "org/data", "splitPattern": None, "split": "train"}, None),  # -> test
        ({"source": "org/data", "splitPattern": None, "split": "test"}, "is trained on"),
        ({"source": "org/data", "splitPattern": "part_{n}"}, "no held-out split follows"),
    ],
    ids=["file-per-iteration", "whole-file", "recipe-splits", "train-split", "test-split", "unknown-pattern"],
)
def test_a_default_held_out_set_exists_only_where_no_iteration_trains_on_it(prompts, problem) -> None:
    run = PromptsSpec.model_validate(prompts)
    found = EvaluationSpec().heldout_problem(run, iterations=3)
    assert (found is None) if problem is None else (problem in found)
    assert EvaluationSpec(prompts={"source": "held.jsonl"}).heldout_problem(run, iterations=3) is None


def test_the_recipe_is_evaluated_on_its_first_test_split() -> None:
    assert EvaluationSpec().heldout_split(PromptsSpec()) == "test_iteration_1"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"evaluation": {"prompts": {"source": "h.jsonl", "perIteration": 4}}}, "one fixed set"),
        ({"base_iteration": 2}, "must be an earlier evaluation"),
        ({"shards": 2}, "shards must be 1"),
    ],
    ids=["per-iteration-held-out", "baseline-after-model", "sharded"],
)
def test_evaluate_configs_that_cannot_work_are_refused(fields, message) -> None:
    common = {"run": "t", "iteration": 2, "workspace": "/w", "model": "m", "iterations": 2}
    sections = {"prompts": {}, "generation": {}, "ranking": {}}
    with pytest.raises(ValueError, match=message):
        EvaluateConfig.model_validate({**common, **sections, **fields})
