"""Evaluate stage: is this iteration's model better than the base model, and than the iteration before?

    python -m idpo_jobs.evaluate --config iter-2-evaluate.json

Generates one response per held-out prompt (greedy by default) with the generate stage's engines, and
judges it against the base model's and the previous iteration's saved responses with the run's ranker
(the rank stage's rankers). Iteration 0 is the base model: it generates the responses later iterations
are judged against. Writes:

- `responses.jsonl`: `prompt_id`, `prompt`, `response` (plus `best_of_n_responses`, `best_of_n_response`);
- `alpaca_eval.json` (and `alpaca_eval_best_of_n.json`): AlpacaEval's model-outputs layout, for its
  official evaluator;
- `judgments.jsonl`: per prompt and baseline, P(this model's response wins), the outcome, the lengths.

Metrics (docs/evaluation.md): win rates with Wilson 95% intervals, length-controlled win rates, ties,
mean response length; `idpo_jobs.winrate` does the statistics.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from idpo_jobs import contract, data, generate, rank, tracking, winrate
from idpo_jobs.config import PVC_CLAIM_ENV, PVC_SCHEME, EvaluateConfig, GenerationSpec, Stage, Workspace, on_volume
from idpo_jobs.uris import resolve_uri

RESPONSES = "responses.jsonl"
ALPACA_EVAL = "alpaca_eval.json"
ALPACA_EVAL_BEST_OF_N = "alpaca_eval_best_of_n.json"
JUDGMENTS = "judgments.jsonl"
# Greedy decoding through the engines' sampling path: a nucleus of (almost) no mass keeps only the
# most likely token, in transformers and vLLM alike (both always keep at least one).
GREEDY_TOP_P = 1e-9


def heldout_prompts(config: EvaluateConfig) -> list[dict[str, str]]:
    """The held-out prompts (EvaluationSpec.prompts describes the rule); the same set for every iteration."""
    ev, run = config.evaluation, config.prompts
    whole = {"per_iteration": None, "split_pattern": None, "limit": None}
    if ev.prompts is not None:
        return data.load_prompts(ev.prompts.model_copy(update={"split_pattern": None}), 1)[: ev.limit]
    problem = ev.heldout_problem(run, config.iterations)
    if problem:
        raise contract.StageError(problem)
    if run.per_iteration is None:
        return data.load_prompts(run.model_copy(update={**whole, "split": ev.heldout_split(run)}), 1)[: ev.limit]
    rows = data.load_prompts(run.model_copy(update=whole), 1)
    # The permutation data.load_prompts draws for perIteration: iterations slice it from the front.
    order = list(range(len(rows)))
    random.Random(run.seed).shuffle(order)
    trained = config.iterations * run.per_iteration
    left = min(ev.limit, len(rows) - trained)  # what no iteration trains on, up to the limit
    if left < ev.min_prompts:
        raise contract.StageError(
            f"only {max(left, 0)} held-out prompts are left, fewer than evaluation.minPrompts={ev.min_prompts}: "
            f"{config.iterations} iterations x prompts.perIteration={run.per_iteration} use {trained} of the "
            f"{len(rows)} prompts of {run.source}; lower iterations or prompts.perIteration, or set evaluation.prompts"
        )
    return [rows[i] for i in order[len(rows) - left :]]


def decoding(config: EvaluateConfig) -> GenerationSpec:
    """The run's generation section, made greedy (or the evaluation's temperature) and length-capped."""
    gen, ev = config.generation, config.evaluation
    update: dict[str, Any] = {"max_new_tokens": ev.max_new_tokens or gen.max_new_tokens}
    if ev.temperature == 0:
        update |= {"temperature": 1.0, "top_p": GREEDY_TOP_P}
    else:
        update["temperature"] = ev.temperature
    return gen.model_copy(update=update)


def sampling(config: EvaluateConfig) -> GenerationSpec:
    """Best-of-N samples as the generate stage draws them, at the evaluation's length cap."""
    gen = config.generation
    return gen.model_copy(update={"max_new_tokens": config.evaluation.max_new_tokens or gen.max_new_tokens})


def generate_responses(config: EvaluateConfig, prompts: list[str]) -> tuple[list[str], list[list[str]] | None]:
    """One decoded response per prompt, and best-of-N samples when asked; the engine is gone on return."""
    from idpo_jobs.models import render_prompt_ids

    spec = decoding(config)
    # The run's seed, not combined with the iteration: every model is sampled with the same stream.
    engine = generate.ENGINES[spec.engine](
        resolve_uri(config.model),
        spec,
        config.generation.seed,
        config.revision,
        config.chat_template,
        config.trust_remote_code,
    )
    prompt_ids = render_prompt_ids(engine.tokenizer, prompts)
    responses = [r[0] for r in engine.generate(prompt_ids, 1)]
    samples = None
    if config.evaluation.best_of_n:
        engine.spec = sampling(config)  # the engines read the spec per call: same weights, no second load
        samples = engine.generate(prompt_ids, config.evaluation.best_of_n)
    return responses, samples


def release_accelerator() -> None:
    """Free the engine's GPU memory before the ranker loads (vLLM reserves most of the GPU)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def preferences(ranker: rank.Ranker, prompts: list[str], ours: list[str], theirs: list[str]) -> list[float]:
    """P(ours beats theirs) per prompt. PairRM judges pairs in both orders; a reward model or a function
    scores each response, and equal scores tie. Identical responses always tie."""
    if isinstance(ranker, rank.PairRMRanker):
        probs = ranker.compare(prompts, ours, theirs)
    else:
        scores = ranker.score(prompts, [[a, b] for a, b in zip(ours, theirs, strict=True)])
        probs = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in scores]
    return [0.5 if a == b else p for a, b, p in zip(ours, theirs, probs, strict=True)]


def pick_best(ranker: rank.Ranker, prompts: list[str], candidates: list[list[str]]) -> list[int]:
    """Index of the ranker's favourite candidate per prompt (the first of equal scores)."""
    if isinstance(ranker, rank.PairRMRanker):
        return ranker.best_of_n(prompts, candidates)
    return [max(range(len(row)), key=row.__getitem__) for row in ranker.score(prompts, candidates)]


def read_responses(config: EvaluateConfig, iteration: int) -> dict[str, str]:
    """An earlier evaluation's responses by prompt id; it must be complete."""
    (directory,) = contract.require_input(config.evaluation_dir(iteration), 1, config.stage)
    return {row["prompt_id"]: row["response"] for row in data.read_jsonl(directory / RESPONSES)}


def judge(
    ranker: rank.Ranker, rows: list[dict[str, Any]], responses: list[str], baseline: dict[str, str], against: str
) -> tuple[winrate.Comparison, list[dict[str, Any]]]:
    """`responses` (one per row) against the baseline's on the prompts both have."""
    shared = [(row, ours) for row, ours in zip(rows, responses, strict=True) if row["prompt_id"] in baseline]
    if not shared:
        raise contract.StageError(f"the {against} evaluation has none of these held-out prompts")
    prompts = [row["prompt"] for row, _ in shared]
    ours = [r for _, r in shared]
    theirs = [baseline[row["prompt_id"]] for row, _ in shared]
    probs = preferences(ranker, prompts, ours, theirs)
    outcomes = [winrate.outcome(p) for p in probs]
    diffs = [len(a) - len(b) for a, b in zip(ours, theirs, strict=True)]
    judged = [
        {
            "prompt_id": row["prompt_id"],
            "against": against,
            "preference": round(p, 6),
            "outcome": o,
            "chars": len(a),
            "baseline_chars": len(b),
        }
        for (row, _), p, o, a, b in zip(shared, probs, outcomes, ours, theirs, strict=True)
    ]
    return winrate.compare(outcomes, diffs), judged


def alpaca_eval_rows(rows: list[dict[str, Any]], responses: list[str], generator: str) -> list[dict[str, str]]:
    return [
        {"instruction": row["prompt"], "output": out, "generator": generator}
        for row, out in zip(rows, responses, strict=True)
    ]


def mean_chars(texts: list[str]) -> float:
    return round(statistics.fmean(len(t) for t in texts), 2) if texts else 0.0


def compute(config: EvaluateConfig, out: Path, shard: int) -> dict[str, Any]:
    ev = config.evaluation
    rows = heldout_prompts(config)
    iterations = {"base": config.base_iteration, "previous": config.previous_iteration}
    # Read before the model loads: a missing baseline fails in seconds, not after generation.
    baselines = {name: read_responses(config, k) for name, k in iterations.items() if k is not None}
    prompts = [row["prompt"] for row in rows]
    responses, samples = generate_responses(config, prompts)
    release_accelerator()

    generator = f"{config.run}-iter-{config.iteration}"
    metrics: dict[str, Any] = {
        "prompts": len(rows),
        "mean_response_chars": mean_chars(responses),
        "empty_responses": sum(1 for r in responses if not r),
        "generator": generator,
        "ranker": config.ranking.ranker,
        "temperature": ev.temperature,
    }
    ranker = rank.make_ranker(config.ranking) if baselines or samples else None
    judgments: list[dict[str, Any]] = []
    done: dict[int, winrate.Comparison] = {}  # iteration 1's base is also its previous: judge it once
    for name, baseline in baselines.items():
        k = iterations[name]
        if k not in done:
            done[k], judged = judge(ranker, rows, responses, baseline, name)
            judgments += judged
        metrics |= {**done[k].metrics(f"vs_{name}"), f"{name}_iteration": k}

    best = None
    if samples is not None:
        best = [row[i] for row, i in zip(samples, pick_best(ranker, prompts, samples), strict=True)]
        metrics |= {"best_of_n": ev.best_of_n, "best_of_n_mean_response_chars": mean_chars(best)}
        # The base model's greedy responses; for the base model itself, the ones just generated.
        reference = baselines.get("base") or (
            {row["prompt_id"]: r for row, r in zip(rows, responses, strict=True)} if config.iteration == 0 else None
        )
        if reference is not None:
            comparison, judged = judge(ranker, rows, best, reference, "base")
            metrics |= {f"best_of_n_{k}": v for k, v in comparison.metrics("vs_base").items()}
            judgments += [{**j, "best_of_n": True} for j in judged]

    records = [{**row, "response": r} for row, r in zip(rows, responses, strict=True)]
    if samples is not None and best is not None:
        records = [
            {**rec, "best_of_n_responses": s, "best_of_n_response": b}
            for rec, s, b in zip(records, samples, best, strict=True)
        ]
    data.write_jsonl(out / RESPONSES, records)
    (out / ALPACA_EVAL).write_text(json.dumps(alpaca_eval_rows(rows, responses, generator), indent=1))
    if best is not None:
        bon = alpaca_eval_rows(rows, best, f"{generator}-best-of-{ev.best_of_n}")
        (out / ALPACA_EVAL_BEST_OF_N).write_text(json.dumps(bon, indent=1))
    if judgments:
        data.write_jsonl(out / JUDGMENTS, judgments)
    track(config, metrics)
    return metrics


def track(config: EvaluateConfig, metrics: dict[str, Any]) -> None:
    """On the run's own MLflow run: this evaluation's metrics (step = iteration), the best checkpoint so
    far as a tag, and the report of the iterations evaluated so far as an artifact."""
    tracker = tracking.current()
    tracker.metrics(metrics, step=config.iteration, prefix="evaluate/", parent=True)
    if not tracker.enabled or config.iteration == 0:
        return
    ws = Workspace(config.workspace)
    iterations = []
    for k in range(config.iteration + 1):
        stages = {s: contract.read_success(on_volume(ws.stage_dir(k, s))) for s in (Stage.RANK, Stage.TRAIN)}
        evaluated = {"metrics": metrics} if k == config.iteration else contract.read_success(config.evaluation_dir(k))
        found = {s.value: {"metrics": v.get("metrics", {})} for s, v in stages.items() if v}
        iterations.append(
            {"iteration": k, "stages": {**found, "evaluate": {"metrics": (evaluated or {}).get("metrics", {})}}}
        )
    rule = config.evaluation.stop_when
    history = [it["stages"]["evaluate"]["metrics"] for it in iterations[1:]]
    best = winrate.best_index(history, rule.metric if rule else "lcWinRateVsBase")
    if best is not None:
        uri = ws.checkpoint_uri(best + 1)
        claim = os.environ.get(PVC_CLAIM_ENV)
        if claim and uri.startswith(PVC_SCHEME):
            uri = f"{PVC_SCHEME}{claim}/{uri[len(PVC_SCHEME) :]}"  # KServe's form, as status names it
        tracker.tag("idpo.best_iteration", str(best + 1), parent=True)
        tracker.tag("idpo.best_checkpoint", uri, parent=True)
    from idpo_jobs import report

    status = {"iterations": iterations, "bestIteration": best + 1 if best is not None else None}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "report.md"
        path.write_text(report.render_markdown(status, config.run))
        tracker.artifact(path, parent=True)


def inputs(config: EvaluateConfig) -> dict[str, str]:
    found = {"model": resolve_uri(config.model), "prompts": resolve_uri(config.prompts.source)}
    if config.evaluation.prompts is not None:
        found["heldout"] = resolve_uri(config.evaluation.prompts.source)
    for name, k in (("base", config.base_iteration), ("previous", config.previous_iteration)):
        if k is not None:
            found[name] = str(config.evaluation_dir(k))
    if config.ranking.model and config.ranking.ranker != "function":
        found["ranker"] = resolve_uri(config.ranking.model)
    return found


def main() -> int:
    return contract.cli(EvaluateConfig, compute, inputs)


if __name__ == "__main__":  # the guard matters: vLLM spawns worker processes that re-import this
    sys.exit(main())
